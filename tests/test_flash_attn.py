"""The flash-attn backends on a CPU: reasons, routing with flash-attn present (simulated),
the page gather, and the argument mapping against a stand-in written from flash-attn's
documented semantics (the GPU tier checks the real library)."""

import math
import sys
import types

import pytest
import torch

from indexing import take
from portattn.backends.flash_attn import FlashAttn, FlashAttnGather
from portattn.backends.flash_attn_calls import gather_pages
from portattn.capabilities import probe
from portattn.dispatch import Problem, decide
from portattn.dispatch.routing import backend_availability
from portattn.errors import InputError
from portattn.options import normalize_options
from portattn.testing import dense_attention, make_paged_batch, relative_error
from portattn.types import KVQuant


def test_absent_flash_attn_is_a_reason_with_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not importable on this machine
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    caps = probe(refresh=True, use_disk_cache=False)
    reasons = FlashAttn().why_not(Problem.make(block_size=256), caps)
    assert any("flash-attn is not installed" in r and "pip install flash-attn" in r
               for r in reasons), reasons
    caps = probe(simulate="sm90")
    assert any("not installed" in r for r in FlashAttn().why_not(Problem.make(), caps))
    table = backend_availability(caps)
    assert not table["flash_attn"]["available"] and not table["flash_attn_gather"]["available"]


@pytest.mark.parametrize("kwargs,expected", [
    (dict(block_size=16), "multiple of 256"),
    (dict(block_size=256, sinks=True), "no attention sinks"),
    (dict(block_size=256, alibi="sqrt"), "no sqrt ALiBi"),
    (dict(block_size=256, alibi="linear", causal=False), "only with causal=True"),
    (dict(block_size=256, kv_quant="fp8_per_tensor"), "quantized KV cache"),
    (dict(block_size=256, kv_quant="int8_per_token_head"), "quantized KV cache"),
    (dict(block_size=256, dtype="float32"), "float16/bfloat16 q"),
    (dict(block_size=256, head_size=192, head_size_v=128), "equal K and V head sizes"),
    (dict(block_size=256, head_size=264), "head sizes up to 256"),
    (dict(block_size=256, head_size=100), "multiples of 8"),
    (dict(block_size=256, out_dtype="float8_e4m3fn"), "fp8 output"),
])
def test_each_unsupported_feature_has_its_reason(kwargs, expected):
    caps = probe(simulate="sm90+fa2")
    reasons = FlashAttn().why_not(Problem.make(**kwargs), caps)
    assert any(expected in r for r in reasons), reasons
    if kwargs.get("block_size") == 256 and len(kwargs) > 1:
        assert all("flash-attn is not installed" not in r for r in reasons)


def test_architecture_and_vendor_reasons():
    plain = Problem.make(block_size=256)
    assert FlashAttn().why_not(plain, probe(simulate="sm90+fa2")) == []
    amd = FlashAttn().why_not(plain, probe(simulate="gfx942+fa2"))
    assert any("NVIDIA CUDA GPUs only" in r for r in amd)
    cpu = FlashAttn().why_not(Problem.make(block_size=256, device_type="cpu"),
                              probe(simulate="cpu"))
    assert any("NVIDIA CUDA GPUs only" in r for r in cpu)


@pytest.mark.parametrize("kwargs,expected", [
    (dict(block_size=256), "flash_attn"),
    (dict(block_size=512, query_len=2048, seq_len=4096), "flash_attn"),
    (dict(block_size=16), "flash_attn_gather"),
    (dict(block_size=16, sliding_window=True, softcap=True), "flash_attn_gather"),
    (dict(block_size=256, sinks=True), "torch_ref"),
    (dict(block_size=256, kv_quant="int8_per_token_head"), "torch_ref"),
])
def test_routing_with_flash_attn_present_and_triton_off(monkeypatch, kwargs, expected):
    monkeypatch.setenv("PORTATTN_TRITON", "0")
    caps = probe(simulate="sm90+fa2")
    assert not caps.triton_kernels.ok and caps.flash_attn.ok
    assert decide(Problem.make(**kwargs), caps).backend == expected


def test_triton_stays_first_when_both_serve():
    caps = probe(simulate="sm90+fa2")
    decision = decide(Problem.make(block_size=256), caps)
    assert decision.backend == "triton_unified"
    assert dict(decision.considered)["flash_attn"] == ()  # could serve, lower priority


