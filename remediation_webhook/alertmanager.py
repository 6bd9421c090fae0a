"""Alertmanager API v2 client: is this alert occurrence still active, not silenced or inhibited, and is it
really the alert Alertmanager has under this fingerprint (the same labels)?

A silence added in Alertmanager between delivery and action is a human veto: the step is cancelled. In HA the
webhook asks every peer: a silence or inhibition on any peer is a veto, an alert active on any peer is active,
and one peer down is not a veto; all peers down is (fail closed).
"""

from __future__ import annotations

import asyncio
import base64
import enum
import re
import ssl
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, Protocol

import aiohttp

from .config import AlertmanagerConfig, redact_url
from .errors import AlertmanagerUnavailable


class AlertState(str, enum.Enum):
    ACTIVE = "active"
    GONE = "gone"  # resolved, expired, or never seen by this Alertmanager
    SILENCED = "silenced"
    INHIBITED = "inhibited"
    UNPROCESSED = "unprocessed"  # just arrived; Alertmanager has not run silences and inhibitions yet
    # Not known, but Alertmanager started less than RESTART_GRACE ago: Prometheus re-sends its firing alerts
    # every resend_delay (1m by default), so "not known" does not mean "resolved" yet.
    RESTARTED = "restarted"
    # Alertmanager has an alert with this fingerprint but other labels: ours is forged or corrupted.
    MISMATCH = "mismatch"


# Several peers answered differently: the first of these wins (vetoes first, then what lets the step go on,
# then what makes it wait, then what ends it).
_PRECEDENCE = (AlertState.SILENCED, AlertState.INHIBITED, AlertState.ACTIVE, AlertState.UNPROCESSED,
               AlertState.RESTARTED, AlertState.MISMATCH, AlertState.GONE)


RESTART_GRACE = 150.0
_RFC3339 = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$")


def parse_time(text: str) -> datetime:
    """Go's RFC 3339 with nanoseconds ("2026-11-29T11:53:00.123456789Z"), which datetime does not take as is."""
    m = _RFC3339.match(text)
    if m is None:
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    tz = "+00:00" if m.group(3) == "Z" else m.group(3)
    return datetime.fromisoformat(m.group(1) + (m.group(2) or ".0")[:7] + tz)


class AlertChecker(Protocol):
    async def state(self, fingerprint: str, alertname: str, node: str,
                    labels: Mapping[str, str] | None = None) -> AlertState: ...

    async def active_for_node(self, node: str) -> list[dict[str, Any]]: ...

    async def close(self) -> None: ...


