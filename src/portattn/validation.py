"""Input checks for :func:`portattn.attention` and :func:`portattn.explain`, run before any
kernel launches. Every failure is an :class:`~portattn.errors.InputError` naming the
argument, what was expected and what came.

Always checked (host-side facts only: shapes, dtypes, devices, strides; no device value
is read, so these cost no synchronization and run on every call that misses the fast
path):

* ``q``: a 3-D tensor of a float dtype (fp8 with ``q_scale``), last dimension contiguous,
  on a device that holds data (not ``meta``), on the cache's device, with the cache's
  ``head_size_qk`` and a positive multiple of ``num_kv_heads`` query heads; an unquantized
  cache has q's dtype; scale caches live on q's device;
* the metadata: ``cu_seqlens_q`` int32 ``[B + 1]``, ``seq_lens`` int32 ``[B]``,
  ``block_table`` int32 ``[B, max_blocks]`` with a contiguous last dimension, all on q's
  device; ``max_seqlen_q`` / ``max_seqlen_k`` None or host ints >= 0;
* the options (:mod:`portattn.options`): scale, causal, window, softcap, ALiBi slopes and
  sinks (shape, dtype, device, contiguity), ``q_scale`` / ``output_scale`` / ``out``;
* the cache itself when it is built (:class:`~portattn.types.PagedKVCache`): shapes,
  storage dtype for the quant mode, contiguous last dimension, data on a real device.

Value checks (:func:`check_values`) read the metadata, which synchronizes with a GPU. They
run automatically when the metadata lives on the CPU, and for GPU metadata only with
``validate=True`` or ``PORTATTN_VALIDATE=1`` (``validate=False`` / ``PORTATTN_VALIDATE=0``
turn them off everywhere):

* ``cu_seqlens_q`` starts at 0, never decreases and ends at ``q``'s token count;
* every ``seq_lens[b]`` is at least its query length and at most the block table's
  capacity (``max_blocks * block_size``);
* ``max_seqlen_q`` / ``max_seqlen_k``, when given, are at least the real maxima;
* every block id in the visible part of the block table is in ``[0, num_blocks)``.

Not checked by default on a GPU: those metadata values. A wrong value there never makes
a kernel read or write out of bounds, and it does not pass silently either:

* a block id outside ``[0, num_blocks)`` in the visible part of a block table is never
  dereferenced; the rows that meet one come out NaN;
* so do the rows whose ``seq_lens`` reach past the block table's capacity, and the rows of
  a sequence with more queries than an understated ``max_seqlen_q`` lets the launch cover;
* the cache write (:meth:`~portattn.types.PagedKVCache.write`): slots outside the cache are
  skipped (on the CPU they raise ``InputError``).

Scales given as GPU tensors (the ``KVQuant`` scales, ``q_scale``, ``output_scale``) are
range-checked (positive normal float32 values) only with ``validate=True``
(:func:`check_scale_values`); floats and CPU tensors are checked at once, and CPU tensors
again on every call whose metadata values are checked (they may change in place).

The other value checks have no such guard: a ``cu_seqlens_q`` that decreases or
disagrees with ``q``'s token count, or an understated ``max_seqlen_k``, is not caught on a
GPU without ``validate=True``. An understated ``max_seqlen_k`` makes NaN the rows that
would see keys past a staged prefill's bound (see :mod:`portattn.planning`). A bad
``cu_seqlens_q`` stays inside ``q`` and ``out`` in the Triton backends: every kernel clamps
each sequence's span into q's rows (:func:`portattn.kernels.common.clamp_span`), so an
entry past q's token count or below 0 never makes them read or write outside those
tensors (session 40's audit saw an H100 write 512 to 9472 elements past ``out`` before
the clamp). The values are still wrong: a span cut at q's end is attended as a shorter
sequence, spans that overlap (a decreasing ``cu_seqlens_q``) write the same rows twice,
and rows no span covers are not written. Where ``cu_seqlens_q`` stays non-decreasing
(entries past q's end, a first entry below 0), the sequences whose spans lie inside q
come out right; a decreasing one can leave rows of any sequence wrong, unwritten or NaN
(tiles are found by a binary search that needs order; overlapping spans can take every
staging slot). flash-attn's backends pass ``cu_seqlens_q`` on as it is (their
kernels do not bound it), and the PyTorch reference makes NaN the rows of a sequence
that runs past q. Use ``validate=True`` while developing, and whenever the metadata comes
from an untrusted source.
"""

from __future__ import annotations

import torch

from portattn import settings
from portattn.errors import InputError
from portattn.overlap import overlaps_itself, share_elements
from portattn.types import (
    FLOAT_DTYPES,
    FP8_DTYPES,
    AttentionMetadata,
    PagedKVCache,
    _describe,
    check_has_data,
    check_scale_value,
    check_strided,
    is_numpy_bool_type,
)


