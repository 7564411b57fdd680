"""The warp-specialized Gluon prefill (``kernels/gluon_prefill.py``) on the GPU, through the
public plan with ``PORTATTN_GLUON=1`` (forced: no silent fallback), against the float64
oracle (``portattn.testing.dense_attention``) on the values the cache holds.

Grid (block 16, where plans stage and so take the kernel): head sizes 64 / 128 / 256 x
GQA 1 / 4 / 8 x bf16 / fp16, and heads narrower than their tile (96 / 80 / 192: every
batch kind, fp16 with every score feature, 8-bit caches, a bad id, and nothing read from
a neighbouring head); prefill, chunked (fewer
queries than keys) and mixed batches (decodes and middle-sized prompts served by the
unified kernel beside the kernel's long prompts); lengths off every tile boundary;
non-causal; a strided q (a slice of a fused QKV tensor); bad block ids (NaN exactly for
the rows that see them); hundreds of decodes beside long prompts (the grid over the long
sequences' tiles); plans replayed over layers and in a CUDA graph; the auto rule
staging a layout the kernel cannot read. 8-bit caches through the staged copy (fp8
per-tensor e4m3 / e5m2, int8 and fp8 per-token-head) x prefill / chunked / mixed, heads
64 / 128 / 256, cache blocks 16 / 32 / 256, fp16 q; score features (softcap, ALiBi linear
and sqrt, sinks, non-causal, sliding windows narrower and wider than a tile, all
together) over bf16 and 8-bit caches; bad ids under a window (NaN exactly for the rows
whose window holds them, freed blocks before every window ignored); an fp8 plan replayed
with other scales.
"""

from __future__ import annotations

