"""Every environment variable portattn reads, defined once.

Each :class:`Setting` names one variable, the values it accepts, what unset means and
what it does. This table is the only place that reads them: the decision-cache
fingerprint (:func:`decision_environment`), ``portattn report`` (every setting with its
current value) and the ``--help`` epilog of the command line are all built from
:data:`SETTINGS`, so they cannot drift apart. To add a variable, add a ``Setting`` below
and read it with ``THAT_SETTING.value()``.

Values are parsed when read: surrounding spaces are ignored, choices are case-insensitive,
and unset or empty means the default (``value()`` returns None, "automatic"). A value
outside the accepted ones raises :class:`~portattn.errors.InputError` naming the variable.
Variables that belong to other projects (``TRITON_INTERPRET``, the device-visibility
variables) are read with their owners' rules and never rejected: ``TRITON_INTERPRET`` as
Triton reads it, spaces included (``"1 "`` is off for Triton, so it is off here too).

Cheap reads
-----------
``attention``'s steady-state path needs the decision variables on every call, and
``os.environ.get`` costs 0.5-2 us per unset name (a ``KeyError`` raised and caught
inside ``os.environ``). So the raw values are kept in a snapshot that is rebuilt only after
the environment changed: CPython raises the audit events ``os.putenv`` and
``os.unsetenv`` (PEP 578) for every change made through ``os.environ`` (assignment,
``del``, ``update``, ``pop``, ``clear``, pytest's ``monkeypatch``), and a hook installed on
first use drops the snapshot on those events. A change therefore takes effect on the next
call, exactly as a direct read would; :func:`decision_environment` costs one global read.
The hook is one function call per audit event elsewhere in the process and does nothing
else. Where ``sys.addaudithook`` is missing (other Python implementations) or the hook is
refused (a test event proves it runs), no snapshot is kept and every read goes to
``os.environ``. ``os.environ`` raises its event *before* it stores the new value, so a
snapshot read by another thread in between would hold the old one: a snapshot is only
kept when no event came while it was read and it agrees with the value every such
``os.environ`` change announced in the last second (otherwise it serves that one read
and the next read looks again). Changing the environment from one thread while another
calls portattn is as unsafe as it is in C (``setenv`` is not thread-safe) for the calls
that overlap the change; once ``os.environ[...] = ...`` has returned, every later read
sees the new value.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from portattn.errors import InputError

_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")
#: What Triton's ``getenv_bool`` (``triton.knobs``, C++ in libtriton) reads as on, any case;
#: the text is not stripped.
_TRITON_ON = ("1", "true", "yes", "on", "y")


def _choices(table: Mapping[str, Any]) -> Callable[[str], Any]:
    """A parser accepting exactly the keys of ``table`` (case-insensitive)."""
    def parse(text: str) -> Any:
        try:
            return table[text.lower()]
        except KeyError:
            raise ValueError(text) from None
    return parse


def _flag(text: str) -> bool:
    lowered = text.lower()
    if lowered in _ON:
        return True
    if lowered in _OFF:
        return False
    raise ValueError(text)


def _triton_flag(text: str) -> bool:
    """Triton's own rule for its boolean variables (``getenv_bool``): on for 1, true, yes,
    on or y in any case, else off. Read unstripped (``Setting.strip`` False): a value
    Triton reads as off must be off for portattn too, or the probe would test an
    interpreter that Triton never turned on."""
    return text.lower() in _TRITON_ON


def _shard(text: str) -> tuple[int, int]:
    index, sep, count = text.partition("/")
    if not sep or not index.strip().isdigit() or not count.strip().isdigit():
        raise ValueError(text)
    i, n = int(index), int(count)
    if not 0 <= i < n:
        raise ValueError(text)
    return i, n


_TRISTATE = _choices({"auto": None, "0": False, "1": True})


@dataclass(frozen=True)
class Setting:
    """One environment variable: its name, accepted values, default and meaning.

    ``parse`` turns a stripped, non-empty value into what the code uses and raises
    ``ValueError`` for a value it does not accept (None: any text, returned as is).
    ``check`` (optional) looks at a parsed value that only later code can refuse (a
    backend name, which a program may register after the variable is read) and returns
    what was expected when that code will refuse it, else None: :meth:`problem` (the
    report) says so, :meth:`value` does not raise for it.
    ``decides``: part of the decision fingerprint (a change must re-decide routing).
    ``owner``: who defines the variable (``portattn`` unless another project does).
    ``strip``: surrounding spaces are ignored (False for a foreign variable whose owner
    reads them as part of the value).
    """

    name: str
    values: str
    default: str
    meaning: str
    parse: Callable[[str], Any] | None = None
    decides: bool = False
    owner: str = "portattn"
    check: Callable[[Any], str | None] | None = None
    strip: bool = True

    def raw(self) -> str | None:
        """The variable's text as the environment holds it (None when unset)."""
        return _current().raw[self.name]

    def value(self) -> Any:
        """The parsed value; None when unset or empty (the default applies).
        ``InputError`` naming the variable when the value is not accepted."""
        return self.parse_text(self.raw())

    def parse_text(self, raw: str | None) -> Any:
        """:meth:`value` for a given text instead of the environment's."""
        text = "" if raw is None else raw.strip() if self.strip else raw
        if not text:
            return None
        if self.parse is None:
            return text
        try:
            return self.parse(text)
        except ValueError:
            raise InputError(self.name, self.values, repr(raw)) from None

    def problem(self) -> str | None:
        """Why the current value is not accepted, or None (for reports)."""
        try:
            value = self.value()
        except InputError as exc:
            return str(exc)
        expected = None if value is None or self.check is None else self.check(value)
        return None if expected is None else str(InputError(self.name, expected,
                                                            repr(self.raw())))


