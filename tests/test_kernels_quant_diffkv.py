"""Quantized KV caches, fp8 q / output and DiffKV in our Triton kernels, on the CPU under
``TRITON_INTERPRET=1`` (small fp16/fp32 problems), plus the cache write kernel, the
masking of bad block ids and the understated-hint guard.

Oracles are built here or in ``unified_check`` from what the cache stores (codes times
scales), never with the package's quantize/dequantize; the write kernel is compared with
plain indexing and a quantizer written below from DESIGN.md's definitions.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import triton
import triton.language as tl

from indexing import take
from portattn import KVQuant, PagedKVCache
from portattn.kernels.byte_decode import decode_bytes, decode_pairs
from portattn.kernels.heuristics import TileConfig

from unified_check import FEATURE_KW, check_unified, undo_interpreter_fp8_carry

F16, F32 = torch.float16, torch.float32
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
SMALL_LONG = TileConfig(block_m=32, block_q=16, block_n=16, num_warps=4, num_stages=2)

QUANTS = {
    "fp8_tensor_e4m3": KVQuant.fp8_per_tensor(0.02, 0.03),
    "fp8_tensor_e5m2": KVQuant.fp8_per_tensor(0.05, 0.01, E5M2),
    "int8_token_head": KVQuant.int8_per_token_head(),
    "fp8_token_head": KVQuant.fp8_per_token_head(),
}
VARIANTS = {
    "decode-2d": dict(query_lens=[1, 2, 1], seq_lens=[45, 19, 3], segments=1),
    "decode-3d": dict(query_lens=[1, 2, 1], seq_lens=[45, 19, 3], segments=4),
    "prefill": dict(query_lens=[13, 6], seq_lens=[41, 6], mode="prefill"),
    "mixed": dict(query_lens=[1, 19, 1, 3], seq_lens=[30, 45, 12, 20], mode="mixed",
                  segments=2),
}

interp = pytest.mark.interpreter


def run(variant, group=2, **kw):
    case = dict(VARIANTS[variant])
    if case.get("mode") in ("prefill", "mixed"):
        case["long"] = dataclasses.replace(SMALL_LONG, block_q=SMALL_LONG.block_m // group)
    case.update(kw)
    return check_unified(case.pop("query_lens"), case.pop("seq_lens"), group=group, **case)


# --------------------------------------------------------------------------- quantized KV
@interp
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("quant", list(QUANTS))
def test_quant_modes(quant, variant):
    run(variant, quant=QUANTS[quant], dtype=F16, head_size=64)


@interp
@pytest.mark.parametrize("variant", ["decode-2d", "decode-3d", "prefill"])
@pytest.mark.parametrize("fmt", [torch.float8_e5m2, torch.float8_e4m3fn], ids=str)
def test_token_head_fp8_keeps_fp16_precision(variant, fmt):
    """P times the per-token-head V scales is rounded to fp16 for the P V dot: e5m2's
    scales (absmax / 57344) made those products fp16 subnormals for unit-size V (relative
    error 2.2-2.6e-3 here, against e4m3fn's 3e-4); the kernel's V_SC_BOOST (128, set by
    the launcher for e5m2 with fp16 dots) keeps both formats at e4m3fn's error."""
    from portattn.kernels.launch import E5M2_V_SCALE_BOOST, kernel_scalars
    from portattn.options import normalize_options
    from portattn.testing import make_paged_batch

    quant = KVQuant.fp8_per_token_head(fmt)
    batch = make_paged_batch([1, 2], [40, 9], head_size=64, dtype=F16, quant=quant)
    scalars = kernel_scalars(batch.q, batch.cache, normalize_options(batch.q, batch.cache),
                             fp8_dot=False)
    boost = E5M2_V_SCALE_BOOST if fmt == torch.float8_e5m2 else 1.0
    assert scalars["COMPUTE_DTYPE"] == 0 and scalars["V_SC_BOOST"] == boost
    run(variant, quant=quant, dtype=F16, head_size=64, sinks=True, tolerance=1e-3,
        seq_lens=[173, 90, 300] if variant != "prefill" else [173, 60],
        query_lens=[1, 1, 1] if variant != "prefill" else [40, 3])


def test_v_scale_boost_only_for_e5m2_token_heads_with_fp16_dots():
    from portattn.kernels.launch import kernel_scalars
    from portattn.options import normalize_options
    from portattn.testing import make_paged_batch

    cases = [(F16, KVQuant.fp8_per_token_head(torch.float8_e5m2), 128.0),
             (torch.bfloat16, KVQuant.fp8_per_token_head(torch.float8_e5m2), 128.0),
             (F32, KVQuant.fp8_per_token_head(torch.float8_e5m2), 1.0),
             (F16, KVQuant.fp8_per_token_head(), 1.0),
             (F16, KVQuant.int8_per_token_head(), 1.0),
             (F16, KVQuant.fp8_per_tensor(0.5, 0.5, torch.float8_e5m2), 1.0),
             (F16, None, 1.0)]
    for dtype, quant, boost in cases:
        batch = make_paged_batch([1], [5], head_size=32, dtype=dtype, quant=quant)
        options = normalize_options(batch.q, batch.cache)
        assert kernel_scalars(batch.q, batch.cache, options, False)["V_SC_BOOST"] == boost
        assert kernel_scalars(batch.q, batch.cache, options, False,
                              codes=True)["V_SC_BOOST"] == (boost if dtype != F32 else 1.0)


@interp
@pytest.mark.parametrize("variant", ["decode-3d", "mixed"])
@pytest.mark.parametrize("quant", list(QUANTS))
@pytest.mark.parametrize("v_stage", [True, False])
def test_v_staged_in_16_bits(quant, variant, v_stage):
    """The V_STAGE switch both ways, whatever the plan would pick (V converted and scaled
    before its shared-memory staging: the per-tensor V scale moves from the output into
    V): the result must not change."""
    run(variant, quant=QUANTS[quant], dtype=F16, head_size=64, sinks=True, v_stage=v_stage)


def test_plan_rebuilds_int8_codes_for_decode_on_sm90_only():
    from portattn.kernels import heuristics

    def plan(quant_key, arch="sm90", elem=1, q=1, head=128):
        shape = heuristics.Shape(32, 8, head, elem, q, 8192, 32, 132, arch, head,
                                 heuristics.quant_mode(quant_key))
        return heuristics.plan_launch(shape)

    assert plan("int8_per_token_head")["kv_bits"] == "int8"
    assert heuristics.variant_name(plan("int8_per_token_head")) == \
        "decode-3d-int8-codes-vpairs-4heads"
    for params in (plan("fp8_per_token_head:e4m3fn"), plan("fp8_per_tensor:e4m3fn"),
                   plan("none", elem=2), plan("int8_per_token_head", arch="sm86"),
                   plan("int8_per_token_head", q=4096)):  # prefill tiles
        assert "kv_bits" not in params
        assert "v_stage" not in params  # a measured switch that lost: never planned
    assert not heuristics.scales_per_token_head("fp8_per_tensor:e5m2")


@pytest.mark.parametrize("quant_key", ["fp8_per_tensor:e4m3fn", "int8_per_token_head",
                                       "fp8_per_token_head:e4m3fn"])
def test_8bit_decode_takes_small_tiles_only_with_many_programs_per_sm(quant_key):
    """Without V pairs (GPUs other than sm90): 64-key tiles with 2 warps from 6 waves of
    (sequence, kv head) programs on (faster at 128 x 8192 on the H200, 7.8 waves; slower
    at 32 x 8192, 1.9 waves)."""
    from portattn.kernels import heuristics

    def tile(num_seqs, elem=1, key=quant_key, arch="sm89"):
        shape = heuristics.Shape(32, 8, 128, elem, 1, 8192, num_seqs, 132, arch, 128,
                                 heuristics.quant_mode(key))
        params = heuristics.plan_launch(shape)
        assert "v_pairs" not in params and "maxnreg" not in params["short"]
        return params["short"]["block_n"], params["short"]["num_warps"]

    assert tile(128) == (64, 2)
    assert tile(99) == (64, 2)   # 792 programs = 6 waves of 132 SMs
    assert tile(98) == (128, 4)
    assert tile(32) == (128, 4)
    assert tile(128, elem=2, key="none", arch="sm90") == (128, 4)  # 16-bit: the copy line


@pytest.mark.parametrize("quant_key", ["fp8_per_tensor:e4m3fn", "fp8_per_tensor:e5m2",
                                       "int8_per_token_head", "fp8_per_token_head:e4m3fn"])
def test_8bit_decode_on_sm90_reads_v_pairs_with_four_programs_per_sm(quant_key, monkeypatch):
    """sm90 decode over 8-bit caches: V as int16 pairs, 128-key 4-warp tiles capped at 128
    registers, and as many segments (a power of two) as keep every program resident (4
    per SM), each segment at least two tiles. A program per kv head here (the tiles over
    several heads are tests/test_tile_heads.py's)."""
    from portattn.kernels import heuristics

    monkeypatch.setattr(heuristics, "MULTI_HEAD_DECODE_GROUPS", ())

    def plan(num_seqs, seq_len=8192, arch="sm90", q=1, head=128, head_v=128, sms=132):
        shape = heuristics.Shape(32, 8, head, 1, q, seq_len, num_seqs, sms, arch, head_v,
                                 heuristics.quant_mode(quant_key))
        return heuristics.plan_launch(shape)

    for num_seqs, segments in ((32, 2), (128, 1), (8, 8), (1, 32), (66, 1), (64, 1),
                               (16, 4)):
        params = plan(num_seqs)
        assert params["v_pairs"] is True
        assert {k: params["short"][k] for k in ("block_n", "num_warps", "maxnreg",
                                                "segments")} == \
            dict(block_n=128, num_warps=4, maxnreg=128, segments=segments), num_seqs
    assert plan(1, seq_len=256)["short"]["segments"] == 1      # 2 tiles: one segment
    assert plan(1, seq_len=1024)["short"]["segments"] == 4     # 8 tiles, 2 per segment
    assert plan(8, sms=16)["short"]["segments"] == 1           # 64 programs fill 16 SMs
    assert "-vpairs" in heuristics.variant_name(plan(32))
    # not measured, so not planned: other GPUs, spec-decode rows, wide or DiffKV heads,
    # prefill and mixed tiles
    assert plan(32, head=80, head_v=80)["v_pairs"] is True   # pads to 128
    for params in (plan(32, arch="sm89"), plan(32, arch="sm100"), plan(32, q=8),
                   plan(32, head=256, head_v=256), plan(32, head=192, head_v=128),
                   plan(32, head=128, head_v=64), plan(32, head=64, head_v=64),
                   plan(1, q=4096), plan(32, q=100)):
        assert "v_pairs" not in params
        assert "maxnreg" not in params.get("short", {})


@interp
@pytest.mark.parametrize("feature", list(FEATURE_KW))
@pytest.mark.parametrize("quant", ["fp8_tensor_e4m3", "int8_token_head"])
def test_quant_features(quant, feature):
    run("decode-3d", group=3, quant=QUANTS[quant], dtype=F16, head_size=64,
        **FEATURE_KW[feature])


@interp
@pytest.mark.parametrize("quant", ["fp8_token_head", "fp8_tensor_e4m3"])
def test_quant_prefill_all_features_fp32(quant):
    run("prefill", quant=QUANTS[quant], dtype=F32, head_size=40, **FEATURE_KW["all"])


@interp
@pytest.mark.parametrize("head_size,group", [(80, 3), (40, 1), (72, 8)])
def test_quant_non_pow2_heads_and_gqa(head_size, group):
    run("decode-3d", group=group, quant=QUANTS["int8_token_head"], dtype=F16,
        head_size=head_size)


@interp
@pytest.mark.parametrize("variant", ["decode-2d", "decode-3d", "prefill"])
@pytest.mark.parametrize("quant", ["fp8_tensor_e4m3", "int8_token_head"])
def test_fp8_q(quant, variant):
    run(variant, quant=QUANTS[quant], q_fp8=E4M3, dtype=F16, head_size=64, softcap=8.0)


@interp
@pytest.mark.parametrize("variant", ["decode-2d", "decode-3d", "mixed"])
@pytest.mark.parametrize("quant", [None, "fp8_tensor_e4m3"])
def test_fp8_output(quant, variant):
    run(variant, quant=QUANTS.get(quant), fp8_out=E4M3, dtype=F16, head_size=64,
        sinks=True)


# ----------------------------------- 8-bit caches rebuilt from their codes (KV_BITS)
@interp
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("quant", list(QUANTS))
def test_cache_codes_rebuilt_with_integer_ops(quant, variant):
    """The kernel's KV_BITS (fp8 caches on GPUs without the format, int8 caches): the same
    results as the oracle on what the cache stores, every 8-bit mode and launch variant."""
    run(variant, quant=QUANTS[quant], dtype=F16, head_size=64, kv_bits=True)


@interp
@pytest.mark.parametrize("feature", list(FEATURE_KW))
@pytest.mark.parametrize("quant", ["fp8_tensor_e4m3", "int8_token_head"])
def test_cache_codes_rebuilt_features(quant, feature):
    run("decode-3d", group=3, quant=QUANTS[quant], dtype=F16, head_size=64,
        kv_bits=True, **FEATURE_KW[feature])


@interp
@pytest.mark.parametrize("quant", ["fp8_token_head", "fp8_tensor_e4m3", "fp8_tensor_e5m2",
                                   "int8_token_head"])
def test_cache_codes_rebuilt_prefill_fp32_all_features(quant):
    run("prefill", quant=QUANTS[quant], dtype=F32, head_size=40, kv_bits=True,
        **FEATURE_KW["all"])


@interp
@pytest.mark.parametrize("quant", ["fp8_token_head", "fp8_tensor_e4m3", "int8_token_head"])
@pytest.mark.parametrize("case", ["v_stage", "descriptor", "diffkv", "fp8_out"])
def test_cache_codes_rebuilt_with_other_switches(quant, case):
    kw = {"v_stage": dict(v_stage=True, sinks=True),
          "descriptor": dict(kv_load="descriptor"),
          "diffkv": dict(head_size_v=32),
          "fp8_out": dict(fp8_out=E5M2)}[case]
    run("mixed" if case == "v_stage" else "decode-3d", quant=QUANTS[quant], dtype=F16,
        head_size=64, kv_bits=True, **kw)


@interp
@pytest.mark.parametrize("variant", ["decode-2d", "decode-3d"])
def test_int8_decode_through_the_conversion_unit(variant):
    """int8 decode with the codes cast natively (``kv_bits`` off): what every GPU but sm90
    runs (the plan rebuilds the codes on sm90)."""
    run(variant, quant=QUANTS["int8_token_head"], dtype=F16, head_size=64, kv_bits=False,
        sinks=True)


@interp
@pytest.mark.parametrize("kv_bits", [True, False])
@pytest.mark.parametrize("quant", ["int8_token_head", "fp8_token_head"])
def test_tiny_per_token_head_v_scales_stay_bounded(quant, kv_bits):
    """A known limit, bounded: V values ~1e-3 (scales ~2e-5) with fp16 dots make P's
    scaled columns partly fp16 subnormals. Measured 0.79% relative error here (NOTES.md);
    this keeps it under 1.2%, and the fp32-q path (no fp16 rounding of P) exact to fp32."""
    for variant in ("decode-3d", "mixed"):
        err = run(variant, quant=QUANTS[quant], dtype=F16, head_size=64, kv_bits=kv_bits,
                  v_scale_factor=1e-3, tolerance=1.2e-2)
        assert err > 0.0
    run("decode-3d", quant=QUANTS[quant], dtype=F32, head_size=64, kv_bits=kv_bits,
        v_scale_factor=1e-3)


@triton.jit
def _decode_codes_kernel(src, dst, BITS: tl.constexpr, ASM: tl.constexpr):
    """Store ``decode_bytes`` (as fp32) of 256 byte codes."""
    offs = tl.arange(0, 256)
    tl.store(dst + offs, decode_bytes(tl.load(src + offs), BITS, ASM).to(tl.float32))


def check_every_code(code_dtype: torch.dtype, device: str, asm: bool) -> None:
    """All 256 codes through ``byte_decode.decode_bytes`` against PyTorch's own
    conversion of the codes: normals, subnormals, zeros of both signs, NaN (e4m3fn's
    0x7f / 0xff, e5m2's) and e5m2's infinities; e4m3 codes decode to the value / 256 (the
    kernel folds the 256 back). Shared with the GPU tier (``asm``: the inline PTX)."""
    bits = {E4M3: 1, E5M2: 2, torch.int8: 3}[code_dtype]
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    src = codes.view(torch.int8) if code_dtype == torch.int8 else codes
    out = torch.full((256,), 7.0, dtype=F32)  # poison: every entry must be written
    src, out = src.to(device), out.to(device)
    _decode_codes_kernel[(1,)](src, out, BITS=bits, ASM=asm)
    out = out.cpu()
    expected = codes.view(code_dtype).double() / (256.0 if code_dtype == E4M3 else 1.0)
    assert int(torch.isnan(expected).sum()) == {E4M3: 2, E5M2: 6, torch.int8: 0}[code_dtype]
    assert_same_values(out.double(), expected)


def assert_same_values(got: torch.Tensor, expected: torch.Tensor) -> None:
    """NaN exactly where expected, every other value equal, signs (zeros) included."""
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan], expected[~nan])
    assert torch.equal(torch.signbit(got[~nan]), torch.signbit(expected[~nan]))


