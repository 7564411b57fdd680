"""The Gluon prefill against the staged unified kernel it replaces, per score feature and
8-bit cache, side by side in one process (H200: sm90). Prints a table and one JSON line.

    PYTHONPATH=src python3 benchmarks/gluon_features_bench.py [--out FILE]

Each case is planned for ``triton_unified`` (routing would send most of them to
flash-attn where it is installed) twice, ``PORTATTN_GLUON=0`` (the staged unified
kernel) and ``1`` (the Gluon kernel, forced: auto may keep a class staged), and timed with
``triton.testing.do_bench`` on ``plan.run(q, cache, out=out)`` (eager: host time is far
below these kernels' time). 1 x 8192 causal prefill, 32 / 8 heads of 128, bf16, block 16.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

FEATURES = {
    "plain": {}, "window 1024": dict(sliding_window=1024), "window 4096":
    dict(sliding_window=4096), "softcap 30": dict(softcap=30.0), "alibi": dict(alibi="linear"),
    "sinks": dict(sinks=True), "all (window 1024)": dict(sliding_window=1024, softcap=30.0,
                                                         alibi="linear", sinks=True),
}


def _time(mode: str, quant, kw: dict, seq: int = 8192) -> tuple[float, str]:
    import triton

    import portattn
    from portattn import settings
    from portattn.testing import make_paged_batch

    os.environ["PORTATTN_GLUON"] = mode
    settings.reload()
    batch = make_paged_batch([seq], [seq], num_q_heads=32, num_kv_heads=8, head_size=128,
                             block_size=16, dtype=torch.bfloat16, device="cuda", quant=quant,
                             poison=False)
    opts = dict(kw)
    call = {}
    if opts.pop("alibi", None):
        call["alibi_slopes"] = torch.linspace(0.01, 0.5, 32, device="cuda")
        opts["alibi"] = "linear"
    if opts.get("sinks"):
        call["sinks"] = torch.randn(32, device="cuda")
    plan = portattn.plan(batch.metadata, num_q_heads=32, dtype=torch.bfloat16,
                         cache=batch.cache, backend="triton_unified", **opts)
    out = torch.empty_like(batch.q)
    ms = triton.testing.do_bench(lambda: plan.run(batch.q, batch.cache, out=out, **call),
                                 warmup=50, rep=300)
    return ms * 1000.0, plan.variant


def main() -> int:
    from portattn import KVQuant

    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = []
    cases = [(name, None, kw) for name, kw in FEATURES.items()]
    cases += [("fp8 per-tensor", KVQuant.fp8_per_tensor(0.02, 0.02), {}),
              ("int8 per-token-head", KVQuant.int8_per_token_head(), {}),
              ("fp8 per-tensor + window 1024", KVQuant.fp8_per_tensor(0.02, 0.02),
               dict(sliding_window=1024))]
    print(f"GPU {torch.cuda.get_device_name()}  1 x 8192 causal, 32/8 x 128, bf16, block 16")
    print(f"{'case':30s} {'staged us':>10s} {'gluon us':>10s} {'staged/gluon':>11s}  gluon variant")
    for name, quant, kw in cases:
        staged, v0 = _time("0", quant, kw)
        auto, v1 = _time("1", quant, kw)
        rows.append(dict(case=name, staged_us=round(staged, 1), gluon_us=round(auto, 1),
                         staged_variant=v0, gluon_variant=v1))
        print(f"{name:30s} {staged:10.1f} {auto:10.1f} {staged / auto:11.2f}  "
              f"{v1.split(' ')[0]}", flush=True)
    line = json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows})
    print(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