# --------------------------------------------------------------------------- the table


def _registered_backend(name: str) -> str | None:
    from portattn.dispatch.registry import backend_names, registered_name

    return None if registered_name(name) is not None else \
        f"auto or a registered backend ({', '.join(backend_names())})"


BACKEND = Setting(
    "PORTATTN_BACKEND", "auto or a backend name (triton_unified, flash_attn, "
    "flash_attn_gather, torch_ref, ...)", "auto",
    "force one backend for every call; a call it cannot serve raises UnsupportedError "
    "with its reasons (never a silent fallback)",
    lambda text: None if text.lower() == "auto" else text, decides=True,
    check=_registered_backend)
SIMULATE = Setting(
    "PORTATTN_SIMULATE", "a profile name such as sm80, sm90, sm100, gfx942, cpu "
    "(portattn.capabilities.PROFILES lists them; +fa2 / +fa3 / +fa4 adds flash-attn)",
    "this machine",
    "probe a simulated device instead of this one (routing tests on a CPU)", decides=True)
VALIDATE = Setting(
    "PORTATTN_VALIDATE", "auto, 0, 1", "auto (value checks only for metadata on the "
    "CPU)",
    "1: check metadata values (lengths against the block table, block ids, monotone "
    "cu_seqlens_q) also on a GPU, which synchronizes; 0: never", _TRISTATE, decides=True)
TENSOR_DESCRIPTORS = Setting(
    "PORTATTN_TD", "auto, 0, 1", "auto (descriptor K/V loads only for problem "
    "classes measured faster, heuristics.DESCRIPTOR_PREFERRED: sm90, 16-bit caches, "
    "prefill and mixed batches at block 64 and 128, head 128)",
    "tensor-descriptor (TMA) K/V loads in portattn's Triton kernels: 1 forces them "
    "(error with the reason where they cannot run), 0 forbids them",
    _TRISTATE, decides=True)
TRITON = Setting(
    "PORTATTN_TRITON", "auto, 0, 1", "auto (the probe decides)",
    "whether portattn's Triton kernels count as usable: 1 forces on, 0 off",
    _TRISTATE, decides=True)
FLASH_ATTN = Setting(
    "PORTATTN_FLASH_ATTN", "auto, 0, 1", "auto (the probe decides)",
    "whether the flash-attn backends count as usable: 1 forces on, 0 off",
    _TRISTATE, decides=True)
FLASH_ATTN_INTERFACE = Setting(
    "PORTATTN_FLASH_ATTN_INTERFACE", "auto, fa2, fa3, fa4", "auto (every installed "
    "interface, fastest first)",
    "restrict the flash_attn backend to one flash-attn interface: fa2 (flash_attn), "
    "fa3 (flash_attn_interface), fa4 (flash_attn.cute)",
    _choices({"auto": None, "fa2": "fa2", "fa3": "fa3", "fa4": "fa4"}), decides=True)
UNIFIED_SPLIT = Setting(
    "PORTATTN_UNIFIED_SPLIT", "auto, 0, 1", "auto (the launch heuristics decide)",
    "triton_unified's split-KV (3D) decode: 1 splits decode tiles over the keys as far "
    "as the key length allows, 0 never splits", _TRISTATE, decides=True)