@interp
@pytest.mark.parametrize("code_dtype", [E4M3, E5M2, torch.int8], ids=str)
def test_every_code_decodes_to_its_value(code_dtype):
    check_every_code(code_dtype, "cpu", asm=False)


@triton.jit
def _decode_pairs_kernel(src, even_dst, odd_dst, FMT: tl.constexpr, ASM: tl.constexpr):
    """Store ``decode_pairs`` (as fp32) of int16 elements, 1024 per program."""
    offs = tl.program_id(0) * 1024 + tl.arange(0, 1024)
    even, odd = decode_pairs(tl.load(src + offs), FMT, ASM)
    tl.store(even_dst + offs, even.to(tl.float32))
    tl.store(odd_dst + offs, odd.to(tl.float32))


#: decode_pairs formats: (code dtype, PAIR_FORMATS code, divisor of the decoded value)
PAIR_CASES = {"e4m3fn": (E4M3, 4, 1.0), "e4m3fn_bits": (E4M3, 1, 256.0),
              "e5m2": (E5M2, 2, 1.0), "int8": (torch.int8, 3, 1.0)}


def check_every_pair(fmt: str, device: str, asm: bool, nan_codes: bool = True) -> None:
    """All 65536 int16 elements through ``byte_decode.decode_pairs`` against PyTorch's
    conversion of their two bytes (little-endian: the low byte is the even column).
    ``nan_codes=False``: elements holding a NaN code are left out (the interpreter
    converts e4m3fn's NaN codes 0x7f / 0xff to 480 with Triton's own fp8 cast)."""
    code_dtype, code, divisor = PAIR_CASES[fmt]
    words = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    both = words.view(torch.uint8).view(-1, 2).view(code_dtype).double() / divisor
    poison = torch.full((words.numel(),), 7.0, dtype=F32)
    even, odd = poison.clone().to(device), poison.clone().to(device)
    _decode_pairs_kernel[(words.numel() // 1024,)](words.to(device), even, odd, FMT=code,
                                                   ASM=asm)
    keep = torch.ones(words.numel(), dtype=torch.bool)
    if not nan_codes:
        keep = ~torch.isnan(both).any(1)
        assert int(keep.sum()) == 254 * 254
    assert_same_values(even.cpu().double()[keep], both[keep, 0])
    assert_same_values(odd.cpu().double()[keep], both[keep, 1])


@interp
@pytest.mark.parametrize("fmt", list(PAIR_CASES))
def test_every_pair_of_codes_decodes_to_its_values(fmt):
    check_every_pair(fmt, "cpu", asm=False, nan_codes=fmt != "e4m3fn")


def test_plan_decodes_fp8_from_bytes_only_where_the_gpu_lacks_the_format():
    from portattn.backends.triton_unified import TritonUnified, fp8_cache_from_bytes
    from portattn.capabilities import probe
    from portattn.dispatch.problem import Problem

    for kv_quant, fmt in (("fp8_per_tensor:e4m3fn", "e4m3fn"),
                          ("fp8_per_tensor:e5m2", "e5m2"),
                          ("fp8_per_token_head:e4m3fn", "e4m3fn")):
        problem = Problem.make(kv_quant=kv_quant, num_seqs=32)
        for profile in ("sm80", "sm86"):
            caps = probe(simulate=profile)
            assert fp8_cache_from_bytes(problem, caps) == fmt
            plan = TritonUnified().plan(problem, caps)
            assert plan.params["kv_bits"] == fmt
            assert plan.variant.endswith(f"-{fmt}-codes")
        for profile in ("sm89", "sm90", "sm100"):
            caps = probe(simulate=profile)
            assert fp8_cache_from_bytes(problem, caps) is None
            assert "kv_bits" not in TritonUnified().plan(problem, caps).params
        # not run on an AMD GPU: no byte decode there, the reason stays
        assert fp8_cache_from_bytes(problem, probe(simulate="gfx942")) is None
        assert TritonUnified().why_not(problem, probe(simulate="gfx942"))
    int8 = Problem.make(kv_quant="int8_per_token_head", num_seqs=32)
    assert fp8_cache_from_bytes(int8, probe(simulate="sm80")) is None
    # fp8 q and fp8 output still need the format on the GPU
    fp8_q = Problem.make(dtype="e4m3fn", out_dtype="bfloat16", kv_quant="fp8_per_tensor")
    assert any("fp8 e4m3fn" in r for r in TritonUnified().why_not(fp8_q, probe(simulate="sm80")))


# --------------------------------------------------------------------------- DiffKV
@interp
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("heads", [(64, 32), (48, 40), (40, 64)])
def test_diffkv(heads, variant):
    run(variant, head_size=heads[0], head_size_v=heads[1], dtype=F16)


@interp
@pytest.mark.parametrize("quant", list(QUANTS))
def test_diffkv_quantized(quant):
    run("decode-3d", head_size=64, head_size_v=32, quant=QUANTS[quant], dtype=F16)


@interp
@pytest.mark.parametrize("feature", ["window", "softcap", "alibi", "sinks", "all"])
@pytest.mark.parametrize("variant", ["decode-3d", "prefill"])
def test_diffkv_features(feature, variant):
    run(variant, group=3, head_size=48, head_size_v=32, dtype=F32, **FEATURE_KW[feature])


@interp
@pytest.mark.parametrize("variant", ["decode-2d", "mixed"])
def test_diffkv_separate_tensors_fp8_q_and_out(variant):
    run(variant, head_size=64, head_size_v=32, quant=QUANTS["fp8_tensor_e4m3"],
        q_fp8=E4M3, fp8_out=E4M3, dtype=F16, separate_kv=True)


@interp
def test_diffkv_routes_through_the_public_api():
    import portattn
    from portattn.testing import dense_attention, make_paged_batch, relative_error

    batch = make_paged_batch([1, 4, 1], [30, 21, 7], num_q_heads=4, num_kv_heads=2,
                             head_size=48, head_size_v=32, dtype=F16)
    decision = portattn.explain(batch.q, batch.cache, batch.metadata, backend="triton_diffkv")
    assert decision.backend == "triton_diffkv"
    assert "triton_unified" in decision.rejected
    out = torch.full((6, 4, 32), math.nan, dtype=F16)
    portattn.attention(batch.q, batch.cache, batch.metadata, backend="triton_diffkv", out=out)
    expected = dense_attention(batch.q, [k.double() for k in batch.keys],
                               [v.double() for v in batch.values], [1, 4, 1])
    assert relative_error(out, expected) < 3e-3


# --------------------------------------------------------------------------- bad metadata
def _corrupt(value):
    def edit(table):
        table[1, 0] = value  # sequence 1's first block: every row of it sees key 0
        return [1]
    return edit


@interp
@pytest.mark.parametrize("variant", ["decode-2d", "decode-3d", "prefill"])
@pytest.mark.parametrize("bad_id", [-3, 10_000])
@pytest.mark.parametrize("tiles", ["one masked tile", "full tiles"])
def test_bad_block_ids_give_nan_rows_not_garbage(variant, bad_id, tiles):
    """Edge (masked) tiles mark bad keys per score; tiles every row sees (16-key KV tiles
    here, so sequence 1's first tile is one of them) by a scan of their table entries."""
    kw = {}
    if tiles == "full tiles":
        small = TileConfig(block_m=16, block_q=8, block_n=16, num_warps=4, num_stages=2)
        kw = dict(long=dataclasses.replace(SMALL_LONG, block_n=16)) if variant == "prefill" \
            else dict(short=dataclasses.replace(small, segments=VARIANTS[variant]["segments"]))
    run(variant, dtype=F32, head_size=32, block_table_edit=_corrupt(bad_id), **kw)


@interp
@pytest.mark.parametrize("segments", [1, 2])
@pytest.mark.parametrize("bad_id", [-3, 10_000])
def test_bad_block_ids_past_the_first_scanned_blocks(segments, bad_id):
    """The scan of the full tiles' table entries reads the first 128 before the KV loop
    and the rest after it: with 2-slot blocks, sequence 1 (700 keys, 2 queries) has 344
    blocks of full 16-key tiles, 176 + 168 with 2 segments (22 tiles each); entry 320 is past
    the first 128 of the one segment (1) or of the second (2). Its rows must be NaN."""
    def edit(table):
        table[1, 320] = bad_id
        return [1]
    small = TileConfig(block_m=16, block_q=8, block_n=16, num_warps=4, num_stages=2,
                       segments=segments)
    check_unified([1, 2, 1], [45, 700, 3], group=2, dtype=F32, head_size=32, block_size=2,
                  short=small, segments=segments, block_table_edit=edit)


@interp
@pytest.mark.parametrize("kv_load", ["pointer", "descriptor"])
def test_a_bad_block_id_spoils_exactly_the_rows_that_see_it(kv_load):
    """A bad id reads block 0 in its place; block 0 here holds NaN (a stale block). With
    a window of 20, sequence 0's tokens at positions 160..194 see the bad block's keys
    (160..175): exactly those rows are NaN; the rows past them (whose masked tiles still
    load those keys, with P = 0) match the float64 oracle."""
    from portattn.kernels import launch
    from portattn.options import normalize_options
    from portattn.testing import dense_attention, make_paged_batch, relative_error
    from portattn.types import AttentionMetadata

    batch = make_paged_batch([40, 5], [200, 70], num_q_heads=4, num_kv_heads=2,
                             head_size=32, block_size=16, dtype=torch.float32, seed=5)
    c = batch.cache
    cache = PagedKVCache(*(torch.cat([torch.full_like(t[:1], math.nan), t])
                           for t in (c.key_cache, c.value_cache)))
    table = batch.metadata.block_table + 1  # block 0: the NaN block, used by no sequence
    table[0, 10] = 10_000
    md = batch.metadata
    metadata = AttentionMetadata(md.cu_seqlens_q, md.seq_lens, table, md.max_seqlen_q,
                                 md.max_seqlen_k)
    options = normalize_options(batch.q, cache, sliding_window=20)
    params = {"mode": "prefill", "long": SMALL_LONG.as_dict()}
    if kv_load == "descriptor":
        params.update(kv_load="descriptor", _kv_load_forced=True)
    out = torch.full_like(batch.q, math.nan)
    launch.launch_unified(batch.q, cache, metadata, options, out, params)
    expected = dense_attention(batch.q.double(), batch.keys, batch.values, batch.query_lens,
                               scale=options.scale, sliding_window=20)
    sees = torch.zeros(45, dtype=torch.bool)
    sees[:35] = True
    assert torch.isnan(out[sees]).all()
    assert torch.isfinite(out[~sees]).all()
    assert relative_error(out[~sees].double(), expected[~sees]) < 2e-5


def _run_decode_plan(batch, metadata, out, segments, block_q=8):
    from portattn.backends.base import Plan
    from portattn.backends.triton_unified import TritonUnified
    from portattn.options import normalize_options

    short = dict(block_m=16, block_q=block_q, block_n=16, num_warps=4, num_stages=2,
                 segments=segments)
    TritonUnified().run(batch.q, batch.cache, metadata,
                        normalize_options(batch.q, batch.cache), out,
                        Plan("triton_unified", "decode", {"mode": "decode", "short": short}))


@interp
@pytest.mark.parametrize("segments", [1, 2])
def test_seq_len_past_the_block_table_gives_nan_rows(segments):
    """Sequence 0 has 45 keys (3 blocks of 16) but the table it is given is 2 blocks wide:
    its row comes out NaN (no read past the table), the others are right."""
    from portattn.testing import dense_attention, make_paged_batch, relative_error
    from portattn.types import AttentionMetadata

    batch = make_paged_batch([1, 1, 1], [45, 19, 3], num_q_heads=4, num_kv_heads=2,
                             head_size=32, dtype=F32)
    m = batch.metadata
    assert m.block_table.shape[1] == 3
    metadata = AttentionMetadata(m.cu_seqlens_q, m.seq_lens, m.block_table[:, :2].contiguous(),
                                 1, 45)
    out = torch.zeros(3, 4, 32)
    _run_decode_plan(batch, metadata, out, segments)
    assert torch.isnan(out[0]).all()
    expected = dense_attention(batch.q, batch.keys, batch.values, [1, 1, 1])
    assert relative_error(out[1:], expected[1:]) < 2e-5


@interp
@pytest.mark.parametrize("segments", [1, 2])
def test_understated_max_seqlen_q_gives_nan_rows(segments):
    """A decode plan (tiles of <= BLOCK_Q queries) used on a batch with a longer sequence:
    that sequence's rows come out NaN, the others are right."""
    from portattn.testing import dense_attention, make_paged_batch, relative_error
    from portattn.types import AttentionMetadata

    batch = make_paged_batch([1, 9, 1], [30, 40, 12], num_q_heads=4, num_kv_heads=2,
                             head_size=32, dtype=F32)
    m = batch.metadata
    metadata = AttentionMetadata(m.cu_seqlens_q, m.seq_lens, m.block_table, None, 40)
    out = torch.zeros(11, 4, 32)  # zeros: stale rows would pass a finiteness check
    _run_decode_plan(batch, metadata, out, segments)
    assert torch.isnan(out[1:10]).all()
    expected = dense_attention(batch.q, batch.keys, batch.values, [1, 9, 1])
    keep = torch.tensor([True] + [False] * 9 + [True])
    assert relative_error(out[keep], expected[keep]) < 2e-5


# --------------------------------------------------------------------------- write kernel
FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}


