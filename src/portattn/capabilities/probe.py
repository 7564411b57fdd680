"""Probe the machine: what can portattn's backends use here?

:func:`probe` is the one entry point. It is lazy (nothing happens at import), remembered
for the process, kept on disk across processes (:mod:`.cache`), and never raises for a
machine problem: every failed sub-probe becomes ``Check(False, reason)``. The only
exceptions are user errors in the arguments or environment (an unknown simulated profile,
an override variable with a bad value), raised as ``ValueError``.

Facts, not versions: Triton kernels count as usable when a test kernel compiled and ran,
tensor descriptors when a descriptor kernel did (:mod:`.descriptor_check`), flash-attn
when its modules import and the device is CUDA sm80+. The three flash-attn generations are
told apart by module: FA2 is a regular ``flash_attn`` package with
``flash_attn_varlen_func``, FA3 is ``flash_attn_interface``, FA4 is ``flash_attn.cute``
(pip ``flash-attn-4``, which makes ``flash_attn`` a namespace package when FA2 is absent).

Note: ``portattn.capabilities.probe`` the attribute is this function (the package
re-exports it); reach this module with ``importlib.import_module`` or ``sys.modules``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import os
import platform
import re
import sys
from typing import Any, Callable, TypeVar

from portattn.capabilities import cache
from portattn.capabilities._text import one_line
from portattn.capabilities.model import Capabilities, Check
from portattn.capabilities.overrides import apply_overrides, raw_overrides, read_overrides
from portattn.capabilities.profiles import (
    NO_GPU_REASON,
    fp8_formats,
    parse_profile_name,
    simulated,
)
from portattn.errors import InputError
from portattn.settings import SIMULATE, TRITON_INTERPRET

TRITON_NOT_INSTALLED = "Triton is not installed (pip install 'portattn[triton]')"
FLASH_ATTN_NOT_INSTALLED = ("flash-attn is not installed (pip install flash-attn-4 for FA4 "
                            "on sm90/sm100, no build; pip install flash-attn "
                            "--no-build-isolation for FA2)")
INTERPRETER_REASON = "Triton interpreter (TRITON_INTERPRET=1)"
LATE_INTERPRETER_REASON = ("TRITON_INTERPRET=1 was set after Triton was imported in this "
                           "process, so Triton's own @triton.jit helpers cannot run in the "
                           "interpreter; set it before anything imports triton")

T = TypeVar("T")


def interpreter_enabled(raw: str | None = None) -> bool:
    """``TRITON_INTERPRET`` is on (Triton's rule), from ``raw`` or the environment."""
    return bool(TRITON_INTERPRET.parse_text(TRITON_INTERPRET.raw() if raw is None else raw))


# --------------------------------------------------------------------------- public entry


def probe(simulate: str | None = None, *, device: Any = None, refresh: bool = False,
          use_disk_cache: bool = True) -> Capabilities:
    """The :class:`Capabilities` of one device of this machine (or of a simulated profile).

    ``device``: which device to describe: a ``torch.device``, ``"cuda:1"``, ``"cpu"`` or a
    CUDA index; None is the current CUDA device (the CPU when there is no GPU).
    :func:`portattn.attention` passes its tensors' device. Each device is probed, cached in
    memory and on disk on its own (a file per GPU UUID), so no answer for
    ``cuda:0`` is ever served for ``cuda:1``. A simulated profile is one device: it
    ignores ``device``. Raises ``InputError`` (a ``ValueError``) for a device this process
    cannot see, an unknown profile name or a malformed ``PORTATTN_*`` value: those are the
    caller's errors; a check that fails on this machine never raises, nor does a device
    lookup that torch cannot answer (CUDA initialized before a fork, a driver older than
    the runtime): the CPU is then described, the reason in its Triton checks, in memory
    only.

    ``simulate``: a profile name (see :mod:`.profiles`); None reads ``PORTATTN_SIMULATE``;
    ``""`` forces a real probe even when that variable is set. ``refresh=True`` ignores
    the memory and disk caches and probes again (then rewrites the disk cache), and
    forgets the descriptor gate's answers (:mod:`.kv_descriptor_gate`), on disk too.
    ``use_disk_cache=False`` neither reads nor writes the disk cache (so does
    ``PORTATTN_NO_DISK_CACHE=1``). Overrides (``PORTATTN_TD``...) apply on top.

    Repeated calls with the same environment return the same object, at the cost of a
    dict lookup.
    """
    if simulate is not None and not isinstance(simulate, str):
        raise InputError("simulate", "None or a simulated profile name (a str)", repr(simulate))
    wanted = SIMULATE.raw() if simulate is None else simulate
    wanted = (wanted or "").strip() or None
    index, lookup_error = (None, None) if wanted else _lookup_device(device)
    slot = UNREADABLE_DEVICE if lookup_error is not None else index
    key = (wanted, TRITON_INTERPRET.raw(), raw_overrides(), slot)
    state = cache.STATE
    if not refresh:
        hit = state.final.get(key)
        if hit is not None:
            caps, resolved = hit
            state.last = ("simulated" if wanted else "memory", resolved, caps)
            return caps
    with state.lock:
        states = read_overrides()
        if wanted:
            parse_profile_name(wanted, "simulate" if simulate is not None else
                               "PORTATTN_SIMULATE")
            base, origin = simulated(wanted), "simulated"
            resolved = origin
        elif lookup_error is not None:
            base = _probe_device_and_failures(None, lookup_error=lookup_error)[0]
            origin = resolved = "probed"
        else:
            base, origin, resolved = _real_base(interpreter_enabled(key[1]), index, refresh,
                                                use_disk_cache)
        caps = apply_overrides(base, states)
        if refresh and not wanted:
            # every remembered answer for this device was built on the old probe, and so
            # were the decisions and plan bodies of its calls
            for stale in [k for k in state.final if k[3] == slot and not k[0]]:
                del state.final[stale]
            cache.forget_decisions()
            cache.forget_gate_answers(disk=use_disk_cache and cache.disk_cache_enabled())
        state.final[key] = (caps, resolved)
        state.last = (origin, resolved, caps)
        return caps


#: The memory-cache slot of a probe whose device lookup raised (:func:`_lookup_device`):
#: kept apart from the CPU's slot (None), whose answer it is not.
UNREADABLE_DEVICE = "unreadable"


def _lookup_device(device: Any) -> tuple[int | None, str | None]:
    """(:func:`device_index` of ``device``, None), or (None, why) when asking torch which
    devices exist raised (CUDA initialized before a fork, a driver older than the runtime):
    the probe then describes the CPU with that reason instead of raising, as it does when
    the device's properties cannot be read. ``InputError`` (the caller's) still raises."""
    try:
        return device_index(device), None
    except InputError:
        raise
    except Exception as exc:
        return None, one_line(exc)


def device_index(device: Any = None) -> int | None:
    """The CUDA index ``device`` names (None: the CPU), for :func:`probe`'s caches.

    None and an index-less ``"cuda"`` mean the current device (:func:`_gpu_index`); a
    device type other than ``cuda`` (``cpu``, ``meta``...) is described by the CPU probe.
    ``InputError`` (a ``ValueError``) when the device does not exist in this process."""
    if device is None:
        return _gpu_index()
    if isinstance(device, bool):
        raise InputError("device", "a torch.device, a str or an int", repr(device))
    if isinstance(device, int):
        kind, index = "cuda", device
    else:
        import torch

        try:
            parsed = device if isinstance(device, torch.device) else torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise InputError("device", "a torch device", one_line(exc)) from None
        kind, index = parsed.type, parsed.index
    if kind != "cuda":
        return None
    if index is None:
        current = _gpu_index()
        if current is None:
            raise InputError("device", "a device this process sees",
                             "'cuda' (this process sees no GPU)")
        return current
    count = _gpu_count()
    if not 0 <= index < count:
        raise InputError("device", "a device this process sees",
                         f"cuda:{index} (this process sees {count} GPU(s))")
    return index


def _real_base(interpreter: bool, index: int | None, refresh: bool,
               use_disk_cache: bool) -> tuple[Capabilities, str, str]:
    """(unoverridden caps of GPU ``index`` or the CPU, origin of this call, resolved
    origin)."""
    state = cache.STATE
    slot = (interpreter, index)
    if not refresh and slot in state.base:
        caps, resolved = state.base[slot]
        return caps, "memory", resolved
    use_disk = use_disk_cache and cache.disk_cache_enabled()
    key = _guard(fingerprint, None, index) if use_disk else None
    if key is not None and key["interpreter_after_import"]:
        key = None  # a state of this process only: neither trust nor share a file
    stored = cache.load(key) if key is not None and not refresh else None
    origin = "disk-cache"
    if stored is None:
        stored, failures = _probe_device_and_failures(index)
        origin = "probed"
        if key is not None and not failures:
            cache.store(key, stored)
    state.base[slot] = (stored, origin)
    return stored, origin, origin


def _guard(fn: Callable[..., T], default: T, *args: Any) -> T:
    try:
        return fn(*args)
    except Exception:
        return default


# ------------------------------------------------------------------------ the fingerprint


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except Exception:
            continue
    return None


def _module_present(name: str) -> bool:
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except Exception:
        return False


_TRITON_DISTS = ("triton", "pytorch-triton-rocm", "pytorch-triton", "triton-rocm")
_FA2_DISTS = ("flash-attn", "flash_attn")
_FA3_DISTS = ("flash_attn_3", "flash-attn-3")
_FA4_DISTS = ("flash-attn-4", "flash_attn_4")
_FA4_MODULE = "flash_attn.cute"


def _triton_version_cheap() -> str | None:
    if "triton" in sys.modules:
        module = sys.modules["triton"]
        return None if module is None else str(getattr(module, "__version__", None))
    return _dist_version(*_TRITON_DISTS)


def _late_interpreter_cheap() -> bool:
    triton = sys.modules.get("triton")
    return (triton is not None and sys.modules.get("triton.language") is not None
            and _imported_before_interpreter(triton))


def _gpu_index() -> int | None:
    """The current CUDA device, None when this process sees no GPU."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return None
    return torch.cuda.current_device()


def _gpu_count() -> int:
    """How many GPUs this process sees (0 without CUDA/HIP)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


_CURRENT = object()


def fingerprint(index: Any = _CURRENT) -> dict:
    """What a probe result of GPU ``index`` (None: the CPU; default: the current device)
    depends on: the disk-cache key (JSON scalars only)."""
    import torch

    from portattn import __version__

    key: dict[str, Any] = {
        "format": cache.CACHE_FORMAT,
        "portattn": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
        "triton": _triton_version_cheap(),
        "interpreter": interpreter_enabled(),
        "interpreter_after_import": interpreter_enabled() and _late_interpreter_cheap(),
        "numpy": _dist_version("numpy"),  # the interpreter's behaviour depends on it
        "flash_attn": _dist_version(*_FA2_DISTS),
        "flash_attn_3": _dist_version(*_FA3_DISTS),
        "flash_attn_4": _dist_version(*_FA4_DISTS),
        "flash_attn_modules": _flash_attn_modules_present(),
    }
    if index is _CURRENT:
        index = _gpu_index()
    if index is None:
        key.update(device_type="cpu", device_index=None, device="cpu",
                   cpu_count=os.cpu_count(), machine=platform.machine())
    else:
        props = torch.cuda.get_device_properties(index)
        uuid = getattr(props, "uuid", None)
        key.update(device_type="cuda", device_index=index, device=props.name,
                   uuid=None if uuid is None else str(uuid), driver=_driver_version())
    return key


# --------------------------------------------------------------------------- the device


def _driver_version() -> str | None:
    """The kernel driver's version: NVIDIA from /proc, AMD from sysfs, else CUDA's API."""
    try:
        text = open("/proc/driver/nvidia/version", encoding="utf-8").read()
        match = re.search(r"Kernel Module.*?\s(\d+\.\d+(?:\.\d+)?)\s", text)
        if match:
            return match.group(1)
    except OSError:
        pass
    try:
        version = open("/sys/module/amdgpu/version", encoding="utf-8").read().strip()
        if version:
            return f"amdgpu {version}"
    except OSError:
        pass
    try:
        import ctypes

        libcuda = ctypes.CDLL("libcuda.so.1")
        out = ctypes.c_int(0)
        if libcuda.cuDriverGetVersion(ctypes.byref(out)) == 0 and out.value:
            return f"CUDA driver API {out.value // 1000}.{out.value % 1000 // 10}"
    except Exception:
        pass
    return None


def _cpu_facts() -> dict[str, Any]:
    """:func:`_device_facts` of the CPU: also what a probe describes when the GPU cannot
    be read."""
    return dict(vendor="cpu", device_type="cpu", device_name="cpu", arch="cpu",
                compute_capability=None, sm_count=os.cpu_count() or 1, total_memory=0,
                l2_cache_bytes=0, driver_version=None, index=None)


def _device_facts(index: Any = _CURRENT) -> dict[str, Any]:
    """Vendor, name, arch, sizes of GPU ``index`` (default: the current device); the CPU
    when it is None (no GPU)."""
    import torch

    if index is _CURRENT:
        index = _gpu_index()
    if index is None:
        return _cpu_facts()
    props = torch.cuda.get_device_properties(index)
    hip = getattr(torch.version, "hip", None)
    if hip:
        arch = str(getattr(props, "gcnArchName", "") or "gfx").split(":")[0]
        vendor, cc = "amd", None
    else:
        vendor, cc = "nvidia", (int(props.major), int(props.minor))
        arch = f"sm{props.major}{props.minor}"
    return dict(vendor=vendor, device_type="cuda", device_name=str(props.name), arch=arch,
                compute_capability=cc, sm_count=int(props.multi_processor_count),
                total_memory=int(props.total_memory),
                l2_cache_bytes=int(getattr(props, "L2_cache_size", 0) or 0),
                driver_version=_guard(_driver_version, None), index=index)


# --------------------------------------------------------------------------- Triton


def _import_triton() -> tuple[Any, Check, str | None]:
    try:
        triton = importlib.import_module("triton")
        importlib.import_module("triton.language")
    except ModuleNotFoundError as exc:
        if exc.name == "triton":
            return None, Check(False, TRITON_NOT_INSTALLED), None
        return None, Check(False, f"Triton failed to import: {one_line(exc)}"), None
    except Exception as exc:
        return None, Check(False, f"Triton failed to import: {one_line(exc)}"), None
    version = str(getattr(triton, "__version__", "unknown"))
    return triton, Check(True, f"Triton {version}"), version


def _imported_before_interpreter(triton: Any) -> bool:
    """True when Triton's own @jit helpers were built without the interpreter.

    Triton picks interpreter or compiler when a @jit function is defined, its standard
    library (``tl.zeros``...) included, at ``import triton``. Setting TRITON_INTERPRET=1
    after that leaves those helpers uncallable from interpreted kernels.
    """
    return type(getattr(triton.language, "zeros", None)).__name__ == "JITFunction"


NUMPY_SCALAR_ERROR = "only 0-dimensional arrays can be converted to Python scalars"


def _numpy_hint(reason: str) -> str:
    """Name the known cause when the interpreter failed the way numpy >= 2.4 makes it.

    Triton 3.6's interpreter turns loop bounds into Python ints through numpy; numpy 2.4
    made that a TypeError, so every kernel with a runtime-bounded loop fails.
    """
    if NUMPY_SCALAR_ERROR not in reason:
        return ""
    try:
        import numpy

        version = tuple(int(p) for p in numpy.__version__.split(".")[:2])
    except Exception:
        return ""
    if version < (2, 4):
        return ""
    return (f" (numpy {numpy.__version__}: Triton's interpreter fails on runtime-bounded "
            f"loops with numpy >= 2.4; pip install 'numpy<2.4')")


def _triton_target(triton: Any) -> str:
    target = triton.runtime.driver.active.get_current_target()
    return f"{target.backend}:{target.arch}"


#: What portattn's Triton kernels use from Triton beyond ``triton.jit`` and
#: ``triton.language`` basics, with the release that brought it: a Triton without one of
#: these would fail on the first launch (``kernels/unified.py`` sizes its merge with a
#: ``triton.constexpr_function``, new in Triton 3.5), so the probe says so instead.
KERNEL_TRITON_FEATURES = (("triton.constexpr_function", "3.5"),)


def missing_kernel_features(triton: Any) -> list[str]:
    """The :data:`KERNEL_TRITON_FEATURES` this ``triton`` module lacks, each as
    ``"name (Triton >= release)"``."""
    missing = []
    for name, release in KERNEL_TRITON_FEATURES:
        obj = triton
        for part in name.split(".")[1:]:
            obj = getattr(obj, part, None)
        if obj is None:
            missing.append(f"{name} (Triton >= {release})")
    return missing


def kernel_features_reason(triton: Any) -> str | None:
    """Why our kernels cannot run on this ``triton`` module (what they use is missing),
    or None."""
    missing = missing_kernel_features(triton)
    if not missing:
        return None
    return (f"Triton {getattr(triton, '__version__', '?')} lacks {', '.join(missing)}, "
            "which portattn's Triton kernels use")


def _kernel_checks(triton_check: Check, triton: Any, interpreter: bool, gpu: int | None,
                   device_error: str | None) -> tuple[str | None, Check, Check]:
    """(triton_target, triton_kernels, tensor_descriptors)."""
    from portattn.capabilities import descriptor_check

    if not triton_check.ok:
        why = f"needs Triton: {triton_check.reason}"
        return None, Check(False, why), Check(False, why)
    too_old = kernel_features_reason(triton)
    if too_old:
        return ("interpreter" if interpreter else None), Check(False, too_old), \
            Check(False, too_old)
    has_api = hasattr(triton.language, "make_tensor_descriptor")
    no_api = Check(False, f"triton.language has no make_tensor_descriptor "
                          f"(Triton {getattr(triton, '__version__', '?')})")
    if interpreter:
        results = descriptor_check.run_checks("cpu")
        pointer, descriptor = results["pointer"], results["descriptor"]
        late = _imported_before_interpreter(triton)
        if pointer["ok"]:
            kernels = Check(True, INTERPRETER_REASON)
        elif late:
            kernels = Check(False, f"{LATE_INTERPRETER_REASON}: {pointer['reason']}")
        else:
            kernels = Check(False, f"a test kernel failed under the Triton interpreter: "
                                   f"{pointer['reason']}{_numpy_hint(pointer['reason'])}")
        if not has_api:
            descriptors = no_api
        elif descriptor["ok"]:
            descriptors = Check(True, "descriptor load/store kernel ran correctly under the "
                                      "Triton interpreter (the GPU compiler is not "
                                      "exercised there)")
        elif late:
            descriptors = Check(False, f"{LATE_INTERPRETER_REASON}: {descriptor['reason']}")
        else:
            descriptors = Check(False, f"descriptor kernel failed under the Triton "
                                       f"interpreter: {descriptor['reason']}"
                                       f"{_numpy_hint(descriptor['reason'])}")
        return "interpreter", kernels, descriptors
    if gpu is None:
        why = NO_GPU_REASON if device_error is None else (
            f"{NO_GPU_REASON} (GPU probe failed: {device_error})")
        descriptors = (Check(False, f"tl.make_tensor_descriptor exists, but {why}")
                       if has_api else no_api)
        return None, Check(False, why), descriptors
    try:
        target = _triton_target(triton)
    except Exception as exc:
        why = f"Triton found no GPU target: {one_line(exc)}"
        return None, Check(False, why), (Check(False, why) if has_api else no_api)
    results = descriptor_check.run_checks_isolated(f"cuda:{gpu}")
    pointer, descriptor = results["pointer"], results["descriptor"]
    kernels = (Check(True, f"test kernel compiled, ran and matched on {target}")
               if pointer["ok"] else
               Check(False, f"a test Triton kernel failed on {target}: {pointer['reason']}"))
    if not has_api:
        descriptors = no_api
    elif descriptor["ok"]:
        descriptors = Check(True, f"descriptor kernel (pipelined loads into tl.dot) compiled, "
                                  f"ran and matched on {target}")
    else:
        descriptors = Check(False, f"descriptor kernel failed on {target}: "
                                   f"{descriptor['reason']}")
    return target, kernels, descriptors


# --------------------------------------------------------------------------- flash-attn


def _flash_attn_layout() -> tuple[bool, bool]:
    """(a regular ``flash_attn`` package is present, ``flash_attn.cute`` is present), read
    from ``sys.modules`` or the import system without running either package.

    FA4's wheel installs ``flash_attn/cute/`` with no ``flash_attn/__init__.py``, so with
    FA4 alone ``flash_attn`` is a namespace package: present, but not FA2.
    """
    cute_entry = sys.modules.get(_FA4_MODULE, False)
    if "flash_attn" in sys.modules:
        module = sys.modules["flash_attn"]
        if module is None:
            return False, False
        namespace = getattr(module, "__file__", None) is None and hasattr(module, "__path__")
        locations = list(getattr(module, "__path__", None) or [])
    else:
        try:
            spec = importlib.util.find_spec("flash_attn")
        except Exception:
            spec = None
        if spec is None:
            return False, cute_entry not in (False, None)
        namespace = spec.origin in (None, "namespace")
        locations = list(spec.submodule_search_locations or [])
    if cute_entry is not False:
        cute = cute_entry is not None
    else:
        cute = any(os.path.isfile(os.path.join(str(loc), "cute", "__init__.py"))
                   for loc in locations)
        if not cute and not namespace:
            # flash-attn >= 2.8.4 extends its package over sys.path (pkgutil.extend_path) so
            # that FA4 may sit in another site directory: looked for there too
            cute = any(os.path.isfile(os.path.join(entry, "flash_attn", "cute", "__init__.py"))
                       for entry in sys.path if isinstance(entry, str))
    return not namespace, cute


def _flash_attn_modules_present() -> list[str]:
    regular, cute = _flash_attn_layout()
    names = ["flash_attn"] if regular else []
    if _module_present("flash_attn_interface"):
        names.append("flash_attn_interface")
    return names + ([_FA4_MODULE] if cute else [])


def _fa4_version(module: Any = None) -> str | None:
    version = _dist_version(*_FA4_DISTS)
    if version is None and module is not None:
        version = getattr(module, "__version__", None)  # FA4 b36 reports "0.0.0" here
        version = None if version in (None, "0.0.0") else str(version)
    return version


def _import_fa2(problems: list[str]) -> tuple[bool, str | None]:
    """(FA2 usable, its version); appends what is wrong to ``problems``."""
    try:
        fa2 = importlib.import_module("flash_attn")
    except Exception as exc:
        problems.append(f"flash_attn failed to import: {one_line(exc)}")
        return False, None
    version = getattr(fa2, "__version__", None)
    if hasattr(fa2, "flash_attn_varlen_func"):
        return True, None if version is None else str(version)
    problems.append("flash_attn has no flash_attn_varlen_func (too old? "
                    "pip install -U flash-attn --no-build-isolation)")
    return False, None if version is None else str(version)


def _import_fa4(problems: list[str]) -> tuple[bool, str | None]:
    """(FA4 usable, its version): ``flash_attn.cute`` imports (CUTLASS's DSL with it) and
    has ``flash_attn_varlen_func``. Compiles nothing."""
    try:
        cute = importlib.import_module(_FA4_MODULE)
    except Exception as exc:
        problems.append(f"flash_attn.cute (FA4) failed to import: {one_line(exc)}")
        return False, None
    if not hasattr(cute, "flash_attn_varlen_func"):
        problems.append("flash_attn.cute has no flash_attn_varlen_func (an FA4 build "
                        "portattn does not know; pip install -U flash-attn-4)")
        return False, None
    return True, _fa4_version(cute)


def probe_flash_attn(vendor: str, arch: str,
                     cc: tuple[int, int] | None) -> tuple[Check, str | None, tuple[str, ...]]:
    """(flash_attn check, version, interfaces) for a device of this vendor/arch.

    Imports the modules only where they could be used (CUDA sm80+); elsewhere presence is
    read from the import system without running the package. ``interfaces`` lists the
    generations found, in the order ``fa2``, ``fa3``, ``fa4``; ``version`` is the first
    one's (FA2's, else FA3's, else the ``flash-attn-4`` package's).
    """
    fa2_present, fa4_present = _flash_attn_layout()
    present = {"fa2": fa2_present, "fa3": _module_present("flash_attn_interface"),
               "fa4": fa4_present}
    if not any(present.values()):
        return Check(False, FLASH_ATTN_NOT_INSTALLED), None, ()
    if not (vendor == "nvidia" and cc is not None and cc >= (8, 0)):
        interfaces = tuple(i for i, found in present.items() if found)
        version = (_dist_version(*_FA2_DISTS) or _dist_version(*_FA3_DISTS)
                   or _dist_version(*_FA4_DISTS))
        return (Check(False, f"flash-attn is installed but needs an NVIDIA GPU with compute "
                             f"capability 8.0 or newer; this device is {arch}"),
                version, interfaces)
    problems: list[str] = []
    found: list[str] = []
    version = None
    if present["fa2"]:
        ok, version = _import_fa2(problems)
        if ok:
            found.append("fa2")
    if present["fa3"]:
        try:
            fa3 = importlib.import_module("flash_attn_interface")
            found.append("fa3")
            version = version or getattr(fa3, "__version__", None) or _dist_version(
                *_FA3_DISTS)
        except Exception as exc:
            problems.append(f"flash_attn_interface failed to import: {one_line(exc)}")
    fa4_version = None
    if present["fa4"]:
        ok, fa4_version = _import_fa4(problems)
        if ok:
            found.append("fa4")
    interfaces = tuple(found)
    version = str(version) if version is not None else (
        _dist_version(*_FA2_DISTS) or _dist_version(*_FA3_DISTS))
    if not interfaces:
        return (Check(False, "flash-attn is installed but unusable: " + "; ".join(problems)),
                version or fa4_version, ())
    if interfaces == ("fa4",):
        version = fa4_version
    reason = f"flash-attn {version or '(unknown version)'} ({', '.join(interfaces)}) on {arch}"
    if "fa4" in interfaces and interfaces != ("fa4",):
        reason += f"; FA4 from flash-attn-4 {fa4_version or '(unknown version)'}"
    if problems:
        reason += "; " + "; ".join(problems)
    return Check(True, reason), version, interfaces


# --------------------------------------------------------------------------- the probe


def _current_gpu(index: int | None) -> Any:
    """Make GPU ``index`` current while its kernels are checked (no-op for the CPU)."""
    if index is None:
        return contextlib.nullcontext()
    from portattn.devices import on_device

    return on_device(index)


def probe_device(index: Any = _CURRENT) -> Capabilities:
    """Probe GPU ``index`` of this machine now (default: the current device; None: the
    CPU), with no caching and no overrides. Never raises."""
    return _probe_device_and_failures(index)[0]


def _probe_device_and_failures(index: Any = _CURRENT, *, lookup_error: str | None = None
                               ) -> tuple[Capabilities, list[str]]:
    """:func:`probe_device`, and the steps of it that raised, Triton's import among them
    (installed but raising on import). Such a result is kept in memory only, never on
    disk: its cause may be mended without any version in the disk-cache key changing (a
    missing shared library installed, a driver reloaded, a broken file reinstalled), so
    the next process probes again (cheap where Triton does not import or the device
    cannot be read: the kernel checks are skipped then). A flash-attn that does not import
    is not among them: its reason says how to mend it, a rebuild against another torch
    changes the key, and probing again would rerun the Triton kernel checks in every
    process. Nor is a check that failed because Triton was imported before
    ``TRITON_INTERPRET`` was set (:data:`LATE_INTERPRETER_REASON`): a state of this process
    alone, which the disk-cache key cannot tell (Triton may have been imported by this very
    probe), and a later process set up right would be served it. ``lookup_error``: why the
    device could not even be looked up
    (:func:`_lookup_device`): the CPU is described, with that reason, as when reading the
    device raises."""
    failures: list[str] = []
    try:
        import torch

        torch_version = str(torch.__version__)
        cuda_version = torch.version.cuda
        hip_version = getattr(torch.version, "hip", None)
    except Exception as exc:
        torch_version, cuda_version, hip_version = f"unavailable ({one_line(exc)})", None, None
        failures.append("torch")

    device_error = lookup_error
    if lookup_error is not None:
        failures.append("device lookup")
        facts = _cpu_facts()
    else:
        try:
            facts = _device_facts(index)
        except Exception as exc:
            device_error = one_line(exc)
            failures.append("device facts")
            facts = _cpu_facts()

    interpreter = interpreter_enabled()
    triton, triton_check, triton_version = _import_triton()
    if triton is None and triton_check.reason != TRITON_NOT_INSTALLED:
        failures.append("triton import")
    try:
        with _current_gpu(facts["index"]):  # Triton's target is the current device's
            target, kernels, descriptors = _kernel_checks(triton_check, triton, interpreter,
                                                          facts["index"], device_error)
    except Exception as exc:
        why = f"kernel check failed: {one_line(exc)}"
        target, kernels, descriptors = None, Check(False, why), Check(False, why)
        failures.append("kernel checks")
    if any(LATE_INTERPRETER_REASON in check.reason for check in (kernels, descriptors)):
        failures.append("late interpreter")
    from portattn.capabilities.descriptor_check import is_transient

    if any(is_transient(check.reason) for check in (kernels, descriptors)):
        failures.append("kernel check process timed out or killed")

    try:
        fp8: tuple[str, ...] = fp8_formats(facts["vendor"], facts["arch"],
                                           facts["compute_capability"])
    except Exception:
        fp8 = ()
        failures.append("fp8 formats")
    try:
        flash, flash_version, interfaces = probe_flash_attn(
            facts["vendor"], facts["arch"], facts["compute_capability"])
    except Exception as exc:
        flash, flash_version, interfaces = (
            Check(False, f"flash-attn probe failed: {one_line(exc)}"), None, ())
        failures.append("flash-attn probe")

    caps = Capabilities(
        profile=None,
        vendor=facts["vendor"],
        device_type=facts["device_type"],
        device_name=facts["device_name"],
        arch=facts["arch"],
        compute_capability=facts["compute_capability"],
        sm_count=facts["sm_count"],
        total_memory=facts["total_memory"],
        l2_cache_bytes=facts["l2_cache_bytes"],
        torch_version=torch_version,
        cuda_version=cuda_version,
        hip_version=hip_version,
        driver_version=facts["driver_version"],
        triton=triton_check,
        triton_version=triton_version,
        triton_interpreter=interpreter,
        triton_target=target,
        triton_kernels=kernels,
        tensor_descriptor_api=triton is not None and _guard(
            lambda: hasattr(triton.language, "make_tensor_descriptor"), False),
        tensor_descriptors=descriptors,
        fp8_formats=fp8,
        flash_attn=flash,
        flash_attn_version=flash_version,
        flash_attn_interfaces=interfaces,
        device_index=facts["index"],
    )
    return caps, failures
