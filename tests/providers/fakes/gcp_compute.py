"""A local HTTP fake of the Compute Engine REST API, version v1 (https://compute.googleapis.com/compute/v1/),
just the calls the GCP provider makes, for the real google-cloud-compute client (REST transport) to talk to.
Paths and methods as google-cloud-compute's REST transports send them (compute_v1/services/*/transports/
rest_base.py):

  GET  /compute/v1/projects/{p}/zones/{z}/instances/{name}
  POST /compute/v1/projects/{p}/zones/{z}/instances/{name}/reset?requestId=
  POST /compute/v1/projects/{p}/zones/{z}/instances/{name}/setLabels            {labels, labelFingerprint}
  POST /compute/v1/projects/{p}/zones/{z}/instances/{name}/reportHostAsFaulty?requestId=
  POST /compute/v1/projects/{p}/zones/{z}/instanceGroupManagers/{mig}/recreateInstances?requestId=  {instances}
  POST /compute/v1/projects/{p}/zones/{z}/instanceGroupManagers/{mig}/listManagedInstances
  POST /compute/v1/projects/{p}/zones/{z}/operations/{op}/wait
  GET  /compute/v1/projects/{p}/zones/{z}/operations/{op}
  POST /compute/v1/projects/{p}/regions/{r}/instanceGroupManagers/{mig}/recreateInstances?requestId=  {instances}
  POST /compute/v1/projects/{p}/regions/{r}/instanceGroupManagers/{mig}/listManagedInstances
  POST /compute/v1/projects/{p}/regions/{r}/operations/{op}/wait
  GET  /compute/v1/projects/{p}/regions/{r}/operations/{op}

Two groups: the zonal MIG `mig` in `zone` and the regional MIG `regional_mig` in `region` (the zone's region).
`add_instance(..., regional=True)` puts an instance (always in `zone`) in the regional one; `created_by`
overrides its created-by metadata. Operations are zonal or regional like the call that made them, and are found
only under their own scope (a regional operation polled through zoneOperations is a 404, as on GCP).

Long-running operations: mutating calls answer an Operation with status RUNNING; `wait` answers it DONE (with an
`error` when scripted). recreateInstances behaves like the real thing: the operation is DONE once the flag is
set, and listManagedInstances shows currentAction RECREATING for `recreate_polls` more lists before the VM is
RUNNING again with a new id. `script[<verb>]` answers the next calls of a verb ("get", "reset", "setLabels",
"reportHostAsFaulty", "recreateInstances", "listManagedInstances", "wait"; zonal and regional alike) with
(status, json body) first; `script["regions:<verb>"]` / `script["zones:<verb>"]` only the regional / zonal calls
(tried before the plain key). A repeated requestId returns the original operation (as Compute Engine does).
`seen` records (verb, name, query, body) of every call, `paths` its (method, path).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from email.message import Message
from typing import Any

from tests.providers.fakes.support import HttpFake

PATH = re.compile(r"/compute/v1/projects/([^/]+)/(zones|regions)/([^/]+)"
                  r"/(instances|instanceGroupManagers|operations)/([^/]+)(?:/([A-Za-z]+))?")
API = "https://www.googleapis.com/compute/v1"


def error(status: int, reason: str, message: str) -> tuple[int, dict[str, Any]]:
    return status, {"error": {"code": status, "message": message,
                              "errors": [{"message": message, "domain": "global", "reason": reason}]}}


RATE_LIMITED = error(429, "rateLimitExceeded", "Rate Limit Exceeded")
UNAVAILABLE = error(503, "backendError", "The service is currently unavailable.")
FORBIDDEN = error(403, "forbidden", "Required 'compute.instanceGroupManagers.update' permission for "
                                    "'projects/gpu-proj/zones/us-central1-a/instanceGroupManagers/gpu-mig'")


class GcpFake(HttpFake):
    def __init__(self, project: str = "gpu-proj", zone: str = "us-central1-a", mig: str = "gpu-mig",
                 regional_mig: str = "gpu-rmig") -> None:
        self.project, self.zone, self.mig = project, zone, mig
        self.region, self.regional_mig = zone.rsplit("-", 1)[0], regional_mig
        self.instances: dict[str, dict[str, Any]] = {}
        self.operations: dict[str, dict[str, Any]] = {}
        self.by_request: dict[str, str] = {}
        self.op_errors: dict[str, list[dict[str, str]]] = {}  # verb -> errors for its next operation
        self.recreating: dict[str, int] = {}  # instance -> lists left showing RECREATING
        self.recreate_polls = 2
        self.script: dict[str, list[tuple[int, Any]]] = {}
        self.seen: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = []  # (verb, name, query, body)
        self.paths: list[tuple[str, str]] = []  # (method, path), in step with seen
        self._next_id = 1000
        self.serve("gcp-fake")

    def respond(self, method: str, path: str, query: dict[str, str], headers: Message,
                raw: bytes) -> tuple[int, Any, dict[str, str]]:
        return (*self.handle(method, path, query, json.loads(raw) if raw else {}), {})

    def add_instance(self, name: str, *, machine_type: str = "a3-highgpu-8g", in_mig: bool = True,
                     regional: bool = False, created_by: str | None = None, status: str = "RUNNING") -> None:
        self._next_id += 1
        group = None
        if regional:
            group = ("regions", self.region, self.regional_mig)
        elif in_mig:
            group = ("zones", self.zone, self.mig)
        if created_by is None and group:
            created_by = f"projects/123456/{group[0]}/{group[1]}/instanceGroupManagers/{group[2]}"
        meta = [{"key": "created-by", "value": created_by}] if created_by else []
        self.instances[name] = {
            "kind": "compute#instance", "id": str(self._next_id), "name": name, "status": status,
            "zone": f"https://www.googleapis.com/compute/v1/projects/{self.project}/zones/{self.zone}",
            "machineType": f"zones/{self.zone}/machineTypes/{machine_type}",
            "labels": {"team": "ml"}, "labelFingerprint": f"fp{self._next_id}",
            "creationTimestamp": "2026-01-05T10:00:00.000-08:00",
            "metadata": {"items": meta}, "_group": group}

    def seen_verbs(self) -> list[str]:
        return [v for v, *_ in self.seen]

    # ---------------------------------------------------------------------------------------- dispatch
    def _operation(self, verb: str, target: str, request_id: str | None,
                   scope: tuple[str, str] | None = None) -> dict[str, Any]:
        if request_id and request_id in self.by_request:
            return self.operations[self.by_request[request_id]]
        kind, location = scope or ("zones", self.zone)
        name = f"operation-{len(self.operations) + 1}-{verb}"
        op: dict[str, Any] = {"kind": "compute#operation", "id": str(len(self.operations) + 1), "name": name,
                              "operationType": verb, "status": "RUNNING", "targetLink": target,
                              "progress": 0, "_scope": (kind, location),
                              ("region" if kind == "regions" else "zone"): f"{API}/projects/{self.project}/"
                                                                           f"{kind}/{location}"}
        errors = self.op_errors.pop(verb, None)
        if errors:
            op["_error"] = errors
        self.operations[name] = op
        if request_id:
            self.by_request[request_id] = name
        return op

    @staticmethod
    def _public(op: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in op.items() if not k.startswith("_")}

    def handle(self, method: str, path: str, query: dict[str, str], body: dict[str, Any]) -> tuple[int, Any]:
        m = PATH.fullmatch(path)
        if m is None:
            return error(404, "notFound", f"no such path {path}")
        project, kind, location, collection, name, verb = m.groups()
        verb = verb or ("get" if method == "GET" else method.lower())
        self.seen.append((verb, name, query, body))
        self.paths.append((method, path))
        queue = self.script.get(f"{kind}:{verb}") or self.script.get(verb)
        if queue:
            return queue.pop(0)
        home = self.region if kind == "regions" else self.zone
        if project != self.project or location != home or (kind, collection) == ("regions", "instances"):
            return error(404, "notFound", f"The resource 'projects/{project}/{kind}/{location}' was not found")
        if collection == "operations":
            op = self.operations.get(name)
            if op is None or op["_scope"] != (kind, location):
                return error(404, "notFound", f"The resource 'projects/{project}/{kind}/{location}/operations/"
                                              f"{name}' was not found")
            if verb == "wait":
                op["status"], op["progress"] = "DONE", 100
                if op.get("_error"):
                    op["error"] = {"errors": op["_error"]}
            return 200, self._public(op)
        if collection == "instanceGroupManagers":
            group = (kind, location, name)
            if name != (self.regional_mig if kind == "regions" else self.mig):
                return error(404, "notFound", f"The resource 'projects/{project}/{kind}/{location}/"
                                              f"instanceGroupManagers/{name}' was not found")
            if verb == "recreateInstances":
                op = self._operation(verb, name, query.get("requestId"), (kind, location))
                fresh = not op.get("_applied")
                for ref in body.get("instances", []):
                    inst = ref.rsplit("/", 1)[-1]
                    if ref != f"zones/{self.zone}/instances/{inst}" or \
                            self.instances.get(inst, {}).get("_group") != group:
                        return error(400, "invalid", f"instance {ref} is not a member of {name}")
                    if fresh and not op.get("_error"):
                        self.recreating[inst] = self.recreate_polls
                op["_applied"] = True
                return 200, self._public(op)
            if verb == "listManagedInstances":
                rows = []
                for inst_name, inst in self.instances.items():
                    if inst["_group"] != group:
                        continue
                    url = f"{API}/projects/{project}/zones/{self.zone}/instances/{inst_name}"
                    left = self.recreating.get(inst_name)
                    if left:
                        self.recreating[inst_name] = left - 1
                        rows.append({"instance": url, "id": inst["id"],
                                     "currentAction": "RECREATING", "instanceStatus": "STOPPING"})
                        if left == 1:  # the VM comes back from the template: new id, template labels, new time
                            self._next_id += 1
                            inst.update(id=str(self._next_id), labels={"team": "ml"},
                                        labelFingerprint=f"fp{self._next_id}",
                                        creationTimestamp=datetime.now(UTC).isoformat(timespec="milliseconds"))
                        continue
                    rows.append({"instance": url, "id": inst["id"],
                                 "currentAction": "NONE", "instanceStatus": inst["status"]})
                return 200, {"managedInstances": rows}
            return error(400, "invalid", f"unsupported verb {verb}")
        inst = self.instances.get(name)
        if inst is None:
            return error(404, "notFound", f"The resource 'projects/{project}/zones/{location}/instances/{name}' "
                                          f"was not found")
        if verb == "get":
            return 200, self._public(inst)
        if verb == "setLabels":
            if body.get("labelFingerprint") != inst["labelFingerprint"]:
                return error(412, "conditionNotMet", "Labels fingerprint either invalid or resource labels have "
                                                     "changed")
            self._next_id += 1
            inst["labels"] = body.get("labels", {})
            inst["labelFingerprint"] = f"fp{self._next_id}"
            return 200, self._public(self._operation(verb, name, query.get("requestId")))
        if verb in ("reset", "reportHostAsFaulty"):
            return 200, self._public(self._operation(verb, name, query.get("requestId")))
        return error(400, "invalid", f"unsupported verb {verb}")
