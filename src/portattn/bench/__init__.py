"""``portattn bench``: our kernels against the peers and the hardware ceilings, one run.

Cases (PERFORMANCE.md; bf16, 32 q heads / 8 kv heads / head 128, block size 16):
decode B x 8192 (B = 1, 8, 32, 128), prefill 1x8192 / 4x2048 / 1x4096 causal, a mixed
batch (a 2048-token chunk over 8192 of context plus 63 decodes at 4096) and spec-decode
(32 sequences x 8192 keys, 4 queries each). Implementations: ours (``portattn.attention``
with the plan the dispatcher picks), torch SDPA with the cuDNN and the flash backends on
contiguous K/V (``enable_gqa=True``; a chunk over a longer context in the first
bottom-right causal form the backend runs, the notes say which; its output compared with
ours once, ``rel_error_vs_ours``), and where flash-attn imports: flash-attn 2 on
contiguous K/V with its best call (``flash_attn_with_kvcache`` for decode and spec-decode,
``flash_attn_varlen_func`` otherwise) and portattn's own ``flash_attn`` backend on the
paged cache (FA4, else FA3, where installed; FA2 paged at block sizes that are multiples
of 256, else ``flash_attn_gather``); where ``flash_attn.cute`` imports, ``fa4_paged``:
FA4's varlen call on our paged cache at the bench's block size, called directly with the
backend's argument mapping. Ceilings measured in the same run: device-to-device copy
bandwidth (bytes read + written) and a bf16 matmul. Times are the median of
``triton.testing.do_bench``.

Reported per case: time, TB/s (K/V/q/out bytes; decode-like cases) or TFLOP/s
(``4 * visible query-key pairs * head_size * num_q_heads``; causal counts visible keys
only), the fraction of the ceiling, and ``peer_time / our_time`` for each peer (> 1: we are
faster). ``--sweep`` also times many launch configs of our kernel per case (tile sizes,
warps, stages, segments) so the heuristics can be set from data. Output: a table on
stdout, ``<prefix>.json`` (rewritten after each case) and ``<prefix>.png`` (when
matplotlib imports) in ``--out``.

Modules (importing the package does no work: no device query, no probing; every name
below is importable from ``portattn.bench``):

* ``cases``   -- :class:`Case`, :func:`default_cases`, :func:`case_tags`, :class:`Inputs`,
  :func:`build_inputs`, :func:`gather_contiguous`, :func:`case_bytes`, :func:`case_flops`
* ``timing``  -- :func:`timer`, :class:`GraphTimer`, :func:`host_us`,
  :func:`measure_ceilings`
* ``peers``   -- :func:`ours`, :func:`portattn_flash_attn`, :func:`fa4_paged`, :func:`sdpa`,
  :func:`flash_attn_contiguous`
* ``sweep``   -- :func:`sweep_configs`, :func:`run_sweep`, :func:`compile_only`
* ``runner``  -- :func:`run_case`
* ``report``  -- :func:`add_plain_ratios`, :func:`format_table`, :func:`plot`
* ``cli``     -- :func:`main` (``python -m portattn.bench``, ``portattn bench``)
"""

from __future__ import annotations

from portattn.bench.cases import (
    BENCH_FP8_SCALE,
    Case,
    Inputs,
    build_inputs,
    case_bytes,
    case_flops,
    case_tags,
    default_cases,
    gather_contiguous,
)
from portattn.bench.cli import main
from portattn.bench.peers import (
    fa4_paged,
    flash_attn_contiguous,
    ours,
    portattn_flash_attn,
    sdpa,
)
from portattn.bench.report import SPEED_KEYS, add_plain_ratios, format_table, plot
from portattn.bench.runner import run_case
from portattn.bench.sweep import compile_only, run_sweep, sweep_configs
from portattn.bench.timing import GraphTimer, host_us, measure_ceilings, timer

__all__ = [
    "BENCH_FP8_SCALE", "SPEED_KEYS", "Case", "GraphTimer", "Inputs", "add_plain_ratios",
    "build_inputs", "case_bytes", "case_flops", "case_tags", "compile_only", "default_cases",
    "fa4_paged", "flash_attn_contiguous", "format_table", "gather_contiguous", "host_us",
    "main", "measure_ceilings", "ours", "plot", "portattn_flash_attn", "run_case",
    "run_sweep", "sdpa", "sweep_configs", "timer",
]
