"""Simulated capability profiles: route for any architecture on a machine without it.

``PORTATTN_SIMULATE=<name>`` or ``probe(simulate=<name>)`` returns one of these instead
of probing, so the dispatcher's per-architecture routing is tested on a CPU in every CI
run. A profile describes one real, common machine with realistic numbers (SM count,
memory, L2) and a fixed software stack, so a routing test gives the same answer wherever
it runs. Nothing here imports torch or Triton.

Names
-----
``<base>[+fa2][+fa3][+fa4]``

* ``base`` is one of :data:`PROFILES` (see :data:`PROFILE_DESCRIPTIONS`).
* ``+fa2`` adds the flash-attn 2 package (module ``flash_attn`` with
  ``flash_attn_varlen_func``), ``+fa3`` the FlashAttention-3 interface (module
  ``flash_attn_interface``), ``+fa4`` FlashAttention-4 (module ``flash_attn.cute``, pip
  ``flash-attn-4``); any of them may be given, in any order (``sm90+fa2+fa3``,
  ``sm100+fa4``). Without a suffix flash-attn is "not installed". On a device flash-attn
  cannot use (not CUDA sm80+) the package is reported installed but ``flash_attn.ok`` is
  False, as a real probe would.

Every :class:`Check` of a profile has ``source="simulated"``. What the simulation assumes
(and a real probe measures instead):

* Triton 3.6.0 is installed and compiles for every GPU profile;
* tensor-descriptor kernels run on sm90, sm100 and sm120, where descriptor loads map to
  TMA; on sm80/86/89 and on AMD they are reported unavailable (pointer loads only), even
  though some Triton versions emulate descriptors there;
* the ``cpu`` profile is a plain CPU without ``TRITON_INTERPRET``; ``cpu-interpreter`` is
  the same CPU with the interpreter on (our Triton kernels run, slowly).
"""

from __future__ import annotations

from dataclasses import dataclass

from portattn.capabilities.model import Capabilities, Check
from portattn.errors import InputError

SIMULATED_TORCH_CUDA = "2.9.0+cu128"
SIMULATED_TORCH_ROCM = "2.9.0+rocm6.4"
SIMULATED_TORCH_CPU = "2.9.0+cpu"
SIMULATED_TRITON = "3.6.0"
SIMULATED_FLASH_ATTN_2 = "2.8.3"
SIMULATED_FLASH_ATTN_3 = "3.0.0b1"
SIMULATED_FLASH_ATTN_4 = "4.0.0b36"

GiB = 1 << 30
MiB = 1 << 20

NO_GPU_REASON = "no GPU and TRITON_INTERPRET is not set"


@dataclass(frozen=True)
class _Device:
    description: str
    vendor: str
    device_name: str
    arch: str
    compute_capability: tuple[int, int] | None
    sm_count: int
    total_memory: int
    l2_cache_bytes: int
    triton_target: str | None
    interpreter: bool = False


