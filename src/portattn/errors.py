"""Exceptions raised by portattn.

Two kinds of failure reach users:

* :class:`InputError` -- an argument is malformed (shape, dtype, device, layout,
  out-of-range lengths). The message names the argument, what was expected and what came.
  It subclasses ``ValueError`` so generic handlers keep working.
* :class:`UnsupportedError` -- the call is well formed but no backend (or the forced one)
  can serve it. ``reasons`` maps each backend considered to the sentences explaining why.

An unknown backend name is both (:class:`UnknownBackendError`).
"""

from __future__ import annotations


class PortattnError(Exception):
    """Base class of every exception portattn raises on purpose."""


class InputError(PortattnError, ValueError):
    """An argument does not have the shape, dtype, device, layout or range expected."""

    def __init__(self, argument: str, expected: str, got: str):
        self.argument = argument
        self.expected = expected
        self.got = got
        # the message set as BaseException.__init__ would: torch.compile (Dynamo 2.11)
        # cannot trace that call here, and the raise then failed as its own error
        self.args = (f"{argument}: expected {expected}, got {got}",)

    def __reduce__(self):  # pickle / copy rebuild it from its own arguments, not the text
        return type(self), (self.argument, self.expected, self.got)


class UnsupportedError(PortattnError, RuntimeError):
    """No backend (or the explicitly requested one) can serve this call.

    ``reasons`` maps backend name -> list of human readable sentences.
    """

    def __init__(self, message: str, reasons: dict[str, list[str]] | None = None):
        self.reasons: dict[str, list[str]] = dict(reasons or {})
        lines = [message]
        for name, why in self.reasons.items():
            lines.append(f"  {name}:")
            lines.extend(f"    - {reason}" for reason in why)
        self.args = ("\n".join(lines),)  # as InputError's message


class UnknownBackendError(InputError, UnsupportedError):
    """A backend name no registered backend has (``backend=`` or ``PORTATTN_BACKEND``):
    an :class:`InputError` naming the argument or variable, and an
    :class:`UnsupportedError` (no backend serves a call forced onto it), so handlers
    written for either catch it."""

    def __init__(self, argument: str, name: str, known: list[str]):
        self.name, self.known = name, list(known)
        self.reasons = {}  # as an UnsupportedError: InputError's __init__ does not chain
        super().__init__(argument, f"auto or a registered backend ({', '.join(known)})",
                         repr(name))

    def __reduce__(self):
        return type(self), (self.argument, self.name, self.known)
