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

from unified_check import GPU_FEATURE_KW, KernelCalls, check_unified

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


@pytest.mark.parametrize("block_size", [5, 24, 48])
@pytest.mark.parametrize("variant", ["decode-2d", "decode-3d", "chunked", "mixed-3d"])
def test_window_with_block_sizes_that_do_not_divide_the_tile(block_size, variant):
    """A window over block sizes that do not divide the KV tile, tables that fit some
    sequences exactly: no row may come out NaN from a bad-id check of an empty tile range
    (the interpreter tier's test of the same name, at GPU scale and tiles)."""
    seq_lens = [block_size * (-(-n // block_size)) for n in VARIANTS[variant]["seq_lens"]]
    seq_lens[0] += 1  # one sequence a key past a block boundary
    run(variant, seq_lens=seq_lens, block_size=block_size, group=4, num_kv_heads=2,
        head_size=128, dtype=F16, sliding_window=100)


FEATURES = GPU_FEATURE_KW


@pytest.mark.parametrize("softcap", [1e4, 1e6, 1e8])
@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("variant", ["decode-3d", "chunked"])
def test_large_softcaps(softcap, dtype, variant):
    """A softcap far above the scores (tanh's argument tiny) stays within the dtype's
    tolerance (the interpreter tier's test of the same name, at GPU scale)."""
    run(variant, group=4, num_kv_heads=2, head_size=128, dtype=dtype, softcap=softcap)


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("variant", ["decode-2d", "decode-3d", "chunked", "mixed-3d"])
def test_features(feature, variant):
    run(variant, group=4, num_kv_heads=2, head_size=128, dtype=BF16, **FEATURES[feature])


#: The narrow split decode tile (heuristics.narrow_decode): 64 keys, 2 warps, 8 segments
NARROW = TileConfig(block_m=16, block_q=4, block_n=64, num_warps=2, num_stages=2, segments=8)


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("dtype", [BF16, F16])
def test_narrow_split_decode_tile(feature, dtype):
    """The narrow split tile with every score feature, short sequences whose segments
    hold no tile, sinks merged after the split."""
    check_unified(DECODE["query_lens"], DECODE["seq_lens"], group=4, num_kv_heads=2,
                  head_size=128, dtype=dtype, device=DEV, short=NARROW, **FEATURES[feature])


@pytest.mark.parametrize("head_size,group,batch", [(128, 4, 8), (96, 4, 6), (80, 2, 5),
                                                   (128, 1, 7), (128, 16, 8)])
def test_narrow_split_decode_through_the_public_api(head_size, group, batch):
    """Decodes whose (sequence, kv head) pairs fill a quarter to a half of the SMs take the
    narrow split tile (on sm90; elsewhere the 128-key tile) through ``portattn.attention``,
    with the segment count its rule gives the batch, against the float64 oracle."""
    import portattn
    from portattn.dispatch.problem import bucket
    from portattn.kernels.heuristics import (
        Shape,
        narrow_decode,
        narrow_decode_segments,
        segments_for,
    )
    from portattn.testing import dense_attention, make_paged_batch, relative_error

    caps = portattn.probe()
    # a third of the SMs' programs for the bucket's largest batch (the plan's)
    num_kv_heads = max(1, (caps.sm_count // 3) // bucket(batch))
    seq_lens = [8192, 3, 5000, 700, 1, 2048, 4097, 640][:batch]
    inputs = make_paged_batch([1] * batch, seq_lens, num_q_heads=group * num_kv_heads,
                              num_kv_heads=num_kv_heads, head_size=head_size, dtype=BF16,
                              device=DEV, seed=head_size + batch)
    decision = portattn.explain(inputs.q, inputs.cache, inputs.metadata)
    assert decision.backend == "triton_unified", decision
    short = decision.plan.params["short"]
    plan_shape = Shape(group * num_kv_heads, num_kv_heads, head_size, 2, 1, 8192,
                       bucket(batch), caps.sm_count, caps.arch)
    narrow = narrow_decode(plan_shape, 1, bucket(batch) * num_kv_heads)
    assert narrow == (caps.arch == "sm90"), decision.plan.describe()
    assert (short["block_n"], short["num_warps"]) == ((64, 2) if narrow else (128, 4)), \
        decision.plan.describe()
    if narrow:
        assert segments_for(short, batch) == \
            narrow_decode_segments(plan_shape, batch * num_kv_heads), decision.plan.describe()
    out = portattn.attention(inputs.q, inputs.cache, inputs.metadata)
    expected = dense_attention(inputs.q, inputs.keys, inputs.values, [1] * batch)
    assert relative_error(out, expected) < 2e-2, decision.plan.describe()


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


def test_bucket_plan_names_the_segments_of_smaller_batches(monkeypatch):
    """One kv head of 128 (GQA 8), 33 bf16 decodes: their plan is the 64-sequence
    bucket's, which names the extra segments 33 sequences take below the top's (the
    heuristics for the GPU's own SM count); the public call launches that count (its
    grid's third axis, plans forgotten first so the call is not a replay of an earlier
    one) and matches the oracle."""
    import portattn
    from portattn import planning
    from portattn.kernels import launch
    from portattn.kernels.heuristics import Shape, plan_launch, segments_for
    from portattn.testing import dense_attention, make_paged_batch, relative_error

    seq_lens = [500 + (91 * i) % 3000 for i in range(33)]
    batch = make_paged_batch([1] * 33, seq_lens, num_q_heads=8, num_kv_heads=1,
                             head_size=128, dtype=BF16, device=DEV)
    decision = portattn.explain(batch.q, batch.cache, batch.metadata)
    assert decision.backend == "triton_unified", decision
    caps = portattn.probe(device=batch.q.device)
    own = plan_launch(Shape(8, 1, 128, 2, 1, 4096, 33, caps.sm_count, caps.arch))["short"]
    short = decision.plan.params["short"]
    assert segments_for(short, 33) == own["segments"] > short["segments"], \
        decision.plan.describe()
    assert "seg-upto-" in decision.variant
    calls = KernelCalls(launch.unified_attention_kernel)
    monkeypatch.setattr(launch, "unified_attention_kernel", calls)
    planning.forget_plans()
    out = portattn.attention(batch.q, batch.cache, batch.metadata)
    assert [grid[2] for grid in calls.grids] == [own["segments"]], calls.grids
    expected = dense_attention(batch.q, batch.keys, batch.values, [1] * 33)
    assert relative_error(out, expected) < 2e-2


# --------------------------------------------------------------------------- split-KV merge
@pytest.mark.parametrize("in_kernel", [True, False])
@pytest.mark.parametrize("segments,head_size,group,batch", [
    (32, 128, 4, 1), (64, 128, 8, 3), (16, 256, 5, 2), (64, 64, 1, 9), (8, 80, 3, 40)])
def test_split_merges_in_kernel_and_by_merge_kernel(segments, head_size, group, batch,
                                                     in_kernel):
    """Both merges of split-KV partials (the last segment program of each (sequence, kv
    head) in the attention kernel, or the merge kernel) against the float64 oracle,
    up to 64 segments, short sequences whose segments hold no tile, sinks."""
    seq_lens = [8192, 3, 5000, 77, 1, 2048, 640, 9000, 16][:batch] * (batch // 9 + 1)
    check_unified([1] * batch, seq_lens[:batch], group=group, num_kv_heads=2,
                  head_size=head_size, dtype=BF16, device=DEV, segments=segments,
                  sinks=True, merge_in_kernel=in_kernel)


def _split_decode(segments: int):
    """A bf16 split decode (8 sequences x 8 kv heads, GQA 4) and its launch parameters."""
    from portattn.kernels import heuristics
    from portattn.options import normalize_options
    from portattn.testing import make_paged_batch

    seq_lens = [4096, 17, 3000, 1, 2500, 900, 4000, 64]
    batch = make_paged_batch([1] * 8, seq_lens, num_q_heads=32, num_kv_heads=8,
                             head_size=128, dtype=BF16, device=DEV, seed=5)
    shape = heuristics.Shape(32, 8, 128, 2, 1, 4096, 8, 132, "sm90")
    params = heuristics.plan_launch(shape, segments=segments)
    return batch, normalize_options(batch.q, batch.cache), params


def test_merge_in_kernel_many_launches_agree_bit_for_bit():
    """200 launches on one workspace, the output NaN-filled before each: every result
    bit-identical to the first, which matches the oracle. A ticket lost or counted twice
    (memory ordering between the segment programs) would skip a merge (NaN rows left),
    merge before every partial landed (a different sum), or leave a ticket set (the
    next launch merges early)."""
    from portattn.kernels import launch
    from portattn.testing import dense_attention, relative_error

    batch, options, params = _split_decode(32)
    ws = launch.new_workspace(1 << 22, DEV)
    out = torch.full_like(batch.q, float("nan"))
    launch.launch_unified(batch.q, batch.cache, batch.metadata, options, out, params, ws)
    first = out.clone()
    expected = dense_attention(batch.q, batch.keys, batch.values, [1] * 8)
    assert relative_error(first, expected) < 2e-2
    differs = torch.zeros((), dtype=torch.bool, device=DEV)
    for _ in range(200):
        out.fill_(float("nan"))
        launch.launch_unified(batch.q, batch.cache, batch.metadata, options, out, params, ws)
        differs |= (out != first).any()  # NaN != anything: a skipped merge counts
    assert not differs.item(), "a launch's output differed from the first one"
    assert not ws[:launch.MERGE_TICKETS].view(torch.int32).any()


def test_merge_in_kernel_in_a_cuda_graph():
    """A split decode captured in a CUDA graph (its partials in the graph's pool, its
    merge tickets a slice of the device's slab that the eager launch before the capture
    made: no memset in the graph) replayed with growing lengths against the oracle; the
    slice is zero after every replay."""
    from portattn.kernels import graph_tickets, launch
    from portattn.testing import dense_attention, relative_error

    batch, options, params = _split_decode(16)
    meta = batch.metadata
    full = meta.seq_lens.clone()
    meta.seq_lens.sub_(3).clamp_(min=1)
    out = torch.full_like(batch.q, float("nan"))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile outside the capture
        launch.launch_unified(batch.q, batch.cache, meta, options, out, params)
    torch.cuda.current_stream().wait_stream(stream)
    device = batch.q.device
    first = graph_tickets.used(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch.launch_unified(batch.q, batch.cache, meta, options, out, params)
    assert graph_tickets.used(device) > first, "the capture did not take slab tickets"
    slab = graph_tickets._slabs[device][0]
    for _ in range(3):
        meta.seq_lens.copy_(torch.minimum(meta.seq_lens + 1, full))
        batch.q.copy_(torch.randn_like(batch.q))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        lens = meta.seq_lens.tolist()
        expected = dense_attention(batch.q, [k[:n] for k, n in zip(batch.keys, lens)],
                                   [v[:n] for v, n in zip(batch.values, lens)], [1] * 8)
        assert relative_error(out, expected) < 2e-2
        assert not slab[first:graph_tickets.used(device)].any(), "a ticket was left set"


@pytest.mark.parametrize("case", [
    ([1, 1, 1, 1], [1000, 9, 517, 2049], "0"),   # decode, 2D
    ([1, 1, 1, 1], [1000, 9, 517, 2049], "1"),   # decode, split-KV (the merge's sink)
    ([1, 3, 1], [700, 300, 33], "auto"),          # spec / mixed rows
    ([2048], [2048], "auto"),                     # a long prefill (the Gluon kernel on sm90)
], ids=["decode-2d", "decode-3d", "mixed", "prefill"])
def test_sinks_past_the_base2_overflow(case, monkeypatch):
    """Sinks of +inf and 3e38 (base-2 overflow) give rows of 0, a NaN sink NaN rows, the
    other heads the float64 oracle's values (the interpreter test of the same name, on the
    GPU's launches, the Gluon prefill included)."""
    import portattn
    from portattn.testing import dense_attention, make_paged_batch, relative_error

    query_lens, seq_lens, split = case
    monkeypatch.setenv("PORTATTN_UNIFIED_SPLIT", split)
    batch = make_paged_batch(query_lens, seq_lens, num_q_heads=8, num_kv_heads=2,
                             head_size=128, block_size=16, dtype=BF16, device=DEV)
    sinks = torch.randn(8, generator=torch.Generator().manual_seed(3))
    finite = [0, 2, 3, 5, 7]
    expected = dense_attention(batch.q.cpu().double(), [k.cpu() for k in batch.keys],
                               [v.cpu() for v in batch.values], batch.query_lens, sinks=sinks)
    sinks[1], sinks[4], sinks[6] = float("inf"), 3e38, float("nan")
    sinks = sinks.to(DEV)
    decision = portattn.explain(batch.q, batch.cache, batch.metadata, sinks=sinks)
    out = torch.full_like(batch.q, 7.0)
    portattn.attention(batch.q, batch.cache, batch.metadata, sinks=sinks, out=out)
    out = out.cpu()
    assert (out[:, [1, 4]] == 0).all(), decision.variant
    assert torch.isnan(out[:, 6]).all(), decision.variant
    assert relative_error(out[:, finite].double(), expected[:, finite]) < 1e-2, decision.variant
