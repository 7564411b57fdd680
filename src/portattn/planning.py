"""Plan once, run cheaply: :func:`plan`, :class:`AttentionPlan`, and the memo behind
:func:`portattn.attention`.

In the style of FlashInfer's paged wrappers, :func:`plan` takes one batch's metadata and
the head configuration and decides everything that does not depend on a layer's tensors:
backend and variant (the cached :class:`~portattn.dispatch.Decision`), launch parameters,
the backend's runner (workspaces, and for ``triton_unified`` the recorded kernel launches,
see :mod:`portattn.backends.unified_runner`). ``plan.run(q, cache, ...)`` then does only
per-layer work: it compares the structure of its arguments with structures it has already
checked (one tuple and one dict lookup), and calls the runner.

Three levels, none holding a KV cache:

* :class:`PlanBody` (module-level LRU, keyed by the :class:`Problem`, the option values,
  the forced backend, the decision environment and the device): decision, options,
  runner. It holds no tensor but the runner's own workspaces, so one body serves every
  batch with the same bucketed sizes, whichever metadata or caches it is called with.
  A body is one device's: decided with that device's capabilities
  (``probe(device=...)``), and its runner launched with that GPU current
  (:meth:`PlanBody.launch`), whichever device the caller has current.
* :class:`AttentionPlan`: a body bound to one batch's metadata (held, like FlashInfer's
  wrapper holds its index buffers) plus the structures of calls it has accepted.
* The memo of :func:`portattn.attention`: per metadata (keyed by the ``id`` of its three
  tensors and its hints, and removed by a weakref finalizer when any of the tensors dies,
  so an id is never reused while in the memo), the accepted call structures -> (body,
  runner slot). A call structure is shapes, strides, dtypes and devices of every tensor
  plus the scalar option values and their types (:func:`call_key`), never tensor
  identities, so per-layer caches share one entry and nothing is kept alive. The metadata
  object that made an entry keeps a reference to its calls, so a hit costs one flat
  tuple and one dict lookup (an entry that leaves the memo is emptied first).

The hints ``metadata.max_seqlen_q`` / ``max_seqlen_k`` are part of every key: a plan is
made for them (rounded up to powers of two) and records them (``plan.max_seqlen_q``). They
must be upper bounds of the real lengths; nothing reads device values to check that unless
validation is on (``validate=True``, ``PORTATTN_VALIDATE=1``, or CPU metadata by default),
in which case every call compares them with the real lengths and raises ``InputError``.
Without a device read, ``num_tokens <= num_seqs * hint`` is checked on the first call of
each structure (:func:`check_hint_bounds`). An understated ``max_seqlen_q`` that passes
that may choose decode tiles too small for a sequence's queries: the decode launch skips
that sequence, and the kernel writes NaN into its rows (visibly wrong, never stale). An
understated ``max_seqlen_k`` under a staged prefill (:mod:`portattn.kernels.stage`, which
stages keys up to the plan's bound) makes the rows that see keys past it NaN.
"""

from __future__ import annotations

import copy
import itertools
import threading
import weakref
from collections.abc import Mapping
from dataclasses import replace
from types import MappingProxyType

import torch

from portattn.capabilities import probe
from portattn.devices import _get_device as _current_cuda_device
from portattn.devices import capturing_on, cuda_index, on_device
from portattn.dispatch import launch_failures
from portattn.dispatch.announce import log
from portattn.dispatch.clearable_lru import ClearableLRU
from portattn.dispatch.problem import Problem, cache_slot_rows
from portattn.dispatch.registry import load_backend
from portattn.dispatch.selector import Decision, decide
from portattn.errors import InputError, UnsupportedError
from portattn.options import AttentionOptions, normalize_options
from portattn.settings import (
    VALIDATE_INDEX,
    VALIDATE_VALUES,
    decision_environment,
    pin_token,
)
from portattn.types import (
    FP8_DTYPES,
    AttentionMetadata,
    KVQuant,
    PagedKVCache,
    Scale,
    _describe,
    check_has_data,
    check_strided,
    value_text,
)
from portattn.validation import (
    check_out,
    check_scale_values,
    check_structure,
    check_values,
    validation_requested,
)

_MISSING = object()
_CONTIGUOUS = torch.contiguous_format
#: Bodies kept (LRU). A body holds no tensor but its runner's workspaces.
BODY_CAPACITY = 64
#: Metadata objects remembered by ``attention`` (FIFO; entries also leave with their tensors).
METADATA_CAPACITY = 64
#: Call structures remembered per metadata object / per plan (cleared when full).
CALLS_PER_ENTRY = 64

#: Counters for tests and benchmarks: full argument checks, bodies made.
stats = {"checked": 0, "bodies": 0}


# --------------------------------------------------------------------------- signatures


def _tensor_signature(t):
    """Structure of an optional per-layer argument: a tensor's shape, strides, dtype and
    device; a Python scalar's type and value; None."""
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return (t.shape, t.stride(), t.dtype, t.device)
    return (type(t), t)


_structure_ids: dict = {}
_structure_counter = itertools.count(1)
_STRUCTURE_LIMIT = 4096
_STRUCTURE_ATTR = "_portattn_structure"


