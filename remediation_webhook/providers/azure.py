"""Azure (azure-mgmt-compute + azure-identity): VM scale set VMs, for nodes whose providerID is
azure:///subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.Compute/virtualMachineScaleSets/<vmss>/
virtualMachines/<instance id>.

  reboot   virtual_machine_scale_set_vms.begin_restart   same host
  move     virtual_machine_scale_set_vms.begin_redeploy  new host (the usual fix for bad hardware)
  replace  replace_mode: redeploy (default, new host) | reimage (same host, fresh OS disk) |
           delete (virtual_machine_scale_set_vms.begin_delete, then the scale set's capacity is put back
           explicitly with virtual_machine_scale_sets.begin_update(sku.capacity); the delete decrements it)

Every call is per instance through `virtual_machine_scale_set_vms`: never the scale-set-level reimage / restart /
redeploy / delete, which act on every VM when instance ids are omitted. Scale sets AKS manages (a tag
`aks-managed-*`, or a resource group `MC_*`) are refused (kind "unsupported"): deleting or reimaging them
behind AKS's back breaks the node pool; use AKS's agent-pool API (agentPools/deleteMachines) instead.

Long-running operations are polled (ARM polling: Azure-AsyncOperation / Location) with `poller.result(timeout)`;
the async-operation URL is the step's `operation`. 429 (with Retry-After) and 5xx are retried by azure-core's
RetryPolicy (retry_total = max_attempts). Restart, redeploy and reimage are NOT idempotent: a lost outcome
must go to a human. Blocking calls run in a thread. Permissions: deploy/iam/azure-role-definition.json.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
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
    parse_provider_id,
)

IAM_FILE = "deploy/iam/azure-role-definition.json"
CAPACITY = ("AllocationFailed", "ZonalAllocationFailed", "OverconstrainedAllocationRequest", "SkuNotAvailable",
            "OperationNotAllowed")  # OperationNotAllowed: quota
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
            return ProviderError("auth", f"Azure refused {what} ({status or ''} {code}: {message}); assign the "
                                         f"role in {IAM_FILE} to the webhook's identity at the scale set's scope",
                                 code=code or str(status))
        if status == 404 or code in ("ResourceNotFound", "NotFound", "ParentResourceNotFound"):
            return ProviderError("not_found", f"{what}: not found ({code}: {message})", code=code or "404")
        if status == 429:
            return ProviderError("throttled", f"{what}: still throttled after retries (429 {code}); lower the "
                                              f"webhook's rate limits or retry later", code=code or "429")
        if any(c in code or c in message for c in CAPACITY):
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
        obj = obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)
    return obj


class AzureProvider:
    name: ClassVar[str] = "azure"

    def __init__(self, *, base_url: str = "", ca_file: str = "", replace_mode: str = "redeploy",
                 allowed_scale_sets: tuple[str, ...] = (), max_attempts: int = 5, retry_base: float = 0.8,
                 operation_timeout: float = 1800.0, polling_interval: float = 15.0,
                 call_timeout: float = 60.0, credential: Any = None) -> None:
        self.base_url = base_url
        self.ca_file = ca_file
        self.replace_mode = replace_mode
        self.allowed_scale_sets = allowed_scale_sets
        self.max_attempts = max_attempts
        self.retry_base = retry_base
        self.operation_timeout = operation_timeout
        self.polling_interval = polling_interval
        self.call_timeout = call_timeout
        self.credential = credential
        self._clients: dict[str, Any] = {}

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], key: str) -> AzureProvider:
        only_keys(raw, key, {"base_url", "ca_file", "replace_mode", "allowed_scale_sets", "max_attempts",
                             "retry_base", "operation_timeout", "polling_interval", "call_timeout"})
        base = opt(raw, key, "base_url", str, "")
        if base and not base.startswith("https://"):
            raise ConfigError(f"{key}.base_url: expected an https URL (bearer tokens are never sent over http)")
        mode = opt(raw, key, "replace_mode", str, "redeploy")
        if mode not in ("redeploy", "reimage", "delete"):
            raise ConfigError(f"{key}.replace_mode: redeploy, reimage or delete")
        sets = raw.get("allowed_scale_sets") or []
        if not isinstance(sets, list) or not all(isinstance(s, str) for s in sets):
            raise ConfigError(f"{key}.allowed_scale_sets: expected a list of VM scale set names")
        attempts = opt(raw, key, "max_attempts", int, 5)
        if attempts < 1:
            raise ConfigError(f"{key}.max_attempts: at least 1")
        return cls(base_url=base, ca_file=opt(raw, key, "ca_file", str, ""), replace_mode=mode,
                   allowed_scale_sets=tuple(sets), max_attempts=attempts,
                   retry_base=duration(raw, key, "retry_base", "800ms"),
                   operation_timeout=duration(raw, key, "operation_timeout", "30m"),
                   polling_interval=duration(raw, key, "polling_interval", "15s"),
                   call_timeout=duration(raw, key, "call_timeout", "60s"))

    # ------------------------------------------------------------------------------------------ plumbing

    def client(self, subscription: str) -> Any:
        if subscription not in self._clients:
            from azure.mgmt.compute import ComputeManagementClient

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
            self._clients[subscription] = ComputeManagementClient(self.credential, subscription, **kwargs)
        return self._clients[subscription]

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    async def call(self, ref: InstanceRef, group: str, op: str, what: str, *args: Any, **kwargs: Any) -> Any:
        try:
            fn = getattr(getattr(self.client(ref.project), group), op)
            return await asyncio.to_thread(lambda: fn(*args, **kwargs))
        except Exception as exc:
            raise classify(exc, what) from exc

    async def lro(self, ref: InstanceRef, op: str, what: str, *args: Any, group: str = "virtual_machine_scale_set_vms",
                  **kwargs: Any) -> str:
        """Start a long-running operation and poll it to the end; returns its async-operation URL."""
        poller = await self.call(ref, group, op, what, *args, **kwargs)
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
        ref = parse_provider_id(node.provider_id) if node.provider_id else None
        if ref is None or ref.provider != "azure":
            raise ProviderError("invalid", f"node {node.name}: providerID {node.provider_id[:200]!r} is not an "
                                           f"Azure VM scale set VM")
        return ref

    def _check(self, ref: InstanceRef) -> None:
        if ref.provider != "azure" or not ref.scale_set:
            raise ProviderError("unsupported", f"{ref.describe()} is not a VM scale set VM (standalone VMs are not "
                                               f"supported)")
        if not (AZ_GUID.fullmatch(ref.project) and AZ_NAME.fullmatch(ref.resource_group)
                and AZ_NAME.fullmatch(ref.scale_set) and AZ_INSTANCE.fullmatch(ref.instance_id)):
            raise ProviderError("invalid", f"{ref.describe()}: a part failed validation")

    async def _scale_set(self, ref: InstanceRef) -> Any:
        """Read the scale set and refuse AKS-managed ones before any write."""
        self._check(ref)
        if self.allowed_scale_sets and ref.scale_set not in self.allowed_scale_sets:
            raise ProviderError("unsupported", f"scale set {ref.scale_set} is not in "
                                               f"providers.azure.allowed_scale_sets; not touched")
        vmss = None
        if not ref.resource_group.upper().startswith("MC_"):
            vmss = await self.call(ref, "virtual_machine_scale_sets", "get", f"get scale set {ref.scale_set}",
                                   ref.resource_group, ref.scale_set)
        tags = _get(vmss, "tags") or {}
        aks = [k for k in tags if str(k).lower().startswith("aks-managed-")]
        if aks or vmss is None:
            why = f"tag {aks[0]}" if aks else f"resource group {ref.resource_group}"
            raise ProviderError("unsupported", f"scale set {ref.scale_set} is managed by AKS ({why}): VMSS calls "
                                               f"would bypass AKS. Use the AKS agent-pool API (POST .../"
                                               f"managedClusters/<cluster>/agentPools/<pool>/deleteMachines) or "
                                               f"AKS node auto-repair; not touched")
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
        await self._scale_set(ref)
        url = await self.lro(ref, "begin_restart", f"restart {ref.scale_set}/{ref.instance_id}", *self._args(ref))
        return ProviderResult(f"restarted VMSS VM {ref.scale_set}/{ref.instance_id} (same host)", operation=url)

    async def move(self, ref: InstanceRef, rid: str, reason: str) -> ProviderResult:
        await self._scale_set(ref)
        url = await self.lro(ref, "begin_redeploy", f"redeploy {ref.scale_set}/{ref.instance_id}", *self._args(ref))
        return ProviderResult(f"redeployed VMSS VM {ref.scale_set}/{ref.instance_id}: it runs on a new host",
                              new_host=True, operation=url)

    async def mark_unhealthy(self, ref: InstanceRef, rid: str, reason: str) -> ProviderResult:
        raise ProviderError("unsupported", "Azure has no mark-unhealthy for VMSS VMs; use replace (redeploy)")

    async def replaced(self, ref: InstanceRef, rid: str) -> Observation:
        """Only a delete is observable afterwards (the VM is gone). Redeploy and reimage leave no trace and carry
        no idempotency key, so a crash during one is AMBIGUOUS: a second redeploy is a second outage."""
        if self.replace_mode != "delete":
            return Observation.AMBIGUOUS
        self._check(ref)
        try:
            await self._vm(ref)
        except ProviderError as exc:
            if exc.kind == "not_found":
                return Observation.DONE
            raise
        return Observation.NOT_DONE

    async def replace(self, ref: InstanceRef, rid: str, reason: str) -> ProviderResult:
        if self.replace_mode == "redeploy":
            return await self.move(ref, rid, reason)
        vmss = await self._scale_set(ref)
        what = f"{self.replace_mode} {ref.scale_set}/{ref.instance_id}"
        if self.replace_mode == "reimage":
            url = await self.lro(ref, "begin_reimage", what, *self._args(ref))
            return ProviderResult(f"reimaged VMSS VM {ref.scale_set}/{ref.instance_id} (same host, fresh OS disk)",
                                  operation=url)
        await self._vm(ref)  # not_found before we change capacity
        capacity = int(_get(vmss, "sku", "capacity") or 0)
        url = await self.lro(ref, "begin_delete", what, *self._args(ref))
        after = await self.call(ref, "virtual_machine_scale_sets", "get", f"get scale set {ref.scale_set}",
                                ref.resource_group, ref.scale_set)
        now = int(_get(after, "sku", "capacity") or 0)
        if now < capacity:
            await self.lro(ref, "begin_update", f"scale {ref.scale_set} back out to {capacity}", ref.resource_group,
                           ref.scale_set, {"sku": {"capacity": capacity}}, group="virtual_machine_scale_sets")
        return ProviderResult(f"deleted VMSS VM {ref.scale_set}/{ref.instance_id} and set capacity back to "
                              f"{capacity} (was {now} after the delete): a new VM is being created", new_host=True,
                              operation=url)


PROVIDER = AzureProvider
