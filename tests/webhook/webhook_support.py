"""Fixtures for the webhook tests: kmock as a real HTTP Kubernetes API, a fake Alertmanager checker,
payload builders, and the receiver built exactly as the CLI builds it."""

from __future__ import annotations

import asyncio
import copy
import json
import socket
import threading
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import kmock
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gpu_health_stack.kube import KubeFake as StackKubeFake
from gpu_health_stack.receiver import LoopbackServer
from remediation_webhook.admin import create_admin_app
from remediation_webhook.alertmanager import AlertState
from remediation_webhook.app import Services, create_app
from remediation_webhook.cli import apply_test_only_switches
from remediation_webhook.config import build_config
from remediation_webhook.engine import Engine
from remediation_webhook.inventory import build_inventory
from remediation_webhook.journal import Journal
from remediation_webhook.kube import KubernetesApi, KubernetesSettings
from remediation_webhook.metrics import Metrics

ROOT = Path(__file__).parent.parent.parent
SETUP_UA = {"User-Agent": "webhook-test-setup"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(interval)


async def await_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
                    what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(interval)


class KubeFake(StackKubeFake):
    """gpu_health_stack's kmock 0.8 fake (a real HTTP server over an in-memory store on its own loop in a background
    thread, with scripted evictions: `evictions`), plus what only these tests need.

    Gaps it has that matter here (see docs/webhook.md): no field selectors (the adapter also filters pods
    client-side), no resourceVersion, no eviction subresource (scripted), no PDB logic (scripted 429s).
    """

    setup_ua: ClassVar[dict[str, str]] = SETUP_UA

    def __init__(self) -> None:
        super().__init__()
        self.conflicts: list[str] = []  # node names whose next PATCH answers 409

    def gate(self, method: str, plural: str, name: str | None = None) -> tuple[threading.Event, Callable[[], None]]:
        """Hold the next `method` request on `plural` (after the store applied it) until released."""
        entered = threading.Event()
        release = asyncio.Event()

        async def hold(request: kmock.Request) -> None:
            entered.set()
            await release.wait()
            return None  # falls through to the emulator's own answer; this reaction is then spent

        criteria: tuple[Any, ...] = (method, kmock.resource("", "v1", plural))
        if name is not None:
            criteria += (kmock.name(name),)
        self.km[criteria] << hold
        return entered, lambda: self.loop.call_soon_threadsafe(release.set)

    def conflict_once(self) -> None:
        """The next node PATCH answers 409 (kmock has no resourceVersion; the store still applies it)."""
        spent: list[bool] = []

        def react(request: kmock.Request) -> kmock.Response | None:
            if spent:
                return None
            spent.append(True)
            return kmock.Response(status=409, payload={"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                                       "reason": "Conflict", "code": 409})

        self.km["patch", kmock.resource("", "v1", "nodes")] << react

    # ---- setup through HTTP, as a different client so it does not show up in calls()
    def add_node(self, name: str, *, uid: str | None = None, created: str = "2020-01-01T00:00:00Z",
                 provider_id: str | None = None, labels: dict[str, str] | None = None, unschedulable: bool = False,
                 taints: list[dict[str, str]] | None = None, annotations: dict[str, str] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "uid": uid or str(uuidlib.uuid4()), "creationTimestamp": created,
                         "labels": {"kubernetes.io/hostname": name, **(labels or {})},
                         "annotations": annotations or {}},
            "spec": {"providerID": provider_id or f"aws:///us-east-1a/i-{uuidlib.uuid4().hex[:17]}"}}
        if unschedulable:
            body["spec"]["unschedulable"] = True
        if taints:
            body["spec"]["taints"] = taints
        r = self.http.post(f"{self.url}/api/v1/nodes", json=body, headers=SETUP_UA, timeout=5)
        assert r.status_code < 300, r.text
        return body

    def add_pod(self, namespace: str, name: str, node: str, *, daemonset: bool = False, mirror: bool = False,
                labels: dict[str, str] | None = None) -> None:
        meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels or {})}
        if daemonset:
            meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "ds", "uid": "x",
                                        "controller": True}]
        else:
            meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "y",
                                        "controller": True}]
        if mirror:
            meta["annotations"] = {"kubernetes.io/config.mirror": "abc"}
        body = {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
                "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]}}
        r = self.http.post(f"{self.url}/api/v1/namespaces/{namespace}/pods", json=body, headers=SETUP_UA, timeout=5)
        assert r.status_code < 300, r.text


@pytest.fixture(name="kube")
def _kube() -> Iterator[KubeFake]:
    fake = KubeFake()
    yield fake
    fake.close()


class FakeAlertmanager:
    """AlertChecker double: states by fingerprint (default active), calls recorded. `labels` holds the labels
    Alertmanager has under a fingerprint, when a test sets them, and the answer is the real client's: it looks the
    alert up by alertname and node, so an alert Alertmanager has under another node or alertname is not found
    (GONE), and one found with other labels is a MISMATCH. `before_state`: an async hook run inside each call (a
    person acting while the engine asks)."""

    def __init__(self) -> None:
        self.states: dict[str, AlertState] = {}
        self.labels: dict[str, dict[str, str]] = {}
        self.firing_for_node: dict[str, list[dict[str, Any]]] = {}
        self.calls: list[str] = []
        self.before_state: Callable[[str], Any] | None = None

    async def state(self, fingerprint: str, alertname: str, node: str,
                    labels: Any = None) -> AlertState:
        self.calls.append(fingerprint)
        if self.before_state is not None:
            await self.before_state(fingerprint)
        known = self.labels.get(fingerprint)
        if known is not None and (known.get("alertname") != alertname or known.get("node") != node):
            return AlertState.GONE
        if labels is not None and known is not None and dict(labels) != known:
            return AlertState.MISMATCH
        return self.states.get(fingerprint, AlertState.ACTIVE)

    async def active_for_node(self, node: str) -> list[dict[str, Any]]:
        return self.firing_for_node.get(node, [])

    async def close(self) -> None:
        return None


@pytest.fixture(name="am")
def _am() -> FakeAlertmanager:
    return FakeAlertmanager()


def base_config(tmp_path: Path, kube_url: str, **sections: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "web": {"listen_address": "127.0.0.1:0"},
        "admin": {"listen_address": "127.0.0.1:0"},
        "journal": {"path": str(tmp_path / "journal.db")},
        "alertmanager": {"url": "http://127.0.0.1:9"},
        "inventory": {"kind": "kubernetes"},
        "kubernetes": {"host": kube_url, "request_timeout": "5s"},
        "policy": {"dry_run": False, "rules": [
            {"name": "gpu", "match_re": {"alertname": "GPU.*"}, "ladder": ["cordon", "drain"]}]},
        "engine": {"tick": "50ms", "pool_refresh": "60s"},
        "actions": {"drain": {"poll_interval": "20ms", "retry_interval": "20ms", "max_retry_interval": "50ms",
                              "timeout": "5s"}},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            merged = copy.deepcopy(cfg[key])
            merged.update(value)
            cfg[key] = merged
        else:
            cfg[key] = value
    return cfg


def alert(node: str, *, alertname: str = "GPUXidFatal", status: str = "firing", remediation: str = "cordon",
          fingerprint: str | None = None, starts_at: datetime | None = None, **labels: str) -> dict[str, Any]:
    starts = starts_at or datetime.now(UTC) - timedelta(minutes=1)
    all_labels = {"alertname": alertname, "node": node, "severity": "critical", "remediation": remediation, **labels}
    fp = fingerprint or uuidlib.uuid5(uuidlib.NAMESPACE_URL, json.dumps(all_labels, sort_keys=True)).hex[:16]
    return {"status": status, "labels": all_labels, "annotations": {"summary": "test"},
            "startsAt": starts.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
            "endsAt": "0001-01-01T00:00:00Z" if status == "firing" else datetime.now(UTC).isoformat(),
            "generatorURL": "http://prometheus/graph", "fingerprint": fp}


def notification(*alerts: dict[str, Any], truncated: int = 0) -> dict[str, Any]:
    status = "firing" if any(a["status"] == "firing" for a in alerts) else "resolved"
    return {"version": "4", "groupKey": "{}:{alertname=\"GPUXidFatal\"}", "truncatedAlerts": truncated,
            "status": status, "receiver": "gpu\\-remediation", "groupLabels": {}, "commonLabels": {},
            "commonAnnotations": {}, "externalURL": "http://alertmanager", "alerts": list(alerts)}


class Harness:
    """The receiver and admin apps on test clients, built like the CLI builds them."""

    def __init__(self, services: Services, client: TestClient, admin: TestClient, kube_api: KubernetesApi) -> None:
        self.services = services
        self.client = client
        self.admin = admin
        self.kube_api = kube_api

    @property
    def engine(self) -> Engine:
        return self.services.engine

    @property
    def journal(self) -> Journal:
        return self.services.journal

    async def post(self, body: Any, **kw: Any) -> Any:
        return await self.client.post("/v1/alerts", json=body, **kw)

    def sql(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self.journal.run_sync(lambda c: c.execute(query, args).fetchall())]

    def states(self) -> dict[str, str]:
        return {r[0]: r[1] for r in self.sql("SELECT node, state FROM remediation")}

    async def settle(self, timeout: float = 10.0) -> None:
        """Wait until the engine has nothing runnable left in flight."""
        async def quiet() -> bool:
            await self.engine.schedule()
            await asyncio.sleep(0.02)
            if self.engine._tasks:
                return False
            await self.engine.refresh_gauges()
            held = self.engine._paused or self.sql("SELECT 1 FROM meta WHERE key='breaker'")
            busy = "('RUNNING')" if held else "('PLANNED','RUNNING')"
            return not self.sql(f"SELECT 1 FROM remediation WHERE state IN {busy}")
        await await_for(quiet, timeout, what="engine to settle")

    async def drive_until(self, predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> None:
        """Drive the engine (schedule, then wait for its tasks) until `predicate()` holds: unlike settle(), this
        also waits out a BLOCKED remediation's tick and the settle checks."""
        async def reached() -> bool:
            await self.engine.schedule()
            await self.engine.idle()
            return bool(predicate())
        await await_for(reached, timeout, what=what or str(predicate))

    async def until_state(self, node: str, state: str, timeout: float = 10.0) -> None:
        """Drive the engine until the node's newest remediation is in `state`."""
        def reached() -> bool:
            rows = self.sql("SELECT state FROM remediation WHERE node=? ORDER BY created_at DESC LIMIT 1", node)
            return bool(rows) and rows[0][0] == state
        await self.drive_until(reached, timeout, what=f"{node} to reach {state}")

    def metric(self, name: str, **labels: str) -> float | None:
        return self.services.metrics.registry.get_sample_value(name, labels)


@pytest.fixture(name="harness")
async def _harness(tmp_path: Path, kube: KubeFake, am: FakeAlertmanager) -> AsyncIterator[Callable[..., Any]]:
    made: list[tuple[Harness, TestClient, TestClient]] = []

    async def make(config: dict[str, Any] | None = None, *, start: bool = True, checker: Any = "fake",
                   env: dict[str, str] | None = None, **sections: Any) -> Harness:
        raw = config if config is not None else base_config(tmp_path, kube.url, **sections)
        cfg = apply_test_only_switches(build_config(raw, base=tmp_path), env or {})
        kube_api = KubernetesApi(KubernetesSettings(host=kube.url, request_timeout=5))
        inventory = build_inventory(cfg.inventory_kind, kube_api, cfg.inventory_raw)
        journal = Journal(cfg.journal_path)
        metrics = Metrics()
        engine = Engine(cfg, journal, inventory, kube_api, am if checker == "fake" else checker, metrics)
        services = Services(config=cfg, journal=journal, engine=engine, metrics=metrics)
        if start:
            await engine.start()
        client = TestClient(TestServer(create_app(services)))
        admin = TestClient(TestServer(create_admin_app(services)))
        await client.start_server()
        await admin.start_server()
        h = Harness(services, client, admin, kube_api)
        made.append((h, client, admin))
        return h

    yield make
    for h, client, admin in made:
        await client.close()
        await admin.close()
        await h.engine.stop()
        h.journal.close()
        h.kube_api.close()


@pytest.fixture(name="aiohttp_site")
async def _aiohttp_site() -> AsyncIterator[Callable[..., Any]]:
    runners: list[web.AppRunner] = []

    async def start(app: web.Application, port: int) -> str:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


class FakeAlertmanagerServer:
    """A minimal HTTP Alertmanager API v2 (GET /api/v2/alerts) for subprocess tests; all alerts active."""

    def __init__(self) -> None:
        import http.server

        self.alerts: list[dict[str, Any]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                body = json.dumps([{"fingerprint": a["fingerprint"], "labels": a["labels"],
                                    "status": {"state": "active", "silencedBy": [], "inhibitedBy": []}}
                                   for a in outer.alerts]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return None

        self._http = LoopbackServer(Handler)
        self.url = self._http.url

    def close(self) -> None:
        self._http.close()