def quantize_reference(x: torch.Tensor, quant: KVQuant, which: str, storage: torch.dtype):
    """DESIGN.md's definitions, written independently of portattn.quant."""
    x = x.float()
    if quant.mode == "none":
        return x.to(storage), None
    # Both modes: quotients correctly rounded to fp32 (computed in fp64, rounded once), as
    # the write kernel's div_rn. torch's CUDA division by a scalar multiplies by the
    # reciprocal, one ulp away from the definition at times, which moves a code where the
    # quotient lies within that ulp of a rounding midpoint (the GPU's per-tensor write
    # tests failed so, at random, in session 28).
    if quant.mode == "fp8_per_tensor":
        scale = quant.k_scale if which == "k" else quant.v_scale
        s = torch.tensor(float(scale), dtype=torch.float32).double()  # the kernel's fp32
        y = (x.double() / s.to(x.device)).float()
        return y.clamp(-FP8_MAX[storage], FP8_MAX[storage]).to(storage), None
    limit = 127.0 if storage == torch.int8 else FP8_MAX[storage]
    scale = (x.abs().amax(-1).double() / limit).float()
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # zeros, or underflowed
    y = (x.double() / scale.double()[..., None]).float().clamp(-limit, limit)
    if storage == torch.int8:
        y = torch.round(y)
    return y.to(storage), scale


