"""Decode tiles over several kv heads (the unified kernel's ``TILE_HEADS``) on the GPU,
against the float64 oracle of ``unified_check`` (built from what the cache stores).

A factorized grid: every cache mode x dtype x 2D / 3D / spec-decode x 2 or 4 heads per
program; x head sizes 64/80/128/192/256; x block sizes 16/32/256; x GQA 1/2/5/8; x score
features; V read byte-wise and as int16 pairs; bad block ids; DiffKV, fp8 q and output;
and the plan's own choice through the public API. Every case compiles its own kernel.
"""

from __future__ import annotations

import pytest
import torch

from test_tile_heads import QUANTS

from unified_check import (
    GPU_FEATURE_KW,
    captured_without_sync,
    run_gpu_case,
    stored_sequences,
)

pytestmark = pytest.mark.gpu

BF16, F16 = torch.bfloat16, torch.float16
E4M3 = torch.float8_e4m3fn
DEV = "cuda"
EIGHT_BIT = [k for k in QUANTS if k != "none"]
DECODE = dict(query_lens=[1, 1, 1, 1, 1], seq_lens=[1000, 1, 517, 64, 2049])
VARIANTS = {
    "decode-2d": dict(DECODE, segments=1),
    "decode-3d": dict(DECODE, segments=8),
    "spec-3d": dict(query_lens=[1, 3, 1, 2, 1], seq_lens=[1000, 40, 517, 64, 2049],
                    segments=4),
}


def run(variant="decode-3d", heads=4, quant="fp8_tensor_e4m3", group=4, num_kv_heads=8,
        **kw):
    q = QUANTS[quant]
    kw.setdefault("v_pairs", True if q is not None else None)
    return run_gpu_case(VARIANTS[variant], tile_heads=heads, quant=q, group=group,
                        num_kv_heads=num_kv_heads, **kw)


@pytest.mark.parametrize("heads", [2, 4])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("quant", list(QUANTS))
def test_modes_dtypes_variants(quant, dtype, variant, heads):
    run(variant, heads=heads, quant=quant, dtype=dtype)


@pytest.mark.parametrize("head_size", [64, 80, 128, 192, 256])
@pytest.mark.parametrize("quant", ["none", "fp8_tensor_e4m3", "int8_token_head"])
def test_head_sizes(quant, head_size):
    run(quant=quant, head_size=head_size)


@pytest.mark.parametrize("block_size", [16, 32, 256])
@pytest.mark.parametrize("quant", EIGHT_BIT)
def test_block_sizes(quant, block_size):
    run(quant=quant, block_size=block_size)


@pytest.mark.parametrize("group,heads,num_kv_heads", [(1, 16, 16), (2, 8, 8), (5, 2, 4),
                                                      (8, 2, 4)], ids=str)
@pytest.mark.parametrize("quant", ["fp8_tensor_e4m3", "fp8_token_head"])
def test_gqa(quant, group, heads, num_kv_heads):
    run(quant=quant, group=group, heads=heads, num_kv_heads=num_kv_heads)


@pytest.mark.parametrize("feature", list(GPU_FEATURE_KW))
@pytest.mark.parametrize("quant", ["fp8_tensor_e4m3", "int8_token_head"])
def test_features(quant, feature):
    run(quant=quant, **GPU_FEATURE_KW[feature])


@pytest.mark.parametrize("v_pairs", [True, False])
@pytest.mark.parametrize("quant", EIGHT_BIT)
def test_v_bytewise_or_pairs(quant, v_pairs):
    run(quant=quant, v_pairs=v_pairs)


@pytest.mark.parametrize("case", ["diffkv", "fp8-q", "fp8-dot", "fp8-out", "merge-kernel",
                                  "fp32"])
def test_shapes(case):
    kw = {"diffkv": dict(head_size=192, head_size_v=128, quant="none"),
          "fp8-q": dict(q_fp8=E4M3), "fp8-dot": dict(q_fp8=E4M3, fp8_dot=True),
          "fp8-out": dict(fp8_out=E4M3),
          "merge-kernel": dict(merge_in_kernel=False, quant="int8_token_head"),
          "fp32": dict(dtype=torch.float32, quant="none")}[case]
    run(**kw)


@pytest.mark.parametrize("bad_id", [-3, 10_000])
def test_bad_block_ids_give_nan_rows(bad_id):
    def edit(table):
        table[2, 5] = bad_id  # sequence 2 (517 keys): a tile every row sees
        return [2]
    run(block_table_edit=edit, dtype=torch.float32, quant="none")


@pytest.mark.parametrize("quant", ["fp8_tensor_e4m3", "fp8_token_head", "int8_token_head"])
def test_the_plan_takes_it_through_the_public_api(quant):
    """20 sequences of 32 query heads over 8 kv heads, head 128, 8-bit cache, one query
    per sequence: on sm90 the plan serves 4 kv heads per program (``explain`` names the
    variant), and the result matches the float64 oracle."""
    import portattn
    from portattn.testing import dense_attention, make_paged_batch, relative_error

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the 4-head decode tile is planned on sm90 only")
    lens = [3000, 17, 800, 1, 4096, 250] * 3 + [77, 1500]  # 20: a bucket of 32 sequences
    batch = make_paged_batch([1] * 20, lens, num_q_heads=32, num_kv_heads=8, head_size=128,
                             dtype=BF16, device=DEV, quant=QUANTS[quant])
    out = torch.full_like(batch.q, float("nan"))
    portattn.attention(batch.q, batch.cache, batch.metadata, out=out)
    torch.cuda.synchronize()
    decision = portattn.explain(batch.q, batch.cache, batch.metadata)
    assert decision.backend == "triton_unified" and decision.variant.endswith("-4heads"), \
        str(decision)
    expected = dense_attention(batch.q, batch.keys, batch.values, [1] * 20)
    assert relative_error(out, expected) < 2e-2


def test_planned_tile_in_a_cuda_graph_with_growing_lengths():
    """The planned 4-head tile captured in a CUDA graph once (no sync while capturing)
    and replayed while the sequences grow in place: right results every step."""
    import portattn
    from portattn.testing import dense_attention, make_paged_batch, relative_error

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the 4-head decode tile is planned on sm90 only")
    lens = [300 + (53 * i) % 1700 for i in range(20)]
    batch = make_paged_batch([1] * 20, [n + 3 for n in lens], num_q_heads=32, num_kv_heads=8,
                             head_size=128, dtype=BF16, device=DEV, quant=QUANTS["fp8_token_head"])
    m = batch.metadata
    m.seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
    metadata = portattn.AttentionMetadata(m.cu_seqlens_q, m.seq_lens, m.block_table, 1,
                                          max(lens) + 3)
    assert portattn.explain(batch.q, batch.cache, metadata).variant.endswith("-4heads")
    q = batch.q.clone()
    out = torch.full_like(q, float("nan"))
    graph = captured_without_sync(lambda: portattn.attention(q, batch.cache, metadata, out=out))
    for step in range(1, 4):
        cur = [n + step for n in lens]
        metadata.seq_lens.copy_(torch.tensor(cur, dtype=torch.int32))
        q.copy_(torch.randn_like(q))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        keys, values = stored_sequences(batch.cache, m.block_table, cur)
        expected = dense_attention(q, keys, values, [1] * 20)
        assert relative_error(out, expected) < 2e-2, step
