"""Run one bench case's ``portattn.attention`` a few times, for Nsight Compute.

    ncu --profile-from-start off --set full python3 benchmarks/ncu_decode.py decode-32x8192-fp8

Cases: any name of ``portattn.bench.default_cases()`` (32/8 heads of 128, block 16, bf16
q; the bench's inputs). ``--sdpa`` profiles torch SDPA's cuDNN backend on the same K/V
gathered contiguous (the bench's peer) instead. Warm calls first; one call is profiled
(between ``cudaProfilerStart`` and ``Stop``).
"""

from __future__ import annotations

import sys

import torch

import portattn
from portattn.bench import build_inputs, default_cases, sdpa


def main(argv: list[str]) -> int:
    peer = "--sdpa" in argv
    argv = [a for a in argv if a != "--sdpa"]
    name = argv[0] if argv else "decode-32x8192-fp8"
    cases = {c.name: c for c in default_cases()}
    if name not in cases:
        print(f"unknown case {name!r}; one of: {', '.join(cases)}", file=sys.stderr)
        return 2
    case = cases[name]
    inp = build_inputs(case, num_q_heads=32, num_kv_heads=8, head_size=128, block_size=16,
                       dtype=torch.bfloat16, device="cuda")
    if peer:
        fn = sdpa(case, inp, "CUDNN_ATTENTION")[0]
    else:
        def fn():
            portattn.attention(inp.q, inp.cache, inp.metadata, out=inp.out)
    for _ in range(4):
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(name, "sdpa cuDNN" if peer else portattn.explain(inp.q, inp.cache,
                                                          inp.metadata).backend)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
