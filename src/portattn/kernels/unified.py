"""The unified paged-attention kernel: one ``@triton.jit`` body, 2D or split-KV 3D.

Layout
------
* ``q`` ``[num_tokens, num_q_heads, HEAD]`` and ``out`` (same shape) through strides
  (token, head, dim), so a slice of a fused QKV tensor works without a copy;
* ``key_cache`` / ``value_cache`` ``[num_blocks, BLOCK_SIZE, num_kv_heads, HEAD]`` through
  (block, slot, head) strides, last dim contiguous; key ``k`` of sequence ``b`` lives in
  block ``block_table[b, k // BLOCK_SIZE]``, slot ``k % BLOCK_SIZE``;
* split-KV partials (``SPLIT``): ``part_m`` / ``part_l``
  ``[num_seqs * BLOCK_Q, num_q_heads, num_segments]`` and ``part_acc`` (same, plus
  ``HEAD_PAD``), fp32, indexed by (sequence, query within the sequence); merged by
  :mod:`portattn.kernels.reduce`.

Tiles
-----
A query tile holds ``BLOCK_M`` rows = ``BLOCK_Q`` query tokens x ``GROUP`` query heads
that share one kv head (row ``r`` is token ``r // GROUP``, head ``r % GROUP``; rows past
``BLOCK_Q * GROUP`` are padding). So K/V are read once per kv head for the whole group
(decode with GQA) and a prefill tile still has enough rows for the tensor cores. A KV tile
holds ``BLOCK_N`` keys independent of the cache block size: the block id is looked up per
key row. The visible key range of a query tile is computed from causality and the window,
so fully masked tiles are never loaded; tiles visible to every row of the query tile run
without mask arithmetic, only the edge tiles are masked.

Grid ``(query tiles, num_kv_heads, num_segments)``; ``SEQ_MODE`` says how axis 0 maps to
query tiles:

* 0: global tiles over every sequence, found by binary search over ``cu_seqlens_q``
  (grid ``num_tokens // BLOCK_Q + num_seqs``); tiles run heaviest-first;
* 1: one tile per sequence (grid ``num_seqs``); sequences with more than ``BLOCK_Q``
  queries are left to a SEQ_MODE 2 launch (decode, spec-decode, the short part of a mixed
  batch);
* 2: like 0 but skips sequences with ``<= SHORT_Q`` queries (the long part of a mixed
  batch, whose short part a SEQ_MODE 1 launch serves).

Constexpr switches: ``CAUSAL``, ``USE_WINDOW``, ``USE_SOFTCAP``, ``ALIBI`` (0 none,
1 linear, 2 sqrt), ``USE_SINKS``; ``SPLIT`` (False: write the normalized output;
True: this program handles one of ``num_segments`` (a runtime value, so a new segment
count needs no compile) slices of the visible KV tiles and writes partials, SEQ_MODE 1
only); ``DOT_PREC`` ("ieee" for fp32 inputs, "tf32" is ignored for
16-bit ones). Room is left for a ``KV_LOAD`` switch (tensor descriptors) and cache
dequantization in :func:`_attend_tiles`, the only place that loads K/V.
"""

from __future__ import annotations

import triton
import triton.language as tl

from portattn.kernels.common import find_seq_of_tile, online_softmax_step, score_tile


