"""``portattn bench``: our kernels against the peers and the hardware ceilings, one run.

Cases (PERFORMANCE.md; bf16, 32 q heads / 8 kv heads / head 128, block size 16):
decode B x 8192 (B = 1, 8, 32, 128), prefill 1x8192 / 4x2048 / 1x4096 causal, a mixed
batch (a 2048-token chunk over 8192 of context plus 63 decodes at 4096) and spec-decode
(32 sequences x 8192 keys, 4 queries each). Implementations: ours (``portattn.attention``
with the plan the dispatcher picks), torch SDPA with the cuDNN and the flash backends on
contiguous K/V (``enable_gqa=True``), and where flash-attn imports: flash-attn 2 on
contiguous K/V with its best call (``flash_attn_with_kvcache`` for decode and spec-decode,
``flash_attn_varlen_func`` otherwise) and portattn's own ``flash_attn`` backend on the
paged cache (FA4, else FA3, where installed; FA2 paged at block sizes that are multiples
of 256, else ``flash_attn_gather``); where ``flash_attn.cute`` imports, ``fa4_paged``:
FA4's varlen call on our paged cache at the bench's block size, called directly with the
backend's argument mapping. Ceilings measured in the same run: device-to-device copy
bandwidth (bytes read + written) and a bf16 matmul. Times are the median of
``triton.testing.do_bench``.

Reported per case: time, TB/s (K/V/q/out bytes; decode-like cases) or TFLOP/s
(``4 * visible query-key pairs * head_size * num_q_heads``; causal counts visible keys
only), the fraction of the ceiling, and ``peer_time / our_time`` for each peer (> 1: we are
faster). ``--sweep`` also times many launch configs of our kernel per case (tile sizes,
warps, stages, segments) so the heuristics can be set from data. Output: a table on
stdout, ``<prefix>.json`` and ``<prefix>.png`` (when matplotlib imports) in ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import sys
import time
from typing import Any

import torch

from portattn.types import AttentionMetadata, PagedKVCache

SPEED_KEYS = ("sdpa_cudnn", "sdpa_flash", "flash_attn", "portattn_flash_attn", "fa4_paged")


@dataclasses.dataclass
class Case:
    name: str
    kind: str  # decode | prefill | mixed | spec
    query_lens: list
    seq_lens: list
    kv_quant: str = "none"          # KVQuant mode of the cache (bench's own scales)
    head_size_v: int | None = None  # DiffKV: V head size (K/Q keep --head-size ... or qk)
    head_size_qk: int | None = None  # DiffKV: K/Q head size (None: --head-size)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def variant_of_bf16(self) -> bool:
        """A quantized or DiffKV case (compared with the plain case of the same shape)."""
        return self.kv_quant != "none" or self.head_size_v is not None


def default_cases(shrink: int = 1) -> list[Case]:
    def n(x):
        return max(1, x // shrink)
    cases = [Case(f"decode-{b}x8192", "decode", [1] * b, [n(8192)] * b) for b in (1, 8, 32, 128)]
    # small batches: host-bound eager (8 x 1024) and long contexts that need split-KV
    cases += [Case("decode-8x1024", "decode", [1] * 8, [n(1024)] * 8),
              Case("decode-1x32768", "decode", [1], [n(32768)]),
              Case("decode-8x32768", "decode", [1] * 8, [n(32768)] * 8)]
    cases += [Case("prefill-1x8192", "prefill", [n(8192)], [n(8192)]),
              Case("prefill-4x2048", "prefill", [n(2048)] * 4, [n(2048)] * 4),
              Case("prefill-1x4096", "prefill", [n(4096)], [n(4096)]),
              Case("mixed-2048+63x4096", "mixed", [n(2048)] + [1] * 63,
                   [n(8192) + n(2048)] + [n(4096)] * 63),
              Case("spec-32x8192x4", "spec", [4] * 32, [n(8192)] * 32),
              Case("spec-16x4096x4", "spec", [4] * 16, [n(4096)] * 16)]
    # Quantized caches (issue targets: fp8 per-tensor decode at <= 0.55x our bf16 time,
    # per-token-head within 1.15x of that, prefill with an fp8 cache >= 0.95x bf16) and
    # DiffKV 192/128 (decode at the copy line, prefill at equal-head TFLOP/s).
    for mode, tag in (("fp8_per_tensor", "fp8"), ("int8_per_token_head", "int8pth"),
                      ("fp8_per_token_head", "fp8pth")):
        cases += [Case(f"decode-{b}x8192-{tag}", "decode", [1] * b, [n(8192)] * b, mode)
                  for b in (1, 8, 32, 128)]
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


def _random_cache(case: Case, shape_k, shape_v, dtype, device, gen) -> PagedKVCache:
    """Random K/V stored as ``case.kv_quant`` says (random non-zero codes and scales; the
    bench times reads, it does not check values)."""
    from portattn.types import KVQuant

    def randn(shape):
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)

    if case.kv_quant == "none":
        return PagedKVCache(randn(shape_k).to(dtype), randn(shape_v).to(dtype))
    if case.kv_quant == "fp8_per_tensor":
        quant = KVQuant.fp8_per_tensor(BENCH_FP8_SCALE, BENCH_FP8_SCALE)
        return PagedKVCache((randn(shape_k) / BENCH_FP8_SCALE).to(torch.float8_e4m3fn),
                            (randn(shape_v) / BENCH_FP8_SCALE).to(torch.float8_e4m3fn), quant)
    if case.kv_quant == "int8_per_token_head":
        quant = KVQuant.int8_per_token_head()
        k, v = ((randn(s) * 40).clamp(-127, 127).round().to(torch.int8)
                for s in (shape_k, shape_v))
    else:
        quant = KVQuant.fp8_per_token_head()
        k, v = ((randn(s) * 40).to(torch.float8_e4m3fn) for s in (shape_k, shape_v))
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
        x = data[rows].reshape(-1, data.shape[2], data.shape[3])[:seq_len]
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


def case_flops(case: Case, num_q_heads: int, head_size: int, causal: bool = True,
               head_size_v: int | None = None) -> float:
    """``2 * pairs * (head_size + head_size_v) * heads`` (QK^T and PV; ``4 * ... *
    head_size`` when they are equal); causal counts visible pairs only."""
    pairs = 0
    for ql, sl in zip(case.query_lens, case.seq_lens):
        ctx = sl - ql
        if causal:  # query i sees ctx + i + 1 keys
            pairs += ql * ctx + ql * (ql + 1) // 2
        else:
            pairs += ql * sl
    head_size_v = head_size if head_size_v is None else head_size_v
    return 2.0 * pairs * (head_size + head_size_v) * num_q_heads


def timer(device: str, rep_ms: int):
    if device == "cuda":
        import triton.testing

        heat = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)

        def run(fn):
            for _ in range(40):  # ~10 ms of matmuls: clocks up before timing
                heat @ heat
            return float(triton.testing.do_bench(fn, warmup=max(10, rep_ms // 4), rep=rep_ms,
                                                 return_mode="median"))
        return run

    def run_cpu(fn):  # the interpreter: a smoke test of the harness, not a measurement
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return run_cpu


class GraphTimer:
    """Kernel-only time with the L2 flushed before every call: ``reps`` x (flush, fn)
    captured in one CUDA graph, minus a graph of ``reps`` flushes alone. No host overhead
    (what a CUDA-graph decode loop sees); also checks that ``fn`` is capturable."""

    def __init__(self, reps: int = 20, replays: int = 5):
        self.reps, self.replays = reps, replays
        self.cache = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
        self.heat_a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
        self._flush_ms: float | None = None

    def _graph_ms(self, fn) -> float:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # libraries that need a warm call on the capture stream
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(self.reps):
                self.cache.zero_()
                if fn is not None:
                    fn()
        times = []
        for _ in range(self.replays):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        del graph
        return statistics.median(times)

    def heat(self) -> None:
        """Keep the clocks up: ~10 ms of matmuls before each measurement."""
        for _ in range(40):
            self.heat_a @ self.heat_a

    def __call__(self, fn) -> float:
        if self._flush_ms is None:
            self._flush_ms = self._graph_ms(lambda: None)
        fn()
        torch.cuda.synchronize()
        self.heat()
        return max(0.0, self._graph_ms(fn) - float(self._flush_ms)) / self.reps


def host_us(fn, calls: int = 200) -> float:
    """Host time of one call (launches are asynchronous; nothing waits for the GPU)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def _copy_tbs(device: str, bench) -> float:
    """Device-to-device copy bandwidth, bytes read + written (its buffers die on return)."""
    n = 1 << 29  # 1 GiB of bf16
    a = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a))
    return 2 * n * 2 / (ms * 1e-3) / 1e12


