"""A local HTTPS fake of Azure Resource Manager's Microsoft.Compute REST API, api-version 2026-04-01 (the default
of azure-mgmt-compute 39; the calls used here are unchanged since 2024-07-01), just what the Azure provider
calls, for the real ComputeManagementClient to talk to. HTTPS because azure-core refuses bearer tokens over http:
the test generates a self-signed certificate and passes it as connection_verify.

  GET    /subscriptions/{s}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachineScaleSets/{vmss}
  PATCH  .../virtualMachineScaleSets/{vmss}                         (sku.capacity)          -> 200 + async op
  GET    .../virtualMachineScaleSets/{vmss}/virtualMachines/{id}
  POST   .../virtualMachineScaleSets/{vmss}/virtualMachines/{id}/{restart|redeploy|reimage} -> 202 + async op
  DELETE .../virtualMachineScaleSets/{vmss}/virtualMachines/{id}                          -> 202 + async op
  GET    /subscriptions/{s}/providers/Microsoft.Compute/locations/eastus/operations/{n}    the async operation

Long-running operations answer 202 with `Azure-AsyncOperation` (and `Retry-After: 0`); the operation reports
InProgress once, then Succeeded, or Failed with the error set in `op_errors[verb]`. Any scale-set-level action
(POST .../virtualMachineScaleSets/{vmss}/reimage etc.) is recorded in `scale_set_actions` and answered 400, so
a test can assert it never happened. `script[verb]` answers the next calls of a verb ("get_vmss", "get_vm",
"restart", "redeploy", "reimage", "delete", "update", "operation") with (status, json body) first. Requests
without `Authorization: Bearer <token>` get 401.

A scale-set PATCH applies `sku.capacity` and `tags` (ARM PATCH replaces the whole tags object).

AKS, Microsoft.ContainerService api-version 2026-08-01 (the default of azure-mgmt-containerservice 41.8), for
ContainerServiceClient:

  GET  /subscriptions/{s}/resourceGroups/{rg}/providers/Microsoft.ContainerService/managedClusters/{c}
  GET  .../managedClusters/{c}/agentPools/{pool}                     properties.count, enableAutoScaling
  PUT  .../managedClusters/{c}/agentPools/{pool}                     properties.count  -> 200 + async op
  GET  .../managedClusters/{c}/agentPools/{pool}/machines/{machine}
  POST .../managedClusters/{c}/agentPools/{pool}/deleteMachines      {"machineNames": [...]} -> 202 + async op

deleteMachines removes the machines and the VMSS VMs behind them and lowers the pool's count (and the scale set's
capacity), as AKS does. A pool carries `properties.eTag`, changed by every write; a PUT with an `If-Match` that
is not the current eTag answers 412 PreconditionFailed. `pool_puts` records the body of every PUT. Verbs for `script` and `op_errors`: "get_cluster", "get_pool", "put_pool",
"get_machine", "delete_machines". Every AKS request is recorded in `seen` like the compute ones.
"""

from __future__ import annotations

import json
import re
from email.message import Message
from typing import Any

from tests.providers.fakes.support import HttpFake

VMSS = re.compile(r"/subscriptions/([^/]+)/resourceGroups/([^/]+)/providers/Microsoft\.Compute/"
                  r"virtualMachineScaleSets/([^/]+)(?:/virtualMachines/([^/]+))?(?:/([A-Za-z]+))?", re.IGNORECASE)
OPERATION = re.compile(r"/subscriptions/[^/]+/providers/Microsoft\.(?:Compute|ContainerService)/locations/[^/]+/"
                       r"operations/([^/]+)")
AKS = re.compile(r"/subscriptions/([^/]+)/resourceGroups/([^/]+)/providers/Microsoft\.ContainerService/"
                 r"managedClusters/([^/]+)(?:/agentPools/([^/]+)(?:/(machines|deleteMachines)(?:/([^/]+))?)?)?",
                 re.IGNORECASE)


def arm_error(status: int, code: str, message: str) -> tuple[int, dict[str, Any]]:
    return status, {"error": {"code": code, "message": message}}