@pytest.mark.parametrize("block_size", [16, 32, 256])
def test_gather_pages_keeps_every_visible_key_in_order(block_size):
    batch = make_paged_batch([1, 3, 2], [40, 300, 257], block_size=block_size,
                             dtype=torch.float32)
    table = batch.metadata.block_table.clone()
    used = [-(-n // block_size) for n in batch.seq_lens]
    for row, n in enumerate(used):  # garbage ids past each sequence's blocks are allowed
        table[row, n:] = -5
    k_pages, v_pages, page_table = gather_pages(batch.cache, table, 300, 256)
    assert page_table.shape == (3, 2) and k_pages.shape[1] == 256
    for b, n in enumerate(batch.seq_lens):
        keys = k_pages[page_table[b].long()].reshape(-1, *k_pages.shape[2:])[:n]
        values = v_pages[page_table[b].long()].reshape(-1, *v_pages.shape[2:])[:n]
        assert torch.equal(keys, batch.keys[b]) and torch.equal(values, batch.values[b])


# ----------------------------------------------------- argument mapping, with stand-ins
# The stand-ins follow flash-attn's documented semantics (docstrings of
# flash_attn_varlen_func / flash_attn_with_kvcache in FA2 2.8.3 and hopper/ FA3): causal
# aligned bottom-right; keys in [i + sk - sq - left, i + sk - sq + right] (-1 = unbounded);
# ALiBi bias -slope * |i + sk - sq - j|; softcap on the scaled score; paged k/v through a
# page table; FA3 dequantizes e4m3 q/k/v with float32 descales of shape [B, Hkv].


def _documented_rows(q_rows, keys, values, *, scale, causal, window_size, softcap,
                     alibi_slopes=None):
    """One sequence: q_rows [sq, H, D], keys [sk, Hkv, D], values [sk, Hkv, Dv] (float)."""
    sq, sk = q_rows.shape[0], keys.shape[0]
    group = q_rows.shape[1] // keys.shape[1]
    kk, vv = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    s = torch.einsum("qhd,khd->hqk", q_rows, kk) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(sq)[:, None] + sk - sq
    j = torch.arange(sk)[None, :]
    left, right = window_size
    if causal:
        right = 0
    keep = torch.ones(sq, sk, dtype=torch.bool)
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    if alibi_slopes is not None:
        s = s - alibi_slopes[:, None, None] * (i - j).abs()
    s = s.masked_fill(~keep, -math.inf)
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), vv)