def _as_float(t, reference=None):
    if reference is not None and t.dtype in FP8_MAX:
        return undo_interpreter_fp8_carry(t.double(), reference.double(), t.dtype, "cpu")
    return t.double()


@interp
@pytest.mark.parametrize("layout,head_v", [("split", 64), ("packed", 64), ("diffkv", 40),
                                           ("split", 48)])
@pytest.mark.parametrize("quant", [None] + list(QUANTS))
def test_write_kernel_matches_plain_indexing(quant, layout, head_v):
    from portattn.kernels.write_launch import launch_cache_write

    quant = QUANTS.get(quant)
    gen = torch.Generator().manual_seed(3)
    cache = PagedKVCache.allocate(6, 4, 2, 64, head_size_v=head_v, dtype=F16, quant=quant,
                                  layout=layout)
    for t in (cache.key_cache, cache.value_cache):
        t.copy_(torch.full(t.shape, 7.0).to(t.dtype))  # untouched slots must keep this
    for t in (cache.k_scale_cache, cache.v_scale_cache):
        if t is not None:
            t.fill_(-1.0)
    k = torch.randn(7, 2, 64, generator=gen) * 3
    v = torch.randn(7, 2, head_v, generator=gen)
    k[4] = 0.0  # an all-zero token: per-token-head scale 1
    src_dtype = F32 if quant is not None else F16
    k, v = k.to(src_dtype), v.to(src_dtype)
    slots = torch.tensor([0, 5, -1, 9, 23, 12, 24])  # -1 and 24 (= capacity) are skipped
    launch_cache_write(cache, k, v, slots)

    written = {0: 0, 5: 1, 9: 3, 23: 4, 12: 5}
    for which, src, data, scales in (("k", k, cache.key_cache, cache.k_scale_cache),
                                     ("v", v, cache.value_cache, cache.v_scale_cache)):
        stored, want_scales = quantize_reference(src, cache.quant, which, data.dtype)
        flat = data.reshape(24, *data.shape[2:])
        for slot in range(24):
            got = flat[slot]
            if slot in written:
                want = stored[written[slot]]
                assert torch.equal(_as_float(got, want.double()), want.double()), (which, slot)
                if scales is not None:
                    assert torch.equal(scales.reshape(24, -1)[slot], want_scales[written[slot]])
            else:
                assert (got.double() == 7.0).all(), f"slot {slot} was written"
                if scales is not None:
                    assert (scales.reshape(24, -1)[slot] == -1.0).all()


