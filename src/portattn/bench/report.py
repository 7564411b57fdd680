"""The bench's report: each variant case against its plain case, the table on stdout, the
plot (PNG, when matplotlib imports) and the progress lines (printed flushed).
"""

from __future__ import annotations

#: The peers' keys in a result's ``speed_vs`` (peer time / our time).
SPEED_KEYS = ("sdpa_cudnn", "sdpa_flash", "flash_attn", "portattn_flash_attn", "fa4_paged")


def _flush_print(*args):
    print(*args, flush=True)


def _error(exc: Exception) -> str:
    """``"TypeName: first line of the message"`` (at most 200 characters of it) for a
    result row or a progress line."""
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"


def plain_case_name(name: str) -> str:
    """The plain (bf16, equal heads) case a quantized / DiffKV case is compared with: its
    name without the last ``-tag`` (``decode-32x8192-fp8`` -> ``decode-32x8192``)."""
    return name.rsplit("-", 1)[0]


def add_plain_ratios(report: dict) -> None:
    """Each quantized / DiffKV case against the plain (bf16, equal heads) case of the same
    shape measured in the same run: ``time`` and ``graph_time`` are our time over the
    plain case's (< 1: faster), ``tflops`` the TFLOP/s ratio (same-FLOP comparison)."""
    by_name = {r["case"]["name"]: r for r in report["cases"]}
    for r in report["cases"]:
        name = r["case"]["name"]
        base = by_name.get(plain_case_name(name)) if r["case"].get("kv_quant", "none") != \
            "none" or r["case"].get("head_size_v") else None
        if base is None:
            continue
        mine, plain = r["impls"].get("ours", {}), base["impls"].get("ours", {})
        if "ms" not in mine or "ms" not in plain:
            continue
        ratios = {"plain_case": base["case"]["name"], "time": mine["ms"] / plain["ms"],
                  "tflops": mine["tflops"] / plain["tflops"] if plain["tflops"] else None}
        if mine.get("graph_ms") and plain.get("graph_ms"):
            ratios["graph_time"] = mine["graph_ms"] / plain["graph_ms"]
        r["vs_plain"] = ratios


def format_table(report: dict) -> str:
    lines = []
    ceil = report["ceilings"]
    lines.append(f"GPU {report['gpu']}  torch {report['torch']}  triton {report['triton']}  "
                 f"copy {_fmt(ceil.get('copy_tbs'))} TB/s  matmul "
                 f"{_fmt(ceil.get('matmul_tflops'))} TFLOP/s")
    flush = report.get("l2_flush") or "zero"  # older reports: the zeroing flush
    graph = "CUDA graph, kernel only" + ("" if flush == "zero" else f", L2 {flush}")
    lines.append(f"{'':<20} {'------------ do_bench (eager) -------------':<53} "
                 f"{f'------- {graph} -------':<47}")
    lines.append(f"{'case':<20} {'ours':>8} {'rate':>13} {'ceil':>5} {'cuDNN':>5} {'flash':>5} "
                 f"{'FA':>5} {'pFA':>5} {'FA4':>5} {'ours':>8} {'rate':>13} {'cuDNN':>5} "
                 f"{'flash':>5} {'FA4':>5} {'host':>6}  "
                 f"variant")
    for r in report["cases"]:
        o = r["impls"].get("ours", {})
        if "ms" not in o:
            lines.append(f"{r['case']['name']:<20} ours failed: {o.get('error')}")
            continue
        kind = r["case"]["kind"]
        sv, gv = r.get("speed_vs", {}), r.get("graph_speed_vs", {})
        g = o.get("graph_ms")
        extra = ""
        if "separate_parts" in sv:
            extra = f" vs parts x{sv['separate_parts']:.2f}/{_fmt(gv.get('separate_parts'))}"
        lines.append(
            f"{r['case']['name']:<20} {_ms(o['ms']):>8} {_rate(kind, r, o['ms']):>13} "
            f"{_fmt(r.get('fraction_of_ceiling')):>5} {_fmt(sv.get('sdpa_cudnn')):>5} "
            f"{_fmt(sv.get('sdpa_flash')):>5} {_fmt(sv.get('flash_attn')):>5} "
            f"{_fmt(sv.get('portattn_flash_attn')):>5} {_fmt(sv.get('fa4_paged')):>5} "
            f"{_ms(g) if g else '-':>8} {_rate(kind, r, g) if g else '-':>13} "
            f"{_fmt(gv.get('sdpa_cudnn')):>5} {_fmt(gv.get('sdpa_flash')):>5} "
            f"{_fmt(gv.get('fa4_paged')):>5} "
            f"{_fmt(o.get('host_us'), 0):>6}  {r['plan'].split(' ')[0]}{extra}")
    variants = [r for r in report["cases"] if r.get("vs_plain")]
    if variants:
        lines.append("quantized / DiffKV cases against the bf16 equal-head case, same run "
                     "(time ratio < 1: faster; kernel-only from the CUDA graph):")
        for r in variants:
            v = r["vs_plain"]
            lines.append(f"  {r['case']['name']:<24} vs {v['plain_case']:<18} time "
                         f"x{_fmt(v['time'])}  graph x{_fmt(v.get('graph_time'))}  "
                         f"TFLOP/s x{_fmt(v.get('tflops'))}  ceil "
                         f"{_fmt(r.get('fraction_of_ceiling'))}")
    lines.append("ceil = fraction of copy bandwidth (decode/spec) or bf16 matmul (others); "
                 "cuDNN/flash/FA/pFA = peer time / our time (>1: ours faster; FA = flash-attn 2 on "
                 "contiguous K/V, pFA = portattn's flash_attn backend, FA4 = flash_attn.cute "
                 "on our paged cache); host = us of host time per portattn.attention call")
    return "\n".join(lines)


def _rate(kind: str, r: dict, ms: float) -> str:
    if kind in ("decode", "spec"):
        return f"{r['bytes'] / (ms * 1e-3) / 1e12:.2f} TB/s"
    return f"{r['flops'] / (ms * 1e-3) / 1e12:.0f} TFLOP/s"


def _fmt(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ms(ms: float) -> str:
    return f"{ms * 1e3:.1f}us" if ms < 1 else f"{ms:.3f}ms"


def plot(report: dict, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        return f"no plot: {exc}"
    cases = [r for r in report["cases"] if "ms" in r["impls"].get("ours", {})]
    impls = ["ours", *SPEED_KEYS]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    for ax, kinds, key, unit, ceil in (
            (axes[0], ("decode", "spec"), "tbs", "TB/s", report["ceilings"].get("copy_tbs")),
            (axes[1], ("prefill", "mixed"), "tflops", "TFLOP/s",
             report["ceilings"].get("matmul_tflops"))):
        sel = [r for r in cases if r["case"]["kind"] in kinds]
        width = 0.8 / len(impls)
        for i, name in enumerate(impls):
            vals = [r["impls"].get(name, {}).get(key, 0.0) for r in sel]
            ax.bar([j + i * width for j in range(len(sel))], vals, width, label=name)
        if ceil:
            ax.axhline(ceil, color="k", linestyle="--", linewidth=1, label="ceiling")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sel))])
        ax.set_xticklabels([r["case"]["name"] for r in sel], rotation=30, ha="right")
        ax.set_ylabel(unit)
        ax.legend(fontsize=8)
    fig.suptitle(f"portattn bench on {report['gpu']} ({report['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None
