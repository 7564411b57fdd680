"""Which K/V loads a Triton plan uses: pointer loads or tensor descriptors (TMA).

:func:`choose_kv_load` adds ``kv_load`` (``"pointer"`` / ``"descriptor"``) and
``kv_load_reason`` to a plan's parameters, so ``explain`` and ``report`` say which loads
serve a call and why. The rule, in order:

1. ``PORTATTN_TD=0``: pointer loads.
2. Eligibility (:func:`portattn.kernels.kv_load.problem_reasons`: block size, head sizes)
   and, unless forced, the probe's descriptor check (``caps.tensor_descriptors``).
3. Unset (auto): descriptors only for problem classes that measurements on this device
   say they win (:data:`portattn.kernels.heuristics.DESCRIPTOR_PREFERRED`: from the H200
   measurements: sm90, 16-bit caches, head 128, prefill and mixed launches at blocks 64
   and 128, DiffKV 192/128 prefill at 128; bf16 measured, fp16 has the same tiles and
   loads; pointer loads elsewhere).
   ``PORTATTN_TD=1``: descriptors wherever eligible.
4. The functional gate (:mod:`portattn.capabilities.kv_descriptor_gate`): the variant
   compiled and ran against pointer loads on this machine (cached on disk). A simulated
   device reports its profile's ``tensor_descriptors`` check instead of running anything.

Failing a step: pointer loads with the reason in auto; ``UnsupportedError`` with the
reason under ``PORTATTN_TD=1``. Tensor alignment (16-byte base and strides) is only known
at launch: :func:`portattn.kernels.launch.launch_unified` checks it (``InputError`` naming
the cache when forced, pointer loads otherwise). In auto, a descriptor launch that still
raises (a switch combination the gate's tiny problem did not compile) is rerun with
pointer loads, remembered for the process and logged once (WARNING); plans made after it
take pointer loads for that problem class, with the failure as their reason
(:func:`descriptor_failure`).
"""

from __future__ import annotations

import sys

from portattn.errors import UnsupportedError
from portattn.kernels import heuristics
from portattn.kernels import kv_load as kv_load_rules


def _td_setting() -> bool | None:
    from portattn import settings

    return settings.TENSOR_DESCRIPTORS.value()  # InputError naming it when invalid


def _gate_device(caps) -> str:
    if caps.device_type != "cuda":
        return caps.device_type
    index = getattr(caps, "device_index", None)
    if index is not None:  # the probed GPU (several GPUs in one process)
        return f"cuda:{index}"
    import torch

    return f"cuda:{torch.cuda.current_device()}"


def _pointer(params: dict, reason: str) -> dict:
    return {**params, "kv_load": "pointer", "kv_load_reason": reason}


def _refuse(reasons: list[str]) -> UnsupportedError:
    return UnsupportedError("PORTATTN_TD=1 forces descriptor (TMA) K/V loads, which cannot "
                            "serve this call", {"tensor descriptors": reasons})


def gate_variants(problem, params: dict) -> list[dict]:
    """The gate's variant keys of a descriptor plan (one per distinct tile length)."""
    kv_dtype = str(problem.kv_dtype).replace("torch.", "")
    block_ns = sorted({params[k]["block_n"] for k in ("short", "long") if k in params})
    from portattn.capabilities.kv_descriptor_gate import variant_key

    return [variant_key(kv_dtype=kv_dtype, quant=problem.kv_quant,
                        head_qk=problem.head_size_qk, head_v=problem.head_size_v,
                        block_size=problem.block_size, block_n=n,
                        fp8_dot=bool(params.get("fp8_dot")),
                        kv_bits=params.get("kv_bits"),
                        v_pairs=bool(params.get("v_pairs"))) for n in block_ns]


def choose_kv_load(problem, caps, shape: heuristics.Shape, params: dict) -> dict:
    """``params`` with ``kv_load`` and ``kv_load_reason`` set (see the module doc)."""
    setting = _td_setting()
    if setting is False:
        return _pointer(params, "PORTATTN_TD=0 forbids descriptor loads")
    reasons = kv_load_rules.problem_reasons(
        block_size=problem.block_size, head_size_qk=problem.head_size_qk,
        head_size_v=problem.head_size_v, elem_bytes=shape.elem_bytes)
    if not caps.tensor_descriptors.ok and setting is not True:
        reasons.append(caps.tensor_descriptors.reason or "the probe's descriptor check "
                       "failed here")
    if reasons:
        if setting is True:
            raise _refuse(reasons)
        return _pointer(params, "; ".join(reasons))
    if setting is True:
        why = "PORTATTN_TD=1"
    else:
        wanted, why = heuristics.prefers_descriptors(shape, params["mode"],
                                                     problem.block_size)
        if not wanted:
            return _pointer(params, why)
    descriptor = kv_load_rules.descriptor_params(params, problem.block_size)
    failed = descriptor_failure(problem, descriptor)
    if failed is not None and setting is not True:
        return _pointer(params, "descriptor (TMA) K/V loads failed for this problem class "
                        f"in this process: {failed}")
    failures = []
    if caps.simulated:
        if not caps.tensor_descriptors.ok:
            failures.append(f"simulated {caps.profile}: {caps.tensor_descriptors.reason}")
    else:
        from portattn.capabilities import kv_descriptor_gate

        device = _gate_device(caps)
        for variant in gate_variants(problem, descriptor):
            result = kv_descriptor_gate.check_variant(caps, variant, device)
            if not result["ok"]:
                failures.append(f"descriptor variant (block_n {variant['block_n']}) failed "
                                f"its check on this machine: {result['reason']}")
    if failures:
        if setting is True:
            raise _refuse(failures)
        return _pointer(params, "; ".join(failures))
    descriptor["kv_load_reason"] = why
    if setting is True:
        descriptor["_kv_load_forced"] = True
    return descriptor


