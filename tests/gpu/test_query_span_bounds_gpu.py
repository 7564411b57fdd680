"""GPU tier of ``tests/test_query_span_bounds.py``: a bad ``cu_seqlens_q`` never makes a
Triton kernel read q or write out outside their rows.

Every launch shape (decode tiles 2D / split with either merge / several kv heads per
program, spec-decode, prefill, mixed, staged prefill, the Gluon prefill over the cache and
over a staged fp8 copy, quantized and DiffKV caches) x every edit of
``unified_check.CU_SEQLENS_EDITS``: out's guard rows keep their value, the sequences the
edit left alone match the float64 oracle, and the device reports no fault. Then the
public call as an engine makes it, GPU metadata and no value checks (the default), a
billion rows past q's end: nothing outside out is written and the process goes on."""

from __future__ import annotations

import math

import pytest
import torch

import portattn
from portattn import KVQuant
from portattn.testing import make_paged_batch

from unified_check import CU_SEQLENS_EDITS, GUARD_ROWS, GUARD_VALUE, run_gpu_case

pytestmark = pytest.mark.gpu

DECODE = dict(query_lens=[1, 1, 1, 1, 1, 1], seq_lens=[300, 1000, 64, 2000, 17, 513],
              mode="decode")
PREFILL = dict(query_lens=[300, 77, 513, 129], seq_lens=[300, 600, 513, 900], mode="prefill")
FP8 = KVQuant.fp8_per_tensor(0.02, 0.03)
VARIANTS = {
    "decode-2d": dict(DECODE, segments=1),
    "decode-3d-merge-kernel": dict(DECODE, segments=8, merge_in_kernel=False),
    "decode-3d-merged-in-kernel": dict(DECODE, segments=8, merge_in_kernel=True),
    "decode-two-kv-heads-a-program": dict(DECODE, segments=4, tile_heads=2),
    "spec-decode": dict(query_lens=[3, 4, 1, 2, 4, 2], seq_lens=[300, 1000, 64, 2000, 17, 513],
                        mode="decode", segments=2),
    "prefill": PREFILL,
    "mixed": dict(query_lens=[1, 300, 1, 77, 5], seq_lens=[900, 600, 33, 300, 1000],
                  mode="mixed", segments=4),
    "staged": dict(PREFILL, stage=128),
    "gluon-over-the-cache": dict(PREFILL, stage=128, gluon=True),
    "gluon-over-a-staged-fp8-copy": dict(PREFILL, stage=128, gluon=True, quant=FP8),
    "decode-fp8": dict(DECODE, segments=8, quant=FP8),
    "decode-int8-per-token-head": dict(DECODE, segments=8,
                                       quant=KVQuant.int8_per_token_head()),
    "prefill-diffkv": dict(PREFILL, head_size=192, head_size_v=128),
}


@pytest.mark.parametrize("edit", list(CU_SEQLENS_EDITS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bad_spans_stay_inside_q_and_out(variant, edit):
    case = VARIANTS[variant]
    if case.get("gluon") and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon prefill runs on sm90 only")
    run_gpu_case(case, cu_seqlens_edit=CU_SEQLENS_EDITS[edit])
    torch.cuda.synchronize()  # a fault would surface here


@pytest.mark.parametrize("query_lens", [[1] * 8, [1, 700, 1, 300], [64, 900, 513, 77]],
                         ids=["decode", "mixed", "prefill"])
def test_the_default_call_on_gpu_metadata_stays_inside_out(query_lens):
    seq_lens = [max(n, 1) + 200 for n in query_lens]
    batch = make_paged_batch(query_lens, seq_lens, num_q_heads=8, num_kv_heads=2,
                             head_size=128, dtype=torch.bfloat16, device="cuda")
    m = batch.metadata
    good = portattn.attention(batch.q, batch.cache, m, backend="triton_unified")
    cu = m.cu_seqlens_q.clone()
    cu[-1] = 2 ** 30
    bad = portattn.AttentionMetadata(cu, m.seq_lens, m.block_table, m.max_seqlen_q,
                                     m.max_seqlen_k)
    tokens = batch.q.shape[0]
    full = torch.full((tokens + GUARD_ROWS, 8, 128), GUARD_VALUE, dtype=torch.bfloat16,
                      device="cuda")
    out = full[:tokens]
    out.fill_(math.nan)
    # no value checks (GPU metadata); our kernels (flash-attn's do not bound the spans)
    portattn.attention(batch.q, batch.cache, bad, out=out, backend="triton_unified")
    torch.cuda.synchronize()
    assert (full[tokens:] == GUARD_VALUE).all(), "wrote past out's last row"
    intact = int(m.cu_seqlens_q[-2])
    assert torch.equal(out[:intact], good[:intact])
    again = portattn.attention(batch.q, batch.cache, m, backend="triton_unified")
    # the device still works
    assert torch.equal(again, good)