def _pages(cache_part, table_row, n):
    return take(cache_part, table_row[: -(-n // cache_part.shape[1])].long()).reshape(
        -1, *cache_part.shape[2:])[:n].float()


def _documented_fa2_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False,
                           window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    assert block_table is not None and block_table.dtype == torch.int32
    assert cu_seqlens_k.dtype == torch.int32 and k.shape[1] % 256 == 0
    if max_seqlen_q == 1 and alibi_slopes is None:
        causal = False  # flash_api.cpp: the same as causal for one query per sequence
        if q.shape[1] > k.shape[2] and window_size == (-1, -1):
            # flash_api.cpp folds the GQA query heads into rows: one query per sequence
            assert q.shape[0] == cu_seqlens_q.shape[0] - 1, "shape is invalid for input"
    out = torch.empty_like(q)
    for b in range(cu_seqlens_q.shape[0] - 1):
        q0, q1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        sk = int(cu_seqlens_k[b + 1] - cu_seqlens_k[b])
        assert q1 - q0 <= max_seqlen_q and sk <= max_seqlen_k
        out[q0:q1] = _documented_rows(
            q[q0:q1].float(), _pages(k, block_table[b], sk), _pages(v, block_table[b], sk),
            scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
            alibi_slopes=alibi_slopes).to(q.dtype)
    return out


def _documented_fa2_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None,
                            rotary_sin=None, cache_seqlens=None, cache_batch_idx=None,
                            cache_leftpad=None, block_table=None, softmax_scale=None,
                            causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                            return_softmax_lse=False):
    assert q.dim() == 4 and k is None and block_table.dtype == torch.int32
    assert cache_seqlens.dtype == torch.int32 and k_cache.shape[1] % 256 == 0
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        sk = int(cache_seqlens[b])
        out[b] = _documented_rows(
            q[b].float(), _pages(k_cache, block_table[b], sk), _pages(v_cache, block_table[b], sk),
            scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
            alibi_slopes=alibi_slopes).to(q.dtype)
    return out


def _documented_fa3_kvcache(q, k_cache, v_cache, k=None, v=None, qv=None, rotary_cos=None,
                            rotary_sin=None, cache_seqlens=None, cache_batch_idx=None,
                            cache_leftpad=None, page_table=None, cu_seqlens_q=None,
                            cu_seqlens_k_new=None, max_seqlen_q=None, rotary_seqlens=None,
                            q_descale=None, k_descale=None, v_descale=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1),
                            attention_chunk=0, softcap=0.0, rotary_interleaved=True,
                            scheduler_metadata=None, num_splits=0, pack_gqa=None,
                            sm_margin=0, return_softmax_lse=False):
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert q.dtype == k_cache.dtype == v_cache.dtype, "q, k, v in one dtype"
    assert page_table.dtype == cache_seqlens.dtype == cu_seqlens_q.dtype == torch.int32
    assert q.dim() == 3 and max_seqlen_q is not None
    num_seqs, num_kv_heads = cache_seqlens.shape[0], k_cache.shape[2]
    fp8 = q.dtype == torch.float8_e4m3fn
    d, dv = q.shape[-1], v_cache.shape[-1]  # hopper/flash_api.cpp's checks
    assert d <= 256 and d % (16 if fp8 else 8) == 0 and dv % (16 if fp8 else 8) == 0
    if dv != d:
        assert not fp8 and ((128 < d <= 192 and 96 < dv <= 128) or (d <= 64 and dv <= 512))
    if fp8:
        for d in (q_descale, k_descale, v_descale):
            assert d.dtype == torch.float32 and d.shape == (num_seqs, num_kv_heads)
    else:
        assert q_descale is None and k_descale is None and v_descale is None
    group = q.shape[1] // num_kv_heads
    out = torch.empty(*q.shape[:2], v_cache.shape[-1],
                      dtype=torch.bfloat16 if fp8 else q.dtype)
    for b in range(num_seqs):
        q0, q1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        sk = int(cache_seqlens[b])
        assert q1 - q0 <= max_seqlen_q
        qq = q[q0:q1].float()
        kk, vv = _pages(k_cache, page_table[b], sk), _pages(v_cache, page_table[b], sk)
        if fp8:
            qq = qq * q_descale[b].repeat_interleave(group)[None, :, None]
            kk = kk * k_descale[b][None, :, None]
            vv = vv * v_descale[b][None, :, None]
        out[q0:q1] = _documented_rows(qq, kk, vv, scale=softmax_scale, causal=causal,
                                      window_size=window_size, softcap=softcap).to(out.dtype)
    return out


@pytest.fixture
def documented_flash_attn(monkeypatch):
    calls = []

    def record(name, fn):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return wrapper

    fa2 = types.ModuleType("flash_attn")
    fa2.flash_attn_varlen_func = record("fa2_varlen", _documented_fa2_varlen)
    fa2.flash_attn_with_kvcache = record("fa2_kvcache", _documented_fa2_kvcache)
    fa3 = types.ModuleType("flash_attn_interface")
    fa3.flash_attn_with_kvcache = record("fa3_kvcache", _documented_fa3_kvcache)
    monkeypatch.setitem(sys.modules, "flash_attn", fa2)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", fa3)
    return calls


MAPPED_OPTIONS = [
    dict(), dict(sliding_window=7), dict(softcap=2.0), dict(alibi_slopes="rand"),
    dict(causal=False), dict(causal=False, sliding_window=5),
    dict(sliding_window=40, softcap=3.0, alibi_slopes="rand", scale=0.2)]
MAPPED_IDS = ["plain", "window", "softcap", "alibi", "non-causal", "non-causal-window", "all"]


def _run_direct(backend, batch, plan, **options):
    """Run a backend's ``run`` on CPU tensors with a chosen plan; returns (out, expected)."""
    if options.get("alibi_slopes") == "rand":
        options = dict(options, alibi_slopes=torch.rand(batch.q.shape[1]))
    opts = normalize_options(batch.q, batch.cache, **options)
    out = torch.full((batch.q.shape[0], batch.q.shape[1], batch.cache.head_size_v),
                     float("nan"), dtype=opts.out_dtype)
    backend.run(batch.q, batch.cache, batch.metadata, opts, out, plan)
    q_ref = batch.q.float() * float(options["q_scale"]) if "q_scale" in options else batch.q
    options.pop("q_scale", None)
    expected = dense_attention(q_ref, batch.keys, batch.values, batch.query_lens, **options)
    return out, expected