@triton.jit
def _attend_tiles(acc, m_i, l_i, q, tile_start, tile_end, seq_len, k_lo, bt_row,
                  k_head_ptr, v_head_ptr, stride_kb, stride_ks, stride_vb, stride_vs,
                  qk_scale, softcap, slope2, q_pos, window, offs_d,
                  BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD: tl.constexpr,
                  HEAD_PAD: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                  USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                  DOT_PREC: tl.constexpr):
    """Stream KV tiles ``[tile_start, tile_end)`` through the online softmax.

    Masked tiles load only keys in ``[k_lo, seq_len)``: block-table entries and K/V before
    the query tile's window (which an engine may already have freed) are never read."""
    for j in tl.range(tile_start, tile_end):
        k_pos = j * BLOCK_N + tl.arange(0, BLOCK_N)
        if MASKED:
            key_ok = (k_pos >= k_lo) & (k_pos < seq_len)
            block = tl.load(bt_row + k_pos // BLOCK_SIZE, mask=key_ok, other=0)
        else:
            block = tl.load(bt_row + k_pos // BLOCK_SIZE)
        slot = k_pos % BLOCK_SIZE
        k_off = block.to(tl.int64) * stride_kb + slot * stride_ks
        v_off = block.to(tl.int64) * stride_vb + slot * stride_vs
        k_ptrs = k_head_ptr + k_off[None, :] + offs_d[:, None]      # [HEAD_PAD, BLOCK_N]
        v_ptrs = v_head_ptr + v_off[:, None] + offs_d[None, :]      # [BLOCK_N, HEAD_PAD]
        if MASKED:
            if HEAD_PAD != HEAD:
                d_ok = offs_d < HEAD
                k = tl.load(k_ptrs, mask=d_ok[:, None] & key_ok[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
            else:
                k = tl.load(k_ptrs, mask=key_ok[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
        else:
            if HEAD_PAD != HEAD:
                d_ok = offs_d < HEAD
                k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
            else:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
        qk = tl.dot(q, k, input_precision=DOT_PREC)
        s = score_tile(qk, qk_scale, softcap, slope2, q_pos, k_pos, seq_len, window,
                       MASKED, CAUSAL, USE_WINDOW, USE_SOFTCAP, ALIBI)
        p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i, MASKED)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, m_i, l_i


@triton.jit
def unified_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, block_table_ptr, cu_seqlens_q_ptr, seq_lens_ptr,
        alibi_ptr, sinks_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
        num_seqs, num_q_heads, num_segments, scale, softcap, window,
        stride_qt, stride_qh, stride_qd, stride_ot, stride_oh, stride_od,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD: tl.constexpr,
        HEAD_PAD: tl.constexpr, SEQ_MODE: tl.constexpr, SHORT_Q: tl.constexpr,
        SPLIT: tl.constexpr, CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr,
        USE_SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, USE_SINKS: tl.constexpr,
        DOT_PREC: tl.constexpr):
    """Paged attention of one query tile x one kv head x one KV segment (see module doc)."""
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)
    if SEQ_MODE == 1:
        seq = tl.program_id(0)
        q_start = tl.load(cu_seqlens_q_ptr + seq)
        q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
        if q_len > BLOCK_Q:
            return
        tile_local = 0
    else:
        tile_idx = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest tiles first
        seq = find_seq_of_tile(cu_seqlens_q_ptr, num_seqs, tile_idx, BLOCK_Q)
        q_start = tl.load(cu_seqlens_q_ptr + seq)
        q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
        tile_local = tile_idx - (q_start // BLOCK_Q + seq)
        if SEQ_MODE == 2:
            if q_len <= SHORT_Q:
                return
    t0 = tile_local * BLOCK_Q
    if t0 >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_PAD)
    row_tok = t0 + rows // GROUP                      # query index within the sequence
    row_head = kv_head * GROUP + rows % GROUP         # query head
    row_ok = (rows < BLOCK_Q * GROUP) & (row_tok < q_len)
    q_pos = context + row_tok
    d_ok = offs_d < HEAD

    q_ptrs = (q_ptr + (q_start + row_tok).to(tl.int64)[:, None] * stride_qt
              + row_head[:, None] * stride_qh + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    if USE_SOFTCAP:
        qk_scale = scale
    else:
        qk_scale = scale * 1.4426950408889634
    if ALIBI != 0:
        slope2 = tl.load(alibi_ptr + row_head, mask=row_ok, other=0.0).to(tl.float32) \
            * 1.4426950408889634
    else:
        slope2 = tl.zeros([BLOCK_M], dtype=tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if USE_SINKS:
        if not SPLIT:  # split-KV adds the sink in the merge instead
            m_i = tl.load(sinks_ptr + row_head, mask=row_ok, other=0.0).to(tl.float32) \
                * 1.4426950408889634
            l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)

    # Visible keys: [k_lo, k_hi) for some row, [k_lo_all, k_hi_all) for every row.
    t_last = tl.minimum(t0 + BLOCK_Q, q_len) - 1
    if CAUSAL:
        k_hi = tl.minimum(seq_len, context + t_last + 1)
        k_hi_all = context + t0 + 1
    else:
        k_hi = seq_len
        k_hi_all = seq_len
    if USE_WINDOW:
        k_lo = tl.maximum(context + t0 - window + 1, 0)
        k_lo_all = tl.maximum(context + t_last - window + 1, 0)
    else:
        k_lo = 0
        k_lo_all = 0
    tile_lo = k_lo // BLOCK_N
    tile_hi = tl.cdiv(k_hi, BLOCK_N)
    full_lo = tl.minimum(tl.maximum(tl.cdiv(k_lo_all, BLOCK_N), tile_lo), tile_hi)
    full_hi = tl.minimum(tl.maximum(k_hi_all // BLOCK_N, full_lo), tile_hi)
    if SPLIT:
        per_segment = tl.cdiv(tile_hi - tile_lo, num_segments)
        seg_lo = tl.minimum(tile_lo + segment * per_segment, tile_hi)
        seg_hi = tl.minimum(seg_lo + per_segment, tile_hi)
    else:
        seg_lo = tile_lo
        seg_hi = tile_hi

    bt_row = block_table_ptr + seq.to(tl.int64) * stride_bt
    k_head_ptr = k_ptr + kv_head * stride_kh
    v_head_ptr = v_ptr + kv_head * stride_vh
    if USE_WINDOW:  # leading tiles only partly inside the window
        acc, m_i, l_i = _attend_tiles(
            acc, m_i, l_i, q, tl.maximum(tile_lo, seg_lo), tl.minimum(full_lo, seg_hi),
            seq_len, k_lo, bt_row, k_head_ptr, v_head_ptr, stride_kb, stride_ks, stride_vb,
            stride_vs, qk_scale, softcap, slope2, q_pos, window, offs_d, BLOCK_N,
            BLOCK_SIZE, HEAD, HEAD_PAD, True, CAUSAL, USE_WINDOW, USE_SOFTCAP, ALIBI,
            DOT_PREC)
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, tl.maximum(full_lo, seg_lo), tl.minimum(full_hi, seg_hi),
        seq_len, k_lo, bt_row, k_head_ptr, v_head_ptr, stride_kb, stride_ks, stride_vb, stride_vs,
        qk_scale, softcap, slope2, q_pos, window, offs_d, BLOCK_N, BLOCK_SIZE, HEAD,
        HEAD_PAD, False, CAUSAL, USE_WINDOW, USE_SOFTCAP, ALIBI, DOT_PREC)
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, tl.maximum(full_hi, seg_lo), tl.minimum(tile_hi, seg_hi),
        seq_len, k_lo, bt_row, k_head_ptr, v_head_ptr, stride_kb, stride_ks, stride_vb, stride_vs,
        qk_scale, softcap, slope2, q_pos, window, offs_d, BLOCK_N, BLOCK_SIZE, HEAD,
        HEAD_PAD, True, CAUSAL, USE_WINDOW, USE_SOFTCAP, ALIBI, DOT_PREC)

    if not SPLIT:
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        result = acc / l_safe[:, None]
        o_ptrs = (out_ptr + (q_start + row_tok).to(tl.int64)[:, None] * stride_ot
                  + row_head[:, None] * stride_oh + offs_d[None, :] * stride_od)
        tl.store(o_ptrs, result.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])
    else:
        part_row = ((seq * BLOCK_Q + row_tok).to(tl.int64) * num_q_heads + row_head) \
            * num_segments + segment
        tl.store(part_m_ptr + part_row, m_i, mask=row_ok)
        tl.store(part_l_ptr + part_row, l_i, mask=row_ok)
        tl.store(part_acc_ptr + part_row[:, None] * HEAD_PAD + offs_d[None, :], acc,
                 mask=row_ok[:, None])
