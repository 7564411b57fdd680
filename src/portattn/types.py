"""The public data model: :class:`KVQuant`, :class:`PagedKVCache`, :class:`AttentionMetadata`.

Layout (see DESIGN.md, "Data model"):

* key/value caches are ``[num_blocks, block_size, num_kv_heads, head_size]`` with any
  strides but a contiguous last dimension, so they may be views into one packed tensor;
* slot ``s`` of the cache is block ``s // block_size``, offset ``s % block_size``;
* ``AttentionMetadata`` describes one batch of sequences and is shared by every layer.
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
import weakref
from dataclasses import dataclass, field
from typing import Sequence

import torch

from portattn.errors import InputError
from portattn.overlap import overlaps_itself, share_elements, storage_span
from portattn.settings import decision_environment

Scale = float | torch.Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
#: Device types whose tensors hold no values (shapes only): nothing can attend over them.
DATALESS_DEVICE_TYPES = ("meta",)
#: what an unquantized cache's storage may be (the constructor's and allocate()'s check)
UNQUANTIZED_STORAGE = ("float16, bfloat16 or float32 for an unquantized cache (pass "
                       "quant=KVQuant... for fp8/int8 storage)")
FP8_FORMAT_NAMES = {torch.float8_e4m3fn: "e4m3fn", torch.float8_e5m2: "e5m2"}
FP8_DTYPES_BY_NAME = {name: dtype for dtype, name in FP8_FORMAT_NAMES.items()}
#: The normal float32 range: scales, softcaps and scale factors reach the kernels as
#: float32 values, so a float outside it would arrive as 0, a subnormal or inf.
FLOAT32_RANGE = (float(torch.finfo(torch.float32).tiny), float(torch.finfo(torch.float32).max))


def take_blocks(data: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``data[blocks]`` (whole blocks of a cache tensor); an fp8 tensor is gathered as its
    bytes, which are its values (torch 2.9's CPU indexing has no fp8 kernel; 2.13's has)."""
    if data.dtype in FP8_DTYPES:
        return data.view(torch.uint8)[blocks].view(data.dtype)
    return data[blocks]


def in_float32_range(value: float) -> bool:
    """Whether ``value`` is a positive float32 normal number's size (NaN: False)."""
    return FLOAT32_RANGE[0] <= value <= FLOAT32_RANGE[1]


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of an fp8 dtype (448 for e4m3fn, 57344 for e5m2)."""
    return float(torch.finfo(dtype).max)


#: Types whose repr Dynamo traces (a value of any other type is not printed while tracing).
_TRACEABLE_REPRS = (bool, int, float, complex, str, type(None))


def value_text(value: object) -> str:
    """``repr(value)`` for an ``InputError``, but an int past 64 bits by its size (Python
    refuses to print one of more than 4300 digits: ``ValueError``), and a value whose
    ``__repr__`` raises by that: neither may replace the error being raised. While
    ``torch.compile`` traces, only builtin scalars are printed (see below)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an int of {value.bit_length()} bits"
    if torch.compiler.is_compiling() and type(value) not in _TRACEABLE_REPRS:
        # Dynamo traces a NumPy scalar as an array over a tensor, whose repr it cannot
        # trace: the error raised would become Dynamo's own ("repr() on tensor")
        hint = ("; torch.compile traces a NumPy scalar as an array: pass a Python float"
                if type(value).__name__ == "ndarray" else "")
        return f"<not shown while torch.compile traces{hint}>"
    try:
        return repr(value)
    except Exception as exc:
        return f"<repr raised {type(exc).__name__}>"


def _describe(t: object) -> str:
    """What came, for an ``InputError``: a tensor by shape, dtype, device and a layout
    other than dense (never its values), a list or tuple holding tensors item by item,
    anything else by its type name and its repr on one line, cut to :data:`_REPR_LIMIT`
    characters (:func:`~portattn.capabilities._text.cut_line`, as the probe cuts error
    text)."""
    if isinstance(t, torch.Tensor):
        if t.is_nested:  # its components' shapes differ: no one shape to print
            dims = t.dim() - 1
            return (f"nested tensor of {t.size(0)} components of {dims} "
                    f"dim{'' if dims == 1 else 's'}, dtype {t.dtype}, device {t.device}")
        layout = "" if t.layout == torch.strided else f", layout {t.layout}"
        return f"tensor of shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}{layout}"
    if isinstance(t, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in t):
        items = "; ".join(_describe(x) for x in t[:4]) + ("; ..." if len(t) > 4 else "")
        return f"{type(t).__name__} of {len(t)}: ({items})"
    from portattn.capabilities._text import cut_line  # an error path: loaded when needed

    if isinstance(t, int) and t.bit_length() > 64:
        return value_text(t)  # "an int of N bits"
    return f"{type(t).__name__} {cut_line(value_text(t), _REPR_LIMIT)}"


#: How much of a value's repr an error message shows.
_REPR_LIMIT = 120


# --------------------------------------------------------------------------- KVQuant


