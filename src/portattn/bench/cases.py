"""The bench's cases and their inputs: :class:`Case`, :func:`default_cases` and the
``--cases`` tags, the paged batch a case runs on (:func:`build_inputs`) and the bytes and
FLOPs a case costs (:func:`case_bytes`, :func:`case_flops`).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from portattn.types import FP8_DTYPES_BY_NAME, AttentionMetadata, PagedKVCache, take_blocks


@dataclasses.dataclass
class Case:
    name: str
    kind: str  # decode | prefill | mixed | spec
    query_lens: list
    seq_lens: list
    kv_quant: str = "none"          # KVQuant mode of the cache (bench's own scales)
    head_size_v: int | None = None  # DiffKV: V head size (K/Q keep --head-size ... or qk)
    head_size_qk: int | None = None  # DiffKV: K/Q head size (None: --head-size)
    fp8_format: str = "e4m3fn"      # fp8 caches: "e4m3fn" or "e5m2"

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def variant_of_bf16(self) -> bool:
        """A quantized or DiffKV case (compared with the plain case of the same shape)."""
        return self.kv_quant != "none" or self.head_size_v is not None


def default_cases(shrink: int = 1) -> list[Case]:
    """The bench's cases, their lengths divided by ``shrink`` (smoke runs), each kept at
    its shape's least: a mixed chunk of >= 2 queries (1 made it a decode, and the mixed
    case's chunk part empty), spec-decode keys >= its 4 queries."""
    def n(x, least=1):
        return max(least, x // shrink)
    cases = [Case(f"decode-{b}x8192", "decode", [1] * b, [n(8192)] * b) for b in (1, 8, 32, 128)]
    # small batches: host-bound eager (8 x 1024) and long contexts that need split-KV
    cases += [Case("decode-8x1024", "decode", [1] * 8, [n(1024)] * 8),
              Case("decode-1x32768", "decode", [1], [n(32768)]),
              Case("decode-8x32768", "decode", [1] * 8, [n(32768)] * 8)]
    cases += [Case("prefill-1x8192", "prefill", [n(8192)], [n(8192)]),
              Case("prefill-4x2048", "prefill", [n(2048)] * 4, [n(2048)] * 4),
              Case("prefill-1x4096", "prefill", [n(4096)], [n(4096)]),
              Case("mixed-2048+63x4096", "mixed", [n(2048, 2)] + [1] * 63,
                   [n(8192) + n(2048, 2)] + [n(4096)] * 63),
              Case("spec-32x8192x4", "spec", [4] * 32, [n(8192, 4)] * 32),
              Case("spec-16x4096x4", "spec", [4] * 16, [n(4096, 4)] * 16)]
    # Quantized caches (issue targets: fp8 per-tensor decode at <= 0.55x our bf16 time,
    # per-token-head within 1.15x of that, prefill with an fp8 cache >= 0.95x bf16) and
    # DiffKV 192/128 (decode at the copy line, prefill at equal-head TFLOP/s).
    for mode, tag in (("fp8_per_tensor", "fp8"), ("int8_per_token_head", "int8pth"),
                      ("fp8_per_token_head", "fp8pth")):
        cases += [Case(f"decode-{b}x8192-{tag}", "decode", [1] * b, [n(8192)] * b, mode)
                  for b in (1, 8, 32, 128)]
    # e5m2 caches (the wider-range fp8 some engines store): the same loop at batch 32 / 128
    for mode, tag in (("fp8_per_tensor", "fp8e5m2"), ("fp8_per_token_head", "fp8e5m2pth")):
        cases += [Case(f"decode-{b}x8192-{tag}", "decode", [1] * b, [n(8192)] * b, mode,
                       fp8_format="e5m2") for b in (32, 128)]
    cases.append(Case("prefill-1x8192-fp8", "prefill", [n(8192)], [n(8192)],
                      "fp8_per_tensor"))
    cases.append(Case("prefill-1x8192-int8pth", "prefill", [n(8192)], [n(8192)],
                      "int8_per_token_head"))
    cases += [Case(f"decode-{b}x8192-diffkv", "decode", [1] * b, [n(8192)] * b,
                   head_size_qk=192, head_size_v=128) for b in (8, 32, 128)]
    cases.append(Case("prefill-1x8192-diffkv", "prefill", [n(8192)], [n(8192)],
                      head_size_qk=192, head_size_v=128))
    return cases


def case_tags(case: Case) -> list[str]:
    """Words ``--cases`` also selects by: ``plain`` (bf16 equal heads), ``quant``,
    ``diffkv``, and ``<kind>-plain`` (e.g. ``decode-plain``)."""
    if case.kv_quant != "none":
        return ["quant"]
    if case.head_size_v is not None:
        return ["diffkv"]
    return ["plain", f"{case.kind}-plain"]


#: The bench's per-tensor fp8 scales: randn / scale stays well inside e4m3's range.
BENCH_FP8_SCALE = 0.05


# --------------------------------------------------------------------------- inputs
@dataclasses.dataclass
class Inputs:
    q: torch.Tensor
    cache: PagedKVCache
    metadata: AttentionMetadata
    out: torch.Tensor


def fp8_dtype(case: Case) -> torch.dtype:
    """The fp8 dtype of the case's cache, were it fp8 (``case.fp8_format``, a name of
    :data:`portattn.types.FP8_FORMAT_NAMES`)."""
    return FP8_DTYPES_BY_NAME[case.fp8_format]


def cache_dtype(case: Case, dtype: torch.dtype) -> torch.dtype:
    """The dtype the case's cache stores (``dtype``: the run's 16/32-bit dtype)."""
    stored = {"none": dtype, "int8_per_token_head": torch.int8,
              "fp8_per_tensor": fp8_dtype(case), "fp8_per_token_head": fp8_dtype(case)}
    if case.kv_quant not in stored:
        raise ValueError(f"case {case.name}: unknown kv_quant {case.kv_quant!r}")
    return stored[case.kv_quant]


def _random_cache(case: Case, shape_k, shape_v, dtype, device, gen) -> PagedKVCache:
    """Random K/V stored as ``case.kv_quant`` says (random non-zero codes and scales; the
    bench times reads, it does not check values)."""
    from portattn.types import KVQuant

    def randn(shape):
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)

    fp8 = fp8_dtype(case)

    if case.kv_quant == "none":
        return PagedKVCache(randn(shape_k).to(dtype), randn(shape_v).to(dtype))
    if case.kv_quant == "fp8_per_tensor":
        quant = KVQuant.fp8_per_tensor(BENCH_FP8_SCALE, BENCH_FP8_SCALE)
        return PagedKVCache((randn(shape_k) / BENCH_FP8_SCALE).to(fp8),
                            (randn(shape_v) / BENCH_FP8_SCALE).to(fp8), quant)
    if case.kv_quant == "int8_per_token_head":
        quant = KVQuant.int8_per_token_head()
        k, v = ((randn(s) * 40).clamp(-127, 127).round().to(torch.int8)
                for s in (shape_k, shape_v))
    else:
        quant = KVQuant.fp8_per_token_head()
        k, v = ((randn(s) * 40).to(fp8) for s in (shape_k, shape_v))
    scales = [(randn(shape_k[:3]).abs() + 0.5) / 40 for _ in range(2)]
    return PagedKVCache(k, v, quant, k_scale_cache=scales[0], v_scale_cache=scales[1])