import dataclasses
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
    # forced: with FA4 installed, a long prefill outside FA4's measured yield goes to FA4
    plan = portattn.plan(batch.metadata, num_q_heads=heads, dtype=dtype, cache=batch.cache,
                         causal=causal, backend="triton_unified")
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
    ``[num_blocks, 2, ...]`` cache cannot be seen as slot rows: staged in auto (its plan
    says why), ``UnsupportedError`` when forced (the plan, made from the call's cache,
    knows the layout)."""
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
        decision = portattn.explain(batch.q, batch.cache, batch.metadata,
                                    backend="triton_unified")
        assert ("not evenly spaced rows" in decision.plan.params["gluon_reason"]) == \
            (ran == 0), layout
    monkeypatch.setenv("PORTATTN_GLUON", "1")
    settings.reload()
    with pytest.raises(portattn.UnsupportedError, match="Gluon"):  # (FA4 could take it)
        portattn.attention(batch.q, batch.cache, batch.metadata, backend="triton_unified")


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


def _launches(batch, plan):
    """The kernels one call of ``plan`` launches (recorded through the launch code, not a
    replay), and its output."""
    from portattn.kernels import fast_launch, launch

    body = plan._body
    out = torch.full_like(batch.q, float("nan"))
    with fast_launch.capture() as captured:
        launch.launch_unified(batch.q, batch.cache, batch.metadata, body.options, out,
                              plan.decision.plan.params)
    torch.cuda.synchronize()
    return [getattr(x.fn, "__name__", repr(x.fn)) for x in captured.launches], out


@pytest.mark.parametrize("query_lens,seq_lens,hint", [
    ([600, 600], [600, 900], 600),
    ([1000, 1000, 8], [1000, 1200, 50], 700),  # understated: the 8 queries go to the kernel
])
def test_a_batch_with_no_short_sequence_is_one_launch(query_lens, seq_lens, hint):
    """Where the tokens and ``max_seqlen_q`` leave no sequence short of the kernel's share,
    the kernel alone serves the call, every sequence (an understated hint included)."""
    batch = make_paged_batch(query_lens, seq_lens, num_q_heads=8, num_kv_heads=2,
                             head_size=128, block_size=16, dtype=BF16, device=DEV)
    batch = dataclasses.replace(batch, metadata=dataclasses.replace(batch.metadata,
                                                                    max_seqlen_q=hint))
    plan = _plan(batch, 8, BF16)
    names, out = _launches(batch, plan)
    assert names == ["gluon_prefill_kernel"], names
    assert relative_error(out, _oracle(batch)) < TOL
    out = torch.full_like(batch.q, float("nan"))
    plan.run(batch.q, batch.cache, out=out)
    assert relative_error(out, _oracle(batch)) < TOL


@pytest.mark.parametrize("query_lens,seq_lens", [
    ([1] * 150 + [700] + [3] * 100 + [600], [40] * 150 + [900] + [70] * 100 + [600]),
    ([1, 2, 1, 1300, 1] + [4] * 130, [500, 30, 17, 1300, 1] + [300] * 130),
])
def test_many_short_sequences_beside_long_ones(query_lens, seq_lens):
    """The kernel's grid over the long sequences' tiles only (``LONG_TILES``: more than
    one chunk of 128 sequences in its prefix sum); every row against the oracle."""
    run_case(query_lens, seq_lens, num_kv_heads=2, group=4)


def test_a_mixed_batch_still_reads_the_cache_beside_the_kernel():
    batch = make_paged_batch(*MIXED, num_q_heads=8, num_kv_heads=2, head_size=128,
                             block_size=16, dtype=BF16, device=DEV)
    plan = _plan(batch, 8, BF16)
    names, out = _launches(batch, plan)
    assert names[0] == "gluon_prefill_kernel" and len(names) > 1, names
    assert relative_error(out, _oracle(batch)) < TOL


# ------------------------------------------ 8-bit caches (staged copy) and score features
# Through check_unified (tests/unified_check.py): a staged plan whose long sequences go to
# the kernel, forced (a refusal raises), against the float64 oracle on the values the
# cache holds (codes x scales, read from the cache by the test itself).

def _gluon_case(case, **kw):
    from unified_check import run_gpu_case

    return run_gpu_case(case, **{"stage": 128, "gluon": True, **kw})


G_PREFILL = dict(query_lens=[700, 300], seq_lens=[700, 900], mode="prefill")
G_CHUNKED = dict(query_lens=[300, 129], seq_lens=[1000, 129], mode="prefill")
G_MIXED = dict(query_lens=[1, 257, 1, 3, 1, 130], seq_lens=[900, 600, 33, 300, 1000, 130],
               mode="mixed", segments=4, stage_min_q=64)
G_VARIANTS = {"prefill": G_PREFILL, "chunked": G_CHUNKED, "mixed": G_MIXED}


def _quants():
    from test_kernels_quant_diffkv import QUANTS

    return QUANTS


QUANT_NAMES = ["fp8_tensor_e4m3", "fp8_tensor_e5m2", "int8_token_head", "fp8_token_head"]


@pytest.mark.parametrize("variant", list(G_VARIANTS))
@pytest.mark.parametrize("quant", QUANT_NAMES)
def test_8bit_caches_through_the_staged_copy(quant, variant):
    _gluon_case(G_VARIANTS[variant], quant=_quants()[quant])


@pytest.mark.parametrize("head_size,group", [(64, 1), (256, 8), (128, 8)])
@pytest.mark.parametrize("quant", ["fp8_tensor_e4m3", "int8_token_head"])
def test_8bit_caches_head_sizes_and_gqa(quant, head_size, group):
    _gluon_case(G_PREFILL, quant=_quants()[quant], head_size=head_size, group=group)


@pytest.mark.parametrize("block_size", [16, 32, 256])
def test_8bit_cache_block_sizes(block_size):
    _gluon_case(G_MIXED, quant=_quants()["fp8_tensor_e5m2"], block_size=block_size)


def test_fp8_per_tensor_with_fp16_q():
    _gluon_case(G_CHUNKED, quant=_quants()["fp8_tensor_e4m3"], dtype=F16)


def test_per_token_head_with_fp16_q_is_refused_when_forced():
    """fp16 q: the staged codes keep per-key scales, which the kernel lacks: forced, the
    launch raises rather than computing without them."""
    with pytest.raises(ValueError, match="per-tensor scales only"):
        _gluon_case(G_PREFILL, quant=_quants()["int8_token_head"], dtype=F16)


FEATURES = {"softcap": dict(softcap=30.0), "large_softcap": dict(softcap=1e8),
            "alibi": dict(alibi="linear"),
            "alibi_sqrt": dict(alibi="sqrt"), "sinks": dict(sinks=True),
            "non_causal": dict(causal=False), "window": dict(sliding_window=100),
            "wide_window": dict(sliding_window=700),
            "window_non_causal": dict(sliding_window=150, causal=False),
            "all": dict(sliding_window=77, softcap=20.0, alibi="linear", sinks=True)}


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("quant", ["none", "fp8_tensor_e4m3", "int8_token_head"])
def test_score_features(quant, feature):
    q = None if quant == "none" else _quants()[quant]
    _gluon_case(G_CHUNKED, quant=q, **FEATURES[feature])


@pytest.mark.parametrize("head_size", [64, 256])
def test_score_features_other_heads_fp16(head_size):
    _gluon_case(G_PREFILL, head_size=head_size, dtype=F16, **FEATURES["all"])


@pytest.mark.parametrize("bad_id", [-3, 10_000])
@pytest.mark.parametrize("quant", ["none", "fp8_tensor_e4m3"])
def test_bad_block_ids_give_nan_rows(quant, bad_id):
    def corrupt(table):
        table[1, 0] = bad_id  # keys 0-15 of sequence 1: every one of its rows sees them
        return [1]
    q = None if quant == "none" else _quants()[quant]
    _gluon_case(G_CHUNKED, quant=q, block_table_edit=corrupt)


# ------------------- head sizes below their tile's width (96 / 80 in 128, 192 in 256)
# The kernel's rank-3 descriptors stop at the head: TMA fills the tile's other columns
# with zeros.

PADDED_HEADS = [(96, 4), (80, 1), (192, 8)]


@pytest.mark.parametrize("variant", list(G_VARIANTS))
@pytest.mark.parametrize("head_size,group", PADDED_HEADS)
def test_padded_heads(head_size, group, variant):
    _gluon_case(G_VARIANTS[variant], head_size=head_size, group=group)


@pytest.mark.parametrize("head_size", [96, 192])
def test_padded_heads_fp16_with_every_score_feature(head_size):
    _gluon_case(G_PREFILL, head_size=head_size, dtype=F16, **FEATURES["all"])


@pytest.mark.parametrize("head_size", [96, 192])
@pytest.mark.parametrize("quant", ["fp8_tensor_e4m3", "int8_token_head"])
def test_padded_head_over_8bit_caches(quant, head_size):
    """At 192 a 64-key tile is a slice of a 128-slot staged block."""
    _gluon_case(G_MIXED, quant=_quants()[quant], head_size=head_size)


def test_padded_head_writes_no_column_past_the_head():
    """out is [..., :96] of a wider tensor: the 32 columns after each head stay NaN."""
    _gluon_case(G_PREFILL, head_size=96, strided_out="pad")


def test_padded_head_over_a_cache_whose_head_stride_is_wider():
    """Caches [..., :96] of 104-wide heads: the rank-3 descriptors' head stride is 104."""
    batch = make_paged_batch([1100, 600], [1100, 900], num_q_heads=8, num_kv_heads=2,
                             head_size=96, block_size=16, dtype=BF16, device=DEV)
    wide = [torch.full(c.shape[:3] + (104,), float("nan"), device=DEV, dtype=BF16)
            for c in (batch.cache.key_cache, batch.cache.value_cache)]
    for w, c in zip(wide, (batch.cache.key_cache, batch.cache.value_cache)):
        w[..., :96].copy_(c)
    cache = PagedKVCache(wide[0][..., :96], wide[1][..., :96])
    plan = _plan(batch, 8, BF16)
    out = torch.full_like(batch.q, float("nan"))
    plan.run(batch.q, cache, out=out)
    assert relative_error(out, _oracle(batch)) < TOL