THROTTLED = (429, {"error": {"code": "TooManyRequests", "message": "The request is being throttled."}})
UNAVAILABLE = arm_error(503, "ServiceUnavailable", "The service is temporarily unavailable; please retry.")
FORBIDDEN = arm_error(403, "AuthorizationFailed", "The client 'gpu-health' does not have authorization to perform "
                                                  "action 'Microsoft.Compute/virtualMachineScaleSets/virtualMachines/"
                                                  "redeploy/action' over scope '/subscriptions/...'")


class AzureFake(HttpFake):
    methods = ("GET", "POST", "PATCH", "DELETE", "PUT")

    def __init__(self, certfile: str, keyfile: str, *, subscription: str, token: str = "good-token") -> None:
        self.subscription = subscription
        self.token = token
        self.scale_sets: dict[tuple[str, str], dict[str, Any]] = {}
        self.vms: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.operations: dict[str, dict[str, Any]] = {}
        self.op_errors: dict[str, dict[str, str]] = {}
        self.script: dict[str, list[tuple[int, Any]]] = {}
        self.seen: list[tuple[str, str]] = []  # (verb, path)
        self.scale_set_actions: list[str] = []
        self.clusters: dict[tuple[str, str], dict[str, Any]] = {}
        self.pools: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.machines: dict[tuple[str, str, str, str], tuple[str, str, str]] = {}  # -> the VMSS VM key
        self.pool_puts: list[dict[str, Any]] = []
        self.changed_behind_our_back = 0  # the next PUTs find the pool changed since it was read (a new eTag)
        self.if_match: str | None = None
        self.serve("azure-fake", tls=(certfile, keyfile))

    def respond(self, method: str, path: str, query: dict[str, str], headers: Message,
                raw: bytes) -> tuple[int, Any, dict[str, str]]:
        body = json.loads(raw) if raw else {}
        if headers.get("Authorization") != f"Bearer {self.token}":
            status, payload, extra = 401, {"error": {"code": "InvalidAuthenticationToken",
                                                     "message": "The access token is invalid."}}, {}
        else:
            self.if_match = headers.get("If-Match")
            status, payload, extra = self.handle(method, path, body)
        extra = {"x-ms-request-id": "req-1", **extra}
        if status == 429:
            extra["Retry-After"] = "0"
        return status, payload, extra

    def add_scale_set(self, rg: str, name: str, *, instances: int = 3, tags: dict[str, str] | None = None) -> None:
        self.scale_sets[(rg.lower(), name.lower())] = {
            "id": f"/subscriptions/{self.subscription}/resourceGroups/{rg}/providers/Microsoft.Compute/"
                  f"virtualMachineScaleSets/{name}", "name": name, "location": "eastus",
            "type": "Microsoft.Compute/virtualMachineScaleSets", "tags": tags or {},
            "sku": {"name": "Standard_ND96isr_H100_v5", "tier": "Standard", "capacity": instances},
            "properties": {"provisioningState": "Succeeded", "orchestrationMode": "Uniform"}}
        for i in range(instances):
            self.vms[(rg.lower(), name.lower(), str(i))] = {
                "id": f"{self.scale_sets[(rg.lower(), name.lower())]['id']}/virtualMachines/{i}", "instanceId": str(i),
                "name": f"{name}_{i}", "location": "eastus", "properties": {"provisioningState": "Succeeded"}}

    def verbs(self) -> list[str]:
        return [v for v, _ in self.seen]

    def _lro(self, verb: str, on_success: Any = None) -> tuple[int, Any, dict[str, str]]:
        n = str(len(self.operations) + 1)
        self.operations[n] = {"verb": verb, "polls": 0, "error": self.op_errors.pop(verb, None),
                              "on_success": on_success}
        href = (f"{self.url}/subscriptions/{self.subscription}/providers/Microsoft.Compute/locations/eastus/"
                f"operations/{n}?api-version=2026-04-01")
        return 202, None, {"Azure-AsyncOperation": href, "Retry-After": "0"}

    def handle(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        op = OPERATION.fullmatch(path)
        if op:
            self.seen.append(("operation", path))
            queue = self.script.get("operation")
            if queue:
                return (*queue.pop(0), {})
            state = self.operations.get(op[1])
            if state is None:
                return (*arm_error(404, "NotFound", "no such operation"), {})
            state["polls"] += 1
            if state["polls"] < 2:
                return 200, {"name": op[1], "status": "InProgress"}, {"Retry-After": "0"}
            if state["error"]:
                return 200, {"name": op[1], "status": "Failed", "error": state["error"]}, {}
            if state["on_success"] is not None:
                state["on_success"]()
                state["on_success"] = None
            return 200, {"name": op[1], "status": "Succeeded"}, {}
        aks = AKS.fullmatch(path)
        if aks:
            return self._aks(method, aks.groups(), body, path)
        m = VMSS.fullmatch(path)
        if m is None:
            return (*arm_error(404, "NotFound", f"no route {path}"), {})
        sub, rg, vmss_name, instance, action = m.groups()
        if instance is None and action:
            self.scale_set_actions.append(action)
            self.seen.append((f"scale_set_{action}", path))
            return (*arm_error(400, "NotAllowedInTest", "scale-set-level actions are forbidden"), {})
        verb = {("GET", False): "get_vmss", ("PATCH", False): "update", ("GET", True): "get_vm",
                ("DELETE", True): "delete"}.get((method, instance is not None), action or method.lower())
        if action:
            verb = action
        self.seen.append((verb, path))
        queue = self.script.get(verb)
        if queue:
            return (*queue.pop(0), {})
        vmss = self.scale_sets.get((rg.lower(), vmss_name.lower())) if sub == self.subscription else None
        if vmss is None:
            return (*arm_error(404, "ResourceNotFound", f"The Resource 'Microsoft.Compute/virtualMachineScaleSets/"
                                                        f"{vmss_name}' under resource group '{rg}' was not found."), {})
        if instance is None:
            if verb == "get_vmss":
                return 200, vmss, {}
            if verb == "update":
                capacity = (body.get("sku") or {}).get("capacity")

                tags = body.get("tags")

                def apply() -> None:
                    if capacity is not None:
                        vmss["sku"]["capacity"] = int(capacity)
                    if tags is not None:
                        vmss["tags"] = dict(tags)
                _, _, headers = self._lro("update", apply)
                return 200, vmss, headers  # PATCH answers 200 with the model and an async operation
            return (*arm_error(400, "BadRequest", verb), {})
        key = (rg.lower(), vmss_name.lower(), instance)
        vm = self.vms.get(key)
        if vm is None:
            return (*arm_error(404, "NotFound", f"The entity was not found in this Azure location "
                                                 f"(instance {instance})."), {})
        if verb == "get_vm":
            return 200, vm, {}
        if verb == "delete":
            def gone() -> None:
                self.vms.pop(key, None)
                vmss["sku"]["capacity"] -= 1
            return self._lro("delete", gone)
        if verb in ("restart", "redeploy", "reimage"):
            return self._lro(verb)
        return (*arm_error(400, "BadRequest", verb), {})

    # ------------------------------------------------------------------------------------------------ AKS

    def add_cluster(self, rg: str, name: str, *, node_rg: str, pool: str, scale_set: str, node_prefix: str,
                    autoscale: bool = False) -> list[str]:
        """An AKS cluster whose pool `pool` is the existing scale set `scale_set` in `node_rg`; its machines are
        named `<node_prefix><instance id as 6 digits>` (AKS's `aks-<pool>-<n>-vmss000000`). Returns their names."""
        self.clusters[(rg.lower(), name.lower())] = {
            "id": f"/subscriptions/{self.subscription}/resourceGroups/{rg}/providers/Microsoft.ContainerService/"
                  f"managedClusters/{name}", "name": name, "location": "eastus",
            "type": "Microsoft.ContainerService/ManagedClusters",
            "properties": {"provisioningState": "Succeeded", "nodeResourceGroup": node_rg}}
        vms = sorted(k for k in self.vms if k[:2] == (node_rg.lower(), scale_set.lower()))
        self.pools[(rg.lower(), name.lower(), pool)] = {
            "id": f"{self.clusters[(rg.lower(), name.lower())]['id']}/agentPools/{pool}", "name": pool,
            "type": "Microsoft.ContainerService/managedClusters/agentPools",
            "properties": {"count": len(vms), "vmSize": "Standard_ND96isr_H100_v5", "mode": "User",
                           "type": "VirtualMachineScaleSets", "enableAutoScaling": autoscale,
                           "provisioningState": "Succeeded", "osType": "Linux", "eTag": "etag-1"}}
        names = []
        for key in vms:
            machine = f"{node_prefix}{int(key[2]):06d}"
            self.machines[(rg.lower(), name.lower(), pool, machine)] = key
            names.append(machine)
        return names

    @staticmethod
    def bump(pool: dict[str, Any]) -> None:
        """Another write to the pool: a new eTag."""
        n = int(pool["properties"]["eTag"].rsplit("-", 1)[1]) + 1
        pool["properties"]["eTag"] = f"etag-{n}"

    def _aks(self, method: str, groups: tuple[Any, ...], body: dict[str, Any],
             path: str) -> tuple[int, Any, dict[str, str]]:
        sub, rg, cluster, pool, sub_kind, machine = groups
        verb = ("get_cluster" if pool is None else "get_pool" if sub_kind is None and method == "GET"
                else "put_pool" if sub_kind is None and method == "PUT"
                else "get_machine" if sub_kind == "machines" and machine else "delete_machines"
                if sub_kind == "deleteMachines" and method == "POST" else f"aks_{method.lower()}")
        self.seen.append((verb, path))
        queue = self.script.get(verb)
        if queue:
            return (*queue.pop(0), {})
        mc = self.clusters.get((rg.lower(), cluster.lower())) if sub == self.subscription else None
        if mc is None:
            return (*arm_error(404, "ResourceNotFound", f"The Resource 'Microsoft.ContainerService/managedClusters/"
                                                        f"{cluster}' under resource group '{rg}' was not found."), {})
        if verb == "get_cluster":
            return 200, mc, {}
        ap = self.pools.get((rg.lower(), cluster.lower(), pool))
        if ap is None:
            return (*arm_error(404, "NotFound", f"agent pool {pool} not found"), {})
        if verb == "get_pool":
            return 200, ap, {}
        if verb == "put_pool":
            self.pool_puts.append(body)
            if self.changed_behind_our_back:
                self.changed_behind_our_back -= 1
                self.bump(ap)
            # If-Match carries the eTag as an HTTP entity tag, quoted (azure-core's quote_etag)
            if self.if_match is not None and self.if_match.strip('"') != ap["properties"]["eTag"]:
                return (*arm_error(412, "PreconditionFailed", "The agent pool was modified (eTag mismatch)."), {})
            count = int((body.get("properties") or {}).get("count", ap["properties"]["count"]))
            if ap["properties"]["enableAutoScaling"] and count != ap["properties"]["count"]:
                return (*arm_error(400, "InvalidParameter", "Cannot set count while autoscaling is enabled"), {})

            def scale() -> None:
                ap["properties"]["count"] = count
                ap["properties"]["provisioningState"] = "Succeeded"
                self.bump(ap)
            ap["properties"]["provisioningState"] = "Scaling"
            _, _, headers = self._lro("put_pool", scale)
            return 200, ap, headers
        if verb == "get_machine":
            key = self.machines.get((rg.lower(), cluster.lower(), pool, machine))
            if key is None:
                return (*arm_error(404, "NotFound", f"machine {machine} not found in agent pool {pool}"), {})
            vm = self.vms[key]
            return 200, {"id": f"{ap['id']}/machines/{machine}", "name": machine,
                         "properties": {"resourceId": vm["id"]}}, {}
        if verb == "delete_machines":
            names = list(body.get("machineNames") or [])
            keys = [(rg.lower(), cluster.lower(), pool, n) for n in names]
            missing = [n for n, k in zip(names, keys, strict=True) if k not in self.machines]
            if not names or missing:
                return (*arm_error(400, "InvalidParameter", f"machines not in agent pool {pool}: {missing}"), {})
            ap["properties"]["provisioningState"] = "Deleting"

            def delete() -> None:
                for k in keys:
                    vm_key = self.machines.pop(k)
                    self.vms.pop(vm_key, None)
                    self.scale_sets[vm_key[:2]]["sku"]["capacity"] -= 1
                ap["properties"]["count"] -= len(keys)
                ap["properties"]["provisioningState"] = "Succeeded"
                self.bump(ap)
            return self._lro("delete_machines", delete)
        return (*arm_error(400, "BadRequest", verb), {})
