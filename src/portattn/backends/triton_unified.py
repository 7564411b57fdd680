"""``triton_unified`` and ``triton_diffkv``: our Triton paged-attention kernels.

Both names serve calls through the same kernel body, heuristics and launcher
(:mod:`portattn.kernels`): ``triton_unified`` takes equal K and V head sizes,
``triton_diffkv`` (DESIGN.md) the calls whose K and V head sizes differ (the kernel's
second head size, not a fork). Support is declared as data below and checked by
:func:`kernel_reasons`; the variant (decode / prefill / mixed tiles, 2D or split-KV 3D,
tile sizes, warps, stages, segments, fp8 tensor-core QK^T) is chosen by
:func:`portattn.kernels.heuristics.plan_launch` from the problem and the probed device.
K/V loads (pointer or tensor descriptors, ``params["kv_load"]`` with its reason) are
chosen by :func:`portattn.backends.triton_kv_load.choose_kv_load` (``PORTATTN_TD``);
long prefills may stage their keys into 128-slot 16-bit blocks first
(:func:`~portattn.backends.triton_kv_load.choose_staging`, ``params["stage"]``).
``PORTATTN_UNIFIED_SPLIT`` overrides the split choice (unset: auto, ``1``: split decode
tiles over the keys when they can be, ``0``: never).

Importing this module does not import Triton: the kernel modules (``portattn.kernels.launch``
and what it imports) are imported by the runner when a plan is made, which routing allows
only after the probe's ``triton_kernels`` check passed (Triton imports, has what the kernels
use, and a test kernel compiled and ran).
"""

from __future__ import annotations

import torch

from portattn.backends.base import Backend, Plan
from portattn.backends.gluon_rules import choose_gluon_prefill
from portattn.backends.triton_kv_load import choose_kv_load, choose_staging
from portattn.kernels import heuristics
from portattn.types import FP8_DTYPES, FP8_FORMAT_NAMES, KVQuant

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: The quantized-cache modes the kernels read (KVQuant.mode): every one.
KV_QUANT_MODES = KVQuant.MODES
#: For both K and V head sizes (DiffKV too).
HEAD_SIZE_RANGE = (32, 256)
HEAD_SIZE_STEP = 8
MAX_GQA_RATIO = 128


def _fp8_reason(what: str, dtype: torch.dtype, caps) -> str | None:
    """Triton computes on fp8 only where the hardware has the format (sm89+, gfx950; the
    interpreter emulates it)."""
    if caps.device_type == "cpu":
        return None
    fmt = FP8_FORMAT_NAMES[dtype]
    if fmt not in caps.fp8_formats:
        have = ", ".join(caps.fp8_formats) or "none"
        return (f"{what} is fp8 {fmt}, which {caps.arch} does not compute in (fp8 formats "
                f"here: {have}; NVIDIA needs sm89+)")
    return None


def fp8_cache_from_bytes(problem, caps) -> str | None:
    """The fp8 format of a KV cache that our kernels must decode from its bytes (the
    kernel's ``KV_BITS``, the plan's ``kv_bits``): an e4m3fn or e5m2 cache on an NVIDIA GPU
    without that format (sm80, sm86: Triton has no conversion there). None: the GPU
    converts it natively (or the cache is not fp8). Measured on an H200 with the switch
    forced (benchmarks/NOTES.md); AMD GPUs are not served this way (not run on one)."""
    return fp8_bytes_format(problem.kv_dtype, problem.device_type, caps)


def fp8_bytes_format(kv_dtype, device_type: str, caps) -> str | None:
    """:func:`fp8_cache_from_bytes` for a cache of ``kv_dtype`` on ``device_type`` (the
    bench asks before it has built a call)."""
    if kv_dtype not in FP8_DTYPES or device_type != "cuda" or caps.vendor != "nvidia":
        return None
    fmt = FP8_FORMAT_NAMES[kv_dtype]
    return None if fmt in caps.fp8_formats else fmt


