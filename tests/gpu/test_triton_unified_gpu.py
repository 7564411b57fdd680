"""``triton_unified`` on the GPU: a wide grid against the float64 oracle.

dtypes bf16/fp16/fp32, head sizes 64..256 (incl. 80, 96, 112, 192), GQA 1/4/5/8, block
sizes 16/32/64/256, every score feature, decode / spec-decode / prefill / mixed, 2D and
split-KV 3D forced, and the heuristics' own choice through ``portattn.attention``.
Every case compiles its own kernel: keep the grid to what adds coverage.
"""

from __future__ import annotations

import pytest
import torch

from portattn.kernels.heuristics import TileConfig

from unified_check import GPU_FEATURE_KW, check_unified

pytestmark = pytest.mark.gpu

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
DEV = "cuda"

DECODE = dict(query_lens=[1, 1, 1, 1, 1], seq_lens=[1000, 1, 517, 64, 2049])
SPEC = dict(query_lens=[4, 2, 8, 3], seq_lens=[700, 9, 1200, 3])
PREFILL = dict(query_lens=[300], seq_lens=[300])
CHUNKED = dict(query_lens=[300, 129], seq_lens=[700, 129])
MIXED = dict(query_lens=[1, 257, 1, 3, 1, 130], seq_lens=[900, 600, 33, 300, 1000, 130])

VARIANTS = {
    "decode-2d": dict(DECODE, segments=1),
    "decode-3d": dict(DECODE, segments=8),
    "prefill": dict(PREFILL, mode="prefill"),
    "chunked": dict(CHUNKED, mode="prefill"),
    "mixed-2d": dict(MIXED, mode="mixed", segments=1),
    "mixed-3d": dict(MIXED, mode="mixed", segments=4),
}


def run(variant, **kw):
    case = dict(VARIANTS[variant])
    case.update(kw)
    return check_unified(case.pop("query_lens"), case.pop("seq_lens"), device=DEV, **case)


@pytest.mark.parametrize("head_size", [64, 80, 96, 112, 128, 192, 256])
@pytest.mark.parametrize("variant", ["decode-3d", "chunked"])
def test_head_sizes(head_size, variant):
    run(variant, head_size=head_size, group=4, num_kv_heads=2, dtype=BF16)


@pytest.mark.parametrize("dtype", [F16, F32, BF16])
@pytest.mark.parametrize("variant", ["decode-2d", "decode-3d", "prefill", "mixed-3d"])
def test_dtypes(dtype, variant):
    run(variant, head_size=128, group=4, num_kv_heads=2, dtype=dtype)


@pytest.mark.parametrize("group", [1, 5, 8])
@pytest.mark.parametrize("variant", ["decode-3d", "chunked", "mixed-2d"])
def test_gqa(group, variant):
    run(variant, group=group, num_kv_heads=2, head_size=128, dtype=BF16)


@pytest.mark.parametrize("block_size", [16, 32, 64, 256])
@pytest.mark.parametrize("variant", ["decode-3d", "chunked"])
def test_block_sizes(block_size, variant):
    run(variant, block_size=block_size, group=4, num_kv_heads=2, head_size=128, dtype=BF16)


FEATURES = GPU_FEATURE_KW


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("variant", ["decode-2d", "decode-3d", "chunked", "mixed-3d"])
def test_features(feature, variant):
    run(variant, group=4, num_kv_heads=2, head_size=128, dtype=BF16, **FEATURES[feature])


@pytest.mark.parametrize("segments", [1, 4])
@pytest.mark.parametrize("group", [4, 8])
def test_spec_decode(group, segments):
    check_unified(SPEC["query_lens"], SPEC["seq_lens"], group=group, num_kv_heads=2,
                  head_size=128, dtype=BF16, device=DEV, segments=segments)


@pytest.mark.parametrize("strided_out", ["pad", "transposed"])
def test_strided(strided_out):
    run("mixed-3d", group=4, num_kv_heads=2, head_size=96, dtype=F16, strided_q=True,
        strided_out=strided_out)


def test_rows_with_no_visible_key():
    check_unified([4, 1], [4, 300], seq_lens_override=[2, 300], group=4, num_kv_heads=2,
                  head_size=128, dtype=BF16, device=DEV, segments=4, sinks=True)


def test_small_prefill_tiles():
    long = TileConfig(block_m=64, block_q=16, block_n=32, num_warps=4, num_stages=2)
    run("chunked", group=4, num_kv_heads=2, head_size=128, dtype=F16, long=long)


@pytest.mark.parametrize("case", ["decode1", "decode7", "spec", "prefill", "mixed"])
def test_heuristic_plans_through_public_api(case):
    import portattn
    from portattn.testing import dense_attention, make_paged_batch, relative_error

    query_lens, seq_lens = {
        "decode1": ([1], [3000]), "decode7": ([1] * 7, [3000, 17, 900, 1, 40, 2000, 333]),
        "spec": ([4] * 5, [500, 4, 900, 37, 1200]), "prefill": ([1000], [1000]),
        "mixed": ([1, 600, 1, 1, 2], [800, 1300, 5, 99, 700])}[case]
    batch = make_paged_batch(query_lens, seq_lens, num_q_heads=32, num_kv_heads=8,
                             head_size=128, dtype=BF16, device=DEV)
    decision = portattn.explain(batch.q, batch.cache, batch.metadata)
    assert decision.backend == "triton_unified", decision
    out = portattn.attention(batch.q, batch.cache, batch.metadata)
    expected = dense_attention(batch.q, batch.keys, batch.values, query_lens)
    err = relative_error(out, expected)
    assert err < 2e-2, (err, decision.plan.describe())