GLUON = Setting(
    "PORTATTN_GLUON", "auto, 0, 1", "auto (where measured faster, "
    "kernels.gluon_launch: sm90, heads 96, 128, 192 and 256; 16-bit caches at block 16, "
    "8-bit caches staged)",
    "the warp-specialized Gluon prefill for a plan's long sequences: over the paged cache "
    "instead of staging their keys (16-bit caches), or over the staged copy instead of "
    "the unified kernel (8-bit caches): 1 forces it for plans that stage (error with the "
    "reason where it cannot run), 0 forbids it", _TRISTATE, decides=True)
CACHE_DIR = Setting(
    "PORTATTN_CACHE_DIR", "a directory", "$XDG_CACHE_HOME/portattn, else "
    "~/.cache/portattn", "where probe results are cached across processes")
NO_DISK_CACHE = Setting(
    "PORTATTN_NO_DISK_CACHE", "0 or 1 (also true/false, yes/no, on/off)", "0 (cache on disk)",
    "1: probe in every process and keep the result in memory only", _flag)
TEST_SHARD = Setting(
    "PORTATTN_TEST_SHARD", "i/n with 0 <= i < n", "every test",
    "test suite only: run the i-th of n interleaved shards of the collected tests "
    "(parallel GPU runs)", _shard)
TRITON_INTERPRET = Setting(
    "TRITON_INTERPRET", "1, true, yes, on or y in any case, without spaces (Triton's "
    "rule; anything else is off)", "off",
    "run Triton kernels on the CPU in Triton's interpreter (slow; for tests). Must be set "
    "before anything imports Triton", _triton_flag, decides=True, owner="Triton",
    strip=False)
TRITON_INSTRUMENTATION_MODE = Setting(
    "TRITON_INSTRUMENTATION_MODE", "Triton's modes (e.g. for Proton's profiler)", "off",
    "Triton's kernel instrumentation (read by Triton at import; profilers also set it in "
    "process); portattn's fast relaunch reads Triton's knob on every launch and keys its "
    "compiled kernels by it", owner="Triton")
TRITON_FPSAN_HOMOMORPHIC_CASTS = Setting(
    "TRITON_FPSAN_HOMOMORPHIC_CASTS", "Triton's flag (Triton 3.9 on)", "off",
    "an option of Triton's floating-point sanitizer that its JIT compiles kernels with; "
    "portattn's fast relaunch reads Triton's knob on every launch and keys its compiled "
    "kernels by it", owner="Triton")
TRITON_DEFAULT_FP_FUSION = Setting(
    "TRITON_DEFAULT_FP_FUSION", "Triton's flag", "unset (our launches ask for fusion)",
    "Triton's default for FP fusion (multiply-add contraction). Unset, every launch of ours "
    "asks for fusion, as our kernels were tuned (Triton 3.9 warns at launches that leave it "
    "unset); set, our launches leave the choice to Triton. A change re-plans (the fast "
    "relaunch keeps the kernels it compiled per plan)", decides=True, owner="Triton")
FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED = Setting(
    "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "0 or 1", "0",
    "1: FlashAttention-4 keeps its compiled kernels on disk for later processes "
    "(explain's JIT note says so)", owner="flash-attn 4")
XDG_CACHE_HOME = Setting(
    "XDG_CACHE_HOME", "a directory", "~/.cache",
    "the user's cache folder; the probe cache goes to its portattn/ subfolder",
    owner="XDG")
CUDA_VISIBLE_DEVICES = Setting(
    "CUDA_VISIBLE_DEVICES", "device indices", "every GPU",
    "which NVIDIA GPUs the process sees (each is probed on its own; report lists them)",
    owner="CUDA")
HIP_VISIBLE_DEVICES = Setting(
    "HIP_VISIBLE_DEVICES", "device indices", "every GPU",
    "which AMD GPUs the process sees (HIP)", owner="ROCm")
ROCR_VISIBLE_DEVICES = Setting(
    "ROCR_VISIBLE_DEVICES", "device indices", "every GPU",
    "which AMD GPUs the process sees (ROCr runtime)", owner="ROCm")

