"""Quantized KV caches, fp8 q / output and DiffKV in our Triton kernels on the GPU, the
write kernel, a decode step (write + attention) in a CUDA graph, and bad block ids.

A factorized grid against the float64 oracle (built from what the cache stores, see
``unified_check``): every quant mode x dtype x variant; x head sizes 64/80/128/192/256;
x block sizes 16/32/256; x GQA 1/5/8; x score features; fp8 q (with and without fp8
tensor-core QK^T) and fp8 output; DiffKV 192/128, 128/64, 256/128, 96/64 x GQA 1/4/8 x
block sizes 16/64 x quant modes x window/sinks x 2D/3D. Every case compiles its own kernel.
"""

from __future__ import annotations

import logging

import pytest
import torch

from portattn import KVQuant

from test_kernels_quant_diffkv import (
    PAIR_CASES,
    QUANTS,
    check_every_code,
    check_every_pair,
    quantize_reference,
)
from unified_check import (
    GPU_FEATURE_KW,
    KernelCalls,
    captured_without_sync,
    run_gpu_case,
    stored_sequences,
)

pytestmark = pytest.mark.gpu

BF16, F16 = torch.bfloat16, torch.float16
E4M3 = torch.float8_e4m3fn
DEV = "cuda"

DECODE = dict(query_lens=[1, 1, 1, 1, 1], seq_lens=[1000, 1, 517, 64, 2049])
CHUNKED = dict(query_lens=[300, 129], seq_lens=[700, 129])
MIXED = dict(query_lens=[1, 257, 1, 3, 1, 130], seq_lens=[900, 600, 33, 300, 1000, 130])
VARIANTS = {
    "decode-2d": dict(DECODE, segments=1),
    "decode-3d": dict(DECODE, segments=8),
    "chunked": dict(CHUNKED, mode="prefill"),
    "mixed-3d": dict(MIXED, mode="mixed", segments=4),
}
FEATURES = GPU_FEATURE_KW


def run(variant, **kw):
    return run_gpu_case(VARIANTS[variant], **kw)


# --------------------------------------------------------------------------- quantized KV
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("quant", list(QUANTS))
def test_quant_dtypes_variants(quant, dtype, variant):
    run(variant, quant=QUANTS[quant], dtype=dtype)


@pytest.mark.parametrize("head_size", [64, 80, 128, 192, 256])
@pytest.mark.parametrize("variant", ["decode-3d", "chunked"])
@pytest.mark.parametrize("quant", list(QUANTS))
def test_quant_head_sizes(quant, variant, head_size):
    run(variant, quant=QUANTS[quant], head_size=head_size)


@pytest.mark.parametrize("block_size", [16, 32, 256])
@pytest.mark.parametrize("quant", list(QUANTS))
def test_quant_block_sizes(quant, block_size):
    run("decode-3d", quant=QUANTS[quant], block_size=block_size)


@pytest.mark.parametrize("group", [1, 5, 8])
@pytest.mark.parametrize("quant", list(QUANTS))
def test_quant_gqa(quant, group):
    run("decode-2d", quant=QUANTS[quant], group=group)


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("variant", ["decode-3d", "chunked"])
@pytest.mark.parametrize("quant", ["fp8_tensor_e4m3", "int8_token_head"])
def test_quant_features(quant, variant, feature):
    run(variant, quant=QUANTS[quant], **FEATURES[feature])


@pytest.mark.parametrize("fp8_dot", [False, True])
@pytest.mark.parametrize("variant", ["decode-3d", "chunked", "mixed-3d"])
def test_fp8_q_over_fp8_cache(variant, fp8_dot):
    run(variant, quant=QUANTS["fp8_tensor_e4m3"], q_fp8=E4M3, fp8_dot=fp8_dot,
        dtype=F16 if fp8_dot else BF16)


@pytest.mark.parametrize("variant", ["decode-2d", "decode-3d", "chunked"])
@pytest.mark.parametrize("quant", list(QUANTS))
@pytest.mark.parametrize("v_stage", [True, False])
def test_v_staged_in_16_bits(quant, variant, v_stage):
    run(variant, quant=QUANTS[quant], v_stage=v_stage)


def test_fp8_q_over_int8_cache():
    run("mixed-3d", quant=QUANTS["int8_token_head"], q_fp8=E4M3, softcap=30.0)