def measure_ceilings(device: str, bench) -> dict:
    if device != "cuda":
        return {"copy_tbs": None, "matmul_tflops": None}
    copy_tbs = _copy_tbs(device, bench)
    m = 8192
    x = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    y = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    ms = bench(lambda: x @ y)
    return {"copy_tbs": copy_tbs, "matmul_tflops": 2 * m ** 3 / (ms * 1e-3) / 1e12}


# --------------------------------------------------------------------------- implementations
def ours(inp: Inputs):
    import portattn

    backend = None
    if inp.q.is_cuda:
        backend = "triton_diffkv" if inp.cache.head_size_qk != inp.cache.head_size_v \
            else "triton_unified"

    def fn():
        portattn.attention(inp.q, inp.cache, inp.metadata, out=inp.out, backend=backend)
    return fn


def portattn_flash_attn(inp: Inputs):
    """Our flash-attn backend through portattn: ``flash_attn`` (FA3 where installed, else
    paged FA2 when the block size is a multiple of 256) when it serves the call, else the
    gather variant (copies the pages first)."""
    import portattn
    from portattn.errors import UnsupportedError

    try:
        portattn.explain(inp.q, inp.cache, inp.metadata, backend="flash_attn")
        backend = "flash_attn"
    except UnsupportedError:
        backend = "flash_attn_gather"
        portattn.explain(inp.q, inp.cache, inp.metadata, backend=backend)  # raises if not

    def fn():
        portattn.attention(inp.q, inp.cache, inp.metadata, out=inp.out, backend=backend)
    return fn


