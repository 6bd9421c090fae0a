"""The inventory seam: how an alert's `node` label becomes a machine identity.

Kubernetes is the first inventory. A Slurm or VM-only inventory is one more module in this package that
defines KIND and build(); nothing in the core changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol


@dataclass(frozen=True)
class NodeIdentity:
    """What the inventory says a node is. Two identities with different uid are different machines."""

    name: str
    uid: str
    provider_id: str = ""
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    created_at: float | None = None  # unix seconds; None if the inventory cannot tell
    unschedulable: bool = False
    # The remediation whose cordon (or taint, or Slurm drain) of ours the node carries: its id ("" if none of
    # ours; Slurm keeps only its first 16 characters); None if the inventory cannot tell (static).
    held_by: str | None = None


class Inventory(Protocol):
    """Resolves node names; raises NodeNotFound or InventoryUnavailable."""

    kind: str

    async def resolve(self, name: str) -> NodeIdentity: ...

    async def pool_size(self, selector: Mapping[str, str]) -> int:
        """How many nodes match the selector: the denominator of every percentage cap."""
        ...

    async def ready(self) -> None:
        """Raise InventoryUnavailable unless the inventory answers."""
        ...

    def close(self) -> None: ...