#: Every variable portattn reads, in the order the report and the help list them.
SETTINGS: tuple[Setting, ...] = (
    BACKEND, SIMULATE, VALIDATE, TENSOR_DESCRIPTORS, TRITON, FLASH_ATTN,
    FLASH_ATTN_INTERFACE, UNIFIED_SPLIT, GLUON, CACHE_DIR, NO_DISK_CACHE, TEST_SHARD,
    TRITON_INTERPRET, TRITON_INSTRUMENTATION_MODE, TRITON_FPSAN_HOMOMORPHIC_CASTS,
    TRITON_DEFAULT_FP_FUSION, FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED,
    XDG_CACHE_HOME, CUDA_VISIBLE_DEVICES, HIP_VISIBLE_DEVICES, ROCR_VISIBLE_DEVICES)
BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}

#: The settings that change decisions, in the order of :func:`decision_environment`.
DECISION_SETTINGS: tuple[Setting, ...] = tuple(s for s in SETTINGS if s.decides)
DECISION_NAMES: tuple[str, ...] = tuple(s.name for s in DECISION_SETTINGS)
VALIDATE_INDEX = DECISION_NAMES.index(VALIDATE.name)
#: raw PORTATTN_VALIDATE texts the fast path understands -> forced on / off
VALIDATE_VALUES: dict[str | None, bool] = {"1": True, "0": False}


# --------------------------------------------------------------------------- snapshot


@dataclass(frozen=True)
class _Snapshot:
    raw: dict[str, str | None]
    decision: tuple[str | None, ...]


#: Replaced by a new object after every change, never mutated: its identity is a version
#: (:func:`portattn.kernels.fast_launch.triton_state` compares it to reuse its answer).
_snapshot: _Snapshot | None = None
_hook_lock = threading.Lock()
_hook_state: bool | None = None  # None: not tried yet; True: installed; False: unavailable
_ENV_EVENTS = frozenset(("os.putenv", "os.unsetenv"))
_CHECK_EVENT = "portattn.settings.hook-check"
#: Orders a snapshot's read against environment events (reentrant: a signal handler may
#: change the environment while a read holds it).
_state_lock = threading.RLock()
#: Bumped by every event that concerns a setting: a read that saw it change is not kept.
_version = 0
#: Setting name -> (the value its last ``os.environ`` change announced (None: deleted),
#: when), which ``os.environ`` stores right after the event: a snapshot that disagrees
#: is not kept, for at most a second (a store that never came, such as one a later audit
#: hook vetoed, must not stop snapshots for good).
_announced: dict[str, tuple[str | None, float]] = {}
_ANNOUNCED_FOR_S = 1.0
#: The ``os.environ`` methods whose events announce the value they then store.
_ENVIRON_CODES = frozenset(getattr(getattr(type(os.environ), name, None), "__code__", None)
                           for name in ("__setitem__", "__delitem__")) - {None}