def fa4_paged(inp: Inputs):
    """FA4 (``flash_attn.cute.flash_attn_varlen_func``) on our paged cache in place, at the
    bench's block size: ``page_table`` = our block table, ``seqused_k`` = our lengths, the
    same mapping as the ``flash_attn`` backend (:func:`flash_attn_calls.fa4_paged`) but
    called directly (no dispatcher, no copy into ``out``). Causal, default scale."""
    from portattn.backends.flash_attn_calls import fa4_paged as fa4_call
    from portattn.options import normalize_options

    options = normalize_options(inp.q, inp.cache)
    max_q, max_k = inp.metadata.max_lengths()

    def fn():
        fa4_call(inp.q, inp.cache, inp.metadata, options, max_q, max_k)
    return fn


def _sdpa_parts(case: Case, inp: Inputs):
    """Per group of equal (q_len, seq_len) sequences: (q4, k4, v4, q_len, seq_len)."""
    groups: dict = {}
    cu = 0
    for b, (ql, sl) in enumerate(zip(case.query_lens, case.seq_lens)):
        groups.setdefault((ql, sl), []).append((b, cu))
        cu += ql
    parts = []
    for (ql, sl), members in groups.items():
        ks, vs, qs = [], [], []
        for b, start in members:
            k, v = gather_contiguous(inp, b, sl)
            ks.append(k)
            vs.append(v)
            qs.append(inp.q[start:start + ql].transpose(0, 1))
        parts.append((torch.stack(qs), torch.stack(ks), torch.stack(vs), ql, sl))
    return parts


def sdpa(case: Case, inp: Inputs, backend_name: str):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)
    notes = []
    calls: list[tuple[Any, Any, Any, dict[str, Any]]] = []
    for q4, k4, v4, ql, sl in _sdpa_parts(case, inp):
        if ql == sl:
            kw = dict(is_causal=True)
        elif ql == 1:
            kw = {"is_causal": False}
        else:  # bottom-right causal would be exact; SDPA backends rarely take it
            kw = dict(is_causal=False)
            notes.append(f"q {ql} over {sl} keys run non-causal (a little more work)")
        calls.append((q4, k4, v4, kw))

    def fn():
        with sdpa_kernel([backend]):
            for q4, k4, v4, kw in calls:
                F.scaled_dot_product_attention(q4, k4, v4, enable_gqa=True, **kw)
    return fn, notes


def flash_attn_contiguous(case: Case, inp: Inputs):
    """flash-attn 2 on contiguous K/V with its best call for the case:
    ``flash_attn_with_kvcache`` (split-KV decode path) when every sequence has the same
    query and key lengths (decode, spec-decode), else ``flash_attn_varlen_func``."""
    if len(set(case.query_lens)) == 1 and len(set(case.seq_lens)) == 1:
        return _flash_attn_kvcache(case, inp)
    from flash_attn import flash_attn_varlen_func

    ks, vs = [], []
    for b, sl in enumerate(case.seq_lens):
        k, v = gather_contiguous(inp, b, sl)
        ks.append(k.transpose(0, 1))
        vs.append(v.transpose(0, 1))
    k = torch.cat(ks).contiguous()
    v = torch.cat(vs).contiguous()
    starts = [0]
    for sl in case.seq_lens:
        starts.append(starts[-1] + sl)
    cu_k = torch.tensor(starts, dtype=torch.int32, device=inp.q.device)

    def fn():
        flash_attn_varlen_func(inp.q, k, v, inp.metadata.cu_seqlens_q, cu_k,
                               max(case.query_lens), max(case.seq_lens), causal=True)
    return fn


def _flash_attn_kvcache(case: Case, inp: Inputs):
    from flash_attn import flash_attn_with_kvcache

    seq_len, q_len = case.seq_lens[0], case.query_lens[0]
    pairs = [gather_contiguous(inp, b, seq_len) for b in range(case.num_seqs)]
    k = torch.stack([p[0].transpose(0, 1) for p in pairs]).contiguous()  # [B, L, Hkv, D]
    v = torch.stack([p[1].transpose(0, 1) for p in pairs]).contiguous()
    q = inp.q.view(case.num_seqs, q_len, *inp.q.shape[1:])
    lens = torch.full((case.num_seqs,), seq_len, dtype=torch.int32, device=inp.q.device)

    def fn():
        flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, causal=True)
    return fn


