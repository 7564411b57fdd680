"""The tile sweep (``--sweep``: many launch configs of our kernel per case) and the
compile-only prewarm (``--compile-only``: every config run once to fill Triton's cache).
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import torch

from portattn.bench.cases import Case, Inputs, build_inputs, cache_dtype
from portattn.bench.peers import ours
from portattn.bench.report import _error, _flush_print


def sweep_configs(case: Case, shape) -> list[dict]:
    """Launch configs worth timing for one case (see benchmarks/NOTES.md)."""
    from portattn.kernels.heuristics import TileConfig, decode_config, plan_launch, prefill_config

    configs = []
    if case.kind in ("decode", "spec"):
        base = TileConfig(**plan_launch(shape, mode="decode", segments=1)["short"])
        tiles: list[tuple[int, int, int, int | None]] = [
            (64, 4, 3, None), (64, 8, 3, None), (64, 4, 2, None), (64, 2, 2, None),
            (128, 4, 3, None), (128, 8, 3, None), (128, 4, 2, None), (256, 8, 2, None),
            (256, 4, 2, None)]
        if base.maxnreg:  # the plan's register cap on its own tile (and above: without)
            tiles.append((base.block_n, base.num_warps, base.num_stages, base.maxnreg))
        # programs: (sequence, kv head) pairs, or head groups of the plan's tile_heads
        programs = case.num_seqs * shape.num_kv_heads // base.tile_heads
        seg_options = _segment_options(programs, shape.sm_count)
        for bn, w, st, cap in tiles:
            for seg in seg_options:
                tile = dataclasses.replace(base, block_n=bn, num_warps=w, num_stages=st,
                                           segments=seg, maxnreg=cap)
                # through plan_launch: the plan's own switches (kv_bits) with these tiles
                configs.append(plan_launch(shape, mode="decode", short=tile))
        if base.tile_heads > 1:  # and the paired tile a program per kv head replaced
            per_head = dataclasses.replace(base, block_q=base.block_m // shape.group,
                                           tile_heads=1)
            for seg in _segment_options(case.num_seqs * shape.num_kv_heads, shape.sm_count):
                configs.append(plan_launch(shape, mode="decode",
                                           short=dataclasses.replace(per_head, segments=seg)))
        if base.maxnreg:  # and the byte-wise V read the paired tile replaced
            plain = dataclasses.replace(base, maxnreg=None)
            for seg in seg_options:
                params = plan_launch(shape, mode="decode",
                                     short=dataclasses.replace(plain, segments=seg))
                params.pop("v_pairs", None)
                configs.append(params)
    elif case.kind == "prefill":
        base = prefill_config(shape)
        for bm, bn, w, st in [(128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 3),
                              (128, 128, 8, 2), (64, 128, 4, 3), (128, 32, 4, 4),
                              (256, 64, 8, 2), (256, 128, 8, 2)]:
            tile = TileConfig(bm, bm // shape.group, bn, w, st)
            configs.append({"mode": "prefill", "long": tile.as_dict()})
        if case.num_seqs > 1:
            configs.append({"mode": "mixed", "short": decode_config(shape, 1, case.num_seqs)
                            .as_dict(), "long": base.as_dict()})
    elif case.kind == "mixed":
        short = decode_config(shape, 1, case.num_seqs, 1)
        for bm, bn, w, st in [(128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3)]:
            long = TileConfig(bm, bm // shape.group, bn, w, st)
            for seg in (1, 2):
                configs.append({"mode": "mixed",
                                "short": dataclasses.replace(short, segments=seg).as_dict(),
                                "long": long.as_dict()})
    return configs


def _segment_options(programs: int, sm_count: int) -> list[int]:
    """Segment counts worth timing for ``programs`` (unsplit) programs: from about half
    an SM's worth of programs to four per SM."""
    return [s for s in (1, 2, 4, 8, 16, 32, 64)
            if programs * s <= 4 * sm_count and programs * s * 4 >= sm_count // 2] or [1]


def timed_configs(case: Case, shape, dtype: torch.dtype, device: str, caps) -> list[dict]:
    """The configs the sweep times for ``case`` (so also those the prewarm compiles):
    :func:`sweep_configs` with the backend's own byte-decode choice (``kv_bits``: fp8
    caches before sm89) in every one."""
    from portattn.backends.triton_unified import fp8_bytes_format

    kv_bits = fp8_bytes_format(cache_dtype(case, dtype), torch.device(device).type, caps)
    configs = sweep_configs(case, shape)
    return [dict(params, kv_bits=kv_bits) for params in configs] if kv_bits else configs


def compile_only(cases: list[Case], args, caps, shard: int, shards: int) -> int:
    """Run every distinct kernel config once (shard ``shard`` of ``shards``), filling
    Triton's disk cache so the timed run does not compile. Lengths may be shrunk: the
    compiled variants depend on head counts, sizes and strides, not on lengths."""
    from portattn.kernels.heuristics import Shape, quant_mode
    from portattn.kernels.launch import launch_unified
    from portattn.options import normalize_options

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    seen, work = set(), []
    for case in cases:
        elem = 1 if case.kv_quant != "none" else torch.empty((), dtype=dtype).element_size()
        shape = Shape(args.num_q_heads, args.num_kv_heads, case.head_size_qk or args.head_size,
                      elem, max(case.query_lens), max(case.seq_lens), case.num_seqs,
                      caps.sm_count, caps.arch, case.head_size_v,
                      quant_mode(case.kv_quant))
        items = [None] + (timed_configs(case, shape, dtype, args.device, caps)
                          if args.sweep else [])
        for params in items:
            key = (case.num_seqs == 1, case.kv_quant, case.fp8_format, case.head_size_v,
                   json.dumps(params, sort_keys=True) if params else case.name)
            if key not in seen:
                seen.add(key)
                work.append((case, params))
    mine = work[shard::shards]
    t0 = time.time()
    for case in cases:
        todo = [p for c, p in mine if c is case]
        if not todo:
            continue
        inp = build_inputs(case, num_q_heads=args.num_q_heads,
                           num_kv_heads=args.num_kv_heads, head_size=args.head_size,
                           block_size=args.block_size, dtype=dtype, device=args.device)
        options = normalize_options(inp.q, inp.cache)
        for params in todo:
            try:
                if params is None:
                    ours(inp)()
                else:
                    launch_unified(inp.q, inp.cache, inp.metadata, options, inp.out, params)
            except Exception as exc:
                _flush_print(f"compile {case.name} {params}: {_error(exc)}")
        del inp
    if args.device == "cuda":
        torch.cuda.synchronize()
    _flush_print(f"shard {shard}/{shards}: {len(mine)} of {len(work)} configs "
                 f"({time.time() - t0:.1f}s)")
    return 0


def inputs_shape(case: Case, inp: Inputs, caps):
    """The heuristics' ``Shape`` of the case's built inputs on ``caps``' GPU."""
    from portattn.kernels.heuristics import Shape, quant_mode

    return Shape(inp.q.shape[1], inp.cache.num_kv_heads, inp.q.shape[2],
                 inp.cache.key_cache.element_size(), max(case.query_lens),
                 max(case.seq_lens), case.num_seqs, caps.sm_count, caps.arch,
                 inp.cache.head_size_v, quant_mode(case.kv_quant))


def run_sweep(case: Case, inp: Inputs, bench, caps) -> list[dict]:
    from portattn.kernels.launch import launch_unified
    from portattn.options import normalize_options

    options = normalize_options(inp.q, inp.cache)
    shape = inputs_shape(case, inp, caps)
    rows = []
    for params in timed_configs(case, shape, inp.q.dtype, inp.q.device.type, caps):
        record: dict[str, Any] = {"params": params}
        try:
            ms = bench(lambda p=params: launch_unified(inp.q, inp.cache, inp.metadata,
                                                       options, inp.out, p))
            record["ms"] = ms
        except Exception as exc:  # out of resources, ...
            record["error"] = _error(exc)
        rows.append(record)
        _flush_print(f"  sweep {case.name}: {_describe_params(params)} -> "
                     f"{record.get('ms', record.get('error'))}")
    return rows


def _describe_params(params: dict) -> str:
    bits = [params["mode"]]
    for key in ("short", "long"):
        if key in params:
            c = params[key]
            bits.append(f"{key}:m{c['block_m']}n{c['block_n']}w{c['num_warps']}"
                        f"s{c['num_stages']}x{c['segments']}")
    return " ".join(bits)
