"""Reading a YAML config file and small validators for its values, shared by the exporter's config files and the
webhook's config.

Each raises ``error`` (gpu_health_common's ConfigError unless the caller passes its own class) with a message that
starts with the key or file it was given, so every package keeps its own exception type and the same wording.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


def read_yaml(path: str, what: str, *, error: type[Exception] = ConfigError) -> Any:
    """The parsed YAML file at ``path``; an unreadable or invalid file raises ``error`` naming ``what``."""
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except OSError as exc:
        raise error(f"{what}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise error(f"{what}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})") from exc
    except yaml.YAMLError as exc:
        raise error(f"{what}: not valid YAML: {exc}") from exc


def read_text(path: Path, key: str, *, error: type[Exception] = ConfigError) -> str:
    """A small text file (a token, a password) as UTF-8; unreadable or not UTF-8 raises ``error`` naming ``key``."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"{key}: {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise error(f"{key}: {path}: not UTF-8 text (offset {exc.start})") from exc


def mapping(value: object, key: str, *, error: type[Exception] = ConfigError) -> dict[Any, Any]:
    """A mapping, or {} for a missing (None) value; the caller checks the keys."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise error(f"{key}: expected a mapping, got {type(value).__name__}")
    return value


def string(value: object, key: str, *, error: type[Exception] = ConfigError) -> str:
    if not isinstance(value, str):
        raise error(f"{key}: expected a string, got {value!r}")
    return value


def boolean(value: object, key: str, *, error: type[Exception] = ConfigError) -> bool:
    if not isinstance(value, bool):
        raise error(f"{key}: expected true or false, got {value!r}")
    return value


def strings(value: object, key: str, *, error: type[Exception] = ConfigError) -> tuple[str, ...]:
    """A list of strings, or () for a missing (None) value; an item's error names it as key[i]."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise error(f"{key}: expected a list of strings, got {value!r}")
    return tuple(string(v, f"{key}[{i}]", error=error) for i, v in enumerate(value))


def existing_file(value: object, key: str, base: Path, *, error: type[Exception] = ConfigError) -> Path:
    """``base / value`` (an absolute value wins over base), which must be an existing file."""
    path = base / string(value, key, error=error)
    if not path.is_file():
        raise error(f"{key}: no such file {str(path)!r}")
    return path