def validation_requested(validate: bool | None) -> bool | None:
    """``validate`` argument, else ``PORTATTN_VALIDATE`` (unset -> None = automatic)."""
    if validate is not None:
        if isinstance(validate, bool):
            return validate
        if is_numpy_bool_type(type(validate)):
            return bool(validate)  # numpy's True / False
        raise InputError("validate", "None, True or False", _describe(validate))
    value: bool | None = settings.VALIDATE.value()
    return value


def check_structure(q: torch.Tensor, cache: PagedKVCache, metadata: AttentionMetadata) -> None:
    """Shapes, dtypes, devices and layouts of q, the cache and the metadata."""
    if not isinstance(cache, PagedKVCache):
        raise InputError("cache", "a portattn.PagedKVCache", _describe(cache))
    if not isinstance(metadata, AttentionMetadata):
        raise InputError("metadata", "a portattn.AttentionMetadata", _describe(metadata))
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise InputError("q", "a 3-D tensor [num_tokens, num_q_heads, head_size_qk]",
                         _describe(q))
    check_strided("q", q)
    check_has_data("q", q)  # every other tensor must be on q's device
    cache.check_fields()  # reassigned attributes; scale caches on the cache's device
    if q.dtype not in FLOAT_DTYPES + FP8_DTYPES:
        raise InputError("q", "dtype float16, bfloat16, float32 (or fp8 with q_scale)",
                         str(q.dtype))
    if q.stride(-1) != 1:
        raise InputError("q", "a contiguous last dimension (stride 1)",
                         f"strides {tuple(q.stride())}")
    if q.device != cache.device:
        raise InputError("q", f"device {cache.device} (the cache's)", str(q.device))
    if q.shape[2] != cache.head_size_qk:
        raise InputError("q", f"head size {cache.head_size_qk} (the key cache's last dim)",
                         f"{q.shape[2]} (shape {tuple(q.shape)})")
    num_q_heads, num_kv_heads = q.shape[1], cache.num_kv_heads
    if num_q_heads == 0 or num_q_heads % num_kv_heads:
        raise InputError("q", f"num_q_heads a positive multiple of num_kv_heads={num_kv_heads}",
                         f"num_q_heads={num_q_heads}")
    if cache.quant.mode == "none" and q.dtype in FLOAT_DTYPES and cache.dtype != q.dtype:
        raise InputError("cache", f"dtype {q.dtype} like q for an unquantized cache",
                         str(cache.dtype))

    _check_int_tensor("metadata.cu_seqlens_q", metadata.cu_seqlens_q, 1, q.device)
    _check_int_tensor("metadata.seq_lens", metadata.seq_lens, 1, q.device)
    _check_int_tensor("metadata.block_table", metadata.block_table, 2, q.device)
    num_seqs = metadata.seq_lens.shape[0]
    if metadata.cu_seqlens_q.shape[0] != num_seqs + 1:
        raise InputError("metadata.cu_seqlens_q", f"[num_seqs + 1] = [{num_seqs + 1}] entries "
                         "(num_seqs from seq_lens)", str(metadata.cu_seqlens_q.shape[0]))
    if metadata.block_table.shape[0] != num_seqs:
        raise InputError("metadata.block_table", f"{num_seqs} rows (one per sequence)",
                         f"{metadata.block_table.shape[0]} rows")
    if metadata.block_table.stride(1) != 1:
        raise InputError("metadata.block_table", "a contiguous last dimension",
                         f"strides {tuple(metadata.block_table.stride())}")
    for name in ("max_seqlen_q", "max_seqlen_k"):
        value = getattr(metadata, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 0):
            raise InputError(f"metadata.{name}", "None or a host int >= 0", _describe(value))


def check_out(q: torch.Tensor, cache: PagedKVCache, out: torch.Tensor | None,
              out_dtype: torch.dtype) -> None:
    """``out``: shape ``[num_tokens, num_q_heads, head_size_v]``, the result dtype, a
    contiguous last dimension, q's device; written in place, so no grad, no two
    elements at one address, q itself or no element of q's, and no element of the
    cache's (its keys, values or scales would change under the kernels' reads). Like
    every host fact, checked when a call's structure is first seen: a later call of the
    same shapes and strides is not checked again, whatever its pointers."""
    if out is not None:
        want = (q.shape[0], q.shape[1], cache.head_size_v)
        check_strided("out", out)  # a nested tensor has no one shape
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
            raise InputError("out", f"a tensor of shape {list(want)}", _describe(out))
        if out.dtype != out_dtype:
            raise InputError("out", f"dtype {out_dtype}", str(out.dtype))
        if out.stride(-1) != 1:
            raise InputError("out", "a contiguous last dimension", f"strides {out.stride()}")
        if out.device != q.device:
            raise InputError("out", f"device {q.device} (q's)", str(out.device))
        if out.requires_grad:
            raise InputError("out", "a tensor that does not require grad (it is written in "
                             "place)", "requires_grad=True")
        if overlaps_itself(out):
            raise InputError("out", "a tensor whose elements cannot share memory (each "
                             "dimension's stride past the span of the smaller ones)",
                             f"shape {tuple(out.shape)} with strides {out.stride()}")
        if share_elements(out, q) and not _same_view(out, q):
            # a kernel's program would overwrite q rows another one has yet to read
            raise InputError("out", "q itself (in place) or memory apart from q's",
                             "a view sharing some of q's elements")
        for name in ("key_cache", "value_cache", "k_scale_cache", "v_scale_cache"):
            held = getattr(cache, name)
            if held is not None and share_elements(out, held):  # written while read
                raise InputError("out", "memory apart from the cache's tensors",
                                 f"a view sharing elements of cache.{name}")


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and \
        a.shape == b.shape and a.stride() == b.stride()


