"""The torch_ref backend against the independent dense float64 formulation.

Every feature alone and in combination, every quant mode and cache layout, GQA/MQA,
rows with no visible key, fp8 query and fp8 output. Runs through the public
``portattn.attention`` with ``backend="torch_ref"``.
"""

import itertools
import math

import pytest
import torch

import portattn
from portattn import KVQuant
from portattn.testing import dense_attention, make_paged_batch, relative_error

QUERY_LENS = [5, 1, 7, 1, 2]
SEQ_LENS = [40, 17, 7, 1, 33]


def _batch(**kw):
    kw.setdefault("num_q_heads", 6)
    kw.setdefault("num_kv_heads", 2)
    kw.setdefault("head_size", 40)
    kw.setdefault("dtype", torch.float32)
    return make_paged_batch(kw.pop("query_lens", QUERY_LENS), kw.pop("seq_lens", SEQ_LENS),
                            **kw)


def _check(batch, tol=1e-5, **options):
    out = portattn.attention(batch.q, batch.cache, batch.metadata, backend="torch_ref",
                             **options)
    expected = dense_attention(batch.q, batch.keys, batch.values, batch.query_lens, **options)
    err = relative_error(out, expected)
    assert err < tol, f"relative error {err:.3e} >= {tol:.0e} for {options}"
    return out, expected


def _feature_options(num_q_heads):
    g = torch.Generator().manual_seed(11)
    return {
        "non_causal": dict(causal=False),
        "window": dict(sliding_window=6),
        "window_1": dict(sliding_window=1),
        "softcap": dict(softcap=1.5),
        "alibi": dict(alibi_slopes=torch.rand(num_q_heads, generator=g)),
        "alibi_sqrt": dict(alibi_slopes=torch.rand(num_q_heads, generator=g), alibi_sqrt=True),
        "sinks": dict(sinks=torch.randn(num_q_heads, generator=g) * 2),
        "scale": dict(scale=0.3),
    }


FEATURES = list(_feature_options(6))


@pytest.mark.parametrize("feature", FEATURES)
def test_each_feature(feature):
    _check(_batch(), **_feature_options(6)[feature])


@pytest.mark.parametrize("pair", list(itertools.combinations(
    ["window", "softcap", "alibi", "sinks", "non_causal"], 2)))
def test_feature_pairs(pair):
    opts = {}
    for name in pair:
        opts.update(_feature_options(6)[name])
    _check(_batch(seed=3), **opts)


def test_all_features_together():
    opts = {}
    for name in ("window", "softcap", "alibi_sqrt", "sinks", "scale"):
        opts.update(_feature_options(6)[name])
    _check(_batch(seed=4), **opts)


@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (5, 1), (8, 2), (6, 3)])
def test_gqa_and_mqa_ratios(heads):
    num_q, num_kv = heads
    _check(_batch(num_q_heads=num_q, num_kv_heads=num_kv, seed=5))


@pytest.mark.parametrize("layout", ["split", "packed"])
@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_layouts_and_block_sizes(layout, block_size):
    _check(_batch(layout=layout, block_size=block_size, seed=6))


def test_diffkv_packed_cache():
    batch = _batch(head_size=48, head_size_v=32, seed=7)
    assert batch.cache.packed and batch.cache.head_size_v == 32
    out, _ = _check(batch)
    assert out.shape == (sum(QUERY_LENS), 6, 32)


@pytest.mark.parametrize("quant", [
    KVQuant.fp8_per_tensor(0.05, 0.03), KVQuant.fp8_per_tensor(0.05, 0.03, torch.float8_e5m2),
    KVQuant.int8_per_token_head(), KVQuant.fp8_per_token_head(),
    KVQuant.fp8_per_token_head(torch.float8_e5m2)], ids=lambda q: q.key)
def test_quantized_caches_dequantize(quant):
    # dense_attention sees the dequantized values the cache holds: only fp32 rounding remains
    _check(_batch(quant=quant, seed=8), **_feature_options(6)["sinks"])


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_half_precision_inputs(dtype, tol):
    _check(_batch(dtype=dtype, seed=9), tol=tol)


def test_zero_length_sequences_in_the_batch():
    # Under causal semantics every query sees at least its own key, so a row can only be
    # empty when its sequence is: a sequence with no queries and no keys sits in the
    # middle of the batch, contributes no rows and does not disturb its neighbours.
    batch = _batch(query_lens=[3, 0, 2], seq_lens=[5, 0, 9], seed=12)
    out, _ = _check(batch, sinks=torch.randn(6))
    assert out.shape[0] == 5 and torch.isfinite(out).all()


