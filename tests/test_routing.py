"""Routing for every simulated profile, and support tests generated from declarations."""

import json
from pathlib import Path

import pytest
import torch

from portattn.backends.triton_unified import (
    HEAD_SIZE_RANGE,
    HEAD_SIZE_STEP,
    SUPPORTED_DTYPES,
    TritonUnified,
)
from portattn.capabilities import PROFILES, probe
from portattn.dispatch import Problem, decide
from portattn.dispatch.routing import COMMON_PROBLEMS, backend_availability, routing_table

CI = Path(__file__).resolve().parents[1] / "ci"
ROUTING = json.loads((CI / "expected_routing.json").read_text())
EXPECTED = ROUTING["profiles"]
EXPECTED_WITH_FLASH_ATTN = ROUTING["flash_attn_profiles"]
KNOWN_GAPS = {(profile, gap["problem"]): gap["reason"] for gap in ROUTING["known_gaps"]
              for profile in gap["profiles"]}
MATRIX = json.loads((CI / "matrix.json").read_text())


def test_matrix_and_expectations_cover_every_profile():
    assert {p["profile"] for p in MATRIX["profiles"]} == set(PROFILES)
    assert set(EXPECTED) == set(PROFILES)
    for profile, table in EXPECTED.items():
        assert set(table) == set(COMMON_PROBLEMS), profile


@pytest.mark.parametrize("profile", PROFILES)
def test_routing_matches_expected(profile):
    caps = probe(simulate=profile)
    got = {row["problem"]: row["backend"] for row in routing_table(caps)}
    assert got == EXPECTED[profile]


@pytest.mark.parametrize("profile", sorted(EXPECTED_WITH_FLASH_ATTN))
def test_routing_with_flash_attn_matches_expected(profile):
    assert set(EXPECTED_WITH_FLASH_ATTN[profile]) == set(COMMON_PROBLEMS)
    caps = probe(simulate=profile)
    assert caps.flash_attn_interfaces  # a profile with flash-attn installed
    got = {row["problem"]: row["backend"] for row in routing_table(caps)}
    assert got == EXPECTED_WITH_FLASH_ATTN[profile]


def _gpu_rows():
    """(profile, problem, expected backend) of every GPU profile, in every routing table
    of the file (``profiles`` and, where present, ``flash_attn_profiles``)."""
    for table_name in ("profiles", "flash_attn_profiles"):
        for profile, table in ROUTING.get(table_name, {}).items():
            if probe(simulate=profile).device_type != "cpu":
                for problem, backend in table.items():
                    yield profile, problem, backend


def test_gpu_rows_served_by_the_reference_are_known_gaps():
    """On a GPU the reference is a slow path: every row that expects it names the gap."""
    unlisted = [(profile, problem) for profile, problem, backend in _gpu_rows()
                if backend == "torch_ref" and (profile, problem) not in KNOWN_GAPS]
    assert not unlisted, f"GPU rows routed to torch_ref without a known_gaps entry: {unlisted}"


def test_known_gaps_are_still_gaps():
    """A gap a kernel has closed must leave the list (the routing tests make the
    expectations follow the dispatcher)."""
    rows = {(profile, problem): backend for profile, problem, backend in _gpu_rows()}
    for (profile, problem), reason in KNOWN_GAPS.items():
        assert (profile, problem) in rows, f"not a GPU row: {profile} / {problem}"
        assert rows[profile, problem] == "torch_ref", f"closed gap still listed: " \
            f"{profile} / {problem}"
        assert len(reason) > 20


@pytest.mark.parametrize("profile", PROFILES)
def test_every_rejection_has_reasons(profile):
    caps = probe(simulate=profile)
    for kwargs in COMMON_PROBLEMS.values():
        decision = decide(Problem.make(device_type=caps.device_type, **kwargs), caps)
        for name, reasons in decision.considered:
            assert all(isinstance(r, str) and len(r) > 10 for r in reasons), (name, reasons)


def _sizes_inside():
    lo, hi = HEAD_SIZE_RANGE
    return sorted({lo, lo + HEAD_SIZE_STEP, 80, 96, 112, 128, 192, hi})


def _sizes_outside():
    lo, hi = HEAD_SIZE_RANGE
    return [lo - HEAD_SIZE_STEP, lo + HEAD_SIZE_STEP // 2, hi + HEAD_SIZE_STEP]


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES, ids=str)
def test_declared_support_is_served(dtype):
    caps = probe(simulate="sm90")
    backend = TritonUnified()
    for head_size in _sizes_inside():
        for q_heads, kv_heads in ((8, 8), (12, 4), (10, 2), (32, 4), (6, 6)):
            problem = Problem.make(num_q_heads=q_heads, num_kv_heads=kv_heads,
                                   head_size=head_size, dtype=dtype)
            assert backend.why_not(problem, caps) == [], (dtype, head_size, q_heads)


@pytest.mark.parametrize("head_size", _sizes_outside())
def test_outside_declared_support_has_a_reason(head_size):
    caps = probe(simulate="sm90")
    problem = Problem.make(head_size=head_size, dtype=torch.float16)
    reasons = TritonUnified().why_not(problem, caps)
    assert any(f"head size {head_size}" in r for r in reasons), reasons
    decision = decide(problem, caps)
    assert decision.backend == "torch_ref"
    assert "triton_unified" in decision.rejected


def test_cpu_without_interpreter_rejects_triton_with_the_probe_reason():
    caps = probe(simulate="cpu")
    table = backend_availability(caps)
    assert table["torch_ref"]["available"]
    assert not table["triton_unified"]["available"]
    assert any("TRITON_INTERPRET" in r or "GPU" in r for r in table["triton_unified"]["reasons"])


def test_plans_use_the_probed_sm_count():
    """The same problem gets launch parameters sized to each device."""
    problem = Problem.make(num_seqs=1, seq_len=8192, dtype="bfloat16")
    plans = {p: decide(problem, probe(simulate=p)).plan for p in ("sm86", "sm90", "gfx942")}
    assert all(plan.backend == "triton_unified" for plan in plans.values())
    assert len({json.dumps(p.params, sort_keys=True, default=str) for p in plans.values()}) > 1
