"""One GPU check shared by the backend tiers: a decode / spec-decode step through
``portattn.attention`` makes no device sync once warm, is captured in a CUDA graph, and
the graph replayed with new queries and one more key per sequence each step matches the
dense oracle (the metadata's lengths change in place, as an engine's do)."""

from __future__ import annotations

import torch

import portattn
from portattn.testing import dense_attention, relative_error


def check_graph_replay_without_syncs(batch, seq_lens, query_len: int, backend: str,
                                     steps: int, tolerance: float) -> None:
    """``batch``: 4 sequences of ``query_len`` queries with room for ``steps`` more keys
    beyond ``seq_lens`` (its metadata is set to ``seq_lens`` here)."""
    m = batch.metadata
    m.seq_lens.copy_(torch.tensor(seq_lens, dtype=torch.int32))
    metadata = portattn.AttentionMetadata(m.cu_seqlens_q, m.seq_lens, m.block_table,
                                          max_seqlen_q=query_len,
                                          max_seqlen_k=max(seq_lens) + 4)
    q = batch.q.clone()
    out = torch.full_like(q, float("nan"))
    portattn.attention(q, batch.cache, metadata, out=out, backend=backend)  # warm up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        portattn.attention(q, batch.cache, metadata, out=out, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        portattn.attention(q, batch.cache, metadata, out=out, backend=backend)
    for step in range(steps):  # new queries, one more key per sequence each step
        q.copy_(torch.randn_like(q))
        metadata.seq_lens.add_(1)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        lens = [n + step + 1 for n in seq_lens]
        expected = dense_attention(q, [k[:n] for k, n in zip(batch.keys, lens)],
                                   [v[:n] for v, n in zip(batch.values, lens)],
                                   [query_len] * 4)
        assert relative_error(out, expected) < tolerance
