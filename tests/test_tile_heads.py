"""Decode tiles over several kv heads (the unified kernel's ``TILE_HEADS``, the plan's
``tile_heads``): one program reads a KV tile's columns as (slot, head) pairs in the
cache's order and its rows are the query heads of those kv heads. CPU, under
``TRITON_INTERPRET=1``, against the float64 oracle of ``unified_check`` (built from what
the cache stores), plus the plan rule, the descriptor fallback and the launcher's checks.
"""

from __future__ import annotations

import pytest
import torch

from portattn.kernels import heuristics, kv_load
from portattn.kernels.heuristics import TileConfig

from test_kernels_quant_diffkv import QUANTS as QUANT_MODES
from unified_check import FEATURE_KW, check_unified

F16, F32 = torch.float16, torch.float32
QUANTS = {"none": None, **QUANT_MODES}
# one query per sequence (the planned case) and a spec-decode batch (rows of two tokens)
DECODES = {
    "decode-2d": dict(query_lens=[1, 1, 1], seq_lens=[45, 19, 3], segments=1),
    "decode-3d": dict(query_lens=[1, 1, 1], seq_lens=[70, 19, 3], segments=4),
    "spec-3d": dict(query_lens=[1, 2, 1], seq_lens=[45, 19, 3], segments=2),
}

interp = pytest.mark.interpreter


def run(variant="decode-3d", heads=2, group=2, num_kv_heads=4, **kw):
    case = dict(DECODES[variant])
    case.update(kw)
    return check_unified(case.pop("query_lens"), case.pop("seq_lens"), group=group,
                         num_kv_heads=num_kv_heads, tile_heads=heads, **case)


@interp
@pytest.mark.parametrize("variant", list(DECODES))
@pytest.mark.parametrize("quant", list(QUANTS))
@pytest.mark.parametrize("heads", [2, 4])
def test_quant_modes(quant, variant, heads):
    """Every cache mode, V read byte-wise or as int16 pairs (8-bit caches), 2D / 3D and
    two queries per sequence, 2 or 4 kv heads per program."""
    pairs = quant is not None and variant != "spec-3d"
    run(variant, heads=heads, quant=QUANTS[quant], dtype=F16, head_size=64,
        v_pairs=pairs if quant is not None else None)


@interp
@pytest.mark.parametrize("feature", list(FEATURE_KW))
@pytest.mark.parametrize("quant", ["none", "fp8_tensor_e4m3", "int8_token_head"])
def test_features(quant, feature):
    """Window, softcap, ALiBi (linear / sqrt, per query head), sinks: per column from its
    key, per row from its query head."""
    run("decode-3d", heads=2, group=4, quant=QUANTS[quant], dtype=F16, head_size=64,
        v_pairs=True if quant != "none" else None, **FEATURE_KW[feature])


@interp
@pytest.mark.parametrize("group,heads,num_kv_heads", [(1, 4, 4), (2, 2, 6), (4, 4, 8),
                                                      (8, 2, 2), (3, 2, 4)])
def test_gqa_groups(group, heads, num_kv_heads):
    """Rows = the query heads of ``heads`` kv heads (MHA to GQA 8, and a group of 3 whose
    rows pad to a power of two); several head groups per sequence."""
    run("decode-3d", heads=heads, group=group, num_kv_heads=num_kv_heads,
        quant=QUANTS["fp8_tensor_e4m3"], dtype=F16, head_size=64)


@interp
@pytest.mark.parametrize("block_size", [1, 8, 16, 24, 64])
def test_block_sizes(block_size):
    """A tile's keys span several blocks (small blocks, a non-power-of-two size) or part
    of one (64 slots)."""
    run("decode-3d", heads=4, block_size=block_size, quant=QUANTS["fp8_token_head"],
        dtype=F16, head_size=64, seq_lens=[90, 37, 5])


@interp
@pytest.mark.parametrize("tile", ["full tiles", "one masked tile"])
@pytest.mark.parametrize("bad_id", [-3, 10_000])
def test_bad_block_ids_give_nan_rows(tile, bad_id):
    """A bad block id turns exactly its sequence's rows (every head) NaN, whether the
    tile holding it is masked or seen by every row (16-column tiles: 8 keys x 2 heads)."""
    def edit(table):
        table[1, 0] = bad_id
        return [1]
    kw = {}
    if tile == "full tiles":
        kw["short"] = TileConfig(block_m=16, block_q=1, block_n=16, num_warps=4,
                                 num_stages=2, segments=2)
    run("decode-3d", heads=2, dtype=F32, head_size=32, block_table_edit=edit, **kw)


