"""``torch_ref``: the PyTorch reference backend, the oracle of every test.

It follows DESIGN.md's semantics literally, one sequence at a time, with the math batched
over that sequence's queries, heads and keys:

1. gather the sequence's keys/values through the block table and dequantize them to fp32;
2. ``s = scale * q.k`` (fp32), softcap ``c * tanh(s / c)``, then the causal / window mask,
   then the ALiBi bias (``slope * (k - p)`` or ``-slope * sqrt(p - k)``);
3. softmax whose denominator also holds ``exp(sink)`` when sinks are given;
4. rows with no visible key give zeros; fp8 output is ``clamp(result / output_scale)``.

Query ``i`` of a sequence with ``q_len`` queries and ``seq_len`` keys sits at absolute
position ``p = seq_len - q_len + i``. Queries are processed in chunks so the score matrix
of one chunk stays under ~64 M elements, which keeps long prefills within memory.
"""

from __future__ import annotations

import torch

from portattn.backends.base import Backend, Plan
from portattn.quant import dequantize
from portattn.types import DATALESS_DEVICE_TYPES, fp8_max, scale_as_tensor, take_blocks

_MAX_SCORE_ELEMENTS = 1 << 26


class TorchReference(Backend):
    name = "torch_ref"
    summary = "pure PyTorch reference; runs anywhere, every feature, slow"
    slow_path = "the PyTorch reference, one sequence at a time"

    def why_not(self, problem, caps) -> list[str]:
        if problem.device_type in DATALESS_DEVICE_TYPES:
            return [f"tensors on the {problem.device_type} device hold no values to compute "
                    "with"]
        return []

    def plan(self, problem, caps) -> Plan:
        return Plan(self.name, "per-sequence dense")

    def run(self, q, cache, metadata, options, out, plan) -> None:
        with torch.no_grad():  # sinks or slopes may be trained parameters: no graph either
            out.copy_(reference_attention(q, cache, metadata, options))