@pytest.mark.parametrize("backend_cls,block_size", [(FlashAttn, 256), (FlashAttnGather, 16),
                                                    (FlashAttnGather, 64)])
@pytest.mark.parametrize("shape", ["varlen", "decode"])
@pytest.mark.parametrize("options", MAPPED_OPTIONS, ids=MAPPED_IDS)
def test_fa2_argument_mapping_matches_our_semantics(documented_flash_attn, backend_cls,
                                                    block_size, shape, options):
    query_lens, seq_lens = ([3, 1, 20], [300, 41, 20]) if shape == "varlen" else \
        ([1, 1, 1], [300, 41, 1])
    batch = make_paged_batch(query_lens, seq_lens, num_q_heads=6, num_kv_heads=2,
                             head_size=32, block_size=block_size, dtype=torch.float16)
    backend = backend_cls()
    out, expected = _run_direct(backend, batch, backend.plan(None, None), **options)
    assert relative_error(out, expected) < 2e-3
    assert documented_flash_attn == ["fa2_kvcache" if shape == "decode" else "fa2_varlen"]


def test_fa2_decode_path_needs_one_query_for_every_sequence(documented_flash_attn):
    # max query length 1 but a sequence with no query: the varlen call, not with_kvcache
    batch = make_paged_batch([1, 0, 1], [300, 0, 41], num_q_heads=6, num_kv_heads=2,
                             head_size=32, block_size=256, dtype=torch.float16)
    out, expected = _run_direct(FlashAttn(), batch, FlashAttn().plan(None, None))
    assert relative_error(out, expected) < 2e-3
    assert documented_flash_attn == ["fa2_varlen"]


def _fa3_plan(batch, caps_name="sm90+fa2+fa3", **problem):
    caps = probe(simulate=caps_name)
    problem = Problem.make(num_q_heads=batch.q.shape[1], num_kv_heads=batch.cache.num_kv_heads,
                           head_size=batch.cache.head_size_qk,
                           head_size_v=batch.cache.head_size_v,
                           block_size=batch.cache.block_size, **problem)
    plan = FlashAttn().plan(problem, caps)
    assert plan.params == {"interface": "fa3"} and "FA3" in plan.variant
    return plan


@pytest.mark.parametrize("block_size", [5, 16, 256])
@pytest.mark.parametrize("options", [o for o in MAPPED_OPTIONS if "alibi_slopes" not in o],
                         ids=[i for i, o in zip(MAPPED_IDS, MAPPED_OPTIONS)
                              if "alibi_slopes" not in o])
def test_fa3_argument_mapping_matches_our_semantics(documented_flash_attn, block_size,
                                                    options):
    batch = make_paged_batch([3, 1, 0, 20], [300, 41, 0, 20], num_q_heads=6, num_kv_heads=2,
                             head_size=32, block_size=block_size, dtype=torch.float16)
    out, expected = _run_direct(FlashAttn(), batch, _fa3_plan(batch), **options)
    assert relative_error(out, expected) < 2e-3
    assert documented_flash_attn == ["fa3_kvcache"]


@pytest.mark.parametrize("sizes", [(192, 128), (136, 104)])
def test_fa3_maps_differing_kv_head_sizes(documented_flash_attn, sizes):
    batch = make_paged_batch([2, 1], [40, 70], num_q_heads=4, num_kv_heads=2,
                             head_size=sizes[0], head_size_v=sizes[1], block_size=16,
                             dtype=torch.float16)
    assert batch.cache.packed  # K and V are views of one DiffKV tensor
    out, expected = _run_direct(FlashAttn(), batch, _fa3_plan(batch), sliding_window=30)
    assert out.shape[-1] == sizes[1] and relative_error(out, expected) < 2e-3


@pytest.mark.parametrize("scales", ["floats", "tensors"])
def test_fa3_maps_fp8_q_and_kv_to_descales(documented_flash_attn, scales):
    k_scale, v_scale, q_scale = 0.05, 0.03, 0.04
    if scales == "tensors":
        k_scale, v_scale, q_scale = (torch.tensor([s]) for s in (k_scale, v_scale, q_scale))
    batch = make_paged_batch([3, 1, 9], [100, 33, 9], num_q_heads=8, num_kv_heads=2,
                             head_size=64, block_size=16, dtype=torch.bfloat16,
                             quant=KVQuant.fp8_per_tensor(k_scale, v_scale))
    batch.q = (batch.q.float() / float(q_scale)).to(torch.float8_e4m3fn)
    plan = _fa3_plan(batch, dtype="float8_e4m3fn", kv_quant="fp8_per_tensor:e4m3fn",
                     out_dtype="bfloat16")
    out, expected = _run_direct(FlashAttn(), batch, plan, q_scale=q_scale, softcap=5.0)
    assert out.dtype == torch.bfloat16 and relative_error(out, expected) < 1e-2