def cache_structure_id(cache: PagedKVCache) -> int:
    """A small int standing for the cache's structure: shapes, strides, dtypes and devices
    of its tensors, its quant mode and scale values, its layout. Remembered ON the cache
    object with (weak references to) the tensors it was computed from, so a reassigned
    ``key_cache`` / ``value_cache`` / ``quant`` is noticed and a replaced tensor is not
    kept alive; the tensors themselves must not be resized or re-strided in place."""
    k, v, quant = cache.key_cache, cache.value_cache, cache.quant
    known = cache.__dict__.get(_STRUCTURE_ATTR)
    if known is not None and known[0]() is k and known[1]() is v and known[2] is quant and \
            known[3] is cache.k_scale_cache and known[4] is cache.v_scale_cache and \
            known[5] == cache.packed:
        return known[6]
    structure = (type(cache), k.shape, k.stride(), k.dtype, k.device, v.shape, v.stride(),
                 v.dtype, v.device, cache.packed, _quant_signature(cache))
    found = _structure_ids.get(structure)
    if found is None:
        if len(_structure_ids) >= _STRUCTURE_LIMIT:
            _structure_ids.clear()  # ids are never reused: forgotten ones just miss
        found = _structure_ids.setdefault(structure, next(_structure_counter))
    cache.__dict__[_STRUCTURE_ATTR] = (weakref.ref(k), weakref.ref(v), quant,
                                      cache.k_scale_cache, cache.v_scale_cache,
                                      cache.packed, found)
    return found


def _quant_signature(cache: PagedKVCache):
    quant = cache.quant
    if quant.mode == "none":
        return "none"
    return (quant.key, _tensor_signature(quant.k_scale), _tensor_signature(quant.v_scale),
            _tensor_signature(cache.k_scale_cache), _tensor_signature(cache.v_scale_cache))


def layer_signature(q, cache, out, alibi_slopes, sinks, q_scale, output_scale) -> tuple:
    """Everything about one layer's arguments that a check or a launcher may read, except
    tensor identities and data: two calls with equal signatures pass the same checks and
    launch the same kernels with the same non-pointer arguments."""
    if alibi_slopes is None and sinks is None and q_scale is None and output_scale is None:
        extra = None
    else:
        extra = (_tensor_signature(alibi_slopes), _tensor_signature(sinks),
                 _tensor_signature(q_scale), _tensor_signature(output_scale))
    return (type(q), q.shape, q.stride(), q.dtype, q.device, cache_structure_id(cache),
            None if out is None else (type(out), out.shape, out.stride(), out.dtype,
                                      out.device, out.requires_grad), extra)


def metadata_signature(metadata: AttentionMetadata) -> tuple:
    """The metadata's structure (its values may change in place, its tensors may not be
    resized or replaced) and length hints."""
    return (_tensor_signature(metadata.cu_seqlens_q), _tensor_signature(metadata.seq_lens),
            _tensor_signature(metadata.block_table), metadata.max_seqlen_q,
            metadata.max_seqlen_k)


# --------------------------------------------------------------------------- bodies


class PlanBody:
    """What a plan decides once: the decision, the options, the backend's runner."""

    #: Triton's exception where this body's kernel could not be compiled or launched
    failed: Exception | None = None

    def __init__(self, problem: Problem, options: AttentionOptions, decision: Decision,
                 device: torch.device):
        self.problem = problem
        self.decision = decision
        self.device = device
        self.options = replace(options, alibi_slopes=None, sinks=None, q_scale=None,
                               output_scale=None)
        self.out_dtype = options.out_dtype
        self.num_q_heads = problem.num_q_heads
        self.head_size_v = problem.head_size_v
        # the result has q's shape (the checks matched q's heads to the problem's)
        self._out_like_q = problem.head_size_v == problem.head_size_qk
        backend = load_backend(decision.backend)
        if isinstance(backend, str):  # decide() never picks a backend that failed to import
            raise UnsupportedError(f"backend {decision.backend!r} cannot be loaded: {backend}")
        self.runner = backend.prepare(decision.plan, problem, self.options, device)
        self.reads_max_lengths = backend.reads_max_lengths
        self._cuda_index = cuda_index(device)

    def failure_error(self, failed: launch_failures.KernelFailed,
                      advice: str) -> UnsupportedError:
        """Record ``failed`` (the dispatcher then rules this backend out for this problem
        on this architecture) and the error that names it."""
        decision = self.decision
        why = launch_failures.record(decision.backend, self.problem, decision.arch,
                                     decision.variant, failed.cause)
        return UnsupportedError(f"backend {decision.backend!r}: {why}; {advice}")

    def new_out(self, q: torch.Tensor) -> torch.Tensor:
        """A fresh contiguous result ``[num_tokens, num_q_heads, head_size_v]`` for a
        ``q`` that passed this body's checks. ``empty_like`` where the result has q's shape:
        it parses fewer arguments than ``empty`` (0.2-0.3 us less host time)."""
        if self._out_like_q:
            return torch.empty_like(q, dtype=self.out_dtype, memory_format=_CONTIGUOUS)
        return torch.empty(q.shape[0], self.num_q_heads, self.head_size_v,
                           dtype=self.out_dtype, device=q.device)

    def launch(self, q, cache, metadata, out, layer, slot) -> None:
        """The runner, with the plan's GPU current (Triton launches on the current device
        and stream); the device is switched only when another one is current. A q that
        requires grad runs detached, without autograd (flash-attn 2's functions would
        otherwise record a graph). A kernel failing inside Triton (it cannot be compiled
        or launched: ``launch_failures.raised_by_triton``) is raised as
        ``launch_failures.KernelFailed`` for the caller to reroute or name, and this body
        then fails at once at every later call (no second compile)."""
        if self.failed is not None:
            raise launch_failures.KernelFailed(self, self.failed)
        if q.requires_grad:  # inference only: no backend's result carries a gradient
            with torch.no_grad():
                return self.launch(q.detach(), cache, metadata, out, layer, slot)
        index = self._cuda_index
        try:
            if index is None or _current_cuda_device() == index:
                self.runner(q, cache, metadata, out, layer, slot)
            else:
                with on_device(index):
                    self.runner(q, cache, metadata, out, layer, slot)
        except Exception as exc:
            if not launch_failures.raised_by_triton(exc):
                raise
            self.failed = _without_frames(exc)
            raise launch_failures.KernelFailed(self, exc) from exc


