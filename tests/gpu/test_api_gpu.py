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


def test_torch_compile_decode_step_with_write_on_gpu():
    """A compiled decode step that writes this step's keys and values (the Triton write
    kernel, slots of -1 skipped) and then attends: the stored tokens and the output match
    a plain-indexing write and the dense oracle, at two batch sizes (dynamic shapes)."""
    batch, seq_lens = _decode_batch(seed=3)
    cache, meta = batch.cache, batch.metadata
    num_kv_heads, head_size = cache.num_kv_heads, cache.head_size_qk

    def step(q, key, value, slots, metadata):
        cache.write(key, value, slots)
        return portattn.attention(q, cache, metadata) * 2

    compiled = torch.compile(step, dynamic=True)
    lens = [n + 4 for n in seq_lens]
    block_table = meta.block_table.cpu()
    for rows in (4, 3):
        key = torch.randn(rows, num_kv_heads, head_size, dtype=cache.dtype, device="cuda")
        value = torch.randn_like(key)
        # each sequence's last slot (its newest key); one -1 slot when three are written
        last = [int(block_table[b, (n - 1) // cache.block_size]) * cache.block_size +
                (n - 1) % cache.block_size for b, n in enumerate(lens)]
        chosen = last if rows == 4 else [last[0], -1, last[2]]
        slots = torch.tensor(chosen, dtype=torch.int64, device="cuda")
        keys = [k.clone() for k in batch.keys]
        values = [v.clone() for v in batch.values]
        for i, slot in enumerate(chosen):
            if slot >= 0:
                b = last.index(slot)
                keys[b][lens[b] - 1], values[b][lens[b] - 1] = key[i], value[i]
        q = torch.randn_like(batch.q)
        out = compiled(q, key, value, slots, meta)
        flat_k = cache.key_cache.reshape(-1, num_kv_heads, head_size)
        flat_v = cache.value_cache.reshape(-1, num_kv_heads, head_size)
        for i, slot in enumerate(chosen):
            if slot >= 0:
                assert torch.equal(flat_k[slot], key[i]) and torch.equal(flat_v[slot], value[i])
        expected = dense_attention(q, keys, values, [1] * 4) * 2
        assert relative_error(out, expected) < 1e-2
        batch.keys, batch.values = keys, values


def test_demo_runs_on_gpu():
    from portattn.cli import main

    assert main(["demo"]) == 0