# ----------------------------------------------------- FA3: reasons and routing


@pytest.mark.parametrize("kwargs,expected", [
    (dict(alibi="linear"), "FA3 (flash_attn_interface) has no ALiBi"),
    (dict(sinks=True), "has no attention sinks"),
    (dict(dtype="float32"), "float16/bfloat16 or float8_e4m3fn q"),
    (dict(kv_quant="fp8_per_tensor"), "only with an e4m3 q"),
    (dict(kv_quant="int8_per_token_head"), "reads no int8_per_token_head cache"),
    (dict(dtype="float8_e4m3fn", out_dtype="bfloat16", kv_quant="fp8_per_token_head"),
     "per-tensor scales"),
    (dict(dtype="float8_e4m3fn", out_dtype="bfloat16", kv_quant="fp8_per_tensor:e5m2"),
     "per-tensor scales"),
    (dict(dtype="float8_e4m3fn", out_dtype="float8_e4m3fn", kv_quant="fp8_per_tensor"),
     "writes torch.bfloat16 here"),
    (dict(out_dtype="float8_e4m3fn"), "writes torch.bfloat16 here"),
    (dict(head_size=256, head_size_v=128), "different V head size here only for"),
    (dict(head_size=64, head_size_v=256), "different V head size here only for"),
    (dict(head_size=72, dtype="float8_e4m3fn", out_dtype="bfloat16",
          kv_quant="fp8_per_tensor"), "with fp8 supports head sizes up to 256 in multiples of 16"),
    (dict(head_size=192, head_size_v=128, dtype="float8_e4m3fn", out_dtype="bfloat16",
          kv_quant="fp8_per_tensor"), "needs fp16/bf16"),
    (dict(head_size=264), "head sizes up to 256"),
    (dict(head_size=100), "multiples of 8"),
])
def test_each_fa3_limit_has_its_reason(kwargs, expected):
    caps = probe(simulate="sm90+fa3")
    reasons = FlashAttn().why_not(Problem.make(block_size=16, **kwargs), caps)
    assert any(expected in r for r in reasons), reasons
    assert any("flash_attn_varlen_func" in r for r in reasons)  # FA2 itself is missing


@pytest.mark.parametrize("kwargs", [
    dict(block_size=16), dict(block_size=5, sliding_window=True, softcap=True, causal=False),
    dict(dtype="float8_e4m3fn", out_dtype="bfloat16", kv_quant="fp8_per_tensor"),
    dict(head_size=192, head_size_v=128), dict(head_size=160, head_size_v=112),
    dict(dtype="float16", query_len=2048, seq_len=4096, block_size=1)])
def test_fa3_serves_what_fa2_cannot(kwargs):
    problem = Problem.make(**kwargs)
    assert FlashAttn().why_not(problem, probe(simulate="sm90+fa3")) == []
    plan = FlashAttn().plan(problem, probe(simulate="sm90+fa2+fa3"))
    assert plan.params["interface"] == "fa3"
    fa2_only = FlashAttn().why_not(problem, probe(simulate="sm90+fa2"))
    assert fa2_only and any("FA3 (flash_attn_interface) would serve this call but is not "
                            "installed" in r for r in fa2_only), fa2_only


def test_fa3_is_hopper_only_and_gather_needs_fa2():
    problem = Problem.make(block_size=16)
    reasons = FlashAttn().why_not(problem, probe(simulate="sm80+fa3"))
    assert any("on Hopper (sm90) only" in r and "this is sm80" in r for r in reasons), reasons
    assert not any("would serve" in r for r in FlashAttn().why_not(
        problem, probe(simulate="sm80+fa2")))
    gather = FlashAttnGather().why_not(problem, probe(simulate="sm90+fa3"))
    assert any("flash_attn_gather needs flash-attn 2" in r for r in gather), gather
    assert FlashAttnGather().why_not(problem, probe(simulate="sm90+fa2+fa3")) == []


