"""Staged prefill (``kernels/stage.py``): the staging kernel against plain indexing, the
staged attention (descriptor loads over 16-bit staged blocks) against the float64 oracle
in the interpreter, and the plan's rule for when to stage.

The interpreter's bf16 dots are wrong (DEVICE.md), so attention cases run fp16 here; bf16
and the real tiles run in ``tests/gpu/test_staged_prefill_gpu.py``.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from portattn import KVQuant
from portattn.kernels import heuristics
from portattn.kernels.heuristics import TileConfig
from portattn.kernels.kv_load import KV_LOAD_CODES
from portattn.kernels.stage_launch import StagedCache
from portattn.testing import make_paged_batch

from unified_check import FEATURE_KW, check_unified

F16 = torch.float16
SMALL_LONG = TileConfig(block_m=32, block_q=16, block_n=16, num_warps=4, num_stages=2)
QUANTS = {
    "none": None,
    "fp8_tensor_e4m3": KVQuant.fp8_per_tensor(0.02, 0.03),
    "fp8_tensor_e5m2": KVQuant.fp8_per_tensor(0.05, 0.01, torch.float8_e5m2),
    "int8_token_head": KVQuant.int8_per_token_head(),
    "fp8_token_head": KVQuant.fp8_per_token_head(),
}
VARIANTS = {
    "prefill": dict(query_lens=[13, 6], seq_lens=[41, 6], mode="prefill"),
    "mixed": dict(query_lens=[1, 19, 1, 3], seq_lens=[30, 45, 12, 20], mode="mixed",
                  segments=2),
}

interp = pytest.mark.interpreter


@pytest.fixture
def stage_calls(monkeypatch):
    """How many times the staging kernel was launched (the staged path really ran)."""
    from portattn.kernels import launch

    calls = []
    original = launch.stage_kv

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(launch, "stage_kv", counting)
    return calls


def run(variant, stage=32, group=2, **kw):
    case = dict(VARIANTS[variant])
    case["long"] = dataclasses.replace(SMALL_LONG, block_q=SMALL_LONG.block_m // group)
    case.update(kw)
    return check_unified(case.pop("query_lens"), case.pop("seq_lens"), group=group,
                         stage=stage, **case)


# --------------------------------------------------------------------------- the kernel
def _stage_alone(batch, sliding_window=None, short_q=0, block=32, min_q=None, slots=None):
    from portattn.kernels.stage_launch import stage_kv, stage_workspace_size
    from portattn.options import normalize_options

    cache, metadata = batch.cache, batch.metadata
    max_k = heuristics.next_pow2(max(batch.seq_lens))
    stage = {"block": block, "sblocks": heuristics.cdiv(max_k, block)}
    if min_q is not None:
        stage["min_q"] = min_q
    num_seqs = len(batch.seq_lens)
    slots = num_seqs if slots is None else slots
    size = stage_workspace_size(num_seqs, slots, cache.num_kv_heads, cache.head_size_qk,
                                cache.head_size_v, stage, cache.quant.per_token_head)
    # NaN as fp16 pairs: NaN read as 16-bit staged values and as fp32 scales alike
    workspace = torch.full((2 * size,), math.nan, dtype=F16).view(torch.float32)
    options = normalize_options(batch.q, cache, sliding_window=sliding_window)
    staged, meta = stage_kv(batch.q, cache, metadata, options, stage,
                            heuristics.staged_from(stage, short_q), slots, workspace)
    return staged, meta, stage


def _reference_rows(cache, table_row, keys, which):
    """Cache rows of ``keys`` by plain indexing: ``[len(keys), Hkv, D]`` (codes)."""
    data = cache.key_cache if which == "k" else cache.value_cache
    bs = cache.block_size
    return torch.stack([data[int(table_row[k // bs]), k % bs] for k in keys])


@interp
@pytest.mark.parametrize("dtype", [F16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("quant", list(QUANTS))
def test_staging_copies_the_visible_keys_as_values(quant, dtype):
    """Every visible key's K and V codes land in staged block ``b * sblocks + k // 32``,
    slot ``k % 32`` as values of q's dtype (exact), per-token-head scales beside them
    (fp16) or multiplied in (bf16: ``code * scale`` rounded once); the staged table names
    those blocks; other slots of a visited staged block are zero."""
    batch = make_paged_batch([5, 3], [70, 33], num_q_heads=4, num_kv_heads=2, head_size=40,
                             block_size=16, dtype=dtype, quant=QUANTS[quant], seed=3)
    staged, meta, stage = _stage_alone(batch)
    dequantized = batch.cache.quant.per_token_head and dtype == torch.bfloat16
    assert (staged.k_scale_cache is None) == (not batch.cache.quant.per_token_head
                                              or dequantized)
    assert staged.quant.per_token_head == (batch.cache.quant.per_token_head
                                           and not dequantized)
    sblocks = stage["sblocks"]
    table = batch.metadata.block_table
    expected_table = torch.arange(2 * sblocks, dtype=torch.int32).view(2, sblocks)
    assert torch.equal(meta.block_table, expected_table)
    for b, n in enumerate(batch.seq_lens):
        keys = list(range(n))
        rows = staged.key_cache.view(2, sblocks * 32, 2, 40)[b]
        vrows = staged.value_cache.view(2, sblocks * 32, 2, 40)[b]
        for which, got in (("k", rows), ("v", vrows)):
            want = _reference_rows(batch.cache, table[b], keys, which).float()
            if dequantized:  # the interpreter truncates fp32 -> bf16: one ulp (2^-7)
                src = batch.cache.k_scale_cache if which == "k" else batch.cache.v_scale_cache
                bs = batch.cache.block_size
                scale = torch.stack([src[int(table[b][k // bs]), k % bs] for k in keys])
                want = want * scale[:, :, None]
                torch.testing.assert_close(got[:n].float(), want, rtol=2 ** -7, atol=0)
            else:
                assert torch.equal(got[:n].float(), want), which
            tail = -(-n // 32) * 32
            assert torch.equal(got[n:tail].float(), torch.zeros_like(got[n:tail].float()))
        if staged.k_scale_cache is not None:
            for which, scales, src in (("k", staged.k_scale_cache, batch.cache.k_scale_cache),
                                       ("v", staged.v_scale_cache, batch.cache.v_scale_cache)):
                got = scales.view(2, sblocks * 32, 2)[b][:n]
                bs = batch.cache.block_size
                want = torch.stack([src[int(table[b][k // bs]), k % bs] for k in keys])
                assert torch.equal(got, want), which


@interp
def test_staging_skips_keys_outside_the_window_and_short_sequences():
    """Keys before the first query's window are not read (their block-table entries may be
    freed: set to -1 here) and short sequences of a mixed batch are not staged."""
    batch = make_paged_batch([4, 1], [70, 40], num_q_heads=4, num_kv_heads=2, head_size=32,
                             block_size=16, dtype=F16, seed=4)
    table = batch.metadata.block_table
    table[0, 0] = -1  # keys 0-15: before sequence 0's window (70 - 4 - 20 + 1 = 47)
    table[0, 1] = -1  # keys 16-31
    staged, meta, stage = _stage_alone(batch, sliding_window=20, short_q=1)
    rows = staged.key_cache.view(2, stage["sblocks"] * 32, 2, 32)
    first = 70 - 4 - 20 + 1
    want = _reference_rows(batch.cache, table[0], range(first, 70), "k").float()
    assert torch.equal(rows[0, first:70].float(), want)
    assert not torch.isnan(rows[0, 32:first].float()).any()  # a visited block: zeros
    assert torch.isnan(rows[1].float()).all()  # the short sequence: never written


@interp
@pytest.mark.parametrize("slots", [2, 1])
def test_staging_packs_the_staged_sequences(slots):
    """With ``min_q`` 5, sequences 1 and 3 (9 and 12 queries) are staged, into slots 0 and
    1 in batch order; the others' table rows and keys are never written. A sequence past
    the workspace's slots (cu_seqlens_q claiming more tokens than the call has) gets -1
    table entries, never another sequence's blocks."""
    batch = make_paged_batch([2, 9, 1, 12], [20, 40, 10, 50], num_q_heads=4, num_kv_heads=2,
                             head_size=32, block_size=16, dtype=F16, seed=6)
    staged, meta, stage = _stage_alone(batch, min_q=5, slots=slots)
    sblocks = stage["sblocks"]
    table = meta.block_table
    assert table.shape == (4, sblocks)
    assert torch.equal(table[1], torch.arange(sblocks, dtype=torch.int32))
    if slots == 2:
        assert torch.equal(table[3], torch.arange(sblocks, 2 * sblocks, dtype=torch.int32))
    else:
        assert torch.equal(table[3], torch.full((sblocks,), -1, dtype=torch.int32))
    for b in (0, 2):  # not staged: the NaN fill of the workspace, as int32
        assert (table[b] >= 4 * sblocks).all() or (table[b] < -1).all()
    rows = staged.key_cache.view(slots, sblocks * 32, 2, 32)
    for slot, b in enumerate((1, 3)[:slots]):
        n = batch.seq_lens[b]
        want = _reference_rows(batch.cache, batch.metadata.block_table[b], range(n), "k")
        assert torch.equal(rows[slot, :n].float(), want.float())