@pytest.mark.parametrize("variant", ["decode-2d", "decode-3d", "chunked", "mixed-3d"])
@pytest.mark.parametrize("quant", [None, "fp8_tensor_e4m3"])
def test_fp8_output(quant, variant):
    run(variant, quant=QUANTS.get(quant), fp8_out=E4M3, sinks=True)


def test_fp8_dot_accuracy_at_32k_keys():
    """fp8 QK^T with fp32 promotion every 32 products stays at bf16-path accuracy over a
    32k-key context (the oracle is exact on the stored fp8 values)."""
    err = run("decode-3d", query_lens=[1, 1], seq_lens=[32768, 4000], num_kv_heads=1,
              group=8, quant=QUANTS["fp8_tensor_e4m3"], q_fp8=E4M3, fp8_dot=True,
              dtype=F16, segments=16)
    assert err < 1e-2


# ------------------------- 8-bit caches rebuilt from their codes (KV_BITS, inline PTX)
@pytest.mark.parametrize("code_dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.int8],
                         ids=str)
@pytest.mark.parametrize("asm", [True, False])
def test_every_code_decodes_to_its_value(code_dtype, asm):
    check_every_code(code_dtype, DEV, asm)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("quant", list(QUANTS))
def test_from_bytes_dtypes_variants(quant, dtype, variant):
    """KV_BITS forced on this GPU (which has fp8): what sm80/sm86 run for fp8 caches, and
    the integer-op rebuild of int8 codes."""
    run(variant, quant=QUANTS[quant], dtype=dtype, kv_bits=True)


@pytest.mark.parametrize("variant", ["decode-2d", "decode-3d"])
@pytest.mark.parametrize("dtype", [BF16, F16])
def test_int8_decode_through_the_conversion_unit(dtype, variant):
    """int8 decode with the codes cast natively (kv_bits off): what GPUs other than sm90
    run (the plan rebuilds the codes on sm90)."""
    run(variant, quant=QUANTS["int8_token_head"], dtype=dtype, kv_bits=False, sinks=True)


@pytest.mark.parametrize("kv_bits", [True, False])
@pytest.mark.parametrize("quant", ["int8_token_head", "fp8_token_head"])
def test_tiny_per_token_head_v_scales_stay_bounded(quant, kv_bits):
    """V values ~1e-3 (scales ~2e-5): a known fp16-subnormal limit of P's scaled columns
    with fp16 dots, bounded (NOTES.md)."""
    run("decode-3d", quant=QUANTS[quant], kv_bits=kv_bits, v_scale_factor=1e-3,
        tolerance=1.2e-2)
    run("mixed-3d", quant=QUANTS[quant], kv_bits=kv_bits, v_scale_factor=1e-3,
        tolerance=1.2e-2)


@pytest.mark.parametrize("quant", list(QUANTS))
def test_8bit_decode_small_tiles(quant):
    """The 64-key, 2-warp decode tiles the plan takes for 8-bit caches at >= 6 waves."""
    from portattn.kernels.heuristics import TileConfig

    for segments in (1, 4):
        run("decode-2d", quant=QUANTS[quant], segments=None,
            short=TileConfig(16, 4, 64, 2, 2, segments))


@pytest.mark.parametrize("head_size", [64, 80, 128, 192, 256])
@pytest.mark.parametrize("variant", ["decode-3d", "chunked"])
@pytest.mark.parametrize("quant", ["fp8_tensor_e4m3", "fp8_token_head", "int8_token_head"])
def test_from_bytes_head_sizes(quant, variant, head_size):
    run(variant, quant=QUANTS[quant], head_size=head_size, kv_bits=True)


@pytest.mark.parametrize("case", ["block-32", "block-256", "gqa-1", "gqa-8", "diffkv",
                                  "v_stage", "fp32-q"])
@pytest.mark.parametrize("quant", ["fp8_tensor_e4m3", "fp8_tensor_e5m2", "int8_token_head"])
def test_from_bytes_shapes(quant, case):
    kw = {"block-32": dict(block_size=32), "block-256": dict(block_size=256),
          "gqa-1": dict(group=1), "gqa-8": dict(group=8),
          "diffkv": dict(head_size=192, head_size_v=128), "v_stage": dict(v_stage=True),
          "fp32-q": dict(dtype=torch.float32)}[case]
    run("decode-3d" if case != "v_stage" else "mixed-3d", quant=QUANTS[quant], kv_bits=True,
        **kw)


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("variant", ["decode-3d", "chunked"])
def test_from_bytes_features(variant, feature):
    run(variant, quant=QUANTS["fp8_tensor_e4m3"], kv_bits=True, **FEATURES[feature])


