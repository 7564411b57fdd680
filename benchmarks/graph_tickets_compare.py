"""Side by side in one run: split decodes captured in a CUDA graph taking their merge
tickets from the slab (:mod:`portattn.kernels.graph_tickets`) against the fallback, the
workspace's tickets zeroed by a memset node on every replay (``graph_tickets.take``
switched off). Kernel-only times from
:class:`portattn.bench.GraphTimer` (L2 flushed, flushes subtracted), alternating the two
twice per case and keeping each one's best.

    PYTHONPATH=src python3 benchmarks/graph_tickets_compare.py [CASE ...]
"""

from __future__ import annotations

import sys

import torch

from portattn.bench import GraphTimer, build_inputs, default_cases, ours
from portattn.kernels import graph_tickets

DEFAULT = ("decode-1x8192", "decode-8x1024", "decode-8x8192", "decode-1x32768",
           "decode-8x8192-fp8")


def main() -> int:
    wanted = sys.argv[1:] or DEFAULT
    timer = GraphTimer(reps=20, replays=5)
    slab = graph_tickets.take
    paths = {"slab": slab, "memset": lambda device, count: None}
    print(f"{torch.cuda.get_device_name()}: kernel-only us (CUDA graph)", flush=True)
    for case in default_cases():
        if case.name not in wanted:
            continue
        inp = build_inputs(case, num_q_heads=32, num_kv_heads=8, head_size=128,
                           block_size=16, dtype=torch.bfloat16, device="cuda")
        fn = ours(inp)
        fn()  # compiles, and makes the slab (an eager split call)
        torch.cuda.synchronize()
        best: dict[str, float] = {}
        try:
            for _ in range(2):
                for name, path in paths.items():
                    graph_tickets.take = path
                    us = timer(fn) * 1e3
                    best[name] = min(best.get(name, us), us)
        finally:
            graph_tickets.take = slab
        print(f"{case.name:<20} slab {best['slab']:7.2f}  memset {best['memset']:7.2f}  "
              f"gain {best['memset'] - best['slab']:5.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
