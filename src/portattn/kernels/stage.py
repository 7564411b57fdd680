"""The staging kernel: a prefill's K/V pages gathered into large dense blocks.

Why: prefill is bound by the tensor cores, and on Hopper the unified kernel feeds them best
with descriptor (TMA) loads of 128-key boxes, which need a tile inside one cache block
(:mod:`portattn.kernels.kv_load`). A cache of 16-slot blocks cannot give that, and an 8-bit
cache makes the loop convert every K/V element before the tensor cores can use it. Copying
the keys a prefill reads into a workspace of ``STAGE_BLOCK``-slot blocks (and, for 8-bit
caches, widening the codes to q's 16-bit dtype: exact for e4m3fn, e5m2 and int8) costs one
pass over those keys, a few percent of the attention's time for long prefills, and lets the
attention launch run the 16-bit descriptor loop. A sequence's staged blocks are contiguous
and in key order, so the attention reads its key ``k`` as row ``block_table[b, 0] *
STAGE_BLOCK + k`` (its first staged block) of a 3-D descriptor built on the host
(``KV_LOAD`` 3 of the unified kernel): no block-table lookup in the loop, no descriptor
built per program.
Per-tensor scales are not applied here: codes are copied as values (exact) and the
scales stay folded into the softmax scale and the output. Per-token-head caches either
get the same treatment (``STAGE_SCALES``: the scale caches are copied beside the codes;
the fp16 path, where a dequantized value could fall into fp16's subnormals) or are staged
dequantized (``code * scale`` rounded once to bf16, as a bf16 cache would hold it), so
the loop has no per-key scales at all: 2.3x faster on the H200 (benchmarks/NOTES.md).

Layout
------
* in: the cache ``[num_blocks, BLOCK_SIZE, num_kv_heads, HEAD]`` through (block, slot,
  head) strides, per-token-head scale caches ``[num_blocks, BLOCK_SIZE, num_kv_heads]``
  through strides, ``block_table`` ``[num_seqs, bt_width]``;
* out (contiguous): ``staged_k`` ``[max_slots * num_sblocks, STAGE_BLOCK, num_kv_heads,
  HEAD_QK]``, ``staged_v`` (``HEAD_V``), scales ``[max_slots * num_sblocks, STAGE_BLOCK,
  num_kv_heads]`` fp32, and the staged block table ``[num_seqs, num_sblocks]`` int32.

Only sequences with at least ``STAGE_FROM`` queries are staged (the others read the cache
in launches of their own: the short part of a mixed batch, short prompts beside a long
one), so the workspace holds ``max_slots`` sequences, not ``num_seqs``. Slot ``s`` holds
the ``s``-th such sequence in batch order (found by a pass over ``cu_seqlens_q`` in each
program; no host sync); its staged block ``i`` is ``s * num_sblocks + i``, written into
its table row. Query spans are ``cu_seqlens_q``'s clamped into q's ``num_tokens`` rows, as
the attention kernels clamp them. A sequence that has the queries but no slot (a
``cu_seqlens_q`` whose spans overlap) gets -1 in its row: the attention makes its rows NaN
rather than read another sequence's keys. Rows of sequences that are not staged are not
written.

Grid ``(max_slots * num_kv_heads, num_sblocks)``, program ``(p, i)`` copying staged block
``i`` of kv head ``p % num_kv_heads`` of slot ``p // num_kv_heads`` (slots past the staged
sequences exit at once): the kv heads of a block are neighbours in launch order, so
programs running together read and write whole cache rows.
Keys a query of the sequence can see (``[k_lo, seq_len)``, ``k_lo`` the first query's
window start) are copied; other slots of a staged block that holds visible keys are
written zero; blocks past the sequence are not written (the attention never reads them). A
block-table entry outside ``[0, num_blocks)`` or past the table's width stages its keys as
NaN K and zero V, so exactly the rows that see them come out NaN, as on the cache.

Switches: ``PER_TOKEN`` (per-token-head scale caches), ``STAGE_SCALES`` (copy them; else
multiply them in), ``USE_WINDOW``, ``STAGE_FROM``, ``WIDEN`` (the cache's dtype is not the
output's: values pass through fp32, as the interpreter cannot convert int -> bf16; else a
16-bit cache of the output's dtype is copied as int16 bit patterns, half the registers of
fp32, bad keys' K set to ``NAN_BITS``, that dtype's NaN); the output dtype is
``staged_k``'s.
"""

from __future__ import annotations

import triton
import triton.language as tl

from portattn.kernels.common import clamp_span, query_span


