"""A device-sync spy that works on the CPU.

On a GPU, ``torch.cuda.set_sync_debug_mode("error")`` catches synchronizations. On a CPU
nothing synchronizes, so a hot path that reads a device value (``int(seq_lens.max())``,
``cu_seqlens.tolist()``, ``scale.item()``...) passes every CPU test and only stalls on a
GPU. :class:`DeviceSyncSpy` makes that visible on the CPU: it treats the tensors it is
given as if they lived on a device, follows them into every tensor computed from them
(views, slices, reductions; a ``TorchFunctionMode`` sees each torch call), and records
each host read of their values:

* ``int(t)``, ``float(t)``, ``bool(t)``, ``complex(t)``, ``t.item()``, ``t.tolist()``,
  ``t.numpy()``, ``t.cpu()``, ``t.to("cpu")``, using ``t`` as an index, printing ``t``;
* the ops that read values to size their result: ``nonzero``, ``masked_select``,
  ``unique``, ``repeat_interleave`` without ``output_size``, indexing with a boolean mask;
* comparisons that return a Python bool: ``equal``, ``allclose``, ``is_nonzero``.

Tensors that really are on a GPU count as device tensors too. Leaving the ``with`` block
raises ``AssertionError`` listing every read (kind and the portattn line that made it),
unless an exception is already on its way out. :meth:`DeviceSyncSpy.paused` lets a test
exclude code that legitimately touches host copies (Triton's interpreter runs kernels on
host copies of their arguments).
"""

from __future__ import annotations

import contextlib
import os
import traceback
import weakref

import torch
from torch.overrides import TorchFunctionMode

import portattn

Tensor = torch.Tensor

#: Calls that hand a tensor's values to the host.
HOST_READS = {
    Tensor.__int__, Tensor.__float__, Tensor.__bool__, Tensor.__complex__, Tensor.__index__,
    Tensor.item, Tensor.tolist, Tensor.numpy, Tensor.cpu, Tensor.__repr__, Tensor.__format__,
    Tensor.is_nonzero, Tensor.equal, torch.equal, Tensor.allclose, torch.allclose,
    Tensor.nonzero, torch.nonzero, Tensor.masked_select, torch.masked_select,
    Tensor.unique, torch.unique, torch.unique_consecutive, Tensor.unique_consecutive,
}


_HOST_COPIES = ("Tensor.cpu", "Tensor.numpy", "Tensor.to(cpu)")


def _name(func) -> str:
    owner = getattr(func, "__objclass__", None) or getattr(func, "__self__", None)
    prefix = "Tensor." if owner is Tensor or owner is torch._C.TensorBase else "torch."
    return prefix + getattr(func, "__name__", repr(func))


def _flat(values):
    for value in values:
        if isinstance(value, (list, tuple)):
            yield from _flat(value)
        elif isinstance(value, dict):
            yield from _flat(value.values())
        else:
            yield value


_PACKAGE = os.path.dirname(portattn.__file__) + os.sep
_SKIPPED = (os.path.abspath(__file__), os.path.dirname(torch.__file__) + os.sep)


def _where() -> str:
    """The innermost portattn source line on the stack (else the innermost line that is
    neither torch's nor this file's)."""
    frames = [f for f in traceback.extract_stack()
              if not f.filename.startswith(_SKIPPED[1]) and f.filename != _SKIPPED[0]]
    ours = [f for f in frames if f.filename.startswith(_PACKAGE)]
    frame = (ours or frames)[-1]
    return f"{os.path.basename(frame.filename)}:{frame.lineno} {frame.line}"


class DeviceSyncSpy(TorchFunctionMode):
    """``with DeviceSyncSpy(*tensors) as spy: ...`` fails if anything in the block reads
    the values of ``tensors`` (or of tensors computed from them) on the host."""

    def __init__(self, *device_tensors: Tensor):
        super().__init__()
        self._device: dict[int, weakref.ref] = {}
        self.reads: list[str] = []
        self._paused = 0
        for t in _flat(device_tensors):
            if isinstance(t, Tensor):
                self._mark(t)

    # -- bookkeeping -----------------------------------------------------------------
    def _mark(self, t: Tensor) -> None:
        self._device[id(t)] = weakref.ref(t)

    def on_device(self, t: object) -> bool:
        if not isinstance(t, Tensor):
            return False
        if t.device.type not in ("cpu", "meta"):
            return True
        ref = self._device.get(id(t))
        return ref is not None and ref() is t

    @contextlib.contextmanager
    def paused(self):
        """Reads inside this block are not recorded (and results are not followed)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    # -- the mode ----------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self._paused:
            return result
        inputs = list(_flat((args, kwargs)))
        if not any(self.on_device(a) for a in inputs):
            return result
        read = self._read_kind(func, kwargs, inputs)
        if read is not None:
            self.reads.append(f"{read} at {_where()}")
        if read not in _HOST_COPIES:  # what is computed from device tensors stays there
            for out in _flat((result,)):
                if isinstance(out, Tensor):
                    self._mark(out)
        return result

    def _read_kind(self, func, kwargs, inputs) -> str | None:
        if func in HOST_READS:
            return _name(func)
        if func is Tensor.to and any(_is_cpu(a) for a in inputs[1:]):
            return "Tensor.to(cpu)"
        if func in (torch.repeat_interleave, Tensor.repeat_interleave) and \
                kwargs.get("output_size") is None:
            return "repeat_interleave without output_size"
        if func is Tensor.__getitem__ and any(isinstance(a, Tensor) and a.dtype == torch.bool
                                              for a in inputs[1:]):
            return "boolean-mask indexing"
        return None

    def __exit__(self, exc_type, exc, tb):
        result = super().__exit__(exc_type, exc, tb)
        if exc_type is None and self.reads:
            raise AssertionError("host reads of device values (device syncs on a GPU):\n  "
                                 + "\n  ".join(self.reads))
        return result


def _is_cpu(value: object) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cpu"
    return isinstance(value, str) and value.split(":")[0] == "cpu"
