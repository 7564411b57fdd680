"""Prefill at a head size the plan does not stage yet (96 by default): the three routes
of our Triton backend and the peers, side by side in one process (H200: sm90).

    PYTHONPATH=src python3 benchmarks/gluon_heads_bench.py [--head-size 96] [--out FILE]

Routes, each planned for ``triton_unified`` after ``planning.clear()``:

(``planning.clear()`` forgets plans, ``selector.decision_cache`` the decisions: a first
version of this bench cleared only the former, so its ``staged`` column, keyed like
``cache``, replayed the cache route's decision.)

* ``cache``: the plan as it stands (the unified kernel reading the paged cache in its
  loop, where ``heuristics.STAGED_PREFERRED`` has no entry for the head);
* ``staged``: the table given an entry for the head, ``PORTATTN_GLUON=0`` (the staging
  launch, then the unified kernel over the staged keys);
* ``gluon``: the same entry, ``PORTATTN_GLUON=1`` (the Gluon prefill over the cache; a
  head narrower than its tile runs padded with zeros).

Peers: FA4 paged at block 16 (``flash_attn.cute`` where it imports) and SDPA cuDNN on
contiguous K/V. Causal, 32 / 8 heads, bf16, block 16. Two timings per implementation:
eager ``do_bench`` and kernel-only from a CUDA graph (``bench.GraphTimer``); every route's
output is checked against the first route's (relative error).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

CASES = {"1x8192": ([8192], [8192]), "4x2048": ([2048] * 4, [2048] * 4),
         "1x4096": ([4096], [4096])}


def _route(name: str, head: int):
    """(PORTATTN_GLUON value, extra STAGED_PREFERRED entries) of a route."""
    entry = ({"arch": "sm90", "heads": ((head, head),), "block_sizes": (16,),
              "evidence": "benchmarks/gluon_heads_bench.py"},)
    return {"cache": ("0", ()), "staged": ("0", entry), "gluon": ("1", entry)}[name]


def _plan_route(name: str, head: int, inp, base_table: tuple):
    import portattn
    from portattn import planning, settings
    from portattn.dispatch import selector
    from portattn.kernels import heuristics

    gluon, extra = _route(name, head)
    os.environ["PORTATTN_GLUON"] = gluon
    settings.reload()
    heuristics.STAGED_PREFERRED = base_table + extra
    planning.clear()
    selector.decision_cache.clear()  # keyed on the settings, not on the table
    plan = portattn.plan(inp.metadata, num_q_heads=inp.q.shape[1], dtype=inp.q.dtype,
                         cache=inp.cache, backend="triton_unified")
    out = torch.empty_like(inp.out)

    def fn():
        plan.run(inp.q, inp.cache, out=out)
    fn()
    torch.cuda.synchronize()
    return fn, out.clone(), plan.variant


def main() -> int:
    from portattn import bench
    from portattn.kernels import heuristics
    from portattn.testing import relative_error

    parser = argparse.ArgumentParser()
    parser.add_argument("--head-size", type=int, default=96)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out")
    args = parser.parse_args()
    base_table = heuristics.STAGED_PREFERRED
    head = args.head_size
    eager = bench.timer("cuda", 300)
    graph = bench.GraphTimer()
    rows = []
    gpu = torch.cuda.get_device_name()
    print(f"GPU {gpu}  causal, 32/8 heads of {head}, bf16, block 16; us eager / graph",
          flush=True)
    for name in args.cases.split(","):
        qlens, slens = CASES[name]
        case = bench.Case(f"prefill-{name}", "prefill", qlens, slens)
        inp = bench.build_inputs(case, num_q_heads=32, num_kv_heads=8, head_size=head,
                                 block_size=16, dtype=torch.bfloat16, device="cuda")
        flops = bench.case_flops(case, 32, head)
        row = {"case": name, "us": {}, "graph_us": {}, "variant": {}, "err_vs_cache": {}}
        first = None
        for route in ("cache", "staged", "gluon"):
            try:
                fn, out, variant = _plan_route(route, head, inp, base_table)
            except Exception as exc:  # a route this head cannot take: say why
                row["variant"][route] = f"error: {type(exc).__name__}: {exc}"[:300]
                continue
            row["variant"][route] = variant
            if first is None:
                first = out
            row["err_vs_cache"][route] = relative_error(out, first)
            row["us"][route] = round(eager(fn) * 1e3, 1)
            row["graph_us"][route] = round(graph(fn) * 1e3, 1)
        heuristics.STAGED_PREFERRED = base_table
        peers = {"fa4": lambda: bench.fa4_paged(inp),
                 "cudnn": lambda: bench.sdpa(case, inp, "CUDNN_ATTENTION")[0]}
        for peer, make in peers.items():
            try:
                fn = make()
                fn()
                torch.cuda.synchronize()
                row["us"][peer] = round(eager(fn) * 1e3, 1)
                row["graph_us"][peer] = round(graph(fn) * 1e3, 1)
            except Exception as exc:
                row["variant"][peer] = f"error: {type(exc).__name__}: {exc}"[:300]
        row["tflops_graph"] = {k: round(flops / (v * 1e-6) / 1e12, 1)
                               for k, v in row["graph_us"].items() if v}
        rows.append(row)
        cells = "  ".join(f"{k} {row['us'][k]:.1f}/{row['graph_us'][k]:.1f}"
                          for k in row["us"])
        print(f"{name:8} {cells}  err {row['err_vs_cache']}", flush=True)
        for k, v in row["variant"].items():
            print(f"    {k}: {v[:160]}", flush=True)
    report = {"gpu": gpu, "head_size": head, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
