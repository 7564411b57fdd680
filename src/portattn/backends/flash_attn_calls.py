"""How our call maps onto flash-attn's functions (the tensors and arguments, nothing else).

Our semantics and flash-attn's agree where it matters: both align the causal mask
bottom-right (queries are the last tokens of each sequence), and both apply softcap to the
scaled score. The rest maps as follows:

* ``sliding_window=w`` -> ``window_size=(w - 1, 0)`` when causal, else ``(w - 1, -1)``
  (FA2/FA3, where -1 means unbounded) or ``(w - 1, None)`` (FA4, where only None is
  unbounded: FA4 treats ``(w - 1, -1)`` as a window ending one key BEFORE the query);
* ALiBi linear (FA2 only) -> ``alibi_slopes`` in float32. FA2 adds ``-slope * |p - k|``,
  equal to our ``slope * (k - p)`` only when later keys are masked (the rules ask causal);
* fp8 (FA3 only): our ``value = stored * scale`` is FA3's descale, given per (sequence,
  kv head) as float32 ``[B, Hkv]``; a scalar scale is expanded without a copy (FA4's
  public call takes no descales in 4.0.0b36: its rules keep fp8 away from it);
* sinks (FA4 only) -> ``learnable_sink``: one logit per query head in natural-log units,
  not multiplied by ``softmax_scale``, joining the denominator only: ours exactly.

Four calls:

* :func:`fa2_varlen`: ``flash_attn_varlen_func(..., block_table=...)`` (any query lengths);
* :func:`fa2_decode`: ``flash_attn_with_kvcache`` on ``q[:, None]`` when every sequence has
  exactly one query: FA2's decode path, which splits the keys across programs;
* :func:`fa3_paged`: FA3's ``flash_attn_with_kvcache`` with ``page_table``,
  ``cu_seqlens_q`` and ``cache_seqlens`` (any query lengths, any page size);
* :func:`fa4_paged`: FA4's ``flash_attn.cute.flash_attn_varlen_func`` with ``page_table``,
  ``cu_seqlens_q`` and ``seqused_k`` (any query lengths, decode included: one query per
  sequence is just ``cu_seqlens_q`` with steps of one; any page size). It returns
  ``(out, lse)`` and takes no ``out`` argument, so the caller copies.

None of them synchronizes with the device when the metadata carries its max lengths.
"""

from __future__ import annotations

import torch


def window_arg(options) -> tuple[int, int]:
    if options.sliding_window is None:
        return (-1, -1)
    return (options.sliding_window - 1, 0 if options.causal else -1)


def _alibi(options):
    slopes = options.alibi_slopes
    if slopes is not None and slopes.dtype != torch.float32:
        slopes = slopes.float()
    return slopes


def one_query_per_sequence(q: torch.Tensor, metadata, max_q: int) -> bool:
    """True when every sequence has exactly one query (known from shapes, no sync)."""
    return max_q == 1 and q.shape[0] == metadata.seq_lens.shape[0]


def fa2_varlen(q, key_cache, value_cache, block_table, metadata, options, max_q, max_k):
    from flash_attn import flash_attn_varlen_func

    cu_seqlens_k = torch.zeros(metadata.seq_lens.shape[0] + 1, dtype=torch.int32,
                               device=q.device)
    torch.cumsum(metadata.seq_lens, 0, out=cu_seqlens_k[1:])
    # With max_seqlen_q == 1 FA2 folds the GQA query heads into rows, assuming one query
    # for every sequence; some have none here. 2 turns that off and changes no result.
    return flash_attn_varlen_func(
        q, key_cache, value_cache, metadata.cu_seqlens_q, cu_seqlens_k, max(max_q, 2), max_k,
        softmax_scale=options.scale, causal=options.causal, window_size=window_arg(options),
        softcap=options.softcap or 0.0, alibi_slopes=_alibi(options), block_table=block_table)


def fa2_decode(q, key_cache, value_cache, block_table, metadata, options):
    from flash_attn import flash_attn_with_kvcache

    result = flash_attn_with_kvcache(
        q.unsqueeze(1), key_cache, value_cache, cache_seqlens=metadata.seq_lens,
        block_table=block_table, softmax_scale=options.scale, causal=options.causal,
        window_size=window_arg(options), softcap=options.softcap or 0.0,
        alibi_slopes=_alibi(options), num_splits=0)
    return result.squeeze(1)


