"""Bare metal "replace" is a human: open a record and keep the node cordoned and drained.

The record is the journal step (detail), a count in gpu_remediation_provider_events_total{kind="human_handoff"},
the remediation parked in NEEDS_HUMAN, and, when `notify_url` is set, one JSON POST to it:

  {"remediation_id": ..., "node": ..., "provider_id": ..., "action": "replace", "reason": ...}

  providers:
    human: {notify_url: "https://tickets.example/hooks/gpu", bearer_token_file: /etc/gpu-health/ticket-token,
            timeout: 10s}
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from ..actions.base import Observation
from ..errors import ConfigError
from ..inventory.base import NodeIdentity
from . import InstanceRef, ProviderError, ProviderResult, duration, only_keys, opt


class HumanProvider:
    name: ClassVar[str] = "human"

    def __init__(self, notify_url: str = "", token: str = "", timeout: float = 10.0) -> None:
        self.notify_url = notify_url
        self._token = token
        self.timeout = timeout

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], key: str) -> HumanProvider:
        only_keys(raw, key, {"notify_url", "bearer_token_file", "timeout"})
        url = opt(raw, key, "notify_url", str, "")
        if url and not url.startswith(("http://", "https://")):
            raise ConfigError(f"{key}.notify_url: expected an http(s) URL")
        token = ""
        if raw.get("bearer_token_file"):
            path = Path(str(raw["bearer_token_file"]))
            if not path.is_file():
                raise ConfigError(f"{key}.bearer_token_file: no such file {str(path)!r}")
            token = path.read_text(encoding="utf-8").strip()
        return cls(url, token, duration(raw, key, "timeout", "10s"))

    async def resolve(self, node: NodeIdentity) -> InstanceRef:
        return InstanceRef("human", node.name, extra={"provider_id": node.provider_id})

    async def replace(self, ref: InstanceRef, rid: str, reason: str) -> ProviderResult:
        sent = ""
        if self.notify_url:
            import aiohttp

            body = {"remediation_id": rid, "node": ref.instance_id, "provider_id": ref.extra.get("provider_id", ""),
                    "action": "replace", "reason": reason}
            headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout)) as session, \
                        session.post(self.notify_url, json=body, headers=headers) as resp:
                    if resp.status >= 300:
                        raise ProviderError("failed", f"notification webhook answered {resp.status}; the record is "
                                                      f"in the journal only")
            except aiohttp.ClientError as exc:
                raise ProviderError("unavailable", f"notification webhook unreachable: {exc}") from exc
            sent = "; notification sent"
        return ProviderResult(f"replacement record opened for a human: node {ref.instance_id} stays cordoned and "
                              f"drained until someone replaces the hardware and closes remediation {rid}{sent}")

    async def replaced(self, ref: InstanceRef, rid: str, since: float | None = None) -> Observation:
        return Observation.NOT_DONE  # a second record carries the same remediation id

    async def reboot(self, ref: InstanceRef, rid: str, reason: str) -> ProviderResult:
        raise ProviderError("unsupported", "the human provider only replaces")

    move = mark_unhealthy = reboot

    async def tag(self, ref: InstanceRef, tags: Mapping[str, str]) -> None:
        return None


PROVIDER = HumanProvider
