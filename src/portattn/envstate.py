"""Old home of the decision fingerprint; everything now lives in :mod:`portattn.settings`.

Kept only so that ``portattn.api`` (edited on another branch) imports unchanged until the
merge switches it to ``portattn.settings``; delete this module then.
"""

from __future__ import annotations

from portattn.settings import DECISION_NAMES as DECISION_VARIABLES
from portattn.settings import VALIDATE_INDEX, VALIDATE_VALUES, decision_environment

__all__ = ["DECISION_VARIABLES", "VALIDATE_INDEX", "VALIDATE_VALUES", "decision_environment"]