@interp
@pytest.mark.parametrize("quant", [name for name in QUANTS if name != "fp8_tensor_e4m3"])
def test_write_kernel_keeps_a_nan_a_nan(quant):
    """A NaN in a token-head reads back as NaN (fp8 codes NaN, per-token-head scales NaN);
    the token-heads without one are stored as the definitions say. (On a GPU a plain
    min / max would turn it into +-QMAX: the interpreter's NumPy does not, so the int8
    scale is what this catches here; the GPU tier runs every mode. Not e4m3 per-tensor
    here: the interpreter's bitwise float -> e4m3fn cast makes a NaN 384.)"""
    from portattn.kernels.write_launch import launch_cache_write

    quant = QUANTS[quant]
    cache = PagedKVCache.allocate(4, 4, 2, 40, dtype=F16, quant=quant)  # padded to 64
    gen = torch.Generator().manual_seed(8)
    k, v = torch.randn(3, 2, 40, generator=gen), torch.randn(3, 2, 40, generator=gen)
    k[1, 0, 7] = math.nan
    v[2, 1, 0] = math.nan
    slots = torch.tensor([2, 6, 13])
    launch_cache_write(cache, k, v, slots)
    for which, src, data, scales in (("k", k, cache.key_cache, cache.k_scale_cache),
                                     ("v", v, cache.value_cache, cache.v_scale_cache)):
        bad = torch.isnan(src).any(-1)
        stored = take(data.reshape(16, 2, 40), slots)
        codes = stored.float()
        if scales is None:
            assert torch.isnan(codes[torch.isnan(src)]).all()
        else:
            flat_scales = scales.reshape(16, 2)[slots]
            assert torch.isnan(flat_scales[bad]).all() and torch.isfinite(flat_scales[~bad]).all()
        want, want_scales = quantize_reference(src[~bad], cache.quant, which, data.dtype)
        assert torch.equal(_as_float(take(stored, ~bad), want.double()), want.double())
        if scales is not None:
            assert torch.equal(flat_scales[~bad], want_scales)


