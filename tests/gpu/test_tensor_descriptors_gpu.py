"""Descriptor (TMA) K/V loads of the unified kernel on the GPU, both ways, vs the oracle.

Every case runs the kernel with ``kv_load="pointer"`` and ``kv_load="descriptor"``
(the KV_LOAD switch, tiles cut to whole parts of a cache block, forced: a cache or tile
the descriptor path cannot take fails instead of quietly running pointer loads) against
the float64 oracle of :func:`unified_check.check_unified`. A factorized grid (~70 runs):
head sizes 64/96/128/192/256, block sizes 16/32/64/128/256, GQA 1/8, window / sinks /
all features, int8 and fp8 quantized caches, DiffKV, fp16/fp32, decode / prefill /
mixed, 2D and split-KV 3D. Issue 12's GPU bar: all pass, zero compile failures on sm90
(Triton 3.6). Plus the functional gate in its child process and ``PORTATTN_TD=1``
through ``portattn.attention``. Descriptors need TMA: skipped below sm90.
"""

from __future__ import annotations

import pytest
import torch

from portattn import KVQuant

from unified_check import check_unified

pytestmark = pytest.mark.gpu

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
DEV = "cuda"
KV_LOADS = ["pointer", "descriptor"]

DECODE = dict(query_lens=[1, 1, 1, 1, 1], seq_lens=[1000, 1, 517, 64, 2049])
PREFILL = dict(query_lens=[300], seq_lens=[300])
CHUNKED = dict(query_lens=[300, 129], seq_lens=[700, 129])
MIXED = dict(query_lens=[1, 257, 1, 3, 1, 130], seq_lens=[900, 600, 33, 300, 1000, 130])

VARIANTS = {
    "decode-2d": dict(DECODE, segments=1, mode="decode"),
    "decode-3d": dict(DECODE, segments=8, mode="decode"),
    "prefill": dict(PREFILL, mode="prefill"),
    "chunked": dict(CHUNKED, mode="prefill"),
    "mixed-2d": dict(MIXED, mode="mixed", segments=1),
    "mixed-3d": dict(MIXED, mode="mixed", segments=4),
}


@pytest.fixture(autouse=True)
def _needs_tma():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("descriptor (TMA) loads need sm90+")


def run(variant, kv_load, **kw):
    case = dict(VARIANTS[variant])
    case.update(kw)
    return check_unified(case.pop("query_lens"), case.pop("seq_lens"), device=DEV,
                         kv_load=kv_load, **case)


@pytest.mark.parametrize("kv_load", KV_LOADS)
@pytest.mark.parametrize("head_size", [64, 96, 128, 192, 256])
@pytest.mark.parametrize("variant", ["decode-3d", "chunked"])
def test_head_sizes(head_size, variant, kv_load):
    run(variant, kv_load, head_size=head_size, group=4, num_kv_heads=2, dtype=BF16,
        block_size=64)


