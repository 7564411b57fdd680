"""``triton_diffkv``: our Triton kernels for calls whose K and V head sizes differ.

Models such as MiMo keep keys wider than values (e.g. 192 and 128), often in one packed
cache ``[num_blocks, block_size, num_kv_heads, head_size_qk + head_size_v]``
(:meth:`portattn.PagedKVCache.from_packed`). This backend is the unified kernel with its
second head size (``HEAD_QK`` / ``HEAD_V``), sharing its heuristics, launcher and every
feature (quantized caches, fp8 q and output included): a name of its own in the registry
so ``explain`` says which shape of the kernel serves a call, not a forked kernel.
"""

from __future__ import annotations

from portattn.backends.triton_unified import TritonUnified, kernel_reasons


class TritonDiffKV(TritonUnified):
    name = "triton_diffkv"
    summary = ("our Triton kernels for K and V head sizes that differ (DiffKV, packed "
               "caches too): the unified kernel with a second head size")

    def why_not(self, problem, caps) -> list[str]:
        reasons = kernel_reasons(problem, caps)
        if not problem.diffkv:
            reasons.append(f"K and V head sizes are equal ({problem.head_size_qk}): this "
                           "backend takes differing ones (triton_unified takes equal ones)")
        return reasons

    def unavailable(self, caps) -> list[str]:
        from portattn.dispatch.problem import Problem

        plain = Problem.make(device_type=caps.device_type, dtype="float16", head_size=192,
                             head_size_v=128)
        return self.why_not(plain, caps)
