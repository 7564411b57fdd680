"""Run one bench case's ``portattn.attention`` a few times, for Nsight Compute.

    ncu --profile-from-start off --set full python3 benchmarks/ncu_decode.py decode-32x8192-fp8

Cases: any name of ``portattn.bench.default_cases()`` (32/8 heads of 128, block 16, bf16
q; the bench's inputs). ``--sdpa`` profiles torch SDPA's cuDNN backend on the same K/V
gathered contiguous (the bench's peer) instead. ``--batch N`` / ``--keys K`` replace
the case's batch size / key count (a decode case: one query per sequence), e.g. the fp8
decode at 33 sequences (``wave_probe.py``). Warm calls first; one call is profiled
(between ``cudaProfilerStart`` and ``Stop``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

import portattn
from portattn.bench import build_inputs, default_cases, sdpa


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", nargs="?", default="decode-32x8192-fp8")
    parser.add_argument("--sdpa", action="store_true", help="profile SDPA cuDNN instead")
    parser.add_argument("--batch", type=int, help="sequences (a decode case)")
    parser.add_argument("--keys", type=int, help="keys per sequence (a decode case)")
    args = parser.parse_args(argv)
    peer, name = args.sdpa, args.case
    cases = {c.name: c for c in default_cases()}
    if name not in cases:
        print(f"unknown case {name!r}; one of: {', '.join(cases)}", file=sys.stderr)
        return 2
    case = cases[name]
    if args.batch is not None or args.keys is not None:
        if case.kind != "decode":
            print(f"--batch / --keys: only for a decode case, not {name!r}", file=sys.stderr)
            return 2
        batch = args.batch if args.batch is not None else case.num_seqs
        keys = args.keys if args.keys is not None else case.seq_lens[0]
        if batch < 1 or keys < 1:
            print("--batch / --keys: positive integers expected", file=sys.stderr)
            return 2
        name = f"{name} ({batch} x {keys})"
        case = dataclasses.replace(case, name=name, query_lens=[1] * batch,
                                   seq_lens=[keys] * batch)
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