@interp
@pytest.mark.parametrize("bad_id", [-3, 10_000])
def test_staging_marks_bad_block_ids(bad_id):
    """A visible key whose block-table entry is out of range stages NaN K and zero V."""
    batch = make_paged_batch([3], [40], num_q_heads=2, num_kv_heads=1, head_size=32,
                             block_size=16, dtype=F16, seed=5)
    batch.metadata.block_table[0, 1] = bad_id
    staged, _, _ = _stage_alone(batch)
    k = staged.key_cache.view(-1, 32).float()[:40]
    v = staged.value_cache.view(-1, 32).float()[:40]
    assert torch.isnan(k[16:32]).all() and not torch.isnan(k[:16]).any()
    assert torch.equal(v[16:32], torch.zeros_like(v[16:32]))


# --------------------------------------------------------------------------- attention
@interp
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("quant", list(QUANTS))
def test_staged_attention_quant_modes(quant, variant, stage_calls):
    run(variant, quant=QUANTS[quant], dtype=F16, head_size=64)
    assert stage_calls


@interp
@pytest.mark.parametrize("feature", list(FEATURE_KW))
@pytest.mark.parametrize("quant", ["none", "fp8_tensor_e4m3", "int8_token_head"])
def test_staged_attention_features(quant, feature, stage_calls):
    run("prefill", quant=QUANTS[quant], dtype=F16, head_size=32, **FEATURE_KW[feature])
    assert stage_calls