def _without_frames(exc: Exception) -> Exception:
    """``exc`` as a body keeps it for its later calls: a copy without traceback, cause or
    context (their frames hold the failing call's q, cache and out, which a plan must not
    keep alive), or a ``RuntimeError`` with its text where it cannot be copied."""
    try:
        kept = copy.copy(exc)
    except Exception:  # an exception type that cannot be rebuilt from its args
        kept = RuntimeError(f"{type(exc).__name__}: {exc}")
    kept.__traceback__ = kept.__cause__ = kept.__context__ = None
    return kept


#: (problem, scale, window, softcap, backend, decision environment, device) -> PlanBody
bodies = ClearableLRU(BODY_CAPACITY)


def _body_for(problem: Problem, options: AttentionOptions, backend: str | None, env,
              device: torch.device) -> PlanBody:
    """The body of ``bodies`` for this problem, made (decided) on a miss. One decided
    while another thread cleared ``bodies`` (``probe(refresh=True)`` replacing the
    capabilities it was decided from) serves its call but is not kept, and neither is
    that call's memo entry (:func:`_checked`)."""
    key = (problem, options.scale, options.sliding_window, options.softcap, backend, env,
           device)
    generation = bodies.generation
    body = bodies.get(key)
    if body is None:
        # the device's own capabilities: a body for cuda:1 is never decided on cuda:0's
        decision = decide(problem, probe(device=device), backend)  # may raise Unsupported
        stats["bodies"] += 1
        body = bodies.put(key, PlanBody(problem, options, decision, device), generation)
    return body


def _check_q(q, body: PlanBody) -> None:
    """q against the plan first, so a wrong q is named as such (not as a cache mismatch)."""
    problem = body.problem
    want = (problem.num_q_heads, problem.head_size_qk)
    check_strided("q", q)  # a sparse or nested q has no strides (nor one shape)
    if not isinstance(q, torch.Tensor) or q.dim() != 3 or tuple(q.shape[1:]) != want:
        raise InputError("q", f"a tensor [num_tokens, {want[0]}, {want[1]}] (as planned)",
                         _describe(q))
    if q.dtype != problem.q_dtype:
        raise InputError("q", f"dtype {problem.q_dtype} (as planned)", str(q.dtype))
    if q.device != body.device:
        raise InputError("q", f"device {body.device} (the plan's)", str(q.device))


def _check_cache(cache, body: PlanBody) -> None:
    """The cache's head size and kv heads against the plan, once q fits it: a cache that
    does not fit is named as such (not as a q that does not fit the cache)."""
    if not isinstance(cache, PagedKVCache):
        return  # check_structure names the type
    cache.check_fields()  # attributes reassigned since the constructor: named as such
    problem = body.problem
    for what, want, got in (("head_size_qk", problem.head_size_qk, cache.head_size_qk),
                            ("num_kv_heads", problem.num_kv_heads, cache.num_kv_heads)):
        if want != got:
            raise InputError("cache", f"{what} {want} (as planned)", f"{what} {got}")


def _check_problem(plan_problem: Problem, call: Problem, device, q: torch.Tensor) -> None:
    """InputError naming the argument when a call does not fit its plan."""
    if q.device != device:
        raise InputError("q", f"device {device} (the plan's)", str(q.device))
    fields = (("q_dtype", "q", "dtype"), ("num_q_heads", "q", "num_q_heads"),
              ("head_size_qk", "q", "head_size_qk"), ("kv_dtype", "cache", "dtype"),
              ("kv_quant", "cache", "quant"), ("num_kv_heads", "cache", "num_kv_heads"),
              ("head_size_v", "cache", "head_size_v"), ("block_size", "cache", "block_size"),
              ("out_dtype", "out", "dtype"),
              ("alibi", "alibi_slopes", "ALiBi"), ("sinks", "sinks", "sinks"))
    for field, argument, what in fields:
        want, got = getattr(plan_problem, field), getattr(call, field)
        if want != got:
            raise InputError(argument, f"{what} {want} (as planned)", f"{what} {got}")
    # the cache's slot layout (kv_rows) may differ: a launch checks its tensors and
    # stages where the Gluon prefill cannot read them as rows; so may whether K and V are
    # views of one tensor (packed_kv: no backend decides on it, every launch takes both).
    # Not while Dynamo traces: the hints may be symbolic there, and a dataclass compare of
    # symbolic fields is not traceable (the fields above were compared one by one)
    if not torch.compiler.is_compiling() and replace(
            call, kv_rows=plan_problem.kv_rows,
            packed_kv=plan_problem.packed_kv) != plan_problem:  # pragma: no cover
        raise InputError("q", f"a call like the plan's ({plan_problem.describe()})",
                         call.describe())


# --------------------------------------------------------------------------- plans


