"""Long prompts as a user gets them: ``portattn.attention`` through ``triton_unified``,
through ``flash_attn`` (FA4 where installed) and in auto, side by side in one process,
for the rows of ``dispatch.priorities.MEASURED_LEADS`` / ``MEASURED_YIELDS``.

    PYTHONPATH=src python3 benchmarks/routing_bench.py [--cases a,b] [--out FILE]

Each case is a batch of long chunks (the class "long-chunks": a chunk of more than 1024
queries), causal, 32 / 8 heads, block 16 unless the case says otherwise. Two timings per
route: eager ``do_bench`` (host time included, what an engine running prefill eagerly
sees) and kernel-only from a CUDA graph with the L2 flushed (``bench.GraphTimer``). The
flash_attn route's output is checked against triton_unified's (relative error). The
last columns are the flash_attn route's time over triton_unified's (> 1: ours faster)
and the backend auto picked (with the yield's note when a lead yielded).
"""

from __future__ import annotations

import argparse
import json

import torch

#: name -> (query lens, seq lens, head size, dtype, options); decodes beside a chunk
#: read 4096 keys, and the bench's mixed case has 8192 keys of context before its chunk.
CASES: dict[str, tuple] = {
    "1x2048": ([2048], [2048], 128, "bf16", {}),
    "1x4096": ([4096], [4096], 128, "bf16", {}),
    "1x8192": ([8192], [8192], 128, "bf16", {}),
    "1x16384": ([16384], [16384], 128, "bf16", {}),
    "4x2048": ([2048] * 4, [2048] * 4, 128, "bf16", {}),
    "8x4096": ([4096] * 8, [4096] * 8, 128, "bf16", {}),
    "2048@10240": ([2048], [10240], 128, "bf16", {}),
    "2048@10240+7": ([2048] + [1] * 7, [10240] + [4096] * 7, 128, "bf16", {}),
    "2048@10240+63": ([2048] + [1] * 63, [10240] + [4096] * 63, 128, "bf16", {}),
    "1100+127": ([1100] + [1] * 127, [1100] + [4096] * 127, 128, "bf16", {}),
    "4096+255@2048": ([4096] + [1] * 255, [4096] + [2048] * 255, 128, "bf16", {}),
    "1x8192-fp16": ([8192], [8192], 128, "fp16", {}),
    "1x8192-window1024": ([8192], [8192], 128, "bf16", {"sliding_window": 1024}),
    "1x8192-window4096": ([8192], [8192], 128, "bf16", {"sliding_window": 4096}),
    "1x8192-sinks": ([8192], [8192], 128, "bf16", {"sinks": True}),
    "1x8192-softcap": ([8192], [8192], 128, "bf16", {"softcap": 30.0}),
    "h64-2048@10240+63": ([2048] + [1] * 63, [10240] + [4096] * 63, 64, "bf16", {}),
    "h256-2048@10240+63": ([2048] + [1] * 63, [10240] + [4096] * 63, 256, "bf16", {}),
}
ROUTES = ("triton_unified", "flash_attn", None)


def _options(spec: dict, num_q_heads: int, device: str) -> dict:
    options = dict(spec)
    if options.pop("sinks", False):
        options["sinks"] = torch.linspace(-1.0, 1.0, num_q_heads, device=device)
    return options


def run_case(name: str, eager, graph, device: str = "cuda") -> dict:
    """Both routes and auto for one case (``graph`` None: no kernel-only timing)."""
    import portattn
    from portattn import bench
    from portattn.testing import relative_error

    query_lens, seq_lens, head, dtype_name, spec = CASES[name]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    case = bench.Case(name, "prefill", query_lens, seq_lens)
    inp = bench.build_inputs(case, num_q_heads=32, num_kv_heads=8, head_size=head,
                             block_size=16, dtype=dtype, device=device)
    options = _options(spec, 32, device)
    row: dict = {"case": name, "us": {}, "graph_us": {}, "variant": {}}
    outs = {}
    for route in ROUTES:
        label = route or "auto"
        out = torch.full_like(inp.out, float("nan"))

        def fn(route=route, out=out):
            portattn.attention(inp.q, inp.cache, inp.metadata, out=out, backend=route,
                               **options)
        try:
            decision = portattn.explain(inp.q, inp.cache, inp.metadata, backend=route,
                                        **options)
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:  # a route that cannot serve the case: say why
            row["variant"][label] = f"error: {type(exc).__name__}: {exc}"[:300]
            continue
        outs[label] = out
        row["variant"][label] = f"{decision.backend}: {decision.plan.describe()}"[:300]
        if route is None:
            row["auto"] = decision.backend
            row["auto_notes"] = [n for n in decision.notes if "yields" in n]
        row["us"][label] = round(eager(fn) * 1e3, 1)
        if graph is not None:
            row["graph_us"][label] = round(graph(fn) * 1e3, 1)
    if "triton_unified" in outs and "flash_attn" in outs:
        row["err_fa_vs_ours"] = relative_error(outs["flash_attn"], outs["triton_unified"])
    for key in ("us", "graph_us"):
        times = row[key]
        if times.get("triton_unified") and times.get("flash_attn"):
            row[f"fa_over_ours_{key}"] = round(times["flash_attn"] / times["triton_unified"], 3)
    return row


def main() -> int:
    from portattn import bench

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out")
    args = parser.parse_args()
    eager = bench.timer("cuda", 300)
    graph = bench.GraphTimer()
    gpu = torch.cuda.get_device_name()
    print(f"GPU {gpu}; us eager / graph per route; fa/ours = flash_attn route's time over "
          "triton_unified's", flush=True)
    rows = []
    for name in args.cases.split(","):
        row = run_case(name, eager, graph)
        rows.append(row)
        cells = "  ".join(f"{k} {row['us'][k]:.1f}/{row['graph_us'].get(k, 0):.1f}"
                          for k in row["us"])
        print(f"{name:20} {cells}  fa/ours {row.get('fa_over_ours_us')}/"
              f"{row.get('fa_over_ours_graph_us')}  auto={row.get('auto')}  "
              f"err {row.get('err_fa_vs_ours')}", flush=True)
        for k, v in row["variant"].items():
            print(f"    {k}: {v[:200]}", flush=True)
    report = {"gpu": gpu, "torch": torch.__version__, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
