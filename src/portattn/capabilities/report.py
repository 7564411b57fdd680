"""``portattn report``: the environment and what this machine can do, as JSON and as text.

``collect_report()`` gathers the data, ``render_report()`` turns it into text, ``main()``
is the command line (``python -m portattn.capabilities.report [--json] [--refresh]
[--simulate NAME]``; ``portattn report`` calls the same functions and adds the backends
and routing sections).

JSON schema ``portattn.report/1``
---------------------------------
A JSON object; keys appear in this order. Consumers must ignore keys they do not know.

``schema``
    Always ``"portattn.report/1"``. A change that removes or retypes a key bumps it.
``portattn_version``
    The portattn version that wrote the report, e.g. ``"0.1.0"``.
``platform``
    ``{"python": "3.11.9", "implementation": "CPython", "os": "Linux-6.8.0-...-x86_64",
    "machine": "x86_64"}``.
``environment``
    The variables of :data:`portattn.settings.SETTINGS` that are set (non-empty), as
    ``{name: value}``; empty when none is.
``settings``
    Every variable of :data:`portattn.settings.SETTINGS`, set or not, in table order:
    ``{name: {"value": str or null (unset), "values": accepted values, "default": what
    unset means, "meaning": str, "owner": "portattn" or the project that defines it
    ("Triton", "CUDA", ...), "problem": null or why the value is not accepted}}``.
``probe_origin``
    Where ``capabilities`` came from: ``"probed"`` (measured by this process),
    ``"disk-cache"`` (read from the disk cache, written by an earlier process),
    ``"simulated"`` (a ``PORTATTN_SIMULATE`` profile) or ``"caller"`` (the program passed
    its own Capabilities).
``disk_cache``
    ``{"dir": "/home/me/.cache/portattn", "enabled": true, "problem": null}``: where
    probe results are kept (``PORTATTN_CACHE_DIR``), whether that is on
    (``PORTATTN_NO_DISK_CACHE``), and why nothing can be kept there (not writable, not a
    folder, no folder can be named), else null (also when off, simulated or passed in:
    then nothing is written, nor checked).
``capabilities``
    ``Capabilities.to_dict()``; ``Capabilities.from_dict`` reads it back exactly:

    * ``profile``: simulated profile name (``"sm90+fa2"``), null when probed for real.
    * ``vendor``: ``"nvidia"``, ``"amd"`` or ``"cpu"``.
    * ``device_type``: the torch device type, ``"cuda"`` (also on ROCm) or ``"cpu"``.
    * ``device_name``: e.g. ``"NVIDIA H100 80GB HBM3"``, ``"cpu"``.
    * ``arch``: ``"sm90"``, ``"sm80"``, ``"gfx942"``, ``"cpu"``...
    * ``compute_capability``: ``[9, 0]`` on NVIDIA, null on AMD and CPU.
    * ``sm_count``: streaming multiprocessors (NVIDIA), compute units (AMD), CPU cores.
    * ``total_memory``: device memory in bytes (0 on a CPU).
    * ``l2_cache_bytes``: L2 size in bytes, 0 when unknown.
    * ``torch_version``, ``cuda_version``, ``hip_version``: torch's own build (the CUDA or
      HIP it was built with; null when not that kind of build).
    * ``driver_version``: the GPU kernel driver (``"580.159.04"``; ``"amdgpu 6.12.12"``;
      ``"CUDA driver API 13.0"`` when only that is known), null on a CPU.
    * ``triton``: Check, Triton imports (reason: the version, or why not).
    * ``triton_version``: null when Triton does not import.
    * ``triton_interpreter``: ``TRITON_INTERPRET`` was on at probe time.
    * ``triton_target``: ``"cuda:90"``, ``"hip:gfx942"``, ``"interpreter"``, or null.
    * ``triton_kernels``: Check, a test Triton kernel compiled, ran and matched torch here
      (or the interpreter is on).
    * ``tensor_descriptor_api``: ``triton.language.make_tensor_descriptor`` exists.
    * ``tensor_descriptors``: Check, ``tl.make_tensor_descriptor`` exists AND a pipelined
      descriptor load/store kernel compiled, ran and matched torch here.
    * ``fp8_formats``: fp8 formats the hardware computes natively, as torch dtype suffixes:
      ``["e4m3fn", "e5m2"]`` (sm89+, gfx950), ``["e4m3fnuz", "e5m2fnuz"]`` (gfx942), ``[]``.
    * ``flash_attn``: Check, flash-attn imports and this device can run it (CUDA sm80+).
    * ``flash_attn_version``: the flash-attn version (else FlashAttention-3's, else the
      ``flash-attn-4`` package's), or null.
    * ``flash_attn_interfaces``: subset of ``["fa2", "fa3", "fa4"]``: ``fa2`` = module
      ``flash_attn`` with ``flash_attn_varlen_func``, ``fa3`` = module
      ``flash_attn_interface``, ``fa4`` = module ``flash_attn.cute`` (pip ``flash-attn-4``).
    * ``device_index``: the CUDA index of the probed GPU (the current device), null on a
      CPU and for a simulated profile.

    A Check is ``{"ok": bool, "reason": str, "source": str}``; ``reason`` says why not
    (or gives a detail when ok), ``source`` is ``"probed"``, ``"simulated"``,
    ``"overridden"`` (``PORTATTN_TD`` / ``PORTATTN_TRITON`` / ``PORTATTN_FLASH_ATTN``) or
    ``"default"``.

``devices``
    A list, one entry per GPU this process sees (``CUDA_VISIBLE_DEVICES`` order), each a
    ``Capabilities.to_dict()`` like ``capabilities`` (its ``device_index`` says which);
    the one CPU entry on a machine without a GPU; ``[capabilities]`` for a simulated
    profile or capabilities passed in by the program. ``capabilities`` is the entry of
    the current device (the one a call without tensors, ``portattn explain``, routes for).

Sections added by ``portattn report`` (the dispatcher), absent from
``python -m portattn.capabilities.report``:

``backends``
    ``{name: {"available": bool, "reasons": [str, ...], "summary": str}}``, every
    registered backend, why it cannot run on this machine (empty list when it can) and
    what it is.
``routing``
    ``[{"problem": str, "backend": str, "variant": str, "notes": [str, ...]}, ...]``: the
    decision for each of a set of common problems, with the dispatcher's notes (a
    measured lead that yielded). When nothing serves a problem, or a ``PORTATTN_*``
    value is not accepted, its row has ``"backend": "none"``, the error's first line as
    ``variant`` and no ``notes``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import textwrap
from typing import Any, Callable, Sequence

from portattn import settings
from portattn.capabilities import cache
from portattn.capabilities.model import CHECK_FIELDS, Capabilities

SCHEMA = "portattn.report/1"

RESERVED_KEYS = ("schema", "portattn_version", "platform", "environment", "settings",
                 "probe_origin", "disk_cache", "capabilities", "devices")

_ORIGIN_TEXT = {
    "probed": "probed now",
    "disk-cache": "from the disk cache",
    "simulated": "simulated profile",
    "caller": "passed in by the program",
    "memory": "from this process's memory",
}


def visible_devices(caps: Capabilities) -> list[Capabilities]:
    """Every GPU this process sees, probed (each cached on its own), for a real ``caps``;
    ``[caps]`` for a simulated profile or a machine without a GPU."""
    probe_module = importlib.import_module("portattn.capabilities.probe")
    if caps.profile is not None or caps.device_index is None:
        return [caps]
    count = probe_module._gpu_count()
    return [caps if i == caps.device_index else probe_module.probe("", device=i)
            for i in range(count)] or [caps]


def collect_report(caps: Capabilities | None = None, *,
                   extra_sections: dict | None = None,
                   devices: Sequence[Capabilities] | None = None) -> dict:
    """The report as a JSON-serializable dict (schema in this module's docstring).

    ``caps`` defaults to :func:`probe` (``probe_origin`` then says whether it came from
    the disk cache). ``devices`` (the ``devices`` list) defaults to
    :func:`visible_devices`. ``extra_sections`` are appended after the standard keys (the
    dispatcher adds ``backends`` and ``routing``); they may not reuse a standard key.
    """
    from portattn import __version__
    from portattn.capabilities.probe import probe

    if caps is None:
        caps = probe()
        origin = cache.last_probe_origin(resolve_memory=True) or "probed"
    else:
        last = cache.STATE.last
        origin = last[1] if last is not None and last[2] is caps else "caller"
    if caps.profile is not None and origin != "caller":
        origin = "simulated"
    disk_on = cache.disk_cache_enabled()
    # a write check only where this probe would write (not simulated nor passed in)
    check_disk = disk_on and origin not in ("simulated", "caller")
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "portattn_version": __version__,
        "platform": {
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "os": platform.platform(),
            "machine": platform.machine(),
        },
        "environment": {s.name: s.raw() for s in settings.SETTINGS if s.raw()},
        "settings": settings.describe(),
        "probe_origin": origin,
        "disk_cache": {"dir": cache.describe_dir(), "enabled": disk_on,
                       "problem": cache.dir_problem() if check_disk else None},
        "capabilities": caps.to_dict(),
        "devices": [d.to_dict() for d in (visible_devices(caps) if devices is None
                                          else devices)],
    }
    for name, section in (extra_sections or {}).items():
        if name in RESERVED_KEYS:
            raise ValueError(f"extra section {name!r} would replace a standard report key "
                             f"({', '.join(RESERVED_KEYS)})")
        report[name] = section
    return report


# ------------------------------------------------------------------------------ text


def _or_dash(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _bytes(n: Any) -> str:
    if not isinstance(n, int) or n <= 0:
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _rows(pairs: list[tuple[str, str]], indent: str = "  ") -> list[str]:
    width = max((len(k) for k, _ in pairs), default=0)
    return [f"{indent}{k.ljust(width)}  {v}".rstrip() for k, v in pairs]


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]], indent: str = "  ",
           last_width: int | None = None) -> list[str]:
    """Aligned columns; the last one wrapped at ``last_width`` characters when given."""
    if last_width is not None:
        wrapped = []
        for row in rows:
            pieces = textwrap.wrap(str(row[-1]), last_width) or [""]
            wrapped.append((*row[:-1], pieces[0]))
            wrapped.extend(("",) * (len(row) - 1) + (p,) for p in pieces[1:])
        rows = wrapped
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return (indent + "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))).rstrip()

    return [line(header), line(tuple("-" * w for w in widths)), *(line(r) for r in rows)]


def _device_lines(c: dict) -> list[str]:
    cc = c.get("compute_capability")
    arch = _or_dash(c.get("arch"))
    if isinstance(cc, list) and len(cc) == 2:
        arch += f" (compute capability {cc[0]}.{cc[1]})"
    units = {"nvidia": "SMs", "amd": "CUs", "cpu": "CPU cores"}.get(str(c.get("vendor")), "SMs")
    profile = c.get("profile")
    interfaces = c.get("flash_attn_interfaces") or []
    return _rows([
        ("profile", f"{profile} (simulated)" if profile else "none (this machine)"),
        ("vendor", _or_dash(c.get("vendor"))),
        ("name", _or_dash(c.get("device_name"))),
        ("torch device", _or_dash(c.get("device_type"))),
        ("arch", arch),
        (units, _or_dash(c.get("sm_count"))),
        ("memory", _bytes(c.get("total_memory"))),
        ("L2 cache", _bytes(c.get("l2_cache_bytes"))),
        ("driver", _or_dash(c.get("driver_version"))),
        ("Triton target", _or_dash(c.get("triton_target"))),
        ("interpreter", "on (TRITON_INTERPRET)" if c.get("triton_interpreter") else "off"),
        ("fp8 formats", ", ".join(c.get("fp8_formats") or []) or "none"),
        ("flash-attn API", ", ".join(interfaces) or "none"),
    ])


def _library_lines(c: dict) -> list[str]:
    flash = c.get("flash_attn_version")
    if flash is None:
        flash = "not installed" if not c.get("flash_attn_interfaces") else "unknown version"
    triton = c.get("triton_version") or "not available"
    return _rows([
        ("torch", _or_dash(c.get("torch_version"))),
        ("CUDA", _or_dash(c.get("cuda_version"))),
        ("HIP", _or_dash(c.get("hip_version"))),
        ("Triton", triton),
        ("flash-attn", flash),
    ])


def _capability_lines(c: dict) -> list[str]:
    rows = []
    for name in CHECK_FIELDS:
        check = c.get(name)
        if not isinstance(check, dict):
            continue
        rows.append(("yes" if check.get("ok") else "no", name, str(check.get("source", "")),
                     str(check.get("reason", ""))))
    return _table(("ok", "capability", "source", "reason"), rows, last_width=72)


def _settings_lines(report: dict) -> list[str]:
    """Every setting with its value; falls back to the ``environment`` section (the
    variables that are set) for a report written before ``settings`` existed."""
    table = report.get("settings")
    if not isinstance(table, dict):
        env = report.get("environment") or {}
        return (_rows([(k, str(v)) for k, v in env.items()]) if env
                else ["  (no portattn, Triton or device variables set)"])
    rows = []
    for name, info in table.items():
        info = info if isinstance(info, dict) else {}
        value = info.get("value")
        shown = "unset" if value is None else repr(value)
        note = f"default: {info.get('default', '?')}" if value is None else \
            str(info.get("meaning", ""))
        if info.get("problem"):
            shown += " INVALID"
            note = str(info["problem"])
        rows.append((str(name), shown, note))
    return _table(("variable", "value", "meaning (or the default when unset)"), rows,
                  last_width=60)


def _backend_lines(backends: Any) -> list[str]:
    if not isinstance(backends, dict):
        return [f"  {backends}"]
    lines = []
    width = max((len(str(n)) for n in backends), default=0)
    for name, info in backends.items():
        info = info if isinstance(info, dict) else {}
        available = bool(info.get("available"))
        lines.append(f"  {str(name).ljust(width)}  "
                     f"{'available' if available else 'not available'}")
        for reason in info.get("reasons") or []:
            lines.append(f"  {' ' * width}    - {reason}")
    return lines


def _routing_lines(routing: Any) -> list[str]:
    if not isinstance(routing, list):
        return [f"  {routing}"]
    rows = [(str(r.get("problem", "")), str(r.get("backend", "")), str(r.get("variant", "")))
            for r in routing if isinstance(r, dict)]
    if not rows:
        return ["  (none)"]
    notes = [f"  note ({r.get('problem', '')}): {note}" for r in routing
             if isinstance(r, dict) for note in r.get("notes") or ()]
    return _table(("problem", "backend", "variant"), rows, last_width=72) + notes


def _generic_lines(value: Any) -> list[str]:
    text = json.dumps(value, indent=2, default=str)
    return ["  " + line for line in text.splitlines()]


def render_report(report: dict) -> str:
    """Readable text of a :func:`collect_report` dict (tolerates missing keys)."""
    caps = report.get("capabilities") or {}
    origin = report.get("probe_origin")
    title = (f"portattn {report.get('portattn_version', '?')} report "
             f"(schema {report.get('schema', '?')})")
    out = [title, "=" * len(title), ""]

    plat = report.get("platform") or {}
    python = _or_dash(plat.get("python"))
    if plat.get("implementation"):
        python += f" ({plat['implementation']})"
    out += ["Platform", *_rows([("python", python), ("os", _or_dash(plat.get("os"))),
                                ("machine", _or_dash(plat.get("machine")))]), ""]
    out += ["Libraries", *_library_lines(caps), ""]
    devices = report.get("devices")
    if isinstance(devices, list) and len(devices) > 1:  # a section per GPU
        for entry in devices:
            entry = entry if isinstance(entry, dict) else {}
            current = " (current)" if entry.get("device_index") == caps.get(
                "device_index") else ""
            out += [f"Device cuda:{entry.get('device_index', '?')}{current}",
                    *_device_lines(entry), *_capability_lines(entry), ""]
    else:
        out += ["Device", *_device_lines(caps), ""]
    origin_text = _ORIGIN_TEXT.get(str(origin), _or_dash(origin))
    disk = report.get("disk_cache") or {}
    if disk and origin in ("probed", "disk-cache", "memory"):
        if not disk.get("enabled"):
            origin_text += " (disk cache off)"
        elif disk.get("problem"):
            origin_text += f" (disk cache unusable: {disk['problem']})"
        else:
            origin_text += f" (disk cache: {disk.get('dir', '?')})"
    if origin == "disk-cache":  # an answer of an earlier process, maybe before a fix
        origin_text += "; `portattn report --refresh` probes again"
    heading = "Capabilities"
    if isinstance(devices, list) and len(devices) > 1:
        heading += f" of the current device (cuda:{caps.get('device_index', '?')})"
    out += [heading, f"  origin: {origin_text}", *_capability_lines(caps), ""]

    out += ["Settings", "  environment variables portattn reads (portattn --help explains each)",
            *_settings_lines(report), ""]

    if "backends" in report:
        out += ["Backends", *_backend_lines(report["backends"]), ""]
    if "routing" in report:
        out += ["Routing", *_routing_lines(report["routing"]), ""]
    known = set(RESERVED_KEYS) | {"backends", "routing"}
    for name, value in report.items():
        if name not in known:
            out += [name.replace("_", " ").capitalize(), *_generic_lines(value), ""]
    return "\n".join(out).rstrip() + "\n"


# ------------------------------------------------------------------------------ CLI


def build_parser(prog: str = "python -m portattn.capabilities.report") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Print what portattn can use on this machine.",
        epilog=settings.help_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--refresh", action="store_true",
                        help="ignore cached probe results and probe again")
    parser.add_argument("--simulate", metavar="PROFILE", default=None,
                        help="report a simulated profile instead (e.g. sm90, gfx942, "
                             "sm80+fa2); default: $PORTATTN_SIMULATE")
    return parser


def main(argv: list[str] | None = None, *,
         extra_sections: Callable[[Capabilities], dict] | None = None,
         prog: str | None = None) -> int:
    """Run the report command; returns the exit status (0 ok, 2 bad arguments).

    ``extra_sections(caps)`` may add sections (``backends``, ``routing``) to the report.
    """
    from portattn.capabilities.probe import probe

    parser = build_parser(prog) if prog else build_parser()
    args = parser.parse_args(argv)
    try:
        caps = probe(args.simulate, refresh=args.refresh)
    except ValueError as exc:  # unknown profile, bad override value
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    extras = extra_sections(caps) if extra_sections is not None else None
    report = collect_report(caps, extra_sections=extras)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render_report(report), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