@pytest.fixture
def staged_switches(monkeypatch):
    """``(ONE_LOOP, KV_LOAD)`` of every unified-kernel launch, as the kernel received them."""
    from portattn.kernels import launch

    seen = []
    kernel = launch.unified_attention_kernel

    class Spy:
        def __getitem__(self, grid):
            def call(*args, **kwargs):
                seen.append((kwargs.get("ONE_LOOP"), kwargs.get("KV_LOAD")))
                return kernel[grid](*args, **kwargs)
            return call

    monkeypatch.setattr(launch, "unified_attention_kernel", Spy())
    return seen


@interp
@pytest.mark.parametrize("one_loop", [False, True])
def test_staged_e5m2_token_heads_keep_fp16_precision(one_loop, stage_calls, monkeypatch):
    """Staged e5m2 per-token-head codes (16-bit values beside the scales, KV_QUANT 2) get
    the kernel's V_SC_BOOST as the cache's do: the launcher reads the quant's format, not
    the staged tensors' dtype (relative error 1.9e-3 without it, e4m3fn's 2.9e-4 with)."""
    from portattn import KVQuant
    from portattn.kernels import launch

    boosts = []
    kernel = launch.unified_attention_kernel

    class Spy:
        def __getitem__(self, grid):
            def call(*args, **kwargs):
                if kwargs.get("KV_LOAD") in (2, 3):
                    boosts.append(kwargs.get("V_SC_BOOST"))
                return kernel[grid](*args, **kwargs)
            return call

    monkeypatch.setattr(launch, "unified_attention_kernel", Spy())
    run("prefill", quant=KVQuant.fp8_per_token_head(torch.float8_e5m2), dtype=F16,
        head_size=64, sinks=True, one_loop=one_loop, tolerance=1e-3,
        query_lens=[40, 3], seq_lens=[173, 60])
    assert stage_calls and boosts and all(b == launch.E5M2_V_SCALE_BOOST for b in boosts)


