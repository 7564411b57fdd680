"""Whether elements of strided tensors share memory, from host facts only (shapes,
strides, data pointers; no device value is read): one tensor with itself
(:func:`overlaps_itself`, e.g. an ``expand``ed view) and two views of one buffer
(:func:`share_elements`). The checks of ``out`` (:mod:`portattn.validation`) and of the
tensors :meth:`portattn.PagedKVCache.write` stores into use them.
"""

from __future__ import annotations

import torch


def overlaps_itself(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may share memory (e.g. an ``expand``ed tensor): its
    dimensions of size > 1, by stride, must each step past the span of the smaller ones
    (a sufficient rule: a few exotic ``as_strided`` layouts without overlap fail it too).
    Ordered by comparisons, not ``sorted``: Dynamo cannot sort the symbolic strides of
    ``torch.compile(dynamic=True)`` (equal strides overlap in either order)."""
    dims = [(st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1]
    span = 1
    while dims:
        smallest = 0
        for i in range(1, len(dims)):
            if dims[i][0] < dims[smallest][0]:
                smallest = i
        stride, size = dims.pop(smallest)
        if stride < span:
            return True
        span = stride * size
    return False


def share_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether an element of ``a`` and one of ``b`` may lie at the same address (host
    facts only: data pointers, shapes, strides). Exact for two views with the same
    element size and strides (over the dimensions either steps through), each free of
    self-overlap (the packed cache layouts: K and V interleave without sharing an
    element); otherwise whether their address ranges meet (a conservative answer for
    views that interleave with different strides). False for tensors without memory
    (``meta``; fake ones while ``torch.compile`` traces): the checks run again on the
    real tensors."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device or \
            a.device.type == "meta" or _is_fake(a) or _is_fake(b):
        return False  # no memory to tell by (meta tensors; fake ones while tracing)
    # by address, not by storage object: two storages may hold the same memory (DLPack,
    # NumPy views), and tensors that are apart never meet in the address ranges below
    a_lo, a_hi = _byte_range(a)
    b_lo, b_hi = _byte_range(b)
    if a_hi <= b_lo or b_hi <= a_lo:
        return False
    size = a.element_size()
    if b.element_size() != size or a.dim() != b.dim() or \
            (b.data_ptr() - a.data_ptr()) % size:
        return True
    # the dimensions either view steps through (strides of size-1 ones do not matter)
    steps = [(sa, sb, na, nb) for sa, sb, na, nb in zip(a.stride(), b.stride(), a.shape,
                                                        b.shape) if na > 1 or nb > 1]
    if any(sa != sb for sa, sb, _, _ in steps):
        return True
    # b's element j sits on a's element i where delta = sum((i_d - j_d) * stride_d)
    dims = sorted(((sa, na, nb) for sa, _, na, nb in steps), reverse=True)
    return _lattice_hit((b.data_ptr() - a.data_ptr()) // size, dims)


def storage_span(t: torch.Tensor) -> tuple[int, int] | None:
    """The address range ``[lo, hi)`` of ``t``'s whole storage (1 us where
    :func:`share_elements` takes 15: two tensors whose storages' ranges do not meet share
    no element), or None for a tensor without one to tell by (fake ones while
    ``torch.compile`` traces, or under a ``FakeTensorMode``; a ``meta`` tensor's range
    starts at 0, where no real tensor's does)."""
    if torch.compiler.is_compiling() or (type(t) is not torch.Tensor and _is_fake(t)):
        return None  # (a plain tensor skips the slower fake check: one type test)
    try:
        storage = t.untyped_storage()
        lo = storage.data_ptr()
        return lo, lo + storage.nbytes()
    except (RuntimeError, NotImplementedError):  # no storage (a fake or functional tensor)
        return None


def _is_fake(t: torch.Tensor) -> bool:
    """A FakeTensor (``torch.compile`` tracing): it has no address to compare."""
    if torch.compiler.is_compiling():
        return True
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    lo = hi = t.data_ptr()
    for size, stride in zip(t.shape, t.stride()):
        reach = (size - 1) * stride * t.element_size()
        lo, hi = (lo + reach, hi) if reach < 0 else (lo, hi + reach)
    return lo, hi + t.element_size()


def _lattice_hit(delta: int, dims: list) -> bool:
    """Whether ``delta == sum(c_d * stride_d)`` for integers ``-(nb_d - 1) <= c_d <=
    na_d - 1`` (``dims``: (stride, na, nb), largest stride first); True where the search
    would branch widely (layouts this is not meant for: an answer on the safe side)."""
    if not dims:
        return delta == 0
    (stride, na, nb), rest = dims[0], dims[1:]
    if stride <= 0:  # torch makes no negative strides; zero ones: the safe answer
        return True
    low = sum(min(-(m - 1) * st, (n - 1) * st) for st, n, m in rest)
    high = sum(max(-(m - 1) * st, (n - 1) * st) for st, n, m in rest)
    # c * stride must leave a remainder in [low, high], which the smaller dimensions reach
    first = max(-(nb - 1), -((high - delta) // stride))
    last = min(na - 1, (delta - low) // stride)
    if last - first > 8:
        return True
    return any(_lattice_hit(delta - c * stride, rest) for c in range(first, last + 1))
