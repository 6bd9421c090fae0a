"""Slurm: drain, reboot and resume one node through `scontrol` (argument lists, never a shell), or through
slurmrestd with a JWT (drain and resume only).

  drain   scontrol update NodeName=<node> State=DRAIN Reason=<sanitised>
          POST /slurm/v0.0.41/node/<node> {"state": ["DRAIN"], "reason": "<sanitised>"}
  reboot  scontrol reboot ASAP nextstate=RESUME reason=<sanitised> <node>   (ASAP drains first)
          REST: unsupported -- slurmrestd has no reboot operation (see _slurmrest.py for the source read)
  resume  scontrol update NodeName=<node> State=RESUME
          POST /slurm/v0.0.41/node/<node> {"state": ["RESUME"]}
  show    scontrol show node -o <node>  |  GET /slurm/v0.0.41/node/<node>
  nodes   scontrol show node -o         |  GET /slurm/v0.0.41/nodes    (the Slurm inventory's pool)
  ping    scontrol ping                 |  GET /slurm/v0.0.41/ping     (the Slurm inventory's readiness)

`NodeName` accepts host-list expressions (gpu[001-512], a,b): a node name is checked against a strict pattern
(letters, digits, '.', '_' and '-', at most 63) before any call, and `scontrol show node -o <node>` (or the GET)
must return exactly that one node. Reasons are printable ASCII, no newlines, bounded, prefixed gpu-health:.

  providers:
    slurm: {scontrol: /usr/bin/scontrol, timeout: 30s}
  or
    slurm:
      rest: {url: https://slurmrestd:6820, token_file: /run/secrets/slurm-jwt, user: slurm,
             api_version: v0.0.41, ca_file: /etc/ssl/slurm-ca.pem, timeout: 30s}

`scontrol` and `rest` are alternatives. The token file is re-read on every call (rotation works) and the token is
sent as X-SLURM-USER-TOKEN, never logged nor put in an error message.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import Mapping
from typing import Any, ClassVar

from ..actions.base import Observation
from ..errors import ConfigError
from ..inventory.base import NodeIdentity
from . import InstanceRef, ProviderError, ProviderResult, duration, only_keys, opt
from ._slurmrest import SlurmRest

SLURM_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def valid_slurm_node(name: object) -> bool:
    return isinstance(name, str) and SLURM_NODE.fullmatch(name) is not None


def sanitise_reason(text: str, rid: str) -> str:
    clean = "".join(c if 32 <= ord(c) < 127 and c not in "\"'\\=" else " " for c in text)
    return f"gpu-health:{rid[:16]}:{' '.join(clean.split())}"[:200]


def parse_show(text: str) -> list[dict[str, str]]:
    """`scontrol show node -o` output: one line per node, space-separated Key=Value."""
    records = []
    for line in text.splitlines():
        if not line.strip():
            continue
        rec: dict[str, str] = {}
        for m in re.finditer(r"(\w+)=(\S*)", line):
            rec.setdefault(m[1], m[2])
        records.append(rec)
    return records


class SlurmProvider:
    name: ClassVar[str] = "slurm"

    def __init__(self, scontrol: str = "scontrol", timeout: float = 30.0, rest: SlurmRest | None = None) -> None:
        self.scontrol = scontrol
        self.timeout = timeout
        self.rest = rest

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], key: str) -> SlurmProvider:
        only_keys(raw, key, {"scontrol", "timeout", "rest"})
        timeout = duration(raw, key, "timeout", "30s")
        if "rest" in raw:
            if "scontrol" in raw:
                raise ConfigError(f"{key}.rest: scontrol and rest are alternatives; set one of them (reboots "
                                  f"need scontrol)")
            rest_raw = raw["rest"]
            if isinstance(rest_raw, Mapping) and "timeout" not in rest_raw and "timeout" in raw:
                rest_raw = {**rest_raw, "timeout": raw["timeout"]}
            return cls(timeout=timeout, rest=SlurmRest.from_config(rest_raw, f"{key}.rest"))
        exe = opt(raw, key, "scontrol", str, "scontrol")
        if not exe or any(c.isspace() for c in exe):
            raise ConfigError(f"{key}.scontrol: a path or command name without spaces")
        return cls(exe, timeout)

    async def run(self, *args: str) -> str:
        exe = shutil.which(self.scontrol) or self.scontrol
        try:
            proc = await asyncio.create_subprocess_exec(exe, *args, stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.PIPE)
        except OSError as exc:
            raise ProviderError("unavailable", f"cannot run {self.scontrol}: {exc}") from exc
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self.timeout)
        except TimeoutError as exc:
            proc.kill()
            await proc.wait()
            raise ProviderError("unavailable", f"scontrol {args[0]} timed out after {self.timeout:.0f}s") from exc
        if proc.returncode != 0:
            msg = err.decode(errors="replace").strip()[:300]
            low = msg.lower()
            if "invalid node name" in low or "not found" in low:
                raise ProviderError("not_found", f"slurm: {msg}")
            if "permission" in low or "access denied" in low or "authentication" in low or "user" in low and "not" in low:
                raise ProviderError("auth", f"slurm refused: {msg}; run the webhook as a Slurm operator")
            if "slurm_load" in low or "unable to contact" in low or "timed out" in low:
                raise ProviderError("unavailable", f"slurmctld unreachable: {msg}")
            raise ProviderError("failed", f"scontrol {args[0]} failed ({proc.returncode}): {msg}")
        return out.decode(errors="replace")

    def _node(self, name: str) -> str:
        if not valid_slurm_node(name):
            raise ProviderError("invalid", f"{name[:80]!r} is not a single Slurm node name (no host lists, "
                                           f"brackets, commas, spaces or '='); nothing was called")
        return name

    async def show(self, name: str) -> dict[str, str]:
        node = self._node(name)
        if self.rest is not None:
            return await self.rest.show(node)
        records = parse_show(await self.run("show", "node", "-o", node))
        if len(records) != 1 or records[0].get("NodeName") != node:
            raise ProviderError("not_found", f"slurm: `scontrol show node {node}` returned {len(records)} records")
        return records[0]

    async def nodes(self) -> list[dict[str, str]]:
        """Every node, as `scontrol show node -o` records (NodeName, State, Partitions, BootTime, Reason...)."""
        if self.rest is not None:
            return await self.rest.nodes()
        return parse_show(await self.run("show", "node", "-o"))

    async def ping(self) -> None:
        """ProviderError unless a slurmctld answers: `scontrol ping` exits 1 when none is UP; over REST, GET /ping."""
        if self.rest is not None:
            await self.rest.ping()
            return
        await self.run("ping")

    async def resolve(self, node: NodeIdentity) -> InstanceRef:
        await self.show(node.name)
        return InstanceRef("slurm", node.name)

    async def drain(self, ref: InstanceRef, rid: str, reason: str) -> ProviderResult:
        node = self._node(ref.instance_id)
        if self.rest is not None:
            await self.rest.update(node, {"state": ["DRAIN"], "reason": sanitise_reason(reason, rid)})
            return ProviderResult(f"slurm node {node} set to DRAIN (slurmrestd)")
        await self.run("update", f"NodeName={node}", "State=DRAIN", f"Reason={sanitise_reason(reason, rid)}")
        return ProviderResult(f"slurm node {node} set to DRAIN")

    async def resume(self, ref: InstanceRef) -> ProviderResult:
        node = self._node(ref.instance_id)
        if self.rest is not None:
            await self.rest.update(node, {"state": ["RESUME"]})
            return ProviderResult(f"slurm node {node} resumed (slurmrestd)")
        await self.run("update", f"NodeName={node}", "State=RESUME")
        return ProviderResult(f"slurm node {node} resumed")

    async def reboot(self, ref: InstanceRef, rid: str, reason: str) -> ProviderResult:
        node = self._node(ref.instance_id)
        if self.rest is not None:
            raise ProviderError("unsupported", f"slurm: slurmrestd cannot reboot a node ({node} untouched): it has "
                                               f"no reboot operation and slurmctld refuses state REBOOT_REQUESTED in a "
                                               f"node update; configure providers.slurm.scontrol instead of "
                                               f"providers.slurm.rest for reboots, or use reboot with using: "
                                               f"executor")
        await self.show(node)
        await self.run("reboot", "ASAP", "nextstate=RESUME", f"reason={sanitise_reason(reason, rid)}", node)
        return ProviderResult(f"slurm will reboot {node} once its jobs finish (ASAP), then resume it")

    async def replace(self, ref: InstanceRef, rid: str, reason: str) -> ProviderResult:
        raise ProviderError("unsupported", "slurm cannot replace hardware; use replace with using: human")

    move = mark_unhealthy = replace

    async def replaced(self, ref: InstanceRef, rid: str, since: float | None = None) -> Observation:
        return Observation.NOT_DONE

    async def tag(self, ref: InstanceRef, tags: Mapping[str, str]) -> None:
        return None


PROVIDER = SlurmProvider