def gather_sequence_kv(cache, block_row: torch.Tensor, seq_len: int,
                       compute_dtype: torch.dtype = torch.float32):
    """Dequantized ``K [seq_len, Hkv, Dqk]`` and ``V [seq_len, Hkv, Dv]`` of one sequence,
    and which of those keys sit in a block whose id is outside ``[0, num_blocks)`` (a
    bool ``[seq_len]``; such a block is never read: its keys are gathered from block 0)."""
    bs = cache.block_size
    blocks = block_row[: (seq_len + bs - 1) // bs].long()
    bad_blocks = (blocks < 0) | (blocks >= cache.num_blocks)
    blocks = blocks.masked_fill(bad_blocks, 0)
    bad_keys = bad_blocks.repeat_interleave(bs)[:seq_len]
    parts = []
    for which, data, scales in (("k", cache.key_cache, cache.k_scale_cache),
                                ("v", cache.value_cache, cache.v_scale_cache)):
        stored = take_blocks(data, blocks).reshape(-1, *data.shape[2:])[:seq_len]
        token_scales = None
        if scales is not None:
            token_scales = scales[blocks].reshape(-1, scales.shape[2])[:seq_len]
        values = dequantize(stored, cache.quant, which, token_scales).to(compute_dtype)
        # block 0's keys stand in for a bad block's: zeros, so that they add nothing (not
        # even a NaN times a zero weight) to the rows that do not see them
        parts.append(values.masked_fill(bad_keys[:, None, None], 0))
    return parts[0], parts[1], bad_keys


def _with_visible_nonfinite(o, p, visible, v):
    """``o`` (the weights ``p`` times V's finite values, ``[Hkv, G, Lq, Dv]``) with what
    the non-finite values of V (``[Hkv, L, Dv]``) at each row's visible keys give in IEEE
    arithmetic: NaN for a NaN, or for an infinity at a zero weight or of both signs; an
    infinity of its sign at a positive weight. Keys a row cannot see add nothing."""
    seen = visible.to(p.dtype)  # [Lq, L]
    weighted = (visible & (p > 0)).to(p.dtype)  # [Hkv, G, Lq, L]
    unweighted = (visible & (p == 0)).to(p.dtype)

    def meets(weights, flags):  # whether a row's weights reach a flagged value
        return torch.matmul(weights, flags.to(p.dtype).unsqueeze(1)) > 0

    pos, neg = meets(weighted, v == float("inf")), meets(weighted, v == float("-inf"))
    nan = meets(seen, torch.isnan(v)) | meets(unweighted, torch.isinf(v)) | (pos & neg)
    o = torch.where(pos, torch.full_like(o, float("inf")), o)
    o = torch.where(neg, torch.full_like(o, float("-inf")), o)
    return torch.where(nan, torch.full_like(o, float("nan")), o)


def reference_attention(q, cache, metadata, options,
                        compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The exact semantics; returns ``[num_tokens, num_q_heads, head_size_v]`` in
    ``options.out_dtype``."""
    num_tokens, num_q_heads, _ = q.shape
    num_kv_heads = cache.num_kv_heads
    group = num_q_heads // num_kv_heads
    result = torch.zeros(num_tokens, num_q_heads, cache.head_size_v, dtype=compute_dtype,
                         device=q.device)
    qf = q.to(compute_dtype)
    if options.q_scale is not None:
        qf = qf * scale_as_tensor(options.q_scale, q.device).to(compute_dtype)
    slopes = sinks = None
    if options.alibi_slopes is not None:
        slopes = options.alibi_slopes.to(compute_dtype).view(num_kv_heads, group, 1, 1)
    if options.sinks is not None:
        sinks = options.sinks.to(compute_dtype).view(num_kv_heads, group, 1)

    cu = metadata.cu_seqlens_q.tolist()
    seq_lens = metadata.seq_lens.tolist()
    capacity = metadata.block_table.shape[1] * cache.block_size
    for b, seq_len in enumerate(seq_lens):
        # unchecked metadata (validate=False) never indexes out of range: a sequence
        # longer than its block table's capacity gives NaN rows (as the Triton kernels
        # do), and so do a negative length and a query range past q (clipped to q: its
        # rows' positions would be wrong)
        start = min(max(cu[b], 0), num_tokens)
        end = min(max(cu[b + 1], start), num_tokens)
        q_len = end - start
        if q_len == 0:
            continue
        if not 0 <= seq_len <= capacity or q_len != cu[b + 1] - cu[b]:
            result[start:end] = float("nan")
            continue
        if seq_len == 0:  # no key: no visible key, zeros
            continue
        k, v, bad_keys = gather_sequence_kv(cache, metadata.block_table[b], seq_len,
                                            compute_dtype)
        k = k.permute(1, 0, 2)  # [Hkv, L, D]
        v = v.permute(1, 0, 2)
        # a NaN or inf in V (host read: the reference syncs per call anyway): the weights
        # multiply finite values, and each row gets what its visible keys' non-finite
        # values give (a key it cannot see adds nothing, not 0 * inf = NaN)
        nonfinite_v = None
        if not bool(torch.isfinite(v).all()):
            nonfinite_v, v = v, torch.where(torch.isfinite(v), v, torch.zeros_like(v))
        key_pos = torch.arange(seq_len, device=q.device)
        rows = max(1, _MAX_SCORE_ELEMENTS // max(1, num_q_heads * seq_len))
        for c0 in range(0, q_len, rows):
            c1 = min(q_len, c0 + rows)
            qc = qf[start + c0:start + c1].view(c1 - c0, num_kv_heads, group, -1)
            qc = qc.permute(1, 2, 0, 3)  # [Hkv, G, Lq, D]
            s = torch.matmul(qc, k.unsqueeze(1).transpose(-1, -2)) * options.scale
            if options.softcap is not None:
                s = options.softcap * torch.tanh(s / options.softcap)
            q_pos = torch.arange(seq_len - q_len + c0, seq_len - q_len + c1, device=q.device)
            dist = q_pos[:, None] - key_pos[None, :]  # p - k, [Lq, L]
            visible = torch.ones_like(dist, dtype=torch.bool)
            if options.causal:
                visible &= dist >= 0
            if options.sliding_window is not None:
                visible &= dist < options.sliding_window
            if slopes is not None:
                if options.alibi_sqrt:
                    s = s - slopes * dist.clamp(min=0).to(compute_dtype).sqrt()
                else:
                    s = s - slopes * dist.to(compute_dtype)
            s = s.masked_fill(~visible, float("-inf"))
            row_max = s.amax(dim=-1)  # [Hkv, G, Lq]
            if sinks is not None:
                row_max = torch.maximum(row_max, sinks)
            # a row with no visible key (max -inf) or an infinite sink; NaN stays NaN
            row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
            p = torch.exp(s - row_max.unsqueeze(-1))
            denom = p.sum(dim=-1)
            if sinks is not None:
                denom = denom + torch.exp(sinks - row_max)
            o = torch.matmul(p, v.unsqueeze(1))  # [Hkv, G, Lq, Dv]
            if nonfinite_v is not None:
                o = _with_visible_nonfinite(o, p, visible, nonfinite_v)
            o = o / torch.where(denom == 0, torch.ones_like(denom), denom).unsqueeze(-1)
            o = o.permute(2, 0, 1, 3).reshape(c1 - c0, num_q_heads, -1)
            # the rows that see a key of a bad block id (no sync: always masked)
            sees_bad = (visible & bad_keys).any(dim=-1)
            result[start + c0:start + c1] = o.masked_fill(sees_bad[:, None, None],
                                                          float("nan"))
    return finish_output(result, options)


def finish_output(result: torch.Tensor, options) -> torch.Tensor:
    """Apply the fp8 output scaling rule, then cast to ``options.out_dtype``."""
    if options.output_scale is not None:
        limit = fp8_max(options.out_dtype)
        scale = scale_as_tensor(options.output_scale, result.device).to(result.dtype)
        result = (result / scale).clamp(-limit, limit)
    return result.to(options.out_dtype)
