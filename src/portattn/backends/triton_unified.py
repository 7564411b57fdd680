"""``triton_unified``: our Triton unified paged-attention kernels.

Support is declared as data below and checked by :meth:`TritonUnified.why_not`; the
variant (decode / prefill / mixed tiles, 2D or split-KV 3D, tile sizes, warps, stages,
segments) is chosen by :func:`portattn.kernels.heuristics.plan_launch` from the problem and
the probed SM count. ``PORTATTN_UNIFIED_SPLIT`` overrides the split choice (unset: auto,
``1``: split decode tiles over the keys when they can be, ``0``: never).

Importing this module imports Triton (through the kernels package); the registry turns an
ImportError into a reason.
"""

from __future__ import annotations

import os

import torch

from portattn.backends.base import Backend, Plan
from portattn.kernels import heuristics

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_SIZE_RANGE = (32, 256)
HEAD_SIZE_STEP = 8
MAX_GQA_RATIO = 128


class TritonUnified(Backend):
    name = "triton_unified"
    summary = ("our Triton unified paged-attention kernel: decode/prefill/mixed tiles, "
               "2D or split-KV 3D")

    def why_not(self, problem, caps) -> list[str]:
        reasons: list[str] = []
        if not caps.triton_kernels.ok:
            reasons.append(caps.triton_kernels.reason or "Triton kernels cannot run here")
        if problem.device_type != caps.device_type:
            reasons.append(f"tensors are on {problem.device_type} but the probed device is "
                           f"{caps.device_type}")
        elif problem.device_type == "cpu" and not caps.triton_interpreter:
            reasons.append("CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)")
        if problem.diffkv:
            reasons.append(f"head_size_qk {problem.head_size_qk} != head_size_v "
                           f"{problem.head_size_v}: served by triton_diffkv")
        if problem.quantized_kv:
            reasons.append(f"quantized KV cache ({problem.kv_quant}) is not yet supported by "
                           "triton_unified")
        if problem.q_dtype not in SUPPORTED_DTYPES:
            reasons.append(f"q dtype {problem.q_dtype} is not yet supported by triton_unified "
                           "(float16, bfloat16, float32)")
        elif not problem.quantized_kv and problem.kv_dtype != problem.q_dtype:
            reasons.append(f"q dtype {problem.q_dtype} differs from the cache dtype "
                           f"{problem.kv_dtype}")
        if problem.fp8_output:
            reasons.append("fp8 output is not yet supported by triton_unified")
        elif problem.out_dtype not in SUPPORTED_DTYPES:
            reasons.append(f"output dtype {problem.out_dtype} is not supported")
        lo, hi = HEAD_SIZE_RANGE
        if not (lo <= problem.head_size_qk <= hi) or problem.head_size_qk % HEAD_SIZE_STEP:
            reasons.append(f"head size {problem.head_size_qk} is outside {lo}..{hi} in steps "
                           f"of {HEAD_SIZE_STEP}")
        if problem.block_size < 1:
            reasons.append(f"block size {problem.block_size} must be positive")
        if problem.num_kv_heads <= 0 or problem.num_q_heads % problem.num_kv_heads:
            reasons.append(f"{problem.num_q_heads} query heads are not a multiple of "
                           f"{problem.num_kv_heads} kv heads")
        elif problem.gqa_ratio > MAX_GQA_RATIO:
            reasons.append(f"GQA ratio {problem.gqa_ratio} above {MAX_GQA_RATIO} (one query "
                           "tile must hold a whole group)")
        if caps.triton_interpreter and problem.device_type == "cpu" and \
                problem.q_dtype == torch.bfloat16:
            reasons.append("bfloat16 tl.dot is wrong under the Triton interpreter (run bf16 "
                           "on a GPU)")
        return reasons

    def plan(self, problem, caps) -> Plan:
        shape = heuristics.Shape.from_problem(problem, caps.sm_count, caps.arch)
        params = heuristics.plan_launch(shape, segments=_forced_segments(shape))
        return Plan(self.name, heuristics.variant_name(params), params)

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
    env = os.environ.get("PORTATTN_UNIFIED_SPLIT", "").strip().lower()
    if env in ("", "auto"):
        return None
    if env == "0":
        return 1
    if env == "1":
        big = heuristics.Shape(**{**shape.__dict__, "sm_count": 1 << 20})
        block_n = heuristics.decode_config(big, 1, 1, 1).block_n
        return heuristics.decode_segments(big, block_n, 1)
    raise ValueError(f"PORTATTN_UNIFIED_SPLIT must be unset, 0 or 1; got {env!r}")
