"""Where probe results are kept: in memory for the process, on disk across processes.

Disk cache
    One JSON file per device slot in the user cache directory (``$PORTATTN_CACHE_DIR``,
    else ``$XDG_CACHE_HOME/portattn``, else ``~/.cache/portattn``), named
    ``capabilities-<device>.json``: a GPU by its index and UUID
    (``capabilities-cuda0-<uuid>.json``; ``capabilities-cuda0.json`` where torch reports no
    UUID),
    ``capabilities-cpu.json``, ``capabilities-cpu-interpret.json``. It holds
    ``{"format", "key", "capabilities"}``.
    ``key`` is the fingerprint of everything the answer depends on (device name, index and
    UUID, driver, torch, Triton and flash-attn versions, interpreter flag, portattn
    version); a file whose key differs from the current one is stale and gets re-probed
    and rewritten, as does one that is corrupt or unreadable. Writes go to a temporary
    file in the same directory, then ``os.replace``, so a reader never sees half a file.
    ``PORTATTN_NO_DISK_CACHE=1`` turns the disk cache off. Only real probes are stored,
    never simulated profiles, never with environment overrides applied, and never a probe
    where Triton is installed but fails to import, a step of the probe raised, Triton
    was imported before ``TRITON_INTERPRET`` was set, or the kernel-check process timed
    out or was killed by a signal (the next process probes again: see
    ``probe._probe_device_and_failures``).

Memory cache
    Lives in :mod:`portattn.capabilities.probe`; :func:`clear_cache` empties it (and the
    disk files too with ``disk=True``). :func:`last_probe_origin` tells where the last
    :func:`~portattn.capabilities.probe` answer came from.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from portattn import settings
from portattn.capabilities.model import Capabilities

#: /2: Capabilities.device_index; /3: triton_kernels off on a Triton without what the
#: kernels use (results cached before would still say usable on such a Triton)
CACHE_FORMAT = "portattn.capabilities-cache/3"

#: Values of :func:`last_probe_origin`.
ORIGINS = ("probed", "disk-cache", "memory", "simulated")


class _State:
    """The process-wide memory cache. One lock; reads on the hot path take none."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        # (simulate, TRITON_INTERPRET, override values, device index) -> (caps, resolved
        # origin); the device index is None for the CPU and for simulated profiles, and
        # probe.UNREADABLE_DEVICE where torch could not say which device it is
        self.final: dict[tuple, tuple[Capabilities, str]] = {}
        # (interpreter flag, device index) -> (unoverridden probed caps, resolved origin)
        self.base: dict[tuple[bool, int | None], tuple[Capabilities, str]] = {}
        # (origin of the last call, resolved origin, caps returned)
        self.last: tuple[str, str, Capabilities] | None = None

    def clear(self) -> None:
        with self.lock:
            self.final.clear()
            self.base.clear()
            self.last = None


STATE = _State()


def cache_dir() -> Path:
    """The disk cache's folder. Raises (``RuntimeError``) when it names a home directory
    that cannot be found (``~user`` of no user; no ``$HOME`` and no password entry): the
    readers and writers below then run without a disk cache, and :func:`describe_dir`
    says why."""
    explicit = settings.CACHE_DIR.value()
    if explicit:
        return Path(explicit).expanduser()
    xdg = settings.XDG_CACHE_HOME.value()
    if xdg:
        return Path(xdg).expanduser() / "portattn"
    return Path.home() / ".cache" / "portattn"


def describe_dir() -> str:
    """:func:`cache_dir` as text for the report, or why there is none."""
    try:
        return str(cache_dir())
    except Exception as exc:
        return f"unavailable ({type(exc).__name__}: {exc})"


def dir_problem() -> str | None:
    """Why probe results cannot be kept on disk (for the report), or None: no folder can
    be named, or the folder cannot be made or written (tried: it is made, as a probe's
    write would make it, and a temporary file is created in it and removed). The writers
    never raise for it; they just keep nothing."""
    try:
        folder = cache_dir()
    except Exception as exc:
        return f"no folder can be named ({type(exc).__name__}: {exc})"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        return f"{folder} cannot be written ({type(exc).__name__}: {exc.strerror or exc})"
    return None


def disk_cache_enabled() -> bool:
    """False when ``PORTATTN_NO_DISK_CACHE`` is on."""
    return not settings.NO_DISK_CACHE.value()