def descale(scale, num_seqs: int, num_kv_heads: int, device) -> torch.Tensor:
    """A float32 ``[num_seqs, num_kv_heads]`` view of one scale (a float or a 1-element
    float32 tensor): a stride-0 view of a tensor on the device, else a fill kernel (a CPU
    tensor is read on the host, which needs no device sync)."""
    if isinstance(scale, torch.Tensor) and scale.device == torch.device(device):
        return scale.to(torch.float32).reshape(1, 1).expand(num_seqs, num_kv_heads)
    return torch.full((num_seqs, num_kv_heads), float(scale), dtype=torch.float32,
                      device=device)


def fa3_paged(q, cache, metadata, options, max_q):
    from flash_attn_interface import flash_attn_with_kvcache

    descales = {}
    if cache.quant.mode != "none":  # fp8_per_tensor with an e4m3 q (the rules ask so)
        shape = (metadata.seq_lens.shape[0], cache.num_kv_heads, q.device)
        descales = dict(q_descale=descale(options.q_scale, *shape),
                        k_descale=descale(cache.quant.k_scale, *shape),
                        v_descale=descale(cache.quant.v_scale, *shape))
    return flash_attn_with_kvcache(
        q, cache.key_cache, cache.value_cache, cache_seqlens=metadata.seq_lens,
        page_table=metadata.block_table, cu_seqlens_q=metadata.cu_seqlens_q,
        max_seqlen_q=max_q, softmax_scale=options.scale, causal=options.causal,
        window_size=window_arg(options), softcap=options.softcap or 0.0, num_splits=0,
        **descales)


def fa4_window(options) -> tuple[int | None, int | None]:
    """FA4's ``window_size`` (None = unbounded on that side): key k visible for query
    position p iff ``p - left <= k <= p + right``, aligned bottom-right like ours."""
    if options.sliding_window is None:
        return (None, None)
    return (options.sliding_window - 1, 0 if options.causal else None)


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """FA4 asserts stride 1 on its 1-D int tensors, even with one element."""
    return t if t.stride(0) == 1 else t.clone()


def fa4_paged(q, cache, metadata, options, max_q: int, max_k: int) -> torch.Tensor:
    """FA4's varlen call on our paged cache: ``[num_tokens, Hq, head_size_v]`` in q's dtype
    (fp16/bf16; the rules keep fp8 away). ``max_q``/``max_k`` are host bounds (they steer
    FA4's tile plan and
    must hold for every replay of a captured graph)."""
    from flash_attn.cute import flash_attn_varlen_func

    # Detached views (no copies): a sink or q that requires grad (an nn.Parameter outside
    # no_grad) would send FA4 down its autograd path (saved LSE, another compiled kernel).
    sinks = None if options.sinks is None else options.sinks.detach()
    result = flash_attn_varlen_func(
        q.detach(), cache.key_cache.detach(), cache.value_cache.detach(),
        cu_seqlens_q=_unit_stride(metadata.cu_seqlens_q), max_seqlen_q=max_q,
        max_seqlen_k=max_k, seqused_k=_unit_stride(metadata.seq_lens),
        page_table=metadata.block_table, softmax_scale=options.scale, causal=options.causal,
        window_size=fa4_window(options), learnable_sink=sinks,
        softcap=options.softcap or 0.0, num_splits=1)
    return result[0] if isinstance(result, tuple) else result


def gather_pages(cache, block_table: torch.Tensor, max_seqlen_k: int, page: int):
    """Copy each sequence's first ``ceil(max_seqlen_k / page) * page`` keys into a scratch
    cache of ``page``-key pages: returns (key pages, value pages, page table
    ``[B, pages_per_seq]``). Block ids past a sequence's length may be garbage: they are
    clamped into range and the keys they yield lie past ``seq_len``, which flash-attn
    masks."""
    num_seqs = block_table.shape[0]
    pages_per_seq = max(1, -(-max_seqlen_k // page))
    keys_per_seq = pages_per_seq * page
    blocks_needed = -(-keys_per_seq // cache.block_size)
    ids = block_table[:, :blocks_needed]
    if ids.shape[1] < blocks_needed:
        ids = torch.nn.functional.pad(ids, (0, blocks_needed - ids.shape[1]))
    ids = ids.clamp(0, cache.num_blocks - 1).long()
    pages = []
    for data in (cache.key_cache, cache.value_cache):
        gathered = data[ids]  # [B, blocks_needed, block_size, H, D]
        gathered = gathered.reshape(num_seqs, -1, *data.shape[2:])[:, :keys_per_seq]
        pages.append(gathered.reshape(num_seqs * pages_per_seq, page, *data.shape[2:]))
    table = torch.arange(num_seqs * pages_per_seq, dtype=torch.int32,
                         device=block_table.device).view(num_seqs, pages_per_seq)
    return pages[0], pages[1], table