def test_padded_head_with_a_bad_block_id():
    def corrupt(table):
        table[1, 0] = -3
        return [1]
    _gluon_case(G_CHUNKED, head_size=96, block_table_edit=corrupt)


def test_a_padded_head_reads_nothing_of_its_neighbours():
    """Head 96 through the public plan, q a slice of a fused QKV tensor: q head 1, the K
    and V parts after q's last head, and kv head 1 of the caches are NaN. A box that
    reached past its head would bring them into q heads 0, 2 and 3, which must be exact."""
    heads, kv_heads, head = 8, 2, 96
    batch = make_paged_batch([1100, 600], [1100, 900], num_q_heads=heads,
                             num_kv_heads=kv_heads, head_size=head, block_size=16,
                             dtype=BF16, device=DEV)
    expected = _oracle(batch)
    qkv = torch.full((1700, heads + 2 * kv_heads, head), float("nan"), device=DEV,
                     dtype=BF16)
    q = qkv[:, :heads]
    q.copy_(batch.q)
    q[:, 1] = float("nan")
    batch.cache.key_cache[:, :, 1] = float("nan")
    batch.cache.value_cache[:, :, 1] = float("nan")
    plan = _plan(batch, heads, BF16)
    out = torch.full((1700, heads, head), 7.0, device=DEV, dtype=BF16)
    plan.run(q, batch.cache, out=out)
    for h in (0, 2, 3):
        assert relative_error(out[:, h], expected[:, h]) < TOL, h
    assert torch.isnan(out[:, 4:]).all()  # kv head 1 is NaN


