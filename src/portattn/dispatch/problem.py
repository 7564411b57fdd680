"""``Problem``: the hashable summary of one attention call, the key of every decision.

It holds what decides which backend and which variant can serve a call (dtypes, head
counts and sizes, block size, quant mode, features used) and the sizes that steer launch
heuristics, bucketed to powers of two (max query length, max key length, number of
sequences) so that a decode loop whose lengths grow by one per step keeps hitting the same
cached decision.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from portattn.types import FP8_DTYPES, FP8_DTYPES_BY_NAME, slot_row_reasons

_DTYPE_NAMES = {
    torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
    torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2", torch.int8: "int8",
}
DTYPES_BY_NAME = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
DTYPES_BY_NAME.update({"fp16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16,
                       "fp32": torch.float32, "float": torch.float32,
                       "fp8": torch.float8_e4m3fn, **FP8_DTYPES_BY_NAME})


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def bucket(n: int) -> int:
    """Smallest power of two >= n (0 stays 0, 1 stays 1)."""
    return 0 if n <= 0 else 1 << (int(n) - 1).bit_length()


def cache_slot_rows(t: torch.Tensor) -> bool:
    """Whether cache ``t`` is a table of rows (:func:`portattn.types.slot_row_reasons`)."""
    return not slot_row_reasons("cache", t)


@dataclass(frozen=True)
class Problem:
    device_type: str
    q_dtype: torch.dtype
    kv_dtype: torch.dtype
    out_dtype: torch.dtype
    kv_quant: str            # KVQuant.key: "none", "fp8_per_tensor:e4m3fn", ...
    num_q_heads: int
    num_kv_heads: int
    head_size_qk: int
    head_size_v: int
    block_size: int
    causal: bool = True
    sliding_window: bool = False
    softcap: bool = False
    alibi: str = "none"      # "none" | "linear" | "sqrt"
    sinks: bool = False
    max_seqlen_q: int = 1    # bucketed
    max_seqlen_k: int = 1    # bucketed
    num_seqs: int = 1        # bucketed
    packed_kv: bool = False  # K and V are views of one DiffKV tensor
    kv_rows: bool = True     # every cache slot an evenly spaced row (see cache_slot_rows)

    @property
    def gqa_ratio(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def decode_only(self) -> bool:
        return self.max_seqlen_q == 1

    @property
    def diffkv(self) -> bool:
        return self.head_size_qk != self.head_size_v

    @property
    def quantized_kv(self) -> bool:
        return self.kv_quant != "none"

    @property
    def fp8_output(self) -> bool:
        return self.out_dtype in (torch.float8_e4m3fn, torch.float8_e5m2)

    def features(self) -> list[str]:
        """The optional features this problem uses, as short words (for messages)."""
        words = ["causal" if self.causal else "non-causal"]
        if self.sliding_window:
            words.append("sliding window")
        if self.softcap:
            words.append("softcap")
        if self.alibi != "none":
            words.append(f"alibi {self.alibi}")
        if self.sinks:
            words.append("sinks")
        if self.quantized_kv:
            words.append(f"kv {self.kv_quant}")
        if self.fp8_output:
            words.append("fp8 output")
        return words

    def describe(self) -> str:
        # max_seqlen_q alone cannot tell a prefill from a mixed or spec-decode batch
        kind = ("decode" if self.decode_only
                else f"up to {self.max_seqlen_q} queries a sequence")
        return (f"{kind}, {dtype_name(self.q_dtype)}, heads {self.num_q_heads}/"
                f"{self.num_kv_heads}, head size {self.head_size_qk}"
                + (f"/{self.head_size_v}" if self.diffkv else "")
                + f", block {self.block_size}, k<={self.max_seqlen_k}, seqs<={self.num_seqs}, "
                + ", ".join(self.features())
                + ("" if self.kv_rows else ", cache slots not evenly spaced rows"))

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("q_dtype", "kv_dtype", "out_dtype"):
            d[key] = dtype_name(d[key])
        return d

    @classmethod
    def from_call(cls, q: torch.Tensor, cache, metadata, options, max_seqlen_q: int,
                  max_seqlen_k: int) -> "Problem":
        return cls(
            device_type=q.device.type, q_dtype=q.dtype, kv_dtype=cache.dtype,
            out_dtype=options.out_dtype, kv_quant=cache.quant.key, num_q_heads=q.shape[1],
            num_kv_heads=cache.num_kv_heads, head_size_qk=cache.head_size_qk,
            head_size_v=cache.head_size_v, block_size=cache.block_size,
            causal=options.causal, sliding_window=options.sliding_window is not None,
            softcap=options.softcap is not None, alibi=options.alibi,
            sinks=options.sinks is not None, max_seqlen_q=bucket(max_seqlen_q),
            max_seqlen_k=bucket(max_seqlen_k), num_seqs=bucket(metadata.seq_lens.shape[0]),
            packed_kv=cache.packed,
            kv_rows=cache_slot_rows(cache.key_cache) and cache_slot_rows(cache.value_cache))

    @classmethod
    def make(cls, *, num_q_heads: int = 32, num_kv_heads: int = 8, head_size: int = 128,
             head_size_v: int | None = None, block_size: int = 16,
             dtype: torch.dtype | str = torch.bfloat16, kv_quant: str = "none",
             out_dtype: torch.dtype | str | None = None, device_type: str = "cuda",
             query_len: int = 1, seq_len: int = 8192, num_seqs: int = 1, causal: bool = True,
             sliding_window: bool = False, softcap: bool = False, alibi: str = "none",
             sinks: bool = False, kv_rows: bool = True) -> "Problem":
        """A problem described without tensors (``portattn explain``, the report's routing
        table, tests). ``kv_quant`` is a :attr:`KVQuant.key` string; ``kv_rows=False``:
        a cache whose slots are not rows (:func:`cache_slot_rows`)."""
        dtype = DTYPES_BY_NAME[dtype] if isinstance(dtype, str) else dtype
        if isinstance(out_dtype, str):
            out_dtype = DTYPES_BY_NAME[out_dtype]
        if kv_quant == "none":
            kv_dtype = dtype
        elif kv_quant.startswith("int8"):
            kv_dtype = torch.int8
        else:  # fp8 modes name their format, e4m3fn by default
            if ":" not in kv_quant:
                kv_quant = f"{kv_quant}:e4m3fn"
            kv_dtype = DTYPES_BY_NAME[kv_quant.split(":", 1)[1]]
        head_size_v = head_size if head_size_v is None else head_size_v
        if out_dtype is None:  # attention()'s default: q's dtype, bfloat16 for an fp8 q
            out_dtype = torch.bfloat16 if dtype in FP8_DTYPES else dtype
        return cls(device_type=device_type, q_dtype=dtype, kv_dtype=kv_dtype,
                   out_dtype=out_dtype, kv_quant=kv_quant, num_q_heads=num_q_heads,
                   num_kv_heads=num_kv_heads, head_size_qk=head_size, head_size_v=head_size_v,
                   block_size=block_size, causal=causal, sliding_window=sliding_window,
                   softcap=softcap, alibi=alibi, sinks=sinks, max_seqlen_q=bucket(query_len),
                   max_seqlen_k=bucket(seq_len), num_seqs=bucket(num_seqs),
                   packed_kv=head_size_v != head_size, kv_rows=kv_rows)
