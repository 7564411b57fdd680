"""The routing table: which backend and variant serve a set of common problems.

``portattn report`` prints it for the machine (or a simulated profile), and CI checks it
for every simulated profile against ``ci/expected_routing.json``.
"""

from __future__ import annotations

from portattn.capabilities import Capabilities
from portattn.dispatch.problem import Problem
from portattn.dispatch.registry import backend_names, load_backend
from portattn.dispatch.selector import decide
from portattn.errors import InputError, UnsupportedError

#: name -> keyword arguments of Problem.make (device_type comes from the capabilities).
COMMON_PROBLEMS: dict[str, dict] = {
    "decode bf16 32/8x128 b16 (32 x 8k)": dict(dtype="bfloat16", num_seqs=32),
    "decode bf16 32/8x128 b16 (1 x 8k)": dict(dtype="bfloat16", num_seqs=1),
    "decode fp16 32/8x128 b16": dict(dtype="float16", num_seqs=32),
    "prefill bf16 causal 1 x 8k": dict(dtype="bfloat16", query_len=8192, seq_len=8192),
    "prefill fp16 causal 4 x 2k": dict(dtype="float16", query_len=2048, seq_len=2048,
                                       num_seqs=4),
    "spec-decode bf16 4 q/seq": dict(dtype="bfloat16", query_len=4, num_seqs=32),
    "decode bf16 b256": dict(dtype="bfloat16", block_size=256, num_seqs=32),
    "decode fp8-per-tensor KV": dict(dtype="bfloat16", kv_quant="fp8_per_tensor:e4m3fn",
                                     num_seqs=32),
    "decode int8-per-token-head KV": dict(dtype="bfloat16", kv_quant="int8_per_token_head",
                                          num_seqs=32),
    "decode DiffKV 192/128": dict(dtype="bfloat16", head_size=192, head_size_v=128,
                                  num_seqs=32),
    "prefill bf16 sliding window": dict(dtype="bfloat16", query_len=2048, seq_len=8192,
                                        sliding_window=True),
    "decode bf16 sinks": dict(dtype="bfloat16", sinks=True, num_seqs=32),
    "decode bf16 alibi sqrt": dict(dtype="bfloat16", alibi="sqrt", num_seqs=32),
}


def routing_table(caps: Capabilities) -> list[dict]:
    rows = []
    for name, kwargs in COMMON_PROBLEMS.items():
        problem = Problem.make(device_type=caps.device_type, **kwargs)
        try:
            decision = decide(problem, caps, log=False)  # a listing, not a call
            rows.append({"problem": name, "backend": decision.backend,
                         "variant": decision.plan.describe(), "notes": list(decision.notes)})
        except (InputError, UnsupportedError) as exc:  # e.g. a bad PORTATTN_* value
            rows.append({"problem": name, "backend": "none",
                         "variant": str(exc).splitlines()[0]})
    return rows


def backend_availability(caps: Capabilities) -> dict[str, dict]:
    """Each registered backend: available on this machine or not, with the reasons."""
    table = {}
    for name in backend_names():
        backend = load_backend(name)
        if isinstance(backend, str):
            reasons = [backend]
            summary = ""
        else:
            summary = backend.summary
            try:
                reasons = backend.unavailable(caps)
            except Exception as exc:  # never let a report crash on one backend
                reasons = [f"unavailable() raised {type(exc).__name__}: {exc}"]
        table[name] = {"available": not reasons, "reasons": reasons, "summary": summary}
    return table