@dataclass(frozen=True)
class KVQuant:
    """How the KV cache stores its values.

    ``mode`` is one of:

    * ``"none"``: the cache holds fp16/bf16/fp32 values as they are;
    * ``"fp8_per_tensor"``: an e4m3fn or e5m2 cache, value = stored * scale with one fp32
      scale for all of K (``k_scale``) and one for all of V (``v_scale``);
    * ``"int8_per_token_head"``: an int8 cache with one fp32 scale per (block, slot, kv head)
      for K and for V, kept in scale caches owned by :class:`PagedKVCache`;
    * ``"fp8_per_token_head"``: likewise with an fp8 cache.

    Build one with the class methods rather than the constructor. Scales belong to
    ``fp8_per_tensor`` only (per-token-head scales live in the cache) and ``fp8_dtype`` to
    the fp8 modes only: anything else is an ``InputError``.
    """

    mode: str = "none"
    k_scale: Scale | None = None
    v_scale: Scale | None = None
    fp8_dtype: torch.dtype | None = None
    #: The fp8 format was not named (the factories' ``dtype=None``): ``fp8_dtype`` is
    #: e4m3fn until a :class:`PagedKVCache` of e5m2 tensors takes this quant, which then
    #: holds a copy with the cache's format.
    fp8_dtype_from_cache: bool = field(default=False, compare=False)

    MODES = ("none", "fp8_per_tensor", "int8_per_token_head", "fp8_per_token_head")

    def __post_init__(self) -> None:
        if self.mode not in self.MODES:
            raise InputError("KVQuant.mode", f"one of {self.MODES}", repr(self.mode))
        for name in ("k_scale", "v_scale"):
            if self.mode == "fp8_per_tensor":
                _check_scalar_scale(f"KVQuant.{name}", getattr(self, name))
            elif getattr(self, name) is not None:  # per-token-head scales live in the cache
                raise InputError(f"KVQuant.{name}", f"None for mode {self.mode!r}",
                                 _describe(getattr(self, name)))
        if self.mode.startswith("fp8") and self.fp8_dtype not in FP8_DTYPES:
            raise InputError("KVQuant.fp8_dtype", "torch.float8_e4m3fn or torch.float8_e5m2",
                             repr(self.fp8_dtype))
        if not self.mode.startswith("fp8") and self.fp8_dtype is not None:
            raise InputError("KVQuant.fp8_dtype", f"None for mode {self.mode!r}",
                             repr(self.fp8_dtype))

    # -- constructors -------------------------------------------------------------------
    @classmethod
    def none(cls) -> "KVQuant":
        return cls("none")

    @classmethod
    def fp8_per_tensor(cls, k_scale: Scale, v_scale: Scale,
                       dtype: torch.dtype | None = None) -> "KVQuant":
        """``dtype``: the cache's fp8 format; None: the format of the cache tensors this
        quant is given to (e4m3fn or e5m2; e4m3fn for :meth:`PagedKVCache.allocate`
        unless its ``dtype`` names e5m2)."""
        return cls("fp8_per_tensor", k_scale, v_scale, dtype or torch.float8_e4m3fn,
                   fp8_dtype_from_cache=dtype is None)

    @classmethod
    def int8_per_token_head(cls) -> "KVQuant":
        return cls("int8_per_token_head")

    @classmethod
    def fp8_per_token_head(cls, dtype: torch.dtype | None = None) -> "KVQuant":
        """``dtype`` as in :meth:`fp8_per_tensor`."""
        return cls("fp8_per_token_head", fp8_dtype=dtype or torch.float8_e4m3fn,
                   fp8_dtype_from_cache=dtype is None)

    def in_format_of(self, storage: torch.dtype) -> "KVQuant":
        """This quant for a cache stored as ``storage``: a copy in that fp8 format when
        the format was left to the cache, else itself."""
        if self.fp8_dtype_from_cache and storage in FP8_DTYPES and storage != self.fp8_dtype:
            return dataclasses.replace(self, fp8_dtype=storage)
        return self

    # -- derived facts ------------------------------------------------------------------
    @property
    def is_quantized(self) -> bool:
        return self.mode != "none"

    @property
    def per_token_head(self) -> bool:
        return self.mode.endswith("per_token_head")

    @property
    def storage_dtype(self) -> torch.dtype | None:
        """The dtype the cache tensors must have (None: any float dtype)."""
        if self.mode == "int8_per_token_head":
            return torch.int8
        return self.fp8_dtype

    @property
    def key(self) -> str:
        """A short hashable description, e.g. ``fp8_per_tensor:e4m3fn`` (no scale values)."""
        if self.fp8_dtype is not None:
            return f"{self.mode}:{FP8_FORMAT_NAMES[self.fp8_dtype]}"
        return self.mode

    def __hash__(self) -> int:  # scales may be tensors: hash by mode only
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, KVQuant) and self.key == other.key
                                 and _same_scale(self.k_scale, other.k_scale)
                                 and _same_scale(self.v_scale, other.v_scale))


def _same_scale(a: Scale | None, b: Scale | None) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    return a == b


def check_scale_value(name: str, value: float) -> None:
    """A scale's value must be positive and a normal float32 (``InputError`` naming
    ``name``): scales are applied in float32."""
    if not in_float32_range(value):
        raise InputError(name, "a finite positive scale within float32's normal range "
                         f"[{FLOAT32_RANGE[0]:.3g}, {FLOAT32_RANGE[1]:.3g}]",
                         repr(value) if isinstance(value, float) else _describe(value))


def _check_scalar_scale(name: str, scale: Scale | None) -> None:
    """A scale is a finite positive float or a one-element float32 tensor. A tensor on
    the CPU is range-checked here; one on a GPU only with ``validate=True`` (reading it
    would synchronize, see :func:`portattn.validation.check_scale_values`). Not while
    Dynamo traces (a fake tensor has no value): the custom op's eager body checks it."""
    if isinstance(scale, torch.Tensor):
        if scale.layout != torch.strided or scale.numel() != 1 or scale.dtype != torch.float32:
            raise InputError(name, "a python float or a one-element float32 tensor",
                             _describe(scale))
        if scale.device.type == "cpu" and not torch.compiler.is_compiling():
            check_scale_value(name, float(scale.reshape(())))
        return
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise InputError(name, "a python float or a one-element float32 tensor", _describe(scale))
    check_scale_value(name, scale)  # not float(scale): an int past float's range overflows


