"""Shared checker of the ``triton_unified`` tests (interpreter and GPU tiers).

:func:`check_unified` builds a random paged batch (shuffled, NaN-poisoned blocks), runs the
backend with a plan forced through :func:`portattn.kernels.heuristics.plan_launch`, into
an output pre-filled with NaN (optionally a strided view whose gaps must stay NaN), and
compares with the float64 oracle :func:`portattn.testing.dense_attention`.
"""

from __future__ import annotations

import math

import torch

from portattn.backends.base import Plan
from portattn.kernels import heuristics
from portattn.options import normalize_options
from portattn.testing import dense_attention, make_paged_batch, relative_error
from portattn.types import AttentionMetadata

TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def alibi_slopes(num_heads: int, device) -> torch.Tensor:
    base = 2.0 ** (-8.0 / num_heads)
    return torch.tensor([base ** (i + 1) for i in range(num_heads)], dtype=torch.float32,
                        device=device)


def check_unified(query_lens, seq_lens, *, group=2, num_kv_heads=2, head_size=64,
                  block_size=16, dtype=torch.float16, device="cpu", mode=None,
                  segments=None, short=None, long=None, strided_q=False, strided_out=None,
                  causal=True, sliding_window=None, softcap=None, alibi=None, sinks=False,
                  sm_count=132, arch="sm90", seq_lens_override=None, seed=0):
    """Run one case; returns the relative error (asserts it is within tolerance)."""
    from portattn.backends.triton_unified import TritonUnified

    num_q_heads = group * num_kv_heads
    batch = make_paged_batch(query_lens, seq_lens, num_q_heads=num_q_heads,
                             num_kv_heads=num_kv_heads, head_size=head_size,
                             block_size=block_size, dtype=dtype, device=device, seed=seed)
    q, metadata = batch.q, batch.metadata
    if strided_q:  # q as the first heads of a fused [T, Hq + 2 Hkv, D] QKV projection
        fused = torch.randn(q.shape[0], num_q_heads + 2 * num_kv_heads, head_size,
                            dtype=dtype, device=device)
        fused[:, :num_q_heads] = q
        q = fused[:, :num_q_heads]
    if seq_lens_override is not None:  # fewer keys than queries: rows see nothing
        metadata = AttentionMetadata(metadata.cu_seqlens_q,
                                     torch.tensor(seq_lens_override, dtype=torch.int32,
                                                  device=device),
                                     metadata.block_table, max(query_lens), max(seq_lens))
    gen = torch.Generator().manual_seed(seed + 1)
    opts = dict(causal=causal, sliding_window=sliding_window, softcap=softcap)
    if alibi is not None:
        opts["alibi_slopes"] = alibi_slopes(num_q_heads, device)
        opts["alibi_sqrt"] = alibi == "sqrt"
    if sinks:
        opts["sinks"] = (torch.randn(num_q_heads, generator=gen) * 2).to(device)

    tokens = q.shape[0]
    if strided_out == "pad":  # out is [..., :D] of a wider tensor; the gap must stay NaN
        full = torch.full((tokens, num_q_heads, head_size + 24), math.nan, dtype=dtype,
                          device=device)
        out = full[..., :head_size]
    elif strided_out == "transposed":
        full = torch.full((num_q_heads, tokens, head_size), math.nan, dtype=dtype,
                          device=device)
        out = full.transpose(0, 1)
    else:
        full = out = torch.full((tokens, num_q_heads, head_size), math.nan, dtype=dtype,
                                device=device)
    options = normalize_options(q, batch.cache, out=out, **opts)
    shape = heuristics.Shape(num_q_heads, num_kv_heads, head_size, q.element_size(),
                             heuristics.next_pow2(max(query_lens)),
                             heuristics.next_pow2(max(seq_lens)),
                             heuristics.next_pow2(len(query_lens)), sm_count, arch)
    params = heuristics.plan_launch(shape, mode=mode, segments=segments, short=short,
                                    long=long)
    plan = Plan("triton_unified", heuristics.variant_name(params), params)
    TritonUnified().run(q, batch.cache, metadata, options, out, plan)

    keys, values = batch.keys, batch.values
    if seq_lens_override is not None:
        keys = [k[:n] for k, n in zip(keys, seq_lens_override)]
        values = [v[:n] for v, n in zip(values, seq_lens_override)]
    expected = dense_attention(q.cpu(), keys, values, query_lens, scale=options.scale,
                               causal=causal, sliding_window=sliding_window, softcap=softcap,
                               alibi_slopes=opts.get("alibi_slopes"), alibi_sqrt=alibi == "sqrt",
                               sinks=opts.get("sinks"))
    assert torch.isfinite(out).all(), f"NaN/inf left in the output ({plan.describe()})"
    if strided_out == "pad":
        assert torch.isnan(full[..., head_size:]).all(), "wrote past head_size"
    err = relative_error(out, expected)
    assert err < TOLERANCE[dtype], f"relative error {err:.3g} ({plan.describe()})"
    return err
