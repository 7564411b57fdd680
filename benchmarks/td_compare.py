"""Descriptor (TMA) vs pointer K/V loads of the unified kernel, every ``portattn bench``
case (the PERFORMANCE.md shapes), in one run (issue 12's selection by evidence).

Per case and block size, three launches of :func:`portattn.kernels.launch.launch_unified`
timed by :class:`portattn.bench.GraphTimer` (CUDA graph, L2 flushed):

* ``pointer``: the plan the dispatcher picks today (pointer loads, its own tiles);
* ``pointer-same-tiles``: pointer loads with the descriptor plan's tiles (BLOCK_N cut to
  a whole part of a cache block), so the load method and the tile size are told apart;
* ``descriptor``: ``KV_LOAD=1`` with those tiles (forced: an ineligible cache errors).

Each output is checked against the ``pointer`` one (max abs difference printed). JSON lines
go to stdout and ``--out``. Run on the GPU (sm90+):

    PYTHONPATH=src python3 benchmarks/td_compare.py --block-sizes 16,64,128 \
        --out benchmarks/results/td-h200.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-sizes", default="16,64,128")
    parser.add_argument("--cases", default="all", help="comma-separated case names")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    os.environ["PORTATTN_TD"] = "0"  # the baseline plan: pointer loads

    import portattn
    from portattn.bench import GraphTimer, build_inputs, case_bytes, default_cases
    from portattn.kernels import kv_load as rules
    from portattn.kernels.launch import launch_unified
    from portattn.options import normalize_options

    timer = GraphTimer()
    cases = default_cases()
    if args.cases != "all":
        wanted = set(args.cases.split(","))
        cases = [c for c in cases if c.name in wanted]
    out_file = open(args.out, "a", encoding="utf-8") if args.out else None
    for block_size in (int(b) for b in args.block_sizes.split(",")):
        for case in cases:
            inp = build_inputs(case, num_q_heads=32, num_kv_heads=8, head_size=128,
                               block_size=block_size, dtype=torch.bfloat16, device="cuda")
            options = normalize_options(inp.q, inp.cache)
            diffkv = inp.cache.head_size_qk != inp.cache.head_size_v
            base = portattn.explain(inp.q, inp.cache, inp.metadata, backend="triton_diffkv"
                                    if diffkv else "triton_unified").plan.params
            desc = {**rules.descriptor_params(base, block_size), "_kv_load_forced": True}
            variants = {"pointer": base,
                        "pointer-same-tiles": {**desc, "kv_load": "pointer"},
                        "descriptor": desc}
            ref = None
            for name, params in variants.items():
                row = {"case": case.name, "block_size": block_size, "variant": name,
                       "block_n": {k: params[k]["block_n"] for k in ("short", "long")
                                   if k in params}}
                try:
                    def fn(p=params):
                        launch_unified(inp.q, inp.cache, inp.metadata, options, inp.out, p)
                    inp.out.fill_(float("nan"))
                    fn()
                    torch.cuda.synchronize()
                    got = inp.out.float().clone()
                    if ref is None:
                        ref = got
                    row["max_abs_diff_vs_pointer"] = (got - ref).abs().max().item()
                    ms = timer(fn)
                    row["us"] = ms * 1e3
                    row["tbs"] = case_bytes(case, inp) / (ms * 1e-3) / 1e12
                except Exception as exc:  # a failing variant is a result
                    row["error"] = str(exc).splitlines()[0][:300]
                line = json.dumps(row)
                print(line, flush=True)
                if out_file:
                    out_file.write(line + "\n")
                    out_file.flush()
            del inp
    if out_file:
        out_file.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
