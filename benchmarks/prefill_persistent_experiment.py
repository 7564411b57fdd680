"""Issue 14 experiment: what the staged prefill loop gains from a persistent grid, host
(grid-constant) tensor descriptors and Triton's loop flattening, measured against the
plan's staged prefill (staging + the unified kernel) in one run.

The kernel here is an experiment, not the package's: causal prefill over keys already
staged densely (sequence ``b``'s key ``k`` at row ``b * rows_per_seq + k`` of
``[rows, num_kv_heads, HEAD]``, what :mod:`portattn.kernels.stage` writes), GQA rows
packed as in the unified kernel (row ``r``: token ``r // GROUP``, head ``r % GROUP``).
Grid: one program per (query tile, kv head) work item, or ``NUM_PROGS`` persistent
programs striding over the items, heaviest query tiles first. Switches: ``PERSISTENT``,
``HOST_DESC`` (descriptors built on the host and passed as grid constants, else built
in the kernel), ``FLATTEN`` (``tl.range(..., flatten=True)`` on the persistent loop).

    PYTHONPATH=src python3 benchmarks/prefill_persistent_experiment.py [CASE ...]
"""

from __future__ import annotations

import json
import os
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from portattn.bench import Case, GraphTimer, build_inputs, case_flops
from portattn.kernels.common import find_seq_of_tile, online_softmax_step, score_tile
from portattn.kernels.heuristics import (
    Shape,
    next_pow2,
    plan_launch,
    stage_config,
    staged_long_config,
)
from portattn.kernels.launch import launch_unified
from portattn.options import normalize_options


@triton.jit
def _kv_tiles(acc, m_i, l_i, q, k_desc, v_desc, row0, head, lo, hi, qk_scale, q_pos,
              seq_len, BLOCK_N: tl.constexpr, HEAD: tl.constexpr, MASKED: tl.constexpr,
              WS: tl.constexpr = False):
    for j in tl.range(lo, hi, warp_specialize=WS):
        k = k_desc.load([row0 + j * BLOCK_N, head, 0]).reshape(BLOCK_N, HEAD)
        qk = tl.dot(q, tl.trans(k))
        k_pos = j * BLOCK_N + tl.arange(0, BLOCK_N)
        s = score_tile(qk, qk_scale, 0.0, qk_scale, q_pos, k_pos, seq_len, 0, MASKED, True,
                       False, False, 0)
        p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i, MASKED)
        v = v_desc.load([row0 + j * BLOCK_N, head, 0]).reshape(BLOCK_N, HEAD)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_i, l_i