def test_fa2_is_used_where_fa3_cannot_serve():
    caps = probe(simulate="sm90+fa2+fa3")
    plan = FlashAttn().plan(Problem.make(block_size=256, alibi="linear"), caps)
    assert plan.params["interface"] == "fa2"
    assert FlashAttn().why_not(Problem.make(block_size=256, alibi="linear"), caps) == []


@pytest.mark.parametrize("triton", ["1", "0"])
@pytest.mark.parametrize("kwargs,with_triton,without_triton", [
    (dict(block_size=16), "triton_unified", "flash_attn"),
    (dict(block_size=16, alibi="linear"), "triton_unified", "flash_attn_gather"),
    (dict(dtype="float8_e4m3fn", out_dtype="bfloat16", kv_quant="fp8_per_tensor"),
     "triton_unified", "flash_attn"),
    (dict(head_size=192, head_size_v=128), "triton_diffkv", "flash_attn"),
    (dict(kv_quant="int8_per_token_head"), "triton_unified", "torch_ref"),
])
def test_routing_with_fa2_and_fa3_present(monkeypatch, triton, kwargs, with_triton,
                                          without_triton):
    monkeypatch.setenv("PORTATTN_TRITON", triton)
    decision = decide(Problem.make(**kwargs), probe(simulate="sm90+fa2+fa3"))
    assert decision.backend == (with_triton if triton == "1" else without_triton)


def test_report_lists_flash_attn_available_when_installed():
    table = backend_availability(probe(simulate="sm90+fa2"))
    assert table["flash_attn"] == {"available": True, "reasons": [],
                                   "summary": table["flash_attn"]["summary"]}
    assert table["flash_attn_gather"]["available"]
    table = backend_availability(probe(simulate="sm90"))
    assert table["flash_attn"]["reasons"] == ["flash-attn is not installed (simulated)"]


def test_fa2_reasons_name_the_gather_variant_only_where_it_helps():
    caps = probe(simulate="sm90+fa2")
    plain = FlashAttn().why_not(Problem.make(block_size=16), caps)
    assert any("flash_attn_gather serves it with a copy" in r for r in plain), plain
    sinks = FlashAttn().why_not(Problem.make(block_size=16, sinks=True), caps)
    assert not any("flash_attn_gather" in r for r in sinks), sinks
    fp32_out = FlashAttn().why_not(Problem.make(block_size=256, out_dtype="float32"), caps)
    assert fp32_out and not any("fp8" in r for r in fp32_out), fp32_out


def test_interface_variable_restricts_the_backend(monkeypatch):
    caps = probe(simulate="sm90+fa2+fa3")
    monkeypatch.setenv("PORTATTN_FLASH_ATTN_INTERFACE", "fa2")
    assert FlashAttn().plan(Problem.make(block_size=256), caps).params["interface"] == "fa2"
    reasons = FlashAttn().why_not(Problem.make(block_size=16), caps)
    assert any("FA3 (flash_attn_interface) is turned off by PORTATTN_FLASH_ATTN_INTERFACE" in r
               for r in reasons) and any("multiple of 256" in r for r in reasons), reasons
    monkeypatch.setenv("PORTATTN_FLASH_ATTN_INTERFACE", "fa3")
    assert FlashAttn().plan(Problem.make(block_size=16), caps).params["interface"] == "fa3"
    gather = FlashAttnGather().why_not(Problem.make(block_size=16), caps)
    assert any("turned off by PORTATTN_FLASH_ATTN_INTERFACE" in r for r in gather), gather
    monkeypatch.setenv("PORTATTN_FLASH_ATTN_INTERFACE", "fa5")
    with pytest.raises(InputError, match=r"^PORTATTN_FLASH_ATTN_INTERFACE: expected auto, "
                       r"fa2, fa3, fa4.*'fa5'"):
        FlashAttn().why_not(Problem.make(block_size=16), caps)


@pytest.mark.parametrize("interface,block_size", [("fa2", 256), ("fa3", 16)])
def test_packed_kv_layout_maps_through_strides(documented_flash_attn, interface, block_size):
    batch = make_paged_batch([2, 1], [300, 70], num_q_heads=4, num_kv_heads=2, head_size=32,
                             block_size=block_size, dtype=torch.float16, layout="packed")
    assert not batch.cache.key_cache.is_contiguous()  # K and V interleave in one tensor
    plan = _fa3_plan(batch) if interface == "fa3" else FlashAttn().plan(None, None)
    out, expected = _run_direct(FlashAttn(), batch, plan, sliding_window=50)
    assert relative_error(out, expected) < 2e-3