@interp
@pytest.mark.parametrize("quant", ["int8_token_head", "fp8_token_head", "fp8_token_head_e5m2"])
def test_write_kernel_takes_strided_slots_and_tiny_token_heads(quant):
    """Slots as a column of a wider tensor (stride 2) land where they say; a token-head
    whose absmax / max underflows to 0 in float32 gets scale 1 and finite codes, never the
    NaN of 0 / 0 (session 41's audit: e4m3 / e5m2 per-token-head gave NaN codes). Its
    tiny values themselves are float32 subnormals, which the interpreter's float -> fp8
    cast mis-rounds (not to 0): they are checked finite here, exact in the GPU tier and in
    test_cache.py (the PyTorch write)."""
    from portattn.kernels.write_launch import launch_cache_write

    quant = {"fp8_token_head_e5m2": KVQuant.fp8_per_token_head(E5M2)}.get(quant) or \
        QUANTS[quant]
    cache = PagedKVCache.allocate(4, 4, 2, 32, dtype=F16, quant=quant)
    gen = torch.Generator().manual_seed(4)
    k, v = torch.randn(3, 2, 32, generator=gen), torch.randn(3, 2, 32, generator=gen)
    k[1, 0] = 0.0
    k[1, 0, 3] = 1e-42  # absmax / 57344 underflows to 0 in float32, / 448 and / 127 do not
    v[2, 1] = 0.0
    v[2, 1, 0] = -1e-44  # / 448 and / 127 underflow too
    table = torch.tensor([[2, 0], [7, 0], [13, 0]])
    slots = table[:, 0]
    assert slots.stride(0) == 2
    launch_cache_write(cache, k, v, slots)
    for which, src, data, scales in (("k", k, cache.key_cache, cache.k_scale_cache),
                                     ("v", v, cache.value_cache, cache.v_scale_cache)):
        want, want_scales = quantize_reference(src, cache.quant, which, data.dtype)
        stored = take(data.reshape(16, 2, 32), torch.tensor([2, 7, 13]))
        normal = (src.abs() > 1e-30) | (src == 0)
        assert torch.equal(_as_float(stored, want.double())[normal], want.double()[normal])
        assert torch.equal(scales.reshape(16, 2)[[2, 7, 13]], want_scales)
        assert torch.isfinite(stored.float()).all()
    if quant.mode == "fp8_per_token_head":
        assert cache.v_scale_cache.reshape(16, 2)[13, 1] == 1.0
    if quant.key.endswith("e5m2"):
        assert cache.k_scale_cache.reshape(16, 2)[7, 0] == 1.0