def choose_staging(problem, caps, shape: heuristics.Shape, params: dict) -> dict:
    """``params`` with ``stage`` (the staging launch, :mod:`portattn.kernels.stage`) and
    ``stage_long`` (the prefill tile over the staged blocks) where a prefill or mixed
    plan's long part reads staged 16-bit blocks of 128 slots with descriptor loads, and
    ``stage_reason`` saying why it does or does not. Staging needs what descriptor loads
    need (``PORTATTN_TD`` not 0, the probe's check, the functional gate on the staged
    variant: this cache's dtype and quant mode, q's dtype, the staged tile) plus
    :func:`portattn.kernels.heuristics.staging_reasons`; fp8 caches only where the GPU
    converts fp8 (the staging kernel casts the codes)."""
    import torch

    q_bits = 16 if problem.q_dtype in (torch.float16, torch.bfloat16) else 0
    reasons = heuristics.staging_reasons(shape, params["mode"], problem.block_size, q_bits)
    if params.get("fp8_dot"):
        reasons.append("fp8 q runs its QK^T on fp8 tensor cores over the cache's codes")
    if params.get("kv_bits") in ("e4m3fn", "e5m2"):
        reasons.append("this GPU has no fp8 conversion for the cache's format (the staging "
                       "kernel casts the codes)")
    if _td_setting() is False:
        reasons.append("PORTATTN_TD=0 forbids descriptor loads (the staged loop uses them)")
    elif not caps.tensor_descriptors.ok:
        reasons.append(caps.tensor_descriptors.reason or "the probe's descriptor check "
                       "failed here")
    stage = heuristics.stage_config(shape)
    staged_long = heuristics.staged_long_config(shape)
    reasons += kv_load_rules.problem_reasons(
        block_size=stage["block"], head_size_qk=problem.head_size_qk,
        head_size_v=problem.head_size_v, elem_bytes=2)
    if not reasons and not caps.simulated:
        from portattn.capabilities import kv_descriptor_gate
        from portattn.capabilities.kv_descriptor_gate import variant_key

        variant = variant_key(kv_dtype=str(problem.kv_dtype).replace("torch.", ""),
                              quant=problem.kv_quant, head_qk=problem.head_size_qk,
                              head_v=problem.head_size_v, block_size=problem.block_size,
                              block_n=staged_long["block_n"],
                              staged={**staged_long,
                                      "q_dtype": str(problem.q_dtype).replace("torch.", "")})
        result = kv_descriptor_gate.check_variant(caps, variant, _gate_device(caps))
        if not result["ok"]:
            reasons.append(f"the staged descriptor variant failed its check on this "
                           f"machine: {result['reason']}")
    if reasons:
        return {**params, "stage_reason": "; ".join(reasons)}
    return {**params, "stage": stage, "stage_long": staged_long,
            "stage_reason": f"measured faster here (heuristics.STAGED_PREFERRED); the keys "
                            f"of sequences with >= {stage['min_q']} queries are staged, "
                            f"shorter ones read the cache"}


def descriptor_failure(problem, descriptor: dict) -> str | None:
    """Why a descriptor launch of ``problem``'s class with the plan's ``descriptor``
    parameters failed earlier in this process (``kernels.launch.DESCRIPTOR_CLASS_FAILED``),
    or None. Nothing can have failed before the launchers were imported, so they are not
    imported here (that would define the kernels)."""
    launch = sys.modules.get("portattn.kernels.launch")
    if launch is None or not launch.DESCRIPTOR_CLASS_FAILED:
        return None
    key = launch.descriptor_class_key(
        descriptor, problem.q_dtype, problem.num_q_heads, problem.num_kv_heads,
        problem.head_size_qk, problem.head_size_v, problem.block_size, problem.causal,
        problem.sliding_window, problem.softcap, problem.alibi, problem.sinks,
        heuristics.quant_mode(problem.kv_quant), problem.out_dtype)
    return launch.DESCRIPTOR_CLASS_FAILED.get(key)
