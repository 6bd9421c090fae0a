"""Kubernetes-native replace: let the node's own lifecycle controller get a new machine.

  karpenter    the node has label karpenter.sh/nodepool and an owner NodeClaim (karpenter.sh/v1): DELETE the
               NodeClaim (cluster-scoped); Karpenter drains, terminates the instance and provisions anew.
  cluster_api  the node has annotations cluster.x-k8s.io/machine and cluster.x-k8s.io/cluster-namespace: DELETE
               the Machine (cluster.x-k8s.io/v1beta1, namespaced), after checking a MachineSet owns it (else
               nothing would create a replacement: kind "unsupported", no call).

Both go through the official client's CustomObjectsApi with the webhook's `kubernetes:` settings and are
verified by the object being gone (its finalizers ran: the instance is terminated) within `timeout`. A delete
that answers 404 means an earlier attempt already did it. Only `replace` exists; other verbs are "unsupported".

  providers:
    karpenter: {timeout: 15m, poll_interval: 10s}
    cluster_api: {timeout: 20m, poll_interval: 10s}

RBAC: deploy/iam/k8s-native-rbac.yaml (get/delete nodeclaims; get/delete machines; get nodes).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

from ..actions.base import Observation
from ..errors import ConfigError, KubeApiError
from ..inventory.base import NodeIdentity
from ..kube import KubernetesApi, KubernetesSettings
from . import InstanceRef, ProviderError, ProviderResult, duration, only_keys

DNS_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
RBAC_FILE = "deploy/iam/k8s-native-rbac.yaml"
NODEPOOL_LABEL = "karpenter.sh/nodepool"
MACHINE_ANN = "cluster.x-k8s.io/machine"
CLUSTER_NS_ANN = "cluster.x-k8s.io/cluster-namespace"


class CustomObjects(KubernetesApi):
    """KubernetesApi plus the CustomObjectsApi verbs (same thread pool and error mapping)."""

    def __init__(self, settings: KubernetesSettings) -> None:
        from kubernetes import client

        super().__init__(settings, workers=2)
        self._custom = client.CustomObjectsApi(self._api_client)

    async def get(self, group: str, version: str, plural: str, name: str, namespace: str = "") -> dict[str, Any]:
        if namespace:
            return await self._call(self._custom.get_namespaced_custom_object, group, version, namespace, plural,  # type: ignore[no-any-return]
                                    name)
        return await self._call(self._custom.get_cluster_custom_object, group, version, plural, name)  # type: ignore[no-any-return]

    async def delete(self, group: str, version: str, plural: str, name: str, namespace: str = "") -> None:
        if namespace:
            await self._call(self._custom.delete_namespaced_custom_object, group, version, namespace, plural, name,
                             propagation_policy="Background")
        else:
            await self._call(self._custom.delete_cluster_custom_object, group, version, plural, name,
                             propagation_policy="Background")


def classify(exc: KubeApiError, what: str) -> ProviderError:
    status = int(getattr(exc, "status", 0) or 0)
    if status in (401, 403):
        return ProviderError("auth", f"Kubernetes refused {what} ({exc}); grant the webhook's service account the "
                                     f"rules in {RBAC_FILE}", code=str(status))
    if status == 404:
        return ProviderError("not_found", f"{what}: not found ({exc})", code="404")
    if status == 429:
        return ProviderError("throttled", f"{what}: {exc}", code="429")
    if status == 0 or status >= 500:
        return ProviderError("unavailable", f"{what}: API server unavailable ({exc})", code=str(status))
    return ProviderError("failed", f"{what}: {exc}", code=str(status))


class _Native:
    name: ClassVar[str] = ""
    group: ClassVar[str] = ""
    version: ClassVar[str] = ""
    plural: ClassVar[str] = ""

    def __init__(self, *, timeout: float = 900.0, poll_interval: float = 10.0,
                 kubernetes: KubernetesSettings | None = None) -> None:
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.kubernetes = kubernetes
        self._api: CustomObjects | None = None

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], key: str) -> Any:
        only_keys(raw, key, {"timeout", "poll_interval"})
        return cls(timeout=duration(raw, key, "timeout", "15m"),
                   poll_interval=duration(raw, key, "poll_interval", "10s"))

    def bind_kubernetes(self, settings: KubernetesSettings | None, key: str) -> None:
        if settings is None:
            raise ConfigError(f"{key}: needs the kubernetes: section (it deletes {self.plural} through the API)")
        self.kubernetes = settings

    @property
    def api(self) -> CustomObjects:
        if self._api is None:
            if self.kubernetes is None:
                raise ProviderError("unsupported", f"{self.name}: no kubernetes: settings")
            self._api = CustomObjects(self.kubernetes)
        return self._api

    def close(self) -> None:
        if self._api is not None:
            self._api.close()
            self._api = None

    async def _node(self, node: NodeIdentity) -> dict[str, Any]:
        try:
            return await self.api.read_node(node.name)
        except KubeApiError as exc:
            raise classify(exc, f"get node {node.name}") from exc

    async def _get(self, ref: InstanceRef) -> dict[str, Any] | None:
        try:
            return await self.api.get(self.group, self.version, self.plural, ref.instance_id, ref.zone)
        except KubeApiError as exc:
            if int(getattr(exc, "status", 0) or 0) == 404:
                return None
            raise classify(exc, f"get {self.plural} {ref.instance_id}") from exc

    async def _delete_and_wait(self, ref: InstanceRef, rid: str) -> ProviderResult:
        what = f"{self.plural}.{self.group} {ref.zone + '/' if ref.zone else ''}{ref.instance_id}"
        try:
            await self.api.delete(self.group, self.version, self.plural, ref.instance_id, ref.zone)
            sent = "deleted"
        except KubeApiError as exc:
            if int(getattr(exc, "status", 0) or 0) != 404:
                raise classify(exc, f"delete {what}") from exc
            sent = "already gone"
        deadline = time.monotonic() + self.timeout
        while await self._get(ref) is not None:
            if time.monotonic() > deadline:
                raise ProviderError("failed", f"{what} still exists {self.timeout:.0f}s after the delete (its "
                                              f"finalizer has not finished: check the controller's logs, a "
                                              f"do-not-disrupt annotation or a blocking PodDisruptionBudget)")
            await asyncio.sleep(self.poll_interval)
        return ProviderResult(f"{what} {sent} and its finalizers ran: the controller replaces the machine",
                              new_host=True, operation=f"{self.group}/{self.version}/{self.plural}/{ref.instance_id}")

    async def replace(self, ref: InstanceRef, rid: str, reason: str) -> ProviderResult:
        self._check(ref)
        return await self._delete_and_wait(ref, rid)

    async def replaced(self, ref: InstanceRef, rid: str, since: float | None = None) -> Observation:
        self._check(ref)
        return Observation.DONE if await self._get(ref) is None else Observation.NOT_DONE

    def _check(self, ref: InstanceRef) -> None:
        if ref.provider != self.name or not DNS_NAME.fullmatch(ref.instance_id) \
                or (ref.zone and not DNS_NAME.fullmatch(ref.zone)):
            raise ProviderError("invalid", f"{ref.describe()} is not a valid {self.plural} reference")

    async def reboot(self, ref: InstanceRef, rid: str, reason: str) -> ProviderResult:
        raise ProviderError("unsupported", f"{self.name} only replaces (delete the {self.plural})")

    move = mark_unhealthy = reboot

    async def tag(self, ref: InstanceRef, tags: Mapping[str, str]) -> None:
        return None


class KarpenterProvider(_Native):
    name: ClassVar[str] = "karpenter"
    group, version, plural = "karpenter.sh", "v1", "nodeclaims"

    async def resolve(self, node: NodeIdentity) -> InstanceRef:
        body = await self._node(node)
        meta = body.get("metadata") or {}
        pool = (meta.get("labels") or {}).get(NODEPOOL_LABEL, "")
        owners = [o for o in meta.get("ownerReferences") or [] if o.get("kind") == "NodeClaim"
                  and str(o.get("apiVersion", "")).startswith("karpenter.sh/")]
        if not pool or not owners:
            raise ProviderError("unsupported", f"node {node.name} is not Karpenter-managed (needs label "
                                               f"{NODEPOOL_LABEL} and an owner NodeClaim); not touched")
        claim = str(owners[0].get("name", ""))
        if not DNS_NAME.fullmatch(claim):
            raise ProviderError("invalid", f"node {node.name}: owner NodeClaim name {claim[:100]!r} is malformed")
        return InstanceRef("karpenter", claim, group=pool, extra=MappingProxyType({"node": node.name}))


class ClusterApiProvider(_Native):
    name: ClassVar[str] = "cluster_api"
    group, version, plural = "cluster.x-k8s.io", "v1beta1", "machines"

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], key: str) -> Any:
        only_keys(raw, key, {"timeout", "poll_interval"})
        return cls(timeout=duration(raw, key, "timeout", "20m"),
                   poll_interval=duration(raw, key, "poll_interval", "10s"))

    async def resolve(self, node: NodeIdentity) -> InstanceRef:
        body = await self._node(node)
        ann = (body.get("metadata") or {}).get("annotations") or {}
        machine, namespace = str(ann.get(MACHINE_ANN, "")), str(ann.get(CLUSTER_NS_ANN, ""))
        if not machine or not namespace:
            raise ProviderError("unsupported", f"node {node.name} is not a Cluster API node (needs annotations "
                                               f"{MACHINE_ANN} and {CLUSTER_NS_ANN}); not touched")
        if not DNS_NAME.fullmatch(machine) or not DNS_NAME.fullmatch(namespace) or len(namespace) > 63:
            raise ProviderError("invalid", f"node {node.name}: Machine {namespace[:70]!r}/{machine[:100]!r} is "
                                           f"malformed")
        return InstanceRef("cluster_api", machine, zone=namespace, extra=MappingProxyType({"node": node.name}))

    async def replace(self, ref: InstanceRef, rid: str, reason: str) -> ProviderResult:
        self._check(ref)
        machine = await self._get(ref)
        if machine is None:
            return ProviderResult(f"Machine {ref.zone}/{ref.instance_id} is already gone", new_host=True)
        owners = [o for o in (machine.get("metadata") or {}).get("ownerReferences") or []
                  if o.get("kind") == "MachineSet"]
        if not owners:
            raise ProviderError("unsupported", f"Machine {ref.zone}/{ref.instance_id} has no owner MachineSet "
                                               f"(control plane or standalone): nothing would recreate it; not "
                                               f"deleted")
        return await self._delete_and_wait(ref, rid)


PROVIDERS = (KarpenterProvider, ClusterApiProvider)
