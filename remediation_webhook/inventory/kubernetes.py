"""Kubernetes inventory: a node name resolves to the Node's UID, providerID, labels and creation time."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Any

from ..actions.base import our_hold
from ..errors import InventoryUnavailable, KubeApiError, KubeNotFound, NodeNotFound
from ..kube import KubeApi
from .base import NodeIdentity

KIND = "kubernetes"


def identity_of(node: Mapping[str, Any]) -> NodeIdentity:
    meta = node.get("metadata") or {}
    spec = node.get("spec") or {}
    created = meta.get("creationTimestamp")
    created_at = None
    if isinstance(created, str) and created:
        try:
            created_at = datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
        except ValueError:
            created_at = None
    return NodeIdentity(
        name=str(meta.get("name", "")),
        uid=str(meta.get("uid") or ""),
        provider_id=str(spec.get("providerID") or ""),
        labels=MappingProxyType(dict(meta.get("labels") or {})),
        created_at=created_at,
        unschedulable=bool(spec.get("unschedulable")),
        held_by=our_hold(node),
    )


def selector_string(selector: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))


class KubernetesInventory:
    kind = KIND

    def __init__(self, kube: KubeApi) -> None:
        self._kube = kube

    async def resolve(self, name: str) -> NodeIdentity:
        try:
            return identity_of(await self._kube.read_node(name))
        except KubeNotFound as exc:
            raise NodeNotFound(f"node {name} not found") from exc
        except KubeApiError as exc:
            raise InventoryUnavailable(f"reading node {name}: {exc}") from exc

    async def pool_size(self, selector: Mapping[str, str]) -> int:
        try:
            nodes = await self._kube.list_nodes(selector_string(selector))
        except KubeApiError as exc:
            raise InventoryUnavailable(f"listing nodes: {exc}") from exc
        # Client-side too: a server that ignores the selector must not inflate the pool (and the caps).
        return sum(1 for n in nodes
                   if all(((n.get("metadata") or {}).get("labels") or {}).get(k) == v for k, v in selector.items()))

    async def ready(self) -> None:
        try:
            await self._kube.ping()
        except KubeApiError as exc:
            raise InventoryUnavailable(f"kubernetes API: {exc}") from exc

    def close(self) -> None:
        """The Kubernetes client is owned by whoever built it."""


def build(kube: KubeApi | None, raw: Mapping[str, Any]) -> KubernetesInventory:
    if kube is None:
        raise InventoryUnavailable("the kubernetes inventory needs the kubernetes: section")
    return KubernetesInventory(kube)
