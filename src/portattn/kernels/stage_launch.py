"""Launcher of the staging kernel (:mod:`portattn.kernels.stage`): the workspace's layout
and size, and the staged blocks seen as a cache by the unified kernel's launch.

Reads no device value (sizes come from the plan's ``stage`` and tensor shapes), so a
staged prefill can be captured in a CUDA graph like any other launch.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from portattn.kernels import stage
from portattn.kernels.compile_options import compile_options
from portattn.kernels.fast_launch import capturable
from portattn.kernels.heuristics import head_pad, stage_parts
from portattn.kernels.scalars import kv_scale_args
from portattn.types import KVQuant

stage_kv_kernel = capturable(stage.stage_kv_kernel)

#: A quiet NaN's 16-bit pattern per dtype: the K a bad block id stages when the cache is
#: copied as bits (no widening)
_NAN_BITS = {torch.bfloat16: 0x7FC0, torch.float16: 0x7E00}


class StagedCache:
    """Staged blocks seen as a cache by the launch: K/V in q's 16-bit dtype (the cache's
    codes as values), the cache's quant mode (per-tensor scales fold as on the cache) and
    the staged per-token-head scale caches, or no quant mode where per-token-head values
    were staged dequantized."""

    def __init__(self, key_cache, value_cache, quant, k_scale_cache, v_scale_cache):
        self.key_cache, self.value_cache, self.quant = key_cache, value_cache, quant
        self.k_scale_cache, self.v_scale_cache = k_scale_cache, v_scale_cache
        self.num_blocks, self.block_size, self.num_kv_heads, self.head_size_qk = \
            key_cache.shape
        self.head_size_v = value_cache.shape[3]
        self.dtype = key_cache.dtype
        self.device = key_cache.device


def stages_scales(per_token: bool, q_dtype: torch.dtype) -> bool:
    """Whether staging copies a per-token-head cache's scales beside its codes (fp16 q:
    dequantized values could fall into fp16's subnormals) rather than staging the values
    dequantized in bf16 (:mod:`portattn.kernels.stage`)."""
    return per_token and q_dtype != torch.bfloat16


def stage_workspace_size(num_seqs: int, slots: int, num_kv_heads: int, head_size_qk: int,
                         head_size_v: int, stage: dict, scales: bool) -> int:
    """float32 elements of a staging workspace of ``slots`` staged sequences (see
    :func:`stage_kv`); ``scales``: :func:`stages_scales`."""
    return sum(stage_parts(num_seqs, slots, num_kv_heads, head_size_qk, head_size_v, stage,
                           scales))


def stage_kv(q, cache, metadata, options, stage: dict, stage_from: int, slots: int,
             workspace: torch.Tensor):
    """Launch the staging kernel into ``workspace`` (float32, at least
    :func:`stage_workspace_size` elements for ``slots``, 16-byte aligned): the keys of
    the sequences with at least ``stage_from`` queries (``heuristics.staged_from``), at
    most ``slots`` of them; returns the :class:`StagedCache` and the metadata whose block
    table points into it."""
    num_seqs = metadata.seq_lens.shape[0]
    heads, sblocks, block = cache.num_kv_heads, stage["sblocks"], stage["block"]
    staged_blocks = slots * sblocks
    rows = staged_blocks * block * heads
    _, ks, vs, ks_strides, vs_strides = kv_scale_args(cache, q.device, q)
    per_token = cache.quant.per_token_head
    scales = stages_scales(per_token, q.dtype)
    parts, offset = [], 0
    for elems in stage_parts(num_seqs, slots, heads, cache.head_size_qk, cache.head_size_v,
                             stage, scales):
        parts.append(workspace[offset:offset + elems])
        offset += elems
    staged_k = parts[0].view(q.dtype)[:rows * cache.head_size_qk].view(
        staged_blocks, block, heads, cache.head_size_qk)
    staged_v = parts[1].view(q.dtype)[:rows * cache.head_size_v].view(
        staged_blocks, block, heads, cache.head_size_v)
    staged_ks: torch.Tensor | None
    staged_vs: torch.Tensor | None
    if scales:
        staged_ks = parts[2][:rows].view(staged_blocks, block, heads)
        staged_vs = parts[3][:rows].view(staged_blocks, block, heads)
    else:
        staged_ks = staged_vs = None
    staged_bt = parts[-1].view(torch.int32)[:num_seqs * sblocks].view(num_seqs, sblocks)
    kc, vc = cache.key_cache, cache.value_cache
    # a 16-bit cache of q's dtype is copied as bits; anything else is widened (values)
    widen = not (kc.dtype == vc.dtype == q.dtype and q.dtype in _NAN_BITS)
    stage_kv_kernel[(slots * heads, sblocks, 1)](
        kc, vc, ks, vs, staged_k, staged_v, staged_ks if scales else q,
        staged_vs if scales else q, staged_bt, metadata.block_table,
        metadata.cu_seqlens_q, metadata.seq_lens, num_seqs, q.shape[0], cache.num_blocks,
        metadata.block_table.shape[1], sblocks, slots, heads,
        int(options.sliding_window) if options.sliding_window is not None else 0,
        kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2),
        metadata.block_table.stride(0), *ks_strides, *vs_strides,
        BLOCK_SIZE=cache.block_size, STAGE_BLOCK=block, HEAD_QK=cache.head_size_qk,
        HEAD_QK_PAD=head_pad(cache.head_size_qk), HEAD_V=cache.head_size_v,
        HEAD_V_PAD=head_pad(cache.head_size_v), PER_TOKEN=per_token, STAGE_SCALES=scales,
        USE_WINDOW=options.sliding_window is not None,
        STAGE_FROM=stage_from, WIDEN=widen, NAN_BITS=0 if widen else _NAN_BITS[q.dtype],
        num_warps=8 if max(cache.head_size_qk, cache.head_size_v) > 128 else 4,
        **compile_options())
    quant = KVQuant.none() if per_token and not scales else cache.quant  # dequantized
    staged = StagedCache(staged_k, staged_v, quant, staged_ks, staged_vs)
    staged_meta = replace(metadata, block_table=staged_bt)
    return staged, staged_meta
