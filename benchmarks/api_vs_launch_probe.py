"""Whether the bench's kernel-only time of a case depends on the route to the kernel
(benchmarks/NOTES.md, session 34): ``portattn.attention`` (the bench's call), the API
plan's params through ``launch_unified``, and ``kernel_experiments.py``'s params
(``plan_launch`` of the case's shape, as that script builds it: 32 / 8 heads, sm90), in
one process: the plans, the outputs against the API's, kernel-only times (two rounds)
and each route's kernels (torch's profiler).

    PYTHONPATH=src python3 benchmarks/api_vs_launch_probe.py [CASE ...]
"""

from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

import portattn
from portattn.bench import GraphTimer, build_inputs, case_bytes
from portattn.bench.cases import default_cases
from portattn.bench.peers import our_backend, ours
from portattn.kernels.heuristics import Shape, next_pow2, plan_launch, quant_mode
from portattn.kernels.launch import launch_unified
from portattn.options import normalize_options

DEFAULT = ("decode-8x8192-fp8", "decode-32x8192-fp8", "decode-32x8192-int8pth",
           "decode-8x8192")


def routes(case, inp) -> dict:
    options = normalize_options(inp.q, inp.cache)
    plan = portattn.explain(inp.q, inp.cache, inp.metadata, backend=our_backend(inp)).plan
    shape = Shape(32, 8, inp.cache.head_size_qk, inp.cache.key_cache.element_size(),
                  next_pow2(max(case.query_lens)), next_pow2(max(case.seq_lens)), case.num_seqs,
                  torch.cuda.get_device_properties(0).multi_processor_count, "sm90",
                  kv_quant=quant_mode(case.kv_quant))
    exp_params = plan_launch(shape)
    print(f"{case.name} api plan: {plan.params['short']}\n{case.name} exp plan: "
          f"{exp_params['short']}", flush=True)
    return {"api": ours(inp),
            "direct": lambda: launch_unified(inp.q, inp.cache, inp.metadata, options, inp.out,
                                             plan.params),
            "exp": lambda: launch_unified(inp.q, inp.cache, inp.metadata, options, inp.out,
                                          exp_params)}


def main(argv: list[str]) -> int:
    cases = {c.name: c for c in default_cases() if c.kind == "decode"}
    names = argv or list(DEFAULT)
    unknown = [n for n in names if n not in cases]
    if unknown:
        raise SystemExit(f"unknown decode cases {unknown}; known: {sorted(cases)}")
    graph = GraphTimer()
    for name in names:
        case = cases[name]
        inp = build_inputs(case, num_q_heads=32, num_kv_heads=8, head_size=128, block_size=16,
                           dtype=torch.bfloat16, device="cuda")
        fns = routes(case, inp)
        ref = None
        for route, fn in fns.items():
            inp.out.fill_(float("nan"))
            fn()
            out = inp.out.float()
            ref = out.clone() if ref is None else ref
            print(f"  {route}: finite {bool(torch.isfinite(out).all())}, max difference "
                  f"from api {float((out - ref).abs().max()):.3g}")
        for rnd in range(2):
            for route, fn in fns.items():
                ms = graph(fn)
                print(f"{name:<24} {route:<8} r{rnd} {ms * 1e3:8.1f} us  "
                      f"{case_bytes(case, inp) / (ms * 1e-3) / 1e12:5.2f} TB/s", flush=True)
        for route, fn in fns.items():
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    fn()
                torch.cuda.synchronize()
            for ev in prof.key_averages():
                if ev.device_time_total > 0:
                    print(f"  prof {route:<8} {ev.key[:70]:<70} {ev.count // 10}x "
                          f"{ev.device_time_total / 10:8.1f} us")
        del inp, fns
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
