"""A thin async adapter over the official `kubernetes` client, and a recorder that makes dry-run exact.

The official client is synchronous, so every call runs in a small thread pool of its own. Objects are
returned as plain JSON dicts (camelCase, as on the wire) so actions and tests read the same shapes.

`RecordingKube` wraps any `KubeApi`: it records every call (method, path, body) for the journal, and in
dry-run mode it performs the reads and only records the writes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from .errors import (ConfigError, KubeApiError, KubeConflict, KubeNotFound, KubeTooManyRequests,
                     KubeUnavailable)

log = logging.getLogger(__name__)
T = TypeVar("T")
Obj = dict[str, Any]


class KubeApi(Protocol):
    """The verbs the inventory and the actions need, nothing more."""

    async def read_node(self, name: str) -> Obj: ...
    async def list_nodes(self, label_selector: str = "") -> list[Obj]: ...
    async def patch_node(self, name: str, body: Obj) -> Obj: ...
    async def list_pods_on_node(self, node: str) -> list[Obj]: ...
    async def evict_pod(self, namespace: str, name: str, grace_period_seconds: int | None) -> None: ...
    async def delete_pod(self, namespace: str, name: str, grace_period_seconds: int | None) -> None: ...
    async def create_event(self, namespace: str, body: Obj) -> None: ...
    async def ping(self) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class KubernetesSettings:
    """How to reach the API server (the `kubernetes:` section of the config)."""

    kubeconfig: str = ""
    context: str = ""
    in_cluster: bool = False
    host: str = ""
    event_namespace: str = "default"
    request_timeout: float = 10.0


def _raise_for(exc: Exception) -> KubeApiError:
    from kubernetes.client.rest import ApiException

    if isinstance(exc, ApiException):
        status = int(exc.status or 0)
        reason, message = str(exc.reason or ""), ""
        try:
            body = json.loads(exc.body) if exc.body else {}
            message = str(body.get("message", ""))[:500]
            reason = str(body.get("reason", reason))
        except (ValueError, AttributeError):
            pass
        cls = {404: KubeNotFound, 409: KubeConflict, 429: KubeTooManyRequests}.get(status)
        if cls is None:
            cls = KubeUnavailable if status == 0 or status >= 500 else KubeApiError
        return cls(status, reason, message)
    return KubeUnavailable(0, type(exc).__name__, str(exc)[:300])


class KubernetesApi:
    """KubeApi over the official client; all calls in a private thread pool."""

    def __init__(self, settings: KubernetesSettings, *, workers: int = 8) -> None:
        from kubernetes import client, config as kconfig

        self._settings = settings
        if settings.host:
            cfg = client.Configuration()
            cfg.host = settings.host.rstrip("/")
        elif settings.in_cluster:
            cfg = client.Configuration()
            try:
                kconfig.load_incluster_config(client_configuration=cfg)
            except kconfig.ConfigException as exc:
                raise ConfigError(f"kubernetes.in_cluster: {exc}") from exc
        else:
            cfg = client.Configuration()
            try:
                kconfig.load_kube_config(config_file=settings.kubeconfig or None,
                                         context=settings.context or None, client_configuration=cfg)
            except (kconfig.ConfigException, OSError) as exc:
                raise ConfigError(f"kubernetes.kubeconfig: {exc}") from exc
        cfg.connection_pool_maxsize = workers
        self._api_client = client.ApiClient(cfg)
        self._core = client.CoreV1Api(self._api_client)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="kube")
        self._timeout = settings.request_timeout

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("_request_timeout", self._timeout)
        kwargs.setdefault("_preload_content", False)

        def run() -> Any:
            try:
                response = fn(*args, **kwargs)
                data = response.data
                return json.loads(data) if data else {}
            except Exception as exc:  # noqa: BLE001 - every client failure is mapped onto our tree
                raise _raise_for(exc) from exc

        return await asyncio.get_running_loop().run_in_executor(self._pool, run)

    async def read_node(self, name: str) -> Obj:
        return await self._call(self._core.read_node, name)  # type: ignore[no-any-return]

    async def list_nodes(self, label_selector: str = "") -> list[Obj]:
        out = await self._call(self._core.list_node, label_selector=label_selector)
        return list(out.get("items") or [])

    async def patch_node(self, name: str, body: Obj) -> Obj:
        return await self._call(self._core.patch_node, name, body)  # type: ignore[no-any-return]

    async def list_pods_on_node(self, node: str) -> list[Obj]:
        # The field selector makes real API servers filter; the client-side filter keeps us correct on
        # servers (and fakes) that ignore it.
        out = await self._call(self._core.list_pod_for_all_namespaces, field_selector=f"spec.nodeName={node}")
        return [p for p in out.get("items") or [] if (p.get("spec") or {}).get("nodeName") == node]

    async def evict_pod(self, namespace: str, name: str, grace_period_seconds: int | None) -> None:
        body = eviction_body(namespace, name, grace_period_seconds)
        await self._call(self._core.create_namespaced_pod_eviction, name, namespace, body)

    async def delete_pod(self, namespace: str, name: str, grace_period_seconds: int | None) -> None:
        await self._call(self._core.delete_namespaced_pod, name, namespace,
                         grace_period_seconds=grace_period_seconds)

    async def create_event(self, namespace: str, body: Obj) -> None:
        await self._call(self._core.create_namespaced_event, namespace, body)

    async def ping(self) -> None:
        """Readiness: the API answers a cheap authorised read (nodes: list, which the inventory needs anyway)."""
        await self._call(self._core.list_node, limit=1)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._api_client.close()


def eviction_body(namespace: str, name: str, grace_period_seconds: int | None) -> Obj:
    body: Obj = {"apiVersion": "policy/v1", "kind": "Eviction",
                 "metadata": {"name": name, "namespace": namespace}}
    if grace_period_seconds is not None:
        body["deleteOptions"] = {"gracePeriodSeconds": grace_period_seconds}
    return body


@dataclass(frozen=True)
class Call:
    """One Kubernetes API call as the journal records it."""

    method: str
    path: str
    body: Obj | None = None
    performed: bool = True
    result: str = ""

    def as_dict(self) -> Obj:
        out: Obj = {"method": self.method, "path": self.path, "performed": self.performed}
        if self.body is not None:
            out["body"] = self.body
        if self.result:
            out["result"] = self.result
        return out


class RecordingKube:
    """Records every call; with dry_run, reads go through and writes are only recorded."""

    def __init__(self, inner: KubeApi, *, dry_run: bool) -> None:
        self._inner = inner
        self.dry_run = dry_run
        self.calls: list[Call] = []

    def _record(self, method: str, path: str, body: Obj | None, performed: bool, result: str = "") -> None:
        self.calls.append(Call(method, path, body, performed, result))

    async def _write(self, method: str, path: str, body: Obj | None, fn: Callable[[], Any]) -> Any:
        if self.dry_run:
            self._record(method, path, body, performed=False, result="dry-run")
            return None
        try:
            result = await fn()
        except KubeApiError as exc:
            self._record(method, path, body, performed=True, result=f"{exc.status} {exc.reason}")
            raise
        self._record(method, path, body, performed=True, result="ok")
        return result

    async def read_node(self, name: str) -> Obj:
        self._record("GET", f"/api/v1/nodes/{name}", None, True)
        return await self._inner.read_node(name)

    async def list_nodes(self, label_selector: str = "") -> list[Obj]:
        self._record("GET", f"/api/v1/nodes?labelSelector={label_selector}", None, True)
        return await self._inner.list_nodes(label_selector)

    async def patch_node(self, name: str, body: Obj) -> Obj | None:
        return await self._write("PATCH", f"/api/v1/nodes/{name}", body,
                                 lambda: self._inner.patch_node(name, body))

    async def list_pods_on_node(self, node: str) -> list[Obj]:
        self._record("GET", f"/api/v1/pods?fieldSelector=spec.nodeName={node}", None, True)
        return await self._inner.list_pods_on_node(node)

    async def evict_pod(self, namespace: str, name: str, grace_period_seconds: int | None) -> None:
        await self._write("POST", f"/api/v1/namespaces/{namespace}/pods/{name}/eviction",
                          eviction_body(namespace, name, grace_period_seconds),
                          lambda: self._inner.evict_pod(namespace, name, grace_period_seconds))

    async def delete_pod(self, namespace: str, name: str, grace_period_seconds: int | None) -> None:
        body = {"gracePeriodSeconds": grace_period_seconds} if grace_period_seconds is not None else None
        await self._write("DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}", body,
                          lambda: self._inner.delete_pod(namespace, name, grace_period_seconds))

    async def create_event(self, namespace: str, body: Obj) -> None:
        await self._write("POST", f"/api/v1/namespaces/{namespace}/events", body,
                          lambda: self._inner.create_event(namespace, body))

    async def ping(self) -> None:
        await self._inner.ping()

    def close(self) -> None:
        """The recorder owns nothing."""
