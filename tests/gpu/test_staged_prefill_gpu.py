"""Staged prefill on the GPU (``kernels/stage.py``): the long tiles read the keys staged
into 128-slot 16-bit blocks with descriptor loads, against the float64 oracle.

Grid: quant modes (none, fp8 per-tensor e4m3 / e5m2, int8 and fp8 per-token-head) x
bf16 / fp16 x prefill / chunked / mixed; head sizes 64 / 80 / 128 / 256 x GQA 1 / 4 / 8;
cache blocks 16 / 32 / 256; score features; bad block ids; DiffKV 192/128; staging only
the long prompts of a batch (the others read the cache); the staged loop with ONE_LOOP
(the plan's) and as three loops over features, quant modes, heads and variants; the plan's
own choice on a long
prefill, replayed over two caches and in a CUDA graph, and on a chunk beside decodes.
"""

from __future__ import annotations

import pytest
import torch

from test_kernels_quant_diffkv import QUANTS
from unified_check import GPU_FEATURE_KW, run_gpu_case

pytestmark = pytest.mark.gpu

BF16, F16 = torch.bfloat16, torch.float16
DEV = "cuda"
STAGE = 128

PREFILL = dict(query_lens=[700, 300], seq_lens=[700, 900], mode="prefill")
CHUNKED = dict(query_lens=[300, 129], seq_lens=[700, 129], mode="prefill")
MIXED = dict(query_lens=[1, 257, 1, 3, 1, 130], seq_lens=[900, 600, 33, 300, 1000, 130],
             mode="mixed", segments=4)
VARIANTS = {"prefill": PREFILL, "chunked": CHUNKED, "mixed": MIXED}
ALL_QUANTS = {"none": None, **QUANTS}


def run(variant, **kw):
    return run_gpu_case(VARIANTS[variant], **{"stage": STAGE, **kw})


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("quant", list(ALL_QUANTS))
def test_staged_quant_dtypes_variants(quant, dtype, variant):
    run(variant, quant=ALL_QUANTS[quant], dtype=dtype)


@pytest.mark.parametrize("head_size,group", [(64, 1), (80, 4), (96, 4), (128, 8), (192, 8),
                                             (256, 4)])
@pytest.mark.parametrize("quant", ["none", "fp8_tensor_e4m3", "int8_token_head"])
def test_staged_head_sizes_and_gqa(quant, head_size, group):
    run("prefill", quant=ALL_QUANTS[quant], head_size=head_size, group=group)


@pytest.mark.parametrize("block_size", [16, 32, 256])
@pytest.mark.parametrize("quant", ["none", "fp8_tensor_e5m2", "fp8_token_head"])
def test_staged_block_sizes(quant, block_size):
    run("mixed", quant=ALL_QUANTS[quant], block_size=block_size)


@pytest.mark.parametrize("feature", list(GPU_FEATURE_KW))
@pytest.mark.parametrize("quant", ["none", "fp8_tensor_e4m3", "int8_token_head"])
def test_staged_features(quant, feature):
    run("chunked", quant=ALL_QUANTS[quant], **GPU_FEATURE_KW[feature])


@pytest.mark.parametrize("feature", [None, *GPU_FEATURE_KW, "wide_window"])
@pytest.mark.parametrize("quant", ["none", "fp8_tensor_e4m3", "int8_token_head"])
def test_staged_three_loops_features(quant, feature):
    """Without ONE_LOOP (the plan's choice at head 64 only): leading edge, full and
    trailing tiles in three loops. ``wide_window``: query tiles with all three kinds of
    tiles."""
    kw = dict(sliding_window=600) if feature == "wide_window" else \
        GPU_FEATURE_KW[feature] if feature else {}
    run("chunked", quant=ALL_QUANTS[quant], one_loop=False, **kw)


def test_staged_one_loop_wide_window():
    run("chunked", sliding_window=600)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("head_size,group,dtype", [(64, 1, BF16), (128, 8, F16),
                                                   (256, 4, BF16), (80, 4, BF16)])
def test_staged_three_loops_heads(head_size, group, dtype, variant):
    run(variant, head_size=head_size, group=group, dtype=dtype, one_loop=False)


def test_staged_diffkv():
    run("prefill", head_size=192, head_size_v=128, quant=ALL_QUANTS["fp8_tensor_e4m3"])


@pytest.mark.parametrize("bad_id", [-3, 10_000])
def test_staged_bad_block_ids_give_nan_rows(bad_id):
    def corrupt(table):
        table[1, 0] = bad_id  # keys 0-15 of sequence 1: every one of its rows sees them
        return [1]

    run("chunked", block_table_edit=corrupt)


