"""Dispatch: ``Problem`` -> ``Decision`` through a lazy registry and per-arch priorities."""

from portattn.dispatch.problem import Problem
from portattn.dispatch.selector import Decision, decide, decision_cache

__all__ = ["Problem", "Decision", "decide", "decision_cache"]
