"""Finding and importing DCGM's own Python bindings.

They are not on PyPI: they ship with DCGM (package datacenter-gpu-manager-4-core on DCGM 4,
datacenter-gpu-manager on DCGM 3) as plain modules in one directory, importing each other by
top-level name (`import dcgm_structs`), so that directory has to be on sys.path. It is appended, not
prepended: the directory also holds generic names (utils.py, logger.py in a source checkout) that must
not shadow anything the exporter imports. Each module is checked to come from the chosen directory.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Final

from ...errors import BackendUnavailable

DEFAULT_PATHS: Final = (
    "/usr/share/datacenter-gpu-manager-4/bindings/python3",  # DCGM 4 (datacenter-gpu-manager-4-core)
    "/usr/local/dcgm/bindings/python3",  # DCGM 3 and older (datacenter-gpu-manager)
)
REQUIRED: Final = ("pydcgm", "dcgm_structs", "dcgm_fields", "dcgm_agent", "dcgmvalue")
OPTIONAL: Final = ("dcgm_errors",)
PACKAGES: Final = "datacenter-gpu-manager-4-core (DCGM 4) or datacenter-gpu-manager (DCGM 3)"


@dataclass(frozen=True)
class Bindings:
    """The imported binding modules, and where they came from."""

    path: str
    pydcgm: ModuleType
    dcgm_structs: ModuleType
    dcgm_fields: ModuleType
    dcgm_agent: ModuleType
    dcgmvalue: ModuleType
    dcgm_errors: ModuleType | None


def load_bindings(path: str | None = None) -> Bindings:
    """Import pydcgm, dcgm_structs, dcgm_fields, dcgm_agent (and dcgmvalue, dcgm_errors) from `path`,
    or from the first default location that has them.

    Raises BackendUnavailable naming every directory searched and the package that provides them.
    """
    candidates = [path] if path else list(DEFAULT_PATHS)
    problems: list[str] = []
    for candidate in candidates:
        directory = os.path.abspath(candidate)
        if not os.path.isdir(directory):
            problems.append(f"{candidate} (no such directory)")
            continue
        missing = [m for m in REQUIRED if not os.path.isfile(os.path.join(directory, m + ".py"))]
        if missing:
            problems.append(f"{candidate} (missing {', '.join(m + '.py' for m in missing)})")
            continue
        return _import_from(directory, candidate)
    where = "--dcgm.bindings-path" if path else "the default locations"
    raise BackendUnavailable(
        f"DCGM Python bindings (pydcgm.py, dcgm_structs.py, dcgm_fields.py, dcgm_agent.py) not found; searched "
        f"{where}: {'; '.join(problems)}. They ship with DCGM, not PyPI: install {PACKAGES}, or point "
        f"--dcgm.bindings-path at the directory holding pydcgm.py"
    )


def _import_from(directory: str, shown: str) -> Bindings:
    if directory not in sys.path:
        sys.path.append(directory)
    modules: dict[str, ModuleType | None] = {}
    for name in (*REQUIRED, *OPTIONAL):
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            if name in OPTIONAL:
                modules[name] = None
                continue
            raise BackendUnavailable(f"DCGM Python bindings in {shown}: cannot import {name}: {exc}") from exc
        except Exception as exc:  # the bindings run code at import time (library loading, version checks)
            raise BackendUnavailable(f"DCGM Python bindings in {shown}: importing {name} failed: {exc!r}") from exc
        origin = os.path.dirname(os.path.abspath(getattr(module, "__file__", "") or ""))
        if origin != directory:
            raise BackendUnavailable(
                f"DCGM Python bindings: {name} was imported from {origin or 'a built-in module'}, not from {shown}; "
                "another copy shadows the bindings (one process can load only one set)"
            )
        modules[name] = module
    _check_library(modules["dcgm_structs"], shown)
    return Bindings(path=directory, **modules)  # type: ignore[arg-type]


def _check_library(dcgm_structs: ModuleType | None, shown: str) -> None:
    """The bindings are a ctypes wrapper: without libdcgm.so they import fine and fail on first use."""
    load = getattr(dcgm_structs, "_LoadDcgmLibrary", None)
    if load is None:
        return
    try:
        load()
    except Exception as exc:
        raise BackendUnavailable(
            f"DCGM Python bindings found in {shown}, but libdcgm could not be loaded ({exc}); install {PACKAGES} "
            "matching the bindings' major version"
        ) from exc
