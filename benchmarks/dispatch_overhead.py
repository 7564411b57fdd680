"""Host time a cached ``portattn.attention`` call adds over launching the chosen kernel.

Runs a tiny decode (1 sequence, 32 keys) so the GPU finishes each kernel faster than the
host can launch the next: the loop's wall time per call is then host time. Compares
(a) ``portattn.attention`` (public call: fast-path memo + backend.run),
(b) the chosen backend's ``run`` called directly with a precomputed plan (the launcher),
and reports (a) - (b). Prints one JSON line.
"""

from __future__ import annotations

import json
import statistics

import torch

import portattn
from portattn.api import _prepare
from portattn.bench import host_us
from portattn.capabilities import probe
from portattn.dispatch import decide
from portattn.dispatch.registry import load_backend
from portattn.testing import make_paged_batch


def per_call_us(fn, calls=2000, repeats=7) -> float:
    """Median over ``repeats`` of the host time per call (portattn.bench.host_us)."""
    return statistics.median(host_us(fn, calls) for _ in range(repeats))


def main() -> dict:
    batch = make_paged_batch([1], [32], num_q_heads=32, num_kv_heads=8, head_size=128,
                             dtype=torch.bfloat16, device="cuda")
    q, cache, metadata = batch.q, batch.cache, batch.metadata
    out = torch.empty_like(q)
    kwargs = dict(scale=None, causal=True, sliding_window=None, softcap=None,
                  alibi_slopes=None, alibi_sqrt=False, sinks=None, q_scale=None,
                  output_scale=None)
    options, problem = _prepare(q, cache, metadata, None, out, kwargs)
    decision = decide(problem, probe())
    backend = load_backend(decision.backend)
    for _ in range(20):  # compile + warm every path
        portattn.attention(q, cache, metadata, out=out)
        backend.run(q, cache, metadata, options, out, decision.plan)
    api = per_call_us(lambda: portattn.attention(q, cache, metadata, out=out))
    api_alloc = per_call_us(lambda: portattn.attention(q, cache, metadata))
    direct = per_call_us(lambda: backend.run(q, cache, metadata, options, out, decision.plan))
    result = {"gpu": torch.cuda.get_device_name(), "backend": decision.backend,
              "variant": decision.plan.describe(), "attention_us": round(api, 2),
              "attention_alloc_out_us": round(api_alloc, 2),
              "backend_run_us": round(direct, 2),
              "dispatch_overhead_us": round(api - direct, 2), "target_us": 5.0}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
