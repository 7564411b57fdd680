"""The lazy backend registry.

Backends are named by dotted path and imported only when first considered, so
``import portattn`` never imports Triton or flash-attn. A backend whose module fails to
import is still listed, with the import error as its reason.
"""

from __future__ import annotations

import importlib
import threading

from portattn.backends.base import Backend

#: name -> "module:Class". Order here is only the listing order; priority is per arch.
BACKENDS: dict[str, str] = {
    "triton_unified": "portattn.backends.triton_unified:TritonUnified",
    "triton_diffkv": "portattn.backends.triton_diffkv:TritonDiffKV",
    "flash_attn": "portattn.backends.flash_attn:FlashAttn",
    "flash_attn_gather": "portattn.backends.flash_attn:FlashAttnGather",
    "torch_ref": "portattn.backends.torch_ref:TorchReference",
}

_loaded: dict[str, Backend | str] = {}
_lock = threading.Lock()


def backend_names() -> list[str]:
    return list(BACKENDS)


def registered_name(name: str) -> str | None:
    """The registered backend ``name`` stands for, matched without regard to case (the
    environment's values are case-insensitive, README); None when none (or several) do.
    The selector and the report's check of ``PORTATTN_BACKEND`` both ask here."""
    wanted = name.strip().lower()
    matches = [n for n in backend_names() if n.lower() == wanted]
    return matches[0] if len(matches) == 1 else None


def load_backend(name: str) -> Backend | str:
    """The backend object, or a sentence saying why it could not be imported."""
    found = _loaded.get(name)
    if found is not None:
        return found
    with _lock:
        if name not in _loaded:
            _loaded[name] = _import(name)
        return _loaded[name]


def _import(name: str) -> Backend | str:
    path = BACKENDS.get(name)
    if path is None:
        return f"unknown backend {name!r} (known: {', '.join(BACKENDS)})"
    module_name, _, class_name = path.partition(":")
    try:
        return getattr(importlib.import_module(module_name), class_name)()
    except Exception as exc:  # an optional dependency missing or broken
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"could not import {module_name}: {type(exc).__name__}: {first_line}"


def reset() -> None:
    """Forget imported backends (tests that change what is importable)."""
    with _lock:
        _loaded.clear()