def scale_as_tensor(scale: Scale, device: torch.device) -> torch.Tensor:
    """A one-element float32 tensor on ``device`` (no copy when it already is one)."""
    if isinstance(scale, torch.Tensor):
        return scale.reshape(1).to(device=device, dtype=torch.float32)
    return torch.full((1,), float(scale), dtype=torch.float32, device=device)


# --------------------------------------------------------------------------- PagedKVCache


def slot_row_reasons(name: str, t: torch.Tensor) -> list[str]:
    """Why cache ``t`` ``[num_blocks, block_size, heads, head]`` is not a table of rows
    (empty: it is): its last dim contiguous, its slots evenly spaced (block stride =
    block_size x slot stride), each holding every head, the slot stride a multiple of 16
    bytes. What a TMA read of whole blocks as rows needs, from the strides alone (pointer
    alignment is a launch-time fact); a cache whose K and V interleave per block
    (``PagedKVCache.allocate(layout="packed")``) is not."""
    sb, ss, sh, sd = t.stride()
    reasons = []
    if sd != 1:
        reasons.append(f"{name}'s last dim is not contiguous")
    if sb != t.shape[1] * ss:
        reasons.append(f"{name}'s block stride {sb} is not block_size x its slot stride "
                       f"({t.shape[1]} x {ss}): its slots are not evenly spaced rows")
    if (t.shape[2] - 1) * sh + t.shape[3] > ss:
        reasons.append(f"{name}'s heads do not fit in one slot row")
    if (ss * t.element_size()) % 16:
        reasons.append(f"{name}'s slot stride is not 16-byte aligned")
    return reasons