# ------------------------------------- 8-bit V read as int16 pairs of codes (V_PAIRS)
@pytest.mark.parametrize("fmt", list(PAIR_CASES))
@pytest.mark.parametrize("asm", [True, False])
def test_every_pair_of_codes_decodes_to_its_values(fmt, asm):
    check_every_pair(fmt, DEV, asm)


@pytest.mark.parametrize("kv_bits", [False, True])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("quant", list(QUANTS))
def test_v_pairs_variants(quant, variant, kv_bits):
    run(variant, quant=QUANTS[quant], v_pairs=True, kv_bits=kv_bits)


@pytest.mark.parametrize("head_size", [64, 80, 128, 192, 256])
@pytest.mark.parametrize("quant", list(QUANTS))
def test_v_pairs_head_sizes(quant, head_size):
    run("decode-3d", quant=QUANTS[quant], head_size=head_size, v_pairs=True)


@pytest.mark.parametrize("case", ["block-32", "block-256", "gqa-1", "gqa-8", "diffkv",
                                  "fp16", "fp32-q", "fp8-out", "descriptor", "small-tiles",
                                  "sinks-softcap"])
@pytest.mark.parametrize("quant", list(QUANTS))
def test_v_pairs_shapes(quant, case):
    from portattn.kernels.heuristics import TileConfig

    kw = {"block-32": dict(block_size=32), "block-256": dict(block_size=256),
          "gqa-1": dict(group=1), "gqa-8": dict(group=8),
          "diffkv": dict(head_size=192, head_size_v=128), "fp16": dict(dtype=F16),
          "fp32-q": dict(dtype=torch.float32), "fp8-out": dict(fp8_out=E4M3),
          "descriptor": dict(kv_load="descriptor", block_size=64),
          "small-tiles": dict(segments=None, short=TileConfig(16, 4, 64, 2, 2, 4)),
          "sinks-softcap": dict(sinks=True, softcap=20.0)}[case]
    run("decode-3d", quant=QUANTS[quant], v_pairs=True, **kw)