@interp
def test_write_through_the_cache_uses_the_kernel_on_gpu_only():
    """On the CPU ``write`` stays in PyTorch and still value-checks slots."""
    import portattn

    cache = PagedKVCache.allocate(2, 4, 1, 32)
    with pytest.raises(portattn.InputError, match="^slot_mapping: expected slots in"):
        cache.write(torch.randn(1, 1, 32, dtype=F16), torch.randn(1, 1, 32, dtype=F16),
                    torch.tensor([8]))


@pytest.mark.parametrize("fake", [
    dict(hip=None, major=8, minor=0, expected=False), dict(hip=None, major=8, minor=6,
                                                            expected=False),
    dict(hip=None, major=8, minor=9, expected=True), dict(hip=None, major=9, minor=0,
                                                           expected=True),
    dict(hip="6.2", arch="gfx942:sramecc+:xnack-", expected=False),
    dict(hip="6.2", arch="gfx950", expected=True), dict(hip="6.2", arch="gfx1201",
                                                        expected=True)], ids=str)
def test_converts_fp8_by_gpu(fake, monkeypatch):
    """Which GPUs get the fp8 write kernel (simulated device properties); the CPU never."""
    import types

    import portattn.devices as devices

    assert devices.converts_fp8(torch.device("cpu"), E4M3) is False
    props = types.SimpleNamespace(major=fake.get("major", 9), minor=fake.get("minor", 4),
                                  gcnArchName=fake.get("arch", ""))
    monkeypatch.setattr(torch.version, "hip", fake["hip"])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    devices._converts_fp8.cache_clear()  # answers are kept per device; these are simulated
    try:
        assert devices.converts_fp8(torch.device("cuda", 0), E4M3) is fake["expected"]
    finally:
        devices._converts_fp8.cache_clear()


# --------------------------------------------------------------------------- reasons
def test_diffkv_backend_reasons():
    from portattn.backends.triton_diffkv import TritonDiffKV
    from portattn.capabilities import probe
    from portattn.dispatch.problem import Problem

    caps = probe(simulate="sm90")
    backend = TritonDiffKV()
    assert backend.why_not(Problem.make(head_size=192, head_size_v=128), caps) == []
    assert backend.why_not(Problem.make(head_size=96, head_size_v=64,
                                        kv_quant="int8_per_token_head"), caps) == []
    equal = backend.why_not(Problem.make(head_size=128), caps)
    assert any("equal (128): this backend takes differing ones (triton_unified takes "
               "equal ones)" in r for r in equal), equal
    odd = backend.why_not(Problem.make(head_size=192, head_size_v=100), caps)
    assert any("V head size 100" in r for r in odd), odd
    big = backend.why_not(Problem.make(head_size=264, head_size_v=128), caps)
    assert any("head size 264" in r for r in big), big
    assert backend.unavailable(caps) == []


