"""CPU tests of the capability probe: profiles, real probing, disk cache, overrides."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import pytest

try:  # Import Triton now, under the session's TRITON_INTERPRET (conftest sets it on a CPU):
    # Triton fixes interpreter-or-compiler for its own @jit helpers at import, and the
    # tests below unset the variable, so importing it first inside one would break the
    # interpreter tests of other files.
    import triton.language  # noqa: F401
except ImportError:
    pass

import portattn
from interpreter_gaps import numpy_gap_reason
from portattn.capabilities import (
    OVERRIDES,
    PROFILES,
    Capabilities,
    Check,
    clear_cache,
    descriptor_check,
    kv_descriptor_gate,
    last_probe_origin,
    probe,
)
from portattn.capabilities import cache as cache_mod
from portattn.errors import InputError

probe_mod = importlib.import_module("portattn.capabilities.probe")

SRC = str(Path(portattn.__file__).resolve().parents[1])
REAL_GPU_INDEX = probe_mod._gpu_index  # before the autouse fixture replaces it
ENV_VARS = ("PORTATTN_SIMULATE", "PORTATTN_NO_DISK_CACHE", "TRITON_INTERPRET",
            *(o.env_var for o in OVERRIDES))


# Subprocesses of these tests see no GPU, so they take the CPU path on any machine.
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": "", "HIP_VISIBLE_DEVICES": ""}


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A private cache dir, no portattn/Triton variables, empty memory cache, and the
    probe sees no GPU (the CPU path, the same on every machine; see test_real_gpu)."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(probe_mod, "_gpu_index", lambda: None)
    monkeypatch.setenv("PORTATTN_CACHE_DIR", str(tmp_path / "cache"))
    clear_cache()
    yield tmp_path / "cache"
    clear_cache()


def cache_files(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []


def the_cache_file(cache_dir: Path) -> Path:
    files = [cache_dir / n for n in cache_files(cache_dir)]
    assert len(files) == 1, files
    return files[0]


# ----------------------------------------------------------------------------- laziness


def test_import_runs_nothing():
    code = ("import sys, portattn, portattn.capabilities as c; "
            "assert len(c.PROFILES) >= 8; "
            "print(sorted(m for m in ('torch', 'triton', 'flash_attn') if m in sys.modules))")
    env = dict(os.environ, PYTHONPATH=SRC, **CPU_ONLY)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------------------- profiles


@pytest.mark.parametrize("name", PROFILES)
def test_profile_is_sane_and_round_trips(name):
    caps = probe(simulate=name)
    assert caps.profile == name
    assert caps.vendor in ("nvidia", "amd", "cpu")
    assert caps.device_type == ("cpu" if caps.vendor == "cpu" else "cuda")
    assert caps.sm_count > 0
    assert (caps.compute_capability is not None) == (caps.vendor == "nvidia")
    if caps.vendor == "nvidia":
        major, minor = caps.compute_capability
        assert caps.arch == f"sm{major}{minor}"
        assert caps.cuda_version and caps.hip_version is None
        assert caps.triton_target == f"cuda:{major}{minor}"
    if caps.vendor == "amd":
        assert caps.arch.startswith("gfx") and caps.hip_version and caps.cuda_version is None
        assert caps.triton_target == f"hip:{caps.arch}"
    if caps.vendor != "cpu":
        assert caps.total_memory > 8 << 30 and caps.l2_cache_bytes > 0
        assert caps.triton_kernels.ok and not caps.triton_interpreter
    for check in caps.checks().values():
        assert isinstance(check, Check) and check.source == "simulated" and check.reason
    assert not caps.flash_attn.ok and caps.flash_attn_interfaces == ()
    assert caps.tensor_descriptors.ok == (name in ("sm90", "sm100", "sm120", "cpu-interpreter"))
    data = json.loads(json.dumps(caps.to_dict()))
    assert list(data) == [f.name for f in dataclasses.fields(Capabilities)]
    back = Capabilities.from_dict(data)
    assert back == caps and hash(back) == hash(caps)
    assert last_probe_origin() == "simulated"


@pytest.mark.parametrize("name,sms,fp8", [
    ("sm80", 108, ()), ("sm86", 84, ()), ("sm89", 142, ("e4m3fn", "e5m2")),
    ("sm90", 132, ("e4m3fn", "e5m2")), ("sm100", 148, ("e4m3fn", "e5m2")),
    ("sm120", 170, ("e4m3fn", "e5m2")), ("gfx942", 304, ("e4m3fnuz", "e5m2fnuz")),
    ("gfx950", 256, ("e4m3fn", "e5m2")),
])
def test_profile_numbers(name, sms, fp8):
    caps = probe(simulate=name)
    assert caps.sm_count == sms and caps.fp8_formats == fp8


def test_descriptor_reasons_in_profiles():
    assert "TMA, sm90+ in this simulation" in probe(simulate="sm80").tensor_descriptors.reason
    assert "simulated" in probe(simulate="sm90").tensor_descriptors.reason
    assert not probe(simulate="gfx942").tensor_descriptors.ok


def test_cpu_profiles():
    plain = probe(simulate="cpu")
    assert plain.triton.ok and not plain.triton_kernels.ok
    assert "TRITON_INTERPRET is not set" in plain.triton_kernels.reason
    assert plain.triton_target is None and not plain.triton_interpreter
    interp = probe(simulate="cpu-interpreter")
    assert interp.triton_kernels.ok and interp.triton_target == "interpreter"
    assert interp.triton_interpreter


@pytest.mark.parametrize("name,canonical,ok,interfaces", [
    ("sm90+fa2", "sm90+fa2", True, ("fa2",)),
    ("sm90+fa3", "sm90+fa3", True, ("fa3",)),
    ("sm90+fa3+fa2", "sm90+fa2+fa3", True, ("fa2", "fa3")),
    ("sm80+fa2", "sm80+fa2", True, ("fa2",)),
    ("gfx942+fa2", "gfx942+fa2", False, ("fa2",)),
    ("cpu+fa2", "cpu+fa2", False, ("fa2",)),
])
def test_flash_attn_variants(name, canonical, ok, interfaces):
    caps = probe(simulate=name)
    assert caps.profile == canonical
    assert caps.flash_attn.ok is ok and caps.flash_attn.source == "simulated"
    assert caps.flash_attn_interfaces == interfaces
    assert caps.flash_attn_version is not None
    if not ok:
        assert "compute capability 8.0" in caps.flash_attn.reason
    assert Capabilities.from_dict(json.loads(json.dumps(caps.to_dict()))) == caps


@pytest.mark.parametrize("bad", ["sm91", "h100", "sm90+fa5", "sm90+fa2+fa2", "+fa2", ""])
def test_unknown_profile_is_a_value_error(bad, monkeypatch):
    if bad == "":
        monkeypatch.setenv("PORTATTN_SIMULATE", "nope")
        bad = None
    with pytest.raises(InputError) as info:  # a ValueError
        probe(simulate=bad)
    message = str(info.value)
    assert "sm90" in message and "gfx942" in message and "+fa2" in message
    assert info.value.argument == ("PORTATTN_SIMULATE" if bad is None else "simulate")


@pytest.mark.parametrize("simulate", [5, True, b"sm90"])
def test_a_simulate_that_is_not_a_name_is_named(simulate):
    with pytest.raises(InputError, match="^simulate: expected None or a simulated profile"):
        probe(simulate=simulate)


@pytest.mark.parametrize("device", ["cuda", "cuda:64", 64, True, "nodev"])
def test_a_device_this_process_does_not_see_is_named(device):
    import torch

    if torch.cuda.is_available() and device == "cuda":
        pytest.skip("this machine has a GPU: 'cuda' is a device it sees")
    with pytest.raises(InputError) as info:
        probe(device=device)
    assert info.value.argument == "device"


def test_profile_names_are_case_insensitive(monkeypatch):
    """README: environment values are case-insensitive (``SM90`` was refused as unknown:
    session 41's audit)."""
    assert probe(simulate="SM90+FA4") == probe(simulate="sm90+fa4")
    assert probe(simulate=" Sm90+Fa4 ").profile == "sm90+fa4"
    monkeypatch.setenv("PORTATTN_SIMULATE", "GFX942")
    assert probe().arch == "gfx942"


def test_simulate_env_and_explicit_real(monkeypatch):
    monkeypatch.setenv("PORTATTN_SIMULATE", "gfx942")
    assert probe().arch == "gfx942"
    assert probe(simulate="sm80").arch == "sm80"
    assert probe(simulate="").profile is None  # "" forces the real probe
    monkeypatch.setenv("PORTATTN_SIMULATE", "sm120")
    assert probe().arch == "sm120"  # the environment is read on every call


# ------------------------------------------------------------------------- real probing


def test_real_probe_on_this_cpu():
    caps = probe()
    assert caps.profile is None and caps.vendor == "cpu" and caps.arch == "cpu"
    assert caps.sm_count == os.cpu_count()
    assert caps.triton.ok and caps.triton_version
    assert not caps.triton_kernels.ok
    assert caps.triton_kernels.reason == "no GPU and TRITON_INTERPRET is not set"
    assert not caps.tensor_descriptors.ok and caps.triton_target is None
    import triton.language

    assert caps.tensor_descriptor_api is hasattr(triton.language, "make_tensor_descriptor")
    assert caps.tensor_descriptor_api is caps.tensor_descriptors.reason.startswith(
        "tl.make_tensor_descriptor exists")
    assert all(c.source == "probed" for c in caps.checks().values())
    assert caps.fp8_formats == ()
    assert Capabilities.from_dict(json.loads(json.dumps(caps.to_dict()))) == caps
    assert probe() is caps and last_probe_origin() == "memory"


def triton_stdlib_is_interpreted() -> bool:
    import triton.language as tl

    return type(tl.zeros).__name__ == "InterpretedFunction"


def test_interpreter_is_read_at_probe_time(monkeypatch, isolated):
    assert not probe().triton_kernels.ok
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    caps = probe()
    assert caps.triton_interpreter and caps.triton_target == "interpreter"
    if triton_stdlib_is_interpreted() and numpy_gap_reason():
        assert not caps.triton_kernels.ok and "numpy<2.4" in caps.triton_kernels.reason
    elif triton_stdlib_is_interpreted():  # this pytest process started with the interpreter
        assert caps.triton_kernels == Check(True, "Triton interpreter (TRITON_INTERPRET=1)")
    else:  # Triton was imported before the variable was set: a known trap, diagnosed
        assert not caps.triton_kernels.ok
        assert "set after Triton was imported" in caps.triton_kernels.reason
        assert "set after Triton was imported" in caps.tensor_descriptors.reason
        assert cache_files(isolated) == ["capabilities-cpu.json"]  # not cached on disk
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not probe().triton_interpreter


INTERPRETER_SCRIPT = """
import json, sys
from portattn.capabilities import probe, last_probe_origin, descriptor_check
caps = probe()
print(json.dumps({"caps": caps.to_dict(), "origin": last_probe_origin(),
                  "checks": descriptor_check.run_checks("cpu")}))
"""


def test_interpreter_set_before_import_runs_the_kernels(isolated):
    """A fresh process with TRITON_INTERPRET=1 from the start: the real kernels run."""
    env = dict(os.environ, PYTHONPATH=SRC, TRITON_INTERPRET="1", **CPU_ONLY)
    out = subprocess.run([sys.executable, "-c", INTERPRETER_SCRIPT], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    caps = Capabilities.from_dict(result["caps"])
    assert result["origin"] == "probed"
    assert caps.triton_target == "interpreter" and caps.triton_interpreter
    assert cache_files(isolated) == ["capabilities-cpu-interpret.json"]
    if numpy_gap_reason():
        # Triton 3.6's interpreter breaks on runtime-bounded loops with numpy >= 2.4: the
        # probe must say so rather than claim the kernels run.
        assert not caps.triton_kernels.ok and "numpy<2.4" in caps.triton_kernels.reason
        pytest.skip("numpy >= 2.4 breaks this Triton's interpreter: the kernels cannot run "
                    "here (checked that the probe says so)")
    assert caps.triton_kernels == Check(True, "Triton interpreter (TRITON_INTERPRET=1)")
    assert caps.tensor_descriptors.ok, caps.tensor_descriptors.reason
    assert "under the Triton interpreter" in caps.tensor_descriptors.reason
    assert result["checks"] == {"pointer": {"ok": True, "reason": ""},
                                "descriptor": {"ok": True, "reason": ""}}


def test_a_late_interpreter_is_kept_in_memory_only(isolated, monkeypatch):
    """Triton imported by the probe itself in a mode other than the interpreter (the
    disk-cache key, made before, cannot tell): the failure is this process's state, so it
    is not written for a later process set up right to be served."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(probe_mod, "_late_interpreter_cheap", lambda: False)
    monkeypatch.setattr(probe_mod, "_imported_before_interpreter", lambda triton: True)
    failed = {"ok": False, "reason": "NameError: tl.zeros is not interpreted"}
    monkeypatch.setattr(descriptor_check, "run_checks",
                        lambda device: {"pointer": failed, "descriptor": failed})
    caps = probe()
    assert not caps.triton_kernels.ok
    assert probe_mod.LATE_INTERPRETER_REASON in caps.triton_kernels.reason
    assert cache_files(isolated) == []
    assert probe() is caps and last_probe_origin() == "memory"


def test_failed_descriptor_kernel_is_a_reason(monkeypatch):
    def fake_run_one(kind, device):
        if kind == "descriptor":
            raise RuntimeError("PassManager::run failed\n  in the pipeliner")

    monkeypatch.setattr(descriptor_check, "_run_one", fake_run_one)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    caps = probe(use_disk_cache=False)
    assert caps.triton_kernels.ok and not caps.tensor_descriptors.ok
    assert "RuntimeError: PassManager::run failed in the pipeliner" in \
        caps.tensor_descriptors.reason


def test_a_triton_without_what_the_kernels_use_is_a_reason(monkeypatch):
    """Triton 3.4 and older have no ``triton.constexpr_function`` (the unified kernel sizes
    its merge with one): the probe says so before running any check kernel, and the
    dispatcher neither picks our kernels nor lets them be forced."""
    import triton

    from portattn.dispatch.problem import Problem
    from portattn.dispatch.selector import decide
    from portattn.errors import UnsupportedError

    assert probe_mod.missing_kernel_features(triton) == []  # the installed Triton has them
    monkeypatch.delattr(triton, "constexpr_function")

    def no_kernel(kind, device):
        raise AssertionError("a check kernel ran on a Triton the probe should refuse")

    monkeypatch.setattr(descriptor_check, "_run_one", no_kernel)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    caps = probe(use_disk_cache=False)
    want = (f"Triton {triton.__version__} lacks triton.constexpr_function (Triton >= 3.5), "
            "which portattn's Triton kernels use")
    assert caps.triton.ok and caps.triton_target == "interpreter"
    assert caps.triton_kernels == Check(False, want)
    assert caps.tensor_descriptors == Check(False, want)
    problem = Problem.make(device_type="cpu", dtype="float16")
    assert want in decide(problem, caps).rejected["triton_unified"]
    with pytest.raises(UnsupportedError, match="lacks triton.constexpr_function"):
        decide(problem, caps, "triton_unified")


def test_wrong_kernel_result_is_detected():
    import torch

    q, k, out, q_copy = descriptor_check._inputs("cpu")
    qf, kf = q.float(), k.float()
    descriptor_check._compare(q, k, (qf @ kf.T) @ kf, q.clone())  # the right answer passes
    with pytest.raises(AssertionError, match="differs from torch"):
        descriptor_check._compare(q, k, torch.zeros_like(out), q.clone())
    with pytest.raises(AssertionError, match="stored tile"):
        descriptor_check._compare(q, k, (qf @ kf.T) @ kf, torch.zeros_like(q))


def test_isolated_check_reports_a_crashed_child(monkeypatch):
    def fake_run(*args, **kwargs):
        return subprocess.CompletedProcess(args, -11, stdout=json.dumps(
            {"kind": "pointer", "ok": True, "reason": ""}) + "\n", stderr="Segmentation fault")

    monkeypatch.setattr(descriptor_check.subprocess, "run", fake_run)
    results = descriptor_check.run_checks_isolated("cuda:0")
    assert results["pointer"] == {"ok": True, "reason": ""}
    assert not results["descriptor"]["ok"]
    assert "died with signal SIGSEGV" in results["descriptor"]["reason"]


def test_triton_absent(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    for interpret in (None, "1"):
        if interpret:
            monkeypatch.setenv("TRITON_INTERPRET", interpret)
        clear_cache()
        caps = probe()
        assert caps.triton == Check(False, "Triton is not installed "
                                           "(pip install 'portattn[triton]')")
        assert caps.triton_version is None and caps.triton_target is None
        for check in (caps.triton_kernels, caps.tensor_descriptors):
            assert not check.ok and "Triton is not installed" in check.reason


def test_triton_broken_install(monkeypatch):
    def failing_import(name, *args, **kwargs):
        if name == "triton":
            raise ImportError("libtriton.so: undefined symbol: _ZN4mlir")
        return real_import(name, *args, **kwargs)

    real_import = importlib.import_module
    monkeypatch.setattr(probe_mod.importlib, "import_module", failing_import)
    caps = probe(use_disk_cache=False)
    assert not caps.triton.ok
    assert caps.triton.reason.startswith("Triton failed to import: ImportError: libtriton.so")


def test_a_triton_that_fails_to_import_is_not_kept_on_disk(isolated, monkeypatch):
    """Triton installed but raising on import: the answer holds for this process only, so
    the next one (the install mended in place, every version the same) probes again and
    finds it."""
    real_import = importlib.import_module

    def failing_import(name, *args, **kwargs):
        if name == "triton":
            raise ModuleNotFoundError("No module named 'triton.backends.amd'",
                                      name="triton.backends.amd")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(probe_mod.importlib, "import_module", failing_import)
    broken = probe()
    assert not broken.triton.ok and "triton.backends.amd" in broken.triton.reason
    assert last_probe_origin() == "probed" and cache_files(isolated) == []
    assert probe() == broken and last_probe_origin() == "memory"

    monkeypatch.setattr(probe_mod.importlib, "import_module", real_import)
    clear_cache()  # a new process
    mended = probe()
    assert last_probe_origin() == "probed"
    assert mended.triton.ok and mended.triton_version is not None
    assert cache_files(isolated) == ["capabilities-cpu.json"]


def test_a_device_that_cannot_be_read_is_not_kept_on_disk(isolated, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("CUDA driver initialization failed")

    monkeypatch.setattr(probe_mod, "_device_facts", boom)
    caps = probe()
    assert "CUDA driver initialization failed" in caps.triton_kernels.reason
    assert cache_files(isolated) == []


def test_probe_never_raises_when_sub_probes_fail(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("CUDA driver initialization failed")

    monkeypatch.setattr(probe_mod, "_device_facts", boom)
    monkeypatch.setattr(probe_mod, "probe_flash_attn", boom)
    monkeypatch.setattr(probe_mod, "fp8_formats", boom)
    caps = probe(use_disk_cache=False)
    assert caps.device_type == "cpu"
    assert "GPU probe failed: RuntimeError: CUDA driver initialization failed" in \
        caps.triton_kernels.reason
    assert not caps.flash_attn.ok and "flash-attn probe failed" in caps.flash_attn.reason
    assert caps.fp8_formats == ()

    monkeypatch.setattr(probe_mod, "_kernel_checks", boom)
    clear_cache()
    caps = probe(use_disk_cache=False)
    assert not caps.triton_kernels.ok and "kernel check failed" in caps.triton_kernels.reason


@pytest.mark.parametrize("failing", ["is_available", "device_count", "current_device"])
def test_a_device_lookup_that_raises_is_the_cpu_with_the_reason(failing, isolated,
                                                                 monkeypatch):
    """torch cannot say which GPU is current (CUDA initialized before a fork, a driver
    older than the runtime): probe() describes the CPU with the reason, keeps it in memory
    only, and an explicit CPU probe is still the plain CPU answer."""
    import torch

    def boom(*args, **kwargs):
        raise RuntimeError("Cannot re-initialize CUDA in forked subprocess")

    monkeypatch.setattr(probe_mod, "_gpu_index", REAL_GPU_INDEX)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, failing, boom)
    named = ["cuda:0"] if failing != "current_device" else []  # cuda:0 needs no current
    for device in [None, "cuda", *named]:
        caps = probe(device=device)
        assert caps.device_type == "cpu" and caps.device_index is None
        assert "GPU probe failed: RuntimeError: Cannot re-initialize CUDA" in \
            caps.triton_kernels.reason
        assert probe(device=device) is caps and last_probe_origin() == "memory"
    assert cache_files(isolated) == []  # a state of this process: never on disk
    plain = probe(device="cpu")
    assert plain.triton_kernels.reason == "no GPU and TRITON_INTERPRET is not set"
    assert probe(refresh=True).triton_kernels.reason == caps.triton_kernels.reason


# ---------------------------------------------------------------------------- flash-attn


def fake_module(name, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def test_flash_attn_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    check, version, interfaces = probe_mod.probe_flash_attn("nvidia", "sm90", (9, 0))
    assert check == Check(False, "flash-attn is not installed (pip install flash-attn-4 for "
                                 "FA4 on sm90/sm100, no build; pip install flash-attn "
                                 "--no-build-isolation for FA2)")
    assert version is None and interfaces == ()
    assert probe(use_disk_cache=False).flash_attn == check


def test_flash_attn_present(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", fake_module(
        "flash_attn", __version__="2.7.4.post1", flash_attn_varlen_func=lambda *a: None))
    monkeypatch.setitem(sys.modules, "flash_attn_interface", fake_module(
        "flash_attn_interface", flash_attn_varlen_func=lambda *a: None))
    check, version, interfaces = probe_mod.probe_flash_attn("nvidia", "sm90", (9, 0))
    assert check.ok and version == "2.7.4.post1" and interfaces == ("fa2", "fa3")
    assert "flash-attn 2.7.4.post1 (fa2, fa3) on sm90" == check.reason

    check, _, interfaces = probe_mod.probe_flash_attn("nvidia", "sm75", (7, 5))
    assert not check.ok and "compute capability 8.0" in check.reason and "sm75" in check.reason
    assert interfaces == ("fa2", "fa3")
    caps = probe(use_disk_cache=False)  # this machine is a CPU: installed but unusable
    assert not caps.flash_attn.ok and "this device is cpu" in caps.flash_attn.reason


def test_flash_attn_too_old(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", fake_module("flash_attn",
                                                               __version__="1.0.9"))
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    check, version, interfaces = probe_mod.probe_flash_attn("nvidia", "sm80", (8, 0))
    assert not check.ok and "flash_attn_varlen_func" in check.reason and interfaces == ()
    assert version == "1.0.9"


def test_flash_attn_broken_install(tmp_path, monkeypatch):
    package = tmp_path / "site" / "flash_attn"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "raise ImportError('libcudart.so.12: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    importlib.invalidate_caches()
    check, _, interfaces = probe_mod.probe_flash_attn("nvidia", "sm90", (9, 0))
    assert not check.ok and interfaces == ()
    assert "flash_attn failed to import: ImportError: libcudart.so.12" in check.reason


# ----------------------------------------------------------------------------- disk cache


def test_second_probe_comes_from_disk(isolated):
    first = probe()
    assert last_probe_origin() == "probed"
    assert cache_files(isolated) == ["capabilities-cpu.json"]
    clear_cache()
    second = probe()
    assert last_probe_origin() == "disk-cache" and second == first
    probe()
    assert last_probe_origin() == "memory"
    assert last_probe_origin(resolve_memory=True) == "disk-cache"
    clear_cache()
    probe(refresh=True)
    assert last_probe_origin() == "probed"


def test_refresh_replaces_every_remembered_answer(monkeypatch):
    monkeypatch.setenv("PORTATTN_TD", "0")
    overridden = probe()
    monkeypatch.delenv("PORTATTN_TD")
    plain = probe()
    monkeypatch.setattr(probe_mod, "_probe_device_and_failures",
                        lambda *a: (dataclasses.replace(plain, sm_count=plain.sm_count + 1),
                                    []))
    assert probe(refresh=True).sm_count == plain.sm_count + 1
    monkeypatch.setenv("PORTATTN_TD", "0")
    again = probe()
    assert again.sm_count == overridden.sm_count + 1 and not again.tensor_descriptors.ok


def test_new_capabilities_forget_the_decisions_and_plans_made_from_the_old(monkeypatch):
    """Plan bodies and the attention memo are keyed without the capabilities: a refresh
    (or clear_cache) that replaces them makes the next call decide and plan again, so a
    backend the new probe rules out is not served from an old plan."""
    import torch

    from portattn import planning
    from portattn.dispatch.selector import decision_cache
    from portattn.testing import make_paged_batch

    batch = make_paged_batch([1, 1], [20, 30], head_size=32, dtype=torch.float32)
    metadata = portattn.AttentionMetadata(batch.metadata.cu_seqlens_q,
                                          batch.metadata.seq_lens,
                                          batch.metadata.block_table, 1, 32)
    planning.clear()
    for replace in (lambda: probe(refresh=True), clear_cache):
        portattn.attention(batch.q, batch.cache, metadata, backend="torch_ref")
        assert len(planning.bodies.entries) == 1 and len(decision_cache) > 0
        made = planning.stats["bodies"]
        replace()
        assert len(planning.bodies.entries) == 0 and len(decision_cache) == 0
        portattn.attention(batch.q, batch.cache, metadata, backend="torch_ref")
        assert planning.stats["bodies"] == made + 1  # planned again
        planning.clear()


def test_corrupt_cache_file_is_rewritten(isolated):
    isolated.mkdir(parents=True)
    path = isolated / "capabilities-cpu.json"
    path.write_bytes(b"\x00{not json")
    caps = probe()
    assert last_probe_origin() == "probed"
    data = json.loads(path.read_text())
    assert data["format"] == cache_mod.CACHE_FORMAT
    assert Capabilities.from_dict(data["capabilities"]) == caps
    clear_cache()
    probe()
    assert last_probe_origin() == "disk-cache"


@pytest.mark.parametrize("damage", ["torch_version_in_key", "wrong_type", "missing_field",
                                    "simulated_profile", "not_a_dict"])
def test_stale_or_mismatched_cache_is_ignored(isolated, damage):
    caps = probe()
    path = the_cache_file(isolated)
    data = json.loads(path.read_text())
    data["capabilities"]["sm_count"] = 999  # a marker: must not come back
    if damage == "torch_version_in_key":
        data["key"]["torch"] = "0.0.1"
    elif damage == "wrong_type":
        data["capabilities"]["triton"]["ok"] = "yes"
    elif damage == "missing_field":
        del data["capabilities"]["fp8_formats"]
    elif damage == "simulated_profile":
        data["capabilities"]["profile"] = "sm90"
    else:
        data = [data]
    path.write_text(json.dumps(data))
    clear_cache()
    again = probe()
    assert last_probe_origin() == "probed"
    assert again == caps and again.sm_count != 999
    assert json.loads(path.read_text())["capabilities"]["sm_count"] == caps.sm_count


def test_untouched_cache_file_is_used(isolated):
    probe()
    path = the_cache_file(isolated)
    data = json.loads(path.read_text())
    data["capabilities"]["sm_count"] = 999
    path.write_text(json.dumps(data))
    clear_cache()
    assert probe().sm_count == 999 and last_probe_origin() == "disk-cache"


def test_atomic_write_leaves_no_temp_files(isolated, monkeypatch):
    probe()
    probe(refresh=True)
    assert cache_files(isolated) == ["capabilities-cpu.json"]

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(cache_mod.os, "replace", failing_replace)
    (isolated / "capabilities-cpu.json").unlink()
    caps = probe(refresh=True)
    assert caps.vendor == "cpu" and cache_files(isolated) == []


def test_unwritable_cache_dir(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("PORTATTN_CACHE_DIR", str(blocker / "cache"))
    assert probe().vendor == "cpu" and last_probe_origin() == "probed"


def test_disk_cache_can_be_turned_off(isolated, monkeypatch):
    probe(use_disk_cache=False)
    assert cache_files(isolated) == []
    monkeypatch.setenv("PORTATTN_NO_DISK_CACHE", "1")
    clear_cache()
    probe()
    assert cache_files(isolated) == []
    monkeypatch.setenv("PORTATTN_NO_DISK_CACHE", "0")
    clear_cache()
    probe()
    assert cache_files(isolated) == ["capabilities-cpu.json"]


def test_cache_file_names_and_disk_clear(isolated):
    name = lambda **key: cache_mod.cache_file(key).name  # noqa: E731
    assert name(device_type="cuda", device_index=1, interpreter=False) == \
        "capabilities-cuda1.json"
    assert name(device_type="cpu", device_index=None, interpreter=True) == \
        "capabilities-cpu-interpret.json"
    # a GPU is named by its index and UUID (as its entry is keyed), made safe for a file
    assert name(device_type="cuda", device_index=0, uuid="GPU-8f3c/1e:2a",
                interpreter=False) == "capabilities-cuda0-GPU-8f3c_1e_2a.json"
    assert name(device_type="cuda", device_index=1, uuid=None, interpreter=False) == \
        "capabilities-cuda1.json"
    probe()
    (isolated / "unrelated.txt").write_text("keep me")
    clear_cache(disk=True)
    assert cache_files(isolated) == ["unrelated.txt"]
    probe()
    assert last_probe_origin() == "probed"


def test_refresh_and_clear_forget_the_descriptor_gate_answers(isolated, monkeypatch,
                                                              capsys):
    """A gate answer (a check's failure among them) is forgotten, in memory and on disk,
    by what forgets the probe: `portattn report --refresh`, probe(refresh=True) and
    clear_cache(disk=True); clear_cache() forgets this process's memory only."""
    from portattn.cli import main

    calls = []

    def runner(variant, device):
        calls.append(variant)
        return {"ok": False, "reason": "PassManager::run failed"}

    monkeypatch.setattr(kv_descriptor_gate, "RUNNER", runner)
    variant = kv_descriptor_gate.variant_key(kv_dtype="bfloat16", quant="none", head_qk=128,
                                             head_v=128, block_size=16, block_n=16)
    check = lambda: kv_descriptor_gate.check_variant(probe(), variant, "cpu")["origin"]  # noqa: E731
    forgets = [lambda: main(["report", "--refresh"]), lambda: probe(refresh=True),
               lambda: clear_cache(disk=True)]
    for forget in forgets:
        assert check() == "checked" and kv_descriptor_gate.cache_path().exists()
        forget()
        assert not kv_descriptor_gate.cache_path().exists()
    assert check() == "checked" and len(calls) == 4
    clear_cache()  # memory only: the next answer comes from the file
    assert check() == "disk-cache" and len(calls) == 4
    capsys.readouterr()


def test_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("PORTATTN_CACHE_DIR", str(tmp_path / "explicit"))
    assert cache_mod.cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("PORTATTN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_mod.cache_dir() == tmp_path / "xdg" / "portattn"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_mod.cache_dir() == tmp_path / "home" / ".cache" / "portattn"


def test_simulated_profiles_are_not_written_to_disk(isolated):
    probe(simulate="sm90")
    assert cache_files(isolated) == []


# ----------------------------------------------------------------------------- overrides


@pytest.mark.parametrize("override", OVERRIDES, ids=lambda o: o.env_var)
@pytest.mark.parametrize("profile", ["sm80", "sm90+fa2", None])
def test_override_states(override, profile, monkeypatch, isolated):
    base = probe(simulate=profile)
    for raw in ("", "  "):  # set but empty = automatic
        monkeypatch.setenv(override.env_var, raw)
        assert probe(simulate=profile) == base
    monkeypatch.setenv(override.env_var, "1")
    forced_on = probe(simulate=profile)
    assert getattr(forced_on, override.field) == Check(
        True, f"forced on by {override.env_var}=1", "overridden")
    monkeypatch.setenv(override.env_var, "0")
    forced_off = probe(simulate=profile)
    assert getattr(forced_off, override.field) == Check(
        False, f"forced off by {override.env_var}=0", "overridden")
    others = [f for f in ("triton_kernels", "tensor_descriptors", "flash_attn")
              if f != override.field]
    for field in others:
        assert getattr(forced_off, field) == getattr(base, field)
    monkeypatch.delenv(override.env_var)
    assert probe(simulate=profile) == base
    if profile is None:  # overrides are never baked into the disk cache
        stored = json.loads(the_cache_file(isolated).read_text())["capabilities"]
        assert stored[override.field]["source"] == "probed"


@pytest.mark.parametrize("value", ["2", "yes", "true", "on", "-1"])
def test_invalid_override_value(value, monkeypatch):
    monkeypatch.setenv("PORTATTN_TD", value)
    with pytest.raises(InputError) as info:  # a ValueError
        probe(simulate="sm90")
    assert str(info.value) == f"PORTATTN_TD: expected auto, 0, 1, got {value!r}"


def test_override_table_names_real_fields():
    fields = {f.name for f in dataclasses.fields(Capabilities)}
    assert {o.env_var for o in OVERRIDES} >= {"PORTATTN_TD", "PORTATTN_TRITON",
                                              "PORTATTN_FLASH_ATTN"}
    for o in OVERRIDES:
        assert o.field in fields and isinstance(getattr(probe(simulate="cpu"), o.field),
                                                Check)


# --------------------------------------------------------------------------- data model


def test_from_dict_is_strict():
    good = probe(simulate="sm90").to_dict()
    for broken in ({**good, "extra": 1},
                   {k: v for k, v in good.items() if k != "arch"},
                   {**good, "sm_count": "132"},
                   {**good, "sm_count": True},
                   {**good, "compute_capability": [9]},
                   {**good, "flash_attn": {"ok": True, "reason": "", "source": "guessed"}},
                   {**good, "fp8_formats": "e4m3fn"}):
        with pytest.raises(ValueError):
            Capabilities.from_dict(broken)


def test_capabilities_are_frozen_hashable_and_picklable():
    caps = probe(simulate="sm90")
    with pytest.raises(dataclasses.FrozenInstanceError):
        caps.arch = "sm80"
    same = Capabilities.from_dict(caps.to_dict())
    assert {caps: 1}[same] == 1
    other = dataclasses.replace(caps, sm_count=114)
    assert other != caps
    restored = pickle.loads(pickle.dumps(caps))
    assert restored == caps and hash(restored) == hash(caps)
    assert "_hash" not in pickle.loads(pickle.dumps(caps)).__dict__
    assert bool(Check(False, "x")) is False and bool(Check(True)) is True


# ------------------------------------------------------------------------------- GPU tier


@pytest.mark.gpu
def test_real_gpu(monkeypatch, isolated):
    """On a GPU machine: the real probe, its kernel checks and the disk cache."""
    monkeypatch.undo()  # the real _gpu_index, the real environment
    monkeypatch.setenv("PORTATTN_CACHE_DIR", str(isolated))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    clear_cache()
    caps = probe(refresh=True)
    assert caps.device_type == "cuda" and caps.vendor in ("nvidia", "amd")
    assert caps.sm_count > 0 and caps.total_memory > 0
    assert caps.triton_kernels.ok, caps.triton_kernels.reason
    assert caps.triton_target and caps.triton_target.split(":")[0] in ("cuda", "hip")
    assert caps.tensor_descriptors.reason  # ok or not, it says why
    if caps.vendor == "nvidia":
        assert caps.arch == "sm{}{}".format(*caps.compute_capability)
    clear_cache()
    assert probe() == caps and last_probe_origin() == "disk-cache"


# ------------------------------------------------------------ disk cache: hostile places


@pytest.mark.parametrize("how", ["unknown_user", "no_home"])
def test_a_cache_dir_that_cannot_be_named_is_no_error(how, monkeypatch):
    """``~user`` of no user, or no $HOME and no password entry: ``Path.expanduser``
    raises RuntimeError; the probe (which never raises) and the descriptor gate run
    without a disk cache, and the report says why there is none."""
    import pwd

    from portattn.capabilities import kv_descriptor_gate

    if how == "unknown_user":
        monkeypatch.setenv("PORTATTN_CACHE_DIR", "~portattn-no-such-user-x9/cache")
    else:
        for name in ("PORTATTN_CACHE_DIR", "XDG_CACHE_HOME", "HOME"):
            monkeypatch.delenv(name, raising=False)

        def no_entry(uid):
            raise KeyError(uid)

        monkeypatch.setattr(pwd, "getpwuid", no_entry)
    with pytest.raises(RuntimeError):
        cache_mod.cache_dir()
    caps = probe()
    assert caps.vendor == "cpu" and last_probe_origin() == "probed"
    assert probe(refresh=True) == caps
    assert cache_mod.describe_dir().startswith("unavailable (RuntimeError")
    clear_cache(disk=True)
    kv_descriptor_gate._store_disk("key", {"ok": True, "reason": ""})
    assert kv_descriptor_gate._load_disk() == {}
    kv_descriptor_gate.clear(disk=True)


def test_a_directory_where_the_cache_file_belongs(isolated):
    (isolated / "capabilities-cpu.json").mkdir(parents=True)
    caps = probe()
    assert caps.vendor == "cpu" and last_probe_origin() == "probed"
    clear_cache()
    assert probe() == caps and last_probe_origin() == "probed"
    assert cache_files(isolated) == ["capabilities-cpu.json"]  # no temp file left


def test_a_read_only_cache_dir_is_read(isolated):
    caps = probe()
    path = the_cache_file(isolated)
    clear_cache()
    isolated.chmod(0o555)
    try:
        if os.access(isolated, os.W_OK):  # root writes anyway: make writes fail instead
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(cache_mod.tempfile, "mkstemp", _read_only_mkstemp)
                assert probe() == caps and last_probe_origin() == "disk-cache"
                assert probe(refresh=True) == caps
        else:
            assert probe() == caps and last_probe_origin() == "disk-cache"
            assert probe(refresh=True) == caps
    finally:
        isolated.chmod(0o755)
    assert cache_files(isolated) == ["capabilities-cpu.json"] and path.exists()


def _read_only_mkstemp(*args, **kwargs):
    raise PermissionError("read-only file system")


_WRITER = """
import sys
from portattn.capabilities import cache, probe
from portattn.capabilities.probe import fingerprint
caps = probe()
key = fingerprint(None)
misses = 0
for i in range(int(sys.argv[1])):
    cache.store(key, caps)
    if cache.load(key) != caps:
        misses += 1
print("misses", misses)
"""


def test_two_processes_share_one_disk_cache(isolated):
    """Two processes probing and rewriting one cache file at once: every read finds a
    whole file (atomic replace), neither raises, and no temporary file is left."""
    probe()  # the file the children find (and rewrite)
    env = dict(os.environ, PYTHONPATH=SRC, PORTATTN_CACHE_DIR=str(isolated), **CPU_ONLY)
    env.pop("TRITON_INTERPRET", None)
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, "30"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
        assert out.split() == ["misses", "0"], (out, err)
    assert cache_files(isolated) == ["capabilities-cpu.json"]
    clear_cache()
    probe()
    assert last_probe_origin() == "disk-cache"


@pytest.mark.parametrize("reason, kept_on_disk", [
    ("a test Triton kernel failed on sm90: the check process did not finish in 300 s", False),
    ("descriptor kernel failed on sm90: the check process died with signal SIGKILL", False),
    ("descriptor kernel failed on sm90: the check process exited with status 1: boom", True),
    ("descriptor kernel failed on sm90: RuntimeError: PassManager::run failed", True),
])
def test_a_check_process_timeout_or_kill_is_kept_in_memory_only(isolated, monkeypatch,
                                                               reason, kept_on_disk):
    """The probe's isolated kernel checks timing out (a busy GPU) or killed by a signal
    (the OOM killer) say nothing about the kernels: such a result is not written to disk,
    where every later process would read tensor descriptors as failing; a check that ran
    and failed is an answer, written as before. (As the descriptor gate's answers.)"""
    # no TRITON_INTERPRET (the fixture removes it): set after Triton's import, as it would
    # be in a GPU machine's run, it makes the probe keep every answer in memory only
    monkeypatch.setattr(probe_mod, "_kernel_checks", lambda *args: (
        "cuda", Check(True, "ok"), Check(False, reason)))
    caps = probe()
    assert caps.tensor_descriptors == Check(False, reason)
    assert cache_files(isolated) == (["capabilities-cpu.json"] if kept_on_disk else [])
    assert probe() is caps and last_probe_origin() == "memory"


def test_isolated_checks_name_a_timeout_and_a_kill_as_transient(monkeypatch):
    def timing_out(*args, **kwargs):
        raise subprocess.TimeoutExpired(args, 300)

    monkeypatch.setattr(descriptor_check.subprocess, "run", timing_out)
    results = descriptor_check.run_checks_isolated("cuda:0", timeout=300)
    assert all(descriptor_check.is_transient(r["reason"]) for r in results.values())

    def killed(*args, **kwargs):
        return subprocess.CompletedProcess(args, -9, stdout="", stderr="")

    monkeypatch.setattr(descriptor_check.subprocess, "run", killed)
    results = descriptor_check.run_checks_isolated("cuda:0")
    assert all(descriptor_check.is_transient(r["reason"]) for r in results.values())

    def failed(*args, **kwargs):
        return subprocess.CompletedProcess(args, 1, stdout="", stderr="ImportError: x")

    monkeypatch.setattr(descriptor_check.subprocess, "run", failed)
    results = descriptor_check.run_checks_isolated("cuda:0")
    assert not any(descriptor_check.is_transient(r["reason"]) for r in results.values())