@pytest.mark.parametrize("kv_load", KV_LOADS)
@pytest.mark.parametrize("block_size", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("variant", ["decode-2d", "mixed-3d"])
def test_block_sizes(block_size, variant, kv_load):
    run(variant, kv_load, block_size=block_size, group=4, num_kv_heads=2, head_size=128,
        dtype=BF16)


@pytest.mark.parametrize("kv_load", KV_LOADS)
@pytest.mark.parametrize("group", [1, 8])
def test_gqa(group, kv_load):
    run("decode-3d", kv_load, group=group, num_kv_heads=2, head_size=128, dtype=BF16,
        block_size=32)


FEATURES = {
    "window": dict(sliding_window=100),
    "sinks": dict(sinks=True),
    "all": dict(sliding_window=77, softcap=20.0, alibi="linear", sinks=True),
}


@pytest.mark.parametrize("kv_load", KV_LOADS)
@pytest.mark.parametrize("feature", list(FEATURES))
def test_features(feature, kv_load):
    run("chunked", kv_load, group=4, num_kv_heads=2, head_size=128, dtype=BF16,
        block_size=64, **FEATURES[feature])


QUANTS = {
    "int8_pth": KVQuant.int8_per_token_head(),
    "fp8_pth": KVQuant.fp8_per_token_head(),
    "fp8_pt": KVQuant.fp8_per_tensor(0.02, 0.03),
}


@pytest.mark.parametrize("kv_load", KV_LOADS)
@pytest.mark.parametrize("quant", list(QUANTS))
@pytest.mark.parametrize("variant", ["decode-3d", "prefill"])
def test_quantized(quant, variant, kv_load):
    run(variant, kv_load, quant=QUANTS[quant], group=4, num_kv_heads=2, head_size=128,
        dtype=BF16, block_size=32)


@pytest.mark.parametrize("kv_load", KV_LOADS)
@pytest.mark.parametrize("variant", ["decode-3d", "chunked"])
def test_diffkv_packed(variant, kv_load):
    run(variant, kv_load, head_size=192, head_size_v=128, group=4, num_kv_heads=2,
        dtype=BF16, block_size=64)


@pytest.mark.parametrize("kv_load", KV_LOADS)
@pytest.mark.parametrize("dtype", [F16, F32])
def test_dtypes(dtype, kv_load):
    run("mixed-2d", kv_load, head_size=128, group=4, num_kv_heads=2, dtype=dtype,
        block_size=64)


def test_bad_block_ids_give_nan_rows_with_descriptors():
    def corrupt(table):
        table[0, 3] = 10 ** 6
        table[2, 1] = -1
        return [0, 2]

    run("decode-2d", "descriptor", head_size=128, group=4, num_kv_heads=2, dtype=BF16,
        block_size=64, block_table_edit=corrupt)


def test_gate_child_process_passes_on_this_gpu():
    """The functional gate's own check, in its child process (what PORTATTN_TD=1 and a
    future DESCRIPTOR_PREFERRED entry run first), fp8 tensor-core QK^T included (a
    transposed fp8 operand from a TMA box: the likeliest compile risk)."""
    from portattn.capabilities import kv_descriptor_gate as gate

    for variant in (
            gate.variant_key(kv_dtype="bfloat16", quant="none", head_qk=128, head_v=128,
                             block_size=64, block_n=64),
            gate.variant_key(kv_dtype="int8", quant="int8_per_token_head", head_qk=128,
                             head_v=128, block_size=16, block_n=16),
            gate.variant_key(kv_dtype="float8_e4m3fn", quant="fp8_per_tensor:e4m3fn",
                             head_qk=128, head_v=128, block_size=64, block_n=64,
                             fp8_dot=True)):
        result = gate.run_check_isolated(variant, f"cuda:{torch.cuda.current_device()}")
        assert result == {"ok": True, "reason": ""}, result


def test_td1_through_attention(monkeypatch, tmp_path):
    """PORTATTN_TD=1: explain says descriptor loads; attention matches the float64 oracle,
    as pointer loads (PORTATTN_TD=0) do."""
    import portattn
    from portattn.capabilities import kv_descriptor_gate as gate
    from portattn.testing import dense_attention, make_paged_batch, relative_error

    monkeypatch.setenv("PORTATTN_CACHE_DIR", str(tmp_path))
    gate.clear()
    batch = make_paged_batch([1, 1, 7], [300, 65, 129], num_q_heads=8, num_kv_heads=2,
                             head_size=128, block_size=64, dtype=BF16, device=DEV)
    expected = dense_attention(batch.q, batch.keys, batch.values, batch.query_lens)
    monkeypatch.setenv("PORTATTN_TD", "0")
    pointer = portattn.attention(batch.q, batch.cache, batch.metadata,
                                 backend="triton_unified")
    assert relative_error(pointer, expected) < 2e-2
    monkeypatch.setenv("PORTATTN_TD", "1")
    decision = portattn.explain(batch.q, batch.cache, batch.metadata,
                                backend="triton_unified")
    assert decision.plan.params.get("kv_load") == "descriptor", decision.plan.describe()
    got = portattn.attention(batch.q, batch.cache, batch.metadata, backend="triton_unified")
    assert relative_error(got, expected) < 2e-2
    assert gate.cache_path().exists()