def _check_int_tensor(name: str, t: torch.Tensor, dims: int, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != dims:
        raise InputError(name, f"a {dims}-D int32 tensor", _describe(t))
    check_strided(name, t)
    if t.dtype != torch.int32:
        raise InputError(name, "dtype torch.int32", str(t.dtype))
    if t.device != device:
        raise InputError(name, f"device {device} (q's)", str(t.device))
    if t.dim() == 1 and t.shape[0] > 1 and t.stride(0) != 1:
        raise InputError(name, "a contiguous tensor (stride 1)", f"stride {t.stride(0)}")


def check_values(q: torch.Tensor, cache: PagedKVCache, metadata: AttentionMetadata) -> None:
    """Checks that read metadata values (synchronizes when the metadata is on a GPU)."""
    cu = metadata.cu_seqlens_q.tolist()
    seq_lens = metadata.seq_lens.tolist()
    if cu[0] != 0:
        raise InputError("metadata.cu_seqlens_q", "cu_seqlens_q[0] == 0", str(cu[0]))
    query_lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    for i, ql in enumerate(query_lens):
        if ql < 0:
            raise InputError("metadata.cu_seqlens_q", "non-decreasing values",
                             f"cu_seqlens_q[{i + 1}]={cu[i + 1]} < cu_seqlens_q[{i}]={cu[i]}")
    if cu[-1] != q.shape[0]:
        raise InputError("metadata.cu_seqlens_q", f"last entry == num_tokens of q "
                         f"({q.shape[0]})", str(cu[-1]))
    capacity = metadata.block_table.shape[1] * cache.block_size
    for i, (ql, kl) in enumerate(zip(query_lens, seq_lens)):
        if kl < ql:
            raise InputError("metadata.seq_lens", f"seq_lens[{i}] >= its query length {ql} "
                             "(seq_lens count this step's tokens too)", str(kl))
        if kl > capacity:
            raise InputError("metadata.seq_lens", f"seq_lens[{i}] <= block_table capacity "
                             f"{capacity} ({metadata.block_table.shape[1]} blocks x "
                             f"{cache.block_size})", str(kl))
    if metadata.max_seqlen_q is not None and query_lens and \
            metadata.max_seqlen_q < max(query_lens):
        raise InputError("metadata.max_seqlen_q", f">= the longest query length "
                         f"{max(query_lens)}", str(metadata.max_seqlen_q))
    if metadata.max_seqlen_k is not None and seq_lens and metadata.max_seqlen_k < max(seq_lens):
        raise InputError("metadata.max_seqlen_k", f">= the longest seq_len {max(seq_lens)}",
                         str(metadata.max_seqlen_k))
    if seq_lens:
        used = (torch.arange(metadata.block_table.shape[1], device=metadata.seq_lens.device)
                < ((metadata.seq_lens + cache.block_size - 1) // cache.block_size)[:, None])
        ids = metadata.block_table[used]
        if ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= cache.num_blocks:
                raise InputError("metadata.block_table", f"block ids in [0, "
                                 f"{cache.num_blocks - 1}] for the blocks in use",
                                 f"ids in [{lo}, {hi}]")


def check_scale_values(cache: PagedKVCache, q_scale=None, output_scale=None) -> None:
    """Scales held in tensors, range-checked with the metadata's values (``validate=True``,
    or CPU metadata): reading a GPU tensor synchronizes. Each must be a positive normal
    float32. CPU tensors are read again too: the cache's scales were checked when its
    ``KVQuant`` was made, but a tensor can be changed in place since."""
    for name, scale in (("quant.k_scale", cache.quant.k_scale),
                        ("quant.v_scale", cache.quant.v_scale), ("q_scale", q_scale),
                        ("output_scale", output_scale)):
        if isinstance(scale, torch.Tensor):
            check_scale_value(name, float(scale.reshape(()).item()))