def cache_file(key: dict) -> Path:
    """The file for the device slot named by fingerprint ``key``: a GPU's by its index
    and, where torch reports one, its UUID, both of which its entry is keyed by. By index
    alone, processes that each see one GPU as ``cuda:0`` (``CUDA_VISIBLE_DEVICES=i``
    workers) would share one file and overwrite each other's entry at every start; by UUID
    alone, a GPU seen as ``cuda:1`` by one process and ``cuda:0`` by another would."""
    slot = str(key.get("device_type", "unknown"))
    if key.get("device_index") is not None:
        slot += str(key["device_index"])
    if key.get("uuid"):
        slot += f"-{key['uuid']}"
    if key.get("interpreter"):
        slot += "-interpret"
    slot = "".join(c if c.isalnum() or c in "-_" else "_" for c in slot)
    return cache_dir() / f"capabilities-{slot}.json"


def load(key: dict) -> Capabilities | None:
    """The cached capabilities for ``key``, or None (missing, corrupt, stale, unreadable)."""
    try:
        with open(cache_file(key), encoding="utf-8") as fh:
            data: Any = json.load(fh)
        if (not isinstance(data, dict) or data.get("format") != CACHE_FORMAT
                or data.get("key") != key):
            return None
        caps = Capabilities.from_dict(data.get("capabilities"))
        return caps if caps.profile is None else None
    except Exception:  # a bad cache file is a cache miss, never an error
        return None


def store(key: dict, caps: Capabilities) -> Path | None:
    """Write atomically; returns the path, or None when it could not be written (nor
    its folder found: :func:`cache_dir`)."""
    try:
        path = cache_file(key)
        payload = {"format": CACHE_FORMAT, "key": key, "capabilities": caps.to_dict()}
    except Exception:
        return None
    return write_json_atomic(path, payload)


def write_json_atomic(path: Path, payload: Any) -> Path | None:
    """``payload`` as JSON at ``path`` through a temporary file in the same folder and
    ``os.replace`` (a reader never sees half a file); returns the path, or None when it
    could not be written."""
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp",
                                        dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=1)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
        return path
    except Exception:  # read-only home, full disk...: run without a disk cache
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
        return None


def clear_cache(*, disk: bool = False) -> None:
    """Forget every probe result of this process, the routing decisions and plan bodies
    made from them (:func:`forget_decisions`) and the descriptor gate's answers
    (:func:`forget_gate_answers`); with ``disk=True`` also delete the disk-cache files
    (``capabilities-*.json`` and ``kv-descriptor-gate.json`` in :func:`cache_dir`,
    nothing else)."""
    STATE.clear()
    forget_decisions()
    forget_gate_answers(disk=disk)
    if disk:
        try:
            paths = list(cache_dir().glob("capabilities-*.json"))
        except Exception:  # no folder can be named: no file to delete
            paths = []
        for path in paths:
            try:
                path.unlink()
            except OSError:
                pass


def forget_decisions() -> None:
    """Routing decisions, plan bodies and the cache writes' kernel check were made from the
    capabilities being replaced (their caches are keyed without them): all are made again
    at the next call. Plans
    a caller holds (:func:`portattn.plan`) keep theirs. Only modules already imported
    are touched (nothing made yet, nothing to forget)."""
    import sys

    selector = sys.modules.get("portattn.dispatch.selector")
    if selector is not None:
        selector.decision_cache.clear()
    planning = sys.modules.get("portattn.planning")
    if planning is not None:
        planning.forget_plans()
    types = sys.modules.get("portattn.types")
    if types is not None:
        types._WRITE_REFUSALS.clear()


def forget_gate_answers(*, disk: bool) -> None:
    """The descriptor gate's answers (:mod:`.kv_descriptor_gate`) were checked on the
    machine state being forgotten: a clear or a refresh that kept them would keep a
    failure that a refresh is run to get rid of. ``disk``: the file too."""
    from portattn.capabilities import kv_descriptor_gate

    kv_descriptor_gate.clear(disk=disk)


def last_probe_origin(*, resolve_memory: bool = False) -> str | None:
    """Where the last :func:`probe` answer came from, None before the first probe.

    ``"probed"`` (measured now), ``"disk-cache"`` (read from the disk cache),
    ``"memory"`` (this process had it already), ``"simulated"`` (a profile). With
    ``resolve_memory=True`` a memory hit reports where the remembered answer came from
    originally (``"probed"`` or ``"disk-cache"``): what ``portattn report`` shows.
    """
    last = STATE.last
    if last is None:
        return None
    return last[1] if resolve_memory else last[0]
