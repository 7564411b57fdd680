"""Where a planned call's host time goes, by layer count: ``plan.run(q, cache, out)`` of a
``dispatch_overhead.py`` case over 1 and 32 layers (a distinct cache per layer), timed
behind a spin kernel as there, then profiled with cProfile (the functions with the most
own time) and timed once more without the spin. A cost that appears only with many
layers is a per-layer memo missing.

    PYTHONPATH=src python3 benchmarks/host_profile.py prefill_staged decode [--top 14]

Needs a GPU (the replayed launches are the ones measured).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dispatch_overhead  # noqa: E402

import portattn  # noqa: E402
from portattn.testing import make_paged_batch  # noqa: E402


def profile_case(case: str, layer_counts, top: int) -> None:
    query_lens, seq_lens = dispatch_overhead.CASES[case]
    batch = make_paged_batch(query_lens, seq_lens, num_q_heads=32, num_kv_heads=8,
                             head_size=128, dtype=torch.bfloat16, device="cuda", poison=False,
                             quant=dispatch_overhead.QUANTIZED.get(case))
    plan = portattn.plan(batch.metadata, num_q_heads=32, dtype=torch.bfloat16,
                         cache=batch.cache, backend="triton_unified", validate=False)
    print(f"{case}: {plan.variant}")
    for count in layer_counts:
        qs, caches = dispatch_overhead._layers(batch, count)
        layers = [(q, c, torch.empty_like(q)) for q, c in zip(qs, caches)]
        steps = max(1, dispatch_overhead.CALLS_PER_SAMPLE // count)

        def step():
            for _ in range(steps):
                for q, cache, out in layers:
                    plan.run(q, cache, out)
        us = dispatch_overhead.per_call_us(step, steps * count)
        torch.cuda.synchronize()
        profiler = cProfile.Profile()
        profiler.enable()
        step()
        profiler.disable()
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        unspun = (time.perf_counter() - start) / (steps * count) * 1e6
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
        print(f"  {count} layers: {us} us per call (median, behind a spin kernel); "
              f"{unspun:.1f} us per call in one unspun pass")
        print(text.getvalue())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", choices=sorted(dispatch_overhead.CASES))
    parser.add_argument("--layers", default="1,32,1,32", help="layer counts, in order")
    parser.add_argument("--top", type=int, default=14)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("host_profile.py measures replayed GPU launches: needs a GPU")
    for case in args.cases:
        profile_case(case, [int(x) for x in args.layers.split(",")], args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
