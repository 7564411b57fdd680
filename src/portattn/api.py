"""The public entry points: :func:`attention`, :func:`explain` (and :func:`plan`, in
:mod:`portattn.planning`).

A call goes: normalize options -> structural checks -> (value checks when cheap or asked)
-> ``Problem`` -> cached ``Decision`` -> a plan's runner. A call whose structure (shapes,
strides, dtypes, option values and types: :func:`portattn.planning.call_key`) was already
checked with the same metadata skips straight to the runner. With
``metadata.max_seqlen_q/k`` given, nothing here reads device values, so the call does not
synchronize and can be captured in a CUDA graph.
"""

from __future__ import annotations

from typing import Any

import torch

from portattn.capabilities import probe
from portattn.dispatch.problem import Problem
from portattn.dispatch.selector import Decision, decide, with_notes
from portattn.ops import call_compiled
from portattn.options import AttentionOptions, normalize_options
from portattn.planning import attend, check_backend_argument
from portattn.types import AttentionMetadata, PagedKVCache, Scale
from portattn.validation import (
    check_out,
    check_scale_values,
    check_structure,
    check_values,
    validation_requested,
)

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
        check_scale_values(cache, options.q_scale, options.output_scale)
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
    serve the call; an unknown name is also an ``InputError``; ``"auto"`` routes
    automatically whatever ``PORTATTN_BACKEND`` says); ``validate``: True checks the
    metadata's values wherever they live (on a GPU that synchronizes), False never checks
    them (not on the CPU either), None follows ``PORTATTN_VALIDATE`` (unset: only metadata
    on the CPU). ``out``, when given,
    is written in place: the result's shape and dtype, a contiguous last dimension, no
    grad, no two elements at one address, and either q itself or sharing no element with
    q.
    Scales held in GPU tensors (``q_scale``, ``output_scale``, a ``KVQuant``'s
    ``k_scale`` / ``v_scale``) are range-checked (positive normal float32) only with
    ``validate=True``: reading them synchronizes with the device. Under
    ``torch.compile`` the call becomes the custom op ``torch.ops.portattn.paged_attention``
    (no graph break). Inference only: the result carries no gradient (whatever backend
    serves the call).
    """
    values = (scale, causal, sliding_window, softcap, alibi_slopes, alibi_sqrt, sinks,
              q_scale, output_scale)  # in OPTION_NAMES order
    if torch.compiler.is_compiling():
        named: dict[str, Any] = dict(zip(OPTION_NAMES, values))
        return call_compiled(q, cache, metadata, out=out, backend=backend, validate=validate,
                             **named)
    return attend(q, cache, metadata, out, backend, validate, values, _prepare_values)


def run_eager(q, cache, metadata, out, backend, validate,
              option_values: tuple) -> torch.Tensor:
    """Check (once per call structure), plan (cached) and run; the body of
    :func:`attention` outside tracing and of its custom op. ``option_values``: the
    options' values in :data:`OPTION_NAMES` order. See :mod:`portattn.planning`."""
    return attend(q, cache, metadata, out, backend, validate, option_values, _prepare_values)


def _prepare_values(q, cache, metadata, validate, out, option_values):
    return _prepare(q, cache, metadata, validate, out, dict(zip(OPTION_NAMES, option_values)))


def explain(q: torch.Tensor, cache: PagedKVCache, metadata: AttentionMetadata, *,
            backend: str | None = None, out: torch.Tensor | None = None,
            validate: bool | None = None, **options: Any) -> Decision:
    """The :class:`Decision` :func:`attention` would take for these arguments (nothing
    runs): backend, variant, every other backend with its reasons, and the chosen
    backend's notes about this call (e.g. that its first call compiles a kernel)."""
    check_backend_argument(backend)
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"explain() got an unexpected keyword argument {unknown[0]!r} "
                        f"(the options: {', '.join(OPTION_NAMES)})")
    call_options, problem = _prepare(q, cache, metadata, validate, out, options)
    # log=False: nothing runs, so the "serves" line waits for the call that does
    return with_notes(decide(problem, probe(device=q.device), backend, log=False),
                      call_options, cache)
