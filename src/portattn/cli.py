"""The ``portattn`` command: ``demo``, ``report``, ``explain``, ``bench``.

Every subcommand imports what it needs when it runs, so ``portattn --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def _demo(args: argparse.Namespace) -> int:
    import torch

    import portattn
    from portattn.testing import dense_attention, make_paged_batch, relative_error

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        kind = None
    if kind not in ("cuda", "cpu"):
        raise portattn.InputError("--device", "cuda, cuda:N or cpu", repr(device))
    if kind == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {device}: this torch sees no CUDA/ROCm GPU", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype) if args.dtype else \
        (torch.bfloat16 if kind != "cpu" else torch.float32)
    gen = torch.Generator().manual_seed(args.seed)
    # A mixed batch: two prefill chunks over cached context, decodes, a spec-decode row.
    query_lens = [37, 64, 1, 1, 1, 4, 1, 1]
    seq_lens = [301, 64, 517, 33, 250, 120, 1, 777]
    batch = make_paged_batch(query_lens, seq_lens, num_q_heads=8, num_kv_heads=2,
                             head_size=64, block_size=16, dtype=dtype, device=device,
                             generator=gen)
    options: dict[str, Any] = dict(causal=True)
    decision = portattn.explain(batch.q, batch.cache, batch.metadata, backend=args.backend,
                                **options)
    out = portattn.attention(batch.q, batch.cache, batch.metadata, backend=args.backend,
                             **options)
    expected = dense_attention(batch.q, batch.keys, batch.values, query_lens, **options)
    error = relative_error(out, expected)
    tolerance = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    caps = portattn.probe(device=batch.q.device)
    where = caps.device_name if caps.profile is None else \
        f"{caps.device_name}, simulated profile {caps.profile}"
    print(f"portattn demo on {device} ({where})")
    print(f"batch: {len(seq_lens)} sequences, query lengths {query_lens}, key lengths "
          f"{seq_lens}, 8 q heads / 2 kv heads of 64, block size 16 (shuffled blocks), "
          f"{str(dtype).replace('torch.', '')}")
    print(f"backend: {decision.backend} ({decision.source}), variant: "
          f"{decision.plan.describe()}")
    for name, reasons in decision.considered:
        if name != decision.backend:
            print(f"  not {name}: {'; '.join(reasons) or decision.could_serve()}")
    print(f"relative error vs dense float64 attention on the unpaged K/V: {error:.2e} "
          f"(tolerance {tolerance:.0e})")
    ok = error <= tolerance
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


def _report(args: argparse.Namespace) -> int:
    from portattn.capabilities import probe
    from portattn.capabilities.report import collect_report, render_report
    from portattn.dispatch.routing import backend_availability, routing_table

    caps = probe(simulate=args.simulate, refresh=args.refresh)
    report = collect_report(caps, extra_sections={"backends": backend_availability(caps),
                                                  "routing": routing_table(caps)})
    print(json.dumps(report, indent=2) if args.json else render_report(report))
    return 0


def _explain(args: argparse.Namespace) -> int:
    from portattn.capabilities import probe
    from portattn.dispatch.problem import Problem
    from portattn.dispatch.selector import decide, with_notes
    from portattn.errors import InputError, UnsupportedError

    _check_explain_arguments(args)
    caps = probe(simulate=args.simulate)
    if args.device == "cuda" and caps.device_type != "cuda":
        where = "this machine (its probe found no CUDA/ROCm GPU)" if caps.profile is None \
            else f"the simulated profile {caps.profile}"
        raise InputError("--device", f"cpu on {where}: --simulate a GPU profile (sm90, "
                         "gfx942, ...) to explain a GPU call", "cuda")
    problem = Problem.make(
        num_q_heads=args.heads, num_kv_heads=args.kv_heads, head_size=args.head_size,
        head_size_v=args.head_size_v, block_size=args.block_size, dtype=args.dtype,
        kv_quant=args.kv_quant, out_dtype=args.out_dtype,
        device_type=args.device or caps.device_type, query_len=args.query_len,
        seq_len=args.seq_len, num_seqs=args.num_seqs, causal=not args.non_causal,
        sliding_window=args.window, softcap=args.softcap, alibi=args.alibi,
        sinks=args.sinks)
    try:
        decision = with_notes(decide(problem, caps, args.backend, log=False))  # printed
    except UnsupportedError as exc:
        if args.json:
            print(json.dumps({"error": str(exc).splitlines()[0], "reasons": exc.reasons},
                             indent=2))
        else:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(decision.to_dict(), indent=2) if args.json else str(decision))
    return 0


def _check_explain_arguments(args: argparse.Namespace) -> None:
    """``InputError`` naming the flag for what :func:`portattn.attention` would reject."""
    from portattn.dispatch.problem import DTYPES_BY_NAME
    from portattn.errors import InputError
    from portattn.types import FLOAT_DTYPES, FP8_DTYPES, INT32_MAX, KVQuant

    for flag, value in (("--heads", args.heads), ("--kv-heads", args.kv_heads),
                        ("--head-size", args.head_size), ("--head-size-v", args.head_size_v),
                        ("--block-size", args.block_size), ("--query-len", args.query_len),
                        ("--seq-len", args.seq_len), ("--num-seqs", args.num_seqs)):
        if value is not None and not 1 <= value <= INT32_MAX:
            raise InputError(flag, f"an int in [1, {INT32_MAX}] (int32 metadata)", str(value))
    if args.heads % args.kv_heads:
        raise InputError("--heads", f"a multiple of --kv-heads ({args.kv_heads})",
                         str(args.heads))
    if args.query_len > args.seq_len:
        raise InputError("--query-len", f"at most --seq-len ({args.seq_len}): the keys "
                         "include this step's tokens", str(args.query_len))
    allowed = FLOAT_DTYPES + FP8_DTYPES
    names = ", ".join(name for name, dtype in DTYPES_BY_NAME.items() if dtype in allowed)
    for flag, value in (("--dtype", args.dtype), ("--out-dtype", args.out_dtype)):
        if value is not None and DTYPES_BY_NAME.get(value) not in allowed:
            raise InputError(flag, f"one of {names}", repr(value))
    mode, colon, fmt = args.kv_quant.partition(":")
    if mode not in KVQuant.MODES or (colon and (not mode.startswith("fp8") or
                                               fmt not in ("e4m3fn", "e5m2"))):
        raise InputError("--kv-quant", "none, fp8_per_tensor[:e4m3fn|:e5m2], "
                         "int8_per_token_head or fp8_per_token_head[:e4m3fn|:e5m2]",
                         repr(args.kv_quant))
    if args.alibi == "sqrt" and args.non_causal:
        raise InputError("--alibi", "none or linear with --non-causal (sqrt(p - k) is "
                         "undefined for keys after the query)", "sqrt")


def _bench(argv: list[str]) -> int:
    from portattn import bench

    return bench.main(argv)


def build_parser() -> argparse.ArgumentParser:
    from portattn.settings import help_text

    epilog = help_text()
    parser = argparse.ArgumentParser(
        prog="portattn", description="One paged-attention call that runs well on any GPU.",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run attention on a random paged batch and check it")
    demo.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    demo.add_argument("--dtype", choices=["float16", "bfloat16", "float32"])
    demo.add_argument("--backend", help="force a backend by name")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    report = sub.add_parser("report", help="capabilities, backends and routing of this "
                                           "machine", epilog=epilog,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_argument("--json", action="store_true", help="one JSON document (schema in "
                                                            "the README)")
    report.add_argument("--simulate", help="a simulated profile instead of this machine "
                                           "(sm80, sm90, gfx942, ...; default: "
                                           "$PORTATTN_SIMULATE)")
    report.add_argument("--refresh", action="store_true", help="probe again, ignoring caches")
    report.set_defaults(func=_report)

    explain = sub.add_parser("explain", help="which backend serves a problem, and why not "
                                             "the others (no tensors needed)")
    explain.add_argument("--heads", type=int, default=32, help="query heads")
    explain.add_argument("--kv-heads", type=int, default=8, help="KV heads")
    explain.add_argument("--head-size", type=int, default=128, help="query/key head size")
    explain.add_argument("--head-size-v", type=int, help="value head size (DiffKV)")
    explain.add_argument("--block-size", type=int, default=16, help="tokens per cache block")
    explain.add_argument("--dtype", default="bfloat16", help="q's dtype: float16, bfloat16, "
                         "float32, float8_e4m3fn or float8_e5m2 (default bfloat16)")
    explain.add_argument("--out-dtype", help="the result's dtype (default: attention's)")
    explain.add_argument("--kv-quant", default="none", help="none, fp8_per_tensor[:e4m3fn|"
                         ":e5m2], int8_per_token_head, fp8_per_token_head[:e4m3fn|:e5m2]")
    explain.add_argument("--query-len", type=int, default=1, help="max query tokens per "
                                                                  "sequence (1 = decode)")
    explain.add_argument("--seq-len", type=int, default=8192, help="max keys per sequence")
    explain.add_argument("--num-seqs", type=int, default=1, help="sequences in the batch")
    explain.add_argument("--non-causal", action="store_true", help="causal=False")
    explain.add_argument("--window", action="store_true", help="sliding window")
    explain.add_argument("--softcap", action="store_true", help="logit softcap")
    explain.add_argument("--alibi", choices=["none", "linear", "sqrt"], default="none")
    explain.add_argument("--sinks", action="store_true", help="attention sinks")
    explain.add_argument("--device", choices=["cuda", "cpu"],
                         help="the tensors' device type (default: the probed device's)")
    explain.add_argument("--backend", help="force a backend by name")
    explain.add_argument("--simulate", help="a simulated profile (sm80, sm90, gfx942, ...; "
                         "default: $PORTATTN_SIMULATE)")
    explain.add_argument("--json", action="store_true", help="the decision as JSON")
    explain.set_defaults(func=_explain)

    sub.add_parser("bench", help="benchmark against peers and the copy-bandwidth ceiling "
                                 "(portattn bench --help)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)
    from portattn.errors import InputError, UnsupportedError

    try:
        if (getattr(args, "simulate", None) or "").strip():  # named as the flag
            from portattn.capabilities.profiles import parse_profile_name

            parse_profile_name(args.simulate, "--simulate")
        return args.func(args)
    except (InputError, UnsupportedError) as exc:  # bad arguments, or nothing serves them
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `portattn report | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
