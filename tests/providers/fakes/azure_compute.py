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
"""

from __future__ import annotations

import http.server
import json
import re
import ssl
import threading
import urllib.parse
from typing import Any

VMSS = re.compile(r"/subscriptions/([^/]+)/resourceGroups/([^/]+)/providers/Microsoft\.Compute/"
                  r"virtualMachineScaleSets/([^/]+)(?:/virtualMachines/([^/]+))?(?:/([A-Za-z]+))?", re.IGNORECASE)
OPERATION = re.compile(r"/subscriptions/[^/]+/providers/Microsoft\.Compute/locations/[^/]+/operations/([^/]+)")


def arm_error(status: int, code: str, message: str) -> tuple[int, dict[str, Any]]:
    return status, {"error": {"code": code, "message": message}}


THROTTLED = (429, {"error": {"code": "TooManyRequests", "message": "The request is being throttled."}})
FORBIDDEN = arm_error(403, "AuthorizationFailed", "The client 'gpu-health' does not have authorization to perform "
                                                  "action 'Microsoft.Compute/virtualMachineScaleSets/virtualMachines/"
                                                  "redeploy/action' over scope '/subscriptions/...'")


class AzureFake:
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
        self._lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}") if length else {}
                if self.headers.get("Authorization") != f"Bearer {outer.token}":
                    status, payload, headers = 401, {"error": {"code": "InvalidAuthenticationToken",
                                                               "message": "The access token is invalid."}}, {}
                else:
                    with outer._lock:
                        status, payload, headers = outer.handle(self.command, url.path, body)
                data = json.dumps(payload).encode() if payload is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")  # no keep-alive sockets left for the GC to find
                self.close_connection = True
                self.send_header("x-ms-request-id", "req-1")
                for k, v in headers.items():
                    self.send_header(k, v)
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _any

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(certfile, keyfile)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="azure-fake")
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

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

                def apply() -> None:
                    if capacity is not None:
                        vmss["sku"]["capacity"] = int(capacity)
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