class AttentionPlan:
    """Backend, variant, launch parameters and workspaces decided once for one batch.

    Made by :func:`plan`; ``run(q, cache, ...)`` per layer. It holds its metadata (and no
    cache). Attributes: ``backend``, ``variant``, ``decision``, ``problem``, ``metadata``,
    ``max_seqlen_q`` / ``max_seqlen_k`` (the hints it was made for).
    """

    def __init__(self, body: PlanBody, metadata: AttentionMetadata, max_seqlen_q: int,
                 max_seqlen_k: int, validate: bool | None):
        self._body = body
        self.metadata = metadata
        self.max_seqlen_q = max_seqlen_q
        self.max_seqlen_k = max_seqlen_k
        # the metadata with the plan's hints (read once when missing): what the compiled
        # run passes on, and what the runner gets where its backend reads host max
        # lengths, so no layer reads them from the device
        self._hinted = metadata
        if (metadata.max_seqlen_q, metadata.max_seqlen_k) != (max_seqlen_q, max_seqlen_k):
            self._hinted = replace(metadata, max_seqlen_q=max_seqlen_q,
                                   max_seqlen_k=max_seqlen_k)
        self._launch_metadata = self._hinted if body.reads_max_lengths else metadata
        # value checks by default: as attention() decides, once (the environment is read
        # when the plan is made, like every other decision of a plan)
        wanted = validation_requested(validate)
        self._values = metadata.seq_lens.device.type == "cpu" if wanted is None else wanted
        self._meta_sig = metadata_signature(metadata)
        self._accepted: dict = {}
        self._lock = threading.Lock()
        # the settings it was made under, for its compiled run (_run_traced)
        self._environment = pin_token()

    @property
    def backend(self) -> str:
        return self._body.decision.backend

    @property
    def variant(self) -> str:
        return self._body.decision.plan.describe()

    @property
    def decision(self) -> Decision:
        return self._body.decision

    @property
    def problem(self) -> Problem:
        return self._body.problem

    def __repr__(self) -> str:
        return (f"<AttentionPlan {self.backend}: {self.variant}; "
                f"{self._body.problem.describe()}>")

    def run(self, q: torch.Tensor, cache: PagedKVCache, out: torch.Tensor | None = None, *,
            alibi_slopes: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
            q_scale: Scale | None = None, output_scale: Scale | None = None,
            validate: bool | None = None) -> torch.Tensor:
        """Attention of one layer: ``q`` ``[num_tokens, num_q_heads, head_size_qk]`` over
        ``cache`` (any layer's: only its structure must match the plan). Per-layer
        tensors (``alibi_slopes``, ``sinks``, fp8 ``q_scale`` / ``output_scale``) are given
        here when the plan uses them. Returns ``out`` (allocated in the planned
        ``out_dtype`` when None; ``output_scale`` is then given exactly when that dtype is
        fp8). The cache may be split or packed whichever the plan was made from.
        ``validate`` is None, True or False.
        ``validate=True`` adds the value checks, which read the device: the metadata's
        values and scales held in GPU tensors (``q_scale``, ``output_scale``, the cache
        quant's ``k_scale`` / ``v_scale``: positive normal float32 values). Under
        ``torch.compile`` the call becomes the custom op of :func:`portattn.attention`
        with the plan's options, backend and hints (no graph break)."""
        if torch.compiler.is_compiling():
            return self._run_traced(q, cache, out, alibi_slopes, sinks, q_scale,
                                    output_scale, validate)
        layer = (alibi_slopes, sinks, q_scale, output_scale)
        try:
            sig = layer_signature(q, cache, out, *layer)
        except Exception:  # not tensors / not a cache: the checks name the argument
            sig = None
        slot = self._accepted.get(sig, _MISSING) if sig is not None else _MISSING
        values = self._values if validate is None else bool(validation_requested(validate))
        if slot is _MISSING or values:
            slot = self._check(q, cache, out, layer, sig, values)
        body = self._body
        if out is None:
            out = body.new_out(q)
        if q.shape[0]:
            try:
                body.launch(q, cache, self._launch_metadata, out, layer, slot)
            except launch_failures.KernelFailed as failed:
                raise body.failure_error(
                    failed, "a new portattn.plan routes this problem elsewhere"
                ) from failed.cause
        return out

    def _run_traced(self, q, cache, out, alibi_slopes, sinks, q_scale, output_scale,
                    validate) -> torch.Tensor:
        """``run`` while Dynamo traces: the call is checked against the plan (host facts
        only), then becomes the custom op with the plan's options and hints; the op's
        eager body (``attention``'s) finds this plan's body in the same plan cache (the
        plan's backend is passed on only when it was forced), deciding under the settings
        the plan was made under (:func:`portattn.settings.pinned`), not the call's."""
        from portattn.ops import call_op

        body, hinted = self._body, self._hinted
        layer = (alibi_slopes, sinks, q_scale, output_scale)
        self._check_against_plan(q, cache, out, layer)
        if out is None:
            out = body.new_out(q)
        options = body.options
        forced = None if body.decision.source == "auto" else self.backend
        # checked against the plan above: the op directly, not attention()'s checks again
        return call_op(q, cache, hinted, scale=options.scale, causal=options.causal,
                       sliding_window=options.sliding_window, softcap=options.softcap,
                       alibi_slopes=alibi_slopes, alibi_sqrt=options.alibi_sqrt, sinks=sinks,
                       q_scale=q_scale, output_scale=output_scale, out=out, backend=forced,
                       validate=self._values if validate is None else validate,
                       environment=self._environment)

    def _check_against_plan(self, q, cache, out, layer, values: bool = False) -> None:
        """The checks of a call against the plan: host facts (shapes, dtypes, devices,
        options, hints); with ``values`` also the metadata's and scales' values, before
        the hint bounds (whose message can only guess at the lengths they bound)."""
        body = self._body
        metadata = self.metadata
        _check_q(q, body)
        _check_cache(cache, body)
        check_structure(q, cache, metadata)
        alibi_slopes, sinks, q_scale, output_scale = layer
        # alibi_sqrt only with slopes: a missing alibi_slopes is named by _check_problem
        options = normalize_options(
            q, cache, out=out, scale=body.options.scale, causal=body.options.causal,
            sliding_window=body.options.sliding_window, softcap=body.options.softcap,
            alibi_slopes=alibi_slopes,
            alibi_sqrt=body.options.alibi_sqrt and alibi_slopes is not None, sinks=sinks,
            q_scale=q_scale, output_scale=output_scale)
        check_out(q, cache, out, options.out_dtype)
        if out is None:  # run() allocates the planned dtype
            planned = body.problem.out_dtype
            if planned in FP8_DTYPES and output_scale is None:
                raise InputError("output_scale", f"a scale for the planned fp8 output "
                                 f"({planned})", "None")
            if planned not in FP8_DTYPES and output_scale is not None:
                raise InputError("output_scale", f"None for the planned {planned} output",
                                 "a scale")
            options = replace(options, out_dtype=planned)
        if values:
            check_values(q, cache, metadata)
            check_scale_values(cache, options.q_scale, options.output_scale)
            _check_hints(metadata, self.max_seqlen_q, self.max_seqlen_k)
        check_hint_bounds(q, metadata, self.max_seqlen_q, self.max_seqlen_k)
        call = Problem.from_call(q, cache, metadata, options, self.max_seqlen_q,
                                 self.max_seqlen_k)
        _check_problem(body.problem, call, body.device, q)

    def _check(self, q, cache, out, layer, sig, values: bool):
        """The full checks; value checks (device reads) when ``values``."""
        stats["checked"] += 1
        body = self._body
        self._check_against_plan(q, cache, out, layer, values)
        if sig is None:
            sig = _safe_signature(q, cache, out, layer)
        slot = None if sig is None else body.runner.slot((sig, self._meta_sig))
        if sig is not None:
            with self._lock:
                if len(self._accepted) >= CALLS_PER_ENTRY:
                    self._accepted.clear()
                self._accepted[sig] = slot
        return slot


