"""A stand-in for a Triton ``JITFunction`` in host-only tests of the fast relaunch path.

It binds and keys arguments exactly as the installed Triton's ``JITFunction.run`` does
(Triton's own binder from the kernel's signature, ``compute_cache_key``, the knobs it adds:
:func:`portattn.kernels.fast_launch.jit_run_options`), and has the attributes
:mod:`portattn.kernels.fast_launch` reads (``device_caches``, ``params``,
``pre_run_hooks``, ``used_global_vals``), but compiles nothing: subclasses say what a
"compiled kernel" is and what a launch does.
"""

from __future__ import annotations

import pytest
import triton
from triton.backends.compiler import BaseBackend
from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature

from portattn.kernels.fast_launch import jit_run_options


class JITStandIn:
    def __init__(self, fn):
        jit = JITFunction(fn)
        self.signature, self.params, self.arg_names = jit.signature, jit.params, jit.arg_names
        self.debug = False
        self.pre_run_hooks: list = []
        self.used_global_vals: dict = {}
        binder = create_function_from_signature(self.signature, self.params, BaseBackend)
        self.device_caches = {0: ({}, {}, None, BaseBackend, binder)}

    def bind(self, args, kwargs):
        """``(bound arguments, specialization, cache key, the kernel cache)`` of a call,
        as ``JITFunction.run`` computes them (``kwargs`` gains the knobs it adds)."""
        jit_run_options(kwargs, self.debug)
        kernel_cache, key_cache, _, _, binder = self.device_caches[0]
        bound, specialization, options = binder(*args, **kwargs)
        return bound, specialization, compute_cache_key(key_cache, specialization, options), \
            kernel_cache


def require_native_binder() -> None:
    """Skip the calling test where this Triton specializes tensors in Python (Triton 3.5:
    no ``supports_native_tensor_specialization``): the fast relaunch refuses such a binder,
    so no sequence is built there (test_replay_sim's
    ``test_a_binder_in_python_keeps_the_jit_path`` checks that refusal)."""
    if not getattr(BaseBackend, "supports_native_tensor_specialization", False):
        pytest.skip(f"Triton {triton.__version__} specializes tensors in Python: the fast "
                    "relaunch is off there")
