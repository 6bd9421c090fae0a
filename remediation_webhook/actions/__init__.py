"""Actions, discovered by module: adding an action is one module here (defining ACTION) plus its test."""

from __future__ import annotations

import importlib
import pkgutil

from .base import (
    KNOWN_ACTIONS,
    Action,
    ActionContext,
    ActionFactory,
    Observation,
    Outcome,
    StepResult,
)

__all__ = ["KNOWN_ACTIONS", "Action", "ActionContext", "ActionFactory", "Observation", "Outcome", "StepResult",
           "discover"]


def discover() -> dict[str, ActionFactory]:
    """Action name -> class, for every sibling module that defines ACTION."""
    found: dict[str, ActionFactory] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        cls = getattr(module, "ACTION", None)
        if cls is not None:
            found[cls.name] = cls
    return found
