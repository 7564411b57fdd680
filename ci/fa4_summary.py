"""Summarize an FA4 device run (ci/gpu_fa4.sh): the test results and, per benchmark case and
block size, our kernel against FA4 on the same paged cache, with the verdict per problem
class that ``MEASURED_LEADS`` in src/portattn/dispatch/priorities.py should follow.

    python3 ci/fa4_summary.py OUT_DIR     # reads OUT_DIR/*-fa4-b*.json, OUT_DIR/tests-*.log

Ratios are our time / FA4's time: > 1 means FA4 is faster. "eager" is the median of
``do_bench``; "graph" is kernel-only time in a CUDA graph (L2 flushed).
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys

CLASS_OF_KIND = {"decode": "decode", "spec": "short-chunks", "prefill": "long-chunks",
                 "mixed": "long-chunks"}


def _tests(out_dir: str) -> list[str]:
    lines = []
    for path in sorted(glob.glob(os.path.join(out_dir, "tests-*.log"))):
        text = open(path, errors="replace").read()
        tail = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)",
                                                             ln)]
        lines.append(f"{os.path.basename(path)}: {tail[-1].strip('= ') if tail else 'no result'}")
        lines += [f"  {ln}" for ln in text.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    return lines


def _rate(kind: str, case: dict, ms: float | None) -> str:
    if not ms:
        return "-"
    if kind in ("decode", "spec"):
        return f"{case['bytes'] / (ms * 1e-3) / 1e12:.2f} TB/s"
    return f"{case['flops'] / (ms * 1e-3) / 1e12:.0f} TFLOP/s"


def _ms(impl: dict, key: str = "ms") -> float | None:
    value = impl.get(key)
    return value if isinstance(value, (int, float)) and value > 0 else None


def _fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms * 1e3:.1f}us" if ms < 1 else f"{ms:.3f}ms"


def _bench(out_dir: str) -> tuple[list[str], dict]:
    lines, verdicts = [], {}
    reports = [(json.load(open(path)), path)
               for path in glob.glob(os.path.join(out_dir, "*-fa4-b*.json"))]
    for report, path in sorted(reports, key=lambda rp: (rp[0].get("block_size") or 0, rp[1])):
        block = report.get("block_size")
        lines.append(f"{report.get('gpu')} block {block} ({os.path.basename(path)}; copy "
                     f"{report['ceilings'].get('copy_tbs') or 0:.2f} TB/s, matmul "
                     f"{report['ceilings'].get('matmul_tflops') or 0:.0f} TFLOP/s)")
        lines.append(f"  {'case':<20} {'ours':>9} {'FA4 paged':>10} {'pFA':>9} {'cuDNN':>9} "
                     f"{'ours/FA4':>8} {'graph':>6}  {'ours rate':>13} {'FA4 rate':>13}")
        for case in report["cases"]:
            name, kind = case["case"]["name"], case["case"]["kind"]
            impls = case["impls"]
            ours, fa4 = impls.get("ours", {}), impls.get("fa4_paged", {})
            o, f = _ms(ours), _ms(fa4)
            og, fg = _ms(ours, "graph_ms"), _ms(fa4, "graph_ms")
            eager = o / f if o and f else None
            graph = og / fg if og and fg else None
            eager_text = "-" if eager is None else f"{eager:.2f}"
            graph_text = "-" if graph is None else f"{graph:.2f}"
            pfa = _fmt_ms(_ms(impls.get("portattn_flash_attn", {})))
            cudnn = _fmt_ms(_ms(impls.get("sdpa_cudnn", {})))
            lines.append(
                f"  {name:<20} {_fmt_ms(o):>9} {_fmt_ms(f):>10} {pfa:>9} {cudnn:>9} "
                f"{eager_text:>8} {graph_text:>6}  {_rate(kind, case, o):>13} "
                f"{_rate(kind, case, f):>13}")
            if "error" in fa4:
                lines.append(f"    FA4 failed: {fa4['error']}")
            if eager:
                klass = CLASS_OF_KIND.get(kind, kind) + (
                    " (DiffKV)" if case["case"].get("head_size_v") else "")
                verdicts.setdefault((report.get("gpu"), klass), []).append((name, block, eager))
    return lines, verdicts


def main(out_dir: str) -> int:
    lines = ["== FA4 GPU tests"] + (_tests(out_dir) or ["(no test logs)"])
    bench_lines, verdicts = _bench(out_dir)
    lines += ["", "== our kernel vs FA4 on the same paged cache (ours/FA4 > 1: FA4 faster)"]
    lines += bench_lines or ["(no benchmark JSON)"]
    lines += ["", "== per problem class (eager ours/FA4, every case and block size): the "
              "MEASURED_LEADS rows should follow this"]
    for (gpu, klass), rows in sorted(verdicts.items()):
        ratios = [r for _, _, r in rows]
        verdict = ("FA4 faster everywhere: a lead for flash_attn/fa4" if min(ratios) > 1.02
                   else "ours faster everywhere: no lead" if max(ratios) < 0.98
                   else "mixed or within 2%: keep ours first unless a subset is split out")
        lines.append(f"  {gpu} {klass:<22} ours/FA4 {min(ratios):.2f}-{max(ratios):.2f} "
                     f"over {len(rows)} cases -> {verdict}")
    text = "\n".join(lines)
    with open(os.path.join(out_dir, "summary.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "."))