# --------------------------------------------------------------------------- sweep
def sweep_configs(case: Case, shape) -> list[dict]:
    """Launch configs worth timing for one case (see benchmarks/NOTES.md)."""
    from portattn.kernels.heuristics import TileConfig, decode_config, plan_launch, prefill_config

    configs = []
    if case.kind in ("decode", "spec"):
        base = TileConfig(**plan_launch(shape, mode="decode", segments=1)["short"])
        tiles: list[tuple[int, int, int, int | None]] = [
            (64, 4, 3, None), (64, 8, 3, None), (64, 4, 2, None), (64, 2, 2, None),
            (128, 4, 3, None), (128, 8, 3, None), (128, 4, 2, None), (256, 8, 2, None),
            (256, 4, 2, None)]
        if base.maxnreg:  # the plan's register cap on its own tile (and above: without)
            tiles.append((base.block_n, base.num_warps, base.num_stages, base.maxnreg))
        programs = case.num_seqs * shape.num_kv_heads
        seg_options = [s for s in (1, 2, 4, 8, 16, 32, 64)
                       if programs * s <= 4 * shape.sm_count and
                       programs * s * 4 >= shape.sm_count // 2] or [1]
        for bn, w, st, cap in tiles:
            for seg in seg_options:
                tile = TileConfig(base.block_m, base.block_q, bn, w, st, seg, cap)
                # through plan_launch: the plan's own switches (kv_bits) with these tiles
                configs.append(plan_launch(shape, mode="decode", short=tile))
        if base.maxnreg:  # and the byte-wise V read the paired tile replaced
            plain = dataclasses.replace(base, maxnreg=None)
            for seg in seg_options:
                params = plan_launch(shape, mode="decode",
                                     short=dataclasses.replace(plain, segments=seg))
                params.pop("v_pairs", None)
                configs.append(params)
    elif case.kind == "prefill":
        base = prefill_config(shape)
        for bm, bn, w, st in [(128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 3),
                              (128, 128, 8, 2), (64, 128, 4, 3), (128, 32, 4, 4),
                              (256, 64, 8, 2), (256, 128, 8, 2)]:
            tile = TileConfig(bm, bm // shape.group, bn, w, st)
            configs.append({"mode": "prefill", "long": tile.as_dict()})
        if case.num_seqs > 1:
            configs.append({"mode": "mixed", "short": decode_config(shape, 1, case.num_seqs)
                            .as_dict(), "long": base.as_dict()})
    elif case.kind == "mixed":
        short = decode_config(shape, 1, case.num_seqs, 1)
        for bm, bn, w, st in [(128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3)]:
            long = TileConfig(bm, bm // shape.group, bn, w, st)
            for seg in (1, 2):
                configs.append({"mode": "mixed",
                                "short": dataclasses.replace(short, segments=seg).as_dict(),
                                "long": long.as_dict()})
    return configs


def compile_only(cases: list[Case], args, caps, shard: int, shards: int) -> int:
    """Run every distinct kernel config once (shard ``shard`` of ``shards``), filling
    Triton's disk cache so the timed run does not compile. Lengths may be shrunk: the
    compiled variants depend on head counts, sizes and strides, not on lengths."""
    from portattn.kernels.heuristics import Shape, quant_mode
    from portattn.kernels.launch import launch_unified
    from portattn.options import normalize_options

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    seen, work = set(), []
    for case in cases:
        elem = 1 if case.kv_quant != "none" else torch.empty((), dtype=dtype).element_size()
        shape = Shape(args.num_q_heads, args.num_kv_heads, case.head_size_qk or args.head_size,
                      elem, max(case.query_lens), max(case.seq_lens), case.num_seqs,
                      caps.sm_count, caps.arch, case.head_size_v,
                      quant_mode(case.kv_quant))
        items = [None] + (sweep_configs(case, shape) if args.sweep else [])
        for params in items:
            key = (case.num_seqs == 1, case.kv_quant, case.head_size_v,
                   json.dumps(params, sort_keys=True) if params else case.name)
            if key not in seen:
                seen.add(key)
                work.append((case, params))
    mine = work[shard::shards]
    t0 = time.time()
    for case in cases:
        todo = [p for c, p in mine if c is case]
        if not todo:
            continue
        inp = build_inputs(case, num_q_heads=args.num_q_heads,
                           num_kv_heads=args.num_kv_heads, head_size=args.head_size,
                           block_size=args.block_size, dtype=dtype, device=args.device)
        options = normalize_options(inp.q, inp.cache)
        for params in todo:
            try:
                if params is None:
                    ours(inp)()
                else:
                    launch_unified(inp.q, inp.cache, inp.metadata, options, inp.out, params)
            except Exception as exc:
                _flush_print(f"compile {case.name} {params}: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200] if str(exc) else ''}")
        del inp
    if args.device == "cuda":
        torch.cuda.synchronize()
    _flush_print(f"shard {shard}/{shards}: {len(mine)} of {len(work)} configs "
                 f"({time.time() - t0:.1f}s)")
    return 0


def run_sweep(case: Case, inp: Inputs, bench, caps) -> list[dict]:
    from portattn.kernels.heuristics import Shape, quant_mode
    from portattn.kernels.launch import launch_unified
    from portattn.options import normalize_options

    options = normalize_options(inp.q, inp.cache)
    shape = Shape(inp.q.shape[1], inp.cache.num_kv_heads, inp.q.shape[2],
                  inp.cache.key_cache.element_size(), max(case.query_lens),
                  max(case.seq_lens), case.num_seqs, caps.sm_count, caps.arch,
                  inp.cache.head_size_v, quant_mode(case.kv_quant))
    rows = []
    # the backend's own byte-decode choice (fp8 caches before sm89) goes with every config
    from portattn.backends.triton_unified import fp8_cache_from_bytes
    from portattn.dispatch.problem import Problem

    problem = Problem.from_call(inp.q, inp.cache, inp.metadata, options,
                                max(case.query_lens), max(case.seq_lens))
    kv_bits = fp8_cache_from_bytes(problem, caps)
    for params in sweep_configs(case, shape):
        if kv_bits:
            params = dict(params, kv_bits=kv_bits)
        record: dict[str, Any] = {"params": params}
        if bench is None:  # --compile-only
            launch_unified(inp.q, inp.cache, inp.metadata, options, inp.out, params)
            continue
        try:
            ms = bench(lambda p=params: launch_unified(inp.q, inp.cache, inp.metadata,
                                                       options, inp.out, p))
            record["ms"] = ms
        except Exception as exc:  # out of resources, ...
            record["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        rows.append(record)
        _flush_print(f"  sweep {case.name}: {_describe_params(params)} -> "
                     f"{record.get('ms', record.get('error'))}")
    return rows


def _describe_params(params: dict) -> str:
    bits = [params["mode"]]
    for key in ("short", "long"):
        if key in params:
            c = params[key]
            bits.append(f"{key}:m{c['block_m']}n{c['block_n']}w{c['num_warps']}"
                        f"s{c['num_stages']}x{c['segments']}")
    return " ".join(bits)


# --------------------------------------------------------------------------- main
def _flush_print(*args):
    print(*args, flush=True)


def _metric(case: Case, ms: float, nbytes: int, flops: float) -> dict:
    return {"ms": ms, "tbs": nbytes / (ms * 1e-3) / 1e12, "tflops": flops / (ms * 1e-3) / 1e12}


def run_case(case: Case, args, bench, caps, ceilings) -> dict:
    """One case: every implementation timed, ratios and the sweep; its inputs are freed
    (and the allocator's cache emptied) before the next case."""
    result = _run_case(case, args, bench, caps, ceilings)
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return result


def _run_case(case: Case, args, bench, caps, ceilings) -> dict:
    import portattn

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    inp = build_inputs(case, num_q_heads=args.num_q_heads, num_kv_heads=args.num_kv_heads,
                       head_size=args.head_size, block_size=args.block_size, dtype=dtype,
                       device=args.device)
    nbytes = case_bytes(case, inp)
    flops = case_flops(case, args.num_q_heads, inp.cache.head_size_qk,
                       head_size_v=inp.cache.head_size_v)
    forced = None
    if args.device == "cuda":
        forced = "triton_diffkv" if case.head_size_v is not None else "triton_unified"
    decision = portattn.explain(inp.q, inp.cache, inp.metadata, backend=forced)
    lens = {"query_lens": _compact(case.query_lens), "seq_lens": _compact(case.seq_lens)}
    result: dict[str, Any] = {
        "case": dataclasses.asdict(case) | lens,
        "bytes": nbytes, "flops": flops, "backend": decision.backend,
        "plan": decision.plan.describe(), "impls": {}, "notes": []}
    impls = {"ours": lambda: ours(inp)}
    if not args.no_peers and args.device == "cuda" and not case.variant_of_bf16:
        def peer(name):
            def make():
                fn, notes = sdpa(case, inp, name)
                result["notes"].extend(f"{name}: {n}" for n in notes)
                return fn
            return make
        impls["sdpa_cudnn"] = peer("CUDNN_ATTENTION")
        impls["sdpa_flash"] = peer("FLASH_ATTENTION")
        impls["flash_attn"] = lambda: flash_attn_contiguous(case, inp)
        impls["portattn_flash_attn"] = lambda: portattn_flash_attn(inp)
    if not args.no_peers and args.device == "cuda" and case.kv_quant == "none":
        impls["fa4_paged"] = lambda: fa4_paged(inp)  # DiffKV cases too: FA4 reads 192/128
        if case.head_size_v is not None:  # and portattn's flash_attn backend through it
            impls["portattn_flash_attn"] = lambda: portattn_flash_attn(inp)
    for name, make in impls.items():
        try:
            fn = make()
            fn()
            result["impls"][name] = _metric(case, bench(fn), nbytes, flops)
        except Exception as exc:
            result["impls"][name] = {"error": _error(exc)}
            continue
        if args.device == "cuda":
            entry = result["impls"][name]
            try:
                entry["graph_ms"] = args.graph_timer(fn)
            except Exception as exc:
                entry["graph_error"] = _error(exc)
            if name == "ours":
                entry["host_us"] = host_us(fn)
                entry["launch_host_us"] = host_us(_direct_launch(inp))
    if case.kind == "mixed":  # the two parts run separately through our kernel
        result["separate_parts_ms"] = _separate_parts(case, args, bench, dtype)
        if args.device == "cuda":
            result["separate_parts_graph_ms"] = _separate_parts(case, args, args.graph_timer,
                                                                dtype)
    ours_ms = result["impls"]["ours"].get("ms")
    if ours_ms:
        result["speed_vs"] = {k: v["ms"] / ours_ms for k, v in result["impls"].items()
                              if k != "ours" and "ms" in v}
        ours_graph = result["impls"]["ours"].get("graph_ms")
        if ours_graph:
            result["graph_speed_vs"] = {k: v["graph_ms"] / ours_graph
                                        for k, v in result["impls"].items()
                                        if k != "ours" and v.get("graph_ms")}
        if ceilings.get("copy_tbs") and case.kind in ("decode", "spec"):
            result["fraction_of_ceiling"] = result["impls"]["ours"]["tbs"] / ceilings["copy_tbs"]
        elif ceilings.get("matmul_tflops"):
            result["fraction_of_ceiling"] = (result["impls"]["ours"]["tflops"]
                                             / ceilings["matmul_tflops"])
        if "separate_parts_ms" in result and result["separate_parts_ms"]:
            result["speed_vs"]["separate_parts"] = result["separate_parts_ms"] / ours_ms
        if result.get("separate_parts_graph_ms") and ours_graph:
            result["graph_speed_vs"]["separate_parts"] = (result["separate_parts_graph_ms"]
                                                          / ours_graph)
    if args.sweep:
        sweep_bench = args.graph_timer if args.device == "cuda" else bench
        result["sweep"] = run_sweep(case, inp, sweep_bench, caps)
    return result


def _error(exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"


def _direct_launch(inp: Inputs):
    """Our kernels launched without the dispatcher (to split host time into parts)."""
    import portattn
    from portattn.kernels.launch import launch_unified
    from portattn.options import normalize_options

    options = normalize_options(inp.q, inp.cache)
    diffkv = inp.cache.head_size_qk != inp.cache.head_size_v
    plan = portattn.explain(inp.q, inp.cache, inp.metadata,
                            backend="triton_diffkv" if diffkv else "triton_unified").plan

    def fn():
        launch_unified(inp.q, inp.cache, inp.metadata, options, inp.out, plan.params)
    return fn


def _separate_parts(case: Case, args, bench, dtype) -> float | None:
    import portattn

    total = 0.0
    for pick in (lambda ql: ql > 1, lambda ql: ql == 1):
        idx = [i for i, ql in enumerate(case.query_lens) if pick(ql)]
        part = Case(case.name + "-part", case.kind, [case.query_lens[i] for i in idx],
                    [case.seq_lens[i] for i in idx])
        inp = build_inputs(part, num_q_heads=args.num_q_heads, num_kv_heads=args.num_kv_heads,
                           head_size=args.head_size, block_size=args.block_size, dtype=dtype,
                           device=args.device)
        total += bench(lambda inp=inp: portattn.attention(inp.q, inp.cache, inp.metadata,
                                                          out=inp.out))
    return total


def _compact(values: list) -> str:
    out, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        out.append(f"{values[i]}x{j - i + 1}" if j > i else str(values[i]))
        i = j + 1
    return ",".join(out)


def add_plain_ratios(report: dict) -> None:
    """Each quantized / DiffKV case against the plain (bf16, equal heads) case of the same
    shape measured in the same run: ``time`` and ``graph_time`` are our time over the
    plain case's (< 1: faster), ``tflops`` the TFLOP/s ratio (same-FLOP comparison)."""
    by_name = {r["case"]["name"]: r for r in report["cases"]}
    for r in report["cases"]:
        name = r["case"]["name"]
        base = by_name.get(name.rsplit("-", 1)[0]) if r["case"].get("kv_quant", "none") != \
            "none" or r["case"].get("head_size_v") else None
        if base is None:
            continue
        mine, plain = r["impls"].get("ours", {}), base["impls"].get("ours", {})
        if "ms" not in mine or "ms" not in plain:
            continue
        ratios = {"plain_case": base["case"]["name"], "time": mine["ms"] / plain["ms"],
                  "tflops": mine["tflops"] / plain["tflops"] if plain["tflops"] else None}
        if mine.get("graph_ms") and plain.get("graph_ms"):
            ratios["graph_time"] = mine["graph_ms"] / plain["graph_ms"]
        r["vs_plain"] = ratios


def format_table(report: dict) -> str:
    lines = []
    ceil = report["ceilings"]
    lines.append(f"GPU {report['gpu']}  torch {report['torch']}  triton {report['triton']}  "
                 f"copy {_fmt(ceil.get('copy_tbs'))} TB/s  matmul "
                 f"{_fmt(ceil.get('matmul_tflops'))} TFLOP/s")
    lines.append(f"{'':<20} {'------------ do_bench (eager) -------------':<53} "
                 f"{'------- CUDA graph, kernel only -------':<42}")
    lines.append(f"{'case':<20} {'ours':>8} {'rate':>13} {'ceil':>5} {'cuDNN':>5} {'flash':>5} "
                 f"{'FA':>5} {'pFA':>5} {'FA4':>5} {'ours':>8} {'rate':>13} {'cuDNN':>5} "
                 f"{'flash':>5} {'FA4':>5} {'host':>6}  "
                 f"variant")
    for r in report["cases"]:
        o = r["impls"].get("ours", {})
        if "ms" not in o:
            lines.append(f"{r['case']['name']:<20} ours failed: {o.get('error')}")
            continue
        kind = r["case"]["kind"]
        sv, gv = r.get("speed_vs", {}), r.get("graph_speed_vs", {})
        g = o.get("graph_ms")
        extra = ""
        if "separate_parts" in sv:
            extra = f" vs parts x{sv['separate_parts']:.2f}/{_fmt(gv.get('separate_parts'))}"
        lines.append(
            f"{r['case']['name']:<20} {_ms(o['ms']):>8} {_rate(kind, r, o['ms']):>13} "
            f"{_fmt(r.get('fraction_of_ceiling')):>5} {_fmt(sv.get('sdpa_cudnn')):>5} "
            f"{_fmt(sv.get('sdpa_flash')):>5} {_fmt(sv.get('flash_attn')):>5} "
            f"{_fmt(sv.get('portattn_flash_attn')):>5} {_fmt(sv.get('fa4_paged')):>5} "
            f"{_ms(g) if g else '-':>8} {_rate(kind, r, g) if g else '-':>13} "
            f"{_fmt(gv.get('sdpa_cudnn')):>5} {_fmt(gv.get('sdpa_flash')):>5} "
            f"{_fmt(gv.get('fa4_paged')):>5} "
            f"{_fmt(o.get('host_us'), 0):>6}  {r['plan'].split(' ')[0]}{extra}")
    variants = [r for r in report["cases"] if r.get("vs_plain")]
    if variants:
        lines.append("quantized / DiffKV cases against the bf16 equal-head case, same run "
                     "(time ratio < 1: faster; kernel-only from the CUDA graph):")
        for r in variants:
            v = r["vs_plain"]
            lines.append(f"  {r['case']['name']:<24} vs {v['plain_case']:<18} time "
                         f"x{_fmt(v['time'])}  graph x{_fmt(v.get('graph_time'))}  "
                         f"TFLOP/s x{_fmt(v.get('tflops'))}  ceil "
                         f"{_fmt(r.get('fraction_of_ceiling'))}")
    lines.append("ceil = fraction of copy bandwidth (decode/spec) or bf16 matmul (others); "
                 "cuDNN/flash/FA/pFA = peer time / our time (>1: ours faster; FA = flash-attn 2 on "
                 "contiguous K/V, pFA = portattn's flash_attn backend, FA4 = flash_attn.cute "
                 "on our paged cache); host = us of host time per portattn.attention call")
    return "\n".join(lines)


def _rate(kind: str, r: dict, ms: float) -> str:
    if kind in ("decode", "spec"):
        return f"{r['bytes'] / (ms * 1e-3) / 1e12:.2f} TB/s"
    return f"{r['flops'] / (ms * 1e-3) / 1e12:.0f} TFLOP/s"


def _fmt(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ms(ms: float) -> str:
    return f"{ms * 1e3:.1f}us" if ms < 1 else f"{ms:.3f}ms"


def plot(report: dict, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        return f"no plot: {exc}"
    cases = [r for r in report["cases"] if "ms" in r["impls"].get("ours", {})]
    impls = ["ours", "sdpa_cudnn", "sdpa_flash", "flash_attn", "portattn_flash_attn",
             "fa4_paged"]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    for ax, kinds, key, unit, ceil in (
            (axes[0], ("decode", "spec"), "tbs", "TB/s", report["ceilings"].get("copy_tbs")),
            (axes[1], ("prefill", "mixed"), "tflops", "TFLOP/s",
             report["ceilings"].get("matmul_tflops"))):
        sel = [r for r in cases if r["case"]["kind"] in kinds]
        width = 0.8 / len(impls)
        for i, name in enumerate(impls):
            vals = [r["impls"].get(name, {}).get(key, 0.0) for r in sel]
            ax.bar([j + i * width for j in range(len(sel))], vals, width, label=name)
        if ceil:
            ax.axhline(ceil, color="k", linestyle="--", linewidth=1, label="ceiling")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sel))])
        ax.set_xticklabels([r["case"]["name"] for r in sel], rotation=30, ha="right")
        ax.set_ylabel(unit)
        ax.legend(fontsize=8)
    fig.suptitle(f"portattn bench on {report['gpu']} ({report['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}")
    return value


def _shard(text: str) -> tuple[int, int]:
    index, sep, count = text.partition("/")
    if sep and index.isdigit() and count.isdigit() and 0 <= int(index) < int(count):
        return int(index), int(count)
    raise argparse.ArgumentTypeError(f"expected i/n with 0 <= i < n, got {text!r}")


def _check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``parser.error`` (exit 2, the flag named) for what would fail later, mid-run."""
    if args.num_q_heads % args.num_kv_heads:
        parser.error(f"argument --num-q-heads: expected a multiple of --num-kv-heads "
                     f"({args.num_kv_heads}), got {args.num_q_heads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda, but this torch sees no CUDA/ROCm GPU")
    if args.shard != (0, 1) and not args.compile_only:
        parser.error("argument --shard: only with --compile-only (it splits the kernel "
                     "configs to compile, not the timed cases)")
    cases = default_cases()
    known = {"all"} | {c.name for c in cases} | {c.kind for c in cases} | \
        {tag for c in cases for tag in case_tags(c)}
    unknown = [w for w in args.cases.split(",") if w not in known]
    if unknown:
        parser.error(f"argument --cases: unknown {', '.join(map(repr, unknown))} (known: "
                     f"{', '.join(sorted(known))})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="portattn bench", description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="all",
                        help="comma list of case names, kinds (decode, prefill, mixed, spec) "
                        "or tags (plain, quant, diffkv, decode-plain, ...); default all")
    parser.add_argument("--sweep", action="store_true", help="also time many launch configs")
    parser.add_argument("--out", default="benchmarks/results", help="folder for JSON/PNG")
    parser.add_argument("--prefix", default=None, help="file name prefix (default gpu-date)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--num-q-heads", type=_positive_int, default=32)
    parser.add_argument("--num-kv-heads", type=_positive_int, default=8)
    parser.add_argument("--head-size", type=_positive_int, default=128)
    parser.add_argument("--block-size", type=_positive_int, default=16)
    parser.add_argument("--rep", type=_positive_int, default=100, help="do_bench rep in ms")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--compile-only", action="store_true",
                        help="only run each kernel config once (fills Triton's disk cache; "
                        "use with --shrink 4 and --shard to compile in parallel)")
    parser.add_argument("--shard", type=_shard, default=(0, 1),
                        help="i/n, with --compile-only: compile every n-th kernel config "
                        "from the i-th (parallel compiles)")
    parser.add_argument("--shrink", type=_positive_int, default=1,
                        help="divide sequence lengths (smoke tests on the interpreter)")
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda when available")
    args = parser.parse_args(argv)
    _check_arguments(parser, args)
    if args.device == "cpu" and args.shrink == 1 and not args.compile_only:
        print("portattn bench: no GPU: on the CPU a run checks the harness, it measures "
              "nothing, and full-size cases take minutes each; --shrink 64 --cases "
              "decode-1x8192 makes it short", file=sys.stderr, flush=True)

    from portattn.capabilities import probe

    caps = probe()
    bench = timer(args.device, args.rep)
    wanted = set(args.cases.split(","))
    cases = [c for c in default_cases(args.shrink)
             if "all" in wanted or c.name in wanted or c.kind in wanted
             or bool(wanted & set(case_tags(c)))]
    shard, shards = args.shard
    if args.compile_only:
        return compile_only(cases, args, caps, shard, shards)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    args.graph_timer = GraphTimer() if args.device == "cuda" else None
    report = {"gpu": gpu, "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "triton": triton_version,
              "sm_count": caps.sm_count, "dtype": args.dtype,
              "heads": [args.num_q_heads, args.num_kv_heads], "head_size": args.head_size,
              "block_size": args.block_size, "ceilings": measure_ceilings(args.device, bench),
              "cases": []}
    _flush_print(f"ceilings: {report['ceilings']}")
    for case in cases:
        t0 = time.time()
        result = run_case(case, args, bench, caps, report["ceilings"])
        report["cases"].append(result)
        o = result["impls"].get("ours", {})
        _flush_print(f"{case.name}: ours {o.get('ms', o.get('error'))} ms, "
                     f"vs {result.get('speed_vs')}, plan {result['plan']} "
                     f"({time.time() - t0:.1f}s)")
    add_plain_ratios(report)
    os.makedirs(args.out, exist_ok=True)
    short_gpu = gpu.replace("NVIDIA ", "").split()[0].lower() if gpu != "cpu" else "cpu"
    prefix = args.prefix or f"{short_gpu}-{report['date']}-bench"
    with open(os.path.join(args.out, prefix + ".json"), "w") as f:
        json.dump(report, f, indent=1)
    note = plot(report, os.path.join(args.out, prefix + ".png"))
    if note:
        _flush_print(note)
    _flush_print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