@interp
@pytest.mark.parametrize("one_loop", [False, True])
@pytest.mark.parametrize("feature", [None, *FEATURE_KW, "wide_window"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("quant", ["none", "fp8_tensor_e4m3", "int8_token_head"])
def test_one_or_three_loops_match_the_oracle(quant, variant, feature, one_loop, stage_calls,
                                             staged_switches):
    """The staged launch with ONE_LOOP (edge tiles masked inside the full tiles' loop, the
    plan's choice) and without (three loops) with every score feature, per-tensor and
    per-token-head caches, prefill and mixed, against the float64 oracle; the switch
    reached the staged launch (descriptor loads) and no other. ``wide_window``: a window
    wide enough for a leading edge tile, full tiles and the diagonal in one query tile."""
    if feature == "wide_window":
        kw = dict(query_lens=[40, 20], seq_lens=[100, 60], sliding_window=64)
    else:
        kw = FEATURE_KW[feature] if feature else {}
    run(variant, quant=QUANTS[quant], dtype=F16, head_size=32, one_loop=one_loop, **kw)
    assert stage_calls
    staged = [sw for sw in staged_switches if sw[1] in (2, 3)]
    assert staged and all(sw[0] is one_loop for sw in staged)
    assert all(not sw[0] for sw in staged_switches if sw[1] not in (2, 3))


def _interpreter_counts_descriptor_strides_in_elements() -> bool:
    """Triton 3.5's interpreter asserts that a descriptor's strides are multiples of 16
    ELEMENTS (3.6 checks bytes, as the hardware's tensor maps need): a head of 40 fp16
    values (80 bytes a row) fails there although a GPU accepts it."""
    import triton

    major, minor = (int(p) for p in triton.__version__.split(".")[:2])
    return (major, minor) < (3, 6)


@interp
def test_staged_attention_non_pow2_heads_gqa_and_diffkv(stage_calls):
    if _interpreter_counts_descriptor_strides_in_elements():
        import triton

        pytest.skip(f"Triton {triton.__version__}'s interpreter checks descriptor strides "
                    "in elements, not bytes (heads 40 / 48 / 32 fp16 rows are 16-byte "
                    "aligned, as a GPU's tensor maps need)")
    run("mixed", dtype=F16, head_size=40, group=3, quant=QUANTS["fp8_tensor_e4m3"])
    run("prefill", dtype=F16, head_size=48, head_size_v=32, quant=QUANTS["int8_token_head"])
    assert len(stage_calls) == 2


@pytest.fixture
def nan_workspaces(monkeypatch):
    """Every floating-point ``torch.empty`` comes back NaN-filled, the staging workspace
    included: rows the staging kernel does not write cannot pass for zeros."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(math.nan)
        return t

    monkeypatch.setattr(torch, "empty", empty)


@interp
@pytest.mark.parametrize("load", ["staged_host", "staged", "descriptor"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_read_of_the_staged_keys(load, variant, stage_calls, monkeypatch,
                                       nan_workspaces):
    """The staged keys read as rows of host-built or kernel-built 3-D descriptors
    (``KV_LOAD`` 3 / 2) or through the staged block table (``KV_LOAD`` 1, 4-D boxes), with
    the features that move the visible range (window, sinks) and per-token-head scales
    copied beside the codes (fp16 q), from a NaN-filled workspace (the row loads do not
    zero masked keys: what they read must have been written): each against the float64
    oracle."""
    from portattn.kernels import launch

    seen = []
    original = launch._launch_long
    monkeypatch.setattr(launch, "_launch_long",
                        lambda args, *a: (seen.append(args["KV_LOAD"]), original(args, *a)))
    run(variant, dtype=F16, head_size=32, quant=QUANTS["int8_token_head"],
        stage_kv_load=load, **FEATURE_KW["window"])
    run(variant, dtype=F16, head_size=32, stage_kv_load=load, **FEATURE_KW["sinks"])
    assert stage_calls and set(seen) == {KV_LOAD_CODES[load]}


@interp
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("load", ["staged_host", "staged", "descriptor"])
def test_an_understated_max_seqlen_k_gives_nan_rows_not_other_keys(load, causal,
                                                                   nan_workspaces):
    """Staging copies the plan's ``max_seqlen_k`` keys per sequence (64 here); sequence 0
    has 70. Rows that see keys past the staged ones are NaN (never another sequence's
    keys or stale workspace rows); the others match the float64 oracle."""
    from portattn.kernels import launch
    from portattn.options import normalize_options
    from portattn.testing import dense_attention, relative_error

    batch = make_paged_batch([40, 8], [70, 30], num_q_heads=4, num_kv_heads=2,
                             head_size=32, block_size=16, dtype=F16, seed=3)
    options = normalize_options(batch.q, batch.cache, causal=causal)
    long = TileConfig(block_m=32, block_q=16, block_n=16, num_warps=4,
                      num_stages=2).as_dict()
    params = {"mode": "prefill", "long": long, "stage": {"block": 32, "sblocks": 2},
              "stage_long": long, "stage_kv_load": load, "_kv_load_forced": True}
    out = torch.full_like(batch.q, math.nan)
    launch.launch_unified(batch.q, batch.cache, batch.metadata, options, out, params)
    expected = dense_attention(batch.q.double(), batch.keys, batch.values, batch.query_lens,
                               scale=options.scale, causal=causal)
    # sequence 0: tokens 0..39 at positions 30..69; causal rows of positions >= 64 (tokens
    # 34..39) see unstaged keys, non-causal every row of it does; sequence 1 is whole
    sees_more = torch.zeros(48, dtype=torch.bool)
    sees_more[34 if causal else 0:40] = True
    assert torch.isnan(out[sees_more]).all()
    assert torch.isfinite(out[~sees_more]).all()
    assert relative_error(out[~sees_more].double(), expected[~sees_more]) < 3e-3


@interp
@pytest.mark.parametrize("bad_id", [-3, 10_000])
@pytest.mark.parametrize("load", ["staged_host", "descriptor"])
def test_staged_attention_bad_block_ids_give_nan_rows(bad_id, load):
    def corrupt(table):
        table[0, 0] = bad_id  # sequence 0's first keys: every row of it sees them
        return [0]

    run("prefill", dtype=F16, head_size=32, block_table_edit=corrupt, stage_kv_load=load)


# --------------------------------------------------------------------------- the plan's rule
def _shape(**kw):
    base = dict(num_q_heads=32, num_kv_heads=8, head_size=128, elem_bytes=2,
                max_seqlen_q=8192, max_seqlen_k=8192, num_seqs=1, sm_count=132, arch="sm90")
    base.update(kw)
    return heuristics.Shape(**base)


MEASURED = ({"arch": "sm90", "heads": ((128, 128),), "block_sizes": (16, 256),
             "evidence": "test"},)


def test_staging_rule():
    def reasons(shape, mode="prefill", block_size=16, q_bits=16):
        return heuristics.staging_reasons(shape, mode, block_size, q_bits, MEASURED)

    assert reasons(_shape()) == []
    assert reasons(_shape(elem_bytes=1, kv_quant="fp8_per_tensor"), block_size=256) == []
    assert reasons(_shape(), mode="mixed") == []
    assert any("decode" in r for r in reasons(_shape(), mode="decode"))
    assert any("float16" in r for r in reasons(_shape(), q_bits=32))
    assert any("max_seqlen_q 512" in r for r in reasons(_shape(max_seqlen_q=512)))
    # one sequence's keys staged decide it, not the batch's: 64 x 16384 keys is 4 GiB
    assert reasons(_shape(num_seqs=64, max_seqlen_k=16384)) == []
    assert any("MiB" in r for r in reasons(_shape(max_seqlen_k=1 << 20)))
    assert any("STAGED_PREFERRED" in r for r in reasons(_shape(), block_size=64))
    assert any("STAGED_PREFERRED" in r for r in reasons(_shape(arch="sm80")))
    assert any("STAGED_PREFERRED" in r for r in reasons(_shape(head_size=64)))


def test_workspace_size_covers_the_staged_tensors():
    shape = _shape(num_seqs=3, max_seqlen_k=1000, kv_quant="int8_per_token_head",
                   elem_bytes=1)
    stage = heuristics.stage_config(shape)
    from portattn.kernels.stage_launch import stage_workspace_size

    elems = stage_workspace_size(3, 2, 8, 128, 128, stage, True)
    assert elems * 4 >= heuristics.stage_bytes(shape, stage, 2)
    assert stage == {"block": 128, "sblocks": 8, "min_q": 512}
    # K and V codes widened to 16 bits plus fp32 scales, for 2 of 3 sequences' 1024 slots
    assert elems * 4 >= 2 * 1024 * 8 * (2 * 128 * 2 + 2 * 4)


@pytest.mark.parametrize("head_size,tile", [(64, (128, 128, 4, 3)), (128, (128, 128, 8, 3)),
                                            (256, (128, 64, 8, 2))])
def test_staged_tiles_follow_the_sweep(head_size, tile):
    """The staged loop's tiles per head (heuristics.STAGED_TILES, the H200 sweep), whole
    GQA groups per tile, inside one staged block and the shared-memory budget."""
    for group in (1, 4, 8):
        shape = _shape(head_size=head_size, num_kv_heads=32 // group)
        cfg = heuristics.staged_long_config(shape)
        assert (cfg["block_m"], cfg["block_n"], cfg["num_warps"], cfg["num_stages"]) == tile
        assert cfg["block_q"] * group == cfg["block_m"]
        assert heuristics.STAGE_BLOCK % cfg["block_n"] == 0
        # the flat grid where it measured faster (heads 64 and 256), else the 2-D one
        assert cfg.pop("flat_grid", False) is (head_size != 128)
        assert cfg.pop("one_loop", False) is (head_size != 64)
        fit = TileConfig(**cfg).smem_bytes(shape.head_pad, 2)
        assert fit <= heuristics.shared_memory_budget("sm90")


@interp
def test_staged_launch_falls_back_to_pointer_loads_unless_forced(monkeypatch):
    """Where the staged blocks cannot back descriptors, an auto plan reads them with
    pointer loads (the float64 oracle's result, as the cache read in the loop gives); a
    forced one raises InputError naming the cache before any attention launch."""
    from portattn.errors import InputError
    from portattn.kernels import launch
    from portattn.options import normalize_options
    from portattn.testing import dense_attention, relative_error

    batch = make_paged_batch([9, 4], [40, 20], num_q_heads=4, num_kv_heads=2, head_size=32,
                             block_size=16, dtype=F16, seed=7)
    options = normalize_options(batch.q, batch.cache)
    long = dataclasses.replace(SMALL_LONG, block_q=SMALL_LONG.block_m // 2).as_dict()
    base = {"mode": "prefill", "long": long}
    staged = {**base, "stage": {"block": 32, "sblocks": 2}, "stage_long": long}
    monkeypatch.setattr(launch, "descriptor_launch_reasons",
                        lambda cache, params: ["a test says no"])
    outs = []
    for params in (base, staged):
        out = torch.full_like(batch.q, math.nan)
        launch.launch_unified(batch.q, batch.cache, batch.metadata, options, out, params)
        outs.append(out)
    expected = dense_attention(batch.q.double(), batch.keys, batch.values, batch.query_lens,
                               scale=options.scale)
    for out in outs:
        assert relative_error(out.double(), expected) < 3e-3
    with pytest.raises(InputError, match="a test says no"):
        launch.launch_unified(batch.q, batch.cache, batch.metadata, options, outs[1],
                              {**staged, "_kv_load_forced": True})


@interp
@pytest.mark.parametrize("variant,query_lens,seq_lens,min_q", [
    ("prefill", [3, 9, 1, 12, 2, 1], [20, 40, 10, 50, 8, 5], 8),
    ("mixed", [1, 10, 3, 16, 1, 2], [30, 40, 10, 50, 7, 9], 12),
])
@pytest.mark.parametrize("load", ["staged_host", "descriptor"])
def test_short_prompts_beside_staged_ones_read_the_cache(variant, query_lens, seq_lens, min_q,
                                                         load, stage_calls, monkeypatch,
                                                         nan_workspaces):
    """Staged from ``min_q`` queries on: a workspace of ``num_tokens // min_q`` slots,
    fewer than the batch's sequences; the prompts below ``min_q`` run in a launch of the
    long tile over the cache (a mixed batch's up to 8 queries in its short tiles); every
    row against the float64 oracle, from NaN-filled workspaces."""
    from portattn.kernels import launch

    slots, filters = [], []
    original_stage, original_long = launch.stage_kv, launch._launch_long
    monkeypatch.setattr(launch, "stage_kv", lambda *a: (slots.append(a[6]),
                                                        original_stage(*a))[1])
    def long_launch(args, q, cache, metadata, cfg, short_q, staged_q=0):
        filters.append((short_q, staged_q, isinstance(cache, StagedCache)))
        original_long(args, q, cache, metadata, cfg, short_q, staged_q)

    monkeypatch.setattr(launch, "_launch_long", long_launch)
    run(variant, dtype=F16, head_size=32, quant=QUANTS["fp8_tensor_e4m3"],
        stage_kv_load=load, stage_min_q=min_q, query_lens=query_lens, seq_lens=seq_lens)
    assert slots == [sum(query_lens) // min_q] and slots[0] < len(query_lens)
    short_q = 8 if variant == "mixed" else 0  # the decode tile's queries (group 2)
    # the cache for (short_q, min_q) queries, then the staged keys for min_q and more
    assert filters == [(short_q, min_q, False), (min_q - 1, 0, True)]


@interp
@pytest.mark.parametrize("load", ["staged_host", "staged"])
def test_a_sequence_without_a_staging_slot_gives_nan_rows(load, monkeypatch, nan_workspaces):
    """cu_seqlens_q claiming more staged sequences than the call's tokens allow: the
    sequence left without a slot comes out NaN (it never reads the other's keys), the
    staged one matches the float64 oracle."""
    from portattn.kernels import launch
    from portattn.options import normalize_options
    from portattn.testing import dense_attention, relative_error

    batch = make_paged_batch([9, 12], [40, 50], num_q_heads=4, num_kv_heads=2,
                             head_size=32, block_size=16, dtype=F16, seed=8)
    monkeypatch.setattr(launch, "staging_slots", lambda *args: 1)
    options = normalize_options(batch.q, batch.cache)
    long = SMALL_LONG.as_dict()
    params = {"mode": "prefill", "long": long,
              "stage": {"block": 32, "sblocks": 2, "min_q": 5}, "stage_long": long,
              "stage_kv_load": load, "_kv_load_forced": True}
    out = torch.zeros_like(batch.q)  # finite: the NaN rows must be written
    launch.launch_unified(batch.q, batch.cache, batch.metadata, options, out, params)
    expected = dense_attention(batch.q.double(), batch.keys, batch.values, batch.query_lens,
                               scale=options.scale)
    assert torch.isnan(out[9:]).all()
    assert relative_error(out[:9].double(), expected[:9]) < 3e-3


def _prefill_params(min_q, load="staged_host"):
    long = SMALL_LONG.as_dict()
    return {"mode": "prefill", "long": long,
            "stage": {"block": 32, "sblocks": 4, "min_q": min_q}, "stage_long": long,
            "stage_kv_load": load, "_kv_load_forced": True}


@interp
def test_one_sequence_is_staged_whatever_cu_seqlens_q_says(stage_calls):
    """One sequence whose q has 20 rows (so ``min_q`` 10 gives it a slot) but whose
    ``cu_seqlens_q`` claims 9 queries: it is still staged and served (no launch over the
    cache runs for a lone sequence), never left unwritten."""
    from portattn.kernels import launch
    from portattn.options import normalize_options
    from portattn.testing import dense_attention, relative_error
    from portattn.types import AttentionMetadata

    batch = make_paged_batch([20], [60], num_q_heads=4, num_kv_heads=2, head_size=32,
                             block_size=16, dtype=F16, seed=9)
    md = batch.metadata
    metadata = AttentionMetadata(torch.tensor([0, 9], dtype=torch.int32), md.seq_lens,
                                 md.block_table, md.max_seqlen_q, md.max_seqlen_k)
    options = normalize_options(batch.q, batch.cache)
    out = torch.zeros_like(batch.q)
    launch.launch_unified(batch.q, batch.cache, metadata, options, out, _prefill_params(10))
    # 9 queries at positions 51..59 of the 60 keys
    expected = dense_attention(batch.q[:9].double(), batch.keys, batch.values, [9],
                               scale=options.scale)
    assert stage_calls
    assert relative_error(out[:9].double(), expected) < 3e-3


@interp
def test_too_few_tokens_to_stage_read_the_cache(stage_calls):
    """A call whose tokens cannot make a sequence of ``min_q`` queries stages nothing and
    runs the plan's launches over the cache (same result as the float64 oracle)."""
    from portattn.kernels import launch
    from portattn.options import normalize_options
    from portattn.testing import dense_attention, relative_error

    batch = make_paged_batch([7, 5], [40, 30], num_q_heads=4, num_kv_heads=2, head_size=32,
                             block_size=16, dtype=F16, seed=10)
    options = normalize_options(batch.q, batch.cache)
    out = torch.full_like(batch.q, math.nan)
    launch.launch_unified(batch.q, batch.cache, batch.metadata, options, out,
                          _prefill_params(13))
    expected = dense_attention(batch.q.double(), batch.keys, batch.values, [7, 5],
                               scale=options.scale)
    assert not stage_calls
    assert relative_error(out.double(), expected) < 3e-3


def test_staging_slots_are_a_bounded_workspace():
    """Slots: as many sequences of ``min_q`` queries as the tokens allow, at most the
    batch's; none (and no staging workspace at all) where the workspace would pass
    ``STAGE_MAX_BYTES``, so the runner never allocates what the launch would not use."""
    from portattn.kernels import launch

    stage = {"block": 128, "sblocks": 64, "min_q": 512}  # 8192 keys per staged sequence
    params = {"mode": "prefill", "long": {}, "stage": stage}
    dims = (8, 128, 128, False)  # kv heads, K and V head sizes, no scales
    assert launch.staging_slots(params, 16, 1024, *dims) == 2
    assert launch.staging_slots(params, 16, 511, *dims) == 0
    assert launch.staging_slots(params, 3, 1 << 20, *dims) == 3
    per_slot = 8192 * 8 * 256 * 2  # bytes of K and V, 16-bit
    many = heuristics.STAGE_MAX_BYTES // per_slot + 1
    assert launch.staging_slots(params, 10 * many, many * 512, *dims) == 0
    # (many - 1 slots: exactly the cap plus the table, over it)
    assert launch.staging_slots(params, 10 * many, (many - 2) * 512, *dims) == many - 2
    args = (10 * many, 32, 8, 128, 128, False, torch.float16, params)
    assert launch.plan_workspace_size(*args, many * 512) == 0  # nothing staged, no split
    assert launch.plan_workspace_size(*args, 1024) * 4 >= 2 * per_slot


@interp
@pytest.mark.parametrize("staged", [False, True])
def test_flat_grid_serves_every_tile_of_every_kv_head(staged):
    """``flat_grid`` (the kernel's FLAT_GRID: one grid axis of query tile x kv head, a
    measurement switch) covers the same rows as the 2-D grid: every row against the
    float64 oracle, from NaN, over 3 kv heads (a program count the heads divide)."""
    from portattn.kernels import launch
    from portattn.options import normalize_options
    from portattn.testing import dense_attention, relative_error

    batch = make_paged_batch([37, 1, 20], [60, 9, 20], num_q_heads=6, num_kv_heads=3,
                             head_size=32, block_size=16, dtype=F16, seed=11)
    options = normalize_options(batch.q, batch.cache)
    long = dict(SMALL_LONG.as_dict(), flat_grid=True)
    params = {"mode": "prefill", "long": long}
    if staged:
        params.update(stage={"block": 32, "sblocks": 2, "min_q": 1}, stage_long=long,
                      _kv_load_forced=True)
    out = torch.full_like(batch.q, math.nan)
    launch.launch_unified(batch.q, batch.cache, batch.metadata, options, out, params)
    expected = dense_attention(batch.q.double(), batch.keys, batch.values, [37, 1, 20],
                               scale=options.scale)
    assert relative_error(out.double(), expected) < 3e-3
