"""Durations in Prometheus' notation ("500ms", "5s", "1m30s"), as every flag and config file here takes them."""

from __future__ import annotations

import re

from .errors import ConfigError

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object, key: str, *, error: type[Exception] = ConfigError) -> float:
    """Seconds from a duration string or a plain number of seconds; `error` names `key`."""
    if isinstance(value, bool):
        raise error(f"{key}: expected a duration such as 5s, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise error(f"{key}: duration must not be negative, got {value!r}")
        return float(value)
    text = str(value).strip()
    pos, total = 0, 0.0
    for m in _PART.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    if not text or pos != len(text):
        raise error(f"{key}: expected a duration such as 500ms, 5s or 1m30s, got {value!r}")
    return total
