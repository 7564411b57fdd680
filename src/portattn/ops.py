"""``torch.ops.portattn.paged_attention``: the custom op that ``torch.compile`` sees.

Under ``torch.compile`` the dispatcher's Python (locks, caches, dataclasses) must not be
traced, so :func:`portattn.attention` hands its tensors and plain options to this op and
Dynamo treats it as one opaque node. The op writes into ``out`` (declared mutated) and
its fake implementation does nothing, which is all shape propagation needs: ``out`` is
allocated by the caller with the right shape and dtype.

Registering the op is a declaration (no device work); it happens when ``portattn.api`` is
first imported, never at ``import portattn``. The op rebuilds the cache and metadata
objects on every call, but the plan memo keys on structure and on the metadata's tensors
(not on these objects), so compiled calls reuse the plans of eager ones.
"""

from __future__ import annotations

import torch

from portattn.options import normalize_options
from portattn.planning import check_backend_argument
from portattn.types import (
    FP8_DTYPES,
    AttentionMetadata,
    KVQuant,
    PagedKVCache,
    scale_as_tensor,
)
from portattn.validation import check_out, check_structure, validation_requested

_FP8_BY_NAME = {str(d).replace("torch.", ""): d for d in FP8_DTYPES}


@torch.library.custom_op("portattn::paged_attention", mutates_args=("out",))
def paged_attention(out: torch.Tensor, q: torch.Tensor, key_cache: torch.Tensor,
                    value_cache: torch.Tensor, k_scale_cache: torch.Tensor | None,
                    v_scale_cache: torch.Tensor | None, k_scale: torch.Tensor | None,
                    v_scale: torch.Tensor | None, quant_mode: str, fp8_dtype: str,
                    packed: bool, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                    block_table: torch.Tensor, max_seqlen_q: int | None,
                    max_seqlen_k: int | None, scale: float | None, causal: bool,
                    sliding_window: int | None, softcap: float | None,
                    alibi_slopes: torch.Tensor | None, alibi_sqrt: bool,
                    sinks: torch.Tensor | None, q_scale: torch.Tensor | None,
                    output_scale: torch.Tensor | None, backend: str | None,
                    validate: bool | None, environment: str) -> None:
    from portattn.api import run_eager
    from portattn.settings import pinned

    quant = KVQuant(quant_mode, k_scale, v_scale, _FP8_BY_NAME.get(fp8_dtype))
    cache = PagedKVCache(key_cache, value_cache, quant, k_scale_cache=k_scale_cache,
                         v_scale_cache=v_scale_cache, packed=packed)
    metadata = AttentionMetadata(cu_seqlens_q, seq_lens, block_table,
                                 max_seqlen_q, max_seqlen_k)
    with pinned(environment):  # a plan's run: the settings it was made under
        run_eager(q, cache, metadata, out, backend, validate,
                  (scale, causal, sliding_window, softcap, alibi_slopes, alibi_sqrt, sinks,
                   q_scale, output_scale))


@paged_attention.register_fake
def _paged_attention_fake(out, q, key_cache, value_cache, k_scale_cache, v_scale_cache,
                          k_scale, v_scale, quant_mode, fp8_dtype, packed, cu_seqlens_q,
                          seq_lens, block_table, max_seqlen_q, max_seqlen_k, scale, causal,
                          sliding_window, softcap, alibi_slopes, alibi_sqrt, sinks, q_scale,
                          output_scale, backend, validate, environment) -> None:
    return None


def _as_tensor(scale, device) -> torch.Tensor | None:
    return None if scale is None else scale_as_tensor(scale, device)


def call_compiled(q, cache: PagedKVCache, metadata: AttentionMetadata, *, scale, causal,
                  sliding_window, softcap, alibi_slopes, alibi_sqrt, sinks, q_scale,
                  output_scale, out, backend, validate=None,
                  environment: str = "") -> torch.Tensor:
    """The traced path of :func:`portattn.attention`: allocate ``out`` and call the op.
    The host checks of an eager call (structure, options, out; no value is read) run
    here, as eagerly and in its order: what reaches the op is what its schema and
    :func:`scale_as_tensor` take unchanged (the schema would turn ``causal=1`` into True
    and ``sliding_window=True`` into a window of 1; a scale ``True`` would become 1.0).
    ``environment``: a :func:`portattn.settings.pin_token` (a plan's), read by the op's
    eager body instead of the environment of the call ("": the call's)."""
    check_backend_argument(backend)  # a non-str would reach the op's schema
    check_structure(q, cache, metadata)
    options = normalize_options(q, cache, scale=scale, causal=causal,
                                sliding_window=sliding_window, softcap=softcap,
                                alibi_slopes=alibi_slopes, alibi_sqrt=alibi_sqrt, sinks=sinks,
                                q_scale=q_scale, output_scale=output_scale, out=out)
    check_out(q, cache, out, options.out_dtype)
    if out is None:
        out = torch.empty(q.shape[0], q.shape[1], cache.head_size_v, dtype=options.out_dtype,
                          device=q.device)
    return call_op(q, cache, metadata, scale=scale, causal=causal,
                   sliding_window=options.sliding_window, softcap=softcap,
                   alibi_slopes=alibi_slopes, alibi_sqrt=alibi_sqrt, sinks=sinks,
                   q_scale=q_scale, output_scale=output_scale, out=out, backend=backend,
                   validate=validate, environment=environment)


def call_op(q, cache: PagedKVCache, metadata: AttentionMetadata, *, scale, causal,
            sliding_window, softcap, alibi_slopes, alibi_sqrt, sinks, q_scale, output_scale,
            out: torch.Tensor, backend, validate, environment: str) -> torch.Tensor:
    """The op called on arguments the host checks passed (:func:`call_compiled`'s, or a
    plan's against the call), into ``out``."""
    if validate is not None:
        validation_requested(validate)  # None, True or False
    quant = cache.quant
    paged_attention(
        out, q, cache.key_cache, cache.value_cache, cache.k_scale_cache, cache.v_scale_cache,
        _as_tensor(quant.k_scale, q.device), _as_tensor(quant.v_scale, q.device), quant.mode,
        str(quant.fp8_dtype).replace("torch.", "") if quant.fp8_dtype is not None else "",
        cache.packed, metadata.cu_seqlens_q, metadata.seq_lens, metadata.block_table,
        metadata.max_seqlen_q, metadata.max_seqlen_k, scale, causal, sliding_window, softcap,
        alibi_slopes, alibi_sqrt, sinks, _as_tensor(q_scale, q.device),
        _as_tensor(output_scale, q.device), backend, validate, environment)
    return out
