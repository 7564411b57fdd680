"""One case run: its inputs built, ours and every peer timed (eager, CUDA graph, host
time), the ratios, the mixed case's separate parts and the sweep, as one result dict.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from portattn.bench.cases import Case, Inputs, build_inputs, case_bytes, case_flops
from portattn.bench.peers import (
    fa4_paged,
    flash_attn_contiguous,
    our_backend,
    ours,
    portattn_flash_attn,
    sdpa,
    triton_backend,
)
from portattn.bench.report import _error
from portattn.bench.sweep import run_sweep
from portattn.bench.timing import host_us


def _metric(case: Case, ms: float, nbytes: int, flops: float) -> dict:
    return {"ms": ms, "tbs": nbytes / (ms * 1e-3) / 1e12, "tflops": flops / (ms * 1e-3) / 1e12}


def run_case(case: Case, args, bench, caps, ceilings) -> dict:
    """One case: every implementation timed, ratios and the sweep; its inputs are freed
    (and the allocator's cache emptied) before the next case."""
    result = _run_case(case, args, bench, caps, ceilings)
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return result


def _run_case(case: Case, args, bench, caps, ceilings) -> dict:
    import portattn

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    inp = build_inputs(case, num_q_heads=args.num_q_heads, num_kv_heads=args.num_kv_heads,
                       head_size=args.head_size, block_size=args.block_size, dtype=dtype,
                       device=args.device)
    nbytes = case_bytes(case, inp)
    flops = case_flops(case, args.num_q_heads, inp.cache.head_size_qk,
                       head_size_v=inp.cache.head_size_v)
    decision = portattn.explain(inp.q, inp.cache, inp.metadata, backend=our_backend(inp))
    lens = {"query_lens": _compact(case.query_lens), "seq_lens": _compact(case.seq_lens)}
    result: dict[str, Any] = {
        "case": dataclasses.asdict(case) | lens,
        "bytes": nbytes, "flops": flops, "backend": decision.backend,
        "plan": decision.plan.describe(), "impls": {}, "notes": []}
    impls = {"ours": lambda: ours(inp)}
    if not args.no_peers and args.device == "cuda" and not case.variant_of_bf16:
        def peer(name):
            def make():
                check: dict = {}  # the peer's output against ours, once at setup
                fn, notes = sdpa(case, inp, name, check)
                result["notes"].extend(f"{name}: {n}" for n in notes)
                result.setdefault("rel_error_vs_ours", {})[name] = check.get("rel_error")
                return fn
            return make
        impls["sdpa_cudnn"] = peer("CUDNN_ATTENTION")
        impls["sdpa_flash"] = peer("FLASH_ATTENTION")
        impls["flash_attn"] = lambda: flash_attn_contiguous(case, inp)
        impls["portattn_flash_attn"] = lambda: portattn_flash_attn(inp)
    if not args.no_peers and args.device == "cuda" and case.kv_quant == "none":
        impls["fa4_paged"] = lambda: fa4_paged(inp)  # DiffKV cases too: FA4 reads 192/128
        if case.head_size_v is not None:  # and portattn's flash_attn backend through it
            impls["portattn_flash_attn"] = lambda: portattn_flash_attn(inp)
    for name, make in impls.items():
        try:
            fn = make()
            fn()
            result["impls"][name] = _metric(case, bench(fn), nbytes, flops)
        except Exception as exc:
            result["impls"][name] = {"error": _error(exc)}
            continue
        if args.device == "cuda":
            entry = result["impls"][name]
            try:
                entry["graph_ms"] = args.graph_timer(fn)
            except Exception as exc:
                entry["graph_error"] = _error(exc)
            if name == "ours":
                entry["host_us"] = host_us(fn)
                entry["launch_host_us"] = host_us(_direct_launch(inp))
    if case.kind == "mixed":  # the two parts run separately through our kernel
        result["separate_parts_ms"], result["separate_parts_backends"] = _separate_parts(
            case, args, bench, dtype)
        if args.device == "cuda":
            result["separate_parts_graph_ms"] = _separate_parts(case, args, args.graph_timer,
                                                                dtype)[0]
    ours_ms = result["impls"]["ours"].get("ms")
    if ours_ms:
        result["speed_vs"] = {k: v["ms"] / ours_ms for k, v in result["impls"].items()
                              if k != "ours" and "ms" in v}
        ours_graph = result["impls"]["ours"].get("graph_ms")
        if ours_graph:
            result["graph_speed_vs"] = {k: v["graph_ms"] / ours_graph
                                        for k, v in result["impls"].items()
                                        if k != "ours" and v.get("graph_ms")}
        if ceilings.get("copy_tbs") and case.kind in ("decode", "spec"):
            result["fraction_of_ceiling"] = result["impls"]["ours"]["tbs"] / ceilings["copy_tbs"]
        elif ceilings.get("matmul_tflops"):
            result["fraction_of_ceiling"] = (result["impls"]["ours"]["tflops"]
                                             / ceilings["matmul_tflops"])
        if "separate_parts_ms" in result and result["separate_parts_ms"]:
            result["speed_vs"]["separate_parts"] = result["separate_parts_ms"] / ours_ms
        if result.get("separate_parts_graph_ms") and ours_graph:
            result["graph_speed_vs"]["separate_parts"] = (result["separate_parts_graph_ms"]
                                                          / ours_graph)
    if args.sweep:
        sweep_bench = args.graph_timer if args.device == "cuda" else bench
        result["sweep"] = run_sweep(case, inp, sweep_bench, caps)
    return result


def _direct_launch(inp: Inputs):
    """Our kernels launched without the dispatcher (to split host time into parts)."""
    import portattn
    from portattn.kernels.launch import launch_unified
    from portattn.options import normalize_options

    options = normalize_options(inp.q, inp.cache)
    plan = portattn.explain(inp.q, inp.cache, inp.metadata,
                            backend=triton_backend(inp.cache)).plan

    def fn():
        launch_unified(inp.q, inp.cache, inp.metadata, options, inp.out, plan.params)
    return fn


def _separate_parts(case: Case, args, bench, dtype) -> tuple[float, list[str]]:
    """The mixed case's chunk and its decodes built and timed alone, each through the
    backend ours is timed on (:func:`our_backend`: our Triton kernels on a GPU), so the
    sum compares our kernel on the batch with our kernel on its parts, not with whatever
    the routing picks for a part alone (FA4 for a long chunk); returns the summed time and
    each part's backend."""
    import portattn

    total, backends = 0.0, []
    for pick in (lambda ql: ql > 1, lambda ql: ql == 1):
        idx = [i for i, ql in enumerate(case.query_lens) if pick(ql)]
        part = Case(case.name + "-part", case.kind, [case.query_lens[i] for i in idx],
                    [case.seq_lens[i] for i in idx])
        inp = build_inputs(part, num_q_heads=args.num_q_heads, num_kv_heads=args.num_kv_heads,
                           head_size=args.head_size, block_size=args.block_size, dtype=dtype,
                           device=args.device)
        backend = our_backend(inp)
        backends.append(portattn.explain(inp.q, inp.cache, inp.metadata,
                                         backend=backend).backend)
        total += bench(lambda inp=inp, backend=backend: portattn.attention(
            inp.q, inp.cache, inp.metadata, out=inp.out, backend=backend))
    return total, backends


def _compact(values: list) -> str:
    out, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        out.append(f"{values[i]}x{j - i + 1}" if j > i else str(values[i]))
        i = j + 1
    return ",".join(out)
