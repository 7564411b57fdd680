"""Shared ``@triton.jit`` helpers of the attention kernels.

Everything works in the base-2 log domain: a score is ``log2(e) * s`` (log2(e) written
as the literal 1.4426950408889634: jit code reads no plain module globals) so the softmax
uses ``exp2``. Kernels call these helpers; Triton inlines them, and ``tl.constexpr`` switches
disappear at compile time, so an unused feature costs nothing.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def find_seq_of_tile(cu_seqlens_q_ptr, num_seqs, tile_idx, BLOCK_Q: tl.constexpr):
    """The sequence holding global query tile ``tile_idx``.

    Sequence ``b`` owns the tiles starting at ``cu_seqlens_q[b] // BLOCK_Q + b``: an upper
    bound of the tiles before it that is monotone in ``b`` and computable from ``b`` alone,
    so a binary search over ``cu_seqlens_q`` finds the owner without any host-side index.
    Returns the largest ``b`` with ``start(b) <= tile_idx``, or 0 where there is none
    (only a ``cu_seqlens_q`` that does not start at 0: the tile then lies before sequence
    0's first, and its caller skips it).
    """
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(cu_seqlens_q_ptr + mid) // BLOCK_Q + mid
        if start <= tile_idx:
            lo = mid + 1
        else:
            hi = mid
    return tl.maximum(lo - 1, 0)


@triton.jit
def query_span(cu_seqlens_q_ptr, seq, num_tokens):
    """``(q_start, q_len)``: sequence ``seq``'s queries as ``cu_seqlens_q`` places them,
    clamped into q's ``num_tokens`` rows (:func:`clamp_span`)."""
    return clamp_span(tl.load(cu_seqlens_q_ptr + seq), tl.load(cu_seqlens_q_ptr + seq + 1),
                      num_tokens)


@triton.jit
def clamp_span(lo, hi, num_tokens):
    """``(q_start, q_len)`` of the queries ``[lo, hi)`` (``cu_seqlens_q[b]`` and
    ``[b + 1]``; scalars or vectors) clamped into q's ``num_tokens`` rows. Valid metadata
    passes unchanged; a span that runs past ``num_tokens`` is cut there, one that starts
    before 0 starts at 0, and one that starts past the end or decreases is empty. Every
    kernel that reads ``cu_seqlens_q`` takes its spans from here, so none reads q or
    writes out outside their rows whatever an unchecked (GPU, ``validate`` off)
    ``cu_seqlens_q`` says, and all of them agree on the spans."""
    q_start = tl.minimum(tl.maximum(lo, 0), num_tokens)
    q_end = tl.minimum(tl.maximum(hi, q_start), num_tokens)
    return q_start, q_end - q_start


@triton.jit
def apply_softcap(s, softcap, SERIES: tl.constexpr):
    """``softcap * tanh(s / softcap)``, tanh as ``1 - 2 / (exp(2x) + 1)`` (saturates
    cleanly to +-1 for large |x|). Its subtraction cancels for small |x|: an absolute
    error of about 1e-7 in tanh, ``softcap * 1e-7`` in the score (a softcap of 1e6, meant
    as "almost off", moved scores by 0.1: session 40's audit). ``SERIES`` (the launchers
    set it for softcaps above ``heuristics.EXACT_TANH_SOFTCAP``) takes tanh below |x| =
    1/8 from its odd Taylor series to x^7 (relative error about 1e-9) instead: every
    score then within about 1e-6 of itself (fp32 rounding below |x| = 1/8, the exp form's
    error above), whatever the softcap; it slows a softcapped prefill 24-62% on an H100
    (NOTES.md, session 40)."""
    x = s / softcap
    t = 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)
    if SERIES:
        t = small_argument_tanh(x, t)
    return softcap * t


@triton.jit
def sink_logit2(sink):
    """A sink logit (natural units, fp32) in base 2, clamped first to 2.35e38 (where the
    conversion would overflow fp32): a sink of +inf, or past 2.35e38, then dominates every
    finite score as it should (the row's output 0) instead of making the softmax's
    ``inf - inf`` a NaN. A NaN sink stays NaN (``NaN > x`` is false)."""
    return tl.where(sink > 2.35e38, 2.35e38, sink) * 1.4426950408889634


@triton.jit
def small_argument_tanh(x, t):
    """``t`` (tanh of ``x`` by a formula that cancels near 0) with the entries below |x| =
    1/8 replaced by tanh's odd Taylor series to x^7 (relative error about 1e-9 there).
    Shared by :func:`apply_softcap` and the Gluon prefill's ``_tanh`` (a Gluon kernel
    calls ``triton.jit`` helpers; the arithmetic keeps its operands' layout)."""
    x2 = x * x
    series = x + x * x2 * (-0.3333333333333333 + x2 * (0.13333333333333333
                                                       - x2 * 0.05396825396825397))
    return tl.where(tl.abs(x) < 0.125, series, t)


@triton.jit
def score_tile(qk, qk_scale, softcap, slope2, q_pos, k_pos, seq_len, window,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr,
               USE_SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """Raw ``q.k`` products ``[M, N]`` -> base-2 logits with every score modifier.

    Order as DESIGN.md: scale, softcap, mask, bias. ``qk_scale`` is ``scale * log2(e)``
    without softcap and ``scale`` with it (softcap works on natural-unit scores;
    ``USE_SOFTCAP`` 0 none, 1 softcap, 2 softcap with the exact small-argument tanh).
    ``slope2`` ``[M]`` is the ALiBi slope times log2(e) (ALIBI 1: linear ``slope * (k -
    p)``, 2: ``-slope * sqrt(p - k)``). ``MASKED`` adds the key bound, causal and window
    masks (tiles fully inside every row's visible range skip it).
    """
    if USE_SOFTCAP:
        s = apply_softcap(qk * qk_scale, softcap, USE_SOFTCAP == 2) * 1.4426950408889634
    else:
        s = qk * qk_scale
    if ALIBI == 1:
        s += slope2[:, None] * (k_pos[None, :] - q_pos[:, None]).to(tl.float32)
    elif ALIBI == 2:
        dist = tl.maximum(q_pos[:, None] - k_pos[None, :], 0).to(tl.float32)
        s -= slope2[:, None] * tl.sqrt(dist)
    if MASKED:
        s = mask_scores(s, q_pos, k_pos, seq_len, window, CAUSAL, USE_WINDOW)
    return s


@triton.jit
def mask_scores(s, q_pos, k_pos, seq_len, window, CAUSAL: tl.constexpr,
                USE_WINDOW: tl.constexpr):
    """``s`` ``[M, N]`` with -inf where key ``k_pos`` is past ``seq_len``, after query
    ``q_pos`` (causal) or outside its window: the last step of :func:`score_tile`."""
    visible = (k_pos < seq_len)[None, :]
    if CAUSAL:
        visible = visible & (k_pos[None, :] <= q_pos[:, None])
    if USE_WINDOW:
        visible = visible & ((q_pos[:, None] - k_pos[None, :]) < window)
    return tl.where(visible, s, float("-inf"))


@triton.jit
def online_softmax_step(s, m_i, l_i, MASKED: tl.constexpr):
    """One step of the streaming softmax on base-2 logits ``s`` ``[M, N]``.

    Returns ``(p, alpha, m_new, l_new)``: the tile's unnormalized probabilities, the factor
    rescaling the running accumulator, the new running max and sum. A row whose keys are
    all masked so far keeps max -inf; it is shifted by 0 instead so no ``-inf - -inf`` NaN
    appears (only masked tiles can produce such rows).
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_new = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_new
