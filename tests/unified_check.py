"""Shared checker of the Triton kernel tests (interpreter and GPU tiers).

:func:`check_unified` builds a random paged batch (shuffled, NaN-poisoned blocks), runs the
backend with a plan forced through :func:`portattn.kernels.heuristics.plan_launch`, into
an output pre-filled with NaN (optionally a strided view whose gaps must stay NaN), and
compares with the float64 oracle :func:`portattn.testing.dense_attention`.

Quantized caches: the oracle reads what the cache actually stores, gathered through the
block table here and multiplied by the scales written in this file (stored codes times
the per-tensor scale, or times the scale caches' entries), never through the package's
own dequantize. fp8 q and fp8 output are made and judged the same way (q code times
q_scale; out compared with ``clamp(oracle / output_scale)`` at fp8 precision).
"""

from __future__ import annotations

import itertools
import math
import os

import torch

from indexing import take
from portattn.backends.base import Plan
from portattn.kernels import heuristics
from portattn.options import normalize_options
from portattn.testing import dense_attention, make_paged_batch, relative_error
from portattn.types import AttentionMetadata, PagedKVCache

#: Rows of q and out on either side of a bad-``cu_seqlens_q`` case's tensors, and the value
#: out's must keep (exact in every output dtype, fp8 included).
GUARD_ROWS = 24
GUARD_VALUE = 7.0

#: Bad ``cu_seqlens_q`` edits (``check_unified``'s ``cu_seqlens_edit``; batches of four or
#: more sequences): each gives the bad list and the sequences whose rows the contract
#: still defines (validation.py: while the list stays non-decreasing, those whose spans lie
#: inside q; none once it decreases).
CU_SEQLENS_EDITS = {
    # the last sequence's queries run 5 past q's end
    "last_runs_past": lambda cu: (cu[:-1] + [cu[-1] + 5], range(len(cu) - 2)),
    # the next-to-last runs past q's end, the last starts past it
    "starts_past_the_end": lambda cu: (cu[:-2] + [cu[-1] + 3, cu[-1] + 9], range(len(cu) - 3)),
    # the first starts 6 rows before q
    "negative_start": lambda cu: ([-6] + cu[1:], range(1, len(cu) - 1)),
    # sequence 1 ends before it starts; sequence 2 then starts inside sequence 0: bounds only
    "decreasing": lambda cu: (cu[:2] + [cu[1] - 1] + cu[3:], range(0)),
    # the last runs a billion rows past q's end
    "far_past_the_end": lambda cu: (cu[:-1] + [2 ** 30], range(len(cu) - 2)),
}

TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
#: fp8 output: e4m3 keeps 3 mantissa bits (rounding error up to 1/16 per element)
FP8_OUT_TOLERANCE = 6e-2
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


class KernelCalls:
    """Stands in for one of launch.py's kernels (``monkeypatch.setattr(launch, name,
    KernelCalls(kernel))``): records each launch's grid and keyword arguments, then
    launches it."""

    def __init__(self, kernel):
        self.kernel, self.grids, self.kwargs = kernel, [], []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.grids.append(grid)
            self.kwargs.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return run


def undo_interpreter_fp8_carry(actual: torch.Tensor, expected: torch.Tensor,
                                fp8_dtype: torch.dtype, ran_on) -> torch.Tensor:
    """Triton 3.6's interpreter rounds float -> fp8 without carrying a rounded-up mantissa
    into the exponent (DEVICE.md's fp8 trap): a value whose correct fp8 rounding is a power
    of two ``2^e`` comes out as ``2^(e-1)``. Put back exactly those elements (the correct
    rounding of ``expected`` is a power of two and ``actual`` is half of it) so CPU tests
    judge the kernel, not the interpreter; the GPU tier compares without this."""
    if torch.device(ran_on).type != "cpu" or os.environ.get("TRITON_INTERPRET") != "1":
        return actual
    rounded = expected.to(fp8_dtype).double()
    mantissa, _ = torch.frexp(rounded)
    trap = (mantissa.abs() == 0.5) & (actual.double() * 2 == rounded)
    return torch.where(trap, rounded, actual.double())


