"""Azure (azure-mgmt-compute + azure-identity; AKS pools also azure-mgmt-containerservice): VM scale set VMs, for
nodes whose providerID is azure:///subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.Compute/
virtualMachineScaleSets/<vmss>/virtualMachines/<instance id>.

  reboot   virtual_machine_scale_set_vms.begin_restart   same host
  move     virtual_machine_scale_set_vms.begin_redeploy  new host (the usual fix for bad hardware)
  replace  replace_mode: redeploy (default, new host) | reimage (same host, fresh OS disk) |
           delete (virtual_machine_scale_set_vms.begin_delete, then the scale set's capacity is put back
           explicitly with virtual_machine_scale_sets.begin_update(sku.capacity); the delete decrements it)

Every call is per instance through `virtual_machine_scale_set_vms`: never the scale-set-level reimage / restart /
redeploy / delete, which act on every VM when instance ids are omitted.

Scale sets AKS manages (a tag `aks-managed-*`, or a resource group `MC_*`) never get a VMSS call: deleting or
reimaging them behind AKS's back breaks the node pool. With `aks_cluster` (the managed cluster's resource id)
configured, replace goes through AKS's agent-pool API (api-version 2026-08-01 of azure-mgmt-containerservice):
agent_pools.begin_delete_machines(machineNames=[<node name>]), which removes the machine and lowers the pool's
count, then (unless the pool autoscales, when the cluster autoscaler brings capacity back) the pool's count is put
back (+1) with agent_pools.begin_create_or_update, the GET-then-PUT `az aks nodepool scale` does, under the pool's
eTag. The cluster's nodeResourceGroup must be the scale set's resource group, and the machine must be listed in the
pool with the node's VM, before any write. Replaces in one scale set or pool run one at a time (a lock per group).
Reboot and move on AKS nodes are refused: use the executor Job (`reboot: {using: executor}`), or replace.

Long-running operations are polled (ARM polling: Azure-AsyncOperation / Location) with `poller.result(timeout)`;
the async-operation URL is the step's `operation`. 429 (with Retry-After) and 5xx are retried by azure-core's
RetryPolicy (retry_total = max_attempts). Restart, redeploy and reimage are NOT idempotent: after a crash mid-step
`replaced` answers AMBIGUOUS and a human decides. A delete records the capacity in the scale set's tag
`gpu-health-replace-<remediation id>` before it deletes, so a re-run after a crash finishes the scale-out instead of
guessing. Blocking calls run in a thread. Permissions: deploy/iam/azure-role-definition.json.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

from ..actions.base import Observation
from ..errors import ConfigError
from ..inventory.base import NodeIdentity
from . import (
    AZ_GUID,
    AZ_INSTANCE,
    AZ_NAME,
    InstanceRef,
    ProviderError,
    ProviderResult,
    duration,
    only_keys,
    opt,
    ref_of_node,
)

IAM_FILE = "deploy/iam/azure-role-definition.json"
AKS_IAM_FILE = "deploy/iam/azure-aks-role-definition.json"
MARKER_TAG = "gpu-health-replace"  # + "-<remediation id>": the capacity before our delete, while one is in flight
AKS_POOL_LABEL = "kubernetes.azure.com/agentpool"
AKS_CLUSTER = re.compile(r"/subscriptions/([^/]+)/resourceGroups/([^/]+)/providers/Microsoft\.ContainerService/"
                         r"managedClusters/([^/]+)", re.IGNORECASE)
AKS_POOL = re.compile(r"[a-z][a-z0-9]{0,11}")  # AKS agent pool names: lowercase letters and digits, at most 12
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
CAPACITY = ("AllocationFailed", "ZonalAllocationFailed", "OverconstrainedAllocationRequest", "SkuNotAvailable")
AUTH = ("AuthorizationFailed", "AuthenticationFailed", "InvalidAuthenticationToken", "LinkedAuthorizationFailed",
        "InvalidAuthenticationTokenTenant", "ExpiredAuthenticationToken")


def _code(exc: Any) -> str:
    err = getattr(exc, "error", None)
    return str(getattr(err, "code", "") or "")


def classify(exc: Exception, what: str) -> ProviderError:
    """Any azure-core / azure-identity failure -> ProviderError with an operator-facing message."""
    from azure.core import exceptions as aexc

    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, aexc.ClientAuthenticationError) and getattr(exc, "status_code", None) is None:
        return ProviderError("auth", f"{what}: no Azure token ({str(exc)[:200]}); set up Azure Workload Identity "
                                     f"for the webhook's service account", code="NoCredentials")
    if isinstance(exc, aexc.HttpResponseError):
        status = int(exc.status_code or 0)
        code = _code(exc)
        message = str(getattr(getattr(exc, "error", None), "message", "") or exc.message or exc)[:300]
        if status in (401, 403) or code in AUTH:
            role, scope = (AKS_IAM_FILE, "cluster's") if what.startswith("AKS") else (IAM_FILE, "scale set's")
            return ProviderError("auth", f"Azure refused {what} ({status or ''} {code}: {message}); assign the "
                                         f"role in {role} to the webhook's identity at the {scope} scope",
                                 code=code or str(status))
        if status == 404 or code in ("ResourceNotFound", "NotFound", "ParentResourceNotFound"):
            return ProviderError("not_found", f"{what}: not found ({code}: {message})", code=code or "404")
        if status == 429:
            return ProviderError("throttled", f"{what}: still throttled after retries (429 {code}); lower the "
                                              f"webhook's rate limits or retry later", code=code or "429")
        # OperationNotAllowed is a quota refusal only when it says so; AKS also uses it for "another operation
        # is in progress", which is no capacity problem.
        if any(c in code or c in message for c in CAPACITY) or (code == "OperationNotAllowed"
                                                                and "quota" in message.lower()):
            return ProviderError("capacity", f"{what}: {code}: {message}", code=code)
        if status >= 500 and status != 0:
            return ProviderError("unavailable", f"{what}: Azure answered {status} after retries ({code}: "
                                                f"{message}); the outcome is unknown", code=code or str(status))
        return ProviderError("failed", f"{what}: {code or status or 'error'}: {message}", code=code or str(status))
    if isinstance(exc, aexc.ServiceRequestError | aexc.ServiceResponseError | OSError):
        return ProviderError("unavailable", f"{what}: Azure Resource Manager unreachable: {str(exc)[:200]}")
    if isinstance(exc, TimeoutError):
        return ProviderError("failed", f"{what}: {str(exc)[:200]}")
    return ProviderError("failed", f"{what}: {type(exc).__name__}: {str(exc)[:200]}")


def _get(obj: Any, *path: str) -> Any:
    for name in path:
        if obj is None:
            return None
        # SDK models expose flattened attributes; the newer ones are also Mappings of the raw ARM JSON.
        value = getattr(obj, name, None)
        if value is None and isinstance(obj, Mapping):
            value = obj.get(name)
        obj = value
    return obj


class AzureProvider:
    name: ClassVar[str] = "azure"
    sdk: ClassVar[tuple[tuple[str, str], ...]] = (("azure.mgmt.compute", "azure-mgmt-compute"),
                                                   ("azure.identity", "azure-identity"))

    def __init__(self, *, base_url: str = "", ca_file: str = "", replace_mode: str = "redeploy",
                 allowed_scale_sets: tuple[str, ...] = (), aks_cluster: str = "", max_attempts: int = 5,
                 retry_base: float = 0.8, operation_timeout: float = 1800.0, polling_interval: float = 15.0,
                 call_timeout: float = 60.0, credential: Any = None) -> None:
        self.base_url = base_url
        self.ca_file = ca_file
        self.replace_mode = replace_mode
        self.allowed_scale_sets = allowed_scale_sets
        self.aks_cluster = aks_cluster
        self.max_attempts = max_attempts
        self.retry_base = retry_base
        self.operation_timeout = operation_timeout
        self.polling_interval = polling_interval
        self.call_timeout = call_timeout
        self.credential = credential
        self._clients: dict[tuple[str, str], Any] = {}
        # One replace at a time per scale set / agent pool: each reads the capacity, deletes one machine and puts
        # one back, and two interleaved would lose a machine. The webhook runs as a single replica.
        self._locks: dict[str, asyncio.Lock] = {}

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], key: str) -> AzureProvider:
        only_keys(raw, key, {"base_url", "ca_file", "replace_mode", "allowed_scale_sets", "aks_cluster",
                             "max_attempts", "retry_base", "operation_timeout", "polling_interval", "call_timeout"})
        base = opt(raw, key, "base_url", str, "")
        if base and not base.startswith("https://"):
            raise ConfigError(f"{key}.base_url: expected an https URL (bearer tokens are never sent over http)")
        mode = opt(raw, key, "replace_mode", str, "redeploy")
        if mode not in ("redeploy", "reimage", "delete"):
            raise ConfigError(f"{key}.replace_mode: redeploy, reimage or delete")
        sets = raw.get("allowed_scale_sets") or []
        if not isinstance(sets, list) or not all(isinstance(s, str) for s in sets):
            raise ConfigError(f"{key}.allowed_scale_sets: expected a list of VM scale set names")
        aks = opt(raw, key, "aks_cluster", str, "")
        m = AKS_CLUSTER.fullmatch(aks)
        if aks and not (m and AZ_GUID.fullmatch(m[1]) and AZ_NAME.fullmatch(m[2]) and AZ_NAME.fullmatch(m[3])):
            raise ConfigError(f"{key}.aks_cluster: expected the managed cluster's resource id, /subscriptions/<guid>/"
                              f"resourceGroups/<rg>/providers/Microsoft.ContainerService/managedClusters/<name>")
        if aks:
            try:
                import azure.mgmt.containerservice  # noqa: F401
            except ImportError as exc:
                raise ConfigError(f"{key}.aks_cluster: needs azure-mgmt-containerservice (pip install "
                                  f"'gpu-health[azure]')") from exc
        attempts = opt(raw, key, "max_attempts", int, 5)
        if attempts < 1:
            raise ConfigError(f"{key}.max_attempts: at least 1")
        return cls(base_url=base, ca_file=opt(raw, key, "ca_file", str, ""), replace_mode=mode,
                   allowed_scale_sets=tuple(sets), aks_cluster=aks, max_attempts=attempts,
                   retry_base=duration(raw, key, "retry_base", "800ms"),
                   operation_timeout=duration(raw, key, "operation_timeout", "30m"),
                   polling_interval=duration(raw, key, "polling_interval", "15s"),
                   call_timeout=duration(raw, key, "call_timeout", "60s"))

    # ------------------------------------------------------------------------------------------ plumbing

    def client(self, subscription: str, kind: str = "compute") -> Any:
        if (kind, subscription) not in self._clients:
            if kind == "aks":
                from azure.mgmt.containerservice import ContainerServiceClient as cls
            else:
                from azure.mgmt.compute import ComputeManagementClient as cls

            if self.credential is None:
                from azure.identity import DefaultAzureCredential

                self.credential = DefaultAzureCredential()  # Workload Identity in AKS, managed identity on VMs
            kwargs: dict[str, Any] = {"retry_total": self.max_attempts - 1, "retry_backoff_factor": self.retry_base,
                                      "polling_interval": self.polling_interval,
                                      "connection_timeout": self.call_timeout, "read_timeout": self.call_timeout,
                                      "user_agent": "gpu-health-webhook"}
            if self.base_url:
                kwargs["base_url"] = self.base_url
            if self.ca_file:
                kwargs["connection_verify"] = self.ca_file
            self._clients[(kind, subscription)] = cls(self.credential, subscription, **kwargs)
        return self._clients[(kind, subscription)]

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    async def call(self, ref: InstanceRef, group: str, op: str, what: str, *args: Any, kind: str = "compute",
                   **kwargs: Any) -> Any:
        try:
            fn = getattr(getattr(self.client(ref.project, kind), group), op)
            return await asyncio.to_thread(lambda: fn(*args, **kwargs))
        except Exception as exc:
            raise classify(exc, what) from exc

    async def lro(self, ref: InstanceRef, op: str, what: str, *args: Any, group: str = "virtual_machine_scale_set_vms",
                  kind: str = "compute", **kwargs: Any) -> str:
        """Start a long-running operation and poll it to the end; returns its async-operation URL."""
        poller = await self.call(ref, group, op, what, *args, kind=kind, **kwargs)
        url = ""
        try:
            headers = poller.polling_method()._initial_response.http_response.headers
            url = str(headers.get("Azure-AsyncOperation") or headers.get("Location") or "")
        except AttributeError:
            pass
        try:
            await asyncio.to_thread(poller.result, self.operation_timeout)
        except Exception as exc:
            raise classify(exc, f"{what} (operation {url or '?'})") from exc
        if not poller.done():
            raise ProviderError("failed", f"{what}: not finished within {self.operation_timeout:.0f}s; follow "
                                          f"{url or 'the activity log'}")
        return url

    # ------------------------------------------------------------------------------------------ verbs

    async def resolve(self, node: NodeIdentity) -> InstanceRef:
        ref = ref_of_node(node, "azure", "an Azure VM scale set VM")
        # AKS names a machine after its node, and labels the node with its agent pool.
        extra = {"machine": node.name, "pool": str(node.labels.get(AKS_POOL_LABEL, ""))}
        return InstanceRef(ref.provider, ref.instance_id, zone=ref.zone, project=ref.project,
                           resource_group=ref.resource_group, scale_set=ref.scale_set, extra=MappingProxyType(extra))

    def _check(self, ref: InstanceRef) -> None:
        if ref.provider != "azure" or not ref.scale_set:
            raise ProviderError("unsupported", f"{ref.describe()} is not a VM scale set VM (standalone VMs are not "
                                               f"supported)")
        if not (AZ_GUID.fullmatch(ref.project) and AZ_NAME.fullmatch(ref.resource_group)
                and AZ_NAME.fullmatch(ref.scale_set) and AZ_INSTANCE.fullmatch(ref.instance_id)):
            raise ProviderError("invalid", f"{ref.describe()}: a part failed validation")

    async def _scale_set(self, ref: InstanceRef) -> tuple[Any, str]:
        """Read the scale set: (its model or None, the AKS agent pool it backs or "")."""
        self._check(ref)
        if self.allowed_scale_sets and ref.scale_set not in self.allowed_scale_sets:
            raise ProviderError("unsupported", f"scale set {ref.scale_set} is not in "
                                               f"providers.azure.allowed_scale_sets; not touched")
        vmss = None
        if not ref.resource_group.upper().startswith("MC_"):  # AKS's node resource group: not even a read
            vmss = await self.call(ref, "virtual_machine_scale_sets", "get", f"get scale set {ref.scale_set}",
                                   ref.resource_group, ref.scale_set)
        tags = _tags(vmss)
        if vmss is not None and not any(k.lower().startswith("aks-managed-") for k in tags):
            return vmss, ""
        pool = ref.extra.get("pool") or next((v for k, v in tags.items() if k.lower() == "aks-managed-poolname"), "")
        return vmss, pool or "?"

    async def _not_aks(self, ref: InstanceRef, verb: str) -> Any:
        vmss, pool = await self._scale_set(ref)
        if pool:
            raise ProviderError("unsupported", f"scale set {ref.scale_set} in {ref.resource_group} belongs to AKS "
                                               f"agent pool {pool}: a VMSS {verb} would bypass AKS. Use reboot with using: executor (the "
                                               f"node Job), or replace (AKS agentPools/deleteMachines); not touched")
        return vmss

    async def _vm(self, ref: InstanceRef) -> Any:
        return await self.call(ref, "virtual_machine_scale_set_vms", "get",
                               f"get {ref.scale_set}/{ref.instance_id}", ref.resource_group, ref.scale_set,
                               ref.instance_id)

    def _args(self, ref: InstanceRef) -> tuple[str, str, str]:
        return ref.resource_group, ref.scale_set, ref.instance_id

    async def tag(self, ref: InstanceRef, tags: Mapping[str, str]) -> None:
        """Not written: tagging one VMSS VM means a PUT of its whole model (a model change). The journal and the
        async-operation URL are the record."""
        return

    async def reboot(self, ref: InstanceRef, rid: str, reason: str) -> ProviderResult:
        await self._not_aks(ref, "restart")
        url = await self.lro(ref, "begin_restart", f"restart {ref.scale_set}/{ref.instance_id}", *self._args(ref))
        return ProviderResult(f"restarted VMSS VM {ref.scale_set}/{ref.instance_id} (same host)", operation=url)

    async def move(self, ref: InstanceRef, rid: str, reason: str) -> ProviderResult:
        await self._not_aks(ref, "redeploy")
        url = await self.lro(ref, "begin_redeploy", f"redeploy {ref.scale_set}/{ref.instance_id}", *self._args(ref))
        return ProviderResult(f"redeployed VMSS VM {ref.scale_set}/{ref.instance_id}: it runs on a new host",
                              new_host=True, operation=url)

    async def mark_unhealthy(self, ref: InstanceRef, rid: str, reason: str) -> ProviderResult:
        raise ProviderError("unsupported", "Azure has no mark-unhealthy for VMSS VMs; use replace (redeploy)")

    async def replaced(self, ref: InstanceRef, rid: str, since: float | None = None) -> Observation:
        """After a crash mid-replace. A delete is observable (the VM is gone, and our marker tag says whether the
        scale-out is still owed); redeploy and reimage leave no trace and carry no idempotency key, so they are
        AMBIGUOUS: a second redeploy is a second outage."""
        vmss, pool = await self._scale_set(ref)
        if pool:
            return await self._aks_replaced(ref, pool)
        if self.replace_mode != "delete":
            return Observation.AMBIGUOUS
        try:
            await self._vm(ref)
        except ProviderError as exc:
            if exc.kind != "not_found":
                raise
            owed = _marker(vmss, rid) is not None
            return Observation.NOT_DONE if owed else Observation.DONE
        return Observation.NOT_DONE

    async def replace(self, ref: InstanceRef, rid: str, reason: str) -> ProviderResult:
        vmss, pool = await self._scale_set(ref)
        if pool:
            return await self._aks_replace(ref, pool)
        if self.replace_mode == "redeploy":
            return await self.move(ref, rid, reason)
        what = f"{self.replace_mode} {ref.scale_set}/{ref.instance_id}"
        if self.replace_mode == "reimage":
            url = await self.lro(ref, "begin_reimage", what, *self._args(ref))
            return ProviderResult(f"reimaged VMSS VM {ref.scale_set}/{ref.instance_id} (same host, fresh OS disk)",
                                  operation=url)
        async with self._lock(f"vmss/{ref.project}/{ref.resource_group}/{ref.scale_set}"):
            vmss = await self._get_scale_set(ref)  # fresh, now that no other replace of ours is in flight
            return await self._delete_and_scale_out(ref, vmss, rid, what)

    async def _get_scale_set(self, ref: InstanceRef) -> Any:
        return await self.call(ref, "virtual_machine_scale_sets", "get", f"get scale set {ref.scale_set}",
                               ref.resource_group, ref.scale_set)

    async def _delete_and_scale_out(self, ref: InstanceRef, vmss: Any, rid: str, what: str) -> ProviderResult:
        owed = _marker(vmss, rid)
        url = ""
        try:
            await self._vm(ref)
        except ProviderError as exc:
            if exc.kind != "not_found" or owed is None:
                raise  # gone, and not by us: nothing to finish
        else:
            if owed is None:
                owed = int(_get(vmss, "sku", "capacity") or 0)
                await self._set_tags(ref, {**_tags(vmss), _marker_key(rid): str(owed)})
            url = await self.lro(ref, "begin_delete", what, *self._args(ref))
        after = await self._get_scale_set(ref)
        now = int(_get(after, "sku", "capacity") or 0)
        if now < owed:  # the delete took one away: put that one back, whatever else changed meanwhile
            await self.lro(ref, "begin_update", f"scale {ref.scale_set} back out to {now + 1}", ref.resource_group,
                           ref.scale_set, {"sku": {"capacity": now + 1}}, group="virtual_machine_scale_sets")
            now += 1
        await self._set_tags(ref, {k: v for k, v in _tags(after).items() if k != _marker_key(rid)})
        resumed = "" if url else " (finishing a delete interrupted by a restart)"
        return ProviderResult(f"deleted VMSS VM {ref.scale_set}/{ref.instance_id} and put its capacity back to "
                              f"{now}: a new VM is being created{resumed}", new_host=True, operation=url)

    def _lock(self, key: str) -> asyncio.Lock:
        return self._locks.setdefault(key.lower(), asyncio.Lock())

    async def _set_tags(self, ref: InstanceRef, tags: Mapping[str, str]) -> None:
        """A PATCH of the scale set's tags only: not part of the VM model, so no VM becomes out of date."""
        await self.lro(ref, "begin_update", f"tag scale set {ref.scale_set}", ref.resource_group, ref.scale_set,
                       {"tags": dict(tags)}, group="virtual_machine_scale_sets")

    # ------------------------------------------------------------------------------------------ AKS

    def _aks(self, ref: InstanceRef, pool: str) -> tuple[str, str, str, str]:
        """(cluster resource group, cluster name, pool, machine), all validated, or a refusal."""
        m = AKS_CLUSTER.fullmatch(self.aks_cluster)
        if m is None:
            raise ProviderError("unsupported", f"scale set {ref.scale_set} is managed by AKS: VMSS calls would "
                                               f"bypass AKS, so nothing was called. Set providers.azure.aks_cluster "
                                               f"to the cluster's resource id to replace through the agent-pool API "
                                               f"(agentPools/<pool>/deleteMachines)")
        machine = str(ref.extra.get("machine", ""))
        if not AKS_POOL.fullmatch(pool):
            raise ProviderError("invalid", f"AKS agent pool {pool[:40]!r} of scale set {ref.scale_set} is not a "
                                           f"valid pool name (node label {AKS_POOL_LABEL}); nothing was called")
        if not DNS_LABEL.fullmatch(machine):
            raise ProviderError("invalid", f"node name {machine[:80]!r} is not a valid AKS machine name")
        if m[1].lower() != ref.project.lower():
            raise ProviderError("unsupported", f"{ref.describe()} is in subscription {ref.project}, the AKS cluster "
                                               f"in {m[1]}; not touched")
        return m[2], m[3], pool, machine

    def _aks_ref(self, ref: InstanceRef) -> InstanceRef:
        m = AKS_CLUSTER.fullmatch(self.aks_cluster)
        assert m is not None
        return InstanceRef("azure", ref.instance_id, project=m[1], resource_group=m[2])

    async def _aks_pool(self, ref: InstanceRef, rg: str, cluster: str, pool: str) -> Any:
        return await self.call(self._aks_ref(ref), "agent_pools", "get", f"AKS get agent pool {cluster}/{pool}",
                               rg, cluster, pool, kind="aks")

    async def _aks_machine(self, ref: InstanceRef, rg: str, cluster: str, pool: str, machine: str) -> Any:
        """The machine, or None when the pool does not list it."""
        try:
            return await self.call(self._aks_ref(ref), "machines", "get", f"AKS get machine {pool}/{machine}", rg,
                                   cluster, pool, machine, kind="aks")
        except ProviderError as exc:
            if exc.kind == "not_found":
                return None
            raise

    async def _aks_replace(self, ref: InstanceRef, pool_name: str) -> ProviderResult:
        rg, cluster, pool_name, machine = self._aks(ref, pool_name)
        aks = self._aks_ref(ref)
        mc = await self.call(aks, "managed_clusters", "get", f"AKS get cluster {cluster}", rg, cluster, kind="aks")
        node_rg = str(_get(mc, "node_resource_group") or _get(mc, "properties", "nodeResourceGroup") or "")
        if node_rg.lower() != ref.resource_group.lower():
            raise ProviderError("unsupported", f"scale set {ref.scale_set} is in resource group {ref.resource_group}, "
                                               f"but AKS cluster {cluster} keeps its nodes in {node_rg or '?'}: "
                                               f"providers.azure.aks_cluster names another cluster; not touched")
        found = await self._aks_machine(ref, rg, cluster, pool_name, machine)
        if found is None:
            raise ProviderError("not_found", f"AKS agent pool {pool_name} of {cluster} has no machine {machine}")
        vm_id = str(_get(found, "resource_id") or _get(found, "properties", "resourceId") or "")
        want = f"/virtualMachineScaleSets/{ref.scale_set}/virtualMachines/{ref.instance_id}".lower()
        if not vm_id.lower().endswith(want):
            raise ProviderError("unsupported", f"AKS machine {machine} of pool {pool_name} is {vm_id or 'no VM'}, not "
                                               f"the node's {ref.describe()}: node name and providerID disagree; "
                                               f"not touched")
        async with self._lock(f"aks/{self.aks_cluster}/{pool_name}"):
            pool = await self._aks_pool(ref, rg, cluster, pool_name)
            count = int(_pool(pool, "count") or 0)
            url = await self.lro(aks, "begin_delete_machines", f"AKS deleteMachines {pool_name}/{machine}", rg,
                                 cluster, pool_name, {"machineNames": [machine]}, group="agent_pools", kind="aks")
            if _pool(pool, "enable_auto_scaling"):
                return ProviderResult(f"deleted machine {machine} from AKS pool {pool_name} of {cluster}; the pool "
                                      f"autoscales, so the cluster autoscaler brings a new node when pods wait",
                                      new_host=True, operation=url)
            try:
                now = await self._aks_scale_back(aks, rg, cluster, pool_name, count)
            except ProviderError as exc:
                raise ProviderError(exc.kind, f"machine {machine} was deleted from AKS pool {pool_name}, but putting "
                                              f"the pool's count back failed: {exc.detail}. The pool is one node "
                                              f"short: `az aks nodepool scale --cluster-name {cluster} --name "
                                              f"{pool_name} --node-count <count + 1>`", code=exc.code) from exc
        return ProviderResult(f"deleted machine {machine} from AKS pool {pool_name} of {cluster} and put its count "
                              f"back to {now}: AKS creates a new node", new_host=True, operation=url)

    async def _aks_scale_back(self, aks: InstanceRef, rg: str, cluster: str, pool_name: str, before: int) -> int:
        """Give the pool back the machine deleteMachines took: a GET-then-PUT of the pool with count + 1 (what `az
        aks nodepool scale` does), guarded by the pool's eTag; a pool changed in between is read again, once."""
        from azure.core import MatchConditions

        for attempt in (1, 2):
            after = await self._aks_pool(aks, rg, cluster, pool_name)
            now = int(_pool(after, "count") or 0)
            if now >= before:
                return now  # someone (AKS, an operator) already scaled it back
            after.count = now + 1  # the SDK model: only its writable fields are sent
            etag = _pool(after, "e_tag")
            guard = {"etag": etag, "match_condition": MatchConditions.IfNotModified} if etag else {}
            try:
                await self.lro(aks, "begin_create_or_update", f"AKS scale pool {pool_name} back to {now + 1}", rg,
                               cluster, pool_name, after, group="agent_pools", kind="aks", **guard)
            except ProviderError as exc:
                if exc.code in ("412", "PreconditionFailed") and attempt == 1:
                    continue
                raise
            return now + 1
        raise AssertionError("unreachable")

    async def _aks_replaced(self, ref: InstanceRef, pool_name: str) -> Observation:
        rg, cluster, pool_name, machine = self._aks(ref, pool_name)
        pool = await self._aks_pool(ref, rg, cluster, pool_name)
        if await self._aks_machine(ref, rg, cluster, pool_name, machine) is not None:
            # Still listed: the delete was not sent, unless AKS is busy with one right now.
            busy = str(_pool(pool, "provisioning_state") or "Succeeded") != "Succeeded"
            return Observation.AMBIGUOUS if busy else Observation.NOT_DONE
        # Gone. An autoscaling pool needs nothing more; a fixed one may still owe the count we cannot recall.
        return Observation.DONE if _pool(pool, "enable_auto_scaling") else Observation.AMBIGUOUS


def _tags(resource: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in (_get(resource, "tags") or {}).items()}


def _marker_key(rid: str) -> str:
    """Our crash marker's tag name: one per remediation, so two replaces never overwrite each other's."""
    return f"{MARKER_TAG}-{re.sub(r'[^A-Za-z0-9-]', '-', rid)[:64]}"


def _marker(vmss: Any, rid: str) -> int | None:
    """The capacity our interrupted delete owes the scale set, if this remediation's marker tag is there."""
    value = _tags(vmss).get(_marker_key(rid), "")
    return int(value) if value.isdigit() else None


def _pool(pool: Any, name: str) -> Any:
    """An AgentPool field, from the SDK model (flattened attribute) or a plain ARM dict (under properties)."""
    value = _get(pool, name)
    if value is None:
        camel = re.sub(r"_([a-z])", lambda m: m[1].upper(), name)
        value = _get(pool, "properties", camel)
    return value


PROVIDER = AzureProvider
