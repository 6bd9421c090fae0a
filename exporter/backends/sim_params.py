"""The type of every fault parameter of a --sim-config file, checked once at start.

The simulator reads a fault's parameters on every cycle; a value of the wrong type (`count: lots`) would fail
there, once per cycle, as a traceback in a collector. Here each is checked when the file is loaded, and the error
names the file, the key and what was expected.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import ConfigError

Check = Callable[[Any], str | None]  # the value -> None if good, else what was expected


def _integer(low: int, high: int | None = None) -> Check:
    def check(value: Any) -> str | None:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
        return None if ok else f"an integer from {low}" + (f" to {high}" if high is not None else " up")
    return check


def _number(low: float, high: float | None = None) -> Check:
    def check(value: Any) -> str | None:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= low and (
            high is None or value <= high)
        return None if ok else f"a number from {low:g}" + (f" to {high:g}" if high is not None else " up")
    return check


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def _one_of(*choices: int) -> Check:
    def check(value: Any) -> str | None:
        ok = isinstance(value, int) and not isinstance(value, bool) and value in choices
        return None if ok else "one of " + ", ".join(map(str, choices))
    return check


def _text(value: Any) -> str | None:
    return None if isinstance(value, str) else "a string"


def _string_list(value: Any) -> str | None:
    return None if isinstance(value, list) and all(isinstance(v, str) for v in value) else "a list of strings"


# The keys validated elsewhere (durations, names from a closed list) are checked by sim.py itself.
PARAMS: Mapping[str, Check] = {
    "count": _integer(0),
    "rate": _number(0),
    "to": _number(-50, 200),  # degrees Celsius
    "cause": _text,
    "pending": _boolean,
    "link": _integer(0, 63),
    "counter": _text,
    "width": _one_of(1, 2, 4, 8, 16, 32),
    "generation": _integer(1, 6),
    "reasons": _string_list,
    "remove": _boolean,
    "call": _text,
    "code": _integer(0),
    "enabled": _boolean,
    "state": _text,
    "percent": _number(0, 100),
    "memory_percent": _number(0, 100),
}


def check_params(params: Mapping[str, Any], where: str) -> None:
    """Raise ConfigError naming `where.key` for the first parameter of the wrong type."""
    for key, value in params.items():
        check = PARAMS.get(key)
        problem = check(value) if check is not None else None
        if problem is not None:
            raise ConfigError(f"{where}.{key}: expected {problem}, got {value!r}")


def check_top(raw: Mapping[str, Any]) -> None:
    """The top-level values besides gpus, model, seed and faults, which sim.py checks."""
    if "driver_version" in raw and not isinstance(raw["driver_version"], str):
        raise ConfigError(f"driver_version: expected a string such as \"550.90.07\", got {raw['driver_version']!r}")
    if "cuda_version" in raw and (problem := _integer(1000)(raw["cuda_version"])) is not None:
        raise ConfigError(f"cuda_version: expected {problem} (CUDA 12.4 is 12040), got {raw['cuda_version']!r}")
    if "driver_dir" in raw:
        _check_driver_dir(raw["driver_dir"])


def _check_driver_dir(value: Any) -> None:
    # Absolute: the exporter, the fake nvidia-smi and the reset script share it from different working directories.
    if not isinstance(value, str) or not os.path.isabs(value):
        raise ConfigError(f"driver_dir: expected an absolute path to a directory, got {value!r}")
    if os.path.exists(value) and not os.path.isdir(value):
        raise ConfigError(f"driver_dir: {value} exists and is not a directory")
