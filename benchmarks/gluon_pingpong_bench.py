"""The Gluon prefill with its two consumers issuing matmuls as they please against taking
turns (``gluon_launch.PINGPONG``, FA3's ping-pong), side by side in one process (H200:
sm90). Prints a table and one JSON line.

    PYTHONPATH=src python3 benchmarks/gluon_pingpong_bench.py [--out FILE]

Each case is planned for ``triton_unified`` with ``PORTATTN_GLUON=1`` (the Gluon kernel,
forced) and timed with ``triton.testing.do_bench`` on ``plan.run(q, cache, out=out)``;
the ``PINGPONG`` switch is the only difference between the columns. The outputs must be
bit-identical (the same arithmetic, in another order between the consumers only): the
script checks it. Causal, 32 / 8 heads, bf16, block 16.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

#: (name, query lengths, key lengths, head size, options, quantized)
CASES = [
    ("1x8192 h128", [8192], [8192], 128, {}, False),
    ("4x2048 h128", [2048] * 4, [2048] * 4, 128, {}, False),
    ("1x4096 h128", [4096], [4096], 128, {}, False),
    ("8x1024 h128", [1024] * 8, [1024] * 8, 128, {}, False),
    ("mixed 2048+63x4096 h128", [2048] + [1] * 63, [10240] + [4096] * 63, 128, {}, False),
    ("1x8192 h256", [8192], [8192], 256, {}, False),
    ("4x2048 h256", [2048] * 4, [2048] * 4, 256, {}, False),
    ("4x2048 h64", [2048] * 4, [2048] * 4, 64, {}, False),
    ("1x8192 h128 window 1024", [8192], [8192], 128, dict(sliding_window=1024), False),
    ("1x8192 h128 fp8", [8192], [8192], 128, {}, True),
    ("4x2048 h128 fp8", [2048] * 4, [2048] * 4, 128, {}, True),
]


def _flops(q_lens, k_lens, head):
    """Causal attention FLOPs (QK^T and PV), bottom-right aligned."""
    total = 0
    for q, k in zip(q_lens, k_lens):
        off = k - q
        total += sum(min(k, i + off + 1) for i in range(q))
    return 4.0 * total * head * 32


def main() -> int:
    import triton

    import portattn
    from portattn import KVQuant, settings
    from portattn.kernels import gluon_launch
    from portattn.testing import make_paged_batch

    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    args = parser.parse_args()
    grids = [False, True]
    os.environ["PORTATTN_GLUON"] = "1"
    settings.reload()
    print(f"GPU {torch.cuda.get_device_name()}  causal, 32/8 heads, bf16, block 16; us "
          f"(TFLOP/s): ping-pong {grids}")
    rows = []
    for name, q_lens, k_lens, head, opts, quant in CASES:
        kvq = KVQuant.fp8_per_tensor(0.02, 0.02) if quant else None
        batch = make_paged_batch(q_lens, k_lens, num_q_heads=32, num_kv_heads=8,
                                 head_size=head, block_size=16, dtype=torch.bfloat16,
                                 device="cuda", quant=kvq, poison=False)
        plan = portattn.plan(batch.metadata, num_q_heads=32, dtype=torch.bfloat16,
                             cache=batch.cache, backend="triton_unified", **opts)
        flops = _flops(q_lens, k_lens, head)
        times, outs = [], []
        for pingpong in grids:
            gluon_launch.PINGPONG = pingpong
            out = torch.full_like(batch.q, float("nan"))
            plan.run(batch.q, batch.cache, out=out)
            torch.cuda.synchronize()
            outs.append(out.clone())
            ms = triton.testing.do_bench(lambda: plan.run(batch.q, batch.cache, out=out),
                                         warmup=50, rep=300)
            times.append(ms * 1000.0)
        same = all(torch.equal(outs[0], o) for o in outs[1:])
        finite = bool(torch.isfinite(outs[0]).all())
        row = dict(case=name, variant=plan.variant, us={str(g): round(t, 1)
                                                         for g, t in zip(grids, times)},
                   tflops={str(g): round(flops / t / 1e6, 1) for g, t in zip(grids, times)},
                   bit_identical=same, finite=finite)
        rows.append(row)
        cols = "  ".join(f"{t:8.1f} ({flops / t / 1e6:5.1f})" for t in times)
        print(f"{name:28s} {cols}  x{times[0] / min(times[1:]):.3f}  "
              f"identical={same} finite={finite}", flush=True)
    gluon_launch.PINGPONG = True
    line = json.dumps({"gpu": torch.cuda.get_device_name(), "grids": grids, "rows": rows})
    print(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")
    return 0 if all(r["bit_identical"] and r["finite"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
