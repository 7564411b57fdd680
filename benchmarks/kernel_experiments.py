"""Side-by-side timings for kernel experiments (benchmarks/NOTES.md), in one run with the
copy ceiling: each case's plan as the heuristics make it ("current") against variants
of its switches and tiles:

* 8-bit caches: the plan (V as int16 pairs, registers capped) against V byte-wise, no
  cap, other segment counts, a lower cap, 3 stages; the e4m3 bytes path of sm80 / sm86;
* small-batch 16-bit decode: segments, register caps, 64-key tiles, the split-KV
  partials merged by the merge kernel instead of in the attention kernel, a workspace
  made once instead of per call (in the graph: no memset of the merge tickets);
* prefill: pointer loads at block 16, descriptor loads at block 128; the bad-block checks
  off; the keys staged into 128-slot 16-bit blocks first (``kernels/stage.py``).

    PYTHONPATH=src python3 benchmarks/kernel_experiments.py [CASE_SUBSTRING | =NAME ...]
    PYTHONPATH=src python3 benchmarks/kernel_experiments.py --compile-only I/N [...]

``--profile`` prints, per (case, variant), each kernel's mean time over 20 calls (torch's
profiler): what staging, the launches over the cache and the merge each cost.
``CURRENT_ONLY=1`` times only the plans as they are; ``EXP_VARIANTS=a,b`` the plans and
the variants named. ``--compile-only I/N`` runs share I
of N of the (case, variant) launches once, untimed: several such processes side by side
fill Triton's disk cache before the timed run.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import triton.testing

from portattn.bench import Case, GraphTimer, build_inputs, case_bytes, case_flops
from portattn.kernels import kv_load as kv_load_rules
from portattn.kernels.heuristics import (
    Shape,
    next_pow2,
    plan_launch,
    quant_mode,
    stage_config,
    staged_long_config,
)
from portattn.kernels.launch import launch_unified, new_workspace
from portattn.options import normalize_options

#: (case, cache block size)
CASES = [
    (Case("decode-32x8192", "decode", [1] * 32, [8192] * 32), 16),
    (Case("decode-32x8192-fp8", "decode", [1] * 32, [8192] * 32, "fp8_per_tensor"), 16),
    (Case("decode-128x8192-fp8", "decode", [1] * 128, [8192] * 128, "fp8_per_tensor"), 16),
    (Case("decode-8x8192-fp8", "decode", [1] * 8, [8192] * 8, "fp8_per_tensor"), 16),
    # past the 512-program wave (wave_probe.py): 33 sequences fit 2 segments (528
    # programs), 48 do not (768)
    (Case("decode-33x8192-fp8", "decode", [1] * 33, [8192] * 33, "fp8_per_tensor"), 16),
    (Case("decode-48x8192-fp8", "decode", [1] * 48, [8192] * 48, "fp8_per_tensor"), 16),
    (Case("decode-32x8192-int8pth", "decode", [1] * 32, [8192] * 32,
          "int8_per_token_head"), 16),
    (Case("decode-32x8192-fp8pth", "decode", [1] * 32, [8192] * 32,
          "fp8_per_token_head"), 16),
    (Case("decode-128x8192-int8pth", "decode", [1] * 128, [8192] * 128,
          "int8_per_token_head"), 16),
    (Case("decode-128x8192-fp8pth", "decode", [1] * 128, [8192] * 128,
          "fp8_per_token_head"), 16),
    (Case("decode-8x8192-int8pth", "decode", [1] * 8, [8192] * 8, "int8_per_token_head"), 16),
    (Case("prefill-1x8192", "prefill", [8192], [8192]), 16),
    (Case("prefill-1x8192-b128", "prefill", [8192], [8192]), 128),
    (Case("prefill-1x8192-fp8", "prefill", [8192], [8192], "fp8_per_tensor"), 16),
    (Case("prefill-1x8192-int8pth", "prefill", [8192], [8192], "int8_per_token_head"), 16),
    (Case("prefill-1x8192-fp8pth", "prefill", [8192], [8192], "fp8_per_token_head"), 16),
    (Case("prefill-4x2048", "prefill", [2048] * 4, [2048] * 4), 16),
    (Case("prefill-4x2048-fp8", "prefill", [2048] * 4, [2048] * 4, "fp8_per_tensor"), 16),
    (Case("prefill-1x4096", "prefill", [4096], [4096]), 16),
    (Case("prefill-1x2048", "prefill", [2048], [2048]), 16),
    (Case("prefill-1x1024", "prefill", [1024], [1024]), 16),
    (Case("prefill-1024@8192", "prefill", [1024], [8192]), 16),
    (Case("prefill-512@8192", "prefill", [512], [8192]), 16),
    (Case("mixed-2048+15x4096", "mixed", [2048] + [1] * 15, [10240] + [4096] * 15), 16),
    (Case("mixed-2048+63x4096", "mixed", [2048] + [1] * 63, [10240] + [4096] * 63), 16),
    # its two parts alone (the bench's separate_parts)
    (Case("prefill-2048@10240", "prefill", [2048], [10240]), 16),
    (Case("decode-63x4096", "decode", [1] * 63, [4096] * 63), 16),
    (Case("prefill-1x8192-h64", "prefill", [8192], [8192]), 16),
    (Case("prefill-1x8192-h256", "prefill", [8192], [8192]), 16),
    (Case("prefill-4x2048-h64", "prefill", [2048] * 4, [2048] * 4), 16),
    (Case("prefill-4x2048-h256", "prefill", [2048] * 4, [2048] * 4), 16),
    (Case("prefill-1x4096-h64", "prefill", [4096], [4096]), 16),
    (Case("prefill-1x4096-h256", "prefill", [4096], [4096]), 16),
    (Case("decode-1x8192", "decode", [1], [8192]), 16),
    (Case("decode-8x8192", "decode", [1] * 8, [8192] * 8), 16),
    (Case("decode-8x1024", "decode", [1] * 8, [1024] * 8), 16),
    (Case("decode-1x32768", "decode", [1], [32768]), 16),
    (Case("decode-8x32768", "decode", [1] * 8, [32768] * 8), 16),
]


#: STAGED_SWEEP=1: staged prefill tiles (block_m, block_n, warps, stages) per head pad.
STAGED_SWEEP_TILES = {
    64: [(128, 128, 4, 3), (256, 128, 8, 3), (128, 64, 4, 4), (256, 64, 8, 4)],
    128: [(128, 128, 4, 3), (128, 64, 8, 4), (128, 64, 4, 3), (256, 64, 8, 3),
          (64, 128, 4, 3), (128, 128, 8, 4)],
    256: [(128, 64, 8, 2), (64, 128, 4, 2), (128, 32, 8, 3), (64, 64, 4, 2),
          (64, 32, 4, 4)],
}


def selected(case: Case, argv: list[str]) -> bool:
    """Cases whose name contains an argument (``=NAME``: exactly that name); all without."""
    return not argv or any(case.name == s[1:] if s.startswith("=") else s in case.name
                           for s in argv)


def head_size_of(case: Case) -> int:
    """Cases named ``...-h64`` / ``-h256`` use that head size; the rest 128."""
    tail = case.name.rsplit("-", 1)[-1]
    return int(tail[1:]) if tail[:1] == "h" and tail[1:].isdigit() else 128


def _tile(params: dict, **changes) -> dict:
    """``params`` with its decode tile changed (a key given as None is dropped, e.g.
    ``maxnreg=None``: no register cap); a given segment count holds for every batch (the
    plan's ``segments_upto`` rule is dropped)."""
    out = dict(params)
    short = dict(params["short"], **changes)
    out["short"] = {k: v for k, v in short.items() if v is not None}
    if "segments" in changes:
        out["short"].pop("segments_upto", None)
    return out


def variants_of(case: Case, base: dict, block_size: int,
                shape: Shape | None = None) -> dict[str, dict]:
    variants = {"current": base}
    if case.kind == "decode":  # the bound of folding the block-id scan into the loop
        variants["no-block-checks"] = dict(base, check_blocks=False)
    if case.kind == "decode" and case.kv_quant != "none":
        short = base["short"]
        segments = short["segments"]
        uncapped = {k: v for k, v in short.items() if k != "maxnreg"}
        variants["no-v-pairs"] = dict({k: v for k, v in base.items() if k != "v_pairs"},
                                      short=uncapped)
        variants["no-register-cap"] = dict(base, short=uncapped)
        variants["segments-half"] = _tile(base, segments=max(1, segments // 2))
        variants["segments-x2"] = _tile(base, segments=segments * 2)
        variants["cap-96-segments-x2"] = _tile(base, maxnreg=96, segments=segments * 2)
        variants["stages-3"] = _tile(base, num_stages=3)
        # one segment (no merge, half the programs) with more bytes in flight per program
        variants["1-segment-stages-3-no-cap"] = _tile(base, segments=1, num_stages=3,
                                                      maxnreg=None)
        variants["1-segment-256-keys"] = _tile(base, segments=1, block_n=256)
        variants["1-segment-256-keys-no-cap"] = _tile(base, segments=1, block_n=256,
                                                      maxnreg=None)
        if segments > 1:
            variants["merge-kernel"] = _tile(base, merge_in_kernel=False)
        if case.kv_quant.startswith("fp8"):  # the e4m3 bytes path of sm80 / sm86
            variants["codes"] = dict(base, kv_bits="e4m3fn")
            variants["codes-no-v-pairs"] = dict(variants["no-v-pairs"], kv_bits="e4m3fn")
    elif case.kind == "decode" and case.num_seqs <= 8:  # small batches, 16-bit cache
        segments = base["short"]["segments"]
        if segments > 1:  # the partials merged by the merge kernel (a second launch),
            # and the plan with a workspace made once (no ticket memset in the graph)
            variants["merge-kernel"] = _tile(base, merge_in_kernel=False)
            variants["own-workspace"] = dict(base, _own_workspace=True)
            # segments that fill 3 programs per SM (the bf16 decode tile's residency;
            # not a power of two: only the merge in the kernel takes that)
            programs = case.num_seqs * 8
            by_length = max(1, -(-max(case.seq_lens) // base["short"]["block_n"]) // 2)
            fill = max(2, min(3 * torch.cuda.get_device_properties(0).multi_processor_count
                              // programs, by_length, 64))
            if fill != segments:
                variants["segments-fill"] = _tile(base, segments=fill)
        variants["segments-x2"] = _tile(base, segments=min(64, segments * 2))
        variants["segments-half"] = _tile(base, segments=max(1, segments // 2))
        variants["cap-168"] = _tile(base, maxnreg=168)  # 3 programs per SM (smem: 3 too)
        variants["cap-168-segments-x2"] = _tile(base, maxnreg=168,
                                                segments=min(64, segments * 2))
        variants["64x4w-cap-128"] = _tile(base, block_n=64, num_warps=4, maxnreg=128)
        variants["64x4w-cap-128-segments-x2"] = _tile(base, block_n=64, num_warps=4,
                                                      maxnreg=128,
                                                      segments=min(64, segments * 2))
    elif case.kind in ("prefill", "mixed"):
        if block_size < 64 and shape is not None:  # keys staged into 128-slot blocks
            staged = dict(base, stage=stage_config(shape), stage_long=staged_long_config(shape))
            variants["staged"] = staged
            if os.environ.get("STAGED_SWEEP") == "1":  # tiles of the staged loop
                for m, n, w, st in STAGED_SWEEP_TILES.get(shape.head_pad, ()):
                    tile = dict(staged["stage_long"], block_m=m, block_q=m // shape.group,
                                block_n=n, num_warps=w, num_stages=st)
                    variants[f"staged-{m}x{n}w{w}s{st}"] = dict(staged, stage_long=tile)
            else:
                variants["staged-2-stages"] = dict(staged, stage_long=dict(
                    staged["stage_long"], num_stages=2))
            # program order: a query tile's kv heads together, or all tiles of a kv head
            # together (the plan takes one by head size: heuristics.STAGED_FLAT_GRID)
            # the edge tiles in the full tiles' pipelined loop (the kernel's ONE_LOOP)
            one = bool(staged["stage_long"].get("one_loop"))
            variants["staged-three-loops" if one else "staged-one-loop"] = dict(
                staged, stage_long=dict(staged["stage_long"], one_loop=not one))
            flat = bool(staged["stage_long"].get("flat_grid"))
            variants["staged-2d-grid" if flat else "staged-flat-grid"] = dict(
                staged, stage_long=dict(staged["stage_long"], flat_grid=not flat))
            if base["mode"] == "mixed" and case.kind == "prefill":  # every sequence long:
                # what the mixed plan's short launch (and merge) cost when they find nothing
                variants["staged-prefill-mode"] = dict(
                    {k: v for k, v in staged.items() if k != "short"}, mode="prefill")
        if block_size >= 64:
            base = dict(kv_load_rules.descriptor_params(base, block_size),
                        _kv_load_forced=True)  # a failure raises, never falls back
            variants = {"current-descriptors": base}
        if case.kv_quant.startswith("fp8"):
            variants["codes"] = dict(base, kv_bits="e4m3fn")
            variants["v-pairs"] = dict(base, v_pairs=True)
        elif block_size == 16:
            variants["no-block-checks"] = dict(base, check_blocks=False)
    return variants


def compile_only(share: str, argv: list[str]) -> int:
    index, count = (int(x) for x in share.split("/"))
    k = 0
    for case, block_size in CASES:
        if not selected(case, argv):
            continue
        inp = None
        for name, params in _variants_for(case, block_size).items():
            k += 1
            if (k - 1) % count != index:
                continue
            if inp is None:
                inp = build_inputs(case, num_q_heads=32, num_kv_heads=8,
                                   head_size=head_size_of(case), block_size=block_size,
                                   dtype=torch.bfloat16, device="cuda")
                options = normalize_options(inp.q, inp.cache)
            try:
                launch_unified(inp.q, inp.cache, inp.metadata, options, inp.out, params)
                torch.cuda.synchronize()
            except Exception as exc:
                print(f"{case.name} {name}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        del inp
        torch.cuda.empty_cache()
    return 0


def _variants_for(case: Case, block_size: int) -> dict[str, dict]:
    elem = 1 if case.kv_quant != "none" else 2
    shape = Shape(32, 8, head_size_of(case), elem, next_pow2(max(case.query_lens)),
                  next_pow2(max(case.seq_lens)), case.num_seqs,
                  torch.cuda.get_device_properties(0).multi_processor_count, "sm90",
                  kv_quant=quant_mode(case.kv_quant))
    variants = variants_of(case, plan_launch(shape), block_size, shape)
    if os.environ.get("CURRENT_ONLY") == "1":  # the plans as they are, nothing else
        variants = {k: v for k, v in variants.items() if k.startswith("current")}
    elif os.environ.get("EXP_VARIANTS"):  # the plans and these variants (comma list)
        keep = os.environ["EXP_VARIANTS"].split(",")
        variants = {k: v for k, v in variants.items() if k.startswith("current") or k in keep}
    if case.kind == "decode":
        variants.update(_env_tiles(variants["current"]))
    return variants


def _env_tiles(base: dict) -> dict[str, dict]:
    """Decode-tile variants named in ``EXP_TILES``: ``name:key=value,...;...`` changes the
    plan's ``short`` tile (``block_n=256,segments=1,maxnreg=none``; ``none`` drops the
    key), e.g. a sweep without editing :func:`variants_of`."""
    out = {}
    for entry in filter(None, os.environ.get("EXP_TILES", "").split(";")):
        name, _, spec = entry.partition(":")
        changes = {}
        for item in filter(None, spec.split(",")):
            key, _, value = item.partition("=")
            changes[key] = None if value == "none" else int(value)
        out[name] = _tile(base, segments_upto=None, **changes)
    return out


def profile_kernels(argv: list[str]) -> int:
    """Each kernel's mean device time per call, per (case, variant), from torch's profiler."""
    from torch.profiler import ProfilerActivity, profile

    calls = 20
    for case, block_size, inp, options in _selected_inputs(argv):
        for name, params in _variants_for(case, block_size).items():
            try:
                launch_unified(inp.q, inp.cache, inp.metadata, options, inp.out, params)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(calls):
                        launch_unified(inp.q, inp.cache, inp.metadata, options, inp.out,
                                       params)
                    torch.cuda.synchronize()
            except Exception as exc:
                print(f"{case.name} {name}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                continue
            total = 0.0
            for ev in prof.key_averages():
                us = ev.device_time_total / calls
                if us <= 0:
                    continue
                total += us
                print(f"{case.name:<24} {name:<20} {ev.key[:48]:<48} {ev.count // calls:3d}x "
                      f"{us:8.1f} us", flush=True)
            print(f"{case.name:<24} {name:<20} {'(all kernels)':<48}     {total:8.1f} us",
                  flush=True)
        del inp  # so the generator's empty_cache can free this case's tensors
    return 0


def _selected_inputs(argv: list[str]):
    """``(case, block_size, inputs, options)`` per selected case (32/8 heads, bf16), the
    inputs freed before the next case's are built."""
    for case, block_size in CASES:
        if not selected(case, argv):
            continue
        inp = build_inputs(case, num_q_heads=32, num_kv_heads=8, head_size=head_size_of(case),
                           block_size=block_size, dtype=torch.bfloat16, device="cuda")
        yield case, block_size, inp, normalize_options(inp.q, inp.cache)
        del inp
        torch.cuda.empty_cache()


def main(argv: list[str]) -> int:
    if argv[:1] == ["--compile-only"]:
        return compile_only(argv[1], argv[2:])
    if argv[:1] == ["--profile"]:
        return profile_kernels(argv[1:])
    graph = GraphTimer()
    n = 1 << 29
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    copy = 4 * n / (triton.testing.do_bench(lambda: b.copy_(a), return_mode="median") * 1e-3) / 1e12
    del a, b
    rows = []
    for case, block_size, inp, options in _selected_inputs(argv):
        for name, params in _variants_for(case, block_size).items():
            ws = new_workspace(1 << 24, "cuda") if params.get("_own_workspace") else None
            fn = (lambda p=params, w=ws: launch_unified(inp.q, inp.cache, inp.metadata,
                                                        options, inp.out, p, w))
            try:
                fn()
                ms = graph(fn)
            except Exception as exc:
                rows.append({"case": case.name, "variant": name,
                             "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
                print(rows[-1], flush=True)
                continue
            rows.append({"case": case.name, "variant": name, "us": ms * 1e3,
                         "tbs": case_bytes(case, inp) / (ms * 1e-3) / 1e12,
                         "tflops": case_flops(case, 32, head_size_of(case)) / (ms * 1e-3)
                         / 1e12,
                         "params": params})
            print(f"{case.name:<24} {name:<20} {ms * 1e3:8.1f} us", flush=True)
        del inp  # so the generator's empty_cache can free this case's tensors
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "copy_tbs": copy, "rows": rows},
                     indent=1, default=str))
    for r in rows:
        print(f"{r['case']:<24} {r['variant']:<20} "
              + (f"{r['us']:8.1f} us {r['tbs']:5.2f} TB/s ({r['tbs'] / copy:4.2f} copy) "
                 f"{r['tflops']:6.0f} TFLOP/s" if "us" in r else r["error"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
