"""The capability data model: what a machine can do, as frozen, hashable, JSON-able data.

:class:`Capabilities` is the only thing the dispatcher looks at to decide where a call
goes, so it must be cheap to hash (it keys the decision caches), exact to serialize (it is
cached on disk and printed by ``portattn report --json``), and honest about where every
answer came from: each yes/no fact is a :class:`Check` carrying a reason and a source.

This module is pure Python on purpose: importing it touches neither torch nor Triton.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

CHECK_SOURCES = ("probed", "simulated", "overridden", "default")

#: The fields of :class:`Capabilities` that hold a :class:`Check`, in field order.
CHECK_FIELDS = ("triton", "triton_kernels", "tensor_descriptors", "flash_attn")

#: flash-attn generations: FA2 ``flash_attn``, FA3 ``flash_attn_interface``,
#: FA4 ``flash_attn.cute``.
KNOWN_INTERFACES = ("fa2", "fa3", "fa4")


@dataclass(frozen=True)
class Check:
    """One yes/no capability with the reason behind it.

    ``reason`` says why not when ``ok`` is False, or gives a short detail when it is True.
    ``source`` says who answered: ``"probed"`` (measured on this machine), ``"simulated"``
    (a named profile), ``"overridden"`` (an environment variable) or ``"default"``.
    """

    ok: bool
    reason: str = ""
    source: str = "probed"

    def __bool__(self) -> bool:
        return self.ok

    def to_dict(self) -> dict:
        return {"ok": self.ok, "reason": self.reason, "source": self.source}

    @classmethod
    def from_dict(cls, d: Any) -> "Check":
        if not isinstance(d, dict) or set(d) != {"ok", "reason", "source"}:
            raise ValueError(f"a Check is a dict with keys ok, reason, source; got {d!r}")
        ok, reason, source = d["ok"], d["reason"], d["source"]
        if not isinstance(ok, bool) or not isinstance(reason, str):
            raise ValueError(f"Check.ok must be a bool and Check.reason a str; got {d!r}")
        if source not in CHECK_SOURCES:
            raise ValueError(f"Check.source must be one of {CHECK_SOURCES}; got {source!r}")
        return cls(ok, reason, source)


@dataclass(frozen=True)
class Capabilities:
    """Everything the dispatcher and the backends may ask about the machine.

    Built by :func:`portattn.capabilities.probe`; never mutate, derive a new one with
    :func:`dataclasses.replace`. Field meanings are documented in DESIGN.md ("Capabilities")
    and in ``portattn/capabilities/report.py`` (the JSON schema).
    """

    profile: str | None
    vendor: str
    device_type: str
    device_name: str
    arch: str
    compute_capability: tuple[int, int] | None
    sm_count: int
    total_memory: int
    l2_cache_bytes: int
    torch_version: str
    cuda_version: str | None
    hip_version: str | None
    driver_version: str | None
    triton: Check
    triton_version: str | None
    triton_interpreter: bool
    triton_target: str | None
    triton_kernels: Check
    #: ``triton.language`` has ``make_tensor_descriptor`` (the API exists; whether a
    #: descriptor kernel compiles and runs here is ``tensor_descriptors``).
    tensor_descriptor_api: bool
    tensor_descriptors: Check
    fp8_formats: tuple[str, ...]
    flash_attn: Check
    flash_attn_version: str | None
    flash_attn_interfaces: tuple[str, ...]
    #: Which GPU of this process was probed (``torch.cuda`` index); None for the CPU and
    #: for simulated profiles. Part of the hash, so every cache keyed by capabilities
    #: (decisions, priorities) keeps one answer per device.
    device_index: int | None = None

    # Decision caches hash a Capabilities on every call: compute it once.
    def __hash__(self) -> int:
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))
            object.__setattr__(self, "_hash", cached)
        return cached

    def __getstate__(self) -> dict:
        # String hashes differ between processes: never carry the memo through pickle.
        return {k: v for k, v in self.__dict__.items() if k != "_hash"}

    @property
    def simulated(self) -> bool:
        return self.profile is not None

    def checks(self) -> dict[str, Check]:
        """The yes/no capabilities by field name, in field order."""
        return {name: getattr(self, name) for name in CHECK_FIELDS}

    def to_dict(self) -> dict:
        """A JSON-serializable dict, keys in field order; :meth:`from_dict` inverts it."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Check):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, d: Any) -> "Capabilities":
        """Rebuild from :meth:`to_dict` output; raises ``ValueError`` on any mismatch.

        Strict on purpose: a disk-cache file written by another portattn version, or
        damaged, must be rejected (and re-probed), not half-loaded.
        """
        if not isinstance(d, dict):
            raise ValueError(f"Capabilities.from_dict needs a dict, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in d]
        unknown = [k for k in d if k not in names]
        if missing or unknown:
            raise ValueError(f"Capabilities fields do not match: missing {missing}, "
                             f"unknown {unknown}")
        values: dict[str, Any] = {name: _FIELD_PARSERS[name](name, d[name]) for name in names}
        return cls(**values)


def _str(name: str, v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"{name} must be a str, got {v!r}")
    return v


def _opt_str(name: str, v: Any) -> str | None:
    return None if v is None else _str(name, v)


def _int(name: str, v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"{name} must be an int, got {v!r}")
    return v


def _opt_int(name: str, v: Any) -> int | None:
    return None if v is None else _int(name, v)


def _bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be a bool, got {v!r}")
    return v


def _check(name: str, v: Any) -> Check:
    return Check.from_dict(v)


def _str_tuple(name: str, v: Any) -> tuple[str, ...]:
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
        raise ValueError(f"{name} must be a list of str, got {v!r}")
    return tuple(v)


def _cc(name: str, v: Any) -> tuple[int, int] | None:
    if v is None:
        return None
    if (not isinstance(v, (list, tuple)) or len(v) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
        raise ValueError(f"{name} must be null or [major, minor], got {v!r}")
    return (v[0], v[1])


_FIELD_PARSERS = {
    "profile": _opt_str,
    "vendor": _str,
    "device_type": _str,
    "device_name": _str,
    "arch": _str,
    "compute_capability": _cc,
    "sm_count": _int,
    "total_memory": _int,
    "l2_cache_bytes": _int,
    "torch_version": _str,
    "cuda_version": _opt_str,
    "hip_version": _opt_str,
    "driver_version": _opt_str,
    "triton": _check,
    "triton_version": _opt_str,
    "triton_interpreter": _bool,
    "triton_target": _opt_str,
    "triton_kernels": _check,
    "tensor_descriptor_api": _bool,
    "tensor_descriptors": _check,
    "fp8_formats": _str_tuple,
    "flash_attn": _check,
    "flash_attn_version": _opt_str,
    "flash_attn_interfaces": _str_tuple,
    "device_index": _opt_int,
}

assert set(_FIELD_PARSERS) == {f.name for f in dataclasses.fields(Capabilities)}
