"""Slurm inventory: alert `node` labels are Slurm NodeNames, resolved through the Slurm provider's transports,
`scontrol` or slurmrestd (the two are alternatives; setting both is a config error naming inventory.rest).

  inventory:
    kind: slurm
    scontrol: /usr/bin/scontrol   # optional (default: scontrol on PATH)
    partition: gpu                # optional: the pool (percentage caps) is this partition's nodes
    timeout: 30s                  # optional
  or, on a host with slurmrestd but no scontrol:
    inventory:
      kind: slurm
      rest: {url: https://slurmrestd:6820, token_file: /run/secrets/slurm-jwt, user: slurm, api_version: v0.0.41,
             ca_file: /etc/ssl/slurm-ca.pem, timeout: 30s}   # the keys of providers.slurm.rest
      partition: gpu

            scontrol                         slurmrestd
  resolve   scontrol show node -o <name>     GET /slurm/{v}/node/<name>  (exactly that one node)
  pool      scontrol show node -o            GET /slurm/{v}/nodes        (counted, of `partition` when set)
  ready     scontrol ping                    GET /slurm/{v}/ping         (not ready unless a slurmctld is UP)

The identity's uid is the NodeName plus its BootTime, so a rebooted or re-provisioned node is "another machine"
only when Slurm says it booted again; DRAIN in the state makes it unschedulable. Hostile names (host lists,
brackets, commas, spaces, '/') never reach scontrol or slurmrestd.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from ..errors import ConfigError, InventoryUnavailable, NodeNotFound
from ..kube import KubeApi
from ..providers import ProviderError
from ..providers.slurm import SlurmProvider, valid_slurm_node
from .base import NodeIdentity

KIND = "slurm"


class SlurmInventory:
    kind = KIND

    def __init__(self, slurm: SlurmProvider, partition: str = "") -> None:
        self.slurm = slurm
        self.partition = partition

    async def resolve(self, name: str) -> NodeIdentity:
        if not valid_slurm_node(name):
            raise NodeNotFound(f"{name[:80]!r} is not a single Slurm node name")
        try:
            rec = await self.slurm.show(name)
        except ProviderError as exc:
            if exc.kind == "not_found":
                raise NodeNotFound(exc.detail) from exc
            raise InventoryUnavailable(exc.detail) from exc
        state = rec.get("State", "")
        # Our drain writes Reason=gpu-health:<first 16 characters of the remediation id>:<why>.
        reason = rec.get("Reason", "")
        ours = reason.split(":")[1] if "DRAIN" in state and reason.startswith("gpu-health:") else ""
        return NodeIdentity(name=name, uid=f"{name}@{rec.get('BootTime', '')}", provider_id=f"slurm://{name}",
                            labels=MappingProxyType({"slurm.partitions": rec.get("Partitions", "")}),
                            created_at=None,  # BootTime changes on reboot: it is not a creation time
                            unschedulable="DRAIN" in state, held_by=ours if len(ours) == 16 else "")

    async def pool_size(self, selector: Mapping[str, str]) -> int:
        try:
            records = await self.slurm.nodes()
        except ProviderError as exc:
            raise InventoryUnavailable(exc.detail) from exc
        if self.partition:
            records = [r for r in records if self.partition in r.get("Partitions", "").split(",")]
        return len(records)

    async def ready(self) -> None:
        try:
            await self.slurm.ping()
        except ProviderError as exc:
            raise InventoryUnavailable(exc.detail) from exc

    def close(self) -> None:
        return None


TRANSPORT_KEYS = ("scontrol", "rest", "timeout")


def _transport(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in raw.items() if k in TRANSPORT_KEYS}


def validate(raw: Mapping[str, Any], key: str) -> None:
    unknown = set(map(str, raw)) - {"kind", "partition", *TRANSPORT_KEYS}
    if unknown:
        raise ConfigError(f"{key}.{min(unknown)}: unknown key")
    part = raw.get("partition", "")
    if part and not valid_slurm_node(part):
        raise ConfigError(f"{key}.partition: not a partition name")
    if "scontrol" in raw and "rest" in raw:
        raise ConfigError(f"{key}.rest: scontrol and rest are alternatives; set one of them")
    SlurmProvider.from_config(_transport(raw), key)


def build(kube: KubeApi | None, raw: Mapping[str, Any]) -> SlurmInventory:
    validate(raw, "inventory")
    slurm = SlurmProvider.from_config(_transport(raw), "inventory")
    return SlurmInventory(slurm, str(raw.get("partition", "")))
