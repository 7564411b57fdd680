"""The warp-specialized Gluon prefill (``kernels/gluon_prefill.py``) on the GPU, through the
public plan with ``PORTATTN_GLUON=1`` (forced: no silent fallback), against the float64
oracle (``portattn.testing.dense_attention``) on the values the cache holds.

Grid (block 16, where plans stage and so take the kernel): head sizes 64 / 128 / 256 x
GQA 1 / 4 / 8 x bf16 / fp16; prefill, chunked (fewer
queries than keys) and mixed batches (decodes and middle-sized prompts served by the
unified kernel beside the kernel's long prompts); lengths off every tile boundary;
non-causal; a strided q (a slice of a fused QKV tensor); bad block ids (NaN exactly for
the rows that see them); plans replayed over layers and in a CUDA graph; the auto rule
staging a layout the kernel cannot read.
"""

from __future__ import annotations

import math

import pytest
import torch

import portattn
from portattn import PagedKVCache, settings
from portattn.testing import dense_attention, make_paged_batch, relative_error

pytestmark = pytest.mark.gpu

BF16, F16 = torch.bfloat16, torch.float16
DEV = "cuda"
TOL = 1e-2


@pytest.fixture(autouse=True)
def hopper_and_forced(monkeypatch):
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon prefill is planned on sm90 only (where it was measured)")
    monkeypatch.setenv("PORTATTN_GLUON", "1")
    settings.reload()
    yield
    monkeypatch.delenv("PORTATTN_GLUON")
    settings.reload()


def _oracle(batch, q=None, causal=True, scale_kv=1.0):
    q = batch.q if q is None else q
    return dense_attention(q.cpu().double(), [k.cpu().double() * scale_kv for k in batch.keys],
                           [v.cpu().double() * scale_kv for v in batch.values],
                           batch.query_lens, causal=causal)


def _plan(batch, heads, dtype, causal=True):
    plan = portattn.plan(batch.metadata, num_q_heads=heads, dtype=dtype, cache=batch.cache,
                         causal=causal)
    params = plan.decision.plan.params
    assert params.get("gluon") and params.get("_gluon_forced"), plan.decision
    return plan


def run_case(query_lens, seq_lens, *, head_size=128, group=4, dtype=BF16, causal=True,
             num_kv_heads=2, block_size=16):
    heads = num_kv_heads * group
    batch = make_paged_batch(query_lens, seq_lens, num_q_heads=heads,
                             num_kv_heads=num_kv_heads, head_size=head_size,
                             block_size=block_size, dtype=dtype, device=DEV)
    plan = _plan(batch, heads, dtype, causal)
    out = torch.full_like(batch.q, float("nan"))
    plan.run(batch.q, batch.cache, out=out)
    err = relative_error(out, _oracle(batch, causal=causal))
    assert err < TOL, err
    return batch, plan


PREFILL = ([1100, 700], [1100, 900])             # 700 queries over 900 keys: chunked
CHUNKED = ([600], [2000])
MIXED = ([1, 1100, 1, 300, 3, 530], [900, 1500, 33, 300, 300, 1000])
CASES = {"prefill": PREFILL, "chunked": CHUNKED, "mixed": MIXED}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("head_size,group", [(64, 1), (128, 4), (256, 8), (128, 8),
                                             (64, 4), (256, 1)])
def test_heads_gqa_dtypes(head_size, group, dtype, case):
    run_case(*CASES[case], head_size=head_size, group=group, dtype=dtype)


@pytest.mark.parametrize("head_size", [64, 128, 256])
def test_non_causal(head_size):
    run_case([1030, 520], [1030, 1600], head_size=head_size, causal=False)


def test_lengths_off_every_boundary_and_many_sequences():
    lens = [513, 640, 1023, 777, 2049, 520, 1, 515]
    run_case(lens, [n + extra for n, extra in zip(lens, [0, 3, 17, 129, 0, 1000, 5, 16])])


def test_strided_q_from_a_fused_qkv_tensor():
    heads, kv_heads, head = 8, 2, 128
    batch = make_paged_batch([1200], [1500], num_q_heads=heads, num_kv_heads=kv_heads,
                             head_size=head, block_size=16, dtype=BF16, device=DEV)
    qkv = torch.randn(1200, heads + 2 * kv_heads, head, device=DEV, dtype=BF16)
    q = qkv[:, :heads]
    q.copy_(batch.q)
    plan = _plan(batch, heads, BF16)
    out = torch.full((1200, heads, head), float("nan"), device=DEV, dtype=BF16)
    plan.run(q, batch.cache, out=out)
    assert relative_error(out, _oracle(batch)) < TOL


