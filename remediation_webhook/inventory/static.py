"""A fixed list of nodes from the config file: for labs, VM-only fleets and benchmarks.

  inventory:
    kind: static
    nodes:
      gpu-001: {uid: 6c4e..., provider_id: "aws:///us-east-1a/i-0abc...", labels: {pool: h100}}
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from ..errors import ConfigError, NodeNotFound
from ..kube import KubeApi
from ..models import valid_node_name
from .base import NodeIdentity

KIND = "static"


class StaticInventory:
    kind = KIND

    def __init__(self, nodes: Mapping[str, NodeIdentity]) -> None:
        self._nodes = dict(nodes)

    async def resolve(self, name: str) -> NodeIdentity:
        try:
            return self._nodes[name]
        except KeyError:
            raise NodeNotFound(f"node {name} not in the static inventory") from None

    async def pool_size(self, selector: Mapping[str, str]) -> int:
        return sum(1 for n in self._nodes.values() if all(n.labels.get(k) == v for k, v in selector.items()))

    async def ready(self) -> None:
        return None

    def close(self) -> None:
        return None


def parse_nodes(raw: Mapping[str, Any], key: str) -> dict[str, NodeIdentity]:
    nodes = raw.get("nodes") or {}
    if not isinstance(nodes, dict):
        raise ConfigError(f"{key}.nodes: expected a mapping of node name to {{uid, provider_id, labels}}")
    out: dict[str, NodeIdentity] = {}
    for name, spec in nodes.items():
        k = f"{key}.nodes.{name}"
        if not valid_node_name(name):
            raise ConfigError(f"{k}: not a Kubernetes node name")
        spec = spec or {}
        if not isinstance(spec, dict) or set(spec) - {"uid", "provider_id", "labels"}:
            raise ConfigError(f"{k}: expected uid, provider_id and labels")
        labels = spec.get("labels") or {}
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise ConfigError(f"{k}.labels: expected a mapping of strings")
        out[name] = NodeIdentity(name=name, uid=str(spec.get("uid") or name), provider_id=str(spec.get("provider_id") or ""),
                                 labels=MappingProxyType(dict(labels)))
    return out


def validate(raw: Mapping[str, Any], key: str) -> None:
    parse_nodes(raw, key)


def build(kube: KubeApi | None, raw: Mapping[str, Any]) -> StaticInventory:
    return StaticInventory(parse_nodes(raw, "inventory"))
