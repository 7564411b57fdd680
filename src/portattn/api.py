"""The public entry points: :func:`attention` and :func:`explain`.

A call goes: normalize options -> structural checks -> (value checks when cheap or asked)
-> ``Problem`` -> cached ``Decision`` -> the backend's ``run``. With
``metadata.max_seqlen_q/k`` given, nothing here reads device values, so the call does not
synchronize and can be captured in a CUDA graph.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from portattn.capabilities import probe
from portattn.dispatch.problem import Problem
from portattn.envstate import VALIDATE_INDEX, VALIDATE_VALUES, decision_environment
from portattn.dispatch.registry import load_backend
from portattn.dispatch.selector import Decision, decide
from portattn.ops import call_compiled
from portattn.options import AttentionOptions, normalize_options
from portattn.types import AttentionMetadata, PagedKVCache, Scale
from portattn.validation import check_out, check_structure, check_values, \
    validation_requested


#: The options of :func:`attention`, in the order :func:`run_eager` takes their values.
OPTION_NAMES = ("scale", "causal", "sliding_window", "softcap", "alibi_slopes", "alibi_sqrt",
                "sinks", "q_scale", "output_scale")


def _prepare(q, cache, metadata, validate, out, options_kwargs) -> tuple[AttentionOptions,
                                                                           Problem]:
    check_structure(q, cache, metadata)
    options = normalize_options(q, cache, out=out, **options_kwargs)
    check_out(q, cache, out, options.out_dtype)
    wanted = validation_requested(validate)
    if wanted or (wanted is None and metadata.seq_lens.device.type == "cpu"):
        check_values(q, cache, metadata)
    max_q, max_k = metadata.max_lengths()
    return options, Problem.from_call(q, cache, metadata, options, max_q, max_k)


def attention(q: torch.Tensor, cache: PagedKVCache, metadata: AttentionMetadata, *,
              scale: float | None = None, causal: bool = True,
              sliding_window: int | None = None, softcap: float | None = None,
              alibi_slopes: torch.Tensor | None = None, alibi_sqrt: bool = False,
              sinks: torch.Tensor | None = None, q_scale: Scale | None = None,
              output_scale: Scale | None = None,
              out: torch.Tensor | None = None, backend: str | None = None,
              validate: bool | None = None) -> torch.Tensor:
    """Paged attention of the new query tokens ``q`` over the cached keys and values.

    ``q``: ``[num_tokens, num_q_heads, head_size_qk]`` (packed varlen, sequences one after
    another as ``metadata.cu_seqlens_q`` says). Returns ``[num_tokens, num_q_heads,
    head_size_v]`` (written into ``out`` when given). See DESIGN.md for the semantics of
    each option; ``backend`` forces a backend by name (``UnsupportedError`` when it cannot
    serve the call); ``validate`` forces value checks on (or off) for GPU metadata.
    Under ``torch.compile`` the call becomes the custom op
    ``torch.ops.portattn.paged_attention`` (no graph break).
    """
    values = (scale, causal, sliding_window, softcap, alibi_slopes, alibi_sqrt, sinks,
              q_scale, output_scale)  # in OPTION_NAMES order
    if torch.compiler.is_compiling():
        return call_compiled(q, cache, metadata, out=out, backend=backend, validate=validate,
                             **dict(zip(OPTION_NAMES, values)))
    return run_eager(q, cache, metadata, out, backend, validate, values)


class _FastPath:
    """Memo of fully checked calls, so a steady-state call skips every Python check.

    Keyed by the cache and metadata objects themselves (identity), q's and out's shape,
    strides, dtype and device, the option values (tensors by identity) and the decision
    environment. A hit means every structural check would pass exactly as before, so the
    call goes straight to the backend's ``run``. Only metadata on a GPU with both max
    lengths qualifies, and only when value checks are off for it (by default they run for
    CPU metadata; ``validate=False`` or ``PORTATTN_VALIDATE=0`` turns them off).
    Bounded: each entry keeps its metadata alive, so the memo stays small.
    """

    capacity = 64

    def __init__(self) -> None:
        self.entries: dict = {}
        self.lock = threading.Lock()

    def key(self, q, cache, metadata, out, backend, validate, option_values):
        if type(metadata) is not AttentionMetadata or type(q) is not torch.Tensor or \
                type(cache) is not PagedKVCache or metadata.max_seqlen_q is None or \
                metadata.max_seqlen_k is None:
            return None
        env = decision_environment()
        if validate is None:
            raw = env[VALIDATE_INDEX]
            if raw is not None and raw not in VALIDATE_VALUES:
                return None  # an unusual spelling: the full path parses (or rejects) it
            validate = VALIDATE_VALUES.get(raw)
        if validate or (validate is None and metadata.seq_lens.is_cpu):
            return None  # value checks run on every such call
        out_key = None if out is None else (out.shape, out.stride(), out.dtype, out.device)
        # the cache's tensors and quant by identity too: the object itself is mutable
        return (cache, id(cache.key_cache), id(cache.value_cache), id(cache.quant), metadata,
                q.shape, q.stride(), q.dtype, q.device, out_key, backend, option_values, env)

    def put(self, key, value) -> None:
        with self.lock:  # misses only; hits read the dict without it
            while len(self.entries) >= self.capacity:
                self.entries.pop(next(iter(self.entries)))
            self.entries[key] = value


_fast = _FastPath()


def run_eager(q, cache, metadata, out, backend, validate, option_values: tuple,
              memo: bool = True) -> torch.Tensor:
    """Check, decide (cached) and run; the body of :func:`attention` outside tracing.
    ``option_values``: the options' values in :data:`OPTION_NAMES` order. ``memo=False``
    (the custom op, which rebuilds cache and metadata objects every call) skips the
    fast-path memo."""
    key = _fast.key(q, cache, metadata, out, backend, validate, option_values) if memo \
        else None
    hit = _fast.entries.get(key) if key is not None else None
    if hit is None:
        options, problem = _prepare(q, cache, metadata, validate, out,
                                    dict(zip(OPTION_NAMES, option_values)))
        decision = decide(problem, probe(), backend)
        hit = (options, load_backend(decision.backend), decision.plan)
        if key is not None:
            _fast.put(key, hit)
    options, runner, plan = hit
    if out is None:
        out = torch.empty(q.shape[0], q.shape[1], cache.head_size_v, dtype=options.out_dtype,
                          device=q.device)
    if q.shape[0]:
        runner.run(q, cache, metadata, options, out, plan)
    return out


def explain(q: torch.Tensor, cache: PagedKVCache, metadata: AttentionMetadata, *,
            backend: str | None = None, out: torch.Tensor | None = None,
            validate: bool | None = None, **options: Any) -> Decision:
    """The :class:`Decision` :func:`attention` would take for these arguments (nothing
    runs): backend, variant, and every other backend with its reasons."""
    _, problem = _prepare(q, cache, metadata, validate, out, options)
    return decide(problem, probe(), backend)
