"""Inventories, discovered by module: each module here defines KIND and build(kube, raw_section)."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

from ..kube import KubeApi
from .base import Inventory, NodeIdentity

__all__ = ["Inventory", "NodeIdentity", "discover", "build_inventory"]


def discover() -> dict[str, ModuleType]:
    """Inventory kind -> module, for every sibling module that defines KIND."""
    found: dict[str, ModuleType] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        kind = getattr(module, "KIND", None)
        if isinstance(kind, str):
            found[kind] = module
    return found


def build_inventory(kind: str, kube: KubeApi | None, raw: Mapping[str, Any]) -> Inventory:
    build: Callable[[KubeApi | None, Mapping[str, Any]], Inventory] = discover()[kind].build
    return build(kube, raw)