@pytest.mark.parametrize("bad_id", [-3, 10_000])
def test_bad_block_ids_give_nan_exactly_where_seen(bad_id):
    """A bad id in block 40 of the sequence (keys 640-655): rows that see key 640 are
    NaN, the rows before it are right."""
    batch = make_paged_batch([1200], [1200], num_q_heads=8, num_kv_heads=2, head_size=128,
                             block_size=16, dtype=BF16, device=DEV)
    batch.metadata.block_table[0, 40] = bad_id
    plan = _plan(batch, 8, BF16)
    out = torch.full_like(batch.q, 7.0)
    plan.run(batch.q, batch.cache, out=out)
    expected = _oracle(batch)
    assert torch.isnan(out[640:]).all()
    assert torch.isfinite(out[:640]).all()
    assert relative_error(out[:640], expected[:640]) < TOL


def test_replayed_over_layers_and_in_a_cuda_graph():
    batch = make_paged_batch([2048, 1024], [2048, 3000], num_q_heads=32, num_kv_heads=8,
                             head_size=128, block_size=16, dtype=BF16, device=DEV)
    plan = _plan(batch, 32, BF16)
    gen = torch.Generator().manual_seed(3)
    for scale in (1.0, -0.5, 2.0):
        cache = PagedKVCache(batch.cache.key_cache * scale, batch.cache.value_cache * scale)
        q = torch.randn(batch.q.shape, generator=gen).to(DEV, BF16)
        out = torch.full_like(q, float("nan"))
        plan.run(q, cache, out=out)
        assert relative_error(out, _oracle(batch, q, scale_kv=scale)) < TOL, scale
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan.run(q, cache, out=out)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert relative_error(out, _oracle(batch, q, scale_kv=scale)) < TOL


def test_attention_call_uses_it_and_a_packed_layout_is_staged(monkeypatch):
    """``portattn.attention`` (auto) runs the kernel on split caches; a packed
    ``[num_blocks, 2, ...]`` cache cannot be seen as slot rows: staged in auto, an
    ``InputError`` naming the tensors when forced."""
    from portattn.kernels import gluon_launch

    calls = []
    original = gluon_launch.launch_gluon_prefill
    monkeypatch.setattr(gluon_launch, "launch_gluon_prefill",
                        lambda *a: (calls.append(1), original(*a))[1])
    monkeypatch.delenv("PORTATTN_GLUON")
    settings.reload()
    for layout, ran in (("split", 1), ("packed", 0)):
        calls.clear()
        batch = make_paged_batch([1100], [1300], num_q_heads=8, num_kv_heads=2,
                                 head_size=128, block_size=16, dtype=BF16, device=DEV,
                                 layout=layout)
        out = portattn.attention(batch.q, batch.cache, batch.metadata)
        assert relative_error(out, _oracle(batch)) < TOL, layout
        assert len(calls) == ran, layout
    monkeypatch.setenv("PORTATTN_GLUON", "1")
    settings.reload()
    with pytest.raises(portattn.InputError, match="Gluon"):
        portattn.attention(batch.q, batch.cache, batch.metadata)


def test_no_rows_left_unwritten_with_an_understated_max_seqlen_q():
    """The grid comes from q's rows, not from ``max_seqlen_q`` (1600 passes the host's
    check for two sequences; the first has 2500 queries)."""
    import dataclasses

    batch = make_paged_batch([2500, 500], [2500, 700], num_q_heads=8, num_kv_heads=2,
                             head_size=128, block_size=16, dtype=BF16, device=DEV)
    batch = dataclasses.replace(batch, metadata=dataclasses.replace(batch.metadata,
                                                                    max_seqlen_q=1600))
    plan = _plan(batch, 8, BF16)
    out = torch.full_like(batch.q, float("nan"))
    plan.run(batch.q, batch.cache, out=out)
    assert relative_error(out, _oracle(batch)) < TOL
    assert not math.isnan(out[2400:2500].float().sum().item())
