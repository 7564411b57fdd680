"""GPU tier: the flash_attn backend through FA3 (``flash_attn_interface``, flash-attention's
hopper/ build) against the dense float64 oracle; skipped where FA3 is not installed."""

import pytest
import torch

import portattn
from portattn.testing import dense_attention, make_paged_batch, relative_error
from portattn.types import KVQuant

pytestmark = [pytest.mark.gpu, pytest.mark.flash_attn]
pytest.importorskip("flash_attn_interface", reason="FA3 (flash_attn_interface, built from "
                    "flash-attention's hopper/) is not installed")

TOL = {torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


@pytest.fixture(autouse=True)
def _fa3_interface(monkeypatch):
    monkeypatch.setenv("PORTATTN_FLASH_ATTN_INTERFACE", "fa3")
SHAPES = {"decode": ([1] * 5, [1, 77, 300, 1024, 2500]),
          "prefill": ([300, 64, 1000], [300, 100, 1700])}


def _check_fa3_plan(batch, **options):
    decision = portattn.explain(batch.q, batch.cache, batch.metadata, backend="flash_attn",
                                **options)
    assert decision.plan.params.get("interface") == "fa3", decision.plan


@pytest.mark.parametrize("block_size", [1, 16, 256])
@pytest.mark.parametrize("head_size", [64, 128, 256])
@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("options", [{}, dict(sliding_window=97), dict(softcap=20.0),
                                     dict(causal=False)],
                         ids=["plain", "window", "softcap", "non-causal"])
def test_fa3_matches_dense(block_size, head_size, kind, options):
    dtype = torch.bfloat16 if head_size != 64 else torch.float16
    query_lens, seq_lens = SHAPES[kind]
    batch = make_paged_batch(query_lens, seq_lens, num_q_heads=8, num_kv_heads=2,
                             head_size=head_size, block_size=block_size, dtype=dtype,
                             device="cuda", seed=head_size + block_size)
    _check_fa3_plan(batch, **options)
    out = torch.full_like(batch.q, float("nan"))
    portattn.attention(batch.q, batch.cache, batch.metadata, backend="flash_attn", out=out,
                       **options)
    expected = dense_attention(batch.q, batch.keys, batch.values, query_lens, **options)
    assert relative_error(out, expected) < TOL[dtype]


@pytest.mark.parametrize("kind", list(SHAPES))
def test_fa3_fp8_q_and_kv(kind):
    query_lens, seq_lens = SHAPES[kind]
    batch = make_paged_batch(query_lens, seq_lens, num_q_heads=32, num_kv_heads=8,
                             head_size=128, block_size=16, dtype=torch.bfloat16,
                             device="cuda", quant=KVQuant.fp8_per_tensor(0.05, 0.03))
    q8 = (batch.q.float() / 0.04).to(torch.float8_e4m3fn)
    batch.q = q8
    _check_fa3_plan(batch, q_scale=0.04)
    out = portattn.attention(q8, batch.cache, batch.metadata, backend="flash_attn",
                             q_scale=0.04)
    expected = dense_attention(q8.float() * 0.04, batch.keys, batch.values, query_lens)
    assert out.dtype == torch.bfloat16 and relative_error(out, expected) < 3e-2


@pytest.mark.parametrize("sizes", [(192, 128), (136, 104)])
def test_fa3_differing_kv_head_sizes(sizes):
    batch = make_paged_batch([1, 7, 33], [500, 40, 33], num_q_heads=16, num_kv_heads=2,
                             head_size=sizes[0], head_size_v=sizes[1], block_size=16,
                             dtype=torch.bfloat16, device="cuda")
    _check_fa3_plan(batch)
    out = portattn.attention(batch.q, batch.cache, batch.metadata, backend="flash_attn")
    expected = dense_attention(batch.q, batch.keys, batch.values, batch.query_lens)
    assert out.shape[-1] == sizes[1] and relative_error(out, expected) < TOL[torch.bfloat16]