@interp
def test_diffkv_fp8_q_and_fp8_out():
    """K and V of different head sizes (a packed cache), fp8 q with its scale over an fp8
    per-tensor cache, and fp8 output."""
    run("decode-3d", heads=2, head_size=64, head_size_v=32, dtype=F16)
    run("decode-2d", heads=2, head_size=64, dtype=F16, quant=QUANTS["fp8_tensor_e4m3"],
        q_fp8=torch.float8_e4m3fn, fp8_out=torch.float8_e4m3fn)
    run("decode-3d", heads=4, head_size=64, dtype=F16, quant=QUANTS["fp8_tensor_e4m3"],
        q_fp8=torch.float8_e4m3fn, fp8_dot=True)  # fp8 QK^T on the tensor cores


@interp
def test_merge_kernel_and_merge_in_kernel():
    """Split partials merged by the last segment program (one ticket per sequence and
    head group) or by the merge kernel."""
    for in_kernel in (True, False):
        run("decode-3d", heads=4, dtype=F16, head_size=64, merge_in_kernel=in_kernel,
            quant=QUANTS["int8_token_head"], v_pairs=True)


@interp
def test_mixed_batch_short_launch():
    """The short launch of a mixed batch with such a tile; the long one is unchanged."""
    long = TileConfig(block_m=32, block_q=16, block_n=16, num_warps=4, num_stages=2)
    check_unified([1, 19, 1, 3], [30, 45, 12, 20], group=2, num_kv_heads=4, mode="mixed",
                  segments=2, long=long, dtype=F16, head_size=64, tile_heads=2)


@interp
@pytest.mark.parametrize("segments", [1, 2])
def test_understated_max_seqlen_q_gives_nan_rows(segments):
    """A decode plan of one query per sequence over 2 kv heads per program, used on a
    batch with a 3-query sequence: every row of that sequence (all its heads) comes out
    NaN, the other sequences' rows are right."""
    from portattn.backends.base import Plan
    from portattn.backends.triton_unified import TritonUnified
    from portattn.options import normalize_options
    from portattn.testing import dense_attention, make_paged_batch, relative_error
    from portattn.types import AttentionMetadata

    batch = make_paged_batch([1, 3, 1], [30, 40, 12], num_q_heads=8, num_kv_heads=4,
                             head_size=32, dtype=F32)
    m = batch.metadata
    metadata = AttentionMetadata(m.cu_seqlens_q, m.seq_lens, m.block_table, 1, 40)
    out = torch.zeros(5, 8, 32)  # zeros: stale rows would pass a finiteness check
    short = dict(block_m=16, block_q=1, block_n=16, num_warps=4, num_stages=2,
                 segments=segments, tile_heads=2)
    TritonUnified().run(batch.q, batch.cache, metadata,
                        normalize_options(batch.q, batch.cache), out,
                        Plan("triton_unified", "decode", {"mode": "decode", "short": short}))
    assert torch.isnan(out[1:4]).all()
    expected = dense_attention(batch.q, batch.keys, batch.values, [1, 3, 1])
    keep = torch.tensor([True, False, False, False, True])
    assert relative_error(out[keep], expected[keep]) < 2e-5


@interp
def test_bad_block_id_in_the_last_full_tile_of_a_segment():
    """Sequence 1 (700 keys in 2-slot blocks, 16-column tiles of 8 keys x 2 heads, 2
    segments of 44 tiles): a bad id only in table entry 346 (keys 692-693), inside the
    second segment's last full tile (86; tile 87 is the masked edge), turns that
    sequence's rows NaN: the scan of the full tiles reaches their end in keys."""
    def edit(table):
        table[1, 346] = -3
        return [1]
    short = TileConfig(block_m=16, block_q=1, block_n=16, num_warps=4, num_stages=2,
                       segments=2)
    check_unified([1, 1, 1], [45, 700, 3], group=2, num_kv_heads=4, dtype=F32,
                  head_size=32, block_size=2, short=short, segments=2,
                  block_table_edit=edit, tile_heads=2)


# --------------------------------------------------------------------------- plan rules
def _shape(group=4, num_kv_heads=8, num_seqs=32, q=1, quant="fp8_per_tensor", arch="sm90",
           elem=1, seq_len=8192, head=128):
    return heuristics.Shape(group * num_kv_heads, num_kv_heads, head, elem, q, seq_len,
                            num_seqs, 132, arch, head, quant)


def test_plan_takes_several_heads_per_program_where_measured():
    """8-bit decode on sm90 with V pairs at GQA 4 / 8: 4 / 2 kv heads per program (16
    rows), segments for that many times fewer programs (32 x 8192 on 132 SMs, GQA 4: 64
    programs, 8 segments), once the per-head programs fill the SMs (128 on 132 SMs: not
    yet)."""
    for quant in ("fp8_per_tensor", "fp8_per_token_head", "int8_per_token_head"):
        params = heuristics.plan_launch(_shape(quant=quant))
        short = params["short"]
        assert params["v_pairs"] is True
        assert (short["tile_heads"], short["block_m"], short["block_q"], short["block_n"],
                short["segments"]) == (4, 16, 1, 128, 8), quant
        assert heuristics.variant_name(params).endswith("-vpairs-4heads")
    gqa8 = heuristics.plan_launch(_shape(group=8))["short"]
    assert (gqa8["tile_heads"], gqa8["block_m"], gqa8["block_q"], gqa8["segments"]) == \
        (2, 16, 1, 4)
    assert heuristics.plan_launch(_shape(num_seqs=128))["short"]["segments"] == 2
    assert heuristics.plan_launch(_shape(num_seqs=17))["short"]["tile_heads"] == 4
    assert "tile_heads" not in heuristics.plan_launch(_shape(num_seqs=16))["short"]