def check_hint_bounds(q: torch.Tensor, metadata: AttentionMetadata, max_q: int,
                      max_k: int) -> None:
    """What the host knows without reading the device: ``num_tokens <= num_seqs *
    max_seqlen_q`` and ``<= num_seqs * max_seqlen_k`` (each sequence has at most that
    many queries, and at least as many keys as queries)."""
    tokens, seqs = q.shape[0], metadata.seq_lens.shape[0]
    if tokens > seqs * max_q:
        raise InputError("metadata.max_seqlen_q", f">= the longest query length (at least "
                         f"{-(-tokens // max(seqs, 1))}: {tokens} tokens in {seqs} "
                         "sequences)", str(max_q))
    if tokens > seqs * max_k:
        raise InputError("metadata.max_seqlen_k", f">= the longest seq_len (at least "
                         f"{-(-tokens // max(seqs, 1))}: {tokens} query tokens in {seqs} "
                         "sequences)", str(max_k))


def _check_hints(metadata: AttentionMetadata, max_q: int, max_k: int) -> None:
    """The plan's recorded hints against the real lengths (reads device values)."""
    real_q, real_k = AttentionMetadata(metadata.cu_seqlens_q, metadata.seq_lens,
                                       metadata.block_table).max_lengths()
    if real_q > max_q:
        raise InputError("metadata.max_seqlen_q", f">= the longest query length {real_q}",
                         f"{max_q} (the plan's)")
    if real_k > max_k:
        raise InputError("metadata.max_seqlen_k", f">= the longest seq_len {real_k}",
                         f"{max_k} (the plan's)")


_ALIBI = (None, "linear", "sqrt")


def plan(metadata: AttentionMetadata, *, num_q_heads: int, dtype: torch.dtype,
         cache: PagedKVCache | None = None, num_kv_heads: int | None = None,
         head_size_qk: int | None = None, head_size_v: int | None = None,
         block_size: int | None = None, kv_dtype: torch.dtype | None = None,
         kv_quant: KVQuant | None = None, out_dtype: torch.dtype | None = None,
         scale: float | None = None, causal: bool = True, sliding_window: int | None = None,
         softcap: float | None = None, alibi: str | None = None, sinks: bool = False,
         backend: str | None = None, validate: bool | None = None) -> AttentionPlan:
    """Decide once per batch what every layer with this head configuration will run.

    ``metadata``: the batch (its ``max_seqlen_q`` / ``max_seqlen_k`` hints are what the
    plan is made for; when None they are read from the device once, here). The KV cache is
    described by ``cache`` (any layer's cache, read for its structure only and not kept) or
    by ``num_kv_heads``, ``head_size_qk``, ``head_size_v`` (default ``head_size_qk``),
    ``block_size``, ``kv_dtype`` (default ``dtype``) and ``kv_quant``. ``dtype`` is q's
    dtype; ``out_dtype`` the result's (default as :func:`portattn.attention`). ``scale``,
    ``causal``, ``sliding_window``, ``softcap`` are as in :func:`portattn.attention`;
    ``alibi`` (``None``, ``"linear"``, ``"sqrt"``) and ``sinks`` say whether the layers
    pass ``alibi_slopes`` / ``sinks`` to :meth:`AttentionPlan.run`. ``backend`` forces a
    backend; ``validate`` is the default of ``run``'s (None: value checks only for CPU
    metadata or ``PORTATTN_VALIDATE=1``). Environment variables (``PORTATTN_BACKEND``,
    ``PORTATTN_VALIDATE``...) are read here, once: a plan is a decision. Raises
    ``InputError`` naming the argument, or ``UnsupportedError`` when no backend can serve
    the plan.
    """
    check_backend_argument(backend)
    if not isinstance(metadata, AttentionMetadata):
        raise InputError("metadata", "a portattn.AttentionMetadata", _describe(metadata))
    device = metadata.seq_lens.device if isinstance(metadata.seq_lens, torch.Tensor) else None
    if device is not None:  # the stand-ins live there: named as the metadata's, not theirs
        check_has_data("metadata.seq_lens", metadata.seq_lens)
    if alibi not in _ALIBI:
        raise InputError("alibi", "None, 'linear' or 'sqrt'", repr(alibi))
    if not isinstance(sinks, bool):
        raise InputError("sinks", "True or False (whether run() gets sinks)", _describe(sinks))
    if out_dtype is not None and not isinstance(out_dtype, torch.dtype):
        raise InputError("out_dtype", "a torch.dtype or None", _describe(out_dtype))
    try:
        q0, cache0 = _stand_ins(device, num_q_heads, dtype, cache, num_kv_heads, head_size_qk,
                                head_size_v, block_size, kv_dtype, kv_quant)
        check_structure(q0, cache0, metadata)
        def vector():
            return torch.zeros(num_q_heads, dtype=torch.float32, device=device)
        out0 = None if out_dtype is None else \
            torch.empty(0, num_q_heads, cache0.head_size_v, dtype=out_dtype, device=device)
        options = normalize_options(
            q0, cache0, out=out0, scale=scale, causal=causal, sliding_window=sliding_window,
            softcap=softcap, alibi_slopes=vector() if alibi else None,
            alibi_sqrt=alibi == "sqrt", sinks=vector() if sinks else None,
            q_scale=1.0 if dtype in FP8_DTYPES else None,
            output_scale=1.0 if out_dtype in FP8_DTYPES else None)
        check_out(q0, cache0, out0, options.out_dtype)
    except InputError as exc:
        raise _named_as_plan_argument(exc, cache is None, kv_dtype is None) from None
    max_q, max_k = metadata.max_lengths()
    # the stand-in cache is an expanded vector: the template's layout decides whether its
    # slots are rows (without a template, the usual layout: they are)
    problem = replace(Problem.from_call(q0, cache0, metadata, options, max_q, max_k),
                      kv_rows=cache is None or (cache_slot_rows(cache.key_cache) and
                                                cache_slot_rows(cache.value_cache)))
    body = _body_for(problem, options, backend, decision_environment(), device)
    return AttentionPlan(body, metadata, max_q, max_k, validate)


