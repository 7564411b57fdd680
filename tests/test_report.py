"""CPU tests of the report: data, JSON round trip, text rendering, command line."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
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
from portattn.capabilities import OVERRIDES, Capabilities, clear_cache, probe
from portattn.capabilities.report import RESERVED_KEYS, SCHEMA, collect_report, main, render_report

probe_mod = importlib.import_module("portattn.capabilities.probe")
SRC = str(Path(portattn.__file__).resolve().parents[1])

BACKENDS = {
    "triton_unified": {"available": True, "reasons": []},
    "flash_attn": {"available": False,
                   "reasons": ["flash-attn is not installed (simulated)"]},
    "torch_ref": {"available": True, "reasons": []},
}
ROUTING = [
    {"problem": "decode fp16 h128 gqa8 bs16", "backend": "triton_unified", "variant": "3d-td"},
    {"problem": "prefill bf16 h64 bs32", "backend": "triton_unified", "variant": "2d-ptr"},
]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    for name in ("PORTATTN_SIMULATE", "PORTATTN_NO_DISK_CACHE", "TRITON_INTERPRET",
                 *(o.env_var for o in OVERRIDES)):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PORTATTN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(probe_mod, "_gpu_index", lambda: None)  # the CPU path everywhere
    clear_cache()
    yield tmp_path / "cache"
    clear_cache()


def test_report_keys_and_json_round_trip():
    caps = probe(simulate="sm90+fa2")
    report = collect_report(caps, extra_sections={"backends": BACKENDS, "routing": ROUTING})
    assert list(report) == [*RESERVED_KEYS, "backends", "routing"]
    assert report["schema"] == SCHEMA == "portattn.report/1"
    assert report["portattn_version"] == portattn.__version__
    assert set(report["platform"]) == {"python", "implementation", "os", "machine"}
    assert report["probe_origin"] == "simulated"
    back = json.loads(json.dumps(report))
    assert back == report
    assert Capabilities.from_dict(back["capabilities"]) == caps


def test_report_probes_and_says_where_from(isolated):
    first = collect_report()
    assert first["probe_origin"] == "probed"
    assert first["disk_cache"] == {"dir": str(isolated), "enabled": True, "problem": None}
    clear_cache()  # as a new process would
    second = collect_report()
    assert second["probe_origin"] == "disk-cache"
    assert second["capabilities"] == first["capabilities"]
    assert collect_report()["probe_origin"] == "disk-cache"  # memory hit, resolved
    assert "from the disk cache" in render_report(second)
    assert "`portattn report --refresh` probes again" in render_report(second)
    assert "--refresh" not in render_report(first)
    other = Capabilities.from_dict(first["capabilities"])  # not the object probe returned
    assert collect_report(other)["probe_origin"] == "caller"


def test_report_says_when_the_disk_cache_cannot_be_written(isolated, monkeypatch, tmp_path):
    """A cache folder that cannot be made (under a file here) keeps nothing, silently for
    the probe (it never raises); the report says so instead of naming the folder as if
    it were in use."""
    (tmp_path / "a-file").write_text("not a folder")
    folder = tmp_path / "a-file" / "portattn"
    monkeypatch.setenv("PORTATTN_CACHE_DIR", str(folder))
    report = collect_report()
    assert report["probe_origin"] == "probed"
    problem = report["disk_cache"]["problem"]
    assert problem and str(folder) in problem and "cannot be written" in problem
    assert f"disk cache unusable: {problem}" in render_report(report)
    clear_cache()
    assert collect_report()["probe_origin"] == "probed"  # indeed nothing was kept
    monkeypatch.setenv("PORTATTN_CACHE_DIR", str(tmp_path / "fresh" / "portattn"))
    assert collect_report()["disk_cache"]["problem"] is None  # made, as a write makes it
    assert (tmp_path / "fresh" / "portattn").is_dir()
    monkeypatch.setenv("PORTATTN_CACHE_DIR", str(tmp_path / "off" / "portattn"))
    monkeypatch.setenv("PORTATTN_NO_DISK_CACHE", "1")
    assert collect_report()["disk_cache"] == {"dir": str(tmp_path / "off" / "portattn"),
                                              "enabled": False, "problem": None}
    assert not (tmp_path / "off").exists()  # the disk cache off: nothing tried, nothing made
    monkeypatch.delenv("PORTATTN_NO_DISK_CACHE")
    monkeypatch.setenv("PORTATTN_CACHE_DIR", str(tmp_path / "simulated" / "portattn"))
    report = collect_report(probe(simulate="sm90"))
    assert report["probe_origin"] == "simulated" and report["disk_cache"]["problem"] is None
    assert not (tmp_path / "simulated").exists()  # a simulated probe writes nothing


def test_environment_section_lists_what_is_set(monkeypatch):
    monkeypatch.setenv("PORTATTN_TD", "0")
    monkeypatch.setenv("PORTATTN_SIMULATE", "sm80")
    report = collect_report()
    assert report["environment"]["PORTATTN_TD"] == "0"
    assert report["environment"]["PORTATTN_SIMULATE"] == "sm80"
    assert report["capabilities"]["tensor_descriptors"]["source"] == "overridden"
    text = render_report(report)
    assert "PORTATTN_TD" in text and "forced off by PORTATTN_TD=0" in text


def test_extra_sections_cannot_replace_standard_keys():
    caps = probe(simulate="cpu")
    with pytest.raises(ValueError, match="capabilities"):
        collect_report(caps, extra_sections={"capabilities": {}})


def test_render_has_every_section():
    caps = probe(simulate="gfx942+fa2")
    report = collect_report(caps, extra_sections={"backends": BACKENDS, "routing": ROUTING,
                                                  "notes": {"hello": "world"}})
    text = render_report(report)
    headings = ["Platform", "Libraries", "Device", "Capabilities", "Settings",
                "Backends", "Routing", "Notes"]
    positions = [text.index(f"\n{h}\n") for h in headings]
    assert positions == sorted(positions)
    assert "AMD Instinct MI300X" in text and "CUs" in text and "304" in text
    assert "HIP" in text and caps.hip_version in text
    assert "gfx942+fa2 (simulated)" in text
    assert "e4m3fnuz, e5m2fnuz" in text
    for name in ("triton_kernels", "tensor_descriptors", "flash_attn"):
        assert name in text
    flat = " ".join(text.split())  # long reasons are wrapped over several lines
    assert caps.flash_attn.reason in flat and "simulated" in text
    assert "flash_attn" in text and "not available" in text
    assert "- flash-attn is not installed (simulated)" in text
    routing_lines = text[text.index("\nRouting\n"):].splitlines()
    assert any("decode fp16 h128 gqa8 bs16" in line and "triton_unified" in line
               and "3d-td" in line for line in routing_lines)
    assert '"hello": "world"' in text


def test_render_without_optional_sections_and_with_nothing():
    text = render_report(collect_report(probe(simulate="sm80")))
    assert "\nBackends\n" not in text and "\nRouting\n" not in text
    assert "NVIDIA A100-SXM4-80GB" in text and "compute capability 8.0" in text
    assert render_report({}).startswith("portattn ? report")  # tolerant of missing keys


def test_main_json_twice_second_from_disk_cache(capsys, isolated):
    assert main(["--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    clear_cache()
    assert main(["--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert (first["probe_origin"], second["probe_origin"]) == ("probed", "disk-cache")
    clear_cache()
    assert main(["--json", "--refresh"]) == 0
    assert json.loads(capsys.readouterr().out)["probe_origin"] == "probed"


def test_main_text_simulate_and_extra_sections(capsys):
    assert main(["--simulate", "sm100"],
                extra_sections=lambda caps: {"routing": [{"problem": f"on {caps.arch}",
                                                          "backend": "b", "variant": "v"}]}) == 0
    out = capsys.readouterr().out
    assert "NVIDIA B200" in out and "on sm100" in out and "\nRouting\n" in out


@pytest.mark.parametrize("argv,env,message", [
    (["--simulate", "sm91"], {}, "unknown simulated profile"),
    ([], {"PORTATTN_FLASH_ATTN": "maybe"}, "PORTATTN_FLASH_ATTN"),
])
def test_main_user_errors_exit_2(argv, env, message, capsys, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_module_entry_point(isolated):
    env = dict(os.environ, PYTHONPATH=SRC, CUDA_VISIBLE_DEVICES="", HIP_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m",
                          "portattn.capabilities.report", "--json"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["schema"] == SCHEMA and report["probe_origin"] == "probed"
    assert (isolated / "capabilities-cpu.json").exists()
