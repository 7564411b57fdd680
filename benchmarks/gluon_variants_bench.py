"""Versions of the Gluon prefill kernel side by side in one process (H200: sm90), each
launched directly (Triton's JIT, never a plan's recorded relaunch), in interleaved
rounds. Prints a table and one JSON line.

    PYTHONPATH=src python3 benchmarks/gluon_variants_bench.py \\
        --variant base=path/to/gluon_prefill.py \\
        --variant new=src/portattn/kernels/gluon_prefill.py \\
        [--variant persistent=path.py:per_sm=1] [--variant pp=path.py:PINGPONG=True] \\
        [--replay-check] [--out FILE]

A variant is ``name=path`` of a module defining ``gluon_prefill_kernel`` with the
package kernel's arguments, plus ``:key=value`` items: ``per_sm=N`` launches a
persistent grid of N programs per SM (a kernel that loops over units), any other key is
an extra constexpr. The first variant is the reference: every other one's output must be
bit-identical to it (the variants change the schedule, not the arithmetic). Causal, 32 /
8 heads, bf16, block 16; ``do_bench`` times per round, the median of the rounds kept.

Why direct launches: ``plan.run`` replays the launch it recorded on its first call (the
compiled kernel and the grid, :mod:`portattn.kernels.fast_launch`), so changing a
module-level switch of ``gluon_launch`` after that call changes nothing that runs.
``--replay-check`` shows it: one plan timed with the first variant's kernel patched in,
then with the second's; both times are the first variant's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics

import torch

#: (name, query lengths, key lengths, head size, options)
CASES = [
    ("1x8192 h128", [8192], [8192], 128, {}),
    ("4x2048 h128", [2048] * 4, [2048] * 4, 128, {}),
    ("1x4096 h128", [4096], [4096], 128, {}),
    ("8x1024 h128", [1024] * 8, [1024] * 8, 128, {}),
    ("mixed 2048+63x4096 h128 (long part)", [2048] + [1] * 63, [10240] + [4096] * 63, 128,
     {}),
    ("mixed 1024+255x2048 h128 (long part)", [1024] + [1] * 255, [4096] + [2048] * 255, 128,
     {}),
    ("4x2048 h256", [2048] * 4, [2048] * 4, 256, {}),
    ("1x4096 h256", [4096], [4096], 256, {}),
    ("4x2048 h64", [2048] * 4, [2048] * 4, 64, {}),
    ("1x8192 h128 window 1024", [8192], [8192], 128, dict(sliding_window=1024)),
]
MIN_Q = 512


def _flops(q_lens, k_lens, head, window=None):
    """Attention FLOPs (QK^T and PV) of the sequences with >= MIN_Q queries, causal,
    bottom-right aligned."""
    total = 0
    for q, k in zip(q_lens, k_lens):
        if q < MIN_Q:
            continue
        off = k - q
        for i in range(q):
            hi = min(k, i + off + 1)
            lo = 0 if window is None else max(0, i + off + 1 - window)
            total += hi - lo
    return 4.0 * total * head * 32


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(f"gluon_variant_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.gluon_prefill_kernel


class Variant:
    """A kernel with its grid rule and extra constexprs, standing in for
    ``gluon_launch._kernel()``: ``variant[grid](*args, **kwargs)``."""

    def __init__(self, spec: str, sm_count: int):
        name, _, rest = spec.partition("=")
        path, *items = rest.split(":")
        self.name, self.path = name, path
        from portattn.kernels.fast_launch import capturable

        # recorded by a plan's first call as the package kernel is (--replay-check)
        self.kernel = capturable(_load(name, path))
        self.per_sm = 0
        self.extra = {}
        for item in items:
            key, _, value = item.partition("=")
            if key == "per_sm":
                self.per_sm = int(value)
            else:
                self.extra[key] = eval(value)  # constexpr literals: True, 1, ...
        self.sm_count = sm_count

    #: (num_tokens, num_seqs, num_q_heads) of the call being launched (set by the bench)
    call: tuple = (0, 0, 0)

    def __getitem__(self, grid):
        programs = grid[0]
        names = self.kernel.fn.arg_names
        legacy = "LONG_TILES" not in names  # a version before the switch: its own grid
        if legacy:
            num_tokens, num_seqs, heads = Variant.call
            programs = (num_tokens // 128 + num_seqs) * heads
        if self.per_sm:
            programs = max(1, min(programs, self.per_sm * self.sm_count))

        def launch(*args, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k in names or k == "num_warps"}
            if "num_tokens" not in names:  # before session 41's span bound: no num_tokens,
                args = args[:13] + args[14:]  # the 14th argument now
            if legacy:  # num_tiles, the 14th argument: every sequence's tiles
                num_tokens, num_seqs, _ = Variant.call
                args = args[:13] + (num_tokens // 128 + num_seqs,) + args[14:]
            return self.kernel[(programs,)](*args, **{**kwargs, **self.extra})
        return launch


def main() -> int:
    import triton

    from portattn.kernels import gluon_launch
    from portattn.options import normalize_options
    from portattn.testing import make_paged_batch

    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", action="append", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", help="comma list of case-name prefixes")
    parser.add_argument("--replay-check", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    variants = [Variant(v, sm_count) for v in args.variant]
    names = [v.name for v in variants]
    print(f"GPU {torch.cuda.get_device_name()}  causal, 32/8 heads, bf16, block 16; us "
          f"(TFLOP/s), median of {args.rounds} interleaved rounds: {names}", flush=True)
    rows = []
    cases = CASES
    if args.cases:
        wanted = args.cases.split(",")
        cases = [c for c in CASES if any(c[0].startswith(w) for w in wanted)]
    for name, q_lens, k_lens, head, opts in cases:
        batch = make_paged_batch(q_lens, k_lens, num_q_heads=32, num_kv_heads=8,
                                 head_size=head, block_size=16, dtype=torch.bfloat16,
                                 device="cuda", poison=False)
        options = normalize_options(batch.q, batch.cache, **opts)
        flops = _flops(q_lens, k_lens, head, opts.get("sliding_window"))
        outs, times = {}, {n: [] for n in names}

        Variant.call = (batch.q.shape[0], len(q_lens), 32)

        def run(variant, out):
            gluon_launch._kernel = lambda: variant
            gluon_launch.launch_gluon_prefill(batch.q, batch.cache, batch.metadata, options,
                                              out, MIN_Q)

        for variant in variants:
            out = torch.full_like(batch.q, float("nan"))
            run(variant, out)
            torch.cuda.synchronize()
            outs[variant.name] = out
        for _ in range(args.rounds):
            for variant in variants:
                out = outs[variant.name]
                ms = triton.testing.do_bench(lambda: run(variant, out), warmup=25, rep=200)
                times[variant.name].append(ms * 1000.0)
        ref = outs[names[0]]
        long_rows = torch.zeros(batch.q.shape[0], dtype=torch.bool, device="cuda")
        starts = batch.metadata.cu_seqlens_q.tolist()
        for b, q in enumerate(q_lens):
            if q >= MIN_Q:
                long_rows[starts[b]:starts[b + 1]] = True
        identical = {n: bool(torch.equal(outs[n][long_rows], ref[long_rows])) for n in names}
        finite = bool(torch.isfinite(ref[long_rows]).all())
        med = {n: statistics.median(times[n]) for n in names}
        row = dict(case=name, us={n: round(med[n], 1) for n in names},
                   rounds={n: [round(t, 1) for t in times[n]] for n in names},
                   tflops={n: round(flops / med[n] / 1e6, 1) for n in names},
                   vs_first={n: round(med[names[0]] / med[n], 3) for n in names},
                   bit_identical=identical, finite=finite)
        rows.append(row)
        cols = "  ".join(f"{med[n]:8.1f} ({flops / med[n] / 1e6:5.1f}) "
                         f"x{med[names[0]] / med[n]:.3f}" for n in names)
        print(f"{name:38s} {cols}  identical={all(identical.values())} finite={finite}",
              flush=True)
    result = {"gpu": torch.cuda.get_device_name(), "variants": {v.name: {
        "path": v.path, "per_sm": v.per_sm, "extra": v.extra} for v in variants},
        "rows": rows}
    if args.replay_check and len(variants) > 1:
        result["replay_check"] = _replay_check(variants[:2])
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")
    return 0 if all(all(r["bit_identical"].values()) and r["finite"] for r in rows) else 1


def _replay_check(variants) -> dict:
    """One plan (4 x 2048, the Gluon prefill forced) timed through ``plan.run`` with the
    first variant patched in, then the second; and each variant launched directly."""
    import triton

    import portattn
    from portattn import planning, settings
    from portattn.kernels import gluon_launch
    from portattn.options import normalize_options
    from portattn.testing import make_paged_batch

    os.environ["PORTATTN_GLUON"] = "1"
    settings.reload()
    planning.clear()
    batch = make_paged_batch([2048] * 4, [2048] * 4, num_q_heads=32, num_kv_heads=8,
                             head_size=128, block_size=16, dtype=torch.bfloat16,
                             device="cuda", poison=False)
    plan = portattn.plan(batch.metadata, num_q_heads=32, dtype=torch.bfloat16,
                         cache=batch.cache, backend="triton_unified")
    out = torch.empty_like(batch.q)
    options = normalize_options(batch.q, batch.cache)
    result = {"variant": plan.variant}
    Variant.call = (batch.q.shape[0], 4, 32)
    for variant in variants:
        gluon_launch._kernel = lambda: variant
        plan.run(batch.q, batch.cache, out=out)
        result[f"plan_run_{variant.name}_us"] = round(1000 * triton.testing.do_bench(
            lambda: plan.run(batch.q, batch.cache, out=out), warmup=25, rep=200), 1)
        result[f"direct_{variant.name}_us"] = round(1000 * triton.testing.do_bench(
            lambda: gluon_launch.launch_gluon_prefill(batch.q, batch.cache, batch.metadata,
                                                      options, out, MIN_Q),
            warmup=25, rep=200), 1)
    print("replay check (4x2048 h128):", result, flush=True)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
