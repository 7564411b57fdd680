"""``portattn bench``: our kernels against the peers and the hardware ceilings, one run.

The command line (:func:`main`): parse the arguments, pick the cases, time each and
write the JSON, the PNG and the table. The first line above is ``--help``'s description.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

from portattn.bench.cases import case_tags, default_cases
from portattn.bench.report import _flush_print, add_plain_ratios, format_table, plot
from portattn.bench.runner import run_case
from portattn.bench.sweep import compile_only
from portattn.bench.timing import L2_FLUSHES, GraphTimer, measure_ceilings, timer


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}")
    return value


def _shard(text: str) -> tuple[int, int]:
    index, sep, count = text.partition("/")
    if sep and index.isdigit() and count.isdigit() and 0 <= int(index) < int(count):
        return int(index), int(count)
    raise argparse.ArgumentTypeError(f"expected i/n with 0 <= i < n, got {text!r}")


def _selectors(case) -> set[str]:
    """The words of ``--cases`` that select ``case``: its name, kind and tags."""
    return {case.name, case.kind, *case_tags(case)}


def _check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``parser.error`` (exit 2, the flag named) for what would fail later, mid-run."""
    if args.num_q_heads % args.num_kv_heads:
        parser.error(f"argument --num-q-heads: expected a multiple of --num-kv-heads "
                     f"({args.num_kv_heads}), got {args.num_q_heads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda, but this torch sees no CUDA/ROCm GPU")
    if args.shard != (0, 1) and not args.compile_only:
        parser.error("argument --shard: only with --compile-only (it splits the kernel "
                     "configs to compile, not the timed cases)")
    known = {"all"}.union(*(_selectors(c) for c in default_cases()))
    unknown = [w for w in args.cases.split(",") if w not in known]
    if unknown:
        parser.error(f"argument --cases: unknown {', '.join(map(repr, unknown))} (known: "
                     f"{', '.join(sorted(known))})")


def _check_output(parser: argparse.ArgumentParser, args: argparse.Namespace,
                  json_path: str) -> None:
    """``parser.error`` unless ``--out`` is (or is made) a folder and ``json_path`` (there,
    with ``--prefix``) can be written: both failed only after every case was timed."""
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"argument --out: expected a folder, got the file {args.out!r}")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as exc:
        parser.error(f"argument --out: cannot make the folder {args.out!r} ({exc.strerror})")
    existed = os.path.exists(json_path)
    try:
        with open(json_path, "a"):
            pass
    except OSError as exc:
        parser.error(f"argument --prefix: cannot write {json_path!r} ({exc.strerror})")
    if not existed:
        os.remove(json_path)


def _default_prefix(gpu: str, date: str) -> str:
    """``<gpu>-<date>-bench`` (``h100-2025-01-31-bench``): a run per GPU and day."""
    short_gpu = gpu.replace("NVIDIA ", "").split()[0].lower() if gpu != "cpu" else "cpu"
    return f"{short_gpu}-{date}-bench"


def _write_json(report: dict, path: str) -> None:
    """The report so far (rewritten after each case: a crash keeps what was timed)."""
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="portattn bench", description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="all",
                        help="comma list of case names, kinds (decode, prefill, mixed, spec) "
                        "or tags (plain, quant, diffkv, decode-plain, ...); default all")
    parser.add_argument("--sweep", action="store_true", help="also time many launch configs")
    parser.add_argument("--out", default="benchmarks/results",
                        help="folder for JSON/PNG (made if missing)")
    parser.add_argument("--prefix", default=None, help="file name prefix (default gpu-date)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--num-q-heads", type=_positive_int, default=32)
    parser.add_argument("--num-kv-heads", type=_positive_int, default=8)
    parser.add_argument("--head-size", type=_positive_int, default=128)
    parser.add_argument("--block-size", type=_positive_int, default=16)
    parser.add_argument("--rep", type=_positive_int, default=100, help="do_bench rep in ms")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--l2-flush", choices=L2_FLUSHES, default="zero",
                        help="how the kernel-only (CUDA graph) timings evict the L2 before "
                        "each call: zero (default; do_bench's way, as the eager column: the "
                        "call also pays the write-back of the dirty lines) or read (L2 left "
                        "clean)")
    parser.add_argument("--compile-only", action="store_true",
                        help="only run each kernel config once (fills Triton's disk cache; "
                        "use with --shrink 4 and --shard to compile in parallel)")
    parser.add_argument("--shard", type=_shard, default=(0, 1),
                        help="i/n, with --compile-only: compile every n-th kernel config "
                        "from the i-th (parallel compiles)")
    parser.add_argument("--shrink", type=_positive_int, default=1,
                        help="divide sequence lengths (smoke tests on the interpreter)")
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda when available")
    args = parser.parse_args(argv)
    _check_arguments(parser, args)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    date = datetime.date.today().isoformat()
    prefix = args.prefix or _default_prefix(gpu, date)
    json_path = os.path.join(args.out, prefix + ".json")
    if not args.compile_only:  # it writes no report
        _check_output(parser, args, json_path)
    if args.device == "cpu" and args.shrink == 1 and not args.compile_only:
        print("portattn bench: no GPU: on the CPU a run checks the harness, it measures "
              "nothing, and full-size cases take minutes each; TRITON_INTERPRET=1 with "
              "--shrink 64 --cases decode-1x8192 makes it short", file=sys.stderr,
              flush=True)

    from portattn.capabilities import probe

    caps = probe()
    if not caps.triton_kernels.ok:  # the bench times our Triton kernels above all
        print(f"portattn bench: our Triton kernels cannot run here: "
              f"{caps.triton_kernels.reason} (portattn report says more)", file=sys.stderr)
        return 2
    bench = timer(args.device, args.rep)
    wanted = set(args.cases.split(","))
    cases = [c for c in default_cases(args.shrink) if "all" in wanted or wanted & _selectors(c)]
    shard, shards = args.shard
    if args.compile_only:
        return compile_only(cases, args, caps, shard, shards)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    args.graph_timer = GraphTimer(flush=args.l2_flush) if args.device == "cuda" else None
    report = {"gpu": gpu, "date": date,
              "torch": torch.__version__, "triton": triton_version,
              "sm_count": caps.sm_count, "dtype": args.dtype,
              "heads": [args.num_q_heads, args.num_kv_heads], "head_size": args.head_size,
              "block_size": args.block_size, "l2_flush": args.l2_flush,
              "ceilings": measure_ceilings(args.device, bench),
              "cases": []}
    _flush_print(f"ceilings: {report['ceilings']}")
    for case in cases:
        t0 = time.time()
        result = run_case(case, args, bench, caps, report["ceilings"])
        report["cases"].append(result)
        _write_json(report, json_path)
        o = result["impls"].get("ours", {})
        _flush_print(f"{case.name}: ours {o.get('ms', o.get('error'))} ms, "
                     f"vs {result.get('speed_vs')}, plan {result['plan']} "
                     f"({time.time() - t0:.1f}s)")
    add_plain_ratios(report)
    _write_json(report, json_path)
    note = plot(report, os.path.join(args.out, prefix + ".png"))
    if note:
        _flush_print(note)
    _flush_print(format_table(report))
    return 0