def test_fp8_output_and_fp8_query():
    batch = _batch(seed=13)
    out = portattn.attention(batch.q, batch.cache, batch.metadata, backend="torch_ref",
                             output_scale=0.01)
    assert out.dtype == torch.float8_e4m3fn
    expected = dense_attention(batch.q, batch.keys, batch.values, batch.query_lens)
    expected = (expected / 0.01).clamp(-448, 448)
    assert relative_error(out.float(), expected) < 0.07
    q8 = (batch.q / 0.05).to(torch.float8_e4m3fn)
    out = portattn.attention(q8, batch.cache, batch.metadata, backend="torch_ref",
                             q_scale=0.05)
    assert out.dtype == torch.bfloat16
    expected = dense_attention(q8.float() * 0.05, batch.keys, batch.values, batch.query_lens)
    assert relative_error(out, expected) < 1e-2


def test_writes_into_strided_out_and_reads_strided_q():
    batch = _batch(seed=14)
    t, h, d = batch.q.shape
    fused = torch.randn(t, 3 * h, d)  # a fused QKV projection: q is a strided slice
    fused[:, :h] = batch.q
    q = fused[:, :h]
    assert not q.is_contiguous()
    big = torch.full((t, h, 2 * d), float("nan"))
    out = big[..., :d]
    portattn.attention(q, batch.cache, batch.metadata, backend="torch_ref", out=out)
    expected = dense_attention(batch.q, batch.keys, batch.values, batch.query_lens)
    assert relative_error(out, expected) < 1e-5
    assert torch.isnan(big[..., d:]).all()  # nothing written outside out


def test_long_batch_is_fast_enough():
    # 16 sequences over a few thousand keys, prefills and decodes mixed: seconds, not
    # minutes (a generous host-time sanity bound, not a benchmark). The last queries of
    # every sequence (the rows that see the most keys) are checked against the oracle.
    import time

    query_lens = [512, 256] + [1] * 14
    seq_lens = [3000, 2048] + [2500] * 14
    batch = make_paged_batch(query_lens, seq_lens, num_q_heads=16, num_kv_heads=4,
                             head_size=64, dtype=torch.float32)
    start = time.perf_counter()
    out = portattn.attention(batch.q, batch.cache, batch.metadata, backend="torch_ref")
    assert time.perf_counter() - start < 30
    tails = [min(n, 4) for n in query_lens]  # the last queries keep their positions
    ends = batch.metadata.cu_seqlens_q[1:].tolist()
    rows = [r for end, n in zip(ends, tails) for r in range(end - n, end)]
    expected = dense_attention(batch.q[rows], batch.keys, batch.values, tails)
    assert relative_error(out[rows], expected) < 1e-5


def test_scale_default_is_inverse_sqrt_head_size():
    batch = _batch(seed=15)
    a = portattn.attention(batch.q, batch.cache, batch.metadata, backend="torch_ref")
    b = portattn.attention(batch.q, batch.cache, batch.metadata, backend="torch_ref",
                           scale=1 / math.sqrt(40))
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- unchecked metadata
def _unchecked(batch, metadata, **options):
    out = torch.full_like(batch.q, math.nan)
    portattn.attention(batch.q, batch.cache, metadata, backend="torch_ref", validate=False,
                       out=out, **options)
    return out


def _with_table(batch, table, seq_lens=None):
    md = batch.metadata
    return portattn.AttentionMetadata(md.cu_seqlens_q, md.seq_lens if seq_lens is None
                                      else seq_lens, table, md.max_seqlen_q, md.max_seqlen_k)


@pytest.mark.parametrize("bad_id", [-1, -7, 10_000])
def test_unchecked_bad_block_ids_spoil_exactly_the_rows_that_see_them(bad_id):
    """With ``validate=False`` a block id outside the cache is never read: the rows whose
    visible keys include that block's are NaN (as the Triton kernels give them), the rest
    match the float64 oracle. Window 8, 16-key blocks. Sequence 0 (40 keys, queries at
    35..39) sees keys 28..39: its block 0 is seen by no row, its block 1 (16..31) by the
    queries at 35..38 only. Sequence 4 (33 keys, queries at 31 and 32, tokens 14 and 15):
    its block 2 (key 32) is seen by the second query only."""
    batch = _batch(block_size=16, poison=False)
    expected = dense_attention(batch.q, batch.keys, batch.values, batch.query_lens,
                               sliding_window=8)
    table = batch.metadata.block_table.clone()
    table[0, 0] = bad_id
    table[4, 2] = bad_id
    nan_rows = torch.zeros(batch.q.shape[0], dtype=torch.bool)
    nan_rows[15] = True
    for more in (None, (0, 1)):
        if more is not None:
            table[more] = bad_id
            nan_rows[0:4] = True
        out = _unchecked(batch, _with_table(batch, table), sliding_window=8)
        assert torch.isnan(out[nan_rows]).all()
        assert relative_error(out[~nan_rows], expected[~nan_rows]) < 1e-5