#: the stand-ins' argument names -> plan()'s argument that made them (a described cache:
#: its dtype is ``kv_dtype``, or q's ``dtype`` where kv_dtype was left to follow it;
#: ``alibi_sqrt`` is what ``alibi="sqrt"`` becomes)
_STAND_IN_ARGUMENTS = {"q": "dtype", "out": "out_dtype", "alibi_sqrt": "alibi"}
_DESCRIBED_CACHE_ARGUMENTS = ("cache", "key_cache", "value_cache")


def _named_as_plan_argument(exc: InputError, described: bool,
                            kv_dtype_follows: bool) -> InputError:
    """An ``InputError`` of the checks plan() runs on its stand-ins (``q``, ``out``, the
    described cache), renamed to the plan() argument that made the stand-in: the caller
    passed ``dtype``, ``out_dtype``, ``kv_dtype``, never a ``q`` or a ``key_cache``."""
    argument = _STAND_IN_ARGUMENTS.get(exc.argument)
    expected = exc.expected
    if described and exc.argument in _DESCRIBED_CACHE_ARGUMENTS:
        argument = "dtype" if kv_dtype_follows else "kv_dtype"
        expected = expected.replace("quant=KVQuant", "kv_quant=KVQuant")  # plan()'s name
    if argument is None:
        return exc
    return InputError(argument, expected, exc.got.replace("alibi_sqrt=True", "alibi='sqrt'"))