@pytest.mark.parametrize("block_m,warps", [(64, 4), (128, 4), (64, 8)])
@pytest.mark.parametrize("quant", ["fp8_tensor_e4m3", "int8_token_head"])
def test_forced_v_pairs_at_head_64_in_wide_tiles_read_v_bytewise(quant, block_m, warps,
                                                                monkeypatch):
    """V pairs at head 64 in tiles of 64 / 128 rows came out wrong with 4 warps (one
    launch made an illegal memory access; H100, Triton 3.6, NOTES.md session 33): a
    forced ``v_pairs`` there reads V byte-wise instead, and the result is right."""
    from portattn.kernels import launch
    from portattn.kernels.heuristics import TileConfig

    calls = KernelCalls(launch.unified_attention_kernel)
    monkeypatch.setattr(launch, "unified_attention_kernel", calls)
    run("decode-3d", quant=QUANTS[quant], head_size=64, v_pairs=True, segments=8,
        short=TileConfig(block_m, block_m // 4, 128, warps, 2, 8))
    assert [kw["V_PAIRS"] for kw in calls.kwargs] == [0]


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("variant", ["decode-3d", "chunked"])
def test_v_pairs_features(variant, feature):
    run(variant, quant=QUANTS["fp8_tensor_e4m3"], v_pairs=True, **FEATURES[feature])


@pytest.mark.parametrize("quant", ["fp8_tensor_e4m3", "int8_token_head"])
def test_batch_below_its_bucket_top_takes_its_own_segments(quant, monkeypatch):
    """33 decode sequences share the 64-sequence plan (the bucket), whose paired 8-bit
    tile (4 kv heads per program at GQA 4: 128 programs of the 64) takes 4 segments on
    132 SMs; 33 (66 programs) fit 8 in one wave (the plan's ``segments_upto``): the
    launch takes 8 over the 2 head groups and matches the float64 oracle."""
    from portattn.kernels import launch

    calls = KernelCalls(launch.unified_attention_kernel)
    monkeypatch.setattr(launch, "unified_attention_kernel", calls)
    seq_lens = [300 + (37 * i) % 1500 for i in range(33)]
    run_gpu_case(dict(query_lens=[1] * 33, seq_lens=seq_lens), num_kv_heads=8,
                 quant=QUANTS[quant], sm_count=132, arch="sm90")
    assert [tuple(grid) for grid in calls.grids] == [(33, 2, 8)]


# --------------------------------------------------------------------------- DiffKV
DIFFKV = [(192, 128), (128, 64), (256, 128), (96, 64)]


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("heads", DIFFKV, ids=str)
def test_diffkv_gqa(heads, group):
    run("decode-3d", head_size=heads[0], head_size_v=heads[1], group=group)


@pytest.mark.parametrize("variant", ["decode-2d", "chunked", "mixed-3d"])
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("heads", DIFFKV, ids=str)
def test_diffkv_block_sizes_variants(heads, block_size, variant):
    run(variant, head_size=heads[0], head_size_v=heads[1], block_size=block_size)


@pytest.mark.parametrize("variant", ["decode-2d", "decode-3d", "chunked"])
@pytest.mark.parametrize("heads", [(192, 128), (96, 64)], ids=str)
@pytest.mark.parametrize("quant", list(QUANTS))
def test_diffkv_quantized(quant, heads, variant):
    run(variant, head_size=heads[0], head_size_v=heads[1], quant=QUANTS[quant])


@pytest.mark.parametrize("feature", ["window", "sinks", "all"])
@pytest.mark.parametrize("variant", ["decode-3d", "mixed-3d"])
def test_diffkv_features(variant, feature):
    run(variant, head_size=192, head_size_v=128, **FEATURES[feature])


def test_diffkv_fp8_q_out_separate_tensors():
    run("mixed-3d", head_size=192, head_size_v=128, quant=QUANTS["fp8_tensor_e4m3"],
        q_fp8=E4M3, fp8_out=E4M3, separate_kv=True)


@pytest.mark.parametrize("variant", ["decode-3d", "chunked"])
def test_bad_block_ids_give_nan_rows(variant):
    def edit(table):
        table[1, 0] = 1 << 30
        table[0, 0] = -5
        return [0, 1]
    run(variant, quant=QUANTS["int8_token_head"], block_table_edit=edit)


# --------------------------------------------------------------------------- write kernel
def assert_written(cache, k, v, slots) -> None:
    """The cache holds, at every slot >= 0, exactly what the reference quantizer makes of
    ``k`` / ``v`` (bytes and per-token-head scales)."""
    keep = slots >= 0
    capacity = cache.num_blocks * cache.block_size
    for which, src, data, scales in (("k", k, cache.key_cache, cache.k_scale_cache),
                                     ("v", v, cache.value_cache, cache.v_scale_cache)):
        want, want_scales = quantize_reference(src[keep], cache.quant, which, data.dtype)
        got = data.reshape(capacity, *data.shape[2:])[slots[keep].long()]
        assert torch.equal(got.view(torch.uint8) if got.element_size() == 1 else got,
                           want.view(torch.uint8) if want.element_size() == 1 else want)
        if scales is not None:
            assert torch.equal(scales.reshape(capacity, -1)[slots[keep].long()], want_scales)


@pytest.mark.parametrize("layout,head_v", [("split", 128), ("packed", 128), ("diffkv", 64)])
@pytest.mark.parametrize("quant", [None] + list(QUANTS))
def test_write_kernel_exact(quant, layout, head_v):
    from portattn import PagedKVCache

    quant = QUANTS.get(quant)
    cache = PagedKVCache.allocate(64, 16, 4, 128, head_size_v=head_v, dtype=BF16,
                                  quant=quant, layout=layout, device=DEV)
    k = torch.randn(300, 4, 128, device=DEV) * 4
    v = torch.randn(300, 4, head_v, device=DEV)
    k[7] = 0.0
    if quant is None:
        k, v = k.to(BF16), v.to(BF16)
    slots = torch.randperm(64 * 16, device=DEV)[:300]
    slots[5] = -1
    cache.write(k, v, slots)
    assert_written(cache, k, v, slots)


@pytest.mark.parametrize("case", [dict(query_lens=[1, 1, 1, 1], seq_lens=[3000, 173, 900, 64]),
                                  dict(query_lens=[300, 5], seq_lens=[1000, 64]),
                                  dict(query_lens=[1200, 5], seq_lens=[1500, 64])],
                         ids=["decode", "prefill", "prefill-long"])  # long: staged on sm90
@pytest.mark.parametrize("fmt", [torch.float8_e5m2, torch.float8_e4m3fn], ids=str)
def test_token_head_fp8_keeps_fp16_precision(case, fmt):
    """e5m2 per-token-head V scales times P stay normal fp16 values (the kernel's
    V_SC_BOOST): the same error as e4m3fn's, within 1e-3 of the float64 oracle."""
    run_gpu_case(case, quant=KVQuant.fp8_per_token_head(fmt), dtype=F16, sinks=True,
                 tolerance=1e-3)


@pytest.mark.parametrize("quant", list(QUANTS) + ["fp8_token_head_e5m2"])
def test_write_kernel_takes_strided_slots_and_tiny_token_heads(quant):
    """Slots as a column of a wider tensor land where they say; token-heads whose absmax /
    max underflows in float32 get scale 1 and zero codes (not NaN), as the reference
    quantizer says, bit for bit."""
    from portattn import PagedKVCache

    quant = KVQuant.fp8_per_token_head(torch.float8_e5m2) if quant == "fp8_token_head_e5m2" \
        else QUANTS[quant]
    cache = PagedKVCache.allocate(64, 16, 4, 128, dtype=BF16, quant=quant, device=DEV)
    k = torch.randn(200, 4, 128, device=DEV) * 4
    v = torch.randn(200, 4, 128, device=DEV)
    for src, t, tiny in ((k, 3, 1e-42), (k, 4, 1e-44), (v, 5, -1e-44)):
        src[t] = 0.0
        src[t, :, 7] = tiny
    table = torch.stack([torch.randperm(64 * 16, device=DEV)[:200],
                         torch.zeros(200, dtype=torch.int64, device=DEV)], 1)
    table[9, 0] = -1
    slots = table[:, 0]
    assert slots.stride(0) == 2
    cache.write(k, v, slots)
    assert_written(cache, k, v, slots)
    for t in (cache.key_cache, cache.value_cache):
        assert not torch.isnan(t.float()).any()


@pytest.mark.parametrize("quant", list(QUANTS))
def test_write_kernel_keeps_a_nan_a_nan(quant):
    """A NaN reads back as NaN: an fp8 code NaN (a plain GPU min / max would clamp it to
    +-fp8 max), a per-token-head scale NaN (a GPU max skips NaN); the other token-heads
    exactly as the definitions say."""
    from portattn import PagedKVCache

    cache = PagedKVCache.allocate(8, 16, 4, 128, dtype=BF16, quant=QUANTS[quant], device=DEV)
    k = torch.randn(6, 4, 128, device=DEV) * 4
    v = torch.randn(6, 4, 128, device=DEV)
    k[2, 1, 9] = float("nan")
    v[4, 3, 0] = float("nan")
    slots = torch.arange(6, device=DEV) * 5
    cache.write(k, v, slots)
    for which, src, data, scales in (("k", k, cache.key_cache, cache.k_scale_cache),
                                     ("v", v, cache.value_cache, cache.v_scale_cache)):
        bad = torch.isnan(src).any(-1)
        stored = data.reshape(128, 4, 128)[slots]
        if scales is None:
            assert torch.isnan(stored.float()[torch.isnan(src)]).all()
        else:
            got_scales = scales.reshape(128, 4)[slots]
            assert torch.isnan(got_scales[bad]).all()
        want, want_scales = quantize_reference(src[~bad], cache.quant, which, data.dtype)
        assert torch.equal(stored[~bad].view(torch.uint8), want.view(torch.uint8))
        if scales is not None:
            assert torch.equal(got_scales[~bad], want_scales)


@pytest.mark.parametrize("quant", ["fp8_tensor_e4m3", "fp8_tensor_e5m2", "fp8_token_head"])
def test_fp8_write_where_the_gpu_cannot_convert_fp8(quant, monkeypatch, caplog):
    """Before sm89 (``converts_fp8`` False, simulated here) an fp8 cache is written by
    PyTorch: the same bytes and scales as the reference quantizer; slots of -1, below -1
    and past the cache skipped, as the write kernel does."""
    import portattn.devices
    from portattn import PagedKVCache
    from portattn.dispatch.announce import announced

    monkeypatch.setattr(portattn.devices, "converts_fp8", lambda device, dtype: False)
    announced.clear()
    caplog.set_level(logging.WARNING, logger="portattn")
    cache = PagedKVCache.allocate(64, 16, 4, 128, dtype=BF16, quant=QUANTS[quant],
                                  device=DEV)
    k = torch.randn(200, 4, 128, device=DEV) * 4
    v = torch.randn(200, 4, 128, device=DEV)
    slots = torch.randperm(64 * 16, device=DEV)[:200]
    slots[3] = -1
    before = cache.key_cache.view(torch.uint8).clone()
    cache.write(k[:2], v[:2], torch.tensor([64 * 16, -5], device=DEV))  # skipped, like -1
    assert torch.equal(cache.key_cache.view(torch.uint8), before)
    cache.write(k, v, slots)
    assert_written(cache, k, v, slots)
    slow = [r for r in caplog.records if "PagedKVCache.write" in r.getMessage()]
    assert [r.levelname for r in slow] == ["WARNING"]  # once for both writes


@pytest.mark.parametrize("quant", ["fp8_tensor_e4m3", "int8_token_head", "fp8_token_head",
                                   None])
@pytest.mark.parametrize("heads", [(128, 128), (192, 128)], ids=str)
def test_decode_step_write_and_attention_in_a_cuda_graph(quant, heads):
    """One decode step (cache.write of the new tokens, then attention) captured once and
    replayed while the lengths grow in place: no sync, right results every step."""
    import portattn
    from portattn.testing import dense_attention, make_paged_batch, relative_error

    quant = QUANTS.get(quant)
    head_qk, head_v = heads
    lens = [300, 1000, 64, 2000]
    batch = make_paged_batch([1] * 4, [n + 4 for n in lens], num_q_heads=16,
                             num_kv_heads=4, head_size=head_qk, head_size_v=head_v,
                             dtype=BF16, device=DEV, quant=quant)
    m = batch.metadata
    m.seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
    metadata = portattn.AttentionMetadata(m.cu_seqlens_q, m.seq_lens, m.block_table, 1,
                                          max(lens) + 4)
    table = m.block_table.cpu()
    bs = batch.cache.block_size
    q = batch.q.clone()
    k_new = torch.randn(4, 4, head_qk, device=DEV).to(BF16)
    v_new = torch.randn(4, 4, head_v, device=DEV).to(BF16)
    slots = torch.zeros(4, dtype=torch.int64, device=DEV)
    out = torch.full((4, 16, head_v), float("nan"), dtype=BF16, device=DEV)

    def step():
        batch.cache.write(k_new, v_new, slots)
        portattn.attention(q, batch.cache, metadata, out=out)

    def set_slots(positions):
        slots.copy_(torch.tensor([int(table[b, p // bs]) * bs + p % bs
                                  for b, p in enumerate(positions)]))

    set_slots(lens)
    graph = captured_without_sync(step)
    for s in range(3):
        cur = [n + s + 1 for n in lens]        # keys after this step's token
        set_slots([n - 1 for n in cur])
        metadata.seq_lens.copy_(torch.tensor(cur, dtype=torch.int32))
        q.copy_(torch.randn_like(q))
        k_new.copy_(torch.randn_like(k_new))
        v_new.copy_(torch.randn_like(v_new))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        keys, values = stored_sequences(batch.cache, m.block_table, cur)
        new_k, _ = quantize_reference(k_new, batch.cache.quant, "k", batch.cache.dtype)
        if quant is None or quant.mode == "fp8_per_tensor":  # the written token itself
            scale = 1.0 if quant is None else float(quant.k_scale)
            for b in range(4):
                assert torch.equal(keys[b][-1], new_k[b].double().cpu() * scale)
        expected = dense_attention(q, keys, values, [1] * 4)
        assert relative_error(out, expected) < 2e-2, s


def test_gpu_tensor_scales_are_checked_with_validate_only():
    """A negative scale held in a GPU tensor: not read by default (no sync), refused with
    validate=True before anything launches."""
    import portattn
    from portattn.testing import make_paged_batch

    batch = make_paged_batch([1, 1], [40, 9], num_q_heads=4, num_kv_heads=2, head_size=64,
                             dtype=BF16, device=DEV, quant=QUANTS["fp8_tensor_e4m3"])
    bad = KVQuant.fp8_per_tensor(torch.tensor([-0.5], device=DEV), 0.03)
    cache = portattn.PagedKVCache(batch.cache.key_cache, batch.cache.value_cache, bad)
    portattn.attention(batch.q, cache, batch.metadata)  # unchecked: no sync
    with pytest.raises(portattn.InputError, match=r"^quant.k_scale: expected a finite"):
        portattn.attention(batch.q, cache, batch.metadata, validate=True)