class PagedKVCache:
    """A paged KV cache: split K and V views plus how they are quantized.

    ``key_cache``: ``[num_blocks, block_size, num_kv_heads, head_size_qk]``;
    ``value_cache``: ``[num_blocks, block_size, num_kv_heads, head_size_v]``. Any strides are
    accepted as long as the last dimension is contiguous, so both may be views of one packed
    tensor (``[num_blocks, 2, block_size, H, D]``, ``[2, num_blocks, ...]``,
    ``[num_blocks, block_size, H, 2 * D]``). With a per-token-head quant mode the cache also
    owns ``k_scale_cache`` / ``v_scale_cache`` (``[num_blocks, block_size, num_kv_heads]``,
    float32), created zero-filled unless passed in, and filled by :meth:`write`.
    """

    def __init__(self, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 quant: KVQuant | None = None, *, k_scale_cache: torch.Tensor | None = None,
                 v_scale_cache: torch.Tensor | None = None, packed: bool = False):
        self.quant = quant if quant is not None else KVQuant.none()  # its fp8 format, if
        self.key_cache = key_cache  # left to the cache, adopted by _check_tensors
        self.value_cache = value_cache
        self.packed = packed
        self.k_scale_cache: torch.Tensor | None = k_scale_cache
        self.v_scale_cache: torch.Tensor | None = v_scale_cache
        self._check_tensors("")
        if self.quant.per_token_head:  # zero-filled unless passed in
            shape = tuple(key_cache.shape[:3])
            if k_scale_cache is None:
                self.k_scale_cache = torch.zeros(shape, dtype=torch.float32,
                                                 device=key_cache.device)
            if v_scale_cache is None:
                self.v_scale_cache = torch.zeros(shape, dtype=torch.float32,
                                                 device=key_cache.device)
        self._check_scale_caches("")

    def __getstate__(self) -> dict:
        """Pickle (``torch.save``, ``copy.deepcopy``) the cache's own fields only: the
        dispatch memos portattn keeps on it (weak references) are rebuilt on use."""
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_portattn_")}

    def check_fields(self) -> None:
        """Check the attributes again (every checked call does, without touching the
        device): ``key_cache``, ``value_cache``, ``quant`` and the scale caches may have
        been reassigned since the constructor checked them. Raises :class:`InputError`
        naming the attribute (``cache.<name>``)."""
        self._check_tensors("cache.")
        self._check_scale_caches("cache.")

    def _check_tensors(self, prefix: str) -> None:
        quant, key_cache, value_cache = self.quant, self.key_cache, self.value_cache
        if not isinstance(quant, KVQuant):
            raise InputError(f"{prefix}quant", "a portattn.KVQuant", _describe(quant))
        _check_cache_tensor(f"{prefix}key_cache", key_cache)
        _check_cache_tensor(f"{prefix}value_cache", value_cache)
        if value_cache.shape[:3] != key_cache.shape[:3]:
            raise InputError(f"{prefix}value_cache", "the same [num_blocks, block_size, "
                             f"num_kv_heads] as key_cache {tuple(key_cache.shape[:3])}",
                             f"{tuple(value_cache.shape)}")
        if key_cache.dtype != value_cache.dtype or key_cache.device != value_cache.device:
            raise InputError(f"{prefix}value_cache", f"dtype {key_cache.dtype} on "
                             f"{key_cache.device} like key_cache",
                             f"{value_cache.dtype} on {value_cache.device}")
        adopted = quant.in_format_of(key_cache.dtype)
        if adopted is not quant:  # an fp8 format left to the cache follows its tensors,
            self.quant = quant = adopted  # given to the constructor or reassigned
        want = quant.storage_dtype
        if want is None and key_cache.dtype not in FLOAT_DTYPES:
            raise InputError(f"{prefix}key_cache", UNQUANTIZED_STORAGE,
                             str(key_cache.dtype))
        if want is not None and key_cache.dtype != want:
            raise InputError(f"{prefix}key_cache", f"dtype {want} for quant mode {quant.key}",
                             str(key_cache.dtype))
        for name in ("k_scale", "v_scale"):
            value = getattr(quant, name)
            if isinstance(value, torch.Tensor) and value.device != key_cache.device:
                raise InputError(f"{prefix}quant.{name}", f"a tensor on the cache's device "
                                 f"{key_cache.device}", str(value.device))

    def _check_scale_caches(self, prefix: str) -> None:
        shape = tuple(self.key_cache.shape[:3])
        device = self.key_cache.device
        for name in ("k_scale_cache", "v_scale_cache"):
            given = getattr(self, name)
            if not self.quant.per_token_head:
                if given is not None:
                    raise InputError(f"{prefix}{name}", "None unless quant is a "
                                     "per-token-head mode", f"a scale cache with quant mode "
                                     f"{self.quant.key}")
            elif not isinstance(given, torch.Tensor) or given.layout != torch.strided or \
                    tuple(given.shape) != shape or given.dtype != torch.float32 or \
                    given.device != device:
                raise InputError(f"{prefix}{name}", f"a float32 tensor {list(shape)} on "
                                 f"{device}", _describe(given))

    # -- constructors -------------------------------------------------------------------
    @classmethod
    def from_packed(cls, kv: torch.Tensor, head_size_qk: int,
                    quant: KVQuant | None = None,
                    **scale_caches: torch.Tensor | None) -> "PagedKVCache":
        """Wrap the DiffKV layout ``[num_blocks, block_size, num_kv_heads, head_size_qk +
        head_size_v]``: keys are ``[..., :head_size_qk]``, values the rest."""
        _check_cache_tensor("kv", kv)
        if isinstance(head_size_qk, bool) or not isinstance(head_size_qk, int) or \
                not 0 < head_size_qk < kv.shape[-1]:
            raise InputError("head_size_qk", f"a Python int between 1 and "
                             f"{kv.shape[-1] - 1} (the packed last dim holds head_size_qk + "
                             "head_size_v)", _describe(head_size_qk))
        return cls(kv[..., :head_size_qk], kv[..., head_size_qk:], quant, packed=True,
                   **scale_caches)

    @classmethod
    def allocate(cls, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                 *, head_size_v: int | None = None, dtype: torch.dtype = torch.float16,
                 device: torch.device | str = "cpu", quant: KVQuant | None = None,
                 layout: str = "split") -> "PagedKVCache":
        """An empty (zero-filled) cache.

        ``layout``: ``"split"`` (two tensors), ``"packed"`` (one ``[num_blocks, 2,
        block_size, H, D]`` tensor, K and V as views) or ``"diffkv"`` (one ``[num_blocks,
        block_size, H, head_size + head_size_v]`` tensor). With a quantized ``quant`` the
        storage dtype comes from it and ``dtype`` is ignored, except that an fp8 ``quant``
        made without naming its format takes e5m2 from ``dtype=torch.float8_e5m2``.
        """
        quant = quant if quant is not None else KVQuant.none()
        head_size_v = head_size if head_size_v is None else head_size_v
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size),
                            ("num_kv_heads", num_kv_heads), ("head_size", head_size),
                            ("head_size_v", head_size_v)):
            if isinstance(value, bool) or not isinstance(value, int) or \
                    not 0 < value <= INT32_MAX:  # block ids are int32 in block tables
                raise InputError(name, f"a positive int up to {INT32_MAX}", value_text(value))
        if not isinstance(quant, KVQuant):
            raise InputError("quant", "None or a portattn.KVQuant", _describe(quant))
        if not isinstance(dtype, torch.dtype):
            raise InputError("dtype", "a torch.dtype", _describe(dtype))
        device = _usable_device(device)
        if device.type in DATALESS_DEVICE_TYPES:  # checked before allocating, named as ours
            raise InputError("device", "a device that holds data (the CPU or a GPU)",
                             str(device))
        quant = quant.in_format_of(dtype)
        storage = quant.storage_dtype or dtype
        if storage not in FLOAT_DTYPES and quant.storage_dtype is None:
            raise InputError("dtype", UNQUANTIZED_STORAGE, str(dtype))
        shape = (num_blocks, block_size, num_kv_heads)
        if layout == "split":
            k = torch.zeros(*shape, head_size, dtype=storage, device=device)
            v = torch.zeros(*shape, head_size_v, dtype=storage, device=device)
            return cls(k, v, quant)
        if layout == "packed":
            if head_size_v != head_size:
                raise InputError("layout", "'diffkv' or 'split' when head_size_v != head_size",
                                 repr(layout))
            kv = torch.zeros(num_blocks, 2, block_size, num_kv_heads, head_size,
                             dtype=storage, device=device)
            return cls(kv[:, 0], kv[:, 1], quant)
        if layout == "diffkv":
            kv = torch.zeros(*shape, head_size + head_size_v, dtype=storage, device=device)
            return cls.from_packed(kv, head_size, quant)
        raise InputError("layout", "'split', 'packed' or 'diffkv'", repr(layout))

    # -- shape facts --------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.key_cache.shape[0]

    @property
    def block_size(self) -> int:
        return self.key_cache.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.key_cache.shape[2]

    @property
    def head_size_qk(self) -> int:
        return self.key_cache.shape[3]

    @property
    def head_size_v(self) -> int:
        return self.value_cache.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.key_cache.dtype

    @property
    def device(self) -> torch.device:
        return self.key_cache.device

    def __repr__(self) -> str:
        return (f"PagedKVCache(num_blocks={self.num_blocks}, block_size={self.block_size}, "
                f"num_kv_heads={self.num_kv_heads}, head_size_qk={self.head_size_qk}, "
                f"head_size_v={self.head_size_v}, dtype={self.dtype}, quant={self.quant.key}, "
                f"device={self.device})")

    # -- writes -------------------------------------------------------------------------
    def write(self, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store new tokens: ``key`` ``[T, num_kv_heads, head_size_qk]``, ``value``
        ``[T, num_kv_heads, head_size_v]`` at ``slot_mapping`` ``[T]`` (int32/int64; slot =
        block * block_size + offset; -1 skips the token; any stride; a slot at most once
        per call: on the CPU a repeated slot is an ``InputError``, on a GPU it is not looked
        for (that would sync) and the slot ends up with one of its tokens, for
        per-token-head modes possibly one token's codes with another's scale). Quantizes for
        quantized caches: per-tensor fp8 divides by the scale; per-token-head modes store
        absmax-derived scales in the scale caches. Stores values only: no autograd history
        reaches the cache. ``InputError`` (before anything is stored) for arguments that are
        not dense tensors of those shapes, dtypes and the cache's device; for cache
        attributes reassigned to something the constructor would refuse
        (:meth:`check_fields`); where two elements of the tensors it stores into share
        memory (an ``expand``ed cache, V over K, one scale cache for K and V); and where
        ``key`` or ``value`` shares memory with them (a view of the cache: the stores would
        race with the reads).

        On a GPU this is one Triton kernel launch that reads no device value (no sync, so a
        whole decode step, write plus attention, can be captured in a CUDA graph); slots
        are therefore not value-checked there: -1 and slots outside the cache are skipped
        on the device. On the CPU slots are checked (``InputError`` for values below -1
        or past the cache) and the write runs in PyTorch; so does a write on a GPU where
        our Triton kernels cannot run (the probe's ``triton_kernels`` check, as for
        ``attention``: Triton missing, broken or unsupported, or ``PORTATTN_TRITON=0``),
        and an fp8 cache's write on a GPU that cannot convert to fp8 (before sm89, AMD:
        :func:`portattn.devices.converts_fp8`); these select the valid slots on the host
        side (a sync, not graph-safe) and warn once."""
        self._check_writable()  # first: the argument checks read the cache's attributes
        self._check_write_args(key, value, slot_mapping)
        self._check_sources_apart(key, value)
        if self.device.type != "cpu" and _write_kernel_refusal(self.device) is None:
            from portattn.devices import converts_fp8, cuda_index, on_device

            if self.dtype not in FP8_DTYPES or converts_fp8(self.device, self.dtype):
                from portattn.kernels.write_launch import launch_cache_write

                with on_device(cuda_index(self.device)):  # Triton launches on the current GPU
                    launch_cache_write(self, key, value, slot_mapping)
                return
        if self.device.type != "cpu":
            _warn_slow_write(self)
        from portattn.quant import quantize_for_cache

        # like the write kernel: slots of -1, any negative slot and slots past the cache
        # are skipped (the CPU checked them above; a GPU without fp8 conversions gets here)
        with torch.no_grad():  # values only, as the kernel stores them: no autograd history
            valid = (slot_mapping >= 0) & (slot_mapping < self.num_blocks * self.block_size)
            slots = slot_mapping[valid].long()
            key, value = key[valid], value[valid]
            blocks = torch.div(slots, self.block_size, rounding_mode="floor")
            offsets = slots - blocks * self.block_size
            for name, src, cache, scale_cache in (
                    ("k", key, self.key_cache, self.k_scale_cache),
                    ("v", value, self.value_cache, self.v_scale_cache)):
                stored, scales = quantize_for_cache(src, self.quant, name, cache.dtype)
                cache[blocks, offsets] = stored
                if scale_cache is not None and scales is not None:
                    scale_cache[blocks, offsets] = scales

    def _check_writable(self) -> None:
        """The attributes :meth:`write` uses, checked again as the constructor checks them
        (:meth:`check_fields`: one may have been reassigned), then ``InputError`` when two
        elements of the tensors it stores into (``key_cache``, ``value_cache`` and the
        scale caches) share memory, in one tensor (an ``expand``ed view) or across two (V
        over K, one scale cache for both): each store would overwrite another. Attention
        only reads them, so only ``write`` refuses. Remembered on the cache for these very
        objects, as the cache's structure is (``planning.cache_structure_id``): a
        reassigned attribute is checked again; a tensor re-pointed or re-strided in place
        (``set_``, ``as_strided_``) is not."""
        k, v, ks, vs = self.key_cache, self.value_cache, self.k_scale_cache, self.v_scale_cache
        known = self.__dict__.get(_WRITABLE_ATTR)
        if known is not None and known[0]() is k and known[1]() is v and \
                (ks is None if known[2] is None else known[2]() is ks) and \
                (vs is None if known[3] is None else known[3]() is vs) and \
                known[4] is self.quant:
            return
        self.check_fields()
        tensors = [("key_cache", k), ("value_cache", v)]
        if ks is not None:
            tensors.append(("k_scale_cache", ks))
        if vs is not None:
            tensors.append(("v_scale_cache", vs))
        for i, (name, t) in enumerate(tensors):
            if overlaps_itself(t):
                raise InputError(f"cache.{name}", "a tensor whose elements do not share "
                                 "memory (write() stores into every one)",
                                 f"shape {tuple(t.shape)} with strides {t.stride()}")
            for other_name, other in tensors[:i]:
                if share_elements(t, other):
                    raise InputError(f"cache.{name}", f"memory apart from {other_name}'s "
                                     "(write() stores into both)", "a view sharing elements "
                                     f"with {other_name}")
        spans = [(name, span) for name, span in ((name, storage_span(t))
                                                 for name, t in tensors) if span is not None]
        reach = (min(lo for _, (lo, _) in spans), max(hi for _, (_, hi) in spans)) \
            if spans else (0, 0)
        if torch.compiler.is_compiling():
            return  # fake tensors have no address: nothing to remember (eager checks)
        self.__dict__[_WRITABLE_ATTR] = (weakref.ref(k), weakref.ref(v),
                                         None if ks is None else weakref.ref(ks),
                                         None if vs is None else weakref.ref(vs), self.quant,
                                         reach, spans)

    def _check_sources_apart(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """``InputError`` where ``key`` or ``value`` shares memory with a tensor
        :meth:`write` stores into (a view of the cache written elsewhere in it): on a GPU
        the stores would race with the reads. Storage address ranges first (those of the
        cache's tensors remembered by :meth:`_check_writable`, which runs first): only
        where they meet is the exact :func:`share_elements` asked."""
        known = self.__dict__.get(_WRITABLE_ATTR)
        if known is None:  # traced by torch.compile: fake tensors, no addresses
            return
        all_lo, all_hi = known[5]
        for name, src in (("key", key), ("value", value)):
            span = storage_span(src)
            if span is None or span[0] >= all_hi or all_lo >= span[1]:
                continue
            for dst_name, (lo, hi) in known[6]:
                if span[0] < hi and lo < span[1] and \
                        share_elements(src, getattr(self, dst_name)):
                    raise InputError(name, f"a tensor apart from the cache's {dst_name} "
                                     "(write() stores into it)", "a view sharing memory "
                                     f"with cache.{dst_name}; pass a copy")

    def _check_write_args(self, key: torch.Tensor, value: torch.Tensor,
                          slot_mapping: torch.Tensor) -> None:
        for name, t in (("key", key), ("value", value), ("slot_mapping", slot_mapping)):
            check_strided(name, t)
        for name, t, d in (("key", key, self.head_size_qk), ("value", value, self.head_size_v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or \
                    tuple(t.shape[1:]) != (self.num_kv_heads, d):
                raise InputError(name, f"a tensor [num_tokens, {self.num_kv_heads}, {d}]",
                                 _describe(t))
            if t.dtype not in FLOAT_DTYPES:
                raise InputError(name, "float16, bfloat16 or float32", str(t.dtype))
            if t.device != self.device:
                raise InputError(name, f"device {self.device} (the cache's)", str(t.device))
        if value.shape[0] != key.shape[0]:
            raise InputError("value", f"{key.shape[0]} tokens like key", str(value.shape[0]))
        if not isinstance(slot_mapping, torch.Tensor) or slot_mapping.dim() != 1 or \
                slot_mapping.dtype not in (torch.int32, torch.int64) or \
                slot_mapping.shape[0] != key.shape[0]:
            raise InputError("slot_mapping", f"an int32/int64 tensor [{key.shape[0]}]",
                             _describe(slot_mapping))
        if slot_mapping.device != self.device:
            raise InputError("slot_mapping", f"device {self.device} (the cache's)",
                             str(slot_mapping.device))
        if slot_mapping.numel() and slot_mapping.device.type == "cpu":  # no sync on a GPU
            capacity = self.num_blocks * self.block_size
            lo, hi = int(slot_mapping.min()), int(slot_mapping.max())
            if lo < -1 or hi >= capacity:
                raise InputError("slot_mapping", f"slots in [-1, {capacity - 1}] (-1 skips)",
                                 f"values in [{lo}, {hi}]")
            stored = slot_mapping[slot_mapping >= 0].sort().values
            repeated = stored[1:][stored[1:] == stored[:-1]]
            if repeated.numel():
                slot = int(repeated[0])
                raise InputError("slot_mapping", "distinct slots (only -1 may repeat)",
                                 f"slot {slot} {int((stored == slot).sum())} times")


#: (device, decision environment) -> the write kernel's refusal there (None: it runs);
#: emptied by ``capabilities.cache.forget_decisions`` (a refreshed or cleared probe)
_WRITE_REFUSALS: dict = {}
_WRITE_REFUSALS_MAX = 64


def _write_kernel_refusal(device: torch.device) -> str | None:
    """Why the Triton write kernel cannot serve a cache on GPU ``device``, or None when it
    can: the real probe's ``triton_kernels`` check of that device (Triton imports and a
    kernel of ours compiled and ran there; ``PORTATTN_TRITON=0`` turns it off), the check
    that sends ``attention`` to another backend. So a Triton that imports but cannot
    compile (no ptxas for this GPU, a release our kernels do not support, no C compiler
    for its launcher) sends the write to PyTorch too, never into a crash. Remembered per
    device and decision environment (a lookup, about 0.3 us, after the first write)."""
    key = (device, decision_environment())
    try:
        return _WRITE_REFUSALS[key]
    except KeyError:
        pass
    from portattn.capabilities import probe

    check = probe(simulate="", device=device).triton_kernels
    refusal = None if check.ok else check.reason
    if len(_WRITE_REFUSALS) >= _WRITE_REFUSALS_MAX:
        _WRITE_REFUSALS.clear()
    _WRITE_REFUSALS[key] = refusal
    return refusal


def _check_cache_tensor(name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        raise InputError(name, "a 4-D tensor [num_blocks, block_size, num_kv_heads, head_size]",
                         _describe(t))
    check_strided(name, t)
    if t.stride(-1) != 1:
        raise InputError(name, "a contiguous last dimension (stride 1)",
                         f"strides {tuple(t.stride())}")
    if min(t.shape) <= 0:
        raise InputError(name, "non-empty dimensions", str(tuple(t.shape)))
    check_has_data(name, t)


def _warn_slow_write(cache: PagedKVCache) -> None:
    """WARNING on the ``portattn`` logger, once per (device, cache dtype): a GPU cache's
    write runs in PyTorch (the write kernel cannot run here, or no fp8 conversion on this
    GPU), and why."""
    from portattn.dispatch.announce import announced, log

    if announced.first_time(("cache write", str(cache.device), cache.dtype)):
        refusal = _write_kernel_refusal(cache.device)
        why = (f"Triton's write kernel cannot run here ({refusal})" if refusal is not None
               else f"this GPU cannot convert to {cache.dtype} in a kernel")
        log.warning("slow path: PagedKVCache.write on %s (%s cache) runs in PyTorch because "
                    "%s; it synchronizes with the host and cannot be captured in a CUDA "
                    "graph", cache.device, cache.dtype, why)


_WRITABLE_ATTR = "_portattn_writable"


def check_has_data(name: str, t: torch.Tensor) -> None:
    """``InputError`` for a tensor on a device that holds no values (``meta``)."""
    if t.device.type in DATALESS_DEVICE_TYPES:
        raise InputError(name, "a tensor holding data (on the CPU or a GPU)",
                         f"a tensor on the {t.device.type} device, which holds no values")


def check_strided(name: str, t: object) -> None:
    """``InputError`` for a tensor whose layout is not ``torch.strided`` (a sparse or
    nested tensor): every check after this one reads strides. Anything but a tensor is
    left to the caller's own type check."""
    if isinstance(t, torch.Tensor) and (t.layout != torch.strided or t.is_nested):
        raise InputError(name, "a dense tensor (layout torch.strided)", _describe(t))


