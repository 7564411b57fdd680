"""What each flash-attn interface can serve, as numbers and reasons.

Pure functions of a :class:`Problem` and the capabilities (no tensors, no imports of
flash-attn), so routing and ``explain`` work on any machine, simulated profiles included.

* FA2 (package ``flash_attn``, ``flash_attn_varlen_func`` / ``flash_attn_with_kvcache``):
  sm80+, fp16/bf16, head sizes up to 256 in multiples of 8, equal K/V head sizes, no
  quantized KV, linear ALiBi (symmetric, so causal only), a paged cache only with pages
  that are multiples of 256 keys.
* FA3 (module ``flash_attn_interface`` built from flash-attention's ``hopper/``,
  ``flash_attn_with_kvcache`` with ``page_table``): Hopper; fp16/bf16, or e4m3 q, K and V
  together with float32 descales per (sequence, kv head), head sizes then multiples of 16;
  any page size; a V head size that differs from the K head size when Q/K is in (128, 192]
  and V in (96, 128] (fp16/bf16; FA3 also takes Q/K <= 64 with V up to 512, but tests that
  only with its ``qv`` input, so we do not route it). No ALiBi, no sinks, bf16 output for
  fp8. We take FA3 on Hopper only: its fp8, paged and DiffKV kernels are Hopper kernels.
  A build made with features switched off (``FLASH_ATTENTION_DISABLE_*``) is not visible
  to the probe: such a call raises flash-attn's own error.
* FA4 (module ``flash_attn.cute``, pip ``flash-attn-4``, ``flash_attn_varlen_func`` with
  ``page_table`` and ``seqused_k``), as of 4.0.0b36: its paged kernels exist on sm90 and
  sm100/sm110 only (the sm80 and sm120 kernels assert ``page_table is None``); any page
  size (TMA loads when the page equals its key tile, per-row loads otherwise); q, K and V
  in one dtype, fp16/bf16; head sizes a multiple of 16 bytes, on sm90 8..256 for Q/K and
  V independently, on sm100 both <= 128, or 192/128, or 256/256 (its MLA shapes with a
  512-wide V are not routed); causal, sliding window (either side), softcap, learnable
  sinks; no ALiBi (only through a ``score_mod``, which we do not build). It writes q's
  dtype, so fp8 output and fp32 output are not served. fp8: FA4's kernels take e4m3/e5m2
  q/K/V with float32 descales on sm100 only, but in 4.0.0b36 only the private
  ``_flash_attn_fwd`` accepts the descales, not ``flash_attn_varlen_func``; folding our
  scales into ``softmax_scale`` instead would read device scales on the host (a sync). So
  fp8 is not routed to FA4 (:data:`FA4_PUBLIC_FP8`), and the reason says so.
"""

from __future__ import annotations

import torch

from portattn.types import FP8_DTYPES

FA_HALF_DTYPES = (torch.float16, torch.bfloat16)
FA_MAX_HEAD_SIZE = 256
FA_HEAD_SIZE_STEP = 8
FA3_FP8_HEAD_SIZE_STEP = 16
FA2_PAGE = 256  # FA2 reads a paged cache only when its pages are multiples of this
FA_MIN_CC = (8, 0)
FA3_CC_MAJOR = 9
FA3_FP8_KV = "fp8_per_tensor:e4m3fn"  # the only quantized cache FA3 reads (scalar descales)
FA3_INSTALL_HINT = ("build FA3 from flash-attention's hopper/ folder "
                    "(cd hopper && python setup.py install)")


def machine_reasons(problem, caps) -> list[str]:
    """Reasons no flash-attn interface can run this call here at all."""
    reasons: list[str] = []
    if not caps.flash_attn.ok:
        reasons.append(caps.flash_attn.reason or "flash-attn is not usable here")
    if problem.device_type != "cuda" or caps.vendor != "nvidia":
        reasons.append("flash-attn runs on NVIDIA CUDA GPUs only "
                       f"(tensors on {problem.device_type}, vendor {caps.vendor})")
    elif caps.compute_capability is not None and tuple(caps.compute_capability) < FA_MIN_CC:
        reasons.append(f"flash-attn needs compute capability 8.0+ (this is {caps.arch})")
    return reasons


def _head_size_reasons(problem, who: str, step: int = FA_HEAD_SIZE_STEP) -> list[str]:
    size = problem.head_size_qk
    if size > FA_MAX_HEAD_SIZE or size % step:
        return [f"{who} supports head sizes up to {FA_MAX_HEAD_SIZE} in multiples of "
                f"{step}, not {size}"]
    return []


