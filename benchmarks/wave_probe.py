"""How a decode's kernel-only time grows with the number of programs in its one wave.

Issue 10's fp8 per-tensor 32 x 8192 decode launches 512 programs (2 segments x 8 kv heads
x 32 sequences) for 528 slots (132 SMs x 4: the paired 8-bit tile's register cap and
shared memory). This times the public call (``backend="triton_unified"``, the plan the
call gets: made for the batch's power-of-two bucket) at batch sizes and lengths around
that point, in rounds that alternate the shapes, kernel-only in a CUDA graph with the L2
flushed before each call:

* fewer sequences (fewer programs, same length each): does the time follow the bytes?
* shorter sequences (same programs, fewer tiles each): is a program's time linear in
  its tiles?
* 33 / 34 sequences: past 32 the bucket is 64 sequences, whose plan is 1 segment. Until
  the plans carried ``segments_upto`` (NOTES.md, session 21), 33 sequences ran that 1
  segment (162 us) where 2 fit the wave (145 us); 34 take 1 either way.

    PYTHONPATH=src python3 benchmarks/wave_probe.py [--shapes 32x8192,33x8192 ...]

Prints one line per (round, shape) and the per-shape rounds with their minimum.
"""

from __future__ import annotations

import argparse

import torch

import portattn
from portattn.bench import Case, GraphTimer, build_inputs

DEFAULT_SHAPES = "32x8192,32x7936,33x8192,33x7936,34x7936,32x7680,33x7680"


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        batch, _, length = item.partition("x")
        if not (batch.isdigit() and length.isdigit()):
            raise SystemExit(f"--shapes: expected BATCHxKEYS items such as 32x8192, got {item!r}")
        shapes.append((int(batch), int(length)))
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES,
                        help="BATCHxKEYS items, comma separated (fp8 per-tensor decode)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bf16-reference", default="32x8192",
                        help="the shape also timed with a bf16 cache (the bar's reference)")
    args = parser.parse_args()
    shapes = parse_shapes(args.shapes)
    reference = tuple(parse_shapes(args.bf16_reference))
    if not torch.cuda.is_available():
        raise SystemExit("wave_probe.py times CUDA graphs: it needs a CUDA GPU")
    timer = GraphTimer()
    runs: dict[str, list[float]] = {}
    print(torch.cuda.get_device_name(), flush=True)
    for rnd in range(args.rounds):
        for batch, length in shapes:
            modes = ["fp8_per_tensor"] + (["none"] if (batch, length) in reference else [])
            for mode in modes:
                case = Case(f"decode-{batch}x{length}-{mode}", "decode", [1] * batch,
                            [length] * batch, mode)
                inp = build_inputs(case, num_q_heads=32, num_kv_heads=8, head_size=128,
                                   block_size=16, dtype=torch.bfloat16, device="cuda")

                def call(inp=inp):
                    portattn.attention(inp.q, inp.cache, inp.metadata, out=inp.out,
                                       backend="triton_unified")

                call()
                us = timer(call) * 1e3
                runs.setdefault(case.name, []).append(us)
                print(f"round {rnd} {case.name:<32} {us:7.1f} us", flush=True)
                del inp, call
                torch.cuda.empty_cache()
    for name, times in runs.items():
        print(f"{name:<32} " + " ".join(f"{t:7.1f}" for t in times)
              + f"   min {min(times):7.1f}")


if __name__ == "__main__":
    main()