def captured_without_sync(step) -> "torch.cuda.CUDAGraph":
    """``step`` run twice on a side stream (compiles, plans, workspaces), then captured
    once into a CUDA graph with sync debug mode "error": a host sync while capturing
    raises."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return graph


def stored_sequences(cache, block_table, seq_lens) -> tuple[list, list]:
    """:func:`stored_values` of K and of V for every sequence ``b`` of ``seq_lens[b]``
    keys (oracle side)."""
    keys = [stored_values(cache, block_table[b], n, "k") for b, n in enumerate(seq_lens)]
    values = [stored_values(cache, block_table[b], n, "v") for b, n in enumerate(seq_lens)]
    return keys, values


def stored_values(cache, block_table_row, seq_len: int, which: str) -> torch.Tensor:
    """What the cache represents for one sequence, ``[seq_len, Hkv, D]`` float64: the
    stored codes gathered through the block table, times the scales (oracle side)."""
    data = cache.key_cache if which == "k" else cache.value_cache
    bs = cache.block_size
    blocks = block_table_row[: (seq_len + bs - 1) // bs].long().cpu()
    codes = take(data.cpu(), blocks).reshape(-1, *data.shape[2:])[:seq_len].double()
    mode = cache.quant.mode
    if mode == "fp8_per_tensor":
        scale = cache.quant.k_scale if which == "k" else cache.quant.v_scale
        return codes * float(scale)
    if mode in ("int8_per_token_head", "fp8_per_token_head"):
        scales = (cache.k_scale_cache if which == "k" else cache.v_scale_cache).cpu()
        per_key = scales[blocks].reshape(-1, scales.shape[2])[:seq_len].double()
        return codes * per_key[..., None]
    return codes


#: Score features at CPU scale (windows shorter than the test sequences).
FEATURE_KW = {
    "non_causal": dict(causal=False),
    "window": dict(sliding_window=7),
    "softcap": dict(softcap=3.0),
    "alibi": dict(alibi="linear"),
    "alibi_sqrt": dict(alibi="sqrt"),
    "sinks": dict(sinks=True),
    "all": dict(sliding_window=9, softcap=5.0, alibi="linear", sinks=True),
}


#: The same features at GPU-test scale (sequences of hundreds to thousands of keys).
GPU_FEATURE_KW = {**FEATURE_KW, "window": dict(sliding_window=100),
                  "softcap": dict(softcap=30.0),
                  "all": dict(sliding_window=77, softcap=20.0, alibi="linear", sinks=True)}


def alibi_slopes(num_heads: int, device) -> torch.Tensor:
    base = 2.0 ** (-8.0 / num_heads)
    return torch.tensor([base ** (i + 1) for i in range(num_heads)], dtype=torch.float32,
                        device=device)


def check_unified(query_lens, seq_lens, *, group=2, num_kv_heads=2, head_size=64,
                  block_size=16, dtype=torch.float16, device="cpu", mode=None,
                  segments=None, short=None, long=None, strided_q=False, strided_out=None,
                  causal=True, sliding_window=None, softcap=None, alibi=None, sinks=False,
                  sm_count=132, arch="sm90", seq_lens_override=None, seed=0, quant=None,
                  head_size_v=None, q_fp8=None, fp8_out=None, layout="split",
                  fp8_dot=False, tolerance=None, separate_kv=False, block_table_edit=None,
                  v_stage=None, kv_load="pointer", kv_bits=None, v_scale_factor=None,
                  v_pairs=None, stage=None, stage_kv_load=None, stage_min_q=1,
                  one_loop=None, merge_in_kernel=None, workspace=None, gluon=False,
                  tile_heads=None, cu_seqlens_edit=None):
    """Run one case; returns the relative error (asserts it is within tolerance).

    ``quant``: a KVQuant for the cache; ``head_size_v``: DiffKV (a packed cache);
    ``q_fp8``: an fp8 dtype for q (with a q_scale); ``fp8_out``: an fp8 dtype for the
    output (with an output_scale); ``fp8_dot``: plan fp8 tensor-core QK^T;
    ``separate_kv``: K and V as two contiguous tensors instead of views of one;
    ``v_stage``: True / False forces the kernel's V_STAGE switch (8-bit caches), None
    follows the plan (which sets it for per-token-head decode on sm90);
    ``block_table_edit(table)``: corrupt the block table after the oracle's keys are
    gathered (returns the indices of the sequences whose rows must come out NaN);
    ``kv_load``: "pointer" or "descriptor" (the kernel's KV_LOAD switch, tiles cut to
    whole parts of a cache block by ``kv_load.descriptor_params``; forced, so tensors
    that cannot back a descriptor raise instead of silently using pointer loads);
    ``kv_bits``: True / False forces the kernel's rebuild of an 8-bit cache's values from
    its codes with integer operations (the plan's ``kv_bits``: fp8 on GPUs without the
    format, int8 decode on sm90) on or off; None follows the plan;
    ``v_scale_factor``: multiply a per-token-head cache's V scales by this (tiny V values:
    the oracle reads the scales from the cache as well);
    ``v_pairs``: True / False forces the kernel's V_PAIRS (an 8-bit V read as int16 pairs
    of codes) on or off; None follows the plan;
    ``stage``: a staged block size: the plan's long tiles read the keys staged into blocks
    of that many slots (``params["stage"]``, descriptor loads forced, ``kernels/stage.py``);
    ``stage_kv_load``: how they are read (``kv_load.KV_LOAD_CODES``: ``"staged_host"``,
    ``"staged"``, ``"descriptor"``), None: the launcher's default; ``stage_min_q``: the
    fewest queries of a staged sequence (``stage["min_q"]``; shorter ones read the cache in
    a launch of the plan's long tile); ``one_loop``: True / False forces the staged launch's
    ONE_LOOP switch (edge tiles inside the full tiles' loop), None follows the plan (also
    where ``long`` gives the tile); ``merge_in_kernel``: True / False forces where split-KV
    partials are merged (the kernel's MERGE_SEGMENTS, or the merge kernel), None follows
    the plan; ``workspace``: passed to the launch (a runner's, say) instead of one made
    per call; ``gluon`` (with ``stage``): the staged plan's long sequences go to the Gluon
    prefill (forced: a refusal raises), over the cache (16-bit caches) or the staged copy
    (8-bit ones); ``tile_heads``: the decode tiles serve that many kv heads per program
    (the kernel's TILE_HEADS; rows widened to hold their query heads);
    ``cu_seqlens_edit(cu) -> (bad_cu, kept)``: run with a bad ``cu_seqlens_q`` (a list in,
    a list out), q and out the middle rows of tensors with :data:`GUARD_ROWS` rows on either
    side; the guard rows of out must keep :data:`GUARD_VALUE`, and only the rows of the
    sequences in ``kept`` (their spans untouched and overlapped by no other) are compared."""
    from portattn.backends.triton_unified import TritonUnified

    num_q_heads = group * num_kv_heads
    batch = make_paged_batch(query_lens, seq_lens, num_q_heads=num_q_heads,
                             num_kv_heads=num_kv_heads, head_size=head_size,
                             head_size_v=head_size_v, block_size=block_size, dtype=dtype,
                             device=device, seed=seed, quant=quant,
                             layout="diffkv" if head_size_v not in (None, head_size)
                             else layout)
    q, metadata = batch.q, batch.metadata
    cache = batch.cache
    if separate_kv:
        cache = PagedKVCache(cache.key_cache.contiguous(), cache.value_cache.contiguous(),
                             cache.quant, k_scale_cache=cache.k_scale_cache,
                             v_scale_cache=cache.v_scale_cache)
    head_v = head_size if head_size_v is None else head_size_v
    q_scale = None
    if q_fp8 is not None:  # q as fp8 codes with a scale; the oracle uses code * scale
        q_scale = 0.05
        q = (q.float() / q_scale).clamp(-FP8_MAX[q_fp8], FP8_MAX[q_fp8]).to(q_fp8)
    if v_scale_factor is not None:
        cache.v_scale_cache.mul_(v_scale_factor)
    keys = [stored_values(cache, metadata.block_table[b], n, "k")
            for b, n in enumerate(batch.seq_lens)]
    values = [stored_values(cache, metadata.block_table[b], n, "v")
              for b, n in enumerate(batch.seq_lens)]
    nan_seqs: list[int] = []
    kept_seqs = None
    if cu_seqlens_edit is not None:
        bad_cu, kept_seqs = cu_seqlens_edit(metadata.cu_seqlens_q.tolist())
        metadata = AttentionMetadata(torch.tensor(bad_cu, dtype=torch.int32, device=device),
                                     metadata.seq_lens, metadata.block_table,
                                     metadata.max_seqlen_q, metadata.max_seqlen_k)
        guarded = torch.randn(q.shape[0] + 2 * GUARD_ROWS, *q.shape[1:],
                              device=device).to(q.dtype)
        guarded[GUARD_ROWS:-GUARD_ROWS] = q
        q = guarded[GUARD_ROWS:-GUARD_ROWS]
    if block_table_edit is not None:
        table = metadata.block_table.clone()
        nan_seqs = block_table_edit(table)
        metadata = AttentionMetadata(metadata.cu_seqlens_q, metadata.seq_lens, table,
                                     metadata.max_seqlen_q, metadata.max_seqlen_k)
    if strided_q:  # q as the first heads of a fused [T, Hq + 2 Hkv, D] QKV projection
        fused = torch.randn(q.shape[0], num_q_heads + 2 * num_kv_heads, head_size,
                            device=device).to(q.dtype)
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
    if q_scale is not None:
        opts["q_scale"] = q_scale
    out_dtype = dtype
    if fp8_out is not None:
        opts["output_scale"] = 0.01
        out_dtype = fp8_out

    tokens = q.shape[0]
    if strided_out == "pad":  # out is [..., :D] of a wider tensor; the gap must stay NaN
        full = torch.full((tokens, num_q_heads, head_v + 24), math.nan, device=device)
        full = full.to(out_dtype)
        out = full[..., :head_v]
    elif strided_out == "transposed":
        full = torch.full((num_q_heads, tokens, head_v), math.nan, device=device)
        full = full.to(out_dtype)
        out = full.transpose(0, 1)
    elif cu_seqlens_edit is not None:
        full = torch.full((tokens + 2 * GUARD_ROWS, num_q_heads, head_v), GUARD_VALUE,
                          device=device).to(out_dtype)
        out = full[GUARD_ROWS:-GUARD_ROWS]
        out.fill_(math.nan)
    else:
        full = out = torch.full((tokens, num_q_heads, head_v), math.nan,
                                device=device).to(out_dtype)
    options = normalize_options(q, cache, out=out, **opts)
    shape = heuristics.Shape(num_q_heads, num_kv_heads, head_size,
                             cache.key_cache.element_size(),
                             heuristics.next_pow2(max(query_lens)),
                             heuristics.next_pow2(max(seq_lens)),
                             heuristics.next_pow2(len(query_lens)), sm_count, arch, head_v,
                             heuristics.quant_mode(cache.quant.key))
    params = heuristics.plan_launch(shape, mode=mode, segments=segments, short=short,
                                    long=long, fp8_dot=fp8_dot)
    if v_stage is not None:  # forced on or off; None follows the plan
        params["v_stage"] = bool(v_stage)
    if kv_bits is False:
        params.pop("kv_bits", None)
    elif kv_bits:
        params["kv_bits"] = {torch.float8_e4m3fn: "e4m3fn", torch.float8_e5m2: "e5m2",
                             torch.int8: "int8"}[cache.key_cache.dtype]
    if v_pairs is not None:
        params["v_pairs"] = bool(v_pairs)
    if tile_heads is not None:
        short_cfg = dict(params["short"], tile_heads=tile_heads)
        if params["mode"] == "decode":  # rows for the batch's queries, not the plan's 16
            short_cfg["block_q"] = heuristics.next_pow2(max(query_lens))
        short_cfg["block_m"] = max(16, heuristics.next_pow2(
            short_cfg["block_q"] * group * tile_heads))
        params["short"] = short_cfg
    if merge_in_kernel is not None and "short" in params:
        params["short"] = dict(params["short"], merge_in_kernel=bool(merge_in_kernel))
    if kv_load == "descriptor":
        from portattn.kernels import kv_load as kv_load_rules

        params = kv_load_rules.descriptor_params(params, block_size)
        params["_kv_load_forced"] = True
    if stage:
        params["stage"] = heuristics.stage_config(shape, stage, stage_min_q)
        planned = heuristics.staged_long_config(shape)
        # a given tile keeps the plan's loop switch (ONE_LOOP unless one_loop says)
        staged_long = planned if long is None else \
            dict(long.as_dict(), one_loop=planned.get("one_loop", False))
        params["stage_long"] = dict(staged_long, block_n=min(staged_long["block_n"], stage))
        if one_loop is not None:
            params["stage_long"]["one_loop"] = bool(one_loop)
        params["_kv_load_forced"] = True  # descriptor loads over the staged blocks, or raise
        if stage_kv_load is not None:
            params["stage_kv_load"] = stage_kv_load
        if gluon:
            from portattn.kernels.gluon_launch import reads_staged_copy

            reads = "staged" if reads_staged_copy(cache.quant.key) else "cache"
            params["gluon"] = {"min_q": params["stage"]["min_q"], "reads": reads}
            params["_gluon_forced"] = True
    plan = Plan("triton_unified", heuristics.variant_name(params), params)
    if workspace is None:
        TritonUnified().run(q, cache, metadata, options, out, plan)
    else:
        from portattn.kernels.launch import launch_unified

        launch_unified(q, cache, metadata, options, out, params, workspace=workspace)

    if seq_lens_override is not None:
        keys = [k[:n] for k, n in zip(keys, seq_lens_override)]
        values = [v[:n] for v, n in zip(values, seq_lens_override)]
    q_oracle = q.cpu().double()
    expected = dense_attention(q_oracle, keys, values, query_lens, scale=options.scale,
                               causal=causal, sliding_window=sliding_window, softcap=softcap,
                               alibi_slopes=opts.get("alibi_slopes"), alibi_sqrt=alibi == "sqrt",
                               sinks=opts.get("sinks"), q_scale=q_scale)
    result = out.cpu().double()
    if kept_seqs is not None:
        guards = torch.cat([full[:GUARD_ROWS], full[-GUARD_ROWS:]]).cpu().double()
        assert (guards == GUARD_VALUE).all(), "wrote outside out's rows"
        cu = [0, *itertools.accumulate(query_lens)]
        rows = torch.zeros(result.shape[0], dtype=torch.bool)
        for b in kept_seqs:
            rows[cu[b]:cu[b + 1]] = True
        if not rows.any():
            return 0.0  # no row is defined: the bounds are the whole check
        result, expected = result[rows], expected[rows]
    if nan_seqs:  # those sequences' rows must be NaN (all of them); the rest as usual
        cu = metadata.cu_seqlens_q.tolist()
        poisoned = torch.zeros(result.shape[0], dtype=torch.bool)
        for b in nan_seqs:
            poisoned[cu[b]:cu[b + 1]] = True
        assert torch.isnan(result[poisoned]).all(), "rows that met a bad block id are not NaN"
        result, expected_rows = result[~poisoned], ~poisoned
    else:
        expected_rows = None
    assert torch.isfinite(result).all(), f"NaN/inf left in the output ({plan.describe()})"
    if expected_rows is not None:
        expected = expected[expected_rows]
    if strided_out == "pad":
        assert torch.isnan(full[..., head_v:].cpu().double()).all(), "wrote past head_size"
    if fp8_out is not None:
        limit = FP8_MAX[fp8_out]
        expected = (expected / opts["output_scale"]).clamp(-limit, limit)
        result = undo_interpreter_fp8_carry(result, expected, fp8_out, device)
        tol = FP8_OUT_TOLERANCE
    else:
        tol = TOLERANCE[dtype]
    err = relative_error(result, expected)
    assert err < (tolerance or tol), f"relative error {err:.3g} ({plan.describe()})"
    return err


def run_gpu_case(case: dict, **kw):
    """``check_unified`` on the GPU for a case dict (``query_lens``, ``seq_lens`` and
    keywords) plus ``kw``, with the GPU tiers' defaults: GQA 4 over 2 kv heads of 128, bf16."""
    case = {**case, **kw}
    case.setdefault("group", 4)
    case.setdefault("num_kv_heads", 2)
    case.setdefault("head_size", 128)
    case.setdefault("dtype", torch.bfloat16)
    return check_unified(case.pop("query_lens"), case.pop("seq_lens"), device="cuda", **case)