_DEVICES: dict[str, _Device] = {
    "sm80": _Device("NVIDIA A100 SXM4 80GB (Ampere)", "nvidia", "NVIDIA A100-SXM4-80GB",
                    "sm80", (8, 0), 108, 79 * GiB + 363 * MiB, 40 * MiB, "cuda:80"),
    "sm86": _Device("NVIDIA RTX A6000 (Ampere, also RTX 3090 class)", "nvidia",
                    "NVIDIA RTX A6000", "sm86", (8, 6), 84, 47 * GiB + 976 * MiB, 6 * MiB,
                    "cuda:86"),
    "sm89": _Device("NVIDIA L40S (Ada Lovelace)", "nvidia", "NVIDIA L40S", "sm89", (8, 9),
                    142, 44 * GiB + 372 * MiB, 96 * MiB, "cuda:89"),
    "sm90": _Device("NVIDIA H100 SXM5 80GB (Hopper)", "nvidia", "NVIDIA H100 80GB HBM3",
                    "sm90", (9, 0), 132, 79 * GiB + 663 * MiB, 50 * MiB, "cuda:90"),
    "sm100": _Device("NVIDIA B200 (Blackwell datacenter)", "nvidia", "NVIDIA B200",
                     "sm100", (10, 0), 148, 178 * GiB + 359 * MiB, 126 * MiB, "cuda:100"),
    "sm120": _Device("NVIDIA GeForce RTX 5090 (Blackwell consumer)", "nvidia",
                     "NVIDIA GeForce RTX 5090", "sm120", (12, 0), 170, 31 * GiB + 863 * MiB,
                     96 * MiB, "cuda:120"),
    "gfx942": _Device("AMD Instinct MI300X (CDNA3)", "amd", "AMD Instinct MI300X", "gfx942",
                      None, 304, 192 * GiB, 4 * MiB, "hip:gfx942"),
    "gfx950": _Device("AMD Instinct MI355X (CDNA4)", "amd", "AMD Instinct MI355X", "gfx950",
                      None, 256, 288 * GiB, 4 * MiB, "hip:gfx950"),
    "cpu": _Device("CPU only, Triton installed, TRITON_INTERPRET not set", "cpu", "cpu",
                   "cpu", None, 16, 0, 0, None),
    "cpu-interpreter": _Device("CPU only with TRITON_INTERPRET=1", "cpu", "cpu", "cpu", None,
                               16, 0, 0, "interpreter", interpreter=True),
}

#: Base names of the simulated profiles (suffixes ``+fa2`` / ``+fa3`` / ``+fa4`` may follow).
PROFILES: tuple[str, ...] = tuple(_DEVICES)

#: One line per profile, for ``--help`` texts and the README.
PROFILE_DESCRIPTIONS: dict[str, str] = {name: d.description for name, d in _DEVICES.items()}

FLASH_ATTN_SUFFIXES: tuple[str, ...] = ("fa2", "fa3", "fa4")
_SIMULATED_VERSIONS = {"fa2": SIMULATED_FLASH_ATTN_2, "fa3": SIMULATED_FLASH_ATTN_3,
                       "fa4": SIMULATED_FLASH_ATTN_4}


def _known_names() -> str:
    return (", ".join(PROFILES) + " (optionally followed by +fa2, +fa3 and/or +fa4, "
            "e.g. sm90+fa2 or sm100+fa4)")


def parse_profile_name(name: str, argument: str = "simulate"
                       ) -> tuple[str, tuple[str, ...]]:
    """``"sm90+fa4+fa2"`` -> ``("sm90", ("fa2", "fa4"))`` (case-insensitive: ``SM90+FA4``
    is ``sm90+fa4``); ``InputError`` (a ``ValueError``) naming ``argument`` if unknown."""
    if not isinstance(name, str):
        raise InputError(argument, "a simulated profile name (a str)", repr(name))
    base, *suffixes = name.strip().lower().split("+")
    if base not in _DEVICES:
        raise InputError(argument, f"a known simulated profile ({_known_names()})",
                         f"unknown simulated profile {name!r}")
    bad = [s for s in suffixes if s not in FLASH_ATTN_SUFFIXES]
    if bad or len(set(suffixes)) != len(suffixes):
        raise InputError(argument, "a profile with each of +fa2, +fa3, +fa4 at most once "
                         f"({_known_names()})", f"bad suffix in simulated profile {name!r}")
    return base, tuple(s for s in FLASH_ATTN_SUFFIXES if s in suffixes)


def _sim(ok: bool, reason: str) -> Check:
    return Check(ok, f"{reason} (simulated)", "simulated")