@pytest.mark.parametrize("shape", [
    _shape(group=2), _shape(group=1), _shape(group=16),  # not measured
    _shape(num_seqs=8),               # 64 programs on 132 SMs: measured slower
    _shape(num_kv_heads=6),           # 6 heads: no whole groups of 4
    _shape(q=2),                      # spec-decode rows
    _shape(arch="sm89"),              # no V pairs
    _shape(elem=2, quant="none"),     # 16-bit caches: the experiment tied
    _shape(head=64),                  # no V pairs at head 64
], ids=["gqa2", "mha", "gqa16", "batch8", "kv6", "spec", "sm89", "bf16", "head64"])
def test_plan_keeps_one_head_per_program_elsewhere(shape):
    params = heuristics.plan_launch(shape)
    assert "tile_heads" not in params.get("short", {})
    assert "heads" not in heuristics.variant_name(params)


def test_batch_rule_counts_head_groups():
    """A bucket's smaller batches get the segments their own program count fits: 64
    sequences plan for 128 programs (4 segments); 33 sequences (66 programs) fit 8."""
    from portattn.kernels import launch

    params = heuristics.plan_launch(_shape(num_seqs=64))
    assert params["short"]["segments"] == 4
    upto = params["short"]["segments_upto"]
    assert heuristics.segments_for(params["short"], 33) == 8 and upto[-1] == (33, 8)
    assert heuristics.segments_for(params["short"], 34) == 4
    assert heuristics.variant_name(params) == "decode-3d-8seg-upto-33-vpairs-4heads"
    # the workspace holds the 33-sequence launch's partials: a row per query head
    assert launch.plan_workspace_size(64, 32, 8, 128, 128, False, torch.bfloat16, params) \
        == 33 * 8 * 32 * (128 + 2)


def test_descriptor_plans_fall_back_to_a_tile_per_head():
    """A descriptor box holds one head's keys: descriptor_params turns the tile into one
    per kv head with the same rows (4 queries x GQA 4), and such a tile is refused by
    launch_reasons."""
    params = heuristics.plan_launch(_shape())
    converted = kv_load.descriptor_params(params, 16)
    assert "tile_heads" not in converted["short"]
    assert (converted["short"]["block_m"], converted["short"]["block_q"],
            converted["short"]["block_n"]) == (16, 4, 16)
    assert kv_load.launch_reasons(converted, 16) == []
    assert any("4 kv heads" in r for r in kv_load.launch_reasons(params, 16))


@interp
def test_launcher_refuses_tiles_that_do_not_fit():
    """kv heads that do not split into whole groups, rows too few for the group's query
    heads: a ValueError before any launch, the output untouched."""
    from portattn.kernels.launch import launch_unified
    from portattn.options import normalize_options
    from portattn.testing import make_paged_batch

    batch = make_paged_batch([1, 1], [20, 9], num_q_heads=16, num_kv_heads=4, head_size=32)
    out = torch.full_like(batch.q, float("nan"))
    options = normalize_options(batch.q, batch.cache, out=out)
    for cfg, match in ((dict(block_m=16, block_q=1, tile_heads=3), "whole groups of 3"),
                       (dict(block_m=16, block_q=4, tile_heads=2), "block_m")):
        short = dict(block_n=16, num_warps=4, num_stages=2, segments=1, **cfg)
        with pytest.raises(ValueError, match=match):
            launch_unified(batch.q, batch.cache, batch.metadata, options, out,
                           {"mode": "decode", "short": short})
    assert torch.isnan(out).all()


def test_v_pairs_stay_where_they_compile_right():
    """V pairs in tiles of more than 16 rows only where V's rows pad to 128 or more (head
    64 in 64- / 128-row tiles came out wrong on the H100, NOTES.md session 33)."""
    from portattn.kernels.launch import v_pairs_compile_right

    def params(short=None, long=None):
        out = {"mode": "mixed"}
        for key, rows in (("short", short), ("long", long)):
            if rows:
                out[key] = {"block_m": rows}
        return out

    assert v_pairs_compile_right(params(16), 64)
    assert v_pairs_compile_right(params(64, 128), 128)
    assert v_pairs_compile_right(params(64, 128), 80)     # pads to 128
    assert not v_pairs_compile_right(params(64), 64)
    assert not v_pairs_compile_right(params(16, 128), 64)
    assert not v_pairs_compile_right(params(16, 64), 32)