def kernel_reasons(problem, caps) -> list[str]:
    """Why our Triton kernels cannot serve ``problem`` on ``caps`` (empty: they can),
    whatever the K/V head sizes; each backend adds its head-size rule."""
    reasons: list[str] = []
    if not caps.triton_kernels.ok:
        reasons.append(caps.triton_kernels.reason or "Triton kernels cannot run here")
    if problem.device_type != caps.device_type:
        reasons.append(f"tensors are on {problem.device_type} but the probed device is "
                       f"{caps.device_type}")
    elif problem.device_type == "cpu" and not caps.triton_interpreter:
        reasons.append("CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)")
    mode = problem.kv_quant.split(":", 1)[0]
    if mode not in KV_QUANT_MODES:
        reasons.append(f"KV cache quantization {problem.kv_quant} is not supported by our "
                       f"Triton kernels ({', '.join(KV_QUANT_MODES)})")
    if problem.kv_dtype in FP8_DTYPES and not fp8_cache_from_bytes(problem, caps):
        reasons.append(_fp8_reason("the KV cache", problem.kv_dtype, caps) or "")
    if problem.q_dtype in FP8_DTYPES:
        if not problem.quantized_kv:
            reasons.append(f"an fp8 q needs a quantized KV cache (fp8 per-tensor or "
                           f"per-token-head), not a {problem.kv_dtype} one")
        reasons.append(_fp8_reason("q", problem.q_dtype, caps) or "")
    elif problem.q_dtype not in SUPPORTED_DTYPES:
        reasons.append(f"q dtype {problem.q_dtype} is not supported by our Triton kernels "
                       "(float16, bfloat16, float32, or fp8 with q_scale)")
    elif not problem.quantized_kv and problem.kv_dtype != problem.q_dtype:
        reasons.append(f"q dtype {problem.q_dtype} differs from the cache dtype "
                       f"{problem.kv_dtype}")
    if problem.out_dtype in FP8_DTYPES:
        reasons.append(_fp8_reason("the output", problem.out_dtype, caps) or "")
    elif problem.out_dtype not in SUPPORTED_DTYPES:
        reasons.append(f"output dtype {problem.out_dtype} is not supported")
    lo, hi = HEAD_SIZE_RANGE
    for what, size in (("head size", problem.head_size_qk), ("V head size", problem.head_size_v)):
        if not (lo <= size <= hi) or size % HEAD_SIZE_STEP:
            reasons.append(f"{what} {size} is outside {lo}..{hi} in steps of {HEAD_SIZE_STEP}")
        if what == "head size" and not problem.diffkv:
            break
    if problem.block_size < 1:
        reasons.append(f"block size {problem.block_size} must be positive")
    if problem.num_kv_heads <= 0 or problem.num_q_heads % problem.num_kv_heads:
        reasons.append(f"{problem.num_q_heads} query heads are not a multiple of "
                       f"{problem.num_kv_heads} kv heads")
    elif problem.gqa_ratio > MAX_GQA_RATIO:
        reasons.append(f"GQA ratio {problem.gqa_ratio} above {MAX_GQA_RATIO} (one query "
                       "tile must hold a whole group)")
    if caps.triton_interpreter and problem.device_type == "cpu" and \
            torch.bfloat16 in (problem.q_dtype, problem.kv_dtype):
        reasons.append("bfloat16 tl.dot is wrong under the Triton interpreter (run bf16 "
                       "on a GPU)")
    return [r for r in reasons if r]


def uses_fp8_dot(problem, caps) -> bool:
    """QK^T on fp8 tensor cores: fp8 q over an fp8 per-tensor cache of the same format,
    on NVIDIA sm89+ (the interpreter and other targets cast to fp16 instead)."""
    return (problem.q_dtype in FP8_DTYPES and problem.kv_dtype == problem.q_dtype
            and problem.kv_quant.startswith("fp8_per_tensor") and caps.vendor == "nvidia"
            and problem.device_type == "cuda" and caps.compute_capability is not None
            and tuple(caps.compute_capability) >= (8, 9))


class TritonUnified(Backend):
    name = "triton_unified"
    summary = ("our Triton unified paged-attention kernel: decode/prefill/mixed tiles, "
               "2D or split-KV 3D, fp8/int8 KV caches, fp8 q and output")

    def why_not(self, problem, caps) -> list[str]:
        reasons = kernel_reasons(problem, caps)
        if problem.diffkv:
            reasons.append(f"head_size_qk {problem.head_size_qk} != head_size_v "
                           f"{problem.head_size_v}: this backend takes equal head sizes "
                           "(triton_diffkv takes differing ones)")
        return reasons

    def plan(self, problem, caps) -> Plan:
        shape = heuristics.Shape.from_problem(problem, caps.sm_count, caps.arch)
        params = heuristics.plan_launch(shape, segments=_forced_segments(shape),
                                        fp8_dot=uses_fp8_dot(problem, caps))
        from_bytes = fp8_cache_from_bytes(problem, caps)
        if from_bytes:
            params["kv_bits"] = from_bytes
        params = choose_kv_load(problem, caps, shape, params)
        params = choose_staging(problem, caps, shape, params)
        params = choose_gluon_prefill(problem, caps, params)
        return Plan(self.name, heuristics.variant_name(params), params)

    def call_notes(self, plan, cache) -> list[str]:
        if plan.params.get("kv_load") != "descriptor":
            return []
        from portattn.kernels.kv_load import cache_reasons

        why = cache_reasons(cache, plan.params)
        if not why:
            return []
        # a plan that stages (or hands long sequences to the Gluon prefill) reads the
        # cache with its own loads only in its launches over the cache itself
        staged = bool(plan.params.get("stage"))
        if plan.params.get("_kv_load_forced"):
            where = " where a launch reads the cache itself (a sequence it does not stage)" \
                if staged else ""
            return ["this call's cache tensors cannot back descriptor (TMA) K/V loads, which "
                    f"PORTATTN_TD=1 forces: the call is refused (InputError){where}: " +
                    "; ".join(why)]
        reader = "each launch over the cache itself (sequences it does not stage)" \
            if staged else "its launch"
        return ["this call's cache tensors cannot back descriptor (TMA) K/V loads, so "
                f"{reader} reads them with pointer loads: " + "; ".join(why)]

    def run(self, q, cache, metadata, options, out, plan) -> None:
        from portattn.kernels.launch import launch_unified

        launch_unified(q, cache, metadata, options, out, plan.params)

    def prepare(self, plan, problem, options, device):
        """Plans replay launch.py's recorded launches (:mod:`.unified_runner`)."""
        from portattn.backends.unified_runner import UnifiedRunner

        return UnifiedRunner(self, plan, options, problem, device)


def _forced_segments(shape: heuristics.Shape) -> int | None:
    """``PORTATTN_UNIFIED_SPLIT``: unset/auto -> None (heuristic), 0 -> 1 segment,
    1 -> split decode tiles as far as the key length allows."""
    from portattn import settings

    split = settings.UNIFIED_SPLIT.value()  # InputError naming it when invalid
    if split is None:
        return None
    if not split:
        return 1
    big = heuristics.Shape(**{**shape.__dict__, "sm_count": 1 << 20})
    block_n = heuristics.decode_config(big, 1, 1, 1).block_n
    return heuristics.decode_segments(big, block_n, 1)