def fa2_reasons(problem, *, gather: bool) -> list[str]:
    """What FA2 cannot do for ``problem``; ``gather``: the pages are copied to 256 keys."""
    reasons: list[str] = []
    if problem.q_dtype not in FA_HALF_DTYPES:
        reasons.append(f"flash-attn supports float16/bfloat16 q, not {problem.q_dtype}")
    if problem.quantized_kv:
        reasons.append(f"flash-attn 2 does not read a quantized KV cache ({problem.kv_quant})")
    if problem.out_dtype != problem.q_dtype:
        reasons.append(f"flash-attn 2 writes the output in q's dtype, not "
                       f"{problem.out_dtype}" + (" (fp8 output is not supported)"
                                                 if problem.fp8_output else ""))
    if problem.diffkv:
        reasons.append(f"flash-attn 2 needs equal K and V head sizes (DiffKV "
                       f"{problem.head_size_qk}/{problem.head_size_v})")
    reasons += _head_size_reasons(problem, "flash-attn")
    if problem.sinks:
        reasons.append("flash-attn 2 has no attention sinks")
    if problem.alibi == "sqrt":
        reasons.append("flash-attn 2 has no sqrt ALiBi (only linear)")
    elif problem.alibi == "linear" and not problem.causal:
        reasons.append("flash-attn 2's ALiBi is symmetric (-slope*|p-k|): it matches ours "
                       "only with causal=True")
    if not gather and problem.block_size % FA2_PAGE:
        reasons.append(f"flash-attn 2 reads a paged cache only when the block size is a "
                       f"multiple of {FA2_PAGE} (got {problem.block_size})"
                       + ("" if reasons else "; flash_attn_gather serves it with a copy"))
    return reasons


def fa3_diffkv_supported(head_size_qk: int, head_size_v: int) -> bool:
    """The differing K/V head sizes we route to FA3: Q/K in (128, 192], V in (96, 128]."""
    return 128 < head_size_qk <= 192 and 96 < head_size_v <= 128


def fa_out_dtype(q_dtype: torch.dtype) -> torch.dtype:
    """The dtype FA3 and FA4 write: q's for fp16/bf16, bf16 for fp8 inputs."""
    return q_dtype if q_dtype in FA_HALF_DTYPES else torch.bfloat16


def fa3_reasons(problem, caps) -> list[str]:
    """What FA3 (``flash_attn_interface``) cannot do for ``problem`` on this machine,
    whether or not it is installed (the caller says that part)."""
    who = "FA3 (flash_attn_interface)"
    reasons: list[str] = []
    cc = caps.compute_capability
    if cc is not None and cc[0] != FA3_CC_MAJOR:
        reasons.append(f"portattn takes {who} on Hopper (sm90) only, where its fp8, paged "
                       f"and DiffKV kernels run; this is {caps.arch}")
    fp8_q = problem.q_dtype == torch.float8_e4m3fn
    if fp8_q:
        if problem.kv_quant != FA3_FP8_KV:
            reasons.append(f"{who} takes an e4m3 q only with an e4m3 KV cache with per-tensor "
                           f"scales (fp8_per_tensor), not {problem.kv_quant}")
    elif problem.q_dtype not in FA_HALF_DTYPES:
        reasons.append(f"{who} supports float16/bfloat16 or float8_e4m3fn q, not "
                       f"{problem.q_dtype}")
    elif problem.quantized_kv:
        reasons.append(f"{who} reads a quantized cache ({problem.kv_quant}) only with an e4m3 "
                       "q (q, K and V in one dtype): pass an fp8 q with q_scale"
                       if problem.kv_quant == FA3_FP8_KV else
                       f"{who} reads no {problem.kv_quant} cache (only fp8_per_tensor e4m3 "
                       "with an e4m3 q)")
    if problem.out_dtype != fa_out_dtype(problem.q_dtype):
        reasons.append(f"{who} writes {fa_out_dtype(problem.q_dtype)} here, not "
                       f"{problem.out_dtype}")
    reasons += _head_size_reasons(problem, who + (" with fp8" if fp8_q else ""),
                                  FA3_FP8_HEAD_SIZE_STEP if fp8_q else FA_HEAD_SIZE_STEP)
    if problem.diffkv:
        if not fa3_diffkv_supported(problem.head_size_qk, problem.head_size_v):
            reasons.append(f"{who} serves a different V head size here only for Q/K in "
                           f"(128, 192] with V in (96, 128] (got "
                           f"{problem.head_size_qk}/{problem.head_size_v})")
        elif fp8_q or problem.head_size_v % FA_HEAD_SIZE_STEP:
            reasons.append(f"{who} needs fp16/bf16 and a V head size that is a multiple of "
                           f"{FA_HEAD_SIZE_STEP} for DiffKV (got {problem.head_size_v}, "
                           f"{problem.q_dtype})")
    if problem.sinks:
        reasons.append(f"{who} has no attention sinks")
    if problem.alibi != "none":
        reasons.append(f"{who} has no ALiBi")
    return reasons


# --------------------------------------------------------------------------- FA4

