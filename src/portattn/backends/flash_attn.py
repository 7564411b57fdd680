"""``flash_attn`` and ``flash_attn_gather``: FlashAttention-2 (the ``flash-attn`` package).

Two registry entries share this module:

* ``flash_attn`` calls ``flash_attn_varlen_func`` with ``block_table`` directly on our
  cache. FA2 reads a paged cache only when its page (our block) size is a multiple of 256.
* ``flash_attn_gather`` serves any block size: it copies each sequence's blocks, up to
  ``max_seqlen_k`` rounded up to 256 keys, into a scratch cache of 256-key pages and calls
  the same paged function on it. The copy costs a pass over the K/V bytes, so the priority
  lists place it after our Triton kernels: it is taken only when nothing faster serves.

How our options map onto FA2 (its causal mask is aligned bottom-right, as ours):

* ``sliding_window=w`` -> ``window_size=(w - 1, 0)`` (causal) or ``(w - 1, -1)``;
* ``softcap`` -> ``softcap`` (FA2 applies it to the scaled score, as we do);
* ALiBi linear -> ``alibi_slopes``: FA2 adds ``-slope * |p - k|``, equal to our
  ``slope * (k - p)`` only when keys after the query are masked, so ALiBi needs causal.

What FA2 cannot do (sinks, sqrt ALiBi, quantized KV, fp8 q or output, differing K/V head
sizes, fp32, head sizes above 256 or not multiples of 8) is a reason from ``why_not``.
The FlashAttention-3 interface (``flash_attn_interface``) is reported by the probe but not
used yet: it has not been run on our test machine.
"""

from __future__ import annotations

import torch

from portattn.backends.base import Backend, Plan

FA_DTYPES = (torch.float16, torch.bfloat16)
FA_MAX_HEAD_SIZE = 256
FA_HEAD_SIZE_STEP = 8
FA_PAGE = 256  # FA2's paged KV needs page sizes that are multiples of this
FA_MIN_CC = (8, 0)


def _flash_attn_varlen():
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