def _matcher(name: str, value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'{name}="{escaped}"'


class AlertmanagerClient:
    """One Alertmanager (one peer of an HA cluster: `url`, default the first configured)."""

    def __init__(self, config: AlertmanagerConfig, url: str = "") -> None:
        self._config = config
        self._url = url or config.url
        self.url = redact_url(self._url)  # as it is shown in errors, logs and the journal
        self._session: aiohttp.ClientSession | None = None
        headers = {}
        if config.bearer_token:
            headers["Authorization"] = f"Bearer {config.bearer_token}"
        elif config.basic_auth:
            user, pw = config.basic_auth
            headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()
        self._headers = headers

    def _ssl(self) -> ssl.SSLContext | bool:
        if self._config.insecure_skip_verify:
            return False
        if self._config.ca_file:
            return ssl.create_default_context(cafile=self._config.ca_file)
        return True

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._config.timeout), headers=self._headers,
                connector=aiohttp.TCPConnector(ssl=self._ssl(), limit=8))
        return self._session

    async def _alerts(self, filters: list[str]) -> list[dict[str, Any]]:
        params = [("active", "true"), ("silenced", "true"), ("inhibited", "true"), ("unprocessed", "true")]
        params += [("filter", f) for f in filters]
        try:
            async with self._get_session().get(f"{self._url}/api/v2/alerts", params=params,
                                               allow_redirects=False) as resp:
                if resp.status != 200:
                    raise AlertmanagerUnavailable(f"GET {self.url}/api/v2/alerts: HTTP {resp.status}")
                data = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise AlertmanagerUnavailable(redact_url(f"GET {self.url}/api/v2/alerts: {type(exc).__name__}: {exc}")) \
                from exc
        if not isinstance(data, list):
            raise AlertmanagerUnavailable(f"GET {self.url}/api/v2/alerts: expected a list")
        return [a for a in data if isinstance(a, dict)]

    async def state(self, fingerprint: str, alertname: str, node: str,
                    labels: Mapping[str, str] | None = None) -> AlertState:
        for alert in await self._alerts([_matcher("alertname", alertname), _matcher("node", node)]):
            if alert.get("fingerprint") != fingerprint:
                continue
            if labels is not None and alert.get("labels") != dict(labels):
                return AlertState.MISMATCH
            status = alert.get("status") or {}
            if status.get("silencedBy"):
                return AlertState.SILENCED
            if status.get("inhibitedBy"):
                return AlertState.INHIBITED
            if status.get("state") == "active":
                return AlertState.ACTIVE
            if status.get("state") == "unprocessed":
                return AlertState.UNPROCESSED
            return AlertState.SILENCED  # "suppressed" without a reason we know: treat as a veto
        if await self._started_recently():
            return AlertState.RESTARTED
        return AlertState.GONE

    async def _started_recently(self) -> bool:
        """Alertmanager's /api/v2/status `uptime` is the time it started (RFC 3339)."""
        try:
            async with self._get_session().get(f"{self._url}/api/v2/status", allow_redirects=False) as resp:
                if resp.status != 200:
                    raise AlertmanagerUnavailable(f"GET {self.url}/api/v2/status: HTTP {resp.status}")
                data = await resp.json(content_type=None)
            started = parse_time(str(data["uptime"]))
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as exc:
            raise AlertmanagerUnavailable(redact_url(f"GET {self.url}/api/v2/status: {type(exc).__name__}: {exc}")) \
                from exc
        return (datetime.now(timezone.utc) - started).total_seconds() < RESTART_GRACE

    async def active_for_node(self, node: str) -> list[dict[str, Any]]:
        return [a for a in await self._alerts([_matcher("node", node)])
                if (a.get("status") or {}).get("state") in ("active", "unprocessed")]

    async def ready(self) -> None:
        await self._alerts(['alertname="gpu-health-webhook-readiness-probe"'])

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class Alertmanagers:
    """Every configured Alertmanager peer, asked together; an AlertChecker."""

    def __init__(self, config: AlertmanagerConfig, peers: Sequence[AlertChecker] | None = None) -> None:
        self.peers: list[AlertChecker] = list(peers) if peers is not None else [
            AlertmanagerClient(config, url) for url in config.urls]

    async def _ask(self, call: Any) -> list[Any]:
        results = await asyncio.gather(*(call(p) for p in self.peers), return_exceptions=True)
        answers = [r for r in results if not isinstance(r, BaseException)]
        errors = [r for r in results if isinstance(r, BaseException)]
        for error in errors:
            if not isinstance(error, AlertmanagerUnavailable):
                raise error
        if not answers:
            raise AlertmanagerUnavailable(f"no Alertmanager answered ({len(errors)} of {len(self.peers)} down): "
                                          + "; ".join(str(e) for e in errors)[:1000])
        return answers

    async def state(self, fingerprint: str, alertname: str, node: str,
                    labels: Mapping[str, str] | None = None) -> AlertState:
        answers: list[AlertState] = await self._ask(lambda p: p.state(fingerprint, alertname, node, labels))
        return min(answers, key=_PRECEDENCE.index)

    async def active_for_node(self, node: str) -> list[dict[str, Any]]:
        seen: dict[str, dict[str, Any]] = {}
        for alerts in await self._ask(lambda p: p.active_for_node(node)):
            for alert in alerts:
                seen.setdefault(str(alert.get("fingerprint", id(alert))), alert)
        return list(seen.values())

    async def close(self) -> None:
        for peer in self.peers:
            await peer.close()
