"""Alertmanager's webhook body (version "4"): tolerant of unknown fields, strict on the types of known ones.

Structure errors (not JSON, wrong types, missing required fields, unknown version) raise PayloadError and
the receiver answers 400. Label *values* are a different matter: a well-formed alert whose `node` label is
not a Kubernetes node name is judged on its own (rejected and journaled) so that one hostile alert cannot
make Alertmanager re-send a whole group for ever.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

from .errors import PayloadError

# RFC 1123 subdomain, as Kubernetes validates node names (IsDNS1123Subdomain): at most 253 characters.
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_GPU_INDEX = re.compile(r"[0-9]{1,4}")
# nvidia-smi prints GPU-<8>-<4>-<4>-<4>-<12> hex; only the GPU- prefix and hex digits and dashes are required.
_GPU_UUID = re.compile(r"GPU-[0-9a-fA-F][0-9a-fA-F-]{0,63}")
_FINGERPRINT = re.compile(r"[0-9a-fA-F]{1,64}")
# RFC 3339 as Go's time.Time marshals it: fractional seconds optional, Z or a numeric offset.
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})")
_MAX_ALERTS = 10_000
ZERO_TIME = datetime(1, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert of a notification; `status` is this alert's own status, not the group's."""

    status: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    starts_at: datetime
    ends_at: datetime
    generator_url: str
    fingerprint: str

    @property
    def starts_key(self) -> str:
        """startsAt normalised to UTC seconds: with the fingerprint, it names one occurrence."""
        return self.starts_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    @property
    def alertname(self) -> str:
        return self.labels.get("alertname", "")

    @property
    def labels_hash(self) -> str:
        return labels_hash(self.labels)


@dataclass(frozen=True, slots=True)
class Notification:
    """A webhook delivery: one Alertmanager aggregation group, firing and resolved alerts mixed."""

    version: str
    receiver: str
    status: str
    group_key: str
    truncated_alerts: int
    external_url: str
    alerts: tuple[Alert, ...]


@dataclass(frozen=True, slots=True)
class Target:
    """The validated identity an alert names: a node, and for per-GPU alerts the GPU index and UUID."""

    node: str
    gpu: str = ""
    uuid: str = ""


