"""Issue 14 probe: an explicitly warp-specialized causal prefill kernel in Gluon (Hopper).

Triton 3.6's automatic warp specialization gave NaN or hung on the H200 (session 12,
`ws_prefill_experiment.py`), so this writes the producer / consumer split by hand with
Gluon (`triton.experimental.gluon`): one load warp issues TMA copies of Q once and of
the K / V tiles into a ring of shared-memory buffers guarded by mbarriers (``ready``:
the copy landed; ``empty``: the consumers are done with the buffer); the default
partition (8 warps = two warpgroups of 64 query rows each) runs QK^T and PV on the
tensor cores with ``warpgroup_mma`` and the online softmax in registers.

``OVERLAP`` (FA3's intra-warpgroup overlap): the QK^T of tile j+1 is issued before the
PV of tile j and the softmax of tile j+1 runs while that PV is on the tensor cores.

Layout: the keys of a sequence are consecutive rows, as the package's staging copy
leaves them (``k`` / ``v`` ``[total_keys, num_kv_heads, head]``, sequence ``b`` from row
``cu_k[b]``), ``q`` / ``out`` ``[total_queries, num_q_heads, head]`` (sequence ``b`` from
row ``cu_q[b]``); causal with the queries at the end of the keys (chunked prefill).
Grid: one program per (query tile of 128 rows of one sequence, q head), heads fastest,
tiles heaviest first (a host-built table).

    PYTHONPATH=src python benchmarks/gluon_prefill_experiment.py --compile-only  # sm90, no GPU
    PYTHONPATH=src python benchmarks/gluon_prefill_experiment.py --out DIR  # H200: check, time
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

# the package kernel's softmax step (since session 13's review; the runs logged in NOTES
# used a copy without its guard for rows that see no key, which every row here sees)
from portattn.kernels.gluon_prefill import _copy_tile, _softmax_tile

LOG2E = 1.4426950408889634


@gluon.jit
def _load_partition(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bar, k_ready, v_ready,
                    k_empty, v_empty, q_row, q_col, k_row0, kv_col, n_tiles, bt_row_ptr,
                    bt_width, BLOCK_N: gl.constexpr, PAGED: gl.constexpr,
                    BLOCK_SIZE: gl.constexpr):
    """One warp: Q once (one box per consumer partition), then K and V of every visible
    key tile into the ring. ``PAGED``: a tile is ``BLOCK_N // BLOCK_SIZE`` boxes of one
    cache block each (rows ``block_id * BLOCK_SIZE`` of the 2-D cache view), landing in
    consecutive row slices of the tile's buffer; block-table columns past ``bt_width``
    read the last column (their keys are past the sequence and masked)."""
    num_buf: gl.constexpr = k_bufs.type.shape[0]
    consumers: gl.constexpr = q_bufs.type.shape[0]
    rows: gl.constexpr = q_desc.block_type.shape[0]
    mbarrier.expect(q_bar, consumers * q_desc.block_type.nbytes)
    for i in gl.static_range(consumers):
        tma.async_copy_global_to_shared(q_desc, [q_row + i * rows, q_col], q_bar,
                                        q_bufs.index(i))
    for j in range(n_tiles):
        idx = j % num_buf
        phase = (j // num_buf) & 1
        # a fresh mbarrier counts as having completed the phase before 0
        if PAGED:  # the package's copy of a tile (its ids are all valid here)
            _copy_tile(k_desc, k_bufs.index(idx), k_ready.index(idx), k_empty.index(idx),
                       phase, j, kv_col, bt_row_ptr, bt_width, 1 << 30, BLOCK_N, BLOCK_SIZE)
            _copy_tile(v_desc, v_bufs.index(idx), v_ready.index(idx), v_empty.index(idx),
                       phase, j, kv_col, bt_row_ptr, bt_width, 1 << 30, BLOCK_N, BLOCK_SIZE)
        else:
            row = k_row0 + j * BLOCK_N
            mbarrier.wait(k_empty.index(idx), phase ^ 1)
            mbarrier.expect(k_ready.index(idx), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [row, kv_col], k_ready.index(idx),
                                            k_bufs.index(idx))
            mbarrier.wait(v_empty.index(idx), phase ^ 1)
            mbarrier.expect(v_ready.index(idx), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [row, kv_col], v_ready.index(idx),
                                            v_bufs.index(idx))


@gluon.jit
def _compute_partition(q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, k_empty, v_empty,
                       out_ptr, stride_ot, stride_oh, q_start, q_len, head, m0, off, k_len,
                       n_full, n_tiles, qk_scale, BLOCK_M: gl.constexpr,
                       BLOCK_N: gl.constexpr, HEAD: gl.constexpr, OVERLAP: gl.constexpr,
                       num_warps: gl.constexpr):
    """``BLOCK_M`` query rows from ``m0`` (one or two warpgroups): QK^T, softmax and PV
    per key tile; tiles from ``n_full`` on are masked (causal diagonal, sequence end).
    Every consumer partition takes every tile and arrives on its ``empty`` barriers."""
    num_buf: gl.constexpr = k_bufs.type.shape[0]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    orow_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
    ocol_layout: gl.constexpr = gl.SliceLayout(0, o_layout)

    rows = m0 + gl.arange(0, BLOCK_M, layout=row_layout)
    cols = gl.arange(0, BLOCK_N, layout=col_layout)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_layout)
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, layout=row_layout)
    acc = gl.zeros([BLOCK_M, HEAD], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    mods = (qk_scale, 0.0, 0.0, 0)  # the package's score step: no softcap, ALiBi, window
    mbarrier.wait(q_bar, 0)

    if OVERLAP:
        # tile 0: scores and probabilities before the loop
        mbarrier.wait(k_ready.index(0), 0)
        s = warpgroup_mma(q_smem, k_bufs.index(0).permute((1, 0)), s_zero, use_acc=False,
                          is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        mbarrier.arrive(k_empty.index(0), count=1)
        p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, mods, rows, cols, 0, off,
                                           k_len, n_full == 0, True, False, False, 0)
        for j in range(1, n_tiles):
            idx = j % num_buf
            phase = (j // num_buf) & 1
            prev = (j - 1) % num_buf
            prev_phase = ((j - 1) // num_buf) & 1
            mbarrier.wait(k_ready.index(idx), phase)
            s = warpgroup_mma(q_smem, k_bufs.index(idx).permute((1, 0)), s_zero,
                              use_acc=False, is_async=True)
            mbarrier.wait(v_ready.index(prev), prev_phase)
            p16 = gl.convert_layout(p.to(gl.bfloat16), p_layout)
            acc = warpgroup_mma(p16, v_bufs.index(prev), acc, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))
            mbarrier.arrive(k_empty.index(idx), count=1)
            p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, mods, rows, cols, j * BLOCK_N, off,
                                               k_len, j >= n_full, True, False, False, 0)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            mbarrier.arrive(v_empty.index(prev), count=1)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, orow_layout), 1)
        last = (n_tiles - 1) % num_buf
        last_phase = ((n_tiles - 1) // num_buf) & 1
        mbarrier.wait(v_ready.index(last), last_phase)
        p16 = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        acc = warpgroup_mma(p16, v_bufs.index(last), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(v_empty.index(last), count=1)
    else:
        for j in range(n_tiles):
            idx = j % num_buf
            phase = (j // num_buf) & 1
            mbarrier.wait(k_ready.index(idx), phase)
            s = warpgroup_mma(q_smem, k_bufs.index(idx).permute((1, 0)), s_zero,
                              use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
            mbarrier.arrive(k_empty.index(idx), count=1)
            p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, mods, rows, cols, j * BLOCK_N, off,
                                               k_len, j >= n_full, True, False, False, 0)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, orow_layout), 1)
            p16 = gl.convert_layout(p.to(gl.bfloat16), p_layout)
            mbarrier.wait(v_ready.index(idx), phase)
            acc = warpgroup_mma(p16, v_bufs.index(idx), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            mbarrier.arrive(v_empty.index(idx), count=1)

    o = acc / gl.expand_dims(gl.convert_layout(l_i, orow_layout), 1)
    orows = m0 + gl.arange(0, BLOCK_M, layout=orow_layout)
    ocols = gl.arange(0, HEAD, layout=ocol_layout)
    offs = gl.expand_dims((q_start + orows).to(gl.int64) * stride_ot, 1) + \
        head * stride_oh + gl.expand_dims(ocols, 0)
    gl.store(out_ptr + offs, o.to(out_ptr.dtype.element_ty),
             mask=gl.expand_dims(orows < q_len, 1))


@gluon.jit
def gluon_causal_prefill_kernel(q_desc, k_desc, v_desc, out_ptr, stride_ot, stride_oh,
                                cu_q_ptr, cu_k_ptr, tile_seq_ptr, tile_m0_ptr, qk_scale,
                                bt_ptr, bt_stride, bt_width,
                                NUM_Q_HEADS: gl.constexpr, GROUP: gl.constexpr,
                                BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                                HEAD: gl.constexpr, NUM_BUF: gl.constexpr,
                                OVERLAP: gl.constexpr, SPLIT_WG: gl.constexpr,
                                CONSUMER_REGS: gl.constexpr, PAGED: gl.constexpr,
                                BLOCK_SIZE: gl.constexpr, num_warps: gl.constexpr):
    """Causal prefill over consecutive key rows; see the module doc.

    Layout: ``q_desc`` over ``q`` viewed ``[total_q, num_q_heads * HEAD]``, box
    ``[BLOCK_M, HEAD]``; ``k_desc`` / ``v_desc`` over ``[total_k, num_kv_heads * HEAD]``,
    box ``[BLOCK_N, HEAD]``; ``out`` through (token, head) strides, last dim contiguous.
    Grid ``(num_tiles * NUM_Q_HEADS,)``: program ``p`` is tile ``p // NUM_Q_HEADS`` of the
    table (``tile_seq`` / ``tile_m0``: sequence and first query row) for q head
    ``p % NUM_Q_HEADS``. Switches: ``NUM_BUF`` K/V ring depth, ``OVERLAP`` (module doc),
    ``SPLIT_WG``: the two warpgroups of a tile are two partitions (``num_warps`` 4, q box
    ``[BLOCK_M // 2, HEAD]``, ``CONSUMER_REGS`` registers per thread each), each waiting
    and arriving on its own instead of both at a partition-wide barrier per arrival.
    ``PAGED``: ``k_desc`` / ``v_desc`` are over the paged caches viewed ``[num_blocks *
    BLOCK_SIZE, num_kv_heads * HEAD]`` (box ``[BLOCK_SIZE, HEAD]``) and key ``k`` of
    sequence ``b`` is slot ``k % BLOCK_SIZE`` of block ``bt[b, k // BLOCK_SIZE]``; no
    staging copy. (Experiment: block ids are trusted, no bad-id handling.)
    """
    pid = gl.program_id(0)
    tile = pid // NUM_Q_HEADS
    head = pid % NUM_Q_HEADS
    kv_head = head // GROUP
    seq = gl.load(tile_seq_ptr + tile)
    m0 = gl.load(tile_m0_ptr + tile)
    q_start = gl.load(cu_q_ptr + seq)
    q_len = gl.load(cu_q_ptr + seq + 1) - q_start
    k_start = gl.load(cu_k_ptr + seq)
    k_len = gl.load(cu_k_ptr + seq + 1) - k_start
    off = k_len - q_len
    last_row = gl.minimum(m0 + BLOCK_M, q_len) - 1
    n_tiles = gl.cdiv(gl.minimum(k_len, last_row + off + 1), BLOCK_N)
    n_full = gl.minimum((m0 + off + 1) // BLOCK_N, k_len // BLOCK_N)

    consumers: gl.constexpr = 2 if SPLIT_WG else 1
    rows: gl.constexpr = BLOCK_M // consumers
    q_bufs = gl.allocate_shared_memory(q_desc.dtype, [consumers] + q_desc.block_type.shape,
                                       q_desc.layout)
    k_bufs = gl.allocate_shared_memory(k_desc.dtype, [NUM_BUF, BLOCK_N, HEAD], k_desc.layout)
    v_bufs = gl.allocate_shared_memory(v_desc.dtype, [NUM_BUF, BLOCK_N, HEAD], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(NUM_BUF):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=consumers)
        mbarrier.init(v_empty.index(i), count=consumers)
    fence_async_shared()

    # (the load partition's arguments are written out in each call: a tuple assigned to a
    # local first turns its constexprs into tensors)
    if SPLIT_WG:
        gl.warp_specialize([
            (_compute_partition, (q_bufs.index(0), k_bufs, v_bufs, q_bar, k_ready, v_ready,
                                  k_empty, v_empty, out_ptr, stride_ot, stride_oh, q_start,
                                  q_len, head, m0, off, k_len, n_full, n_tiles, qk_scale,
                                  rows, BLOCK_N, HEAD, OVERLAP, num_warps)),
            (_compute_partition, (q_bufs.index(1), k_bufs, v_bufs, q_bar, k_ready, v_ready,
                                  k_empty, v_empty, out_ptr, stride_ot, stride_oh, q_start,
                                  q_len, head, m0 + rows, off, k_len, n_full, n_tiles,
                                  qk_scale, rows, BLOCK_N, HEAD, OVERLAP, num_warps)),
            (_load_partition, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bar,
                               k_ready, v_ready, k_empty, v_empty, q_start + m0, head * HEAD,
                               k_start, kv_head * HEAD, n_tiles, bt_ptr + seq * bt_stride,
                               bt_width, BLOCK_N, PAGED, BLOCK_SIZE)),
        ], [num_warps, 1], [CONSUMER_REGS, 24])
    else:
        gl.warp_specialize([
            (_compute_partition, (q_bufs.index(0), k_bufs, v_bufs, q_bar, k_ready, v_ready,
                                  k_empty, v_empty, out_ptr, stride_ot, stride_oh, q_start,
                                  q_len, head, m0, off, k_len, n_full, n_tiles, qk_scale,
                                  BLOCK_M, BLOCK_N, HEAD, OVERLAP, num_warps)),
            (_load_partition, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bar,
                               k_ready, v_ready, k_empty, v_empty, q_start + m0, head * HEAD,
                               k_start, kv_head * HEAD, n_tiles, bt_ptr + seq * bt_stride,
                               bt_width, BLOCK_N, PAGED, BLOCK_SIZE)),
        ], [1], [24])


# ---------------------------------------------------------------------------------------
# host side

CONFIGS = {  # head -> (BLOCK_N, NUM_BUF)
    64: (128, 3),
    128: (128, 2),
    256: (64, 2),
}


def tile_table(q_lens, k_lens, block_m):
    """(sequence, first row) of every query tile, heaviest (most visible keys) first."""
    tiles = []
    for b, (ql, kl) in enumerate(zip(q_lens, k_lens)):
        for m0 in range(0, ql, block_m):
            work = min(kl, min(m0 + block_m, ql) + kl - ql)
            tiles.append((work, b, m0))
    tiles.sort(key=lambda t: -t[0])
    return [t[1] for t in tiles], [t[2] for t in tiles]


def make_launch(q, k, v, out, q_lens, k_lens, scale, overlap=True, block_n=None, num_buf=None,
                maxnreg=None, split_wg=False, consumer_regs=240, paged=None):
    """A closure launching the kernel on these tensors (descriptors and table built once).
    ``paged``: ``(key_cache, value_cache, block_table)`` holding the same keys, read
    instead of ``k`` / ``v`` (whose row counts then only say the lengths)."""
    import torch
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    total_q, hq, head = q.shape
    hk = k.shape[1]
    bm = 128
    bn, nbuf = CONFIGS[head]
    bn = block_n or bn
    nbuf = num_buf or nbuf
    q2 = q.view(total_q, hq * head)
    k2 = k.view(k.shape[0], hk * head)
    v2 = v.view(v.shape[0], hk * head)
    kv_box = [bn, head]
    bt, bs = None, 1
    if paged is not None:
        kc, vc, bt = paged
        bs = kc.shape[1]
        k2 = kc.view(kc.shape[0] * bs, hk * head)
        v2 = vc.view(vc.shape[0] * bs, hk * head)
        kv_box = [bs, head]
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    qbox = [bm // 2 if split_wg else bm, head]
    q_desc = TensorDescriptor.from_tensor(
        q2, qbox, gl.NVMMASharedLayout.get_default_for(qbox, gdt))
    kv_layout = gl.NVMMASharedLayout.get_default_for([bn, head], gdt)
    k_desc = TensorDescriptor.from_tensor(k2, kv_box, kv_layout)
    v_desc = TensorDescriptor.from_tensor(v2, kv_box, kv_layout)
    dev = q.device
    cu_q = torch.tensor([0] + list(_cumsum(q_lens)), dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0] + list(_cumsum(k_lens)), dtype=torch.int32, device=dev)
    seqs, m0s = tile_table(q_lens, k_lens, bm)
    tile_seq = torch.tensor(seqs, dtype=torch.int32, device=dev)
    tile_m0 = torch.tensor(m0s, dtype=torch.int32, device=dev)
    grid = (len(seqs) * hq,)
    if bt is None:
        bt = tile_seq  # unused
    extra = {} if maxnreg is None else {"maxnreg": maxnreg}

    def launch():
        gluon_causal_prefill_kernel[grid](
            q_desc, k_desc, v_desc, out, out.stride(0), out.stride(1), cu_q, cu_k, tile_seq,
            tile_m0, scale * LOG2E, bt, bt.stride(0), bt.shape[-1], NUM_Q_HEADS=hq,
            GROUP=hq // hk, BLOCK_M=bm, BLOCK_N=bn, HEAD=head, NUM_BUF=nbuf, OVERLAP=overlap,
            SPLIT_WG=split_wg, CONSUMER_REGS=consumer_regs, PAGED=paged is not None,
            BLOCK_SIZE=bs, num_warps=4 if split_wg else 8, **extra)
    return launch


def _cumsum(xs):
    total = 0
    for x in xs:
        total += x
        yield total


# ---------------------------------------------------------------------------------------
# offline compile (no GPU)

def compile_only(arch: int) -> None:
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    target = GPUTarget("cuda", arch, 128)
    for head, (bn, nbuf) in CONFIGS.items():
        for overlap, split_wg, paged in ((False, False, False), (True, False, False),
                                         (True, True, False), (True, True, True)):
            kvrows = 16 if paged else bn
            bm = 128
            qbox = [bm // 2 if split_wg else bm, head]
            lq = gl.NVMMASharedLayout.get_default_for(qbox, gl.bfloat16)
            lk = gl.NVMMASharedLayout.get_default_for([bn, head], gl.bfloat16)
            sig = {"q_desc": f"tensordesc<bf16[{qbox[0]}, {head}],{lq!r}>",
                   "k_desc": f"tensordesc<bf16[{kvrows}, {head}],{lk!r}>",
                   "v_desc": f"tensordesc<bf16[{kvrows}, {head}],{lk!r}>",
                   "out_ptr": "*bf16", "stride_ot": "i32", "stride_oh": "i32",
                   "cu_q_ptr": "*i32", "cu_k_ptr": "*i32", "tile_seq_ptr": "*i32",
                   "tile_m0_ptr": "*i32", "qk_scale": "fp32", "bt_ptr": "*i32",
                   "bt_stride": "i32", "bt_width": "i32"}
            consts = {"NUM_Q_HEADS": 32, "GROUP": 4, "BLOCK_M": bm, "BLOCK_N": bn, "HEAD": head,
                      "NUM_BUF": nbuf, "OVERLAP": overlap, "SPLIT_WG": split_wg,
                      "CONSUMER_REGS": 240, "PAGED": paged, "BLOCK_SIZE": kvrows,
                      "num_warps": 4 if split_wg else 8}
            sig.update({name: "constexpr" for name in consts})
            src = GluonASTSource(gluon_causal_prefill_kernel, sig, consts, {})
            name = f"head {head} overlap {overlap} split_wg {split_wg} paged {paged}"
            t0 = time.time()
            try:
                k = triton.compile(src, target=target, options={"num_warps": consts["num_warps"]})
            except Exception as exc:  # report and go on: this is a probe
                print(f"{name}: FAILED {type(exc).__name__}: {str(exc)[:3000]}")
                continue
            ptx = k.asm["ptx"]
            counts = {key: ptx.count(tok) for key, tok in (
                ("wgmma", "wgmma.mma_async"), ("tma", "cp.async.bulk.tensor"),
                ("mbar_arrive", "mbarrier.arrive"), ("bar_sync", "bar.sync"),
                ("setmaxnreg", "setmaxnreg"), ("wait_group", "wgmma.wait_group"))}
            print(f"{name}: smem {k.metadata.shared} B, warps {k.metadata.num_warps}, "
                  f"{counts}, {time.time() - t0:.1f} s")
            tag = f"h{head}_o{int(overlap)}_s{int(split_wg)}_p{int(paged)}"
            with open(f"/tmp/gluon_{tag}.ptx", "w") as f:
                f.write(ptx)


# ---------------------------------------------------------------------------------------
# GPU: check against SDPA and time against the package and cuDNN

GPU_CASES = [(128, [2048] * 4), (128, [4096]), (128, [8192]), (256, [2048] * 4),
             (256, [4096]), (64, [2048] * 4), (128, [3000, 1000, 77, 2000])]
#: name -> make_launch keywords
ALL_VARIANTS = {"ws": dict(overlap=False), "ws+overlap": dict(overlap=True),
                "ws+overlap buf3": dict(overlap=True, num_buf=3),
                "2 consumers+overlap": dict(overlap=True, split_wg=True),
                "2 consumers+overlap buf3": dict(overlap=True, split_wg=True, num_buf=3)}
ALL_VARIANTS.update({
    "2 consumers+overlap paged": dict(overlap=True, split_wg=True, paged=True),
    "2 consumers+overlap paged buf3": dict(overlap=True, split_wg=True, num_buf=3, paged=True)})
#: what a run measures (``--variants`` picks others)
VARIANTS = {name: ALL_VARIANTS[name] for name in
            ("ws+overlap", "2 consumers+overlap", "2 consumers+overlap buf3",
             "2 consumers+overlap paged", "2 consumers+overlap paged buf3")}


def run_gpu(out_dir: str, rep: int, case_index: int) -> None:
    """One case (a child process per case: a hang costs one case's timeout)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    dev = torch.device("cuda")
    results = {"gpu": torch.cuda.get_device_name(), "rows": []}
    for head, lens in GPU_CASES[case_index:case_index + 1]:
        hq, hk = 32, 8
        total = sum(lens)
        q = torch.randn(total, hq, head, device=dev, dtype=torch.bfloat16)
        k = torch.randn(total, hk, head, device=dev, dtype=torch.bfloat16)
        v = torch.randn(total, hk, head, device=dev, dtype=torch.bfloat16)
        scale = head ** -0.5
        # reference: SDPA per sequence in fp32 math
        ref = torch.empty_like(q)
        start = 0
        for n in lens:
            qs = q[start:start + n].transpose(0, 1).float()
            ks = k[start:start + n].transpose(0, 1).float().repeat_interleave(hq // hk, 0)
            vs = v[start:start + n].transpose(0, 1).float().repeat_interleave(hq // hk, 0)
            ref[start:start + n] = F.scaled_dot_product_attention(
                qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1).to(q.dtype)
            start += n
        flops = sum(4 * n * n / 2 * head * hq for n in lens)
        row = {"head": head, "lens": f"{len(lens)} x {lens[0]}"}
        paged = _paged_cache(k, v, lens)
        for name, kw in VARIANTS.items():
            if kw.get("num_buf") == 3 and head == 256:
                continue
            kw = dict(kw, paged=paged if kw.get("paged") else None)
            out = torch.full_like(q, float("nan"))
            try:
                launch = make_launch(q, k, v, out, lens, lens, scale, **kw)
                launch()
                torch.cuda.synchronize()
            except Exception as exc:
                row[name] = f"error {type(exc).__name__}: {str(exc)[:400]}"
                print(head, lens, name, row[name], flush=True)
                continue
            err = (out.float() - ref.float()).abs().max().item()
            nan = bool(torch.isnan(out).any())
            ms = triton.testing.do_bench_cudagraph(launch, rep=rep)
            row[name] = {"us": round(ms * 1e3, 1), "tflops": round(flops / ms / 1e9, 1),
                         "max_err": err, "nan": nan}
            print(head, lens, name, row[name], flush=True)
        # SDPA cuDNN on contiguous [1, H, S, D] per sequence (one graph)
        qs = [q[s0:s0 + n].transpose(0, 1).unsqueeze(0) for s0, n in _starts(lens)]
        ks = [k[s0:s0 + n].transpose(0, 1).unsqueeze(0).repeat_interleave(hq // hk, 1).contiguous()
              for s0, n in _starts(lens)]
        vs = [v[s0:s0 + n].transpose(0, 1).unsqueeze(0).repeat_interleave(hq // hk, 1).contiguous()
              for s0, n in _starts(lens)]
        qs = [x.contiguous() for x in qs]

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                for a, b, c in zip(qs, ks, vs):
                    F.scaled_dot_product_attention(a, b, c, is_causal=True, scale=scale)
        try:
            cudnn()
            ms = triton.testing.do_bench_cudagraph(cudnn, rep=rep)
            row["cudnn"] = {"us": round(ms * 1e3, 1), "tflops": round(flops / ms / 1e9, 1)}
        except Exception as exc:
            row["cudnn"] = f"error {type(exc).__name__}: {str(exc)[:200]}"
        print(head, lens, "cudnn", row["cudnn"], flush=True)
        row["package_staged"] = _package_time(q, paged, lens, scale, rep)
        print(head, lens, "package", row["package_staged"], flush=True)
        results["rows"].append(row)
        del q, k, v, ref
        torch.cuda.empty_cache()
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"gluon_prefill_case{case_index}.json"), "w") as f:
        json.dump(results, f, indent=1)


def _starts(lens):
    s = 0
    for n in lens:
        yield s, n
        s += n


def _paged_cache(k, v, lens, block_size=16):
    """A block-16 paged cache holding the keys (blocks in a random order) and its table."""
    import torch

    hk, head = k.shape[1], k.shape[2]
    nblocks = [math.ceil(n / block_size) for n in lens]
    num_blocks = sum(nblocks) + 1
    kc = torch.zeros(num_blocks, block_size, hk, head, device=k.device, dtype=k.dtype)
    vc = torch.zeros_like(kc)
    perm = torch.randperm(num_blocks - 1, device=k.device) + 1
    bt = torch.zeros(len(lens), max(nblocks), dtype=torch.int32, device=k.device)
    b0 = 0
    for b, (s0, n) in enumerate(_starts(lens)):
        ids = perm[b0:b0 + nblocks[b]]
        bt[b, :nblocks[b]] = ids.int()
        flat_k = torch.zeros(nblocks[b] * block_size, hk, head, device=k.device, dtype=k.dtype)
        flat_v = torch.zeros_like(flat_k)
        flat_k[:n] = k[s0:s0 + n]
        flat_v[:n] = v[s0:s0 + n]
        kc[ids] = flat_k.view(-1, block_size, hk, head)
        vc[ids] = flat_v.view(-1, block_size, hk, head)
        b0 += nblocks[b]
    return kc, vc, bt


def _package_time(q, paged, lens, scale, rep):
    """The package's planned prefill over the same block-16 paged cache."""
    import torch

    import portattn
    try:
        kc, vc, bt = paged
        cache = portattn.PagedKVCache(key_cache=kc, value_cache=vc)
        cu = torch.tensor([0] + list(_cumsum(lens)), dtype=torch.int32, device=q.device)
        md = portattn.AttentionMetadata(
            cu_seqlens_q=cu, seq_lens=torch.tensor(lens, dtype=torch.int32, device=q.device),
            block_table=bt, max_seqlen_q=max(lens), max_seqlen_k=max(lens))
        plan = portattn.plan(md, num_q_heads=q.shape[1], dtype=q.dtype, cache=cache,
                             scale=scale, causal=True)
        out = torch.empty_like(q)
        plan.run(q, cache, out=out)
        ms = triton.testing.do_bench_cudagraph(lambda: plan.run(q, cache, out=out), rep=rep)
        flops = sum(4 * n * n / 2 * kc.shape[-1] * q.shape[1] for n in lens)
        return {"us": round(ms * 1e3, 1), "tflops": round(flops / ms / 1e9, 1)}
    except Exception as exc:
        return f"error {type(exc).__name__}: {str(exc)[:300]}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--out", default="gluon-out")
    ap.add_argument("--rep", type=int, default=200)
    ap.add_argument("--case", type=int, default=None)
    ap.add_argument("--variants", default=None, help="comma-separated names of ALL_VARIANTS")
    ap.add_argument("--case-timeout", type=int, default=100)
    args = ap.parse_args(argv)
    if args.variants:
        VARIANTS.clear()
        VARIANTS.update({name: ALL_VARIANTS[name] for name in args.variants.split(",")})
    if args.compile_only:
        compile_only(args.arch)
    elif args.case is not None:
        run_gpu(args.out, args.rep, args.case)
    else:
        import subprocess
        for i in range(len(GPU_CASES)):
            cmd = [sys.executable, __file__, "--case", str(i), "--out", args.out,
                   "--rep", str(args.rep), "--variants", ",".join(VARIANTS)]
            try:
                subprocess.run(cmd, timeout=args.case_timeout, check=False)
            except subprocess.TimeoutExpired:
                print(f"case {i} {GPU_CASES[i]}: TIMEOUT after {args.case_timeout} s "
                      "(a hang?)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
