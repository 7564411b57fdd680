"""Merge of split-KV partials into the final output.

Layout: ``part_m`` / ``part_l`` ``[num_seqs * BLOCK_Q, num_q_heads, NUM_SEGMENTS]`` and
``part_acc`` ``[..., NUM_SEGMENTS, HEAD_V_PAD]`` (fp32, base-2 running max, running sum,
unnormalized output per segment, per-tensor V scale already applied), written by
``unified_attention_kernel`` with ``SEQ_MODE=1``. Grid ``(num_seqs, num_q_heads,
BLOCK_Q)``: one program per (sequence, query head, query of the sequence); sequences with
more than ``BLOCK_Q`` queries belong to another launch (or were written NaN) and are
skipped, like queries past the sequence's length.

``out = sum_s acc_s * 2^(m_s - M) / (sum_s l_s * 2^(m_s - M) [+ 2^(sink - M)])`` with
``M = max(m_s [, sink])``; ``USE_SINKS`` adds the sink logit to the denominator here
(segments never see it). A row with no visible key (every ``l_s = 0``, no sink) gives 0.
``FP8_OUT`` stores ``clamp(out / output_scale, +-FP8_MAX)``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from portattn.kernels.common import query_span, sink_logit2


@triton.jit(do_not_specialize=["num_tokens"])
def merge_segments_kernel(part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr, cu_seqlens_q_ptr,
                          sinks_ptr, out_scale_ptr, num_tokens, num_q_heads, stride_ot,
                          stride_oh, stride_od, BLOCK_Q: tl.constexpr, NUM_SEGMENTS: tl.constexpr,
                          HEAD_V: tl.constexpr, HEAD_V_PAD: tl.constexpr,
                          USE_SINKS: tl.constexpr, FP8_OUT: tl.constexpr,
                          FP8_MAX: tl.constexpr):
    """Merge the NUM_SEGMENTS partials of one (sequence, query head, query); the
    sequence's queries are ``cu_seqlens_q``'s clamped into ``out``'s ``num_tokens`` rows,
    as in the unified kernel that wrote the partials (:func:`query_span`)."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    t = tl.program_id(2)
    q_start, q_len = query_span(cu_seqlens_q_ptr, seq, num_tokens)
    if q_len > BLOCK_Q:
        return
    if t >= q_len:
        return
    base = ((seq * BLOCK_Q + t).to(tl.int64) * num_q_heads + head) * NUM_SEGMENTS
    segs = tl.arange(0, NUM_SEGMENTS)
    offs_d = tl.arange(0, HEAD_V_PAD)
    m = tl.load(part_m_ptr + base + segs)
    l_seg = tl.load(part_l_ptr + base + segs)
    acc = tl.load(part_acc_ptr + (base + segs)[:, None] * HEAD_V_PAD + offs_d[None, :])
    sink = 0.0
    if USE_SINKS:
        sink = tl.load(sinks_ptr + head).to(tl.float32)
    result = combine_segments(m, l_seg, acc, sink, USE_SINKS, 0)
    if FP8_OUT:
        result = result * (1.0 / tl.load(out_scale_ptr))
        result = tl.minimum(tl.maximum(result, -FP8_MAX), FP8_MAX)
    o_ptrs = out_ptr + (q_start + t).to(tl.int64) * stride_ot + head * stride_oh \
        + offs_d * stride_od
    tl.store(o_ptrs, result.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_V)


@triton.jit
def combine_segments(m, l_seg, acc, sink, USE_SINKS: tl.constexpr, AXIS: tl.constexpr):
    """The merge's arithmetic over the segment axis ``AXIS`` (0: one row, 1: rows):
    ``m`` / ``l_seg`` ``[S]`` or ``[R, S]`` (base-2 running max and sum per segment;
    padding segments ``-inf`` / 0), ``acc`` ``[S, D]`` or ``[R, S, D]``, ``sink`` a
    scalar or ``[R]`` (natural-log sink logits, read only with ``USE_SINKS``) -> ``[D]``
    or ``[R, D]`` fp32 outputs (0 for a row with no visible key and no sink). Shared by
    :func:`merge_segments_kernel` and the unified kernel's in-kernel merge."""
    m_all = tl.max(m, AXIS)
    if USE_SINKS:
        sink2 = sink_logit2(sink)
        m_all = tl.maximum(m_all, sink2)
    m_use = tl.where(m_all == float("-inf"), 0.0, m_all)
    w = tl.exp2(m - tl.expand_dims(m_use, AXIS))
    denom = tl.sum(l_seg * w, AXIS)
    if USE_SINKS:
        denom += tl.exp2(sink2 - m_use)
    result = tl.sum(acc * tl.expand_dims(w, AXIS + 1), AXIS)
    # 0 only for a row with no visible key and no sink; a NaN (a NaN sink) stays NaN
    return result / tl.expand_dims(tl.where(denom == 0.0, 1.0, denom), AXIS)