def fp8_formats(vendor: str, arch: str, cc: tuple[int, int] | None) -> tuple[str, ...]:
    """Formats the hardware computes in natively, kept only where torch has the dtype (the
    one rule: probed devices, simulated profiles, the cache write's choice)."""
    if vendor == "nvidia" and cc is not None and cc >= (8, 9):
        wanted: tuple[str, ...] = ("e4m3fn", "e5m2")
    elif vendor == "amd" and arch == "gfx942":
        wanted = ("e4m3fnuz", "e5m2fnuz")
    elif vendor == "amd" and (arch == "gfx950" or arch.startswith("gfx12")):
        wanted = ("e4m3fn", "e5m2")
    else:
        return ()
    import torch

    return tuple(f for f in wanted if hasattr(torch, f"float8_{f}"))


def _tensor_descriptors(d: _Device) -> Check:
    if d.interpreter:
        return _sim(True, "descriptor load/store kernel runs under the Triton interpreter")
    if d.triton_target is None:
        return _sim(False, f"tl.make_tensor_descriptor exists, but {NO_GPU_REASON}")
    if d.vendor == "nvidia" and (d.compute_capability or (0, 0)) >= (9, 0):
        return _sim(True, f"descriptor kernel compiled and ran on {d.arch} (TMA)")
    if d.vendor == "nvidia":
        return _sim(False, "descriptor loads need TMA, sm90+ in this simulation")
    return _sim(False, f"descriptor loads are not used on AMD {d.arch} in this simulation")


def _triton_kernels(d: _Device) -> Check:
    if d.interpreter:
        return _sim(True, "Triton interpreter (TRITON_INTERPRET=1)")
    if d.triton_target is None:
        return _sim(False, NO_GPU_REASON)
    return _sim(True, f"Triton target {d.triton_target}")


def _flash_attn(d: _Device, interfaces: tuple[str, ...]) -> tuple[Check, str | None]:
    if not interfaces:
        return _sim(False, "flash-attn is not installed"), None
    version = _SIMULATED_VERSIONS[interfaces[0]]  # FA2's, else FA3's, else FA4's
    names = ", ".join(interfaces)
    if d.vendor == "nvidia" and (d.compute_capability or (0, 0)) >= (8, 0):
        return _sim(True, f"flash-attn {version} ({names}) on {d.arch}"), version
    return _sim(False, f"flash-attn {version} is installed but needs an NVIDIA GPU with "
                       f"compute capability 8.0 or newer; this device is {d.arch}"), version


def simulated(name: str) -> Capabilities:
    """The :class:`Capabilities` of simulated profile ``name`` (see the module docstring)."""
    base, interfaces = parse_profile_name(name)
    d = _DEVICES[base]
    torch_version = {"nvidia": SIMULATED_TORCH_CUDA, "amd": SIMULATED_TORCH_ROCM,
                     "cpu": SIMULATED_TORCH_CPU}[d.vendor]
    flash_attn, flash_attn_version = _flash_attn(d, interfaces)
    return Capabilities(
        profile="+".join((base,) + interfaces),
        vendor=d.vendor,
        device_type="cpu" if d.vendor == "cpu" else "cuda",
        device_name=d.device_name,
        arch=d.arch,
        compute_capability=d.compute_capability,
        sm_count=d.sm_count,
        total_memory=d.total_memory,
        l2_cache_bytes=d.l2_cache_bytes,
        torch_version=torch_version,
        cuda_version="12.8" if d.vendor == "nvidia" else None,
        hip_version="6.4.43482" if d.vendor == "amd" else None,
        driver_version={"nvidia": "570.133.20", "amd": "6.12.12"}.get(d.vendor),
        triton=_sim(True, f"Triton {SIMULATED_TRITON}"),
        triton_version=SIMULATED_TRITON,
        triton_interpreter=d.interpreter,
        triton_target=d.triton_target,
        triton_kernels=_triton_kernels(d),
        tensor_descriptor_api=True,  # the simulated Triton has the API
        tensor_descriptors=_tensor_descriptors(d),
        fp8_formats=fp8_formats(d.vendor, d.arch, d.compute_capability),
        flash_attn=flash_attn,
        flash_attn_version=flash_attn_version,
        flash_attn_interfaces=interfaces,
    )