@triton.jit
def _stage_rows(src_ptr, dst_ptr, block, slot, head, live, bad, stride_b, stride_s,
                stride_h, dst_row, dst_stride_row, bad_value, scale,
                HEAD: tl.constexpr, HEAD_PAD: tl.constexpr, DEQUANT: tl.constexpr,
                WIDEN: tl.constexpr, BAD_BITS: tl.constexpr):
    """One kv head's rows of one staged block, bad keys set: widened through fp32 if
    ``WIDEN`` (times ``scale`` ``[STAGE_BLOCK]`` if ``DEQUANT``, ``bad_value`` for bad
    keys), else copied as 16-bit patterns (``BAD_BITS`` for bad keys)."""
    offs = tl.arange(0, HEAD_PAD)
    src = (src_ptr + block[:, None] * stride_b + slot[:, None] * stride_s + head * stride_h
           + offs[None, :])
    dst = dst_ptr + dst_row[:, None] * dst_stride_row + offs[None, :]
    mask = live[:, None] & (offs < HEAD)[None, :]
    if WIDEN:
        x = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        if DEQUANT:
            x = x * scale[:, None]
        x = tl.where(bad[:, None], bad_value, x)
        tl.store(dst, x.to(dst_ptr.dtype.element_ty), mask=(offs < HEAD)[None, :])
    else:
        bits = tl.load(src.to(tl.pointer_type(tl.int16)), mask=mask, other=0)
        bits = tl.where(bad[:, None], BAD_BITS, bits)
        tl.store(dst.to(tl.pointer_type(tl.int16)), bits, mask=(offs < HEAD)[None, :])


@triton.jit
def _staged_flags(cu_seqlens_q_ptr, num_seqs, num_tokens, c, STAGE_FROM: tl.constexpr,
                  CHUNK: tl.constexpr):
    """Sequences ``c + [0, CHUNK)`` and, as int32 0 / 1, whether each has at least
    ``STAGE_FROM`` queries (0 past the batch; spans clamped into q's ``num_tokens`` rows
    as the attention kernels clamp them, :func:`~portattn.kernels.common.clamp_span`)."""
    idx = c + tl.arange(0, CHUNK)
    ok = idx < num_seqs
    _, q_len = clamp_span(tl.load(cu_seqlens_q_ptr + idx, mask=ok, other=0),
                          tl.load(cu_seqlens_q_ptr + idx + 1, mask=ok, other=0), num_tokens)
    return idx, (ok & (q_len >= STAGE_FROM)).to(tl.int32)


@triton.jit
def _staged_seq(cu_seqlens_q_ptr, num_seqs, num_tokens, slot, STAGE_FROM: tl.constexpr,
                CHUNK: tl.constexpr = 256):
    """The sequence staged into ``slot``: the ``slot``-th (from 0, in batch order) with at
    least ``STAGE_FROM`` queries; -1 if there are not that many."""
    seen = tl.full([], 0, tl.int32)
    found = tl.full([], -1, tl.int32)
    for c in tl.range(0, num_seqs, CHUNK):
        idx, staged = _staged_flags(cu_seqlens_q_ptr, num_seqs, num_tokens, c, STAGE_FROM,
                                    CHUNK)
        rank = seen + tl.cumsum(staged, 0)  # staged sequences up to idx, idx included
        found = tl.maximum(found, tl.max(tl.where((staged > 0) & (rank == slot + 1), idx, -1),
                                         0))
        seen += tl.sum(staged, 0)
    return found


@triton.jit
def _mark_slotless(cu_seqlens_q_ptr, staged_bt_ptr, num_seqs, num_tokens, num_sblocks,
                   max_slots, STAGE_FROM: tl.constexpr, CHUNK: tl.constexpr = 256):
    """-1 in every table entry of a sequence that has ``STAGE_FROM`` queries or more but
    no slot (``max_slots`` staged before it: ``cu_seqlens_q``'s spans overlap); the
    attention makes its rows NaN. Nothing is written otherwise."""
    seen = tl.full([], 0, tl.int32)
    for c in tl.range(0, num_seqs, CHUNK):
        idx, staged = _staged_flags(cu_seqlens_q_ptr, num_seqs, num_tokens, c, STAGE_FROM,
                                    CHUNK)
        slotless = (staged > 0) & (seen + tl.cumsum(staged, 0) > max_slots)
        if tl.max(slotless.to(tl.int32), 0) > 0:
            row = staged_bt_ptr + idx.to(tl.int64) * num_sblocks
            for i in tl.range(0, num_sblocks):
                tl.store(row + i, tl.full([CHUNK], -1, tl.int32), mask=slotless)
        seen += tl.sum(staged, 0)


