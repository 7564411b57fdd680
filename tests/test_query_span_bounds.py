"""A bad ``cu_seqlens_q`` (GPU metadata is not value-checked by default) never makes the
Triton kernels read q or write out outside their rows (interpreter tier; the GPU tier is
``tests/gpu/test_query_span_bounds_gpu.py``).

Each case puts q and out between guard rows, runs a forced plan over metadata whose
``cu_seqlens_q`` runs past q's end, starts before it, decreases, or claims a billion rows,
and checks that out's guard rows are untouched and that the sequences the edit left
alone still match the float64 oracle."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import portattn
from portattn.kernels.heuristics import TileConfig
from portattn.testing import make_paged_batch

from unified_check import CU_SEQLENS_EDITS, GUARD_ROWS, GUARD_VALUE, check_unified

F16, F32 = torch.float16, torch.float32
SMALL_LONG = TileConfig(block_m=32, block_q=16, block_n=16, num_warps=4, num_stages=2)

interp = pytest.mark.interpreter


def small_long(group: int) -> TileConfig:
    return dataclasses.replace(SMALL_LONG, block_q=SMALL_LONG.block_m // group)


#: Every launch shape the spans reach: decode tiles (2D; split with the merge kernel or
#: merged in the kernel; several queries), global query tiles, a mixed batch's two launches,
#: a staged prefill (the staging kernel and the launch over staged keys).
VARIANTS = {
    "decode-2d": dict(query_lens=[1, 1, 1, 1, 1], seq_lens=[20, 33, 9, 17, 25], mode="decode",
                      segments=1),
    "decode-3d-merge-kernel": dict(query_lens=[1, 1, 1, 1, 1], seq_lens=[40, 33, 9, 47, 25],
                                   mode="decode", segments=4, merge_in_kernel=False),
    "decode-3d-merged-in-kernel": dict(query_lens=[1, 1, 1, 1, 1],
                                       seq_lens=[40, 33, 9, 47, 25], mode="decode",
                                       segments=4, merge_in_kernel=True),
    "spec-decode": dict(query_lens=[3, 2, 1, 3, 2], seq_lens=[20, 33, 9, 17, 25],
                        mode="decode", segments=2),
    "prefill": dict(query_lens=[5, 17, 9, 12], seq_lens=[5, 30, 20, 12], mode="prefill",
                    long=small_long(2)),
    "mixed": dict(query_lens=[1, 19, 1, 3, 9], seq_lens=[30, 45, 12, 20, 9], mode="mixed",
                  segments=2, long=small_long(4), group=4),
    "staged": dict(query_lens=[13, 6, 9, 14], seq_lens=[41, 6, 20, 30], mode="prefill",
                   long=small_long(2), stage=32, dtype=F16),
}


@interp
@pytest.mark.parametrize("edit", list(CU_SEQLENS_EDITS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bad_spans_stay_inside_q_and_out(variant, edit):
    case = dict(VARIANTS[variant])
    case.setdefault("group", 2)
    case.setdefault("dtype", F32)
    check_unified(case.pop("query_lens"), case.pop("seq_lens"),
                  cu_seqlens_edit=CU_SEQLENS_EDITS[edit], **case)


@interp
@pytest.mark.parametrize("query_lens", [[1, 1, 1, 1], [7, 1, 12, 3]], ids=["decode", "mixed"])
def test_the_public_call_without_value_checks_stays_inside_out(query_lens):
    """``validate=False`` (what GPU metadata gets by default): the call routes as usual, and
    a last sequence running past q's end leaves the rows after out's untouched."""
    batch = make_paged_batch(query_lens, [19, 8, 30, 12], num_q_heads=4, num_kv_heads=2,
                             head_size=32, dtype=F32)
    m = batch.metadata
    cu = m.cu_seqlens_q.clone()
    cu[-1] += 9
    bad = portattn.AttentionMetadata(cu, m.seq_lens, m.block_table, m.max_seqlen_q,
                                     m.max_seqlen_k)
    tokens = batch.q.shape[0]
    full = torch.full((tokens + GUARD_ROWS, 4, 32), GUARD_VALUE)
    out = full[:tokens]
    out.fill_(math.nan)
    portattn.attention(batch.q, batch.cache, bad, out=out, backend="triton_unified",
                       validate=False)
    assert (full[tokens:] == GUARD_VALUE).all(), "wrote past out's last row"
    good = portattn.attention(batch.q, batch.cache, m, backend="triton_unified")
    assert torch.equal(out[:int(m.cu_seqlens_q[-2])], good[:int(m.cu_seqlens_q[-2])])
    with pytest.raises(portattn.InputError, match="cu_seqlens_q"):
        portattn.attention(batch.q, batch.cache, bad, backend="triton_unified")
