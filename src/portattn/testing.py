"""Helpers shared by the demo, the tests and the benchmarks.

* :func:`make_paged_batch` builds a random paged batch: random K/V per sequence written
  through :meth:`PagedKVCache.write` into shuffled blocks of a cache whose unused slots are
  poisoned (NaN where the storage dtype has one), so a kernel that reads outside the
  visible keys shows up as NaN instead of passing by luck.
* :func:`dense_attention` is an independent formulation of DESIGN.md's semantics on the
  unpaged K/V (float64, padded per sequence, ``torch.softmax`` over keys plus a sink
  column) that the reference backend and every kernel are checked against.
* :func:`quantize_as_specified` / :func:`dequantize_as_specified` restate DESIGN.md's
  quantization definitions here, apart from :mod:`portattn.quant` (which ``write`` and
  the reference backend use), so the values a batch's oracle sees do not come from the
  code under test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from portattn.types import AttentionMetadata, KVQuant, PagedKVCache, Scale


@dataclass
class PagedBatch:
    q: torch.Tensor
    cache: PagedKVCache
    metadata: AttentionMetadata
    keys: list[torch.Tensor]    # per sequence [seq_len, Hkv, Dqk], float32, as the cache holds them
    values: list[torch.Tensor]  # per sequence [seq_len, Hkv, Dv]
    query_lens: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)


def _poison(t: torch.Tensor) -> None:
    if t.dtype == torch.int8:
        t.fill_(-128)  # outside the [-127, 127] a write stores
    else:
        t.fill_(float("nan"))


def make_paged_batch(query_lens: Sequence[int], seq_lens: Sequence[int], *,
                     num_q_heads: int = 4, num_kv_heads: int = 2, head_size: int = 64,
                     head_size_v: int | None = None, block_size: int = 16,
                     dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu",
                     quant: KVQuant | None = None, layout: str = "split",
                     spare_blocks: int = 3, poison: bool = True, q_dtype: torch.dtype | None = None,
                     seed: int | None = 0, generator: torch.Generator | None = None) -> PagedBatch:
    """A random batch: sequence ``b`` has ``query_lens[b]`` new tokens among
    ``seq_lens[b]`` keys. Blocks are assigned in a random order (plus ``spare_blocks``
    never used). ``layout`` as in :meth:`PagedKVCache.allocate`."""
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    head_size_v = head_size if head_size_v is None else head_size_v
    if head_size_v != head_size and layout == "split":
        layout = "diffkv"
    query_lens, seq_lens = [int(x) for x in query_lens], [int(x) for x in seq_lens]
    blocks_per_seq = [max(1, math.ceil(n / block_size)) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    cache = PagedKVCache.allocate(num_blocks, block_size, num_kv_heads, head_size,
                                  head_size_v=head_size_v, dtype=dtype, device=device,
                                  quant=quant, layout=layout)
    if poison:
        for t in (cache.key_cache, cache.value_cache, cache.k_scale_cache, cache.v_scale_cache):
            if t is not None:
                _poison(t)
    order = torch.randperm(num_blocks, generator=generator).tolist()
    width = max(blocks_per_seq + [1])
    table: list[list[int]] = []
    slots: list[int] = []
    next_block = 0
    for n, nb in zip(seq_lens, blocks_per_seq):
        row = order[next_block:next_block + nb]
        next_block += nb
        table.append(row + [order[-1]] * (width - nb))  # pad with an unused (poisoned) block
        slots.extend(row[i // block_size] * block_size + i % block_size for i in range(n))

    total = sum(seq_lens)
    k_new = torch.randn(total, num_kv_heads, head_size, generator=generator)
    v_new = torch.randn(total, num_kv_heads, head_size_v, generator=generator)
    write_dtype = torch.float32 if cache.quant.is_quantized else dtype
    cache.write(k_new.to(device=device, dtype=write_dtype), v_new.to(device=device,
                dtype=write_dtype), torch.tensor(slots, dtype=torch.int64, device=device))

    def held(x, which):  # the values the cache represents, by DESIGN.md's definitions
        stored, scales = quantize_as_specified(x.to(write_dtype).float(), cache.quant, which,
                                               cache.dtype)
        return dequantize_as_specified(stored, cache.quant, which, scales)

    keys, values, start = [], [], 0
    k_held, v_held = held(k_new, "k"), held(v_new, "v")
    for n in seq_lens:
        keys.append(k_held[start:start + n])
        values.append(v_held[start:start + n])
        start += n
    q = torch.randn(sum(query_lens), num_q_heads, head_size, generator=generator)
    q = q.to(device=device, dtype=q_dtype or dtype)
    metadata = AttentionMetadata.from_lengths(query_lens, seq_lens,
                                              torch.tensor(table, dtype=torch.int32),
                                              device=device)
    return PagedBatch(q, cache, metadata, keys, values, query_lens, seq_lens)


# ------------------------------------------------- quantization, restated for the oracle

#: Largest finite values of the fp8 formats and of the int8 codes a write stores.
FP8_FORMAT_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
INT8_CODE_MAX = 127.0


def _tensor_scale(quant: KVQuant, which: str) -> float:
    scale: Scale | None = quant.k_scale if which == "k" else quant.v_scale
    if scale is None:
        raise ValueError(f"{quant.mode} needs a {which}_scale")
    return float(scale)


def quantize_as_specified(x: torch.Tensor, quant: KVQuant, which: str,
                          storage_dtype: torch.dtype
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DESIGN.md's definitions (value = stored * scale), on the CPU:

    * unquantized: stored = x in the cache dtype;
    * ``fp8_per_tensor``: stored = clamp(x / scale, +-fp8 max) cast to fp8;
    * ``int8_per_token_head``: scale = absmax over the head / 127, stored = round(x /
      scale) clamped to [-127, 127];
    * ``fp8_per_token_head``: scale = absmax / fp8 max, stored = (x / scale) cast to fp8;
    * a token-head whose scale would be 0 (all zeros, or an absmax so small that
      absmax / max underflows in float32) gets scale 1.

    Returns (stored ``[T, H, D]``, per-token-head scales ``[T, H]`` float32 or None).
    """
    x = x.detach().float().cpu()
    if quant.mode == "none":
        return x.to(storage_dtype), None
    if quant.mode == "fp8_per_tensor":
        limit = FP8_FORMAT_MAX[storage_dtype]
        scaled = x / torch.tensor(_tensor_scale(quant, which), dtype=torch.float32)
        return scaled.clamp(-limit, limit).to(storage_dtype), None
    if quant.mode == "int8_per_token_head":
        limit = INT8_CODE_MAX
    elif quant.mode == "fp8_per_token_head":
        limit = FP8_FORMAT_MAX[storage_dtype]
    else:
        raise ValueError(f"unknown quant mode {quant.mode!r}")
    scales = x.abs().amax(dim=-1) / limit
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)  # 0, or underflowed
    scaled = (x / scales[..., None]).clamp(-limit, limit)
    if quant.mode == "int8_per_token_head":
        scaled = torch.round(scaled)
    return scaled.to(storage_dtype), scales


