"""Small text helpers shared by the probe modules and the data model's error messages
(no torch, no Triton)."""

from __future__ import annotations


def cut_line(text: str, limit: int) -> str:
    """``text`` on one line (every run of whitespace, line breaks included, becomes one
    space; none is left at either end), cut to ``limit`` characters, the last three
    ``...`` when cut."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``"TypeName: message"`` on one line, cut to ``limit`` characters (:func:`cut_line`)."""
    return cut_line(f"{type(exc).__name__}: {exc}", limit)