def _usable_device(device) -> torch.device:
    """``device`` as a ``torch.device``; ``InputError`` naming ``device`` for one that is
    malformed or that this process does not see (the probe's own rule)."""
    from portattn.capabilities.probe import device_index

    device_index(device)
    return torch.device(device)


# --------------------------------------------------------------------------- metadata


INT32_MAX = 2**31 - 1
INT32_MIN = -(2**31)


def _fits_int32(ids: torch.Tensor) -> bool:
    """Whether every entry of a CPU integer tensor fits int32 (an empty one does)."""
    return ids.numel() == 0 or (int(ids.min()) >= INT32_MIN and int(ids.max()) <= INT32_MAX)


def is_numpy_bool_type(kind: type) -> bool:
    """Whether ``kind`` is NumPy's bool scalar type (``numpy.bool_``; ``numpy.bool`` in
    2.x), without importing NumPy."""
    return kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_")


def _host_ints(name: str, values, low: int = 0) -> list[int]:
    """``values`` as a list of Python ints in ``[low, 2**31 - 1]`` (int32); an
    ``InputError`` naming ``name`` for anything else (floats, bools, strings)."""
    try:
        if isinstance(values, (str, bytes, dict)) or \
                (isinstance(values, torch.Tensor) and (values.layout != torch.strided or
                                                       values.dim() != 1)):
            raise TypeError
        values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
    except TypeError:
        raise InputError(name, "a list of ints", _describe(values)) from None
    out = []
    for i, value in enumerate(values):
        if isinstance(value, bool):
            raise InputError(f"{name}[{i}]", "an int", _describe(value))
        try:
            value = operator.index(value)
        except TypeError:
            raise InputError(f"{name}[{i}]", "an int", _describe(value)) from None
        if not low <= value <= INT32_MAX:
            raise InputError(f"{name}[{i}]", f"an int in [{low}, {INT32_MAX}] (int32)",
                             value_text(value))
        out.append(value)
    return out


