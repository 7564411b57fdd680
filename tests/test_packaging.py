"""Packaging: one version, a license file matching the declared license, type
information, and a typed public API."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import portattn

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = (ROOT / "pyproject.toml").read_text()


def test_version_is_defined_once_in_the_package():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    config = tomllib.loads(PYPROJECT)
    assert "version" not in config["project"] and "version" in config["project"]["dynamic"]
    assert config["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "portattn.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]|rc|\.dev)?\d*", portattn.__version__)


def test_license_file_matches_the_declared_license():
    assert re.search(r'^license = \{ text = "Apache-2.0" \}$', PYPROJECT, re.MULTILINE)
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n")
    assert "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a pointer to it
    assert len(text) > 10_000


def test_type_information_ships_with_the_package():
    assert (ROOT / "src" / "portattn" / "py.typed").exists()
    assert re.search(r'^portattn = \["py.typed"\]$', PYPROJECT, re.MULTILINE)
    assert "[tool.mypy]" in PYPROJECT and "[tool.ruff]" in PYPROJECT


def _unannotated(obj, where: str) -> list[str]:
    missing = []
    signature = inspect.signature(obj)
    for name, param in signature.parameters.items():
        if name in ("self", "cls"):
            continue
        if param.annotation is inspect.Parameter.empty:
            missing.append(f"{where}({name})")
    if signature.return_annotation is inspect.Signature.empty and \
            not where.endswith("__init__"):
        missing.append(f"{where} -> ?")
    return missing


#: Public names whose module belongs to another branch, with what is left to annotate
#: there (strict: the test fails once they are typed, so the entry must go).
NOT_YET_TYPED: dict[str, str] = {}


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(n in NOT_YET_TYPED, strict=True,
                                            reason=NOT_YET_TYPED.get(n, "")))
    for n in portattn.__all__ if n != "__version__"])
def test_public_api_is_typed(name):
    obj = getattr(portattn, name)
    if inspect.isclass(obj):
        missing = []
        for attr, member in vars(obj).items():
            if attr.startswith("_") and attr != "__init__":
                continue
            func = member.__func__ if isinstance(member, (classmethod, staticmethod)) \
                else member
            if isinstance(func, property):
                func = func.fget
            if inspect.isfunction(func):
                missing += _unannotated(func, f"{name}.{attr}")
    else:
        missing = _unannotated(obj, name)
    assert not missing, missing
