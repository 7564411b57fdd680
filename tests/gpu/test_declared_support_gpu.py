"""Every head size and dtype a Triton backend declares, run on the GPU (one decode and one
chunked prefill each) and checked against the float64 oracle.

The cases are generated from the backend's own declarations (``SUPPORTED_DTYPES``,
``HEAD_SIZE_RANGE``, ``HEAD_SIZE_STEP``), so a size or dtype the backend starts to
declare is tested the moment it is declared. The call goes through ``portattn.attention``
with automatic routing: declared support must be what the dispatcher picks.
"""

from __future__ import annotations

import importlib

import pytest

import portattn
from portattn.testing import dense_attention, make_paged_batch, relative_error

from unified_check import TOLERANCE

pytestmark = pytest.mark.gpu

#: backend name -> the module whose constants declare its support. triton_diffkv shares
#: triton_unified's declarations for each of K and V; its cases pair every declared K
#: size with a V size further along the declared range (so every size is a K size once
#: and a V size once) instead of the full cross product.
DECLARING = {"triton_unified": "portattn.backends.triton_unified",
             "triton_diffkv": "portattn.backends.triton_unified"}

CASES = {
    "decode": dict(query_lens=[1, 1, 1], seq_lens=[300, 17, 64]),
    "prefill": dict(query_lens=[130], seq_lens=[200]),
}


def _declared_cases():
    for backend, module_name in DECLARING.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # collected on machines without Triton too
            yield pytest.param(backend, None, None, marks=pytest.mark.skip(
                reason=f"{module_name} does not import here: {exc}"))
            continue
        lo, hi = module.HEAD_SIZE_RANGE
        sizes = list(range(lo, hi + 1, module.HEAD_SIZE_STEP))
        for dtype in module.SUPPORTED_DTYPES:
            for i, head_size in enumerate(sizes):
                head_v = sizes[(i + 7) % len(sizes)] if backend == "triton_diffkv" \
                    else head_size
                yield pytest.param(backend, dtype, (head_size, head_v),
                                   id=f"{backend}-{str(dtype)[6:]}-h{head_size}-v{head_v}")


@pytest.mark.parametrize("backend,dtype,heads", list(_declared_cases()))
def test_every_declared_head_size_and_dtype_runs(backend, dtype, heads):
    head_size, head_v = heads if heads is not None else (None, None)
    for kind, lengths in CASES.items():
        batch = make_paged_batch(lengths["query_lens"], lengths["seq_lens"], num_q_heads=8,
                                 num_kv_heads=2, head_size=head_size, head_size_v=head_v,
                                 dtype=dtype, device="cuda", seed=head_size)
        decision = portattn.explain(batch.q, batch.cache, batch.metadata)
        assert decision.backend == backend, (kind, str(decision))
        out = portattn.attention(batch.q, batch.cache, batch.metadata)
        expected = dense_attention(batch.q, batch.keys, batch.values, batch.query_lens)
        err = relative_error(out, expected)
        assert err < TOLERANCE[dtype], (kind, err, decision.plan.describe())