@triton.jit
def _one_item(item, q_ptr, out_ptr, k_desc, v_desc, cu_seqlens_q_ptr, seq_lens_ptr, num_seqs,
              num_kv_heads, total_tiles, rows_per_seq, qk_scale, stride_qt, stride_qh,
              stride_ot, stride_oh, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, HEAD: tl.constexpr,
              WS: tl.constexpr):
    tile_idx = total_tiles - 1 - item // num_kv_heads
    head = item % num_kv_heads
    seq = find_seq_of_tile(cu_seqlens_q_ptr, num_seqs, tile_idx, BLOCK_Q)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    t0 = (tile_idx - (q_start // BLOCK_Q + seq)) * BLOCK_Q
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len
    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD)
    row_tok = t0 + rows // GROUP
    row_head = head * GROUP + rows % GROUP
    row_ok = (row_tok < q_len)
    q_pos = context + row_tok
    q = tl.load(q_ptr + (q_start + row_tok).to(tl.int64)[:, None] * stride_qt
                + row_head[:, None] * stride_qh + offs_d[None, :], mask=row_ok[:, None],
                other=0.0)
    valid = t0 < q_len
    t_last = tl.minimum(t0 + BLOCK_Q, q_len) - 1
    tile_hi = tl.where(valid, tl.cdiv(tl.minimum(seq_len, context + t_last + 1), BLOCK_N), 0)
    full_hi = tl.minimum((context + t0 + 1) // BLOCK_N, tile_hi)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD], dtype=tl.float32)
    row0 = seq * rows_per_seq
    acc, m_i, l_i = _kv_tiles(acc, m_i, l_i, q, k_desc, v_desc, row0, head, 0, full_hi,
                              qk_scale, q_pos, seq_len, BLOCK_N, HEAD, False, WS)
    acc, m_i, l_i = _kv_tiles(acc, m_i, l_i, q, k_desc, v_desc, row0, head, full_hi, tile_hi,
                              qk_scale, q_pos, seq_len, BLOCK_N, HEAD, True)
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    tl.store(out_ptr + (q_start + row_tok).to(tl.int64)[:, None] * stride_ot
             + row_head[:, None] * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & valid)


@triton.jit
def exp_prefill_kernel(q_ptr, out_ptr, k_src, v_src, cu_seqlens_q_ptr, seq_lens_ptr, num_seqs,
                       num_kv_heads, total_tiles, total_rows, rows_per_seq, qk_scale,
                       stride_qt, stride_qh, stride_ot, stride_oh,
                       GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
                       BLOCK_N: tl.constexpr, HEAD: tl.constexpr, PERSISTENT: tl.constexpr,
                       HOST_DESC: tl.constexpr, FLATTEN: tl.constexpr,
                       WS: tl.constexpr = False):
    if HOST_DESC:
        k_desc = k_src
        v_desc = v_src
    else:
        k_desc = tl.make_tensor_descriptor(k_src, shape=[total_rows, num_kv_heads, HEAD],
                                           strides=[num_kv_heads * HEAD, HEAD, 1],
                                           block_shape=[BLOCK_N, 1, HEAD])
        v_desc = tl.make_tensor_descriptor(v_src, shape=[total_rows, num_kv_heads, HEAD],
                                           strides=[num_kv_heads * HEAD, HEAD, 1],
                                           block_shape=[BLOCK_N, 1, HEAD])
    total_items = total_tiles * num_kv_heads
    if PERSISTENT:
        for item in tl.range(tl.program_id(0), total_items, tl.num_programs(0),
                             flatten=FLATTEN):
            _one_item(item, q_ptr, out_ptr, k_desc, v_desc, cu_seqlens_q_ptr, seq_lens_ptr,
                      num_seqs, num_kv_heads, total_tiles, rows_per_seq, qk_scale, stride_qt,
                      stride_qh, stride_ot, stride_oh, GROUP, BLOCK_M, BLOCK_Q, BLOCK_N, HEAD,
                      WS)
    else:
        _one_item(tl.program_id(0), q_ptr, out_ptr, k_desc, v_desc, cu_seqlens_q_ptr,
                  seq_lens_ptr, num_seqs, num_kv_heads, total_tiles, rows_per_seq, qk_scale,
                  stride_qt, stride_qh, stride_ot, stride_oh, GROUP, BLOCK_M, BLOCK_Q,
                  BLOCK_N, HEAD, WS)


def _scratch(size, alignment, stream):
    return torch.empty(size, dtype=torch.uint8, device="cuda")


CASES = {
    "1x8192": ([8192], 128), "4x2048": ([2048] * 4, 128), "1x4096": ([4096], 128),
    "1x8192-h64": ([8192], 64), "4x2048-h64": ([2048] * 4, 64),
    "1x8192-h256": ([8192], 256), "4x2048-h256": ([2048] * 4, 256),
}
#: variant -> (persistent, host descriptors, flatten, programs per SM). Run 1 (session 7,
#: benchmarks/NOTES.md) timed all six; persistent and flattened lost or tied everywhere.
ALL_VARIANTS = {
    "np-device": (False, False, False, 0), "np-host": (False, True, False, 0),
    "p-host": (True, True, False, 1), "p-host-flat": (True, True, True, 1),
    "p-device": (True, False, False, 1), "p-host-x2": (True, True, False, 2),
    # run 4: Triton's warp specialization of the unmasked loop (no block table left in it)
    "np-host-ws": (False, True, False, 0), "np-host-ws-w4": (False, True, False, 0),
}
VARIANTS = {k: v for k, v in ALL_VARIANTS.items()
            if k in os.environ.get("EXP_VARIANTS", "np-host").split(",")}
#: the plan's staged prefill: how its long tiles read the staged keys
#: (``params["stage_kv_load"]``), and staged-host tiles (block_m, block_n, warps, stages)
#: beside the plan's, per head
STAGE_LOADS = tuple(os.environ.get("STAGE_LOADS", "descriptor,staged,staged_host").split(","))
#: (block_m, block_n, warps, stages, register cap or 0). Run 2 tried 128x128w4s4 and
#: w8s3 at head 64 and 128x128w8s2 at head 128: all lost. Run 3: two programs per SM
#: (shared memory for two at 2 stages; registers capped at 128 so both fit)
STAGED_TILE_TRIES = {64: [(128, 128, 8, 2, 128), (128, 64, 4, 2, 0)],
                     128: [(128, 64, 8, 2, 128), (128, 64, 8, 2, 0)], 256: []}
#: head -> (block_m, block_n, warps, stages): the plan's staged tiles (STAGED_TILES)
TILES = {64: (128, 128, 4, 3), 128: (128, 128, 8, 3), 256: (128, 64, 8, 2)}


def run_case(name, lens, head, graph, rows):
    hq, hk = 32, 8
    group = hq // hk
    num_seqs, max_len = len(lens), max(lens)
    rows_per_seq = triton.cdiv(max_len, 128) * 128
    dev = "cuda"
    q = torch.randn(sum(lens), hq, head, device=dev, dtype=torch.bfloat16)
    k = torch.randn(num_seqs * rows_per_seq, hk, head, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), device=dev, dtype=torch.int32)
    seq_lens = torch.tensor(lens, device=dev, dtype=torch.int32)
    scale = head ** -0.5
    ref = torch.empty_like(q)
    for b, n in enumerate(lens):
        kb = k[b * rows_per_seq:b * rows_per_seq + n].repeat_interleave(group, 1)
        vb = v[b * rows_per_seq:b * rows_per_seq + n].repeat_interleave(group, 1)
        qb = q[cu[b]:cu[b + 1]]
        ref[cu[b]:cu[b + 1]] = torch.nn.functional.scaled_dot_product_attention(
            qb.transpose(0, 1), kb.transpose(0, 1), vb.transpose(0, 1),
            is_causal=True).transpose(0, 1)
    block_m, block_n, warps, stages = TILES[head]
    block_q = block_m // group
    total_tiles = sum(lens) // block_q + num_seqs
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    case = Case(name, "prefill", lens, lens)
    flops = case_flops(case, hq, head)
    for vname, (persistent, host, flatten, per_sm) in VARIANTS.items():
        ws = "-ws" in vname
        nw = 4 if vname.endswith("-w4") else warps
        out = torch.full_like(q, float("nan"))
        if host:
            k_src = TensorDescriptor(k, list(k.shape), list(k.stride()), [block_n, 1, head])
            v_src = TensorDescriptor(v, list(v.shape), list(v.stride()), [block_n, 1, head])
        else:
            k_src, v_src = k, v
        grid = (sms * per_sm,) if persistent else (total_tiles * hk,)

        def fn(out=out, k_src=k_src, v_src=v_src, grid=grid, persistent=persistent,
               host=host, flatten=flatten, ws=ws, nw=nw):
            exp_prefill_kernel[grid](
                q, out, k_src, v_src, cu, seq_lens, num_seqs, hk, total_tiles, k.shape[0],
                rows_per_seq, scale * 1.4426950408889634, q.stride(0), q.stride(1),
                out.stride(0), out.stride(1), GROUP=group, BLOCK_M=block_m, BLOCK_Q=block_q,
                BLOCK_N=block_n, HEAD=head, PERSISTENT=persistent, HOST_DESC=host,
                FLATTEN=flatten, WS=ws, num_warps=nw, num_stages=stages)
        try:
            fn()
            torch.cuda.synchronize()
            err = (out.float() - ref.float()).abs().max().item()
            ms = graph(fn)
        except Exception as exc:
            rows.append({"case": name, "variant": vname,
                         "error": f"{type(exc).__name__}: {str(exc)[:400]}"})
            print(rows[-1], flush=True)
            continue
        rows.append({"case": name, "variant": vname, "us": ms * 1e3,
                     "tflops": flops / (ms * 1e-3) / 1e12, "max_err": err})
        print(f"{name:<14} {vname:<14} {ms * 1e3:8.1f} us {rows[-1]['tflops']:6.0f} TFLOP/s "
              f"err {err:.2e}", flush=True)
    # the plan's staged prefill over a block-16 cache (staging included), same run
    inp = build_inputs(case, num_q_heads=hq, num_kv_heads=hk, head_size=head, block_size=16,
                       dtype=torch.bfloat16, device=dev)
    options = normalize_options(inp.q, inp.cache)
    shape = Shape(hq, hk, head, 2, next_pow2(max_len), next_pow2(max_len), num_seqs, sms,
                  "sm90")
    base = dict(plan_launch(shape), stage=stage_config(shape),
                stage_long=staged_long_config(shape), _kv_load_forced=True)
    plans = {f"plan-{load}": dict(base, stage_kv_load=load) for load in STAGE_LOADS}
    for m, n, w, st, cap in (STAGED_TILE_TRIES[head] if os.environ.get("TILE_TRIES", "1") == "1"
                             else []):
        tile = dict(base["stage_long"], block_m=m, block_q=m // group, block_n=n,
                    num_warps=w, num_stages=st, **({"maxnreg": cap} if cap else {}))
        plans[f"plan-host-{m}x{n}w{w}s{st}r{cap}"] = dict(base, stage_kv_load="staged_host",
                                                         stage_long=tile)
    first = None
    for vname, params in plans.items():
        fn = (lambda p=params: launch_unified(inp.q, inp.cache, inp.metadata, options,
                                              inp.out, p))
        try:
            inp.out.fill_(float("nan"))
            fn()
            torch.cuda.synchronize()
            if first is None:  # every variant against the first (the 4-D descriptor loads)
                first = inp.out.float().clone()
            diff = (inp.out.float() - first).abs().max().item()
            ms = graph(fn)
        except Exception as exc:
            rows.append({"case": name, "variant": vname,
                         "error": f"{type(exc).__name__}: {str(exc)[:400]}"})
            print(rows[-1], flush=True)
            continue
        rows.append({"case": name, "variant": vname, "us": ms * 1e3,
                     "tflops": flops / (ms * 1e-3) / 1e12, "diff_vs_first": diff})
        print(f"{name:<14} {vname:<22} {ms * 1e3:8.1f} us {rows[-1]['tflops']:6.0f} TFLOP/s "
              f"diff {diff:.2e}", flush=True)


def main(argv):
    triton.set_allocator(_scratch)
    graph = GraphTimer()
    rows: list[dict] = []
    for name, (lens, head) in CASES.items():
        if argv and not any(a in name for a in argv):
            continue
        run_case(name, lens, head, graph, rows)
        torch.cuda.empty_cache()
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