def labels_hash(labels: Mapping[str, str]) -> str:
    """A digest of an alert's full label set. With the fingerprint and startsAt it names one occurrence: an alert
    that reuses another's fingerprint with other labels is another occurrence (and a conflict), not a duplicate."""
    text = json.dumps(dict(labels), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def valid_node_name(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 253 and _DNS1123_SUBDOMAIN.fullmatch(value) is not None


def target_of(alert: Alert) -> Target | str:
    """The alert's validated target, or the reason it has none (the text is safe to log and journal)."""
    if not all(encodable(k) and encodable(v) for m in (alert.labels, alert.annotations) for k, v in m.items()):
        return "a label or annotation is not valid Unicode (a lone surrogate)"
    if sum(len(k) + len(v) for k, v in alert.labels.items()) > MAX_LABELS_BYTES:
        return f"labels longer than {MAX_LABELS_BYTES} characters"
    node = alert.labels.get("node")
    if node is None:
        return "no node label"
    if not valid_node_name(node):
        return "node label is not a Kubernetes node name (RFC 1123 subdomain, at most 253 characters)"
    gpu = alert.labels.get("gpu", "")
    if gpu and not _GPU_INDEX.fullmatch(gpu):
        return "gpu label is not a GPU index (digits)"
    uuid = alert.labels.get("uuid", "")
    if uuid and not _GPU_UUID.fullmatch(uuid):
        return "uuid label is not a GPU UUID (GPU-<hex>)"
    return Target(node=node, gpu=gpu, uuid=uuid)


def printable(value: str, limit: int = 200) -> str:
    """A bounded, control-character-free rendering of untrusted text, for logs, audit rows and Events (lone
    surrogates, which no UTF-8 store or log takes, are control-free but not printable: '?')."""
    cleaned = "".join(c if c.isprintable() else "?" for c in value[:limit])
    return cleaned + ("..." if len(value) > limit else "")


def encodable(value: str) -> bool:
    """JSON may carry lone surrogates ("\\ud800"); UTF-8 (SQLite, logs, HTTP) cannot."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# An alert's labels are a few hundred bytes; beyond this they are refused, not journaled for ever.
MAX_LABELS_BYTES = 16 * 1024


def parse_time(value: object, key: str) -> datetime:
    if not isinstance(value, str):
        raise PayloadError(f"{key}: expected an RFC 3339 timestamp string, got {type(value).__name__}")
    m = _RFC3339.fullmatch(value)
    if not m:
        raise PayloadError(f"{key}: not an RFC 3339 timestamp")
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    micro = int((m.group(7) or ".0")[1:7].ljust(6, "0"))
    zone = m.group(8)
    # RFC 3339 allows a leap second (23:59:60); datetime does not: it is the next second's start.
    leap = timedelta(seconds=1) if second == 60 else timedelta(0)
    second -= int(second == 60)
    try:
        if zone in ("Z", "z"):
            return datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC) + leap
        parsed = datetime.fromisoformat(f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}"
                                        f".{micro:06d}{zone}")
        return parsed.astimezone(UTC) + leap
    except (ValueError, OverflowError) as exc:
        raise PayloadError(f"{key}: not a valid time: {exc}") from exc


def _str(obj: Mapping[str, Any], key: str, where: str, *, required: bool = False, default: str = "") -> str:
    if key not in obj:
        if required:
            raise PayloadError(f"{where}{key}: missing")
        return default
    value = obj[key]
    if not isinstance(value, str):
        raise PayloadError(f"{where}{key}: expected a string, got {type(value).__name__}")
    return value


def _labels(obj: Mapping[str, Any], key: str, where: str, *, required: bool) -> Mapping[str, str]:
    if key not in obj:
        if required:
            raise PayloadError(f"{where}{key}: missing")
        return MappingProxyType({})
    value = obj[key]
    if not isinstance(value, dict):
        raise PayloadError(f"{where}{key}: expected an object of strings, got {type(value).__name__}")
    for k, v in value.items():
        if not isinstance(v, str):
            raise PayloadError(f"{where}{key}: value of {printable(k, 64)!r} is {type(v).__name__}, not a string")
    return MappingProxyType(dict(value))


def parse_alert(obj: object, index: int) -> Alert:
    where = f"alerts[{index}]."
    if not isinstance(obj, dict):
        raise PayloadError(f"alerts[{index}]: expected an object, got {type(obj).__name__}")
    status = _str(obj, "status", where, required=True)
    if status not in ("firing", "resolved"):
        raise PayloadError(f"{where}status: must be firing or resolved")
    fingerprint = _str(obj, "fingerprint", where, required=True)
    if not _FINGERPRINT.fullmatch(fingerprint):
        raise PayloadError(f"{where}fingerprint: expected hex digits")
    if "startsAt" not in obj:
        raise PayloadError(f"{where}startsAt: missing")
    starts_at = parse_time(obj["startsAt"], f"{where}startsAt")
    ends_at = parse_time(obj["endsAt"], f"{where}endsAt") if "endsAt" in obj else ZERO_TIME
    return Alert(
        status=status,
        labels=_labels(obj, "labels", where, required=True),
        annotations=_labels(obj, "annotations", where, required=False),
        starts_at=starts_at,
        ends_at=ends_at,
        generator_url=_str(obj, "generatorURL", where),
        fingerprint=fingerprint.lower(),
    )


def parse_notification(obj: object) -> Notification:
    """Parse a decoded JSON body; raises PayloadError naming the offending field."""
    if not isinstance(obj, dict):
        raise PayloadError(f"body: expected a JSON object, got {type(obj).__name__}")
    version = _str(obj, "version", "", required=True)
    if version != "4":
        raise PayloadError(f"version: only version \"4\" is understood, got {printable(version, 16)!r}")
    alerts = obj.get("alerts")
    if not isinstance(alerts, list):
        raise PayloadError("alerts: missing" if alerts is None else
                           f"alerts: expected a list, got {type(alerts).__name__}")
    if len(alerts) > _MAX_ALERTS:
        raise PayloadError(f"alerts: more than {_MAX_ALERTS} alerts")
    truncated = obj.get("truncatedAlerts", 0)
    if isinstance(truncated, bool) or not isinstance(truncated, int) or truncated < 0:
        raise PayloadError("truncatedAlerts: expected a non-negative integer")
    status = _str(obj, "status", "")
    if status not in ("", "firing", "resolved"):
        raise PayloadError("status: must be firing or resolved")
    for key in ("groupLabels", "commonLabels", "commonAnnotations"):
        _labels(obj, key, "", required=False)
    return Notification(
        version=version,
        receiver=_str(obj, "receiver", ""),
        status=status,
        # Stored for the record only: kept printable rather than refused.
        group_key=printable(_str(obj, "groupKey", ""), 2000),
        truncated_alerts=truncated,
        external_url=_str(obj, "externalURL", ""),
        alerts=tuple(parse_alert(a, i) for i, a in enumerate(alerts)),
    )
