"""GPU tier for plans: replayed launches against the reference, alignment changes, CUDA
graphs, streams, no syncs, launch hooks, memory released with the caches."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch

import portattn
from portattn import AttentionMetadata, PagedKVCache, planning, settings
from portattn.kernels import fast_launch, launch_entries
from portattn.kernels.heuristics import MERGE_IN_KERNEL
from portattn.kernels.scalars import device_scalars
from portattn.testing import dense_attention, make_paged_batch, relative_error

pytestmark = pytest.mark.gpu
BF16 = torch.bfloat16

CASES = {  # query lens, seq lens, expected variant prefix, kernel launches per call
    "decode-2d": ([1] * 64, [700 + 13 * i for i in range(64)], "decode-2d", 1),
    # split decode: one launch where the last segment program of each (sequence, kv
    # head) merges the partials (heuristics.MERGE_IN_KERNEL), else kernel + merge kernel
    "decode-3d": ([1, 1], [5000, 1700], "decode-3d", 1 if MERGE_IN_KERNEL else 2),
    "spec-decode": ([4, 3, 4], [900, 40, 2000], "decode", None),
    "prefill": ([300], [300], "prefill", 1),
    # 4 sequences x 8 kv heads do not fill the GPU: split decode tiles plus the
    # long-tile launch
    "mixed": ([1, 200, 1, 3], [900, 700, 64, 2000], "mixed-3d", 2 if MERGE_IN_KERNEL else 3),
    # sm90: the staging launch, then the attention over host descriptors of the staged
    # keys (their tensor maps made once per workspace address, the C entry called)
    "prefill-staged": ([1024], [1024], "prefill-2d-staged", 2),
    # sm90 (auto): the Gluon prefill over the paged cache, one launch
    "prefill-gluon": ([1024], [1024], "prefill-2d-gluon", 1),
}


@pytest.fixture(autouse=True)
def fresh_plans():
    planning.clear()
    yield
    planning.clear()
    settings.reload()  # after a test's monkeypatched environment is restored


def _counting(runner):
    """Count the runner's normal-path (JIT) calls."""
    calls = [0]
    original = runner._launch

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    runner._launch = counted
    return calls


@pytest.mark.parametrize("case", list(CASES))
def test_replayed_layers_match_the_reference(case, monkeypatch):
    if case.startswith("prefill-") and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("staging and the Gluon prefill are planned on sm90 only (where they "
                    "were measured)")
    if case == "prefill-staged":  # the staged unified kernel, not the Gluon one
        monkeypatch.setenv("PORTATTN_GLUON", "0")
        settings.reload()
    query_lens, seq_lens, prefix, launches = CASES[case]
    batch = make_paged_batch(query_lens, seq_lens, num_q_heads=32, num_kv_heads=8,
                             head_size=128, dtype=BF16, device="cuda")
    plan = portattn.plan(batch.metadata, num_q_heads=32, dtype=BF16, cache=batch.cache,
                         sinks=True, validate=False)
    assert plan.backend == "triton_unified" and plan.variant.startswith(prefix)
    jit_calls = _counting(plan._body.runner)
    gen = torch.Generator().manual_seed(1)
    for layer, s in enumerate((1.0, -0.5, 2.0, 0.75)):
        cache = PagedKVCache(batch.cache.key_cache * s, batch.cache.value_cache * s)
        q = torch.randn(batch.q.shape, generator=gen).to("cuda", BF16)
        sinks = torch.randn(32, generator=gen).cuda()
        out = torch.full_like(q, math.nan)
        plan.run(q, cache, out, sinks=sinks)
        expected = dense_attention(q.cpu(), [k * s for k in batch.keys],
                                   [v * s for v in batch.values], query_lens,
                                   sinks=sinks.cpu())
        assert torch.isfinite(out).all()
        assert relative_error(out, expected) < 2e-2, f"layer {layer}"
    assert jit_calls[0] == 1, "later layers went through Triton's JIT"
    slot = next(iter(plan._accepted.values()))
    assert slot.reason is None
    if launches is not None:
        assert len(slot.sequence.sites) == launches
    fields = launch_entries.ENTRY_FIELDS
    # a known release (3.6's per-kernel entry, 3.7 to 3.9's shared one) also bypasses
    # Triton's descriptor wrapper (NVIDIA's make_tensordesc_arg, no tuple parameters)
    known = launch_entries.c_launch_known() or slot.sequence.arg_layout == "shared"
    for entry in slot.sequence.table.values():
        kinds = []
        for site, k in zip(slot.sequence.sites, range(0, len(entry), fields)):
            launch, expanders = entry[k], entry[k + 5]
            c_entry = type(launch).__name__ == "builtin_function_or_method"
            # the launcher object: where neither C entry is known, or to allocate scratch
            through_run = getattr(launch, "__qualname__", "").endswith("through_run")
            kinds.append(c_entry)
            if site.descriptors and known:
                # Triton 3.6 to 3.9: the C entry, tensor maps kept per address
                assert c_entry, launch
                assert all(e.__qualname__.startswith("_encoder.") for e in expanders)
            elif site.descriptors:
                # an unknown release: the launcher object, encoding per launch
                assert through_run or launch.__qualname__.endswith("<locals>.inner"), launch
                assert all(e.__qualname__.startswith("_as_descriptor.") for e in expanders)
            else:
                assert c_entry or through_run, launch
        # a known release calls its C entry (descriptors unwrapped; a kernel with scratch
        # would take its launcher object), elsewhere the launcher object every time
        assert any(kinds) == known, "the C entry of a known release is never called"
    # attention() serves the same structure from the same body
    eager = portattn.attention(q, cache, batch.metadata, sinks=sinks, validate=False)
    assert torch.equal(eager, out)


