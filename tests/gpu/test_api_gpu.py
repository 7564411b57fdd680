"""GPU tier for the public call: CUDA-graph capture and replay, torch.compile, no syncs."""

import pytest
import torch

import portattn
from portattn.testing import dense_attention, make_paged_batch, relative_error

from sync_spy import DeviceSyncSpy

pytestmark = pytest.mark.gpu


def _decode_batch(seed=0):
    # room to grow: every sequence gets 4 spare slots beyond its current length
    seq_lens = [300, 1000, 64, 2000]
    batch = make_paged_batch([1, 1, 1, 1], [n + 4 for n in seq_lens], num_q_heads=8,
                             num_kv_heads=2, head_size=128, dtype=torch.bfloat16,
                             device="cuda", seed=seed)
    return batch, seq_lens


def test_cuda_graph_capture_and_replay_matches_eager():
    batch, seq_lens = _decode_batch()
    meta = batch.metadata
    # capture with the capacity as max_seqlen_k, current lengths in seq_lens (in place later)
    meta.seq_lens.copy_(torch.tensor(seq_lens, dtype=torch.int32))
    metadata = portattn.AttentionMetadata(meta.cu_seqlens_q, meta.seq_lens, meta.block_table,
                                          max_seqlen_q=1, max_seqlen_k=max(seq_lens) + 4)
    q = batch.q.clone()
    out = torch.full_like(q, float("nan"))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up: compile kernels outside the capture
        for _ in range(2):
            portattn.attention(q, batch.cache, metadata, out=out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        portattn.attention(q, batch.cache, metadata, out=out)

    for step in range(3):  # new queries, one more key per sequence each step
        q.copy_(torch.randn_like(q))
        metadata.seq_lens.add_(1)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        lens = [n + step + 1 for n in seq_lens]
        keys = [k[:n] for k, n in zip(batch.keys, lens)]
        values = [v[:n] for v, n in zip(batch.values, lens)]
        expected = dense_attention(q, keys, values, [1] * 4)
        eager = portattn.attention(q, batch.cache, metadata)
        assert relative_error(out, expected) < 1e-2
        assert torch.equal(out, eager)


def test_no_device_sync_with_max_lengths():
    batch, _ = _decode_batch(seed=1)
    portattn.attention(batch.q, batch.cache, batch.metadata)  # warm up: compile kernels
    m = batch.metadata
    fresh = portattn.AttentionMetadata(m.cu_seqlens_q, m.seq_lens, m.block_table,
                                       m.max_seqlen_q, m.max_seqlen_k)
    device_tensors = (batch.q, batch.cache.key_cache, batch.cache.value_cache,
                      m.cu_seqlens_q, m.seq_lens, m.block_table)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with DeviceSyncSpy(device_tensors):  # host reads, named with their source line
            portattn.attention(batch.q, batch.cache, fresh)   # memo miss: the full checks
            portattn.attention(batch.q, batch.cache, fresh)   # memo hit
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_torch_compile_inductor_on_gpu():
    batch, _ = _decode_batch(seed=2)

    def layer(x, cache, metadata):
        return portattn.attention(x * 1.0, cache, metadata) + 1

    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(batch.q, batch.cache, batch.metadata)
    expected = dense_attention(batch.q, batch.keys, batch.values, [1] * 4) + 1
    assert relative_error(out, expected) < 1e-2


def test_demo_runs_on_gpu():
    from portattn.cli import main

    assert main(["demo"]) == 0