@pytest.mark.parametrize("profile", ["sm89", "sm90", "sm100", "gfx950"])
def test_quantized_and_diffkv_decode_route_to_our_kernels(profile):
    from portattn.capabilities import probe
    from portattn.dispatch import Problem, decide

    caps = probe(simulate=profile)
    for kv_quant in ("fp8_per_tensor:e4m3fn", "int8_per_token_head", "fp8_per_token_head"):
        assert decide(Problem.make(kv_quant=kv_quant, num_seqs=32), caps).backend == \
            "triton_unified"
    diffkv = decide(Problem.make(head_size=192, head_size_v=128, kv_quant="fp8_per_tensor"),
                    caps)
    assert diffkv.backend == "triton_diffkv"


def test_fp8_dot_only_where_fp8_tensor_cores_exist():
    from portattn.backends.triton_unified import TritonUnified
    from portattn.capabilities import probe
    from portattn.dispatch.problem import Problem

    problem = Problem.make(dtype="e4m3fn", out_dtype="bfloat16", kv_quant="fp8_per_tensor")
    assert TritonUnified().plan(problem, probe(simulate="sm90")).params.get("fp8_dot")
    assert not TritonUnified().plan(problem, probe(simulate="gfx950")).params.get("fp8_dot")
    other = Problem.make(dtype="e4m3fn", out_dtype="bfloat16", kv_quant="int8_per_token_head")
    assert not TritonUnified().plan(other, probe(simulate="sm90")).params.get("fp8_dot")


# ------------------------------------- 8-bit V read as int16 pairs of codes (V_PAIRS)
@interp
@pytest.mark.parametrize("kv_bits", [False, True])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("quant", list(QUANTS))
def test_v_read_as_pairs_of_codes(quant, variant, kv_bits):
    """The kernel's V_PAIRS: V's even and odd head columns from one int16 load, every
    8-bit mode and launch variant, with the conversion unit and with the codes rebuilt."""
    run(variant, quant=QUANTS[quant], dtype=F16, head_size=64, v_pairs=True,
        kv_bits=kv_bits, sinks=variant == "mixed")


@interp
@pytest.mark.parametrize("feature", list(FEATURE_KW))
@pytest.mark.parametrize("quant", ["fp8_tensor_e5m2", "int8_token_head"])
def test_v_read_as_pairs_features(quant, feature):
    run("decode-3d", group=3, quant=QUANTS[quant], dtype=F16, head_size=64, v_pairs=True,
        **FEATURE_KW[feature])


@interp
@pytest.mark.parametrize("quant", ["fp8_tensor_e4m3", "fp8_token_head"])
@pytest.mark.parametrize("case", ["descriptor", "diffkv", "fp8_out", "fp32", "head-40",
                                  "odd-head-v"])
def test_v_read_as_pairs_with_other_switches(quant, case):
    """... and an odd V head size, which no int16 view holds: read byte-wise instead."""
    kw = {"descriptor": dict(kv_load="descriptor"), "diffkv": dict(head_size_v=32),
          "fp8_out": dict(fp8_out=E5M2), "fp32": dict(dtype=F32),
          "head-40": dict(head_size=40), "odd-head-v": dict(head_size_v=33)}[case]
    run("mixed" if case == "fp32" else "decode-3d", quant=QUANTS[quant],
        **{"dtype": F16, "head_size": 64, "v_pairs": True, **kw})


def test_v_pairs_need_an_even_v_layout():
    """V_PAIRS reads V through an int16 view: a V cache whose strides or offset are odd
    (in bytes) cannot be viewed so, and the launch reads it byte-wise instead."""
    from portattn.kernels.launch import _as_pairs, v_pairs_code

    base = torch.zeros(4, 16, 2, 65, dtype=torch.uint8)
    assert _as_pairs(base[..., :64]) is None          # an odd slot stride
    assert _as_pairs(base[..., 1:65]) is None         # an odd offset
    even = torch.zeros(4, 16, 2, 64, dtype=torch.uint8)
    paired = _as_pairs(even)
    assert paired is not None and paired.dtype == torch.int16 and paired.shape[-1] == 32
    assert paired.stride() == (16 * 2 * 32, 2 * 32, 32, 1)
    assert v_pairs_code(E4M3, None) == 4 and v_pairs_code(E4M3, "e4m3fn") == 1
    assert v_pairs_code(E5M2, None) == 2 and v_pairs_code(torch.int8, "int8") == 3
    assert v_pairs_code(torch.bfloat16, None) == 0


def test_a_v_cache_without_an_int16_view_drops_the_paired_register_cap(monkeypatch):
    """When V cannot be viewed as int16 pairs, the launch reads it byte-wise and without
    the register cap measured for the paired tile (the uncapped byte-wise tile)."""
    from portattn.kernels import heuristics, launch
    from portattn.options import normalize_options
    from portattn.testing import make_paged_batch

    batch = make_paged_batch([1, 1], [40, 9], num_q_heads=8, num_kv_heads=2, head_size=128,
                             dtype=F16, quant=QUANTS["fp8_tensor_e4m3"])
    shape = heuristics.Shape(8, 2, 128, 1, 1, 64, 2, 132, "sm90", 128, "fp8_per_tensor")
    params = heuristics.plan_launch(shape)
    assert params["v_pairs"] and params["short"]["maxnreg"] == 128
    seen = []
    monkeypatch.setattr(launch, "_launch_modes",
                        lambda q, cache, md, out, p, args, ws: seen.append((p, args)))
    out = torch.empty_like(batch.q)
    options = normalize_options(batch.q, batch.cache)
    launch.launch_unified(batch.q, batch.cache, batch.metadata, options, out, params)
    monkeypatch.setattr(launch, "_as_pairs", lambda v: None)
    launch.launch_unified(batch.q, batch.cache, batch.metadata, options, out, params)
    (paired, paired_args), (bytewise, bytewise_args) = seen
    assert paired_args["V_PAIRS"] == 4 and paired["short"]["maxnreg"] == 128
    assert paired_args["stride_vs"] * 2 == batch.cache.value_cache.stride(1)
    assert bytewise_args["V_PAIRS"] == 0 and "maxnreg" not in bytewise["short"]
    assert bytewise_args["stride_vs"] == batch.cache.value_cache.stride(1)
    assert params["short"]["maxnreg"] == 128  # the plan itself is not changed