def _decoded(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    try:
        return os.fsdecode(value)
    except Exception:
        return None


def _on_audit_event(event: str, args: tuple) -> None:
    global _snapshot, _hook_state, _version
    if event in _ENV_EVENTS:
        name = _decoded(args[0]) if args else None
        if name is not None and name not in BY_NAME:
            return  # not a variable of ours: the snapshot holds none of those
        value = _decoded(args[1]) if event == "os.putenv" and len(args) > 1 else None
        try:  # os.environ's own change (it stores the value next), or a bare os.putenv
            announces = sys._getframe(1).f_code in _ENVIRON_CODES
        except Exception:  # pragma: no cover - no frames here
            announces = False
        with _state_lock:
            if announces and name is not None:
                _announced[name] = (value, time.monotonic())
            _version += 1
            _snapshot = None
    elif event == _CHECK_EVENT:
        _hook_state = True


def _install_hook() -> bool:
    """Install the audit hook once. False where the interpreter has none, or where another
    hook refused it (``sys.addaudithook`` then fails silently): the snapshot is only kept
    when a test event proves the hook runs."""
    global _hook_state
    if _hook_state is None:
        with _hook_lock:
            if _hook_state is None:
                _hook_state = False
                add = getattr(sys, "addaudithook", None)
                audit = getattr(sys, "audit", None)
                if add is not None and audit is not None:
                    add(_on_audit_event)
                    audit(_CHECK_EVENT)  # sets _hook_state = True if the hook runs
    return bool(_hook_state)


def _read() -> _Snapshot:
    get = os.environ.get
    raw = {s.name: get(s.name) for s in SETTINGS}
    return _Snapshot(raw, tuple(raw[name] for name in DECISION_NAMES))


def _current() -> _Snapshot:
    if _pinned_threads:
        pinned = getattr(_pins, "snapshot", None)
        if pinned is not None:
            return pinned
    snapshot = _snapshot
    if snapshot is None:
        snapshot = _refresh()
    return snapshot


# --------------------------------------------------------------------------- pinning
#: A plan's environment, restored around its compiled op (``pin_token`` / ``pinned``):
#: token -> snapshot, the latest :data:`PINNED_TOKENS` kept
PINNED_TOKENS = 64
_pinned: dict[str, _Snapshot] = {}
_pins = threading.local()
_pinned_threads = 0  # threads inside pinned(): none, and reads skip the thread-local


def pin_token() -> str:
    """A token standing for the current settings (the decision variables' raw values):
    :func:`pinned` makes them the ones read again, on any thread, whatever the
    environment holds then. A plan takes one when it is made, so that its compiled
    ``run`` decides as the plan did. The latest :data:`PINNED_TOKENS` are kept (an older
    one pins nothing: the current environment is read)."""
    snapshot = _current()
    token = repr(snapshot.decision)
    with _state_lock:
        _pinned.pop(token, None)
        _pinned[token] = snapshot  # the newest last
        while len(_pinned) > PINNED_TOKENS:
            del _pinned[next(iter(_pinned))]
    return token


@contextmanager
def pinned(token: str):
    """Within the block, this thread reads the settings :func:`pin_token` saw when it made
    ``token`` ("" or a forgotten token: the environment, as always)."""
    global _pinned_threads
    snapshot = _pinned.get(token) if token else None
    if snapshot is None:
        yield
        return
    previous = getattr(_pins, "snapshot", None)
    _pins.snapshot = snapshot
    with _state_lock:
        _pinned_threads += 1
    try:
        yield
    finally:
        _pins.snapshot = previous
        with _state_lock:
            _pinned_threads -= 1


def _refresh() -> _Snapshot:
    global _snapshot
    if not _install_hook():
        return _read()  # no change notifications: never keep a copy
    version = _version
    snapshot = _read()
    with _state_lock:
        if version != _version:
            return snapshot  # the environment changed while it was read: not kept
        if _announced:
            now = time.monotonic()
            for name, (value, when) in list(_announced.items()):
                if snapshot.raw[name] != value and now - when < _ANNOUNCED_FOR_S:
                    return snapshot  # os.environ has not stored an announced value yet
                del _announced[name]  # stored (or never will be): nothing to wait for
        _snapshot = snapshot
    return snapshot


def check_decision_settings() -> None:
    """Parse every setting that changes routing: ``InputError`` naming the first one
    whose value is not accepted. The dispatcher calls it before an automatic decision,
    so a variable that only one backend reads fails the call instead of becoming that
    backend's reason for not serving it (which would change the routing without a word).
    ``PORTATTN_VALIDATE`` is not among them: only a call with ``validate=None`` reads it
    (and names it then), so ``validate=False`` keeps working whatever it holds."""
    for setting in DECISION_SETTINGS:
        if setting is not VALIDATE:
            setting.value()


def decision_environment() -> tuple[str | None, ...]:
    """The raw values of the settings that change decisions (:data:`DECISION_NAMES` order):
    part of every decision-cache key, so a change re-decides."""
    return _current().decision


def reload() -> None:
    """Forget the snapshot (the next read goes to ``os.environ``). Only needed after a
    change that bypassed ``os.environ``, e.g. ``os.environ._data`` edited directly."""
    global _snapshot
    with _state_lock:
        _announced.clear()
        _snapshot = None


# --------------------------------------------------------------------------- listings


def describe() -> dict[str, dict[str, Any]]:
    """Every setting with its current value, for ``portattn report --json``:
    ``{name: {"value", "values", "default", "meaning", "owner", "problem"}}``."""
    return {s.name: {"value": s.raw(), "values": s.values, "default": s.default,
                     "meaning": s.meaning, "owner": s.owner, "problem": s.problem()}
            for s in SETTINGS}


def help_text(width: int = 88) -> str:
    """The ``--help`` epilog: one paragraph per setting."""
    import textwrap

    lines = ["environment variables (portattn report shows their current values):"]
    for s in SETTINGS:
        owner = "" if s.owner == "portattn" else f" [{s.owner}'s]"
        lines.append(f"  {s.name}{owner}")
        body = f"{s.meaning}. Values: {s.values}; unset = {s.default}."
        lines.extend(textwrap.wrap(body, width, initial_indent="      ",
                                   subsequent_indent="      ", break_on_hyphens=False))
    return "\n".join(lines)