class FlashAttn(Backend):
    """FA2 on our paged cache, for block sizes that are multiples of 256."""

    name = "flash_attn"
    summary = "flash-attn 2 paged varlen kernel (cache block size a multiple of 256)"
    gather = False

    def why_not(self, problem, caps) -> list[str]:
        reasons: list[str] = []
        if not caps.flash_attn.ok:
            reasons.append(caps.flash_attn.reason or "flash-attn is not usable here")
        elif "fa2" not in caps.flash_attn_interfaces:
            reasons.append("flash-attn's FA2 interface (flash_attn_varlen_func) is missing")
        if problem.device_type != "cuda" or caps.vendor != "nvidia":
            reasons.append("flash-attn runs on NVIDIA CUDA GPUs only "
                           f"(tensors on {problem.device_type}, vendor {caps.vendor})")
        elif caps.compute_capability is not None and \
                tuple(caps.compute_capability) < FA_MIN_CC:
            reasons.append(f"flash-attn needs compute capability 8.0+ (this is {caps.arch})")
        if problem.q_dtype not in FA_DTYPES:
            reasons.append(f"flash-attn supports float16/bfloat16 q, not {problem.q_dtype}")
        if problem.quantized_kv:
            reasons.append(f"flash-attn 2 does not read a quantized KV cache "
                           f"({problem.kv_quant})")
        if problem.out_dtype != problem.q_dtype:
            reasons.append(f"flash-attn 2 writes the output in q's dtype, not "
                           f"{problem.out_dtype} (fp8 output is not supported)")
        if problem.diffkv:
            reasons.append(f"flash-attn 2 needs equal K and V head sizes (DiffKV "
                           f"{problem.head_size_qk}/{problem.head_size_v})")
        if problem.head_size_qk > FA_MAX_HEAD_SIZE or problem.head_size_qk % FA_HEAD_SIZE_STEP:
            reasons.append(f"flash-attn supports head sizes up to {FA_MAX_HEAD_SIZE} in "
                           f"multiples of {FA_HEAD_SIZE_STEP}, not {problem.head_size_qk}")
        if problem.sinks:
            reasons.append("flash-attn 2 has no attention sinks")
        if problem.alibi == "sqrt":
            reasons.append("flash-attn 2 has no sqrt ALiBi (only linear)")
        elif problem.alibi == "linear" and not problem.causal:
            reasons.append("flash-attn 2's ALiBi is symmetric (-slope*|p-k|): it matches ours "
                           "only with causal=True")
        if not self.gather and problem.block_size % FA_PAGE:
            reasons.append(f"flash-attn 2 reads a paged cache only when the block size is a "
                           f"multiple of {FA_PAGE} (got {problem.block_size}); "
                           "flash_attn_gather serves it with a copy")
        return reasons

    def unavailable(self, caps) -> list[str]:
        """Machine-level reasons only: asks about a plain fp16 problem on 256-key blocks
        (the page size FA2 reads directly)."""
        from portattn.dispatch.problem import Problem

        plain = Problem.make(device_type=caps.device_type, dtype="float16", block_size=FA_PAGE)
        return self.why_not(plain, caps)

    def plan(self, problem, caps) -> Plan:
        if self.gather:
            return Plan(self.name, f"gather into {FA_PAGE}-key pages + FA2 paged varlen",
                        {"page": FA_PAGE})
        return Plan(self.name, "FA2 paged varlen", {})

    def run(self, q, cache, metadata, options, out, plan) -> None:
        key_cache, value_cache, block_table = cache.key_cache, cache.value_cache, \
            metadata.block_table
        max_seqlen_k = metadata.max_seqlen_k
        if max_seqlen_k is None:  # synchronizes; AttentionMetadata.from_lengths fills it
            max_seqlen_k = int(metadata.seq_lens.max())
        max_seqlen_q = metadata.max_seqlen_q
        if max_seqlen_q is None:
            max_seqlen_q = int((metadata.cu_seqlens_q[1:] - metadata.cu_seqlens_q[:-1]).max())
        if self.gather:
            key_cache, value_cache, block_table = gather_pages(
                cache, metadata.block_table, max_seqlen_k, FA_PAGE)
        cu_seqlens_k = torch.zeros(metadata.seq_lens.shape[0] + 1, dtype=torch.int32,
                                   device=q.device)
        torch.cumsum(metadata.seq_lens, 0, out=cu_seqlens_k[1:])
        if options.sliding_window is not None:
            window = (options.sliding_window - 1, 0 if options.causal else -1)
        else:
            window = (-1, -1)
        alibi = options.alibi_slopes
        if alibi is not None and alibi.dtype != torch.float32:
            alibi = alibi.float()
        result = _flash_attn_varlen()(
            q, key_cache, value_cache, metadata.cu_seqlens_q, cu_seqlens_k, max(1, max_seqlen_q),
            max(1, max_seqlen_k), softmax_scale=options.scale, causal=options.causal,
            window_size=window, softcap=options.softcap or 0.0, alibi_slopes=alibi,
            block_table=block_table)
        out.copy_(result)


class FlashAttnGather(FlashAttn):
    """FA2 for any block size: copy the visible pages into 256-key pages first."""

    name = "flash_attn_gather"
    summary = "flash-attn 2 after copying K/V into 256-key pages (any block size; slower)"
    gather = True


def gather_pages(cache, block_table: torch.Tensor, max_seqlen_k: int, page: int):
    """Copy each sequence's first ``ceil(max_seqlen_k / page) * page`` keys into a scratch
    cache of ``page``-key pages: returns (key pages, value pages, page table
    ``[B, pages_per_seq]``). Block ids past a sequence's length may be garbage: they are
    clamped into range and the keys they yield lie past ``seq_len``, which FA2 masks."""
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
