"""The settings table: every variable defined once, read cheaply, listed everywhere."""

from __future__ import annotations

import os
import re
import time
from collections.abc import MutableMapping
from pathlib import Path

import pytest

from portattn import settings
from portattn.capabilities.report import collect_report, render_report
from portattn.cli import build_parser
from portattn.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
VARIABLE = re.compile(r"\bPORTATTN_[A-Z0-9_]*[A-Z0-9]\b")

#: Files that still read the environment themselves, until the lead's merge moves them to
#: portattn.settings (they are edited on other branches). Remove an entry once it is done;
#: the test below fails for an entry that no longer reads the environment.
PENDING_MERGE: set[str] = set()


def _tracked_text_files():
    for folder in ("src", "tests", "ci", "scripts", "benchmarks", ".ci", ".github"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and path.suffix in ("", ".py", ".sh", ".yml", ".yaml", ".json",
                                                   ".md", ".txt", ".toml"):
                yield path
    yield ROOT / "README.md"


def test_every_portattn_variable_in_the_tree_is_defined_once():
    found = {}
    for path in _tracked_text_files():
        for name in VARIABLE.findall(path.read_text(errors="replace")):
            found.setdefault(name, path.relative_to(ROOT).as_posix())
    missing = {name: where for name, where in found.items() if name not in settings.BY_NAME}
    assert not missing, f"variables used but not defined in portattn.settings: {missing}"
    assert len(settings.BY_NAME) == len(settings.SETTINGS)  # no name defined twice
    assert {"PORTATTN_VALIDATE", "PORTATTN_UNIFIED_SPLIT", "PORTATTN_FLASH_ATTN_INTERFACE",
            "TRITON_INTERPRET"} <= set(settings.BY_NAME)


ENV_READ = re.compile(r"os\.environ\.get|os\.getenv|os\.environ\[|environ\._data|"
                      r"getattr\(os\.environ")


def test_only_the_settings_module_reads_the_environment():
    readers = set()
    for path in sorted((ROOT / "src" / "portattn").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel != "src/portattn/settings.py" and ENV_READ.search(path.read_text()):
            readers.add(rel)
    assert readers == PENDING_MERGE, "read settings through portattn.settings"


class PlainEnviron(MutableMapping):
    """A mapping with no CPython internals (no ``_data``, no ``encodekey``)."""

    def __init__(self, values):
        self.values = dict(values)

    def __getitem__(self, key):
        return self.values[key]

    def __setitem__(self, key, value):
        self.values[key] = value

    def __delitem__(self, key):
        del self.values[key]

    def __iter__(self):
        return iter(self.values)

    def __len__(self):
        return len(self.values)


def test_reads_go_through_the_public_mapping(monkeypatch):
    """The decision fingerprint comes from ``os.environ``'s public interface, not from
    CPython's private ``os.environ._data`` captured at import."""
    monkeypatch.setattr(os, "environ", PlainEnviron({"PORTATTN_BACKEND": "torch_ref",
                                                     "TRITON_INTERPRET": "1"}))
    settings.reload()
    try:
        env = dict(zip(settings.DECISION_NAMES, settings.decision_environment()))
        assert env["PORTATTN_BACKEND"] == "torch_ref" and env["TRITON_INTERPRET"] == "1"
        assert settings.BACKEND.value() == "torch_ref"
    finally:
        monkeypatch.undo()
        settings.reload()
    assert settings.BACKEND.raw() == os.environ.get("PORTATTN_BACKEND")


@pytest.mark.parametrize("change", ["setitem", "update", "pop", "putenv"])
def test_a_change_of_the_environment_is_seen_at_once(change, monkeypatch):
    monkeypatch.delenv("PORTATTN_UNIFIED_SPLIT", raising=False)
    index = settings.DECISION_NAMES.index("PORTATTN_UNIFIED_SPLIT")
    assert settings.decision_environment()[index] is None  # the snapshot is warm now
    try:
        if change == "setitem":
            os.environ["PORTATTN_UNIFIED_SPLIT"] = "1"
        elif change == "update":
            os.environ.update(PORTATTN_UNIFIED_SPLIT="1")
        elif change == "pop":
            os.environ["PORTATTN_UNIFIED_SPLIT"] = "1"
            assert settings.decision_environment()[index] == "1"
            os.environ.pop("PORTATTN_UNIFIED_SPLIT")
        else:  # os.putenv changes the C environment only; os.environ keeps its copy
            os.putenv("PORTATTN_UNIFIED_SPLIT", "1")
        expected = "1" if change in ("setitem", "update") else None
        assert settings.decision_environment()[index] == expected
        assert settings.UNIFIED_SPLIT.value() is (True if expected else None)
    finally:
        os.environ.pop("PORTATTN_UNIFIED_SPLIT", None)
        os.unsetenv("PORTATTN_UNIFIED_SPLIT")
    assert settings.decision_environment()[index] is None


class _ReadBeforeStore(dict):
    """``os.environ._data`` that lets another reader in between ``os.environ``'s event
    (raised by its ``putenv``) and its store: what a thread switch there does."""

    reads: list

    def __setitem__(self, key, value):
        self.reads.append(settings.BACKEND.raw())
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self.reads.append(settings.BACKEND.raw())
        super().__delitem__(key)


def test_a_read_between_an_environ_event_and_its_store_is_not_kept(monkeypatch):
    """``os.environ[name] = value`` raises ``os.putenv`` before it stores the value: a
    snapshot read in between (by another thread) holds the old value and must not be
    kept, or every later read, even in the thread that made the change, misses it."""
    monkeypatch.delenv("PORTATTN_BACKEND", raising=False)
    assert settings.BACKEND.raw() is None  # the snapshot is warm now
    data = _ReadBeforeStore(os.environ._data)
    data.reads = []
    monkeypatch.setattr(os.environ, "_data", data)
    try:
        os.environ["PORTATTN_BACKEND"] = "torch_ref"
        assert data.reads == [None]  # the read in between saw the old value...
        assert settings.BACKEND.raw() == "torch_ref"  # ...and did not stick
        assert settings.BACKEND.raw() == "torch_ref" and settings._snapshot is not None
        del os.environ["PORTATTN_BACKEND"]
        assert data.reads == [None, "torch_ref"]
        assert settings.BACKEND.raw() is None
    finally:
        os.environ.pop("PORTATTN_BACKEND", None)
    assert settings.BACKEND.raw() is None


class _StoreFails(dict):
    """``os.environ._data`` whose store fails after ``os.environ``'s event was raised (as
    when a later audit hook vetoes the change): the announced value never arrives."""

    def __setitem__(self, key, value):
        raise RuntimeError("the store did not happen")


def test_a_store_that_never_came_stops_snapshots_for_a_moment_only(monkeypatch):
    """An announced value that is never stored is waited for a short while only (it was
    waited for forever: every later read went to os.environ, and the launch path's
    memos keyed on the snapshot missed on every call)."""
    monkeypatch.delenv("PORTATTN_BACKEND", raising=False)
    assert settings.BACKEND.raw() is None
    monkeypatch.setattr(settings, "_ANNOUNCED_FOR_S", 0.2)
    original = os.environ._data
    monkeypatch.setattr(os.environ, "_data", _StoreFails(original))
    try:
        with pytest.raises(RuntimeError, match="did not happen"):
            os.environ["PORTATTN_BACKEND"] = "torch_ref"
    finally:
        monkeypatch.setattr(os.environ, "_data", original)
        os.unsetenv("PORTATTN_BACKEND")  # putenv ran: the C environment has it
    assert settings.BACKEND.raw() is None and settings._snapshot is None  # not kept yet
    time.sleep(0.25)
    assert settings.BACKEND.raw() is None and settings._snapshot is not None  # kept again


def test_events_of_other_variables_keep_the_snapshot(monkeypatch):
    settings.BACKEND.raw()
    snapshot = settings._snapshot
    assert snapshot is not None
    monkeypatch.setenv("PA_S26_UNRELATED", "1")  # not a setting's name
    assert settings._snapshot is snapshot


def test_the_fingerprint_holds_exactly_the_deciding_settings():
    assert settings.DECISION_NAMES == tuple(s.name for s in settings.SETTINGS if s.decides)
    assert len(settings.decision_environment()) == len(settings.DECISION_NAMES)
    for name in ("PORTATTN_BACKEND", "PORTATTN_SIMULATE", "PORTATTN_VALIDATE", "PORTATTN_TD",
                 "PORTATTN_TRITON", "PORTATTN_FLASH_ATTN", "PORTATTN_FLASH_ATTN_INTERFACE",
                 "PORTATTN_UNIFIED_SPLIT", "TRITON_INTERPRET"):
        assert name in settings.DECISION_NAMES
    assert settings.DECISION_NAMES[settings.VALIDATE_INDEX] == "PORTATTN_VALIDATE"


def _rejected_value(setting):
    """A value ``setting`` does not accept, or None when it accepts any text."""
    for junk in ("maybe", "2", "0/0"):
        try:
            setting.parse_text(junk)
        except InputError:
            return junk
    return None


CHECKED = [s for s in settings.SETTINGS if _rejected_value(s) is not None]


def test_only_names_and_paths_and_foreign_variables_take_any_text():
    free = {s.name for s in settings.SETTINGS if s not in CHECKED}
    assert free == {"PORTATTN_BACKEND", "PORTATTN_SIMULATE", "PORTATTN_CACHE_DIR",
                    "TRITON_INTERPRET", "TRITON_INSTRUMENTATION_MODE",
                    "TRITON_FPSAN_HOMOMORPHIC_CASTS", "TRITON_DEFAULT_FP_FUSION",
                    "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "XDG_CACHE_HOME",
                    "CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"}


@pytest.mark.parametrize("setting", CHECKED, ids=lambda s: s.name)
def test_invalid_values_raise_input_error_naming_the_variable(setting, monkeypatch):
    junk = _rejected_value(setting)
    monkeypatch.setenv(setting.name, junk)
    with pytest.raises(InputError, match=rf"^{setting.name}: expected "):
        setting.value()
    assert setting.problem() is not None


def test_owned_choices_and_their_values(monkeypatch):
    for text, value in (("", None), (" auto ", None), ("1", True), ("0", False)):
        assert settings.VALIDATE.parse_text(text) is value
    for name in ("fa2", "fa3", "fa4", "FA4"):
        assert settings.FLASH_ATTN_INTERFACE.parse_text(name) == name.lower()
    assert settings.BACKEND.parse_text("auto") is None
    assert settings.BACKEND.parse_text(" torch_ref ") == "torch_ref"
    assert settings.TEST_SHARD.parse_text("1/4") == (1, 4)
    assert settings.NO_DISK_CACHE.parse_text("yes") is True
    # Triton's variable follows Triton's rule and is never rejected
    assert settings.TRITON_INTERPRET.parse_text("On") is True
    assert settings.TRITON_INTERPRET.parse_text("whatever") is False


#: TRITON_INTERPRET texts and whether Triton (3.6's getenv_bool) reads them as on.
TRITON_FLAG_TEXTS = {"1": True, "true": True, "TRUE": True, "On": True, "YES": True,
                     "y": True, "Y": True, "0": False, "off": False, "n": False, "t": False,
                     "2": False, "tru": False, "": False, " 1": False, "1 ": False,
                     " true ": False, "\t1": False, "1\n": False}


def test_triton_interpret_is_read_with_tritons_rule(monkeypatch):
    """portattn's interpreter flag must be Triton's: a value Triton reads as off (a stray
    space) made the probe test an interpreter Triton never turned on, and "y" the
    reverse."""
    try:  # imported before the variable changes (Triton fixes its mode at import)
        from triton._C.libtriton import getenv_bool
    except Exception:  # no Triton, or one without it: the table alone
        getenv_bool = None
    for text, on in TRITON_FLAG_TEXTS.items():
        assert bool(settings.TRITON_INTERPRET.parse_text(text)) is on, repr(text)
        monkeypatch.setenv("TRITON_INTERPRET", text)
        assert bool(settings.TRITON_INTERPRET.value()) is on, repr(text)
        if getenv_bool is not None:
            assert getenv_bool("TRITON_INTERPRET", False) is on, repr(text)


def test_report_lists_every_setting_with_its_value(monkeypatch):
    monkeypatch.setenv("PORTATTN_UNIFIED_SPLIT", "0")
    monkeypatch.setenv("PORTATTN_FLASH_ATTN_INTERFACE", "fa2")
    monkeypatch.setenv("PORTATTN_VALIDATE", "sometimes")
    report = collect_report(extra_sections=None)
    table = report["settings"]
    assert list(table) == [s.name for s in settings.SETTINGS]
    assert table["PORTATTN_UNIFIED_SPLIT"]["value"] == "0"
    assert table["PORTATTN_FLASH_ATTN_INTERFACE"]["value"] == "fa2"
    assert table["PORTATTN_BACKEND"]["value"] == os.environ.get("PORTATTN_BACKEND")
    assert "PORTATTN_VALIDATE" in table["PORTATTN_VALIDATE"]["problem"]
    assert report["environment"]["PORTATTN_UNIFIED_SPLIT"] == "0"
    text = render_report(report)
    section = text[text.index("\nSettings\n"):]
    for s in settings.SETTINGS:
        assert s.name in section
    assert "'sometimes' INVALID" in section


@pytest.mark.parametrize("argv", [["--help"], ["report", "--help"]])
def test_help_epilog_lists_every_setting(argv, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    text = capsys.readouterr().out
    for s in settings.SETTINGS:
        assert s.name in text, s.name
        assert " ".join(s.values.split()[:2]) in " ".join(text.split())


def test_readme_lists_every_setting():
    readme = (ROOT / "README.md").read_text()
    missing = [s.name for s in settings.SETTINGS if f"`{s.name}" not in readme]
    assert not missing, missing


def test_without_a_working_audit_hook_every_read_goes_to_the_environment(monkeypatch):
    """Where the hook is refused (sys.addaudithook fails silently when another hook says
    no) or missing, no snapshot is kept, so no change can be missed."""
    import sys

    monkeypatch.setattr(sys, "addaudithook", lambda hook: None)
    monkeypatch.setattr(sys, "audit", lambda event, *args: None)
    monkeypatch.setattr(settings, "_hook_state", None)
    settings.reload()
    monkeypatch.setenv("PORTATTN_BACKEND", "torch_ref")
    assert settings.BACKEND.value() == "torch_ref"
    assert settings._snapshot is None and settings._hook_state is False


def test_an_unknown_backend_name_is_reported_as_a_problem(monkeypatch):
    """PORTATTN_BACKEND takes any text when read (a backend registered later may carry the
    name), but every call with an unknown name fails: the report flags it."""
    monkeypatch.setenv("PORTATTN_BACKEND", "nonsense")
    problem = settings.BACKEND.problem()
    assert problem is not None and "PORTATTN_BACKEND" in problem and "torch_ref" in problem
    text = render_report(collect_report(extra_sections=None))
    assert "'nonsense' INVALID" in text
    for name in ("torch_ref", "auto", "AUTO", " torch_ref "):
        monkeypatch.setenv("PORTATTN_BACKEND", name)
        assert settings.BACKEND.problem() is None


@pytest.mark.parametrize("name, junk", [("PORTATTN_GLUON", "x"),
                                        ("PORTATTN_UNIFIED_SPLIT", "x"),
                                        ("PORTATTN_FLASH_ATTN_INTERFACE", "fa5")])
def test_an_invalid_decision_variable_fails_every_decision(name, junk, monkeypatch):
    """A variable read only inside one backend's checks must not turn into that backend's
    "reason" (routing silently changed): the decision itself raises, naming it."""
    from portattn.capabilities import probe
    from portattn.dispatch import Problem, decide

    caps = probe(simulate="sm90+fa4")  # both our kernel and FA4 serve a long prefill
    problem = Problem.make(num_q_heads=32, num_kv_heads=8, head_size=128, block_size=16,
                           dtype="bfloat16", device_type="cuda", query_len=2048,
                           seq_len=2048, num_seqs=1)
    monkeypatch.setenv(name, junk)
    with pytest.raises(InputError, match=rf"^{name}: expected "):
        decide(problem, caps, log=False)


def test_explicit_arguments_still_override_a_bad_variable(monkeypatch):
    """``validate=False`` does not read ``PORTATTN_VALIDATE``, and a forced backend does
    not read another backend's variable: neither call fails for them (both did once the
    decision checked every variable)."""
    import torch

    import portattn
    from portattn.testing import dense_attention, make_paged_batch, relative_error

    batch = make_paged_batch([1, 3], [9, 20], num_q_heads=4, num_kv_heads=2, head_size=16,
                             dtype=torch.float32)
    expected = dense_attention(batch.q, batch.keys, batch.values, batch.query_lens)
    monkeypatch.setenv("PORTATTN_VALIDATE", "maybe")
    out = portattn.attention(batch.q, batch.cache, batch.metadata, validate=False)
    assert relative_error(out, expected) < 2e-5
    with pytest.raises(InputError, match=r"^PORTATTN_VALIDATE: expected "):
        portattn.attention(batch.q, batch.cache, batch.metadata)  # validate=None reads it
    monkeypatch.delenv("PORTATTN_VALIDATE")
    monkeypatch.setenv("PORTATTN_FLASH_ATTN_INTERFACE", "fa5")
    out = portattn.attention(batch.q, batch.cache, batch.metadata, backend="torch_ref")
    assert relative_error(out, expected) < 2e-5
    with pytest.raises(InputError, match=r"^PORTATTN_FLASH_ATTN_INTERFACE: expected "):
        portattn.attention(batch.q, batch.cache, batch.metadata)  # an automatic decision


def test_pinned_settings_are_this_threads_only_and_end_with_the_block(monkeypatch):
    """``pin_token`` / ``pinned``: a plan's environment for its compiled run. Inside the
    block this thread reads the pinned values; another thread, and this one after the
    block, read the environment; "" and unknown tokens pin nothing."""
    import threading

    monkeypatch.setenv("PORTATTN_BACKEND", "torch_ref")
    token = settings.pin_token()
    monkeypatch.setenv("PORTATTN_BACKEND", "triton_unified")
    seen = {}

    def other():
        seen["other"] = settings.BACKEND.value()

    with settings.pinned(token):
        assert settings.BACKEND.value() == "torch_ref"
        assert settings.decision_environment() != (settings._read().decision)
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert seen["other"] == "triton_unified"
    assert settings.BACKEND.value() == "triton_unified"
    for nothing in ("", "not a token"):
        with settings.pinned(nothing):
            assert settings.BACKEND.value() == "triton_unified"