def _stand_ins(device, num_q_heads, dtype, cache, num_kv_heads, head_size_qk, head_size_v,
               block_size, kv_dtype, kv_quant) -> tuple[torch.Tensor, PagedKVCache]:
    """An empty q and a one-block cache (no memory: an expanded vector) with the described
    structure, so plan() runs exactly the checks attention() runs."""
    if device is None:
        raise InputError("metadata.seq_lens", "a tensor", "not a tensor")
    if isinstance(num_q_heads, bool) or not isinstance(num_q_heads, int) or num_q_heads <= 0:
        raise InputError("num_q_heads", "a positive int", _describe(num_q_heads))
    if not isinstance(dtype, torch.dtype):
        raise InputError("dtype", "a torch.dtype (q's)", _describe(dtype))
    if cache is not None:
        if not isinstance(cache, PagedKVCache):
            raise InputError("cache", "a portattn.PagedKVCache (used as a template)",
                             _describe(cache))
        cache.check_fields()  # attributes reassigned since the constructor, as run() does
        given = {"num_kv_heads": num_kv_heads, "head_size_qk": head_size_qk,
                 "head_size_v": head_size_v, "block_size": block_size, "kv_dtype": kv_dtype,
                 "kv_quant": kv_quant}
        for name, value in given.items():
            if value is not None:
                raise InputError(name, "None when cache= describes the cache",
                                 value_text(value))
        template = cache
        num_kv_heads, head_size_qk = cache.num_kv_heads, cache.head_size_qk
        head_size_v, block_size, kv_dtype = cache.head_size_v, cache.block_size, cache.dtype
        quant, packed = cache.quant, cache.packed
    else:
        template = None
        for name, value in (("num_kv_heads", num_kv_heads), ("head_size_qk", head_size_qk),
                            ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InputError(name, "a positive int (or pass cache=)", _describe(value))
        head_size_v = head_size_qk if head_size_v is None else head_size_v
        if isinstance(head_size_v, bool) or not isinstance(head_size_v, int) or \
                head_size_v <= 0:
            raise InputError("head_size_v", "a positive int or None", _describe(head_size_v))
        quant = KVQuant.none() if kv_quant is None else kv_quant
        if not isinstance(quant, KVQuant):
            raise InputError("kv_quant", "a portattn.KVQuant or None", _describe(kv_quant))
        if kv_dtype is not None and not isinstance(kv_dtype, torch.dtype):
            raise InputError("kv_dtype", "a torch.dtype or None", _describe(kv_dtype))
        if kv_dtype is not None:  # an fp8 quant without a named format takes kv_dtype's
            quant = quant.in_format_of(kv_dtype)
            if quant.storage_dtype is not None and kv_dtype != quant.storage_dtype:
                raise InputError("kv_dtype", f"None or {quant.storage_dtype} (the storage "
                                 f"of {quant.key})", str(kv_dtype))
        kv_dtype = quant.storage_dtype or (dtype if kv_dtype is None else kv_dtype)
        packed = head_size_v != head_size_qk
    if num_q_heads % num_kv_heads:  # named as plan's argument (attention's check says "q")
        raise InputError("num_q_heads", f"a multiple of num_kv_heads={num_kv_heads}",
                         str(num_q_heads))
    k = torch.empty(head_size_qk, dtype=kv_dtype, device=device).expand(
        1, block_size, num_kv_heads, head_size_qk)
    v = torch.empty(head_size_v, dtype=kv_dtype, device=device).expand(
        1, block_size, num_kv_heads, head_size_v)
    scales = {}
    if template is not None and template.quant.per_token_head:
        shape = (1, block_size, num_kv_heads)
        scales = {"k_scale_cache": torch.zeros(shape, device=device),
                  "v_scale_cache": torch.zeros(shape, device=device)}
    cache0 = PagedKVCache(k, v, quant, packed=packed, **scales)
    q0 = torch.empty(0, num_q_heads, head_size_qk, dtype=dtype, device=device)
    return q0, cache0


# --------------------------------------------------------------------------- attention()


_CALLS_ATTR = "_portattn_calls"


class _Calls(dict):
    """One memo entry: accepted call keys -> (body, slot). Also kept on the metadata
    object (``metadata.__dict__``), so a call with that object finds it without computing
    the entry's token; a copy made by ``copy.deepcopy`` or ``pickle`` gets an empty one
    (a shallow ``copy.copy``, with the same tensors and hints, shares it)."""

    __slots__ = ()

    def __reduce__(self):
        return (_Calls, ())


class _MetadataMemo:
    """Per metadata: accepted call structures -> (body, slot).

    Keyed by the ids of the metadata's three tensors and its hints (with their types); a
    weakref finalizer on each tensor removes the entry when it dies, so no id is reused
    while it is a key and no tensor is held. The metadata object that put an entry keeps
    a reference to its calls (:func:`attend` reads them first); an entry that leaves the
    memo (capacity, :meth:`clear`) is emptied, so those references hold nothing."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: dict = {}
        self.lock = threading.RLock()  # finalizers may run while it is held

    @staticmethod
    def token(metadata: AttentionMetadata) -> tuple:
        max_q, max_k = metadata.max_seqlen_q, metadata.max_seqlen_k
        return (id(metadata.cu_seqlens_q), id(metadata.seq_lens), id(metadata.block_table),
                max_q, type(max_q), max_k, type(max_k))

    def find(self, metadata: AttentionMetadata) -> Mapping:
        """The calls of the entry of this metadata's tensors and hints (empty if none):
        for a metadata object that does not keep them, e.g. one rebuilt by the custom op."""
        entry = self.entries.get(self.token(metadata))
        return _NO_CALLS if entry is None else entry[0]

    def put(self, metadata: AttentionMetadata, key, value) -> None:
        token = self.token(metadata)
        with self.lock:
            entry = self.entries.get(token)
            if entry is None:
                while len(self.entries) >= self.capacity:  # the oldest first
                    # (a finalizer may drop entries meanwhile: gc runs on any allocation)
                    dropped = self.entries.pop(next(iter(self.entries)), None)
                    if dropped is not None:
                        self._forget(dropped)
                calls = _Calls()
                finalizers = tuple(weakref.finalize(t, self._drop, token, calls)
                                   for t in (metadata.cu_seqlens_q, metadata.seq_lens,
                                             metadata.block_table))
                entry = self.entries[token] = (calls, finalizers)
            calls = entry[0]
            if len(calls) >= CALLS_PER_ENTRY:
                calls.clear()
            calls[key] = value
            metadata.__dict__[_CALLS_ATTR] = calls

    @staticmethod
    def _forget(entry) -> None:
        """An entry leaves the memo: no finalizer keeps it, no metadata finds a plan in it."""
        for finalizer in entry[1]:
            finalizer.detach()
        entry[0].clear()

    def _drop(self, token, calls) -> None:
        with self.lock:
            entry = self.entries.get(token)
            if entry is not None and entry[0] is calls:
                self._forget(self.entries.pop(token))

    def clear(self) -> None:
        with self.lock:
            # not while iterating the dict: a finalizer (gc runs on any allocation, and
            # the lock is reentrant) may drop an entry meanwhile
            entries = list(self.entries.values())
            self.entries.clear()
            for entry in entries:
                self._forget(entry)

    def __len__(self) -> int:
        return len(self.entries)


memo = _MetadataMemo(METADATA_CAPACITY)
_NO_CALLS: Mapping = MappingProxyType({})


def cache_info() -> dict:
    """Sizes of the plan caches (``bodies``, ``metadata_entries``) and the counters
    (``checked``: full argument checks; ``bodies_made``) for tests and benchmarks."""
    return {"bodies": len(bodies.entries), "metadata_entries": len(memo),
            "checked": stats["checked"], "bodies_made": stats["bodies"]}


#: Held while the bodies and the memo are forgotten, and while a checked call stores its
#: memo entry: an entry is stored only if no clear came since its body was looked up.
_forgetting = threading.Lock()


def forget_plans() -> None:
    """Forget every body and memo entry (calls check and plan again; a call in flight
    keeps the body it holds, and stores no memo entry for it)."""
    with _forgetting:
        bodies.clear()
        memo.clear()


def clear() -> None:
    """Forget every body and memo entry, and drop the shared staging buffers."""
    from portattn.backends.unified_runner import clear_staging_buffers

    forget_plans()
    clear_staging_buffers()


def _memo_allowed(q, cache, metadata, validate, env) -> bool:
    """Whether a call may be served from the memo: exact types, both hints given, and no
    value checks wanted for it (they read device values on every call)."""
    if type(metadata) is not AttentionMetadata or type(q) is not torch.Tensor or \
            type(cache) is not PagedKVCache or metadata.max_seqlen_q is None or \
            metadata.max_seqlen_k is None:
        return False
    if validate is None:
        raw = env[VALIDATE_INDEX]
        if raw is not None and raw not in VALIDATE_VALUES:
            return False  # an unusual spelling: the full path parses (or rejects) it
        wanted = VALIDATE_VALUES.get(raw)
        # (seq_lens not a tensor: "on the CPU", so the full checks run and name it)
        return wanted is False or (wanted is None and
                                   not getattr(metadata.seq_lens, "is_cpu", True))
    return validate is False  # True, or not a bool: the full path checks (or rejects) it


def call_key(q, cache, out, backend, env, option_values: tuple) -> tuple:
    """The memo's key of one call under its metadata's entry: everything a check or a
    launcher may read (as :func:`layer_signature`, with q of exact type) plus the
    forced backend, the decision environment and the scalar options WITH their types
    (``causal=1`` equals ``True`` but fails the checks). One flat tuple: cheap to build
    and hash. Raises (AttributeError, TypeError on hashing) for arguments of the wrong
    kind; the caller then runs the full checks, which name them."""
    scale, causal, window, softcap, alibi_slopes, alibi_sqrt, sinks, q_scale, \
        output_scale = option_values
    if alibi_slopes is None and sinks is None and q_scale is None and output_scale is None:
        extra = None
    else:
        extra = (_tensor_signature(alibi_slopes), _tensor_signature(sinks),
                 _tensor_signature(q_scale), _tensor_signature(output_scale))
    return (q.shape, q.stride(), q.dtype, q.device, cache_structure_id(cache),
            None if out is None else (type(out), out.shape, out.stride(), out.dtype,
                                      out.device, out.requires_grad),
            extra, backend, env, scale, causal, window, softcap, alibi_sqrt, type(scale),
            type(causal), type(window), type(softcap), type(alibi_sqrt))


def check_backend_argument(backend) -> None:
    """``backend`` is None or a name (any str: an unknown name is the selector's
    ``UnsupportedError``, with the known names)."""
    if backend is not None and not isinstance(backend, str):
        raise InputError("backend", "None or a backend name (a str)", _describe(backend))


def attend(q, cache, metadata, out, backend, validate, option_values: tuple,
           prepare) -> torch.Tensor:
    """The body of :func:`portattn.attention` outside tracing.

    ``option_values``: (scale, causal, sliding_window, softcap, alibi_slopes, alibi_sqrt,
    sinks, q_scale, output_scale); ``prepare(...) -> (options, problem)`` runs the full
    checks (``api._prepare``)."""
    check_backend_argument(backend)
    env = decision_environment()
    key = hit = None
    if _memo_allowed(q, cache, metadata, validate, env):
        try:
            key = call_key(q, cache, out, backend, env, option_values)
            # the calls its object keeps (no token to compute; an emptied entry's are
            # empty, so the entry is looked up again), else those of its tensors
            hit = (metadata.__dict__.get(_CALLS_ATTR) or memo.find(metadata)).get(key)
        except (AttributeError, TypeError):  # not a tensor where one belongs; unhashable
            key = None  # the full checks name the argument
    if hit is None:
        hit = _checked(q, cache, metadata, out, backend, validate, option_values, prepare,
                       env, key)
    body, slot = hit
    if out is None:
        out = body.new_out(q)
    if q.shape[0]:
        try:
            body.launch(q, cache, metadata, out,
                        (option_values[4], option_values[6], option_values[7],
                         option_values[8]), slot)
        except launch_failures.KernelFailed as failed:
            _reroute_or_raise(body, failed, q, out)
        else:
            return out
        # decided again, outside the handler: that backend is ruled out for it now
        return attend(q, cache, metadata, out, backend, validate, option_values, prepare)
    return out


def _reroute_or_raise(body: PlanBody, failed, q, out) -> None:
    """After a body's kernel failed inside Triton: record it; return (warned: the call is
    decided again) where routing was automatic, no CUDA graph is being captured and
    ``out`` does not share q's memory (a kernel that ran before the failing one may have
    written it); else raise the error that names it and why it was not rerouted."""
    kept = ("the backend was forced" if body.decision.source != "auto" else
            "a CUDA graph is being captured" if capturing_on(q.device) else
            "out shares q's memory" if _shares_memory(out, q) else None)
    if kept is not None:
        raise body.failure_error(failed, f"not rerouted: {kept}") from failed.cause
    error = body.failure_error(failed, "this problem goes to the next backend in this "
                                       "process")
    log.warning("portattn: %s", str(error))


def _shares_memory(out, q) -> bool:
    return out is not None and out.device == q.device and \
        out.untyped_storage().data_ptr() == q.untyped_storage().data_ptr()


def _checked(q, cache, metadata, out, backend, validate, option_values, prepare, env,
             key) -> tuple:
    """The full checks of a call, its body and runner slot; remembered under ``key``."""
    stats["checked"] += 1
    generation = bodies.generation
    options, problem = prepare(q, cache, metadata, validate, out, option_values)
    if metadata.max_seqlen_q is not None and metadata.max_seqlen_k is not None:
        check_hint_bounds(q, metadata, metadata.max_seqlen_q, metadata.max_seqlen_k)
    body = _body_for(problem, options, backend, env, q.device)
    layer = (option_values[4], option_values[6], option_values[7], option_values[8])
    sig = _safe_signature(q, cache, out, layer)
    slot = None if sig is None else body.runner.slot((sig, metadata_signature(metadata)))
    hit = (body, slot)
    if key is not None:
        with _forgetting:
            if bodies.generation == generation:  # else its body may be a replaced one's
                memo.put(metadata, key, hit)
    return hit


def _safe_signature(q, cache, out, layer):
    try:
        return layer_signature(q, cache, out, *layer)
    except Exception:  # pragma: no cover - the checks passed, so it is computable
        return None