def test_unchecked_lengths_past_the_table_give_nan_rows_not_errors():
    """``seq_lens`` past the block table's capacity (or negative), and a ``cu_seqlens_q``
    that runs past q, do not raise from inside PyTorch: the sequence's rows are NaN, the
    other sequences' rows are right. A sequence with no key gives zeros."""
    batch = _batch(poison=False)
    expected = dense_attention(batch.q, batch.keys, batch.values, batch.query_lens)
    capacity = batch.metadata.block_table.shape[1] * batch.cache.block_size
    for bad_len in (capacity + 1, -3):
        seq_lens = batch.metadata.seq_lens.clone()
        seq_lens[2] = bad_len  # sequence 2: tokens 6..12
        out = _unchecked(batch, _with_table(batch, batch.metadata.block_table, seq_lens))
        assert torch.isnan(out[6:13]).all()
        keep = torch.ones(batch.q.shape[0], dtype=torch.bool)
        keep[6:13] = False
        assert relative_error(out[keep], expected[keep]) < 1e-5
    md = batch.metadata
    cu = md.cu_seqlens_q.clone()
    cu[-1] = cu[-1] + 5  # the last sequence's queries run past q
    out = _unchecked(batch, portattn.AttentionMetadata(cu, md.seq_lens, md.block_table,
                                                       md.max_seqlen_q + 5, md.max_seqlen_k))
    last = cu[-2]
    assert torch.isnan(out[last:]).all()  # clipped: its positions would be wrong
    assert relative_error(out[:last], expected[:last]) < 1e-5
    seq_lens = md.seq_lens.clone()
    seq_lens[1] = 0  # one query, no key at all (below its query length): no visible key
    out = _unchecked(batch, _with_table(batch, md.block_table, seq_lens))
    assert (out[5] == 0).all()
    keep = torch.ones(batch.q.shape[0], dtype=torch.bool)
    keep[5] = False
    assert relative_error(out[keep], expected[keep]) < 1e-5


def test_a_nan_sink_gives_nan_rows():
    """A NaN sink logit is in every row's denominator of its head: those rows are NaN
    (never an unnormalized sum); the other heads are unaffected."""
    batch = _batch(num_q_heads=4, num_kv_heads=2)
    sinks = torch.randn(4)
    expected = dense_attention(batch.q, batch.keys, batch.values, batch.query_lens,
                               sinks=sinks)
    sinks[1] = math.nan
    out = portattn.attention(batch.q, batch.cache, batch.metadata, backend="torch_ref",
                             sinks=sinks)
    assert torch.isnan(out[:, 1]).all()
    others = [0, 2, 3]
    assert relative_error(out[:, others], expected[:, others]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.int8,
                                   torch.bfloat16])
def test_take_blocks_gathers_whole_blocks_bit_exactly(dtype):
    """The reference's block gather (fp8 through its bytes: torch 2.9 cannot index fp8 on
    the CPU) against blocks selected one at a time, every byte pattern included (NaN
    codes too), repeated and out-of-order block ids."""
    from portattn.types import take_blocks

    size = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (6, 4, 2, 8 * size), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(5))
    data = raw.view(dtype)
    blocks = torch.tensor([4, 0, 4, 5, 2])
    expected = torch.stack([data[int(b)] for b in blocks])
    got = take_blocks(data, blocks)
    assert got.dtype == dtype and got.shape == (5, 4, 2, 8)
    assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("window", [None, 3])
def test_non_finite_values_reach_only_the_rows_that_see_their_key(window):
    """A NaN or an infinity in V adds to the rows whose visible keys include it (as IEEE
    arithmetic over those keys alone gives: inf at a positive weight, NaN for a NaN) and
    to no other row: a key a row cannot see adds nothing, not 0 x inf. The oracle sums
    each row's visible keys only, in float64."""
    batch = make_paged_batch([4], [12], num_q_heads=2, num_kv_heads=1, head_size=16,
                             dtype=torch.float32, block_size=4)
    poisoned = {11: (5, float("nan")), 9: (3, float("inf")), 0: (2, float("-inf"))}
    table, block_size = batch.metadata.block_table[0], batch.cache.block_size
    for key, (dim, value) in poisoned.items():
        block, offset = int(table[key // block_size]), key % block_size
        batch.cache.value_cache[block, offset, 0, dim] = value
        batch.values[0][key, 0, dim] = value
    out = portattn.attention(batch.q, batch.cache, batch.metadata, backend="torch_ref",
                             sliding_window=window)
    keys, values = batch.keys[0][:, 0].double(), batch.values[0][:, 0].double()
    scale = 1 / math.sqrt(16)
    for row in range(4):
        position = 8 + row
        first = 0 if window is None else max(0, position - window + 1)
        for head in range(2):
            scores = (keys[first:position + 1] @ batch.q[row, head].double()) * scale
            weights = torch.softmax(scores, dim=0)
            expected = torch.zeros(16, dtype=torch.float64)
            for weight, value in zip(weights, values[first:position + 1]):
                expected = expected + weight * value  # visible keys only
            torch.testing.assert_close(out[row, head].double(), expected, rtol=1e-5,
                                       atol=1e-6, equal_nan=True)
    # the poisoned keys did reach the rows that see them
    assert out[3].isnan().any() and out[1:3].isinf().any()
    assert out[0].isfinite().all() == (window is not None)
