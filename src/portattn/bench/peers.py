"""The implementations the bench times, each as a factory of a no-argument call: ours
(``portattn.attention``), portattn's ``flash_attn`` backend, FA4 on our paged cache, torch
SDPA and flash-attn 2 on contiguous K/V.
"""

from __future__ import annotations

from typing import Any

import torch

from portattn.bench.cases import Case, Inputs, gather_contiguous


def triton_backend(cache) -> str:
    """Our Triton kernels' backend for ``cache``: DiffKV's when its K and V head sizes
    differ."""
    return "triton_diffkv" if cache.head_size_qk != cache.head_size_v else "triton_unified"


def our_backend(inp: Inputs) -> str | None:
    """The backend the bench times as ours: our Triton kernels, forced on a GPU (so a
    routing change, e.g. FA4 leading long prefills, cannot swap the kernel timed); None
    (auto routing) elsewhere."""
    return triton_backend(inp.cache) if inp.q.is_cuda else None


def ours(inp: Inputs):
    import portattn

    backend = our_backend(inp)

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
