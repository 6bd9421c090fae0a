"""A Kubernetes API for the stack: kmock 0.8 (a real HTTP server over an in-memory store) on its own event loop in a
background thread, with Node and Pod objects and scripted evictions.

kmock has no eviction subresource (evictions are scripted here: 201 and the pod is deleted, unless `evictions` says
otherwise), no field selectors, no resourceVersion and no controllers: nothing runs a Job or restarts a kubelet, so
whoever drives the stack (a test, the demo) plays those parts through the helpers below. See docs/webhook.md, "What the
tests run against".
"""

from __future__ import annotations

import asyncio
import collections
import re
import threading
import time
import uuid as uuidlib
from collections.abc import Iterable
from typing import Any, ClassVar

import kmock
import requests

PODS = kmock.resource("", "v1", "pods")
# Requests the webhook makes carry the official client's User-Agent; our own setup and reads carry this one.
OFFICIAL_CLIENT = "OpenAPI-Generator"
SETUP_UA = {"User-Agent": "gpu-health-stack"}


class KubeFake:
    """kmock on 127.0.0.1:<random port>; `url` is what the webhook's `kubernetes.host` points at."""

    # Our own setup and reads carry this User-Agent, so calls() leaves them out.
    setup_ua: ClassVar[dict[str, str]] = SETUP_UA

    def __init__(self, *, keep_requests: int | None = None) -> None:
        # kmock matches every request against every request it has kept (its payload filters are views of its
        # log), so each request costs as much as all before it: 9 minutes to create 1,000 Nodes and their pods.
        # None keeps them all for calls(); a soak that reads the API front's log instead keeps the last few.
        self.keep_requests = keep_requests
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.http = requests.Session()
        self.url = ""
        self.node_labels: dict[str, dict[str, str]] = {}
        # (namespace, pod) -> the statuses its next evictions answer (429: a PodDisruptionBudget says not now)
        self.evictions: dict[tuple[str, str], list[int]] = {}
        # (namespace, pod) -> seconds an eviction of it takes to answer (a slow API server or admission webhook)
        self.eviction_delay: dict[tuple[str, str], float] = {}
        self._thread = threading.Thread(target=self._run, daemon=True, name="kmock")
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError("kmock did not start within 15 s")
        if self._error is not None:
            raise RuntimeError(f"kmock did not start: {self._error!r}")

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        async with kmock.KubernetesEmulator() as km, kmock.Server(km) as srv:
            self.km = km
            if self.keep_requests is not None:
                # kmock's private log: append, len and iteration are all it does with it. A kmock without it
                # would take the assignment silently and be quadratic again, so say so instead.
                if not isinstance(getattr(km, "_requests", None), list):
                    raise RuntimeError("this kmock keeps its requests elsewhere: keep_requests needs kmock 0.8's log")
                km._requests = collections.deque(maxlen=self.keep_requests)
            self.url = str(srv.url).rstrip("/")
            self.loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            km[kmock.subresource("eviction")] << self._evict
            self._ready.set()
            await self._stop.wait()

    async def _evict(self, request: kmock.Request) -> kmock.Response:
        """Eviction: granted and the pod deleted, unless `evictions` scripts a 429 (PodDisruptionBudget) or an error;
        `eviction_delay` makes the answer slow (the pod is gone when it comes)."""
        key = (str(request.namespace), str(request.name))
        await asyncio.sleep(self.eviction_delay.get(key, 0.0))
        script = self.evictions.get(key)
        status = script.pop(0) if script else 201
        if status == 429:
            return kmock.Response(status=429, payload={
                "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "TooManyRequests", "code": 429,
                "message": "Cannot evict pod as it would violate the pod's disruption budget."})
        if status >= 400:
            return kmock.Response(status=status, payload={"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                                          "reason": "InternalError", "code": status})
        try:
            self.km.objects[PODS, key[0], key[1]].delete()
        except KeyError:
            return kmock.Response(status=404, payload={"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                                       "reason": "NotFound", "code": 404})
        return kmock.Response(status=201, payload={"kind": "Status", "apiVersion": "v1", "status": "Success",
                                                   "code": 201})

    def close(self) -> None:
        self.http.close()
        if self.url:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    # ---- setup, as a client of its own (so it never shows up in calls())

    def _post(self, path: str, body: dict[str, Any]) -> None:
        r = self.http.post(f"{self.url}{path}", json=body, headers=self.setup_ua, timeout=5)
        if r.status_code >= 300:
            raise RuntimeError(f"POST {path}: HTTP {r.status_code}: {r.text}")

    def _get(self, path: str) -> Any:
        r = self.http.get(f"{self.url}{path}", headers=self.setup_ua, timeout=5)
        if r.status_code >= 300:
            raise RuntimeError(f"GET {path}: HTTP {r.status_code}: {r.text}")
        return r.json()

    def add_node(self, name: str, *, provider_id: str, labels: dict[str, str] | None = None, gpus: int = 8,
                 created: str = "2020-01-01T00:00:00Z") -> dict[str, Any]:
        resources = {"cpu": "192", "memory": "2063937112Ki", "nvidia.com/gpu": str(gpus)}
        body: dict[str, Any] = {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "uid": str(uuidlib.uuid4()), "creationTimestamp": created,
                         "labels": {"kubernetes.io/hostname": name, **(labels or {})}, "annotations": {}},
            "spec": {"providerID": provider_id},
            "status": {"conditions": [{"type": "Ready", "status": "True"}], "capacity": resources,
                       "allocatable": dict(resources), "nodeInfo": {"bootID": str(uuidlib.uuid4())}},
        }
        self._post("/api/v1/nodes", body)
        self.node_labels[name] = dict(labels or {})
        return body

    def add_pod(self, namespace: str, name: str, node: str, *, daemonset: bool = False,
                labels: dict[str, str] | None = None) -> None:
        owner = ({"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "gpu-health-exporter", "uid": "ds",
                  "controller": True} if daemonset else
                 {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": name.rsplit("-", 1)[0], "uid": "rs",
                  "controller": True})
        body = {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": namespace, "ownerReferences": [owner],
                             "labels": dict(labels or {})},
                "spec": {"nodeName": node, "containers": [{"name": "main", "image": "busybox"}]}}
        self._post(f"/api/v1/namespaces/{namespace}/pods", body)

    # ---- reads

    def node(self, name: str) -> dict[str, Any]:
        return dict(self._get(f"/api/v1/nodes/{name}"))

    def nodes(self) -> list[dict[str, Any]]:
        return list(self._get("/api/v1/nodes")["items"])

    def cordoned(self) -> list[str]:
        return sorted(n["metadata"]["name"] for n in self.nodes() if (n.get("spec") or {}).get("unschedulable"))

    def pods(self, node: str, *, include_daemonsets: bool = True) -> list[str]:
        out = []
        for p in self._get("/api/v1/pods")["items"]:
            if p["spec"].get("nodeName") != node:
                continue
            owners = p["metadata"].get("ownerReferences") or []
            if not include_daemonsets and any(o.get("kind") == "DaemonSet" for o in owners):
                continue
            out.append(f"{p['metadata']['namespace']}/{p['metadata']['name']}")
        return sorted(out)

    def list_path(self, path: str) -> list[dict[str, Any]]:
        """Items of any list path (e.g. /apis/batch/v1/namespaces/gpu-health/jobs); [] for an unknown one."""
        try:
            return list(self._get(path).get("items") or [])
        except RuntimeError:
            return []

    def calls(self, *, mutating: bool = False) -> list[tuple[str, str, Any]]:
        """(METHOD, path, body) of every request the webhook's official client made, in order."""
        if self.keep_requests is not None:
            raise RuntimeError("this KubeFake keeps only its last requests (keep_requests): read the API front's log")
        out = []
        for req in list(self.km):
            if not str(req.headers.get("User-Agent", "")).startswith(OFFICIAL_CLIENT):
                continue
            method = str(req.method.value if hasattr(req.method, "value") else req.method).upper()
            if mutating and method in ("GET", "HEAD"):
                continue
            out.append((method, req.url.path, req.data))
        return out

    def mutations_on(self, nodes: Iterable[str]) -> list[tuple[str, str, Any]]:
        """The webhook's mutating calls about these nodes: node PATCHes, evictions and Jobs of pods on them."""
        names = set(nodes)
        out = []
        for method, path, body in self.calls(mutating=True):
            if path.endswith("/events"):
                continue  # Events describe actions, they are none
            text = f"{path} {body}"
            # Pods and Jobs are named after their node (train-node-a, ...): a name followed by no letter or digit.
            if any(re.search(re.escape(n) + r"(?![A-Za-z0-9])", text) for n in names):
                out.append((method, path, body))
        return out

    # ---- playing the parts kmock has no controller for

    def _patch(self, path: str, body: dict[str, Any]) -> None:
        r = self.http.patch(f"{self.url}{path}", json=body, timeout=5,
                            headers={**self.setup_ua, "Content-Type": "application/merge-patch+json"})
        if r.status_code >= 300:
            raise RuntimeError(f"PATCH {path}: HTTP {r.status_code}: {r.text}")

    def jobs(self, namespace: str) -> list[dict[str, Any]]:
        return self.list_path(f"/apis/batch/v1/namespaces/{namespace}/jobs")

    def finish_job(self, namespace: str, name: str, *, succeeded: bool = True, message: str = "",
                   report: str = "", exit_code: int | None = None) -> None:
        """The Job controller's and the kubelet's part: the Job's pod ran to completion (or failed); `report` is
        what its container wrote to its termination log."""
        if report or exit_code is not None:
            job = self._get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}")
            node = job["spec"]["template"]["spec"].get("nodeName", "")
            code = exit_code if exit_code is not None else (0 if succeeded else 1)
            self._post(f"/api/v1/namespaces/{namespace}/pods", {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": f"{name}-x1", "namespace": namespace,
                             "labels": {"job-name": name, "batch.kubernetes.io/job-name": name},
                             "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name,
                                                  "uid": str((job.get("metadata") or {}).get("uid", "")),
                                                  "controller": True}]},
                "spec": {"nodeName": node, "restartPolicy": "Never", "containers": [{"name": "executor"}]},
                "status": {"phase": "Succeeded" if succeeded else "Failed", "containerStatuses": [{
                    "name": "executor", "state": {"terminated": {"exitCode": code, "message": report,
                                                                 "reason": "Completed" if succeeded else "Error"}}}]},
            })
        cond = {"type": "Complete" if succeeded else "Failed", "status": "True", "message": message}
        status = {"succeeded": 1} if succeeded else {"failed": 1}
        self._patch(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}", {"status": {**status, "conditions": [cond]}})

    def set_allocatable_gpus(self, node: str, count: int) -> None:
        """The device plugin's part: how many GPUs the kubelet reports allocatable (one drops out during a reset)."""
        self._patch(f"/api/v1/nodes/{node}", {"status": {"allocatable": {"nvidia.com/gpu": str(count)}}})

    def uncordon(self, name: str) -> None:
        """A person's `kubectl uncordon`: spec.unschedulable false; our annotations stay where they are."""
        self._patch(f"/api/v1/nodes/{name}", {"spec": {"unschedulable": False}})

    def label_node(self, name: str, labels: dict[str, str | None]) -> None:
        """A person's or a controller's `kubectl label`."""
        self._patch(f"/api/v1/nodes/{name}", {"metadata": {"labels": labels}})

    def delete_pod(self, namespace: str, name: str) -> None:
        r = self.http.delete(f"{self.url}/api/v1/namespaces/{namespace}/pods/{name}", headers=self.setup_ua,
                             timeout=5)
        if r.status_code >= 300 and r.status_code != 404:
            raise RuntimeError(f"DELETE pod {namespace}/{name}: HTTP {r.status_code}: {r.text}")

    def delete_node(self, name: str) -> None:
        r = self.http.delete(f"{self.url}/api/v1/nodes/{name}", headers=self.setup_ua, timeout=5)
        if r.status_code >= 300:
            raise RuntimeError(f"DELETE node {name}: HTTP {r.status_code}: {r.text}")

    def replace_node(self, node: str, provider_id: str) -> None:
        """The cloud's part after a replace: the old Node object goes, the new machine registers under the name."""
        self.delete_node(node)
        labels = {k: v for k, v in (self.node_labels.get(node) or {}).items()}
        self.add_node(node, provider_id=provider_id, labels=labels,
                      created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
