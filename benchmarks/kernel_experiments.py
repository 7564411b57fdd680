"""Side-by-side timings for kernel experiments (NOTES.md section 9): the previous kernel
(``.gpu/oldkernels``, carried to the device when present) against the current one, and
switch variants (V_STAGE both ways on 8-bit caches, the bad-block checks off on bf16
prefill), in one run with the copy ceiling.

    PYTHONPATH=src:.gpu python3 benchmarks/kernel_experiments.py
"""

from __future__ import annotations

import json
import sys

import torch
import triton.testing

from portattn.bench import Case, GraphTimer, build_inputs, case_bytes, case_flops
from portattn.kernels.heuristics import Shape, plan_launch, scales_per_token_head
from portattn.kernels.launch import launch_unified
from portattn.options import normalize_options


def timed(graph, fn):
    fn()
    return graph(fn)


def main() -> int:
    graph = GraphTimer()
    n = 1 << 29
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    copy = 4 * n / (triton.testing.do_bench(lambda: b.copy_(a), return_mode="median") * 1e-3) / 1e12
    del a, b
    rows = []
    cases = [Case("decode-32x8192", "decode", [1] * 32, [8192] * 32),
             Case("decode-32x8192-fp8", "decode", [1] * 32, [8192] * 32, "fp8_per_tensor"),
             Case("decode-32x8192-int8pth", "decode", [1] * 32, [8192] * 32,
                  "int8_per_token_head"),
             Case("prefill-1x8192", "prefill", [8192], [8192]),
             Case("prefill-1x8192-fp8", "prefill", [8192], [8192], "fp8_per_tensor"),
             Case("decode-1x8192", "decode", [1], [8192]),
             Case("decode-8x8192", "decode", [1] * 8, [8192] * 8),
             Case("decode-8x1024", "decode", [1] * 8, [1024] * 8),
             Case("decode-1x32768", "decode", [1], [32768])]
    try:
        import oldkernels.heuristics as old_h
        import oldkernels.launch as old_l
    except ImportError:
        old_h = old_l = None
    for case in cases:
        inp = build_inputs(case, num_q_heads=32, num_kv_heads=8, head_size=128,
                           block_size=16, dtype=torch.bfloat16, device="cuda")
        options = normalize_options(inp.q, inp.cache)
        shape = Shape(32, 8, 128, inp.cache.key_cache.element_size(), max(case.query_lens),
                      max(case.seq_lens), case.num_seqs, torch.cuda.get_device_properties(0)
                      .multi_processor_count, "sm90",
                      scales_per_token=scales_per_token_head(case.kv_quant))
        base = plan_launch(shape)
        variants = {"current": base}
        if case.kv_quant != "none":  # V_STAGE both ways (the plan sets it for decode)
            variants["v-staged"] = dict(base, v_stage=True)
            variants["no-v-stage"] = dict(base, v_stage=False)
        elif case.num_seqs in (1, 32) and case.kind == "prefill":
            variants["no-block-checks"] = dict(base, check_blocks=False)
        for name, params in variants.items():
            fn = (lambda p=params: launch_unified(inp.q, inp.cache, inp.metadata, options,
                                                  inp.out, p))
            try:
                ms = timed(graph, fn)
            except Exception as exc:
                rows.append({"case": case.name, "variant": name, "error": str(exc)[:200]})
                continue
            rows.append({"case": case.name, "variant": name, "us": ms * 1e3,
                         "tbs": case_bytes(case, inp) / (ms * 1e-3) / 1e12,
                         "tflops": case_flops(case, 32, 128) / (ms * 1e-3) / 1e12})
        if old_l is not None and case.kv_quant == "none":
            oshape = old_h.Shape(32, 8, 128, 2, max(case.query_lens), max(case.seq_lens),
                                 case.num_seqs,
                                 shape.sm_count, "sm90")
            oparams = old_h.plan_launch(oshape)
            ms = timed(graph, lambda: old_l.launch_unified(inp.q, inp.cache, inp.metadata,
                                                           options, inp.out, oparams))
            rows.append({"case": case.name, "variant": "previous kernel", "us": ms * 1e3,
                         "tbs": case_bytes(case, inp) / (ms * 1e-3) / 1e12,
                         "tflops": case_flops(case, 32, 128) / (ms * 1e-3) / 1e12})
        del inp
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "copy_tbs": copy, "rows": rows},
                     indent=1))
    for r in rows:
        print(f"{r['case']:<24} {r['variant']:<16} "
              + (f"{r['us']:8.1f} us {r['tbs']:5.2f} TB/s ({r['tbs'] / copy:4.2f} copy) "
                 f"{r['tflops']:6.0f} TFLOP/s" if "us" in r else r["error"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
