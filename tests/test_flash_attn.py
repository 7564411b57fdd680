"""The flash-attn backends on a CPU: reasons, routing with flash-attn present (simulated),
the page gather, and the argument mapping against a stand-in written from flash-attn's
documented semantics (the GPU tier checks the real library)."""

import math
import sys
import types

import pytest
import torch

from portattn.backends.flash_attn import FlashAttn, FlashAttnGather, gather_pages
from portattn.capabilities import probe
from portattn.dispatch import Problem, decide
from portattn.dispatch.routing import backend_availability
from portattn.options import normalize_options
from portattn.testing import dense_attention, make_paged_batch, relative_error


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


# ----------------------------------------------------- argument mapping, with a stand-in


def _documented_flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, dropout_p=0.0, softmax_scale=None,
                                  causal=False, window_size=(-1, -1), softcap=0.0,
                                  alibi_slopes=None, deterministic=False,
                                  return_attn_probs=False, block_table=None):
    """flash-attn 2's documented semantics: bottom-right causal; keys in
    [i + sk - sq - left, i + sk - sq + right] (-1 = unbounded); ALiBi bias
    -slope * |i + sk - sq - j|; softcap on the scaled score; paged k/v via block_table."""
    assert block_table is not None and block_table.dtype == torch.int32
    assert cu_seqlens_k.dtype == torch.int32
    out = torch.empty_like(q)
    page = k.shape[1]
    for b in range(cu_seqlens_q.shape[0] - 1):
        q0, q1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        sk = int(cu_seqlens_k[b + 1] - cu_seqlens_k[b])
        sq = q1 - q0
        assert sq <= max_seqlen_q and sk <= max_seqlen_k
        pages = block_table[b, : -(-sk // page)].long()
        kk = k[pages].reshape(-1, *k.shape[2:])[:sk].float()
        vv = v[pages].reshape(-1, *v.shape[2:])[:sk].float()
        group = q.shape[1] // k.shape[2]
        kk, vv = kk.repeat_interleave(group, 1), vv.repeat_interleave(group, 1)
        s = torch.einsum("qhd,khd->hqk", q[q0:q1].float(), kk) * softmax_scale
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
        out[q0:q1] = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), vv).to(q.dtype)
    return out


@pytest.fixture
def documented_flash_attn(monkeypatch):
    module = types.ModuleType("flash_attn")
    module.flash_attn_varlen_func = _documented_flash_attn_varlen
    monkeypatch.setitem(sys.modules, "flash_attn", module)


@pytest.mark.parametrize("backend_cls,block_size", [(FlashAttn, 256), (FlashAttnGather, 16),
                                                    (FlashAttnGather, 64)])
@pytest.mark.parametrize("options", [
    dict(), dict(sliding_window=7), dict(softcap=2.0), dict(alibi_slopes="rand"),
    dict(causal=False), dict(causal=False, sliding_window=5),
    dict(sliding_window=40, softcap=3.0, alibi_slopes="rand", scale=0.2)],
    ids=["plain", "window", "softcap", "alibi", "non-causal", "non-causal-window", "all"])
def test_argument_mapping_matches_our_semantics(documented_flash_attn, backend_cls,
                                                block_size, options):
    batch = make_paged_batch([3, 1, 20], [300, 41, 20], num_q_heads=6, num_kv_heads=2,
                             head_size=32, block_size=block_size, dtype=torch.float16)
    if options.get("alibi_slopes") == "rand":
        options = dict(options, alibi_slopes=torch.rand(6))
    opts = normalize_options(batch.q, batch.cache, **options)
    out = torch.full_like(batch.q, float("nan"))
    backend = backend_cls()
    backend.run(batch.q, batch.cache, batch.metadata, opts, out,
                backend.plan(None, None))
    expected = dense_attention(batch.q, batch.keys, batch.values, batch.query_lens, **options)
    assert relative_error(out, expected) < 2e-3


def test_report_lists_flash_attn_available_when_installed():
    table = backend_availability(probe(simulate="sm90+fa2"))
    assert table["flash_attn"] == {"available": True, "reasons": [],
                                   "summary": table["flash_attn"]["summary"]}
    assert table["flash_attn_gather"]["available"]
    table = backend_availability(probe(simulate="sm90"))
    assert table["flash_attn"]["reasons"] == ["flash-attn is not installed (simulated)"]
