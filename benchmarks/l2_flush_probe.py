"""What the L2 flush between timed calls costs a short decode (benchmarks/NOTES.md,
session 34). Each case through ``portattn.attention``, kernel-only in CUDA graphs with
the bench's :class:`GraphTimer` under each of its flushes (``zero``: do_bench's way, the
L2 left dirty; ``read``: left clean), a graph of calls alone (no flush), and the kernels'
own durations from torch's profiler (calls back to back), against the bench's copy
ceiling measured in the same run.

    PYTHONPATH=src python3 benchmarks/l2_flush_probe.py [CASE ...]   (default: three decodes)
"""

from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from portattn.bench import GraphTimer, build_inputs, case_bytes, measure_ceilings, timer
from portattn.bench.cases import default_cases
from portattn.bench.peers import ours
from portattn.bench.timing import graph_replay_ms

DEFAULT = ("decode-8x8192-fp8", "decode-32x8192-fp8", "decode-8x8192")


def graph_no_flush_ms(fn, reps: int = 20) -> float:
    """Per-call time of ``reps`` calls captured in one graph, nothing between them."""
    return graph_replay_ms(fn, reps, replays=5) / reps


def profiled_kernel_us(fn, calls: int = 20) -> float:
    """Mean device time per call of the kernels ``fn`` launches, calls back to back."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return sum(ev.device_time_total for ev in prof.key_averages()) / calls


def main(argv: list[str]) -> int:
    names = argv or list(DEFAULT)
    cases = {c.name: c for c in default_cases()}
    unknown = [n for n in names if n not in cases]
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; known: {sorted(cases)}")
    copy_tbs = measure_ceilings("cuda", timer("cuda", 100))["copy_tbs"]
    timers = {"zero": GraphTimer(flush="zero"), "read": GraphTimer(flush="read")}
    print(f"{torch.cuda.get_device_name()}  copy {copy_tbs:.2f} TB/s; us (fraction of copy), "
          "min (max) of 3 rounds")
    for name in names:
        case = cases[name]
        inp = build_inputs(case, num_q_heads=32, num_kv_heads=8, head_size=128, block_size=16,
                           dtype=torch.bfloat16, device="cuda")
        fn = ours(inp)
        fn()
        torch.cuda.synchronize()
        times: dict[str, list[float]] = {}
        for _ in range(3):
            for flush, graph in timers.items():
                times.setdefault(flush, []).append(graph(fn) * 1e3)
            timers["zero"].heat()
            times.setdefault("none", []).append(graph_no_flush_ms(fn) * 1e3)
        times["profiler"] = [profiled_kernel_us(fn)]
        nbytes = case_bytes(case, inp)
        cells = "  ".join(f"{k} {min(v):7.1f} ({max(v):7.1f}) "
                          f"{nbytes / (min(v) * 1e-6) / 1e12 / copy_tbs:4.2f}"
                          for k, v in times.items())
        print(f"{name:<22} {cells}", flush=True)
        del inp, fn
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
