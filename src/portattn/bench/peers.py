"""The implementations the bench times, each as a factory of a no-argument call: ours
(``portattn.attention``), portattn's ``flash_attn`` backend, FA4 on our paged cache, torch
SDPA and flash-attn 2 on contiguous K/V.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch

from portattn.bench.cases import Case, Inputs, gather_contiguous, visible_pairs
from portattn.bench.report import _error


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


@dataclasses.dataclass
class SdpaPart:
    """A group of equal (q_len, seq_len) sequences as one SDPA call: ``q`` ``[B, Hq, q_len,
    D]``, ``k``/``v`` ``[B, Hkv, seq_len, D]`` contiguous, ``starts`` each sequence's first
    token in the packed batch (to put the output back in token order)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_len: int
    seq_len: int
    starts: list[int]


def _sdpa_parts(case: Case, inp: Inputs) -> list[SdpaPart]:
    """Per group of equal (q_len, seq_len) sequences, its :class:`SdpaPart`."""
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
        parts.append(SdpaPart(torch.stack(qs), torch.stack(ks), torch.stack(vs), ql, sl,
                              [start for _, start in members]))
    return parts


#: A chunk whose non-causal call does at most this many times ours' work (spec-decode's 4
#: queries over thousands of keys: 1.0004x) keeps SDPA's plain non-causal call, noted: its
#: result differs in the few keys past each query, its time is the peer's at that shape.
NEAR_EQUAL_WORK = 1.01


#: SDPA backends that run ``causal_lower_right`` with a causal kernel (flash and
#: memory-efficient: their lower-right causal mode) or that are the reference anyway
#: (math). Others (cuDNN) would run it, or a boolean mask, through a dense-mask kernel:
#: exact but a slower class of kernel (session 42, H100: cuDNN's masked call took 1.63x
#: our time on mixed-2048+63x4096 where its non-causal call, 1.11x the work, took 0.99x).
LOWER_RIGHT_CAUSAL_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def _sdpa_forms(q_len: int, seq_len: int, backend_name: str
                ) -> list[tuple[dict[str, Any], str | None]]:
    """The SDPA call forms of a part, best first, each with its note (None: the plain
    call). q_len == seq_len (SDPA's top-left causal is ours) and q_len == 1 (every key
    visible) have one exact form; a chunk over a longer context (chunked prefill,
    spec-decode) needs bottom-right causal: ``causal_lower_right`` where the backend has a
    causal kernel for it (:data:`LOWER_RIGHT_CAUSAL_BACKENDS`), else (or where that is
    refused) the non-causal call, noted with its real work ratio (not our result: the
    output check says by how much). Where the non-causal call is within
    :data:`NEAR_EQUAL_WORK` of ours, it alone."""
    if q_len == seq_len:
        return [({"is_causal": True}, None)]
    if q_len == 1:
        return [({"is_causal": False}, None)]
    from torch.nn.attention.bias import causal_lower_right

    where = f"q {q_len} over {seq_len} keys"
    ratio = q_len * seq_len / visible_pairs(q_len, seq_len)
    plain = ({"is_causal": False}, f"{where} run non-causal ({ratio:.2f}x the work)")
    if ratio <= NEAR_EQUAL_WORK or backend_name not in LOWER_RIGHT_CAUSAL_BACKENDS:
        return [plain]
    return [({"attn_mask": causal_lower_right(q_len, seq_len)},
             f"{where} run with causal_lower_right"),
            plain]


def _first_form_that_runs(part: SdpaPart, backend, backend_name: str):
    """(kwargs, note, output) of the first of the part's forms SDPA runs under
    ``sdpa_kernel([backend])``, one trial call each at setup: a backend that cannot take a
    form raises a RuntimeError (e.g. "No available kernel", after warnings that say why,
    silenced here) and the next form is tried; the last form's error is raised."""
    forms = _sdpa_forms(part.q_len, part.seq_len, backend_name)
    for kw, note in forms[:-1]:
        try:
            return kw, note, _trial_call(part, backend, kw)
        except RuntimeError:
            continue
    kw, note = forms[-1]
    return kw, note, _trial_call(part, backend, kw)


def _trial_call(part: SdpaPart, backend, kw: dict[str, Any]) -> torch.Tensor:
    """One SDPA call of the part in form ``kw`` under ``backend`` alone, its warnings
    silenced (SDPA warns why each kernel it skips cannot run)."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    with warnings.catch_warnings(), sdpa_kernel([backend]):
        warnings.simplefilter("ignore")
        return F.scaled_dot_product_attention(part.q, part.k, part.v, enable_gqa=True, **kw)


def _rel_error_vs_ours(inp: Inputs, parts: list[SdpaPart], outs: list[torch.Tensor]) -> float:
    """``|peer - ours| / |ours|`` (Frobenius, float32) over the whole batch: our output on
    the same inputs, through the backend the bench times as ours."""
    import portattn

    ours_out = portattn.attention(inp.q, inp.cache, inp.metadata,
                                  backend=our_backend(inp)).float()
    peer = torch.empty_like(ours_out)
    for part, out in zip(parts, outs):
        for i, start in enumerate(part.starts):
            peer[start:start + part.q_len] = out[i].transpose(0, 1)
    return float((peer - ours_out).norm() / ours_out.norm())


def sdpa(case: Case, inp: Inputs, backend_name: str, check: dict | None = None):
    """torch SDPA (``SDPBackend.<backend_name>``) on contiguous K/V, one call per group of
    equal (q_len, seq_len) sequences, each in the first form the backend runs (chosen at
    setup, so the timed call does ours' work where the backend can: see
    :func:`_sdpa_forms`). Returns ``(fn, notes)``; the notes say which parts did not take
    the plain form. With ``check`` (a dict), the setup's output is also compared with ours:
    ``check["rel_error"]`` and a note (reported, never raised: the bench measures)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)
    notes = []
    calls: list[tuple[Any, Any, Any, dict[str, Any]]] = []
    parts = _sdpa_parts(case, inp)
    outs = []
    for part in parts:
        kw, note, out = _first_form_that_runs(part, backend, backend_name)
        if note:
            notes.append(note)
        calls.append((part.q, part.k, part.v, kw))
        outs.append(out)
    if check is not None:
        _check_output(inp, parts, outs, check, notes)

    def fn():
        with sdpa_kernel([backend]):
            for q4, k4, v4, kw in calls:
                F.scaled_dot_product_attention(q4, k4, v4, enable_gqa=True, **kw)
    return fn, notes


def _check_output(inp: Inputs, parts, outs, check: dict, notes: list) -> None:
    """Fill ``check`` (and a note) with the peer's relative error against ours; an error
    of the check itself is recorded, not raised (the peer is still timed)."""
    try:
        check["rel_error"] = _rel_error_vs_ours(inp, parts, outs)
    except Exception as exc:
        check["error"] = _error(exc)
        notes.append(f"output check vs ours failed: {check['error']}")
        return
    notes.append(f"output vs ours: relative error {check['rel_error']:.2e}")


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