def dequantize_as_specified(stored: torch.Tensor, quant: KVQuant, which: str,
                            scales: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 values (on the CPU) of cache entries ``stored`` ``[..., D]``: stored *
    scale, with ``scales`` ``[...]`` for the per-token-head modes."""
    values = stored.detach().cpu().float()
    if quant.mode == "none":
        return values
    if quant.mode == "fp8_per_tensor":
        return values * torch.tensor(_tensor_scale(quant, which), dtype=torch.float32)
    if scales is None:
        raise ValueError(f"{quant.mode} needs the per-token-head scales")
    return values * scales.detach().cpu().float()[..., None]


def dense_attention(q: torch.Tensor, keys: Sequence[torch.Tensor],
                    values: Sequence[torch.Tensor], query_lens: Sequence[int], *,
                    scale: float | None = None, causal: bool = True,
                    sliding_window: int | None = None, softcap: float | None = None,
                    alibi_slopes: torch.Tensor | None = None, alibi_sqrt: bool = False,
                    sinks: torch.Tensor | None = None, q_scale: float | None = None
                    ) -> torch.Tensor:
    """Attention on unpaged K/V in float64: ``[num_tokens, num_q_heads, head_size_v]``."""
    num_q_heads, head_size = q.shape[1], q.shape[2]
    scale = 1.0 / math.sqrt(head_size) if scale is None else scale
    outputs, start = [], 0
    for k, v, q_len in zip(keys, values, query_lens):
        qs = q[start:start + q_len].double().cpu()
        start += q_len
        if q_scale is not None:
            qs = qs * float(q_scale)
        group = num_q_heads // k.shape[1]
        kk = k.double().cpu().repeat_interleave(group, dim=1)  # [L, Hq, D]
        vv = v.double().cpu().repeat_interleave(group, dim=1)
        seq_len = kk.shape[0]
        logits = torch.einsum("qhd,khd->hqk", qs, kk) * scale
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        pos_q = (seq_len - q_len + torch.arange(q_len, dtype=torch.float64))[:, None]
        pos_k = torch.arange(seq_len, dtype=torch.float64)[None, :]
        allowed = torch.ones(q_len, seq_len, dtype=torch.bool)
        if causal:
            allowed = allowed & (pos_k <= pos_q)
        if sliding_window is not None:
            allowed = allowed & (pos_q - pos_k < sliding_window)
        if alibi_slopes is not None:
            slope = alibi_slopes.double().cpu()[:, None, None]
            if alibi_sqrt:
                logits = logits + slope * -torch.sqrt(torch.clamp(pos_q - pos_k, min=0.0))
            else:
                logits = logits + slope * (pos_k - pos_q)
        logits = torch.where(allowed, logits, torch.tensor(-math.inf, dtype=torch.float64))
        if sinks is not None:
            sink_col = sinks.double().cpu()[:, None, None].expand(num_q_heads, q_len, 1)
            probs = torch.softmax(torch.cat([logits, sink_col], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(logits, dim=-1)
        probs = torch.nan_to_num(probs, nan=0.0)  # rows with nothing visible
        outputs.append(torch.einsum("hqk,khd->qhd", probs, vv))
    if not outputs:
        return torch.zeros(0, num_q_heads, values[0].shape[-1] if values else head_size,
                           dtype=torch.float64)
    return torch.cat(outputs, dim=0)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (inf when actual has NaN)."""
    a, e = actual.double().cpu(), expected.double().cpu()
    if not torch.isfinite(a).all():
        return math.inf
    denom = e.norm().item()
    return (a - e).norm().item() / (denom if denom > 0 else 1.0)