FA4 = "FA4 (flash_attn.cute)"
FA4_PAGED_CC_MAJORS = (9, 10, 11)  # sm90, sm100/sm103, sm110: the kernels that take page_table
FA4_FP8_CC_MAJOR = 10              # interface.py: "FP8 is only supported on SM100"
FA4_FP8_DTYPES = FP8_DTYPES
#: Whether FA4's public varlen call takes fp8 descales (False in 4.0.0b36; when a release
#: adds q_descale/k_descale/v_descale to flash_attn_varlen_func, flip this, pass them in
#: flash_attn_calls.fa4_paged and test them).
FA4_PUBLIC_FP8 = False
FA4_NO_PUBLIC_FP8 = ("flash-attn-4 4.0.0b36's flash_attn_varlen_func takes no fp8 descales "
                     "(only its private _flash_attn_fwd does), so portattn does not route fp8 "
                     "to FA4; triton_unified reads fp8 caches")
FA4_HEAD_SIZE_RANGE = (8, 256)
FA4_SM100_WIDE_HEADS = ((192, 128), (256, 256))  # beyond 128/128 on sm100 (MLA 512 aside)
FA4_ALIGN_BYTES = 16               # head sizes and strides: a multiple of 16 bytes
FA4_INSTALL_HINT = ("pip install flash-attn-4 (or portattn[flash-attn-4]): no build, its "
                    "kernels compile on first use")



def _fa4_head_size_reasons(problem, cc_major: int | None) -> list[str]:
    element_bytes = 1 if problem.q_dtype in FA4_FP8_DTYPES else 2
    step = FA4_ALIGN_BYTES // element_bytes
    qk, v = problem.head_size_qk, problem.head_size_v
    lo, hi = FA4_HEAD_SIZE_RANGE
    aligned = qk % step == 0 and v % step == 0
    if cc_major == 9:
        if lo <= qk <= hi and lo <= v <= hi and aligned:
            return []
        return [f"{FA4} on sm90 supports Q/K and V head sizes from {lo} to {hi} in multiples "
                f"of {step}, not {qk}/{v}"]
    if (lo <= qk <= 128 and lo <= v <= 128 or (qk, v) in FA4_SM100_WIDE_HEADS) and aligned:
        return []
    return [f"{FA4} on sm100 supports Q/K and V head sizes up to 128 (multiples of {step}), "
            f"192/128 or 256/256, not {qk}/{v}"]


def _fa4_dtype_reasons(problem, cc_major: int | None, arch: str) -> list[str]:
    q_dtype = problem.q_dtype
    if q_dtype in FA4_FP8_DTYPES:
        reasons = []
        if cc_major is not None and cc_major != FA4_FP8_CC_MAJOR:
            reasons.append(f"{FA4} runs fp8 only on sm100 (compute capability 10.x); this is "
                           f"{arch}: pass a float16/bfloat16 q and an unquantized cache")
        if not FA4_PUBLIC_FP8:
            reasons.append(FA4_NO_PUBLIC_FP8)
        fmt = str(q_dtype).replace("torch.float8_", "")
        if problem.kv_quant != f"fp8_per_tensor:{fmt}":
            reasons.append(f"{FA4} takes an fp8 q only with a cache of the same format and "
                           f"per-tensor scales (fp8_per_tensor:{fmt}; q, K and V in one "
                           f"dtype), not {problem.kv_quant}")
        return reasons
    if q_dtype not in FA_HALF_DTYPES:
        return [f"{FA4} supports float16/bfloat16 q, not {q_dtype}"]
    if problem.kv_quant.startswith("fp8_per_tensor"):
        return [f"{FA4} reads an fp8 cache ({problem.kv_quant}) only with a q of the same "
                "fp8 format (q, K and V in one dtype), on sm100, and " + FA4_NO_PUBLIC_FP8]
    if problem.quantized_kv:
        return [f"{FA4} reads no {problem.kv_quant} cache (scales per token and head); "
                "triton_unified does"]
    return []


def fa4_reasons(problem, caps) -> list[str]:
    """What FA4 (``flash_attn.cute``) cannot do for ``problem`` on this machine, whether or
    not it is installed (the caller says that part)."""
    cc = caps.compute_capability
    cc_major = None if cc is None else cc[0]
    if cc_major is not None and cc_major not in FA4_PAGED_CC_MAJORS:
        return [f"{FA4} reads a paged cache only on sm90 and sm100/sm110 (its kernels for "
                f"sm80 and sm120 take no page_table); this is {caps.arch}"]
    reasons = _fa4_dtype_reasons(problem, cc_major, caps.arch)
    expected_out = fa_out_dtype(problem.q_dtype)
    if problem.out_dtype != expected_out:
        reasons.append(f"{FA4} writes {expected_out} here, not {problem.out_dtype}"
                       + (" (fp8 output is not supported)" if problem.fp8_output else ""))
    reasons += _fa4_head_size_reasons(problem, cc_major)
    if problem.alibi != "none":
        reasons.append(f"{FA4} has no ALiBi input (it would take a score_mod, which "
                       "portattn does not build); triton_unified serves ALiBi")
    return reasons
