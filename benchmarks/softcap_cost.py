"""What a softcap costs the prefill kernels, per tanh form, in one process (H100 / H200).

    PYTHONPATH=src python3 benchmarks/softcap_cost.py LABEL

Times (``triton.testing.do_bench`` on ``plan.run(q, cache, out=out)``, eager) the 1 x 8192
causal prefill through the staged unified kernel (``PORTATTN_GLUON=0``) and the Gluon
kernel (``1``), plain, with softcap 30 (the fast tanh: ``heuristics.softcap_code`` 1) and
with softcap 1e6 (the exact small-argument tanh: code 2), and a mixed batch (a 2048-query
chunk over 8192 keys beside 63 decodes over 4096) the same three ways. 32 / 8 heads of
128, bf16, block 16. Prints one JSON line, tagged with LABEL; to compare two source trees
run it once per tree (``PYTHONPATH=<tree>/src``), alternately, on one machine.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CASES = (("plain", {}), ("softcap 30", dict(softcap=30.0)), ("softcap 1e6", dict(softcap=1e6)))


def main() -> int:
    import triton
    from gluon_features_bench import _time

    import portattn
    from portattn import settings
    from portattn.testing import make_paged_batch

    label = sys.argv[1] if len(sys.argv) > 1 else "this tree"
    rows: dict = {}
    for name, kw in CASES:
        for mode in ("0", "1"):
            us, _variant = _time(mode, None, kw)
            rows[f"{name} gluon={mode}"] = round(us, 1)
    os.environ.pop("PORTATTN_GLUON", None)
    settings.reload()
    batch = make_paged_batch([2048] + [1] * 63, [8192] + [4096] * 63, num_q_heads=32,
                             num_kv_heads=8, head_size=128, block_size=16,
                             dtype=torch.bfloat16, device="cuda", poison=False)
    for name, kw in CASES:
        plan = portattn.plan(batch.metadata, num_q_heads=32, dtype=torch.bfloat16,
                             cache=batch.cache, backend="triton_unified", **kw)
        out = torch.empty_like(batch.q)
        ms = triton.testing.do_bench(lambda: plan.run(batch.q, batch.cache, out=out),
                                     warmup=50, rep=300)
        rows[f"mixed {name}"] = round(ms * 1000.0, 1)
        rows[f"mixed {name} variant"] = plan.variant.split(" ")[0]
    print(json.dumps({"src": label, "gpu": torch.cuda.get_device_name(), **rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