def build_inputs(case: Case, *, num_q_heads: int, num_kv_heads: int, head_size: int,
                 block_size: int, dtype: torch.dtype, device: str, seed: int = 0) -> Inputs:
    """A paged batch made on the device: random K/V in shuffled blocks."""
    gen = torch.Generator(device=device).manual_seed(seed)
    head_size = case.head_size_qk or head_size
    head_v = case.head_size_v or head_size
    blocks = [max(1, math.ceil(s / block_size)) for s in case.seq_lens]
    total = sum(blocks)
    cache = _random_cache(case, (total + 1, block_size, num_kv_heads, head_size),
                          (total + 1, block_size, num_kv_heads, head_v), dtype, device, gen)
    perm = torch.randperm(total, generator=gen, device=device).to(torch.int32)
    table = torch.zeros(case.num_seqs, max(blocks), dtype=torch.int32, device=device)
    start = 0
    for b, nb in enumerate(blocks):
        table[b, :nb] = perm[start:start + nb]
        start += nb
    q = torch.randn(sum(case.query_lens), num_q_heads, head_size, generator=gen,
                    device=device, dtype=torch.float32).to(dtype)
    cu = [0]
    for ql in case.query_lens:
        cu.append(cu[-1] + ql)
    metadata = AttentionMetadata(torch.tensor(cu, dtype=torch.int32, device=device),
                                 torch.tensor(case.seq_lens, dtype=torch.int32, device=device),
                                 table, max(case.query_lens), max(case.seq_lens))
    out = torch.empty(q.shape[0], num_q_heads, head_v, dtype=dtype, device=device)
    return Inputs(q, cache, metadata, out)


def gather_contiguous(inp: Inputs, b: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V of sequence ``b`` as ``[Hkv, L, D]`` contiguous tensors."""
    bs = inp.cache.block_size
    rows = inp.metadata.block_table[b, :math.ceil(seq_len / bs)].long()
    parts = []
    for data in (inp.cache.key_cache, inp.cache.value_cache):
        x = take_blocks(data, rows).reshape(-1, data.shape[2], data.shape[3])[:seq_len]
        parts.append(x.permute(1, 0, 2).contiguous())
    return parts[0], parts[1]


# --------------------------------------------------------------------------- metrics
def case_bytes(case: Case, inp: Inputs) -> int:
    """Bytes a kernel must move: K and V as stored (real head sizes and element size), the
    per-token-head scales, q and out."""
    cache = inp.cache
    elem = cache.key_cache.element_size()
    tokens_heads = sum(case.seq_lens) * cache.num_kv_heads
    kv = tokens_heads * (cache.head_size_qk + cache.head_size_v) * elem
    if cache.k_scale_cache is not None:
        kv += tokens_heads * 2 * 4
    return kv + inp.q.numel() * inp.q.element_size() + inp.out.numel() * inp.out.element_size()


def visible_pairs(q_len: int, seq_len: int) -> int:
    """Query-key pairs of one causal sequence: its queries are the last ``q_len`` of
    ``seq_len`` tokens, and query i sees the ``seq_len - q_len`` keys before them plus
    ``i + 1`` (bottom-right causal)."""
    return q_len * (seq_len - q_len) + q_len * (q_len + 1) // 2


def case_flops(case: Case, num_q_heads: int, head_size: int, causal: bool = True,
               head_size_v: int | None = None) -> float:
    """``2 * pairs * (head_size + head_size_v) * heads`` (QK^T and PV; ``4 * ... *
    head_size`` when they are equal); causal counts visible pairs only."""
    pairs = sum(visible_pairs(ql, sl) if causal else ql * sl
                for ql, sl in zip(case.query_lens, case.seq_lens))
    head_size_v = head_size if head_size_v is None else head_size_v
    return 2.0 * pairs * (head_size + head_size_v) * num_q_heads
