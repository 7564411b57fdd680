"""The portattn command line: demo, report, explain (in-process and as a real console
script)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from portattn.cli import main


def test_demo_checks_against_dense_attention(capsys):
    assert main(["demo", "--seed", "3", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "backend: torch_ref (auto)" in text
    assert "relative error vs dense float64 attention" in text
    assert text.strip().endswith("OK")


def test_demo_with_a_forced_backend_that_cannot_run(capsys):
    assert main(["demo", "--backend", "triton_unified", "--dtype", "bfloat16",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: backend 'triton_unified'") and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["demo", "--backend", "bogus"], "error: backend: expected auto or a registered backend"),
    (["demo", "--device", "xpu"], "error: --device: expected cuda, cuda:N or cpu, got 'xpu'"),
    (["demo", "--device", "meta"], "error: --device: expected cuda, cuda:N or cpu"),
    (["demo", "--device", "cuda:0"], "error: --device cuda:0: this torch sees no"),
])
def test_demo_reports_bad_arguments_without_a_traceback(capsys, argv, message):
    if "cuda:0" in argv and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device cuda is valid here")
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(message)


def test_report_text_and_json(capsys):
    assert main(["report", "--simulate", "sm90"]) == 0
    text = capsys.readouterr().out
    for section in ("Platform", "Capabilities", "triton_unified", "torch_ref"):
        assert section in text
    assert main(["report", "--simulate", "sm90", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["schema"] == "portattn.report/1"
    assert data["capabilities"]["arch"] == "sm90"
    assert data["backends"]["triton_unified"]["available"] is True
    routing = {row["problem"]: row["backend"] for row in data["routing"]}
    assert routing["decode bf16 32/8x128 b16 (32 x 8k)"] == "triton_unified"


def test_explain_text_and_json(capsys):
    # an e4m3fn cache on gfx942 (fnuz fp8 only): only the reference serves it
    assert main(["explain", "--simulate", "gfx942", "--kv-quant", "fp8_per_tensor"]) == 0
    text = capsys.readouterr().out
    assert "backend: torch_ref (auto)" in text
    assert "rejected triton_unified:" in text and "e4m3fn, which gfx942 does not" in text
    # on sm80 (no fp8 hardware) our kernel rebuilds the values from the cache's bytes
    assert main(["explain", "--simulate", "sm80", "--kv-quant", "fp8_per_tensor"]) == 0
    text = capsys.readouterr().out
    assert "backend: triton_unified (auto)" in text and "e4m3fn-codes" in text
    assert main(["explain", "--simulate", "sm90", "--query-len", "2048", "--seq-len",
                 "4096", "--window", "--sinks", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["backend"] == "triton_unified" and data["problem"]["sinks"] is True
    assert data["problem"]["max_seqlen_q"] == 2048


def test_explain_forced_backend_that_cannot_serve(capsys):
    code = main(["explain", "--simulate", "cpu", "--backend", "triton_unified", "--json"])
    assert code == 2
    data = json.loads(capsys.readouterr().out)
    assert "triton_unified" in data["reasons"]


@pytest.mark.parametrize("flags, message", [
    (["--heads", "0"], "error: --heads: expected an int in [1, 2147483647]"),
    (["--heads", "3", "--kv-heads", "2"], "error: --heads: expected a multiple of --kv-heads"),
    (["--head-size", "-1"], "error: --head-size: expected an int in [1, "),
    (["--seq-len", "3000000000"], "error: --seq-len: expected an int in [1, 2147483647]"),
    (["--num-seqs", "0"], "error: --num-seqs: "),
    (["--query-len", "10", "--seq-len", "5"], "error: --query-len: expected at most --seq-len"),
    (["--dtype", "int8"], "error: --dtype: expected one of float16, "),
    (["--dtype", "float64"], "error: --dtype: "),
    (["--out-dtype", "nope"], "error: --out-dtype: "),
    (["--kv-quant", "bogus"], "error: --kv-quant: expected none, fp8_per_tensor"),
    (["--kv-quant", "fp8_per_tensor:e9"], "error: --kv-quant: "),
    (["--kv-quant", "int8_per_token_head:e5m2"], "error: --kv-quant: "),
    (["--kv-quant", "fp8_per_tensor:"], "error: --kv-quant: "),
    (["--kv-quant", "none:"], "error: --kv-quant: "),
    (["--alibi", "sqrt", "--non-causal"], "error: --alibi: "),
    (["--simulate", "nope"], "error: --simulate: expected a known simulated profile"),
])
def test_explain_rejects_what_attention_would_reject(capsys, flags, message):
    """Each of these describes a call ``attention`` rejects: no decision is printed."""
    assert main(["explain", *flags]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(message) and "Traceback" not in captured.err
    assert captured.out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_explain_of_a_cuda_call_on_a_cpu_machine_asks_for_a_profile(capsys):
    """Without a GPU, ``--device cuda`` would be decided against the CPU's capabilities (a
    decision no call could get): an error naming the flag; with a simulated GPU it runs."""
    assert main(["explain", "--device", "cuda"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: --device: expected cpu on this machine")
    assert "--simulate" in captured.err and captured.out == ""
    assert main(["explain", "--device", "cuda", "--simulate", "sm90"]) == 0
    assert "arch: sm90" in capsys.readouterr().out


def test_explain_of_a_cuda_call_on_the_cpu_profile_names_the_profile(capsys):
    assert main(["explain", "--device", "cuda", "--simulate", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device: expected cpu on the simulated profile cpu"), err


def test_explain_of_an_fp8_query_gives_a_bf16_output(capsys):
    assert main(["explain", "--dtype", "float8_e4m3fn", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["problem"]["out_dtype"] == "bfloat16"


@pytest.mark.parametrize("command", [["report"], ["demo"], ["explain"]])
def test_a_bad_simulated_profile_in_the_environment_is_named(capsys, monkeypatch, command):
    monkeypatch.setenv("PORTATTN_SIMULATE", "bogus")
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: PORTATTN_SIMULATE: expected a known simulated profile")


def test_console_entry_point_runs():
    env = dict(os.environ, PORTATTN_SIMULATE="gfx942")
    result = subprocess.run([sys.executable, "-m", "portattn", "explain", "--head-size", "80"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "arch: gfx942" in result.stdout
    assert "backend: triton_unified" in result.stdout


def test_a_bad_simulate_flag_is_named_as_the_flag(capsys):
    """(``explain`` is among the rejected explain flags above.)"""
    assert main(["report", "--simulate", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --simulate: expected a known simulated profile")


def test_an_invalid_variable_of_one_backend_is_an_error_not_a_rejection(capsys, monkeypatch):
    monkeypatch.setenv("PORTATTN_GLUON", "x")
    assert main(["explain", "--simulate", "sm90+fa4", "--query-len", "2048",
                 "--seq-len", "2048"]) == 2
    assert capsys.readouterr().err.startswith("error: PORTATTN_GLUON: expected auto, 0, 1")
    # the report still prints (it is where one looks): the rows say what is wrong
    assert main(["report", "--simulate", "sm90"]) == 0
    text = capsys.readouterr().out
    assert "'x' INVALID" in text and "PORTATTN_GLUON: expected" in text


def test_demo_names_the_backends_that_could_serve_but_rank_lower(capsys, monkeypatch):
    monkeypatch.setenv("PORTATTN_SIMULATE", "cpu-interpreter")  # our kernel could run
    assert main(["demo", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "backend: torch_ref (auto)" in text
    assert "not triton_unified: could serve, lower priority" in text
    assert "simulated profile cpu-interpreter" in text


@pytest.mark.interpreter  # the forced kernel runs, interpreted
def test_demo_with_a_forced_backend_says_it_was_forced(capsys, monkeypatch):
    """A backend ranked first but passed over for a forced one is not "lower priority"."""
    monkeypatch.setenv("PORTATTN_SIMULATE", "cpu-interpreter")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert main(["demo", "--backend", "triton_unified", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "backend: triton_unified (argument)" in text
    assert "not torch_ref: could serve; triton_unified was forced (argument)" in text
    assert "lower priority" not in text


def test_report_text_wraps_the_routing_variants(capsys):
    assert main(["report", "--simulate", "sm90"]) == 0
    text = capsys.readouterr().out
    routing = text[text.index("\nRouting\n"):]
    assert max(len(line) for line in routing.splitlines()) <= 140
    assert "prefill-2d-gluon" in routing


@pytest.mark.parametrize("argv, message", [
    (["--cases", "nope"], "argument --cases: "),
    (["--shard", "x"], "argument --shard: "),
    (["--shard", "2/2"], "argument --shard: "),
    (["--shrink", "0"], "argument --shrink: "),
    (["--block-size", "0"], "argument --block-size: "),
    (["--num-q-heads", "5"], "argument --num-q-heads: "),
    (["--device", "tpu"], "argument --device: "),
    (["--l2-flush", "clean"], "argument --l2-flush: "),
])
def test_bench_rejects_bad_arguments_before_any_work(capsys, argv, message, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *argv, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing ran, nothing written


def test_bench_on_a_cpu_says_how_to_make_it_short(capsys, tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU machine benches the GPU")
    from portattn.bench import cli as bench_cli

    ran = []
    monkeypatch.setattr(bench_cli, "run_case",
                        lambda *a, **k: ran.append(a[0].name) or {"impls": {}, "plan": "-"})
    monkeypatch.setattr(bench_cli, "measure_ceilings", lambda *a: {})
    monkeypatch.setattr(bench_cli, "add_plain_ratios", lambda report: None)
    monkeypatch.setattr(bench_cli, "plot", lambda *a: None)
    monkeypatch.setattr(bench_cli, "format_table", lambda report: "")
    assert main(["bench", "--cases", "decode-1x8192", "--out", str(tmp_path)]) == 0
    assert "--shrink" in capsys.readouterr().err
    assert ran == ["decode-1x8192"]  # the stand-ins ran: no full-size case was timed


def test_the_readmes_short_cpu_bench_runs_as_written(tmp_path):
    """README, "Command line": without a GPU, `portattn bench` only exercises the harness
    and the README names a short run. Followed as written (with the environment it names,
    and nothing else: a CPU machine's shell has no TRITON_INTERPRET), it must run, not exit
    2 with "our Triton kernels cannot run here" (the README gave the arguments without the
    TRITON_INTERPRET=1 the bench needs on a CPU; found by running it)."""
    if torch.cuda.is_available():
        pytest.skip("a GPU machine benches the GPU")
    import pathlib
    import re
    import shlex

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("- `portattn bench`"):]
    section = section[:section.index("\n\n")]
    command = next(c for c in re.findall(r"`([^`]*)`", " ".join(section.split()))
                   if "--shrink" in c)
    words = shlex.split(command)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    while words and "=" in words[0]:
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    if words[:2] == ["portattn", "bench"]:
        words = words[2:]
    root = pathlib.Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), env.get("PYTHONPATH", "")])
    env["PORTATTN_CACHE_DIR"] = str(tmp_path / "cache")
    done = subprocess.run([sys.executable, "-m", "portattn", "bench", *words,
                           "--out", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (command, done.stderr[-2000:])
    assert list((tmp_path / "out").glob("*.json"))


def test_bench_says_why_when_our_kernels_cannot_run(capsys, tmp_path, monkeypatch):
    """No Triton kernels here (the probe's check: Triton missing, broken, unsupported,
    or no GPU and no interpreter): exit 2 with the check's reason before any case, not a
    traceback from the first launch."""
    import dataclasses

    from portattn.bench import cli as bench_cli
    from portattn.capabilities import probe
    from portattn.capabilities.model import Check

    broken = dataclasses.replace(probe(), triton_kernels=Check(False, "no ptxas for sm90"))
    monkeypatch.setattr("portattn.capabilities.probe", lambda *a, **k: broken)
    monkeypatch.setattr(bench_cli, "run_case", lambda *a, **k: pytest.fail("a case ran"))
    argv = ["bench", "--cases", "decode-1x8192", "--out", str(tmp_path), "--device", "cpu"]
    assert main(argv) == 2
    assert "our Triton kernels cannot run here: no ptxas for sm90" in capsys.readouterr().err


def test_bench_records_the_l2_flush_it_was_asked_for(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU machine benches the GPU")
    from portattn.bench import cli as bench_cli

    monkeypatch.setattr(bench_cli, "run_case", lambda *a, **k: {"impls": {}, "plan": "-"})
    monkeypatch.setattr(bench_cli, "measure_ceilings", lambda *a: {})
    monkeypatch.setattr(bench_cli, "add_plain_ratios", lambda report: None)
    monkeypatch.setattr(bench_cli, "plot", lambda *a: None)
    monkeypatch.setattr(bench_cli, "format_table", lambda report: "")
    for flush in ("read", None):
        argv = ["bench", "--cases", "decode-1x8192", "--out", str(tmp_path), "--prefix", "r"]
        assert main(argv + (["--l2-flush", flush] if flush else [])) == 0
        report = json.loads((tmp_path / "r.json").read_text())
        assert report["l2_flush"] == (flush or "zero")


def _stub_bench_run(monkeypatch, run_case):
    """The bench's command line with ``run_case`` replaced and nothing measured."""
    from portattn.bench import cli as bench_cli

    monkeypatch.setattr(bench_cli, "run_case", run_case)
    monkeypatch.setattr(bench_cli, "measure_ceilings", lambda *a: {})
    monkeypatch.setattr(bench_cli, "add_plain_ratios", lambda report: None)
    monkeypatch.setattr(bench_cli, "plot", lambda *a: None)
    monkeypatch.setattr(bench_cli, "format_table", lambda report: "")


@pytest.mark.parametrize("where, message", [
    ("file", "argument --out: expected a folder, got the file "),
    ("missing folder", "argument --prefix: cannot write "),
])
def test_bench_checks_where_it_writes_before_any_case(capsys, tmp_path, monkeypatch, where,
                                                      message):
    """An --out that is a file, or a --prefix into a missing folder, is an argument error
    (exit 2, the flag named) before any case: it crashed once after every case was
    timed, their results lost."""
    _stub_bench_run(monkeypatch, lambda *a, **k: pytest.fail("a case ran"))
    (tmp_path / "afile").write_text("x")
    out = ["--out", str(tmp_path / "afile")] if where == "file" else \
        ["--out", str(tmp_path), "--prefix", "missing/r"]
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--cases", "decode-1x8192", "--device", "cpu", *out])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_bench_keeps_the_cases_timed_before_one_that_crashes(tmp_path, monkeypatch):
    """The JSON is written after each case (into --out, made if missing): a case that
    raises leaves the cases timed before it on disk."""
    def run_case(case, *args):
        if case.name == "decode-8x8192":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return {"case": {"name": case.name}, "impls": {}, "plan": "-"}
    _stub_bench_run(monkeypatch, run_case)
    out = tmp_path / "new" / "folder"
    argv = ["bench", "--cases", "decode-1x8192,decode-8x8192", "--device", "cpu",
            "--out", str(out), "--prefix", "r"]
    with pytest.raises(RuntimeError, match="illegal memory access"):
        main(argv)
    report = json.loads((out / "r.json").read_text())
    assert [c["case"]["name"] for c in report["cases"]] == ["decode-1x8192"]