def test_fp8_plan_reads_the_staged_copy_and_replays(monkeypatch):
    """The public plan on an fp8 cache: the kernel over the staged copy (forced here;
    auto takes it where measured), replayed over two caches with different scales."""
    from portattn import KVQuant
    from portattn.kernels import gluon_launch

    calls = []
    original = gluon_launch.launch_gluon_prefill
    monkeypatch.setattr(gluon_launch, "launch_gluon_prefill",
                        lambda *a: (calls.append(type(a[1]).__name__), original(*a))[1])
    batch = make_paged_batch([1500, 600], [1500, 1000], num_q_heads=16, num_kv_heads=4,
                             head_size=128, block_size=16, dtype=BF16, device=DEV,
                             quant=KVQuant.fp8_per_tensor(0.02, 0.03))
    plan = _plan(batch, 16, BF16)
    assert plan.decision.plan.params["gluon"]["reads"] == "staged"
    codes_k = batch.cache.key_cache.float()
    codes_v = batch.cache.value_cache.float()
    for k_scale, v_scale in ((0.02, 0.03), (0.5, 0.004)):
        cache = PagedKVCache(batch.cache.key_cache, batch.cache.value_cache,
                             KVQuant.fp8_per_tensor(k_scale, v_scale))
        out = torch.full_like(batch.q, float("nan"))
        plan.run(batch.q, cache, out=out)
        keys, values = [], []
        for b, n in enumerate(batch.seq_lens):
            blocks = batch.metadata.block_table[b, :(n + 15) // 16].long()
            keys.append(codes_k[blocks].reshape(-1, 4, 128)[:n].cpu().double() * k_scale)
            values.append(codes_v[blocks].reshape(-1, 4, 128)[:n].cpu().double() * v_scale)
        expected = dense_attention(batch.q.cpu().double(), keys, values, batch.query_lens)
        assert relative_error(out, expected) < TOL, (k_scale, v_scale)
    assert calls == ["StagedCache", "StagedCache"]


def _window_batch(query_lens, seq_lens, window):
    """A bf16 batch (8 / 2 heads of 128, block 16) and its float64 oracle with a window,
    from the values the cache holds (before any test corrupts it)."""
    batch = make_paged_batch(query_lens, seq_lens, num_q_heads=8, num_kv_heads=2,
                             head_size=128, block_size=16, dtype=BF16, device=DEV)
    expected = dense_attention(batch.q.cpu().double(), [k.cpu().double() for k in batch.keys],
                               [v.cpu().double() for v in batch.values], batch.query_lens,
                               sliding_window=window)
    return batch, expected


def _window_run(batch, table, window):
    meta = dataclasses.replace(batch.metadata, block_table=table)
    plan = portattn.plan(meta, num_q_heads=8, dtype=BF16, cache=batch.cache,
                         sliding_window=window, backend="triton_unified")
    assert plan.decision.plan.params.get("gluon"), plan.decision
    out = torch.full_like(batch.q, 7.0)
    plan.run(batch.q, batch.cache, out=out)
    return out.cpu()


@pytest.mark.parametrize("bad_id", [-1, 10_000])
def test_a_window_sees_bad_ids_only_where_they_fall_inside_it(bad_id):
    """Window 100 over 1200 keys (query position p sees keys p-99..p). A bad id in block
    5 (keys 80-95) NaNs exactly the rows whose window holds one of them (80-194). Blocks
    0-3 freed (keys 0-63): rows 0-162 see them (NaN), rows from 163 on are right (tiles
    from 256 on do not even read them)."""
    window = 100
    batch, expected = _window_batch([1200], [1200], window)
    for bad_blocks, seen in ((slice(5, 6), slice(80, 195)), (slice(0, 4), slice(0, 163))):
        table = batch.metadata.block_table.clone()
        table[0, bad_blocks] = bad_id
        out = _window_run(batch, table, window)
        nan_rows = torch.zeros(1200, dtype=torch.bool)
        nan_rows[seen] = True
        assert torch.isnan(out[nan_rows]).all(), bad_blocks
        assert relative_error(out[~nan_rows], expected[~nan_rows]) < TOL, bad_blocks


def test_freed_blocks_before_every_window_are_ignored():
    """Window 45, 1100 queries over 1900 keys: the first query (position 800) sees keys
    756-800, so blocks 0-46 (keys 0-751) are before every window. The program of the
    first query tile still loads keys 640-767 (its first key tile): blocks 0-46 hold NaN
    here and blocks 0-20 are freed (-1); every row must come out right."""
    window = 45
    batch, expected = _window_batch([1100], [1900], window)
    table = batch.metadata.block_table.clone()
    before = table[0, :47].long()
    batch.cache.key_cache[before] = float("nan")
    batch.cache.value_cache[before] = float("nan")
    table[0, :21] = -1
    out = _window_run(batch, table, window)
    assert torch.isfinite(out).all()
    assert relative_error(out, expected) < TOL
