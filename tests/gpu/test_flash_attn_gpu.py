"""GPU tier: the flash_attn backends through FA2 against the dense float64 oracle, with the
real flash-attn library (skipped where it is not installed)."""


import pytest
import torch

import portattn
from graph_replay import check_graph_replay_without_syncs
from portattn.testing import dense_attention, make_paged_batch, relative_error

pytestmark = [pytest.mark.gpu, pytest.mark.flash_attn]
flash_attn = pytest.importorskip("flash_attn")
if not hasattr(flash_attn, "flash_attn_varlen_func"):  # e.g. only FA4's flash_attn.cute
    pytest.skip("FA2 is not installed: flash_attn has no flash_attn_varlen_func (with only "
                "flash-attn-4 installed, flash_attn is FA4's namespace package; "
                "tests/gpu/test_flash_attn4_gpu.py tests FA4)", allow_module_level=True)

TOL = {torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


@pytest.fixture(autouse=True)
def _fa2_interface(monkeypatch):
    """This file tests FA2 (and its gather variant) even where FA3 is installed."""
    monkeypatch.setenv("PORTATTN_FLASH_ATTN_INTERFACE", "fa2")
SHAPES = {  # (query_lens, seq_lens)
    "decode": ([1] * 5, [1, 77, 300, 1024, 2500]),
    "prefill": ([300, 64, 1000], [300, 100, 1700]),
}


def _options(name, num_q_heads):
    g = torch.Generator(device="cpu").manual_seed(3)
    return {
        "plain": {},
        "window": dict(sliding_window=97),
        "softcap": dict(softcap=20.0),
        "alibi": dict(alibi_slopes=torch.rand(num_q_heads, generator=g).cuda()),
        "non-causal": dict(causal=False),
    }[name]


@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("head_size", [64, 128, 256])
@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("feature", ["plain", "window", "softcap", "alibi", "non-causal"])
def test_flash_attn_matches_dense(block_size, head_size, kind, feature):
    heads = (8, 2) if head_size != 128 else (32, 8)
    dtype = torch.bfloat16 if (head_size + block_size) % 3 else torch.float16
    query_lens, seq_lens = SHAPES[kind]
    batch = make_paged_batch(query_lens, seq_lens, num_q_heads=heads[0], num_kv_heads=heads[1],
                             head_size=head_size, block_size=block_size, dtype=dtype,
                             device="cuda", seed=head_size + block_size)
    options = _options(feature, heads[0])
    backend = "flash_attn" if block_size % 256 == 0 else "flash_attn_gather"
    out = torch.full_like(batch.q, float("nan"))
    portattn.attention(batch.q, batch.cache, batch.metadata, backend=backend, out=out,
                       **options)
    expected = dense_attention(batch.q, batch.keys, batch.values, query_lens, **options)
    assert relative_error(out, expected) < TOL[dtype]


@pytest.mark.parametrize("gqa", [(8, 8), (12, 4), (10, 2), (16, 1)])
def test_flash_attn_gqa_ratios(gqa):
    batch = make_paged_batch([1, 7, 33], [500, 40, 33], num_q_heads=gqa[0],
                             num_kv_heads=gqa[1], head_size=128, block_size=256,
                             dtype=torch.bfloat16, device="cuda")
    out = portattn.attention(batch.q, batch.cache, batch.metadata, backend="flash_attn")
    expected = dense_attention(batch.q, batch.keys, batch.values, batch.query_lens)
    assert relative_error(out, expected) < TOL[torch.bfloat16]


def test_auto_routing_takes_flash_attn_when_triton_is_off(monkeypatch):
    monkeypatch.setenv("PORTATTN_TRITON", "0")
    batch = make_paged_batch([1, 1], [100, 900], num_q_heads=8, num_kv_heads=2,
                             head_size=128, block_size=256, dtype=torch.float16,
                             device="cuda")
    portattn.capabilities.clear_cache()
    decision = portattn.explain(batch.q, batch.cache, batch.metadata)
    assert decision.backend == "flash_attn"
    portattn.capabilities.clear_cache()


@pytest.mark.parametrize("backend,block_size", [("flash_attn", 256), ("flash_attn_gather", 16)])
@pytest.mark.parametrize("query_len", [1, 3])  # FA2's with_kvcache path, then varlen
def test_flash_attn_in_a_cuda_graph_without_syncs(backend, block_size, query_len):
    seq_lens = [300, 1000, 64, 2000]
    batch = make_paged_batch([query_len] * 4, [n + 4 for n in seq_lens], num_q_heads=8,
                             num_kv_heads=2, head_size=128, block_size=block_size,
                             dtype=torch.bfloat16, device="cuda", seed=5)
    check_graph_replay_without_syncs(batch, seq_lens, query_len, backend, steps=2,
                                     tolerance=TOL[torch.bfloat16])


@pytest.mark.parametrize("backend,block_size", [("flash_attn", 256), ("flash_attn_gather", 16)])
def test_sequences_without_queries_in_a_decode_batch(backend, block_size):
    # max query length 1 but not one query per sequence: FA2's varlen call, GQA heads
    batch = make_paged_batch([1, 0, 1], [300, 0, 41], num_q_heads=6, num_kv_heads=2,
                             head_size=64, block_size=block_size, dtype=torch.float16,
                             device="cuda")
    out = portattn.attention(batch.q, batch.cache, batch.metadata, backend=backend)
    expected = dense_attention(batch.q, batch.keys, batch.values, batch.query_lens)
    assert relative_error(out, expected) < TOL[torch.float16]