@triton.jit(do_not_specialize=["num_tokens"])
def stage_kv_kernel(k_ptr, v_ptr, ks_ptr, vs_ptr, staged_k_ptr, staged_v_ptr, staged_ks_ptr,
                    staged_vs_ptr, staged_bt_ptr, block_table_ptr, cu_seqlens_q_ptr,
                    seq_lens_ptr, num_seqs, num_tokens, num_blocks, bt_width, num_sblocks,
                    max_slots, num_heads, window,
                    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                    stride_bt, stride_ksb, stride_kss, stride_ksh, stride_vsb, stride_vss,
                    stride_vsh,
                    BLOCK_SIZE: tl.constexpr, STAGE_BLOCK: tl.constexpr,
                    HEAD_QK: tl.constexpr, HEAD_QK_PAD: tl.constexpr, HEAD_V: tl.constexpr,
                    HEAD_V_PAD: tl.constexpr, PER_TOKEN: tl.constexpr,
                    STAGE_SCALES: tl.constexpr, USE_WINDOW: tl.constexpr,
                    STAGE_FROM: tl.constexpr, WIDEN: tl.constexpr = True,
                    NAN_BITS: tl.constexpr = 0):
    """Stage one block of one kv head (see the module doc for layout and grid)."""
    head = tl.program_id(0) % num_heads
    slot = tl.program_id(0) // num_heads
    sblock = tl.program_id(1)
    if (slot == 0) & (sblock == 0) & (head == 0):
        _mark_slotless(cu_seqlens_q_ptr, staged_bt_ptr, num_seqs, num_tokens, num_sblocks,
                       max_slots, STAGE_FROM)
    seq = _staged_seq(cu_seqlens_q_ptr, num_seqs, num_tokens, slot, STAGE_FROM)
    if seq < 0:
        return
    staged_id = slot * num_sblocks + sblock
    if head == 0:
        tl.store(staged_bt_ptr + seq.to(tl.int64) * num_sblocks + sblock, staged_id)
    _, q_len = query_span(cu_seqlens_q_ptr, seq, num_tokens)
    seq_len = tl.load(seq_lens_ptr + seq)
    key0 = sblock * STAGE_BLOCK
    if key0 >= seq_len:
        return
    if USE_WINDOW:  # keys before the first query's window are never read
        k_lo = tl.maximum(seq_len - q_len - window + 1, 0)
    else:
        k_lo = 0
    if key0 + STAGE_BLOCK <= k_lo:
        return
    keys = key0 + tl.arange(0, STAGE_BLOCK)
    live = (keys >= k_lo) & (keys < seq_len)
    bt_idx = keys // BLOCK_SIZE
    in_table = bt_idx < bt_width
    bt_row = block_table_ptr + seq.to(tl.int64) * stride_bt
    block = tl.load(bt_row + bt_idx, mask=live & in_table, other=0)
    bad = live & ((~in_table) | (block < 0) | (block >= num_blocks))
    block = tl.where(bad, 0, block).to(tl.int64)
    cache_slot = keys % BLOCK_SIZE
    dst_row = (staged_id.to(tl.int64) * STAGE_BLOCK + tl.arange(0, STAGE_BLOCK)) * num_heads \
        + head
    if PER_TOKEN:
        ks = tl.load(ks_ptr + block * stride_ksb + cache_slot * stride_kss + head * stride_ksh,
                     mask=live, other=0.0)
        vs = tl.load(vs_ptr + block * stride_vsb + cache_slot * stride_vss + head * stride_vsh,
                     mask=live, other=0.0)
    else:
        ks = tl.full([STAGE_BLOCK], 1.0, tl.float32)
        vs = ks
    DEQUANT: tl.constexpr = PER_TOKEN and not STAGE_SCALES
    AS_VALUES: tl.constexpr = WIDEN or DEQUANT  # else copied as 16-bit patterns
    _stage_rows(k_ptr, staged_k_ptr, block, cache_slot, head, live, bad, stride_kb, stride_ks,
                stride_kh, dst_row, HEAD_QK, float("nan"), ks, HEAD_QK, HEAD_QK_PAD,
                DEQUANT, AS_VALUES, NAN_BITS)
    _stage_rows(v_ptr, staged_v_ptr, block, cache_slot, head, live, bad, stride_vb, stride_vs,
                stride_vh, dst_row, HEAD_V, 0.0, vs, HEAD_V, HEAD_V_PAD, DEQUANT,
                AS_VALUES, 0)
    if STAGE_SCALES:
        tl.store(staged_ks_ptr + dst_row, tl.where(bad, 1.0, ks))
        tl.store(staged_vs_ptr + dst_row, tl.where(bad, 1.0, vs))
