"""Slurm inventory: alert `node` labels are Slurm NodeNames, resolved with `scontrol show node -o <name>`.

  inventory:
    kind: slurm
    scontrol: /usr/bin/scontrol   # optional
    partition: gpu                # optional: the pool (percentage caps) is this partition's nodes

The identity's uid is the NodeName plus its BootTime, so a rebooted or re-provisioned node is "another machine"
only when Slurm says it booted again. Hostile names (host lists, brackets, commas, spaces) never reach scontrol.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from ..errors import ConfigError, InventoryUnavailable, NodeNotFound
from ..kube import KubeApi
from ..providers import ProviderError
from ..providers.slurm import SlurmProvider, parse_show, valid_slurm_node
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
        return NodeIdentity(name=name, uid=f"{name}@{rec.get('BootTime', '')}", provider_id=f"slurm://{name}",
                            labels=MappingProxyType({"slurm.partitions": rec.get("Partitions", "")}),
                            created_at=None,  # BootTime changes on reboot: it is not a creation time
                            unschedulable="DRAIN" in state)

    async def pool_size(self, selector: Mapping[str, str]) -> int:
        args = ["show", "node", "-o"]
        try:
            records = parse_show(await self.slurm.run(*args))
        except ProviderError as exc:
            raise InventoryUnavailable(exc.detail) from exc
        if self.partition:
            records = [r for r in records if self.partition in r.get("Partitions", "").split(",")]
        return len(records)

    async def ready(self) -> None:
        try:
            await self.slurm.run("ping")
        except ProviderError as exc:
            raise InventoryUnavailable(exc.detail) from exc

    def close(self) -> None:
        return None


def validate(raw: Mapping[str, Any], key: str) -> None:
    unknown = set(raw) - {"kind", "scontrol", "partition"}
    if unknown:
        raise ConfigError(f"{key}.{sorted(unknown)[0]}: unknown key")
    part = raw.get("partition", "")
    if part and not valid_slurm_node(part):
        raise ConfigError(f"{key}.partition: not a partition name")
    SlurmProvider.from_config({k: v for k, v in raw.items() if k == "scontrol"}, key)


def build(kube: KubeApi | None, raw: Mapping[str, Any]) -> SlurmInventory:
    validate(raw, "inventory")
    slurm = SlurmProvider.from_config({k: v for k, v in raw.items() if k == "scontrol"}, "inventory")
    return SlurmInventory(slurm, str(raw.get("partition", "")))