def _int32_block_ids(table: torch.Tensor) -> torch.Tensor:
    """An integer block table as int32. Ids past int32 are an ``InputError`` on the CPU;
    on a GPU they become -1 (a bad id: NaN rows) there, without reading the device."""
    if table.dtype == torch.int32:
        return table
    if table.dtype == torch.uint64:
        raise InputError("block_table", "a signed integer (or uint8 / 16 / 32) tensor",
                         _describe(table))
    if not table.dtype.is_signed:  # uint16 / uint32: no min / max kernels for them
        table = table.to(torch.int64)
    if table.device.type != "cpu":
        return torch.where((table < INT32_MIN) | (table > INT32_MAX), -1,
                           table).to(torch.int32)
    if not _fits_int32(table):
        raise InputError("block_table", "block ids that fit int32", "ids past int32")
    return table.to(torch.int32)


def _block_ids_from_lists(block_table) -> torch.Tensor:
    """Nested lists of block ids as an int32 CPU tensor ``[rows, longest row]`` (rows
    padded with 0). One array conversion (NumPy's where installed: it infers the element
    type twice as fast as ``torch.tensor``); the rows are walked only to name a bad entry."""
    if block_table is None or isinstance(block_table, (str, bytes, dict)) or \
            not hasattr(block_table, "__iter__"):
        raise InputError("block_table", "a 2-D integer tensor or a list of lists of block "
                         "ids", _describe(block_table))
    try:
        rows = [list(row) for row in block_table]
    except TypeError:
        rows = None
    if rows is not None:
        width = max([len(r) for r in rows] + [1])
        padded = [r + [0] * (width - len(r)) for r in rows]
        ids = _int_array(padded)
        # a row of lists (a table nested once too deep) is no row of ids: named below
        if ids is not None and (ids.dim() == 2 or not rows) and _fits_int32(ids):
            return ids.reshape(len(rows), width).to(torch.int32)
    for i, row in enumerate(block_table):  # names the first bad entry
        _host_ints(f"block_table[{i}]", row, low=INT32_MIN)
    raise InputError("block_table", "a 2-D integer tensor or a list of lists of block ids",
                     _describe(block_table))


