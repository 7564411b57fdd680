"""``triton_unified`` on the CPU: the kernels under ``TRITON_INTERPRET=1`` (small fp16/fp32
problems, every feature and variant), plus its reasons and launch heuristics (pure Python).

The interpreter costs ~6 ms per program per KV tile, so shapes are tiny; tile configs are
forced small so several query tiles, KV tiles and segments still occur.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from portattn.dispatch.problem import Problem
from portattn.kernels.heuristics import Shape, TileConfig, plan_launch, variant_name

from unified_check import FEATURE_KW, KernelCalls, check_unified

F16, F32 = torch.float16, torch.float32
SMALL_LONG = TileConfig(block_m=32, block_q=16, block_n=16, num_warps=4, num_stages=2)


def small_long(group: int) -> TileConfig:
    return dataclasses.replace(SMALL_LONG, block_q=SMALL_LONG.block_m // group)


interp = pytest.mark.interpreter


# --------------------------------------------------------------------------- decode
@interp
@pytest.mark.parametrize("segments", [1, 4])
@pytest.mark.parametrize("dtype,group,head_size,block_size", [
    (F16, 4, 64, 16), (F32, 3, 80, 32), (F16, 1, 40, 16), (F32, 4, 64, 32)])
def test_decode(dtype, group, head_size, block_size, segments):
    check_unified([1, 1, 1], [70, 17, 5], group=group, head_size=head_size,
                  block_size=block_size, dtype=dtype, segments=segments)


@interp
@pytest.mark.parametrize("segments", [1, 3])
@pytest.mark.parametrize("query_lens", [[1, 1, 1, 1], [3, 3, 2, 1]], ids=["decode", "spec"])
def test_decode_lengths_on_and_off_the_tile_edge(query_lens, segments):
    """Decode tiles skip a trailing edge part without tiles (a runtime branch): lengths
    that are multiples of BLOCK_N (with one query no segment has such a tile; with
    spec-decode rows the causal diagonal still makes one), one key past or short of it
    (the segment holding the last tile has one, later segments may be empty), against
    the float64 oracle."""
    tile = TileConfig(block_m=16, block_q=8, block_n=16, num_warps=4, num_stages=2,
                      segments=segments)
    check_unified(query_lens, [64, 63, 65, 16], group=2, dtype=F32, short=tile)


@interp
@pytest.mark.parametrize("sinks", [False, True])
def test_the_narrow_split_tile(sinks):
    """The narrow split decode tile's shape (2 warps over 64-key tiles, 8 segments, the
    merge in the kernel), scaled to the interpreter (16-key tiles), with segments that
    hold no tile, against the float64 oracle."""
    tile = TileConfig(block_m=16, block_q=4, block_n=16, num_warps=2, num_stages=2,
                      segments=8)
    check_unified([1, 1, 1, 1], [200, 3, 129, 64], group=4, head_size=64, dtype=F16,
                  short=tile, sinks=sinks)


@interp
@pytest.mark.parametrize("segments", [1, 2])
def test_spec_decode(segments):
    check_unified([3, 4, 2], [40, 23, 4], group=4, dtype=F16, segments=segments)


@interp
@pytest.mark.parametrize("block_size", [8, 24])
def test_block_sizes_not_16_32(block_size):
    check_unified([1, 2], [50, 30], group=2, dtype=F32, block_size=block_size, segments=2)


@interp
@pytest.mark.parametrize("block_size", [5, 12, 48])
@pytest.mark.parametrize("variant", ["decode-2d", "decode-3d", "prefill"])
def test_window_with_block_sizes_that_do_not_divide_the_tile(block_size, variant):
    """A window whose rows have no unmasked KV tile leaves an empty range of tiles to
    check for bad block ids; with a block size that does not divide the tile, its bound
    is not a block boundary and lies past the sequence's last block (the table's edge
    when the table fits the sequence exactly). Nothing may be checked there: every row
    matches the float64 oracle, none comes out NaN (session 40's audit: block sizes 5,
    12, 24 and 48 gave all-NaN rows)."""
    lens = [block_size * 6, 30, block_size * 2 + 1]  # a sequence fills its table exactly
    if variant == "prefill":
        check_unified([9, 4, 5], lens, group=2, dtype=F32, block_size=block_size,
                      mode="prefill", long=small_long(2), sliding_window=4)
    else:
        check_unified([1, 1, 1], lens, group=2, dtype=F32, block_size=block_size,
                      segments=1 if variant == "decode-2d" else 4, sliding_window=4)


# --------------------------------------------------------------------------- prefill / mixed
@interp
@pytest.mark.parametrize("dtype,group,head_size", [(F16, 2, 64), (F32, 3, 40), (F16, 1, 80)])
def test_prefill(dtype, group, head_size):
    check_unified([37], [37], group=group, head_size=head_size, dtype=dtype, mode="prefill",
                  long=small_long(group))


@interp
def test_chunked_prefill_over_context():
    check_unified([20, 11], [50, 11], group=4, dtype=F16, mode="prefill", long=small_long(4))


@interp
@pytest.mark.parametrize("segments", [1, 2])
def test_mixed(segments):
    # group 4: short tiles take <= 4 queries; the 19- and 9-query chunks take long tiles.
    check_unified([1, 19, 1, 3, 9], [30, 45, 12, 20, 9], group=4, dtype=F16, mode="mixed",
                  segments=segments, long=small_long(4))


@interp
def test_empty_sequences_in_batch():
    check_unified([1, 0, 6, 0], [20, 7, 30, 1], group=2, dtype=F32, mode="mixed",
                  long=small_long(2))


# --------------------------------------------------------------------------- features
FEATURES = {**FEATURE_KW, "window_1": dict(sliding_window=1),
            "non_causal_window": dict(causal=False, sliding_window=6, sinks=True)}


@interp
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("variant", ["decode-2d", "decode-3d", "prefill"])
def test_features(feature, variant):
    opts = FEATURES[feature]
    if variant == "prefill":
        check_unified([13, 6], [41, 6], group=2, dtype=F32, mode="prefill",
                      long=small_long(2), **opts)
    else:
        check_unified([1, 2, 1], [45, 19, 3], group=3, dtype=F16,
                      segments=1 if variant == "decode-2d" else 4, **opts)


@interp
def test_the_exact_tanh_is_planned_for_large_softcaps_only(monkeypatch):
    """``USE_SOFTCAP``: 0 without softcap, 1 (the fast tanh) up to
    ``EXACT_TANH_SOFTCAP`` (the common 30 and 50 among them), 2 (the exact small-argument
    tanh, slower) above it, as the launch passes it."""
    from portattn.kernels import launch
    from portattn.kernels.heuristics import EXACT_TANH_SOFTCAP, softcap_code

    assert [softcap_code(c) for c in (None, 0.5, 30.0, 50.0, EXACT_TANH_SOFTCAP)] == \
        [0, 1, 1, 1, 1]
    assert [softcap_code(c) for c in (EXACT_TANH_SOFTCAP * 1.01, 1e6)] == [2, 2]
    calls = KernelCalls(launch.unified_attention_kernel)
    monkeypatch.setattr(launch, "unified_attention_kernel", calls)
    for softcap in (30.0, 1e6):
        check_unified([1, 2], [20, 9], group=2, dtype=F32, segments=1, softcap=softcap)
    assert [kw["USE_SOFTCAP"] for kw in calls.kwargs] == [1, 2]


@interp
@pytest.mark.parametrize("softcap", [0.5, 1e4, 1e6, 1e8])
@pytest.mark.parametrize("variant", ["decode-3d", "prefill"])
def test_softcap_stays_accurate_when_large(softcap, variant):
    """``softcap * tanh(s / softcap)`` for softcaps far above the scores (s / softcap
    tiny, where ``1 - 2 / (exp(2x) + 1)`` cancels) and below them (tanh saturates), fp32,
    against the float64 oracle at fp32's tolerance (session 40's audit: a softcap of 1e6
    gave a relative error of 0.04, 1e8 of 0.8)."""
    if variant == "prefill":
        check_unified([13, 6], [41, 6], group=2, dtype=F32, mode="prefill",
                      long=small_long(2), softcap=softcap)
    else:
        check_unified([1, 2, 1], [45, 19, 3], group=2, dtype=F32, segments=4,
                      softcap=softcap)


@interp
@pytest.mark.parametrize("strided_out", ["pad", "transposed"])
@pytest.mark.parametrize("mode", ["decode", "mixed"])
def test_strided_q_and_out(strided_out, mode):
    check_unified([2, 1, 7], [33, 20, 9], group=2, dtype=F16, mode=mode, segments=2,
                  strided_q=True, strided_out=strided_out, long=small_long(2))


@interp
@pytest.mark.parametrize("segments", [1, 4])
@pytest.mark.parametrize("sinks", [False, True])
def test_rows_with_no_visible_key(segments, sinks):
    # 4 queries over 2 keys: queries 0 and 1 sit before the first key and must give 0.
    check_unified([4, 1], [4, 18], seq_lens_override=[2, 18], group=2, dtype=F32,
                  segments=segments, sinks=sinks)


# --------------------------------------------------------------------------- split-KV merge
@pytest.fixture
def merged_in_kernel(monkeypatch):
    """The MERGE_SEGMENTS of every attention launch (0: the merge kernel merges)."""
    from portattn.kernels import launch

    spy = KernelCalls(launch.unified_attention_kernel)
    monkeypatch.setattr(launch, "unified_attention_kernel", spy)
    return spy.kwargs


@pytest.fixture
def merge_kernel_calls(monkeypatch):
    from portattn.kernels import launch

    spy = KernelCalls(launch.merge_segments_kernel)
    monkeypatch.setattr(launch, "merge_segments_kernel", spy)
    return spy.grids


@interp
@pytest.mark.parametrize("in_kernel", [True, False])
@pytest.mark.parametrize("case", [
    dict(query_lens=[1, 1, 1], seq_lens=[50, 37, 3], group=3, segments=8, sinks=True),
    dict(query_lens=[3, 4, 2], seq_lens=[40, 23, 4], group=4, segments=4, head_size=64,
         head_size_v=32),  # spec-decode rows, DiffKV partials
    dict(query_lens=[1, 2], seq_lens=[70, 9], group=2, segments=16, sliding_window=12,
         softcap=4.0),  # segments with no tile (short sequence, window)
    dict(query_lens=[4, 1], seq_lens=[4, 18], seq_lens_override=[2, 18], group=2,
         segments=4, sinks=True),  # rows that see no key
], ids=["sinks-gqa3", "spec-diffkv", "empty-segments", "no-visible-key"])
def test_split_merge_in_kernel_and_by_merge_kernel(case, in_kernel, merge_kernel_calls,
                                                    merged_in_kernel):
    """Both merges of split-KV partials against the float64 oracle: the last segment
    program of each (sequence, kv head) merging in the attention kernel (one launch),
    and the merge kernel (a second launch)."""
    check_unified(dtype=F32, merge_in_kernel=in_kernel, **case)
    assert len(merge_kernel_calls) == (0 if in_kernel else 1)
    assert [k["MERGE_SEGMENTS"] > 0 for k in merged_in_kernel] == [in_kernel]


@interp
def test_merge_in_kernel_whichever_segment_finishes_last(monkeypatch, merge_kernel_calls,
                                                          merged_in_kernel):
    """The interpreter runs a (sequence, kv head)'s segment programs in order, so the
    merging program would always be the last segment: run them in another order per
    (sequence, kv head) (Triton's interpreter grid index, patched), so that a merge keyed
    on the segment rather than on the ticket fails."""
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or not hasattr(builder, "set_grid_idx"):
        pytest.skip("this Triton's interpreter has no InterpreterBuilder.set_grid_idx")
    in_order = builder.set_grid_idx

    def shuffled(self, x, y, z):
        n = self.grid_dim[2]
        return in_order(self, x, y, (n - 1 - z + x + 3 * y) % n)

    monkeypatch.setattr(builder, "set_grid_idx", shuffled)
    check_unified([1, 1, 1], [50, 37, 3], group=3, dtype=F32, segments=8, sinks=True,
                  merge_in_kernel=True)
    check_unified([3, 4, 2], [40, 23, 4], group=4, dtype=F32, segments=4, head_size=64,
                  head_size_v=32, merge_in_kernel=True)
    assert not merge_kernel_calls
    assert [k["MERGE_SEGMENTS"] for k in merged_in_kernel] == [8, 4]


@interp
@pytest.mark.parametrize("segments", [3, 6])
def test_merge_in_kernel_takes_any_segment_count(segments, merge_kernel_calls,
                                                  merged_in_kernel):
    """The merge in the kernel masks its power-of-two segment tile, so a segment count
    that is not a power of two (the merge kernel's arange cannot) merges correctly."""
    tile = TileConfig(block_m=16, block_q=8, block_n=16, num_warps=4, num_stages=2,
                      segments=segments)
    check_unified([1, 2], [70, 40], group=2, dtype=F32, short=tile, sinks=True,
                  merge_in_kernel=True)
    assert not merge_kernel_calls
    assert [k["MERGE_SEGMENTS"] for k in merged_in_kernel] == [4 if segments == 3 else 8]


def test_merge_load_takes_one_query_rows_at_once_where_registers_allow():
    """The in-kernel merge loads one query's rows (its GQA group) of every segment at
    once where that is at most 16384 fp32 partials and the tile does not cap its
    registers; 8192 otherwise (NOTES.md, session 22)."""
    from portattn.kernels.unified import _merge_rows, merge_load_elements

    assert merge_load_elements(4, 32, 128, register_capped=False) == 16384
    # the kernel's row count then takes the group's rows in one load (tile of 4 queries)
    assert _merge_rows(16, 32 * 128, merge_load_elements(4, 32, 128, False)) == 4
    assert _merge_rows(16, 32 * 128, merge_load_elements(4, 32, 128, True)) == 2
    assert _merge_rows(12, 32 * 128, merge_load_elements(3, 32, 128, False)) == 4
    assert merge_load_elements(3, 32, 128, register_capped=False) == 16384
    assert merge_load_elements(2, 64, 128, register_capped=False) == 16384
    assert merge_load_elements(4, 32, 128, register_capped=True) == 8192
    for group, segments, head_v_pad in [(4, 16, 128), (4, 64, 128), (8, 32, 128),
                                        (4, 32, 256), (1, 32, 128), (4, 4, 64)]:
        assert merge_load_elements(group, segments, head_v_pad, False) == 8192
    # a launch's tile: tight registers with a cap or fewer than 4 warps (the narrow split
    # tile's 2: 16384 partials spilled at GQA 8-16 offline, session 31)
    from portattn.kernels.launch import merge_load_of

    assert merge_load_of({"num_warps": 4}, 8, 16, 128) == 16384
    assert merge_load_of({"num_warps": 2}, 8, 16, 128) == 8192
    assert merge_load_of({"num_warps": 4, "maxnreg": 128}, 8, 16, 128) == 8192
    assert merge_load_of({"num_warps": 4}, 8, 12, 128) == 16384  # padded to 16


@interp
def test_merge_in_kernel_with_one_query_per_load(merge_kernel_calls, merged_in_kernel):
    """GQA 4 (and 3) with 32 segments of head 128: the launch asks for 16384-element
    merge loads (one query's rows at once), and a 4-query sequence (16 rows: four loads)
    and a 1-query one merge correctly against the float64 oracle."""
    tile = TileConfig(block_m=16, block_q=4, block_n=16, num_warps=4, num_stages=2,
                      segments=32)
    check_unified([4, 1], [560, 530], group=4, num_kv_heads=1, head_size=128, dtype=F32,
                  short=tile, sinks=True, merge_in_kernel=True)
    # a group that is not a power of two: 3 rows of a 4-row load per query
    check_unified([3, 1], [530, 515], group=3, num_kv_heads=1, head_size=128, dtype=F32,
                  short=dataclasses.replace(tile, block_m=16, block_q=4), sinks=True,
                  merge_in_kernel=True)
    assert not merge_kernel_calls
    assert [(k["MERGE_SEGMENTS"], k["MERGE_LOAD"]) for k in merged_in_kernel] == \
        [(32, 16384), (32, 16384)]


@interp
def test_merge_kernel_refuses_other_segment_counts_before_any_launch(merged_in_kernel):
    tile = TileConfig(block_m=16, block_q=8, block_n=16, num_warps=4, num_stages=2,
                      segments=3)
    with pytest.raises(ValueError, match="power-of-two segment count"):
        check_unified([1, 2], [70, 40], group=2, dtype=F32, short=tile,
                      merge_in_kernel=False)
    assert merged_in_kernel == []


@interp
def test_merge_in_kernel_with_fp8_output(merge_kernel_calls, merged_in_kernel):
    check_unified([1, 1], [60, 21], group=2, dtype=F16, segments=4,
                  fp8_out=torch.float8_e4m3fn, merge_in_kernel=True)
    assert not merge_kernel_calls
    assert [k["MERGE_SEGMENTS"] for k in merged_in_kernel] == [4]


@interp
def test_merge_tickets_are_zero_after_each_launch_of_a_shared_workspace():
    """A workspace's tickets (its first elements) start at zero and every launch leaves
    them so: one workspace serves calls of different batch sizes, segment counts and
    head configurations in turn, each correct, and a NaN-filled data region (stale
    partials or staged keys of another call) changes nothing."""
    from portattn.kernels import launch

    ws = launch.new_workspace(1 << 16, "cpu")
    ws[launch.MERGE_TICKETS:] = float("nan")
    tickets = ws.view(torch.int32)[:launch.MERGE_TICKETS]
    assert not tickets.any()
    for query_lens, seq_lens, group, kv_heads, segments in [
            ([1, 1, 1], [50, 37, 3], 3, 2, 8), ([1] * 5, [33, 2, 64, 17, 9], 2, 3, 4),
            ([2, 1], [40, 23], 4, 1, 16)]:
        check_unified(query_lens, seq_lens, group=group, num_kv_heads=kv_heads, dtype=F32,
                      segments=segments, workspace=ws, seed=segments, merge_in_kernel=True)
        assert not tickets.any(), "a launch left a merge ticket set"


@pytest.fixture
def simulated_capture(monkeypatch):
    """launch.py sees a CUDA graph being captured (the interpreter runs the kernels, so
    the launches' results can be checked); new_workspace calls are counted."""
    from portattn.kernels import launch

    made = []
    real = launch.new_workspace

    def counting(elements, device):
        made.append(elements)
        return real(elements, device)

    monkeypatch.setattr(launch, "new_workspace", counting)
    monkeypatch.setattr(launch, "_capturing", lambda device: True)
    return made


@interp
def test_captured_split_decode_takes_tickets_that_need_no_memset(monkeypatch,
                                                                  simulated_capture,
                                                                  merged_in_kernel):
    """Captured in a graph without a workspace, a split decode merging in the kernel
    takes merge tickets of its own from the device's slab (zeroed once, never zeroed by
    the graph) instead of a new workspace whose tickets the graph would memset on every
    replay: each launch a slice no other launch uses, correct, and left at zero."""
    from portattn.kernels import graph_tickets

    monkeypatch.setattr(graph_tickets, "_slabs", {})
    graph_tickets.prepare(torch.device("cpu"))  # what the eager calls before a capture do
    cpu = torch.device("cpu")
    slab = graph_tickets._slabs[cpu][0]
    align = graph_tickets.SLICE_ALIGN
    for seed, (query_lens, seq_lens, kv_heads) in enumerate(
            [([1, 1, 1], [50, 37, 3], 2), ([1] * 5, [33, 2, 64, 17, 9], 3),
             ([1] * 11, [(7 * i) % 40 + 1 for i in range(11)], 3)]):  # 33 pairs
        start, pairs = graph_tickets.used(cpu), len(seq_lens) * kv_heads
        end = start + -(-pairs // align) * align
        slab[start + pairs:end] = 1000  # the slice's padding: no launch may touch it
        check_unified(query_lens, seq_lens, group=2, num_kv_heads=kv_heads, dtype=F32,
                      segments=8, seed=seed, sinks=True, merge_in_kernel=True)
        assert graph_tickets.used(cpu) == end, "each captured launch takes its own slice"
        assert (slab[start + pairs:end] == 1000).all(), "a launch used tickets past its slice"
        slab[start + pairs:end] = 0
    assert simulated_capture == [], "a captured split decode made a workspace (a memset)"
    assert [k["MERGE_SEGMENTS"] for k in merged_in_kernel] == [8, 8, 8]
    assert not slab.any(), "a launch left a merge ticket set"


@interp
def test_captured_split_decode_without_slab_tickets_zeroes_a_workspace(monkeypatch,
                                                                       simulated_capture):
    """No slab made before the capture, or one used up: the workspace's tickets (what
    the graph zeroes on every replay), and the result is the same."""
    from portattn.kernels import graph_tickets

    monkeypatch.setattr(graph_tickets, "_slabs", {})
    check_unified([1, 1, 1], [50, 37, 3], group=2, dtype=F32, segments=4,
                  merge_in_kernel=True)  # no slab: nothing made one outside a capture
    assert len(simulated_capture) == 1
    monkeypatch.setattr(graph_tickets, "SLAB_TICKETS", 36)
    graph_tickets.prepare(torch.device("cpu"))
    check_unified([1, 1, 1], [50, 37, 3], group=2, dtype=F32, segments=4,
                  merge_in_kernel=True)  # 6 tickets: the slab's first slice
    assert len(simulated_capture) == 1
    check_unified([1, 1, 1], [50, 37, 3], group=2, dtype=F32, segments=4,
                  merge_in_kernel=True)  # 32 + 6 > 36: used up
    assert len(simulated_capture) == 2


def test_graph_ticket_slices_are_disjoint_and_thread_safe(monkeypatch):
    """Slices taken from several threads at once never overlap and stop at the slab's
    end; a device without a slab gets none."""
    import threading

    from portattn.kernels import graph_tickets

    monkeypatch.setattr(graph_tickets, "_slabs", {})
    monkeypatch.setattr(graph_tickets, "SLAB_TICKETS", 32 * 100)
    cpu = torch.device("cpu")
    assert graph_tickets.take(cpu, 4) is None
    graph_tickets.prepare(cpu)
    slab = graph_tickets._slabs[cpu][0]
    got: list = []

    def grab():
        for _ in range(30):
            t = graph_tickets.take(cpu, 20)
            if t is not None:
                got.append(t)

    threads = [threading.Thread(target=grab) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 100
    starts = sorted(t.data_ptr() - slab.data_ptr() for t in got)
    assert starts == [4 * 32 * i for i in range(100)]
    assert all(t.numel() == 20 and not t.any() for t in got)


@interp
def test_too_many_sequences_for_the_tickets_use_the_merge_kernel(monkeypatch,
                                                                  merge_kernel_calls):
    from portattn.kernels import launch

    monkeypatch.setattr(launch, "MERGE_TICKETS", 5)  # 3 sequences x 2 kv heads: 6
    check_unified([1, 1, 1], [50, 37, 3], group=2, dtype=F32, segments=4,
                  merge_in_kernel=True)
    assert len(merge_kernel_calls) == 1
    check_unified([1, 1], [50, 37], group=2, dtype=F32, segments=4,
                  merge_in_kernel=True)  # 4 tickets: fit
    assert len(merge_kernel_calls) == 1


@interp
def test_prefill_rows_with_no_visible_key():
    check_unified([20], [20], seq_lens_override=[9], group=2, dtype=F32, mode="prefill",
                  long=small_long(2), sliding_window=4)


@interp
def test_public_api_routes_and_matches():
    import portattn
    from portattn.testing import dense_attention, make_paged_batch, relative_error

    batch = make_paged_batch([1, 5, 1], [40, 25, 9], num_q_heads=6, num_kv_heads=2,
                             head_size=48, dtype=F16)
    decision = portattn.explain(batch.q, batch.cache, batch.metadata, backend="triton_unified")
    assert decision.backend == "triton_unified"
    out = portattn.attention(batch.q, batch.cache, batch.metadata, backend="triton_unified",
                             softcap=4.0)
    expected = dense_attention(batch.q, batch.keys, batch.values, [1, 5, 1], softcap=4.0)
    assert relative_error(out, expected) < 3e-3


# --------------------------------------------------------------------------- reasons
def _caps(**changes):
    from portattn.capabilities import probe

    return dataclasses.replace(probe(simulate="sm90"), **changes)


def _problem(**kw):
    return Problem.make(**kw)


def test_why_not_supported_problem_has_no_reasons():
    from portattn.backends.triton_unified import TritonUnified

    assert TritonUnified().why_not(_problem(), _caps()) == []


@pytest.mark.parametrize("kw,needle", [
    (dict(head_size=128, head_size_v=64), "triton_diffkv"),
    (dict(kv_quant="nf4"), "not supported by our Triton kernels"),
    (dict(dtype="e4m3fn"), "an fp8 q needs a quantized KV cache"),
    (dict(head_size=128, head_size_v=20), "V head size 20"),
    (dict(head_size=20), "head size"),
    (dict(head_size=100), "head size"),
    (dict(head_size=264), "head size"),
    (dict(num_q_heads=6, num_kv_heads=4), "multiple"),
    (dict(device_type="cpu"), "probed device"),
])
def test_why_not_reasons(kw, needle):
    from portattn.backends.triton_unified import TritonUnified

    reasons = TritonUnified().why_not(_problem(**kw), _caps())
    assert any(needle in r for r in reasons), reasons


@pytest.mark.parametrize("kw,profile,needle", [
    (dict(kv_quant="fp8_per_tensor:e4m3fn"), "gfx942",
     "the KV cache is fp8 e4m3fn, which gfx942"),
    (dict(kv_quant="fp8_per_token_head:e5m2"), "gfx942",
     "the KV cache is fp8 e5m2, which gfx942"),
    (dict(out_dtype="e4m3fn"), "sm80", "the output is fp8 e4m3fn, which sm80"),
    (dict(dtype="e4m3fn", kv_quant="int8_per_token_head"), "sm80",
     "q is fp8 e4m3fn, which sm80"),
])
def test_fp8_needs_fp8_hardware(kw, profile, needle):
    """fp8 q and output need the format on the GPU; an fp8 KV cache is read from its bytes
    on NVIDIA GPUs without it (sm80/sm86), not on AMD ones."""
    from portattn.backends.triton_unified import TritonUnified
    from portattn.capabilities import probe

    assert TritonUnified().why_not(_problem(**kw), _caps()) == []  # sm90 has fp8
    reasons = TritonUnified().why_not(_problem(**kw), probe(simulate=profile))
    assert any(needle in r for r in reasons), reasons
    if "kv_quant" in kw and "dtype" not in kw:
        assert TritonUnified().why_not(_problem(**kw), probe(simulate="sm80")) == []


def test_why_not_relays_triton_reason():
    from portattn.backends.triton_unified import TritonUnified
    from portattn.capabilities.model import Check

    caps = _caps(triton_kernels=Check(False, "Triton is not installed", "probed"))
    assert "Triton is not installed" in TritonUnified().why_not(_problem(), caps)


# --------------------------------------------------------------------------- heuristics
def _shape(**kw):
    base = dict(num_q_heads=32, num_kv_heads=8, head_size=128, elem_bytes=2, max_seqlen_q=1,
                max_seqlen_k=8192, num_seqs=1, sm_count=132, arch="sm90")
    return Shape(**{**base, **kw})


def test_decode_splits_only_when_the_gpu_is_not_filled():
    few = plan_launch(_shape(num_seqs=1))
    many = plan_launch(_shape(num_seqs=128))
    assert variant_name(few) == "decode-3d" and few["short"]["segments"] >= 16
    assert variant_name(many) == "decode-2d"
    # more SMs -> more segments: nothing is tuned for one GPU
    more = plan_launch(_shape(num_seqs=1, sm_count=264))
    assert more["short"]["segments"] >= few["short"]["segments"]
    short_keys = plan_launch(_shape(num_seqs=1, max_seqlen_k=64))
    assert short_keys["short"]["segments"] <= 1


def test_narrow_split_tile_where_programs_fill_a_quarter_to_a_half_of_the_sms(monkeypatch):
    """16-bit decodes on sm90 whose (sequence, kv head) pairs are a quarter to a half of
    the SMs take 64-key 2-warp tiles split to about 4 programs per SM (the H200 sweep of
    session 31); everything else keeps its tile: fewer or more programs, other
    architectures, 8-bit caches, wide heads, spec-decode rows, mixed batches."""
    from portattn.kernels import heuristics

    def short(**kw):
        return plan_launch(_shape(**kw))["short"]

    def tile(cfg):
        return cfg["block_n"], cfg["num_warps"], cfg["segments"]

    assert tile(short(num_seqs=8)) == (64, 2, 8)              # 64 programs of 132 SMs
    assert variant_name(plan_launch(_shape(num_seqs=8))) == "decode-3d-k64w2"
    assert tile(short(num_seqs=8, max_seqlen_k=32768)) == (64, 2, 8)
    assert tile(short(num_seqs=8, max_seqlen_k=1024)) == (64, 2, 8)  # 2 tiles a segment
    assert tile(short(num_seqs=8, max_seqlen_k=256)) == (64, 2, 2)
    assert tile(short(num_seqs=5)) == (64, 2, 8)              # 40 programs
    assert tile(short(num_seqs=8, sm_count=256)) == (64, 2, 16)
    assert tile(short(num_seqs=8, sm_count=128)) == (64, 2, 8)  # 64 = half of 128 SMs
    assert tile(short(num_seqs=8, head_size=80)) == (64, 2, 8)  # padded to 128
    assert tile(short(num_seqs=8, num_q_heads=128)) == (64, 2, 8)  # GQA 16: 16 rows

    def unchanged(**kw):
        with monkeypatch.context() as patch:
            patch.setattr(heuristics, "SPLIT_NARROW_DECODE", False)
            without = short(**kw)
        return short(**kw) == without

    assert unchanged(num_seqs=4)                              # 32 < 132 / 4
    assert unchanged(num_seqs=9)                              # 72 > 132 / 2
    assert unchanged(num_seqs=8, sm_count=127)                # 64 > 127 / 2
    assert unchanged(num_seqs=1) and unchanged(num_seqs=32)
    assert unchanged(num_seqs=8, arch="sm80")
    assert unchanged(num_seqs=8, elem_bytes=1, kv_quant="fp8_per_tensor")
    assert unchanged(num_seqs=8, elem_bytes=1, kv_quant="fp8_per_tensor", head_size=64)
    assert unchanged(num_seqs=8, elem_bytes=4)                # fp32 cache
    assert unchanged(num_seqs=8, head_size=256)
    assert unchanged(num_seqs=8, head_size=64)                # measured at 128 wide only
    assert unchanged(num_seqs=8, head_size=128, head_size_v=64)   # DiffKV
    assert unchanged(num_seqs=8, max_seqlen_q=4)              # spec-decode: 16 rows too
    assert unchanged(num_seqs=8, num_q_heads=64, max_seqlen_q=4)  # 32 rows
    assert unchanged(num_seqs=8, max_seqlen_k=128)            # one segment: no split
    mixed = plan_launch(_shape(num_seqs=8, max_seqlen_q=2048), mode="mixed")["short"]
    assert mixed["block_n"] == 128
    forced = plan_launch(_shape(num_seqs=8), segments=1)["short"]  # PORTATTN_UNIFIED_SPLIT
    assert tile(forced) == (128, 4, 1)
    assert tile(plan_launch(_shape(num_seqs=8), segments=4)["short"]) == (64, 2, 4)
    monkeypatch.setattr(heuristics, "SPLIT_NARROW_DECODE", False)
    assert tile(short(num_seqs=8)) == (128, 4, 4)


@pytest.mark.parametrize("quant,elem", [("none", 2), ("fp8_per_tensor", 1),
                                        ("int8_per_token_head", 1)])
@pytest.mark.parametrize("num_kv_heads", [1, 2, 4, 8])
@pytest.mark.parametrize("sm_count", [132, 114, 78])
@pytest.mark.parametrize("arch,head_size,group,max_seqlen_k", [
    ("sm90", 128, 4, 8192), ("sm90", 64, 8, 1024), ("sm80", 128, 4, 256)])
def test_every_batch_of_a_bucket_gets_its_own_segment_count(quant, elem, num_kv_heads,
                                                            sm_count, arch, head_size,
                                                            group, max_seqlen_k):
    """A plan serves the batches of its bucket (``dispatch.problem.bucket``: 33-64
    sequences share the 64-sequence plan). Each batch must launch with the segment count
    the heuristics give that exact batch (its own plan's), not the bucket top's: fp8
    per-tensor 33 x 8192 on the H200 ran 1 segment in 162 us where 2 take 145. Where the
    batch's own plan has another tile (the narrow split tile's regime starts or ends
    inside the bucket), the count is the one the bucket's tile gives that batch."""
    from portattn.kernels.heuristics import quant_mode, segments_for

    def tile(cfg):
        return (cfg["block_m"], cfg["block_n"], cfg["num_warps"], cfg.get("maxnreg"),
                cfg.get("tile_heads", 1))

    def pow2_at_most(n):
        return 1 << (max(1, n).bit_length() - 1)

    def rule_of_tile(cfg, programs):
        """The documented segment rules, written here again: the paired 8-bit tile (4
        per SM; over ``tile_heads`` kv heads: that many times fewer programs, of that many
        times fewer keys per tile), the narrow split tile (64 keys, 2 warps: 4 per SM),
        the others (2 per SM, none once the programs fill the SMs); each segment 2 tiles
        or more."""
        heads = cfg.get("tile_heads", 1)
        keys = cfg["block_n"] // heads
        programs //= heads
        by_length = max(1, -(-max_seqlen_k // keys) // 2)
        if cfg.get("maxnreg") or (keys, cfg["num_warps"]) == (64, 2) and elem == 2:
            return pow2_at_most(min(4 * sm_count // programs, by_length, 64))
        if programs >= sm_count:
            return 1
        return pow2_at_most(min(max(1, 2 * sm_count // programs), by_length, 64))

    def shape(num_seqs):
        return _shape(num_q_heads=group * num_kv_heads, num_kv_heads=num_kv_heads,
                      head_size=head_size, elem_bytes=elem, num_seqs=num_seqs,
                      sm_count=sm_count, arch=arch, max_seqlen_k=max_seqlen_k,
                      kv_quant=quant_mode(quant))

    wrong, other_tile = [], 0
    for top in (2, 4, 8, 16, 32, 64, 128, 256, 512):
        bucket_plan = plan_launch(shape(top))["short"]
        for num_seqs in range(top // 2 + 1, top + 1):
            own_plan = plan_launch(shape(num_seqs))["short"]
            own = own_plan["segments"]
            if tile(own_plan) != tile(bucket_plan):
                other_tile += 1
                own = rule_of_tile(bucket_plan, num_seqs * num_kv_heads)
            if segments_for(bucket_plan, num_seqs) != own:
                wrong.append((top, num_seqs, segments_for(bucket_plan, num_seqs), own))
    assert not wrong, f"(bucket, batch, launched, own) {wrong[:8]}"
    if quant == "none" and arch != "sm90":  # 16-bit tiles change only in sm90's regime
        assert other_tile == 0


def test_the_bucket_rule_is_named_and_sized(monkeypatch):
    """The H200 case: the 64-sequence fp8 plan (a program per kv head) says in its
    variant name that up to 33 sequences take 2 segments, and its workspace holds the
    33-sequence launch's partials (the largest split launch of the bucket)."""
    from portattn.kernels import heuristics, launch
    from portattn.kernels.heuristics import quant_mode

    monkeypatch.setattr(heuristics, "MULTI_HEAD_DECODE_GROUPS", ())

    params = plan_launch(_shape(elem_bytes=1, num_seqs=64,
                                kv_quant=quant_mode("fp8_per_tensor")))
    assert params["short"]["segments"] == 1
    assert params["short"]["segments_upto"] == ((33, 2),)
    assert variant_name(params) == "decode-2d-2seg-upto-33-vpairs"
    partial_rows = 33 * 2 * params["short"]["block_q"] * 32  # batch x segments x rows
    assert launch.plan_workspace_size(64, 32, 8, 128, 128, False, torch.bfloat16,
                                      params) == partial_rows * (128 + 2)
    # the same after a JSON round trip (the rule's pairs as lists)
    from portattn.kernels.heuristics import segments_for

    listed = json.loads(json.dumps(params))
    assert [segments_for(listed["short"], n) for n in (33, 34)] == [2, 1]
    assert launch.plan_workspace_size(64, 32, 8, 128, 128, False, torch.bfloat16,
                                      listed) == partial_rows * (128 + 2)
    assert launch._descriptor_key({}, listed) == launch._descriptor_key({}, params)
    # a top that splits itself: the workspace is the largest of the top's and the rule's
    one_head = plan_launch(_shape(num_q_heads=4, num_kv_heads=1, num_seqs=64))
    assert one_head["short"]["segments"] > 1 and one_head["short"]["segments_upto"]
    widest = max(n * segments_for(one_head["short"], n) for n in range(33, 65))
    assert launch.plan_workspace_size(64, 4, 1, 128, 128, False, torch.bfloat16,
                                      one_head) == \
        widest * one_head["short"]["block_q"] * 4 * (128 + 2)
    # forced segments (PORTATTN_UNIFIED_SPLIT, sweeps) carry no rule
    forced = plan_launch(_shape(elem_bytes=1, num_seqs=64, kv_quant="fp8_per_tensor"),
                         segments=1)
    assert "segments_upto" not in forced["short"]


@interp
@pytest.mark.parametrize("in_kernel", [True, False])
@pytest.mark.parametrize("batch", [3, 4])
def test_a_bucket_plan_launches_the_batch_own_segments(batch, in_kernel, merged_in_kernel,
                                                       merge_kernel_calls):
    """Against the float64 oracle, through a plan made for the bucket (3 and 4 sequences
    share the 4-sequence plan): with 8 SMs and 2 kv heads, 4 sequences fill the GPU
    (1 segment) and 3 do not (6 programs: 2 segments, as 3 sequences' own plan says),
    merged in the attention kernel or by the merge kernel."""
    lens = [300, 211, 140, 257][:batch]
    check_unified([1] * batch, lens, group=2, dtype=F32, sm_count=8,
                  merge_in_kernel=in_kernel)
    split = batch == 3
    assert len(merge_kernel_calls) == (1 if split and not in_kernel else 0)
    if merge_kernel_calls:
        assert merge_kernel_calls[0][:2] == (3, 4)  # (sequences, q heads, query rows)
    own = plan_launch(_shape(num_q_heads=4, num_kv_heads=2, head_size=64, elem_bytes=4,
                             max_seqlen_k=512, num_seqs=batch, sm_count=8))
    assert [k["num_segments"] for k in merged_in_kernel] == [own["short"]["segments"]]
    assert own["short"]["segments"] == (2 if batch == 3 else 1)


def test_modes():
    assert plan_launch(_shape(max_seqlen_q=4, num_seqs=32))["mode"] == "decode"  # spec
    assert plan_launch(_shape(max_seqlen_q=8192))["mode"] == "prefill"
    mixed = plan_launch(_shape(max_seqlen_q=2048, num_seqs=64))
    assert mixed["mode"] == "mixed" and mixed["short"]["block_q"] >= 1
    assert mixed["long"]["block_m"] >= 64


@pytest.mark.parametrize("arch", ["sm80", "sm86", "sm89", "sm90", "sm100", "sm120",
                                  "gfx942", "gfx950"])
@pytest.mark.parametrize("elem", [1, 2, 4])
def test_tiles_fit_shared_memory(arch, elem):
    """Every tile the heuristics choose fits the arch's shared-memory budget (K and V
    tiles for every pipeline stage plus the query tile)."""
    from portattn.kernels.heuristics import shared_memory_budget

    too_big = []
    for head_size, head_size_v in ((64, None), (128, None), (256, None), (192, 128)):
        for mode, max_q, seqs in (("decode", 1, 1), ("mixed", 1024, 8), ("prefill", 8192, 1)):
            shape = _shape(head_size=head_size, head_size_v=head_size_v, elem_bytes=elem,
                           arch=arch, max_seqlen_q=max_q, num_seqs=seqs)
            params = plan_launch(shape, mode=mode)
            for part in ("short", "long"):
                if part not in params:
                    continue
                tile = TileConfig(**params[part])
                need = tile.smem_bytes(shape.head_pad, elem, shape.head_pad_v)
                if need > shared_memory_budget(arch):
                    too_big.append((head_size, head_size_v, mode, part, need))
    assert not too_big, f"budget {shared_memory_budget(arch)} B: {too_big}"


@pytest.mark.parametrize("env,num_seqs,variant", [
    ("", 1, "decode-3d"), ("", 128, "decode-2d"), ("0", 1, "decode-2d"),
    ("1", 128, "decode-3d")])
def test_split_override(monkeypatch, env, num_seqs, variant):
    from portattn.backends.triton_unified import TritonUnified

    monkeypatch.setenv("PORTATTN_UNIFIED_SPLIT", env)
    plan = TritonUnified().plan(_problem(num_seqs=num_seqs), _caps())
    assert plan.variant == variant, plan.describe()


# --------------------------------------------------------------------------- hardening
@interp
@pytest.mark.parametrize("q_len", [1, 3])
def test_window_never_reads_blocks_before_the_window(q_len):
    """Engines free blocks that slid out of every query's window: point those block-table
    entries at a NaN-poisoned block; any read of them would turn the output into NaN."""
    import portattn
    from portattn.testing import dense_attention, make_paged_batch, relative_error

    window, block_size = 6, 4
    batch = make_paged_batch([q_len, q_len], [61, 45], num_q_heads=4, num_kv_heads=2,
                             head_size=32, block_size=block_size, dtype=F32)
    table = batch.metadata.block_table.clone()
    used = set(table.flatten().tolist()) - {table[0, -1].item()}
    poisoned = next(b for b in range(batch.cache.num_blocks) if b not in used)
    assert torch.isnan(batch.cache.value_cache[poisoned]).all()
    for row, seq_len in enumerate(batch.seq_lens):
        first_visible = seq_len - q_len - window + 1
        table[row, : first_visible // block_size] = poisoned
    metadata = portattn.AttentionMetadata(batch.metadata.cu_seqlens_q,
                                          batch.metadata.seq_lens, table,
                                          batch.metadata.max_seqlen_q,
                                          batch.metadata.max_seqlen_k)
    out = portattn.attention(batch.q, batch.cache, metadata, backend="triton_unified",
                             sliding_window=window)
    expected = dense_attention(batch.q, batch.keys, batch.values, batch.query_lens,
                               sliding_window=window)
    assert relative_error(out, expected) < 2e-5


def test_strided_metadata_is_rejected():
    import portattn
    from portattn.testing import make_paged_batch

    batch = make_paged_batch([1, 1], [9, 5], num_q_heads=2, num_kv_heads=1, head_size=32)
    m = batch.metadata
    strided = torch.stack([m.seq_lens, m.seq_lens // 2], 1)[:, 0]
    with pytest.raises(portattn.InputError, match="^metadata.seq_lens: expected a contiguous"):
        portattn.attention(batch.q, batch.cache, portattn.AttentionMetadata(
            m.cu_seqlens_q, strided, m.block_table, 1, 9), validate=False)


def test_segment_counts_must_be_powers_of_two():
    shape = Shape.from_problem(Problem.make(num_seqs=1, seq_len=8192), 132, "sm90")
    with pytest.raises(ValueError, match="power of two"):
        plan_launch(shape, segments=3)


@interp
@pytest.mark.parametrize("split", ["0", "1"], ids=["2d", "split-kv"])
def test_sinks_past_the_base2_overflow(split, monkeypatch):
    """Sink logits of +inf and of 3e38 (whose base-2 value overflows fp32) dominate every
    finite score: those heads' rows are 0, as the reference gives, not NaN (inf - inf in
    the softmax: session 42's audit, 2D launch); a NaN sink stays NaN; the other heads
    match the float64 oracle. 2D and split-KV (the merge's sink) launches. The NaN case
    cannot fail here: the interpreter's maximum keeps a NaN, where the GPU's drops it
    (which left a NaN sink's rows finite, session 42): its GPU test of the same name
    guards the final normalizations."""
    import portattn
    from portattn.testing import dense_attention, make_paged_batch, relative_error

    monkeypatch.setenv("PORTATTN_UNIFIED_SPLIT", split)
    batch = make_paged_batch([1, 1, 1], [200, 9, 41], num_q_heads=8, num_kv_heads=2,
                             head_size=32, block_size=16, dtype=F32)
    sinks = torch.randn(8, generator=torch.Generator().manual_seed(3))
    finite = [0, 2, 3, 5, 7]
    expected = dense_attention(batch.q.double(), batch.keys, batch.values, batch.query_lens,
                               sinks=sinks)
    sinks[1], sinks[4], sinks[6] = float("inf"), 3e38, float("nan")
    out = torch.full_like(batch.q, 7.0)
    portattn.attention(batch.q, batch.cache, batch.metadata, sinks=sinks, out=out,
                       backend="triton_unified")
    assert (out[:, [1, 4]] == 0).all()
    assert torch.isnan(out[:, 6]).all()
    assert relative_error(out[:, finite].double(), expected[:, finite]) < 1e-5
    variant = portattn.explain(batch.q, batch.cache, batch.metadata, sinks=sinks,
                               backend="triton_unified").variant
    assert variant.startswith("decode-3d" if split == "1" else "decode-2d"), variant