@pytest.mark.parametrize("variant", ["prefill", "mixed"])
@pytest.mark.parametrize("quant", ["none", "fp8_tensor_e4m3", "int8_token_head"])
def test_only_long_prompts_are_staged(quant, variant, monkeypatch):
    """Staged from 256 queries on (``stage["min_q"]``): 700 / 300 / 257 staged, 129 / 130
    and shorter read the cache (mixed: the decodes in the short tiles)."""
    from portattn.kernels import launch

    slots = []
    original = launch.stage_kv
    monkeypatch.setattr(launch, "stage_kv", lambda *a: (slots.append(a[6]), original(*a))[1])
    case = {"prefill": dict(PREFILL, query_lens=[700, 129, 300, 5],
                            seq_lens=[700, 500, 900, 40]),
            "mixed": MIXED}[variant]
    run_gpu_case(case, stage=STAGE, stage_min_q=256, quant=ALL_QUANTS[quant])
    assert slots == [sum(case["query_lens"]) // 256]  # staging ran, for that many slots


@pytest.fixture
def no_gluon(monkeypatch):
    """Plans stage their long prompts (not the Gluon prefill, which takes them on sm90
    where it can: tests/gpu/test_gluon_prefill_gpu.py)."""
    from portattn import settings

    monkeypatch.setenv("PORTATTN_GLUON", "0")
    settings.reload()
    yield
    monkeypatch.delenv("PORTATTN_GLUON")
    settings.reload()


@pytest.mark.parametrize("kv_quant", ["none", "fp8_per_tensor"])
def test_plan_stages_the_chunk_beside_decodes(kv_quant, no_gluon):
    """The plan's own choice for a 2048-query chunk over 4096 keys beside 63 decodes (the
    bench's mixed case, shortened): only the chunk's keys are staged, the decodes read the
    cache; against the oracle, and replayed."""
    import portattn
    from portattn import KVQuant
    from portattn.testing import dense_attention, make_paged_batch, relative_error

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("staging is planned on sm90 only (where it was measured)")
    quant = KVQuant.fp8_per_tensor(0.02, 0.03) if kv_quant != "none" else None
    query_lens, seq_lens = [2048] + [1] * 63, [4096] + [700] * 63
    batch = make_paged_batch(query_lens, seq_lens, num_q_heads=32, num_kv_heads=8,
                             head_size=128, block_size=16, dtype=BF16, device=DEV,
                             quant=quant)
    plan = portattn.plan(batch.metadata, num_q_heads=32, dtype=BF16, cache=batch.cache,
                         backend="triton_unified")  # FA4, where installed, may lead here
    assert "staged" in plan.variant, plan.decision
    expected = dense_attention(batch.q.cpu().double(), [k.cpu().double() for k in batch.keys],
                               [v.cpu().double() for v in batch.values], query_lens)
    for _ in range(3):
        out = torch.full_like(batch.q, float("nan"))
        plan.run(batch.q, batch.cache, out=out)
        assert relative_error(out.cpu().double(), expected) < 2e-2
    slot = next(iter(plan._accepted.values()))
    # replayed: staging, the decodes' short tiles (and their merge), the launch over the
    # cache for prompts under 512 queries, the staged chunk
    assert slot.reason is None and len(slot.sequence.sites) >= 4
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan.run(batch.q, batch.cache, out=out)
    out.fill_(float("nan"))
    graph.replay()
    assert relative_error(out.cpu().double(), expected) < 2e-2


def test_plan_stages_a_long_prefill_and_replays_it(no_gluon):
    """The plan's own choice for a 1 x 2048 bf16 prefill at block 16 on sm90: staged, run
    through ``portattn.plan`` over layers with distinct caches (later calls replay the
    recorded launches: staging kernel + attention) and in a CUDA graph, against the
    oracle."""
    import portattn
    from portattn import PagedKVCache
    from portattn.testing import dense_attention, make_paged_batch, relative_error

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("staging is planned on sm90 only (where it was measured)")
    batch = make_paged_batch([2048], [2048], num_q_heads=32, num_kv_heads=8, head_size=128,
                             block_size=16, dtype=BF16, device=DEV)
    plan = portattn.plan(batch.metadata, num_q_heads=32, dtype=BF16, cache=batch.cache,
                         backend="triton_unified")  # FA4, where installed, may lead here
    assert "staged" in plan.variant, plan.decision
    gen = torch.Generator().manual_seed(1)

    def layer(scale):
        cache = PagedKVCache(batch.cache.key_cache * scale, batch.cache.value_cache * scale)
        q = torch.randn(batch.q.shape, generator=gen).to(DEV, BF16)
        expected = dense_attention(q.cpu().double(),
                                   [k.cpu().double() * scale for k in batch.keys],
                                   [v.cpu().double() * scale for v in batch.values], [2048])
        return q, cache, expected

    for scale in (1.0, -0.5, 2.0):
        q, cache, expected = layer(scale)
        out = torch.full_like(q, float("nan"))
        plan.run(q, cache, out=out)
        assert relative_error(out.cpu().double(), expected) < 1e-2, scale
    slot = next(iter(plan._accepted.values()))
    assert slot.reason is None and len(slot.sequence.sites) == 2  # replayed: stage + attend
    q, cache, expected = layer(0.75)
    out = torch.full_like(q, float("nan"))
    plan.run(q, cache, out=out)  # this structure recorded, outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan.run(q, cache, out=out)
    out.fill_(float("nan"))
    graph.replay()
    assert relative_error(out.cpu().double(), expected) < 1e-2