def _int_array(rows: list) -> torch.Tensor | None:
    """``rows`` (equal-length lists) as an int64 tensor when every entry is an int (no
    bool, float or str), else None."""
    kinds = set(map(type, itertools.chain.from_iterable(rows)))  # C loops: ~15 ns an entry
    # NumPy and torch would read a bool among ints as 0 / 1
    if any(kind is bool or is_numpy_bool_type(kind) for kind in kinds):
        return None
    try:
        import numpy

        array = numpy.array(rows)
        if array.size == 0:
            return torch.zeros(array.shape, dtype=torch.int64)
        if array.dtype.kind != "i":
            return None
        return torch.from_numpy(array.astype(numpy.int64, copy=False))
    except ImportError:
        pass
    except (TypeError, ValueError, OverflowError):
        return None
    try:
        table = torch.tensor(rows)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        return None
    if table.numel() == 0:
        return table.to(torch.int64)
    return table if table.dtype == torch.int64 else None


@dataclass(frozen=True, eq=False)
class AttentionMetadata:
    """Per-batch description shared by every layer.

    ``cu_seqlens_q``: int32 ``[B + 1]``, prefix sums of the query lengths (queries of all
    sequences are packed one after another in ``q``). ``seq_lens``: int32 ``[B]``, keys per
    sequence INCLUDING this step's tokens (written to the cache before the call).
    ``block_table``: int32 ``[B, max_blocks]``. ``max_seqlen_q`` / ``max_seqlen_k``: host
    ints; when both are given the call never synchronizes with the device.
    """

    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    max_seqlen_q: int | None = None
    max_seqlen_k: int | None = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    def max_lengths(self) -> tuple[int, int]:
        """(max query length, max key length): the given values, else read from the
        device (that synchronizes; give both to avoid it). 0 for an empty batch."""
        max_q, max_k = self.max_seqlen_q, self.max_seqlen_k
        if max_q is None:
            diffs = self.cu_seqlens_q[1:] - self.cu_seqlens_q[:-1]
            max_q = int(diffs.max()) if diffs.numel() else 0
        if max_k is None:
            max_k = int(self.seq_lens.max()) if self.seq_lens.numel() else 0
        return max_q, max_k

    @classmethod
    def from_lengths(cls, query_lens: Sequence[int], seq_lens: Sequence[int],
                     block_table: torch.Tensor | Sequence[Sequence[int]],
                     device: torch.device | str | None = None) -> "AttentionMetadata":
        """Build metadata from per-sequence query and key lengths (host lists).

        ``block_table`` may be a tensor or nested lists (rows are padded with 0), one row
        per sequence. Max lengths are filled in, so calls with this metadata never
        synchronize. Lengths and ids must be ints (Python, NumPy or integer tensors; no
        float, bool or str) within int32: an ``InputError`` names the entry otherwise,
        except that a GPU table's ids past int32 become -1 there (a bad id: NaN rows)
        rather than being read back to the host.
        """
        query_lens = _host_ints("query_lens", query_lens)
        seq_lens = _host_ints("seq_lens", seq_lens)
        if len(query_lens) != len(seq_lens):
            raise InputError("query_lens", f"{len(seq_lens)} entries like seq_lens",
                             str(len(query_lens)))
        for i, (ql, kl) in enumerate(zip(query_lens, seq_lens)):
            if kl < ql:
                raise InputError(f"query_lens[{i}]", f"0 <= query_len <= seq_len ({kl})",
                                 str(ql))
        if sum(query_lens) > INT32_MAX:
            raise InputError("query_lens", f"a total of at most {INT32_MAX} tokens (int32)",
                             str(sum(query_lens)))
        if device is not None:
            device = _usable_device(device)
        if isinstance(block_table, torch.Tensor):
            check_strided("block_table", block_table)
            if block_table.dim() != 2 or block_table.dtype.is_floating_point or \
                    block_table.dtype.is_complex or block_table.dtype == torch.bool:
                raise InputError("block_table", "a 2-D integer tensor [num_seqs, max_blocks]",
                                 _describe(block_table))
            table = _int32_block_ids(block_table).to(
                device=block_table.device if device is None else device)
        else:
            table = _block_ids_from_lists(block_table).to(device or "cpu")
        if table.shape[0] != len(seq_lens):
            raise InputError("block_table", f"{len(seq_lens)} rows (one per sequence)",
                             f"{table.shape[0]} rows")
        device = table.device
        cu = [0]
        for ql in query_lens:
            cu.append(cu[-1] + ql)
        return cls(torch.tensor(cu, dtype=torch.int32, device=device),
                   torch.tensor(seq_lens, dtype=torch.int32, device=device), table,
                   max(query_lens, default=0), max(seq_lens, default=0))
