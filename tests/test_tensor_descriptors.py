"""Descriptor (TMA) K/V loads of the unified kernel: rules, selection, gate, interpreter.

* Eligibility rules (:mod:`portattn.kernels.kv_load`): every reason, pure functions.
* Selection (:func:`portattn.backends.triton_kv_load.choose_kv_load`): ``PORTATTN_TD``'s
  three states on simulated profiles and on a "real" (non-simulated) device whose
  functional gate is replaced by an injected runner (compile failure, mismatch, crash).
* The gate (:mod:`portattn.capabilities.kv_descriptor_gate`): memory and disk caching,
  keys per machine and variant, failures recorded with their reason.
* The kernel's ``KV_LOAD=1`` path under the Triton interpreter against the float64
  oracle (``unified_check.check_unified(kv_load="descriptor")``). What the interpreter
  cannot run: Triton's GPU compiler (the TMA lowering, the software pipeliner with
  descriptors, ``tensormap_create`` and the scratch allocator). It emulates a descriptor
  load as a masked gather with the descriptor's bounds, so these tests prove the
  addressing (block, slot, kv head coordinates; zero padding past the head size; masked
  keys; bad block ids) and the numerics, not that sm90 compiles it: that is
  ``tests/gpu/test_tensor_descriptors_gpu.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

import portattn
from portattn import InputError
from portattn.backends import triton_kv_load
from portattn.backends.triton_unified import TritonUnified
from portattn.capabilities import kv_descriptor_gate as gate
from portattn.capabilities.cache import write_json_atomic
from portattn.capabilities.model import Check
from portattn.capabilities.profiles import simulated
from portattn.dispatch.problem import Problem
from portattn.dispatch.selector import Decision
from portattn.errors import UnsupportedError
from portattn.kernels import heuristics
from portattn.kernels import kv_load as rules
from portattn.types import KVQuant, PagedKVCache

# --------------------------------------------------------------------- eligibility rules


@pytest.mark.parametrize("block_size, block_n, expect", [
    (16, 128, 16), (32, 128, 32), (64, 128, 64), (128, 128, 128), (256, 128, 128),
    (256, 64, 64), (48, 128, 16), (16, 16, 16)])
def test_descriptor_block_n_is_a_whole_part_of_a_block(block_size, block_n, expect):
    got = rules.descriptor_block_n(block_n, block_size)
    assert got == expect
    assert block_size % got == 0 and got <= block_n


@pytest.mark.parametrize("block_size", [1, 8, 24, 40])
def test_block_sizes_without_a_16_key_tile_are_refused(block_size):
    reasons = rules.problem_reasons(block_size=block_size, head_size_qk=128,
                                    head_size_v=128, elem_bytes=2)
    assert len(reasons) == 1 and f"block size {block_size}" in reasons[0]


@pytest.mark.parametrize("head", [64, 96, 128, 192, 256])
@pytest.mark.parametrize("elem_bytes", [1, 2, 4])
def test_supported_heads_are_eligible(head, elem_bytes):
    assert rules.problem_reasons(block_size=16, head_size_qk=head, head_size_v=head,
                                 elem_bytes=elem_bytes) == []


def test_head_above_the_tma_box_is_refused():
    reasons = rules.problem_reasons(block_size=16, head_size_qk=320, head_size_v=128,
                                    elem_bytes=2)
    assert reasons and "K head size 320" in reasons[0] and "256" in reasons[0]


def test_tensor_reasons_name_each_alignment_rule():
    ok = rules.tensor_reasons("key_cache", 4096, (2048, 128, 64, 1), 2)
    assert ok == []
    base = rules.tensor_reasons("key_cache", 4098, (2048, 128, 64, 1), 2)
    assert len(base) == 1 and "base address" in base[0] and "key_cache" in base[0]
    last = rules.tensor_reasons("value_cache", 4096, (2048, 128, 1, 16), 2)
    assert any("last dim is not contiguous" in r for r in last)
    stride = rules.tensor_reasons("key_cache", 4096, (2048, 40, 4, 1), 1)
    assert [r for r in stride if "slot stride 40" in r] and [r for r in stride
                                                            if "head stride 4" in r]
    assert "needs 4" in rules.tensor_reasons("key_cache", 0, (4, 1), 2)[0]


def test_launch_reasons_catch_a_tile_crossing_blocks():
    params = {"mode": "mixed", "short": {"block_n": 128}, "long": {"block_n": 16}}
    why = rules.launch_reasons(params, 16)
    assert len(why) == 1 and "short tile of 128 keys" in why[0]
    fixed = rules.descriptor_params(params, 16)
    assert rules.launch_reasons(fixed, 16) == [] and fixed["kv_load"] == "descriptor"
    assert params["short"]["block_n"] == 128, "descriptor_params must not edit its input"
    # a tile below a descriptor tile's 16 keys is named as such, not as crossing a block
    # of 8 slots it fits in (the kernel fuzz's finding)
    assert rules.launch_reasons({"mode": "decode", "short": {"block_n": 8}}, 8) == [
        "short tile of 8 keys is below the 16 keys of a descriptor tile"]


# ---------------------------------------------------------------------------- selection

def _problem(**kw):
    base = dict(num_q_heads=8, num_kv_heads=2, head_size=128, block_size=64,
                dtype="float16", seq_len=1024)
    return Problem.make(**{**base, **kw})


def _plan(problem, caps):
    return TritonUnified().plan(problem, caps)


def _real(caps):
    """A simulated profile made to look probed, so the functional gate runs."""
    return dataclasses.replace(caps, profile=None)


@pytest.fixture
def gate_calls(monkeypatch, tmp_path):
    """Replaces the gate's runner (records calls, answers from ``answer``) and isolates
    its disk cache."""
    monkeypatch.setenv("PORTATTN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("PORTATTN_NO_DISK_CACHE", raising=False)
    monkeypatch.setattr(triton_kv_load, "_gate_device", lambda caps: "cuda:0")
    gate.clear()
    calls: list[dict] = []
    answer = {"value": {"ok": True, "reason": ""}}

    def runner(variant, device):
        calls.append(variant)
        value = answer["value"]
        if isinstance(value, Exception):
            raise value
        return value

    monkeypatch.setattr(gate, "RUNNER", runner)
    yield calls, answer
    gate.clear()


def test_auto_keeps_pointer_loads_outside_the_measured_classes(monkeypatch, gate_calls):
    """The recorded table (H200 measurements) names sm90 prefill / mixed at blocks 64
    and 128 only: every other class keeps pointer loads without running the gate."""
    monkeypatch.delenv("PORTATTN_TD", raising=False)
    calls, _ = gate_calls
    for profile in ("sm80", "sm90", "sm100", "gfx942"):
        for query_len, num_seqs, block_size in ((1, 8, 128), (512, 1, 16), (512, 1, 32),
                                                (64, 4, 32), (1, 8, 16), (1, 8, 64)):
            plan = _plan(_problem(query_len=query_len, num_seqs=num_seqs,
                                  block_size=block_size), _real(simulated(profile)))
            assert plan.params["kv_load"] == "pointer", (profile, plan.describe())
            assert "-td" not in plan.variant
    plan = _plan(_problem(), _real(simulated("sm90")))
    assert "no measurement recorded" in plan.params["kv_load_reason"]
    assert "kv_load=pointer" in plan.describe()
    assert calls == [], "classes outside the evidence table must not run the gate"


def test_recorded_table_selects_descriptors_for_block_128_prefill(monkeypatch, gate_calls):
    monkeypatch.delenv("PORTATTN_TD", raising=False)
    calls, _ = gate_calls
    for head_size, head_size_v, block_size in ((128, None, 128), (192, 128, 128),
                                               (128, None, 64)):
        plan = _plan(_problem(query_len=512, block_size=block_size, dtype="bfloat16",
                              head_size=head_size, head_size_v=head_size_v),
                     _real(simulated("sm90")))
        assert plan.params["kv_load"] == "descriptor", plan.describe()
        assert "H200" in plan.params["kv_load_reason"]
    assert calls, "a selected class runs the functional gate first"
    # measured classes only: another head size, an 8-bit cache, block 256
    for kw in (dict(head_size=64), dict(kv_quant="fp8_per_tensor:e4m3fn"),
               dict(block_size=256), dict(head_size=192, head_size_v=192),
               dict(head_size=192, head_size_v=128, block_size=64)):
        plan = _plan(_problem(**{**dict(query_len=512, block_size=128,
                                        dtype="bfloat16"), **kw}),
                     _real(simulated("sm90")))
        assert plan.params["kv_load"] == "pointer", (kw, plan.describe())


@pytest.mark.parametrize("forced", [False, True])
def test_explain_names_a_cache_view_descriptors_cannot_read(monkeypatch, gate_calls, forced):
    """A plan with descriptor loads over a call's cache whose base is 8 bytes off 16-byte
    alignment (a legal view: last dim contiguous): the launch reads it with pointer loads
    (forced: refuses it), and the notes ``explain`` adds for the call say so; an aligned
    cache gets no such note."""
    from portattn.dispatch.selector import with_notes

    if forced:
        monkeypatch.setenv("PORTATTN_TD", "1")
    else:
        monkeypatch.delenv("PORTATTN_TD", raising=False)
    problem = _problem(query_len=512, block_size=128, dtype="bfloat16")
    caps = _real(simulated("sm90"))
    plan = _plan(problem, caps)
    assert plan.params["kv_load"] == "descriptor", plan.describe()
    wide_k = torch.randn(4, 128, 2, 132, dtype=torch.bfloat16)
    wide_v = torch.randn(4, 128, 2, 132, dtype=torch.bfloat16)
    shifted = PagedKVCache(wide_k[..., 4:], wide_v[..., 4:])  # 8 bytes past the base
    aligned = PagedKVCache(torch.randn(4, 128, 2, 128, dtype=torch.bfloat16),
                           torch.randn(4, 128, 2, 128, dtype=torch.bfloat16))
    backend = TritonUnified()
    assert backend.call_notes(plan, aligned) == []
    (note,) = backend.call_notes(plan, shifted)
    assert "key_cache" in note and "16" in note
    assert ("refused (InputError)" in note) if forced else ("pointer loads" in note)
    decision = Decision("triton_unified", plan.variant, "auto", problem, "sm90", plan, ())
    assert with_notes(decision, None, shifted).notes[-1] == note
    assert note not in with_notes(decision, None, aligned).notes


def test_auto_follows_the_evidence_table(monkeypatch, gate_calls):
    monkeypatch.delenv("PORTATTN_TD", raising=False)
    calls, answer = gate_calls
    table = ({"arch": "sm90", "mode": "decode", "min_block_size": 64,
              "evidence": "NOTES.md test entry"},)
    monkeypatch.setattr(heuristics, "DESCRIPTOR_PREFERRED", table)
    plan = _plan(_problem(), _real(simulated("sm90")))
    assert plan.params["kv_load"] == "descriptor" and plan.variant.endswith("-td")
    assert "NOTES.md test entry" in plan.params["kv_load_reason"]
    assert plan.params["short"]["block_n"] <= 64 and "_kv_load_forced" not in plan.params
    assert len(calls) == 1 and calls[0]["block_size"] == 64
    # not in the table: other arch, block too small, prefill
    assert _plan(_problem(), _real(simulated("sm100"))).params["kv_load"] == "pointer"
    assert _plan(_problem(block_size=16),
                 _real(simulated("sm90"))).params["kv_load"] == "pointer"
    assert _plan(_problem(query_len=512),
                 _real(simulated("sm90"))).params["kv_load"] == "pointer"
    # the table says yes, the gate says no: pointer loads with the gate's reason (the
    # variant key has no head counts: forget the recorded success, disk included)
    gate.clear(disk=True)
    answer["value"] = {"ok": False, "reason": "PassManager::run failed"}
    plan = _plan(_problem(num_kv_heads=4), _real(simulated("sm90")))
    assert plan.params["kv_load"] == "pointer"
    assert "PassManager::run failed" in plan.params["kv_load_reason"]


def test_td0_forbids(monkeypatch, gate_calls):
    monkeypatch.setenv("PORTATTN_TD", "0")
    monkeypatch.setattr(heuristics, "DESCRIPTOR_PREFERRED", ({"arch": "sm90"},))
    plan = _plan(_problem(), _real(simulated("sm90")))
    assert plan.params["kv_load"] == "pointer"
    assert plan.params["kv_load_reason"] == "PORTATTN_TD=0 forbids descriptor loads"
    assert gate_calls[0] == []


def test_td1_forces_descriptors_after_the_gate(monkeypatch, gate_calls):
    monkeypatch.setenv("PORTATTN_TD", "1")
    calls, _ = gate_calls
    plan = _plan(_problem(query_len=64, num_seqs=4), _real(simulated("sm90")))
    assert plan.params["kv_load"] == "descriptor"
    assert plan.params["kv_load_reason"] == "PORTATTN_TD=1"
    assert plan.params["_kv_load_forced"] is True
    for cfg in ("short", "long"):
        assert 64 % plan.params[cfg]["block_n"] == 0
    assert {c["block_n"] for c in calls} == {plan.params["short"]["block_n"],
                                             plan.params["long"]["block_n"]}
    assert "kv_load=descriptor" in plan.describe()


@pytest.mark.parametrize("failure, words", [
    ({"ok": False, "reason": "PassManager::run failed"}, "PassManager::run failed"),
    ({"ok": False, "reason": "descriptor loads differ from pointer loads (relative "
                             "error 0.5)"}, "differ from pointer loads"),
    (RuntimeError("the check process died with signal SIGSEGV"), "SIGSEGV"),
])
def test_gate_failures_fall_back_or_refuse(monkeypatch, gate_calls, failure, words):
    calls, answer = gate_calls
    answer["value"] = failure
    monkeypatch.setattr(heuristics, "DESCRIPTOR_PREFERRED", ({"arch": "sm90"},))
    monkeypatch.delenv("PORTATTN_TD", raising=False)
    plan = _plan(_problem(), _real(simulated("sm90")))
    assert plan.params["kv_load"] == "pointer" and words in plan.params["kv_load_reason"]
    monkeypatch.setenv("PORTATTN_TD", "1")
    with pytest.raises(UnsupportedError, match="PORTATTN_TD=1") as info:
        _plan(_problem(), _real(simulated("sm90")))
    assert words in str(info.value)
    assert len(calls) == 1, "the failure is cached: the gate ran once for this variant"


def test_td1_refuses_ineligible_problems_with_the_reason(monkeypatch, gate_calls):
    monkeypatch.setenv("PORTATTN_TD", "1")
    with pytest.raises(UnsupportedError, match="block size 8"):
        _plan(_problem(block_size=8), _real(simulated("sm90")))
    monkeypatch.setenv("PORTATTN_TD", "0")
    assert _plan(_problem(block_size=8),
                 _real(simulated("sm90"))).params["kv_load"] == "pointer"
    monkeypatch.delenv("PORTATTN_TD")
    plan = _plan(_problem(block_size=8), _real(simulated("sm90")))
    assert "block size 8" in plan.params["kv_load_reason"]
    assert gate_calls[0] == []


def test_probe_failure_blocks_auto_but_not_forced(monkeypatch, gate_calls):
    caps = dataclasses.replace(_real(simulated("sm90")),
                               tensor_descriptors=Check(False, "toy descriptor kernel died"))
    monkeypatch.setattr(heuristics, "DESCRIPTOR_PREFERRED", ({"arch": "sm90"},))
    monkeypatch.delenv("PORTATTN_TD", raising=False)
    plan = _plan(_problem(), caps)
    assert plan.params["kv_load"] == "pointer"
    assert "toy descriptor kernel died" in plan.params["kv_load_reason"]
    monkeypatch.setenv("PORTATTN_TD", "1")  # forced: our own gate decides
    assert _plan(_problem(), caps).params["kv_load"] == "descriptor"


def test_simulated_profiles_never_run_the_gate(monkeypatch, gate_calls):
    monkeypatch.setenv("PORTATTN_TD", "1")
    assert _plan(_problem(), simulated("sm90")).params["kv_load"] == "descriptor"
    with pytest.raises(UnsupportedError, match="simulated sm80"):
        _plan(_problem(), simulated("sm80"))
    assert gate_calls[0] == []


def test_invalid_td_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv("PORTATTN_TD", "maybe")
    with pytest.raises(InputError, match="PORTATTN_TD"):
        _plan(_problem(), simulated("sm90"))


# ------------------------------------------------------------------------------ the gate

def _variant(**kw):
    base = dict(kv_dtype="float16", quant="none", head_qk=128, head_v=128, block_size=64,
                block_n=64)
    return gate.variant_key(**{**base, **kw})


def test_gate_caches_per_machine_and_variant_on_disk(gate_calls):
    calls, answer = gate_calls
    caps = _real(simulated("sm90"))
    first = gate.check_variant(caps, _variant(), "cuda:0")
    assert first == {"ok": True, "reason": "", "origin": "checked"}
    assert gate.check_variant(caps, _variant(), "cuda:0")["origin"] == "memory"
    gate.clear()  # a new process: from the disk cache
    assert gate.check_variant(caps, _variant(), "cuda:0")["origin"] == "disk-cache"
    assert len(calls) == 1
    other_triton = dataclasses.replace(caps, triton_version="9.9.9")
    answer["value"] = {"ok": False, "reason": "compile failed"}
    again = gate.check_variant(other_triton, _variant(), "cuda:0")
    assert again["origin"] == "checked" and not again["ok"]
    assert gate.check_variant(caps, _variant(block_n=32), "cuda:0")["origin"] == "checked"
    data = json.loads(gate.cache_path().read_text())
    assert data["format"] == gate.CACHE_FORMAT and len(data["results"]) == 3
    assert any(not r["ok"] and r["reason"] == "compile failed"
               for r in data["results"].values())


STORE_SCRIPT = """
from portattn.capabilities import kv_descriptor_gate as gate
print("storing", flush=True)
gate._store_disk("answer of the other process", {"ok": True, "reason": ""})
"""


def test_two_processes_storing_answers_keep_both(gate_calls):
    """The gate file is read, merged and rewritten under an exclusive lock: a process
    storing while another holds it waits, then merges the other's answer instead of
    writing over it. The test plays the other process, holding the lock throughout."""
    fcntl = pytest.importorskip("fcntl")
    src = str(Path(portattn.__file__).resolve().parents[1])
    lock = gate.cache_path().with_name(".kv-descriptor-gate.lock")  # gate.lock_path()
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        child = subprocess.Popen([sys.executable, "-c", STORE_SCRIPT], text=True,
                                 stdout=subprocess.PIPE,
                                 env=dict(os.environ, PYTHONPATH=src))
        assert child.stdout is not None and child.stdout.readline() == "storing\n"
        time.sleep(0.3)  # the child's read-merge-write would be done by now, unlocked
        assert not gate.cache_path().exists()  # it waits for the lock
        # this process's own locked write (not _store_disk: its lock would wait for ours)
        write_json_atomic(gate.cache_path(), {
            "format": gate.CACHE_FORMAT,
            "results": {"answer of this process": {"ok": False, "reason": "x"}}})
        assert child.poll() is None
    assert child.wait(timeout=60) == 0
    results = json.loads(gate.cache_path().read_text())["results"]
    assert sorted(results) == ["answer of the other process", "answer of this process"]
    assert gate.lock_path() == lock


def test_clearing_the_gate_file_waits_for_a_writer_holding_the_lock(gate_calls):
    """clear(disk=True) (a refresh, clear_cache(disk=True)) deletes the file under the
    lock: a writer between its read and its rewrite would otherwise put the forgotten
    answers back (session 42's review). The test holds the lock as that writer."""
    import threading

    fcntl = pytest.importorskip("fcntl")
    write_json_atomic(gate.cache_path(), {"format": gate.CACHE_FORMAT, "results": {
        "an answer to forget": {"ok": False, "reason": "x"}}})
    with open(gate.lock_path(), "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        clearing = threading.Thread(target=gate.clear, kwargs={"disk": True})
        clearing.start()
        clearing.join(0.3)
        assert clearing.is_alive() and gate.cache_path().exists()  # it waits
    clearing.join(10)
    assert not clearing.is_alive() and not gate.cache_path().exists()


@pytest.mark.parametrize("ending,words,kept", [
    ("timeout", "did not finish in 300 s", False),
    (-9, "died with signal SIGKILL", False),
    (1, "exited with status 1", True),
])
def test_a_check_process_timeout_or_signal_death_is_kept_in_memory_only(
        gate_calls, monkeypatch, ending, words, kept):
    """A check process that timed out (a busy GPU) or was killed (the OOM killer) says
    nothing about the kernel: kept for this process, checked again by the next, so a
    one-off does not switch descriptor loads off for good. An error exit is an answer."""
    def fake_run(cmd, **kwargs):
        if ending == "timeout":
            raise subprocess.TimeoutExpired(cmd, kwargs.get("timeout"))
        return subprocess.CompletedProcess(cmd, ending, stdout="", stderr="")

    monkeypatch.setattr(gate, "subprocess", types.SimpleNamespace(
        run=fake_run, TimeoutExpired=subprocess.TimeoutExpired))
    monkeypatch.setattr(gate, "RUNNER", gate.run_check_isolated)
    caps = _real(simulated("sm90"))
    first = gate.check_variant(caps, _variant(), "cuda:0")
    assert not first["ok"] and words in first["reason"] and first["origin"] == "checked"
    assert set(first) == {"ok", "reason", "origin"}
    assert gate.check_variant(caps, _variant(), "cuda:0")["origin"] == "memory"
    assert gate.cache_path().exists() is kept
    gate.clear()  # the next process
    again = gate.check_variant(caps, _variant(), "cuda:0")["origin"]
    assert again == ("disk-cache" if kept else "checked")


def test_a_check_that_could_not_run_is_not_kept_on_disk(gate_calls):
    """The runner raising (the check process never started) fails the variant for this
    process only; a check's own answer, a failure included, is kept for the next."""
    calls, answer = gate_calls
    caps = _real(simulated("sm90"))
    answer["value"] = OSError("[Errno 12] Cannot allocate memory")
    first = gate.check_variant(caps, _variant(), "cuda:0")
    assert not first["ok"] and "Cannot allocate memory" in first["reason"]
    assert gate.check_variant(caps, _variant(), "cuda:0")["origin"] == "memory"
    assert not gate.cache_path().exists()
    gate.clear()  # the next process runs it
    answer["value"] = {"ok": False, "reason": "PassManager::run failed"}
    assert gate.check_variant(caps, _variant(), "cuda:0")["origin"] == "checked"
    gate.clear()
    kept = gate.check_variant(caps, _variant(), "cuda:0")
    assert kept == {"ok": False, "reason": "PassManager::run failed", "origin": "disk-cache"}
    assert len(calls) == 2


def test_a_kernel_failing_under_the_interpreter_is_an_answer(monkeypatch):
    """On the CPU the check runs in-process: the kernel's own exception is its answer (as
    a child's failure is on a GPU), which the gate keeps; only a runner that cannot run
    the check at all is a failure of this process alone."""
    def compile_error(variant, device):
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(gate, "run_check", compile_error)
    assert gate.run_check_isolated(_variant(), "cpu") == {
        "ok": False, "reason": "RuntimeError: PassManager::run failed"}


def test_gate_checks_again_when_the_kernels_change(monkeypatch, gate_calls):
    """An answer is about the code it ran: another portattn release or an edited kernel
    source is checked again, not served from the disk cache."""
    calls, answer = gate_calls
    caps = _real(simulated("sm90"))
    assert gate.check_variant(caps, _variant(), "cuda:0")["origin"] == "checked"
    for name, value in (("kernel_source_digest", lambda: "another-source"),
                        ("__version__", "99.0")):
        gate.clear()  # a new process, with other code
        if name == "__version__":
            monkeypatch.setattr(portattn, "__version__", value)
        else:
            monkeypatch.setattr(gate, name, value)
        answer["value"] = {"ok": False, "reason": f"fails with {name} changed"}
        again = gate.check_variant(caps, _variant(), "cuda:0")
        assert again == {"ok": False, "reason": f"fails with {name} changed",
                         "origin": "checked"}
    assert len(calls) == 3


def test_kernel_source_digest_follows_the_kernel_files(tmp_path, monkeypatch):
    package = tmp_path / "portattn"
    (package / "kernels").mkdir(parents=True)
    (package / "capabilities").mkdir()
    module = package / "capabilities" / "kv_descriptor_gate.py"
    module.write_text("# the check\n")
    kernel = package / "kernels" / "unified.py"
    (package / "backends").mkdir()
    runner = package / "backends" / "unified_runner.py"
    runner.write_text("# runner v1\n")
    (package / "backends" / "triton_unified.py").write_text("# plans\n")
    (package / "backends" / "flash_attn.py").write_text("# not read\n")
    monkeypatch.setattr(gate, "__file__", str(module))
    digests = []
    for kernel_text, runner_text in (("v1", "v1"), ("v2", "v1"), ("v1", "v1"), ("v1", "v2")):
        kernel.write_text(f"# kernel {kernel_text}\n")
        runner.write_text(f"# runner {runner_text}\n")
        gate.kernel_source_digest.cache_clear()
        digests.append(gate.kernel_source_digest())
    (package / "backends" / "flash_attn.py").write_text("# another backend changed\n")
    gate.kernel_source_digest.cache_clear()
    digests.append(gate.kernel_source_digest())
    gate.kernel_source_digest.cache_clear()
    assert digests[0] == digests[2] != digests[1] and digests[3] not in digests[:3]
    assert digests[4] == digests[3]  # a file the check does not run
    assert len(digests[0]) == 16 and int(digests[0], 16) >= 0


def test_gate_survives_a_corrupt_cache_and_no_disk_cache(monkeypatch, gate_calls):
    calls, _ = gate_calls
    gate.cache_path().parent.mkdir(parents=True, exist_ok=True)
    gate.cache_path().write_text("{not json")
    caps = _real(simulated("sm90"))
    assert gate.check_variant(caps, _variant(), "cuda:0")["ok"]
    monkeypatch.setenv("PORTATTN_NO_DISK_CACHE", "1")
    gate.clear()
    gate.cache_path().unlink()
    gate.check_variant(caps, _variant(), "cuda:0")
    assert not gate.cache_path().exists() and len(calls) == 2


def test_nothing_runs_at_import():
    import importlib

    importlib.reload(gate)
    assert gate._MEMORY == {}


# ---------------------------------------------------------------- interpreter: the kernel

@pytest.mark.interpreter
def test_gate_check_runs_under_the_interpreter():
    """The gate's own check (pointer vs descriptor on its tiny problem) in-process."""
    result = gate.run_check(_variant(head_qk=64, head_v=64, block_size=32, block_n=16),
                            "cpu")
    assert result == {"ok": True, "reason": ""}


@pytest.mark.interpreter
@pytest.mark.parametrize("kv_bits", [None, "int8"])
def test_gate_checks_the_plans_int8_code_rebuild(kv_bits, monkeypatch):
    """A variant carries the plan's ``kv_bits`` (set on sm90 only), and the gate's check
    launches exactly that, whatever its own shape's architecture would plan."""
    from portattn.kernels import launch

    seen = []
    real = launch.launch_unified

    def spy(q, cache, metadata, options, out, params, workspace=None):
        seen.append(params.get("kv_bits"))
        return real(q, cache, metadata, options, out, params, workspace)

    monkeypatch.setattr(launch, "launch_unified", spy)
    variant = _variant(kv_dtype="int8", quant="int8_per_token_head", head_qk=64, head_v=64,
                       block_size=32, block_n=16, kv_bits=kv_bits)
    assert gate.run_check(variant, "cpu") == {"ok": True, "reason": ""}
    assert seen == [kv_bits, kv_bits]


def test_gate_variants_carry_the_plans_kv_bits():
    from portattn.backends.triton_kv_load import gate_variants

    params = {"mode": "decode", "kv_bits": "int8",
              "short": {"block_n": 32, "block_m": 16, "block_q": 8}}
    assert [v["kv_bits"] for v in gate_variants(_problem(), params)] == ["int8"]
    assert [v["kv_bits"] for v in gate_variants(_problem(), {**params, "kv_bits": None})] \
        == [None]
    assert [v["v_pairs"] for v in gate_variants(_problem(), params)] == [False]
    assert [v["v_pairs"] for v in gate_variants(_problem(), {**params, "v_pairs": True})] \
        == [True]


@pytest.mark.interpreter
@pytest.mark.parametrize("case", [
    dict(query_lens=[1, 1, 1], seq_lens=[17, 40, 64], block_size=16, mode="decode"),
    dict(query_lens=[1, 2], seq_lens=[50, 33], block_size=32, mode="decode", segments=2),
    dict(query_lens=[9, 1], seq_lens=[40, 21], block_size=16, sliding_window=7,
         head_size=96, mode="mixed"),
    dict(query_lens=[20], seq_lens=[52], block_size=64, sinks=True, group=4,
         mode="prefill"),
    dict(query_lens=[3, 5], seq_lens=[30, 45], block_size=16, dtype=torch.float32),
], ids=["decode-2d", "decode-3d", "mixed-window-96", "prefill-sinks-gqa4", "fp32"])
def test_descriptor_loads_match_the_oracle(case):
    """KV_LOAD=1 under the interpreter: same oracle and tolerance as pointer loads."""
    from unified_check import check_unified

    case = dict(case)
    check_unified(case.pop("query_lens"), case.pop("seq_lens"), kv_load="descriptor",
                  **case)


@pytest.mark.interpreter
@pytest.mark.parametrize("quant", [
    KVQuant.int8_per_token_head(), KVQuant.fp8_per_token_head(),
    KVQuant.fp8_per_tensor(0.02, 0.03)], ids=["int8-pth", "fp8-pth", "fp8-pt"])
def test_descriptor_loads_quantized_caches(quant):
    """int8/fp8 storage through descriptors, scales still pointer loads."""
    from unified_check import check_unified

    check_unified([1, 4], [37, 29], block_size=16, quant=quant, kv_load="descriptor")


@pytest.mark.interpreter
def test_descriptor_loads_diffkv_packed_cache():
    """DiffKV 96/64 in one packed cache: the K view's bounds stop at 96 (its pad columns
    come back zero, never V's values)."""
    from unified_check import check_unified

    check_unified([1, 6], [40, 23], block_size=16, head_size=96, head_size_v=64,
                  kv_load="descriptor")


@pytest.mark.interpreter
def test_descriptor_loads_turn_bad_block_ids_into_nan_rows():
    """Bad ids (out of range, negative) in masked and unmasked tiles: clamped reads, the
    sequences that meet them all NaN, the others exact."""
    from unified_check import check_unified

    def corrupt(table):
        table[0, 1] = 10_000   # inside the visible range: unmasked tile
        table[2, 2] = -3       # the last (masked) tile
        return [0, 2]

    check_unified([1, 1, 1], [40, 40, 40], block_size=16, mode="decode",
                  kv_load="descriptor", block_table_edit=corrupt)


@pytest.mark.interpreter
def test_misaligned_caches_refuse_forced_and_fall_back_in_auto():
    """A cache whose head stride is not a 16-byte multiple (fp16 head 40 in a 44-wide
    slot, 88 bytes): InputError naming the cache under a forced descriptor plan; a plan
    that only preferred descriptors runs pointer loads: bit for bit the output of a
    pointer plan with the same tiles, which matches the float64 oracle."""
    from portattn import PagedKVCache
    from portattn.backends.base import Plan
    from portattn.options import normalize_options
    from portattn.testing import dense_attention, make_paged_batch, relative_error

    batch = make_paged_batch([1, 1], [20, 33], num_q_heads=4, num_kv_heads=2,
                             head_size=40, block_size=16)
    k, v = batch.cache.key_cache, batch.cache.value_cache

    def widen(t):
        wide = torch.zeros(*t.shape[:-1], 44, dtype=t.dtype)
        wide[..., :40] = t
        return wide[..., :40]

    cache = PagedKVCache(widen(k), widen(v))
    shape = heuristics.Shape(4, 2, 40, 2, 1, 64, 2, 132, "sm90", 40)
    pointer = heuristics.plan_launch(shape, mode="decode")
    wanted = rules.descriptor_params(pointer, 16)

    def run(params):
        out = torch.full((2, 4, 40), float("nan"), dtype=torch.float16)
        options = normalize_options(batch.q, cache, out=out)
        TritonUnified().run(batch.q, cache, batch.metadata, options, out,
                            Plan("triton_unified", "x", params))
        return out

    with pytest.raises(InputError, match="key_cache's head stride 44"):
        run({**wanted, "_kv_load_forced": True})
    same_tiles = {**wanted, "kv_load": "pointer"}
    pointer_out = run(same_tiles)
    assert torch.equal(run(wanted), pointer_out)
    expected = dense_attention(batch.q, batch.keys, batch.values, batch.query_lens)
    assert relative_error(pointer_out, expected) < 3e-3


@pytest.mark.interpreter
def test_td1_through_attention_on_the_interpreter(monkeypatch, tmp_path):
    """PORTATTN_TD=1 end to end on CPU tensors: the plan asks for descriptors, the gate
    runs its check in-process (recorded on disk), explain shows it, the output matches
    the float64 oracle as ``PORTATTN_TD=0`` (pointer loads) does, and auto stays on
    pointer loads."""
    import portattn
    from portattn.testing import dense_attention, make_paged_batch, relative_error

    monkeypatch.setenv("PORTATTN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("PORTATTN_NO_DISK_CACHE", raising=False)
    gate.clear()
    batch = make_paged_batch([1, 3], [40, 21], num_q_heads=4, num_kv_heads=2,
                             head_size=64, block_size=16)
    kw = dict(backend="triton_unified")
    expected = dense_attention(batch.q, batch.keys, batch.values, batch.query_lens)
    monkeypatch.setenv("PORTATTN_TD", "0")
    pointer = portattn.attention(batch.q, batch.cache, batch.metadata, **kw)
    assert relative_error(pointer, expected) < 3e-3
    assert portattn.explain(batch.q, batch.cache, batch.metadata,
                            **kw).plan.params["kv_load"] == "pointer"
    monkeypatch.delenv("PORTATTN_TD")
    auto = portattn.explain(batch.q, batch.cache, batch.metadata, **kw)
    assert auto.plan.params["kv_load"] == "pointer"
    assert not gate.cache_path().exists()
    monkeypatch.setenv("PORTATTN_TD", "1")
    decision = portattn.explain(batch.q, batch.cache, batch.metadata, **kw)
    assert decision.plan.params["kv_load"] == "descriptor"
    assert "kv_load=descriptor" in str(decision) and "PORTATTN_TD=1" in str(decision)
    got = portattn.attention(batch.q, batch.cache, batch.metadata, **kw)
    assert relative_error(got, expected) < 3e-3
    data = json.loads(gate.cache_path().read_text())
    assert [r["ok"] for r in data["results"].values()] == [True]
    gate.clear()


def test_scratch_allocator_is_installed_only_when_none_is_set():
    """Device-side descriptors need Triton's global scratch: the launcher installs an
    allocator in the caller's context (the fast relaunch path reads it later) but never
    replaces one the caller set."""
    import contextvars

    from triton.runtime import _allocation

    from portattn.kernels import launch

    def fresh():
        assert isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
        launch.ensure_scratch_allocator()
        return _allocation._allocator.get()

    assert contextvars.Context().run(fresh) is launch._scratch

    def users():
        def mine(size, alignment, stream):
            raise AssertionError("not called here")
        _allocation.set_allocator(mine)
        launch.ensure_scratch_allocator()
        return _allocation._allocator.get() is mine

    assert contextvars.Context().run(users)


@pytest.mark.interpreter
def test_auto_descriptor_launch_failure_reruns_with_pointer_loads(monkeypatch, caplog,
                                                                 gate_calls):
    """A descriptor launch that raises in auto mode (a compile failure the gate's tiny
    problem did not cover, injected here) is rerun with pointer loads into the same
    output (the float64 oracle's result), recorded, and warned about once; plans made
    after it take pointer loads for that problem class and say why, plans of another
    class (features, head counts) keep descriptors; forced (PORTATTN_TD=1) plans raise."""
    from portattn.backends.base import Plan
    from portattn.kernels import launch
    from portattn.options import normalize_options
    from portattn.testing import dense_attention, make_paged_batch, relative_error

    real = launch.unified_attention_kernel
    seen = []

    class Failing:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                seen.append(kwargs.get("KV_LOAD", 0))
                if kwargs.get("KV_LOAD", 0) == 1:
                    raise RuntimeError("PassManager::run failed (injected)")
                return real[grid](*args, **kwargs)
            return run

    monkeypatch.setattr(launch, "unified_attention_kernel", Failing())
    monkeypatch.setattr(launch, "DESCRIPTOR_FAILED", {})
    monkeypatch.setattr(launch, "DESCRIPTOR_CLASS_FAILED", {})
    monkeypatch.delenv("PORTATTN_TD", raising=False)
    # a class measured faster with descriptors on this (simulated, gated) sm90
    monkeypatch.setattr(heuristics, "prefers_descriptors", lambda *a: (True, "measured"))
    problem = _problem(num_q_heads=4, num_kv_heads=2, head_size=64, block_size=16,
                       dtype="float16", num_seqs=2, seq_len=30)
    caps = _real(simulated("sm90"))
    assert _plan(problem, caps).params["kv_load"] == "descriptor"
    batch = make_paged_batch([1, 1], [30, 17], num_q_heads=4, num_kv_heads=2,
                             head_size=64, block_size=16)
    shape = heuristics.Shape(4, 2, 64, 2, 1, 32, 2, 132, "sm90", 64)
    wanted = rules.descriptor_params(heuristics.plan_launch(shape, mode="decode"), 16)

    def run(params):
        out = torch.full((2, 4, 64), float("nan"), dtype=torch.float16)
        options = normalize_options(batch.q, batch.cache, out=out)
        TritonUnified().run(batch.q, batch.cache, batch.metadata, options, out,
                            Plan("triton_unified", "x", params))
        return out

    pointer = run({**wanted, "kv_load": "pointer"})
    with caplog.at_level("WARNING", logger="portattn"):
        got = run(wanted)
    assert torch.equal(got, pointer) and seen == [0, 1, 0]
    expected = dense_attention(batch.q, batch.keys, batch.values, batch.query_lens)
    assert relative_error(got, expected) < 3e-3
    assert "PassManager::run failed (injected)" in caplog.text
    assert list(launch.DESCRIPTOR_FAILED.values()) == [
        "RuntimeError: PassManager::run failed (injected)"]
    replanned = _plan(problem, caps).params
    assert replanned["kv_load"] == "pointer" and replanned["kv_load_reason"] == (
        "descriptor (TMA) K/V loads failed for this problem class in this process: "
        "RuntimeError: PassManager::run failed (injected)")
    for other in (dict(num_q_heads=4, softcap=True), dict(num_q_heads=8)):
        assert _plan(_problem(**{**dict(num_kv_heads=2, head_size=64, block_size=16,
                                        dtype="float16", num_seqs=2, seq_len=30), **other}),
                     caps).params["kv_load"] == "descriptor", other  # another class
    run(wanted)  # remembered: straight to pointer loads
    assert seen == [0, 1, 0, 0]
    with pytest.raises(RuntimeError, match="injected"):
        run({**wanted, "_kv_load_forced": True})


# ---------------------------------------------------------------------------- staged prefill

@pytest.mark.parametrize("dtype,kv_quant", [("bfloat16", "none"),
                                            ("float16", "fp8_per_tensor:e4m3fn"),
                                            ("bfloat16", "int8_per_token_head")])
def test_staging_asks_the_gate_about_the_staged_launch(monkeypatch, gate_calls, dtype,
                                                       kv_quant):
    """A long prefill at block 16 on sm90 plans staging only after the gate ran the staged
    variant itself: the cache's dtype and quant mode, q's dtype and the staged tile; a
    failing gate keeps the cache read in the loop, with the reason."""
    calls, answer = gate_calls
    monkeypatch.setenv("PORTATTN_GLUON", "0")  # the staged plan itself (not the Gluon one)
    problem = _problem(block_size=16, query_len=4096, seq_len=4096, num_kv_heads=8,
                       num_q_heads=32, dtype=dtype, kv_quant=kv_quant)
    plan = _plan(problem, _real(simulated("sm90")))
    assert plan.params.get("stage") and "staged" in plan.variant, plan.params
    staged = [v for v in calls if "staged" in v]
    assert len(staged) == 1
    variant = staged[0]
    assert variant["quant"] == problem.kv_quant and variant["block_size"] == 16
    assert variant["kv_dtype"] == str(problem.kv_dtype).replace("torch.", "")
    assert variant["staged"]["q_dtype"] == dtype
    assert variant["staged"]["block_n"] == plan.params["stage_long"]["block_n"]
    assert variant["staged"]["num_warps"] == plan.params["stage_long"]["num_warps"]
    gate.clear(disk=True)
    answer["value"] = {"ok": False, "reason": "descriptor loads differ"}
    plan = _plan(problem, _real(simulated("sm90")))
    assert "stage" not in plan.params and "staged" not in plan.variant
    assert "staged descriptor variant failed" in plan.params["stage_reason"]
    assert "descriptor loads differ" in plan.params["stage_reason"]


@pytest.mark.interpreter
@pytest.mark.parametrize("quant", ["none", "fp8_per_tensor:e4m3fn", "int8_per_token_head"])
def test_gate_runs_a_staged_variant(quant):
    """The gate's check itself for a staged variant (fp16 q: the interpreter's bf16 dots
    are wrong): staged launch against unstaged pointer loads, matching."""
    kv_dtype = {"none": "float16", "fp8_per_tensor:e4m3fn": "float8_e4m3fn",
                "int8_per_token_head": "int8"}[quant]
    variant = gate.variant_key(kv_dtype=kv_dtype, quant=quant, head_qk=32, head_v=32,
                               block_size=16, block_n=32,
                               staged={"q_dtype": "float16", "block_m": 32, "block_n": 32,
                                       "num_warps": 4, "num_stages": 2})
    assert gate.run_check(variant, "cpu") == {"ok": True, "reason": ""}
