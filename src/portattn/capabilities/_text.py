"""Small text helpers shared by the probe modules (no torch, no Triton)."""

from __future__ import annotations


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``"TypeName: message"`` with whitespace collapsed, cut to ``limit`` characters."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