def test_a_misaligned_q_gets_its_own_kernel():
    batch = make_paged_batch([1, 1, 1], [300, 1000, 64], num_q_heads=32, num_kv_heads=8,
                             head_size=128, dtype=BF16, device="cuda")
    plan = portattn.plan(batch.metadata, num_q_heads=32, dtype=BF16, cache=batch.cache,
                         validate=False)
    jit_calls = _counting(plan._body.runner)
    expected = dense_attention(batch.q.cpu(), batch.keys, batch.values, [1, 1, 1])
    shifted = torch.empty(batch.q.numel() + 1, dtype=BF16, device="cuda")[1:]
    shifted = shifted.view(batch.q.shape)
    shifted.copy_(batch.q)
    assert shifted.data_ptr() % 16 == 2
    for q, calls in ((batch.q, 1), (batch.q, 1), (shifted, 2), (shifted, 2),
                     (batch.q, 2)):
        out = plan.run(q, batch.cache)
        assert relative_error(out, expected) < 2e-2 and jit_calls[0] == calls


def test_cuda_graph_of_plan_run_split_kv():
    seq_lens = [3000, 700]
    batch = make_paged_batch([1, 1], [n + 4 for n in seq_lens], num_q_heads=32,
                             num_kv_heads=8, head_size=128, dtype=BF16, device="cuda")
    m = batch.metadata
    m.seq_lens.copy_(torch.tensor(seq_lens, dtype=torch.int32))
    metadata = AttentionMetadata(m.cu_seqlens_q, m.seq_lens, m.block_table, 1,
                                 max(seq_lens) + 4)
    plan = portattn.plan(metadata, num_q_heads=32, dtype=BF16, cache=batch.cache,
                         validate=False)
    assert plan.variant.startswith("decode-3d")
    q = batch.q.clone()
    out = torch.full_like(q, math.nan)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # compile, record, replay
            plan.run(q, batch.cache, out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan.run(q, batch.cache, out)
    for step in range(3):
        q.copy_(torch.randn_like(q))
        metadata.seq_lens.add_(1)
        out.fill_(math.nan)
        graph.replay()
        torch.cuda.synchronize()
        lens = [n + step + 1 for n in seq_lens]
        expected = dense_attention(q.cpu(), [k[:n] for k, n in zip(batch.keys, lens)],
                                   [v[:n] for v, n in zip(batch.values, lens)], [1, 1])
        assert relative_error(out, expected) < 2e-2
        assert torch.equal(out, plan.run(q, batch.cache))  # eager replay agrees


def test_streams_get_their_own_workspace():
    batch = make_paged_batch([1, 1], [4000, 900], num_q_heads=32, num_kv_heads=8,
                             head_size=128, dtype=BF16, device="cuda")
    plan = portattn.plan(batch.metadata, num_q_heads=32, dtype=BF16, cache=batch.cache,
                         validate=False)
    runner = plan._body.runner
    assert runner.workspace_size > 0
    expected = dense_attention(batch.q.cpu(), batch.keys, batch.values, [1, 1])
    streams = [torch.cuda.Stream() for _ in range(2)]
    outs = []
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            outs.append([plan.run(batch.q, batch.cache) for _ in range(5)])
    torch.cuda.synchronize()
    assert len(runner._workspaces) >= 2
    for per_stream in outs:
        for out in per_stream:
            assert relative_error(out, expected) < 2e-2


def test_a_float_scale_made_on_a_busy_stream_is_not_read_from_another():
    """A float scale's device tensor is filled on the stream that made it, with no sync.
    Stream ``a`` is kept busy (a sleep kernel) so the fill of the scales its call makes
    waits; a call on stream ``b`` with the same float scales, queued meanwhile, must not
    read those tensors unfilled: both streams' outputs match the oracle. A freed MiB of
    NaN on the new stream ``a`` is where its next small allocations (``out``, the scales)
    land, so an unfilled scale reads as NaN rather than as a leftover that may pass.

    The batch's cache is written (on the default stream, which makes device tensors for
    the write's own scales) with the scales the oracle dequantizes with; both calls read
    those bytes through a second cache whose scales are the same floats nudged by one part
    in 2**20 (far inside the tolerance): floats nothing made a tensor for before stream
    ``a``'s call. Without the nudge the write's tensors, filled long before, would serve
    both streams and the test could not fail (it passed at 81818d2 that way, H100)."""
    def batch_with(k_scale, v_scale):
        quant = portattn.KVQuant.fp8_per_tensor(k_scale, v_scale)
        return make_paged_batch([1, 1], [300, 900], num_q_heads=8, num_kv_heads=2,
                                head_size=128, dtype=BF16, device="cuda", quant=quant)

    warm = batch_with(0.0517, 0.0443)  # compiles, on scales this test does not race
    portattn.attention(warm.q, warm.cache, warm.metadata, validate=False)
    scales = (0.0371, 0.0213)  # values no other test uses
    batch = batch_with(*scales)
    expected = dense_attention(batch.q.cpu(), batch.keys, batch.values, [1, 1])
    nudged = tuple(scale * (1 + 2.0 ** -20) for scale in scales)
    cache = PagedKVCache(batch.cache.key_cache, batch.cache.value_cache,
                         portattn.KVQuant.fp8_per_tensor(*nudged))
    for value, role in zip(nudged, ("k", "v")):  # the race needs a scale made in the window
        assert not device_scalars.kept(value, batch.q.device, role), "scale made before"
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # no free block left from earlier tests on a pooled stream
    a, b = torch.cuda.Stream(), torch.cuda.Stream()
    for stream in (a, b):  # each pool holds what its call allocates: no cudaMalloc (an
        with torch.cuda.stream(stream):  # implicit sync point) in the window below
            pools = [torch.empty(64 << 20, dtype=torch.uint8, device="cuda"),
                     torch.full((1 << 18,), math.nan, device="cuda")]  # large; 1 MiB small
            del pools
    torch.cuda.synchronize()
    with torch.cuda.stream(a):
        torch.cuda._sleep(300_000_000)  # some 0.15 s of a busy stream
        out_a = portattn.attention(batch.q, cache, batch.metadata, validate=False)
    with torch.cuda.stream(b):
        out_b = portattn.attention(batch.q, cache, batch.metadata, validate=False)
    torch.cuda.synchronize()
    assert relative_error(out_b, expected) < 3e-2, "stream b read a scale before its fill"
    assert relative_error(out_a, expected) < 3e-2


def test_no_device_sync_when_planning_and_running():
    batch = make_paged_batch([1, 1], [300, 1000], num_q_heads=32, num_kv_heads=8,
                             head_size=128, dtype=BF16, device="cuda")
    portattn.attention(batch.q, batch.cache, batch.metadata)  # compile outside the check
    m = batch.metadata
    fresh = AttentionMetadata(m.cu_seqlens_q, m.seq_lens, m.block_table, m.max_seqlen_q,
                              m.max_seqlen_k)
    torch.cuda.set_sync_debug_mode("error")
    try:
        plan = portattn.plan(fresh, num_q_heads=32, dtype=BF16, cache=batch.cache)
        for _ in range(3):
            plan.run(batch.q, batch.cache)
            portattn.attention(batch.q, batch.cache, fresh)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_launch_hooks_see_every_launch():
    """With a profiler-style launch hook installed, launches go through Triton's JIT (so
    the hook sees them) and results stay right."""
    from triton import knobs

    batch = make_paged_batch([1, 1], [300, 1000], num_q_heads=32, num_kv_heads=8,
                             head_size=128, dtype=BF16, device="cuda")
    plan = portattn.plan(batch.metadata, num_q_heads=32, dtype=BF16, cache=batch.cache,
                         validate=False)
    plan.run(batch.q, batch.cache)
    seen = []

    def hook(metadata):
        seen.append(metadata.get()["name"] if hasattr(metadata, "get") else metadata)

    knobs.runtime.launch_enter_hook.add(hook)
    try:
        assert fast_launch.triton_state() is None
        out = plan.run(batch.q, batch.cache)
        torch.cuda.synchronize()
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert len(seen) >= 1
    expected = dense_attention(batch.q.cpu(), batch.keys, batch.values, [1, 1])
    assert relative_error(out, expected) < 2e-2


def test_caches_are_freed_when_dropped():
    batch = make_paged_batch([1, 1], [300, 1000], num_q_heads=32, num_kv_heads=8,
                             head_size=128, dtype=BF16, device="cuda")
    plan = portattn.plan(batch.metadata, num_q_heads=32, dtype=BF16, cache=batch.cache,
                         validate=False)
    caches = [PagedKVCache(torch.zeros(20000, 16, 8, 128, dtype=BF16, device="cuda"),
                           torch.zeros(20000, 16, 8, 128, dtype=BF16, device="cuda"))
              for _ in range(4)]  # 655 MB each
    refs = [weakref.ref(c.key_cache) for c in caches]
    for cache in caches:
        plan.run(batch.q, cache)
        portattn.attention(batch.q, cache, batch.metadata, validate=False)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    del caches, cache
    gc.collect()
    assert [r() for r in refs] == [None] * 4
    assert torch.cuda.memory_allocated() < before - 4 * 2 * 600e6


@pytest.mark.parametrize("where", ["q_scale", "k_scale"])
@pytest.mark.parametrize("value", [0.0, float("nan")])
def test_run_with_validate_range_checks_gpu_scales(where, value):
    """``run(validate=True)`` reads scales held in GPU tensors, as ``attention`` does;
    without it they are not read (no sync) and the call goes through."""
    k_scale = torch.tensor(0.5, device="cuda")
    quant = portattn.KVQuant.fp8_per_tensor(k_scale, 0.25)
    batch = make_paged_batch([1, 1], [40, 70], num_q_heads=8, num_kv_heads=2, head_size=64,
                             dtype=torch.bfloat16, device="cuda", quant=quant, poison=False)
    q8 = batch.q.to(torch.float8_e4m3fn)
    q_scale = torch.tensor(1.0, device="cuda")
    plan = portattn.plan(batch.metadata, num_q_heads=8, dtype=torch.float8_e4m3fn,
                         cache=batch.cache)
    plan.run(q8, batch.cache, q_scale=q_scale, validate=True)
    (q_scale if where == "q_scale" else k_scale).fill_(value)
    name = "q_scale" if where == "q_scale" else "quant.k_scale"
    with pytest.raises(portattn.InputError, match=rf"^{name}: expected a finite positive"):
        plan.run(q8, batch.cache, q_scale=q_scale, validate=True)
    with pytest.raises(portattn.InputError, match=rf"^{name}: expected a finite positive"):
        portattn.attention(q8, batch.cache, batch.metadata, q_scale=q_scale, validate=True)
