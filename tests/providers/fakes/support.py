"""Shared helpers for the provider tests: the webhook suite's kmock fake, a harness built like the CLI, the
provider configurations and credentials the tests share, and HttpFake, the server the HTTP fakes here stand on.
The fixtures that use them are in tests/providers/conftest.py."""

from __future__ import annotations

import http.server
import json
import threading
import time
import urllib.parse
from email.message import Message
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from gpu_health_stack.receiver import LoopbackServer
from remediation_webhook.admin import create_admin_app
from remediation_webhook.app import Services, create_app
from remediation_webhook.config import build_config
from remediation_webhook.engine import Engine
from remediation_webhook.inventory import build_inventory
from remediation_webhook.journal import Journal
from remediation_webhook.kube import KubernetesApi, KubernetesSettings
from remediation_webhook.metrics import Metrics
from tests.webhook import webhook_support as wc

KubeFake, FakeAlertmanager, Harness = wc.KubeFake, wc.FakeAlertmanager, wc.Harness
base_config, alert, notification, await_for = wc.base_config, wc.alert, wc.notification, wc.await_for
SETUP_UA = wc.SETUP_UA  # setup requests with it are not the webhook's: kube.calls() leaves them out


async def make_harness(raw: dict[str, Any], tmp_path: Path, kube_url: str | None, am: Any) -> Any:
    cfg = build_config(raw, base=tmp_path)
    kube_api = KubernetesApi(KubernetesSettings(host=kube_url, request_timeout=5)) if kube_url else None
    inventory = build_inventory(cfg.inventory_kind, kube_api, cfg.inventory_raw)
    journal = Journal(cfg.journal_path)
    metrics = Metrics()
    engine = Engine(cfg, journal, inventory, kube_api, am, metrics)
    services = Services(config=cfg, journal=journal, engine=engine, metrics=metrics)
    await engine.start()
    client = TestClient(TestServer(create_app(services)))
    admin = TestClient(TestServer(create_admin_app(services)))
    await client.start_server()
    await admin.start_server()
    return Harness(services, client, admin, kube_api)


async def close_harness(h: Any) -> None:
    await h.client.close()
    await h.admin.close()
    await h.engine.stop()
    h.journal.close()
    if h.kube_api is not None:
        h.kube_api.close()


# ------------------------------------------------------------------------------------------------ webhook config


def replace_config(tmp_path: Path, kube_url: str, using: str, provider: dict[str, Any], *, rule: str = "replace",
                   drain: bool = True) -> dict[str, Any]:
    """A webhook config with providers.<using> = `provider` and one rule: GPU.* alerts climb cordon -> drain ->
    replace (by `using`), remediation=reboot means replace, nothing waits for approval; `drain`: a fast drain."""
    actions: dict[str, Any] = {"drain": {"poll_interval": "20ms", "timeout": "5s"}} if drain else {}
    return base_config(tmp_path, kube_url, providers={using: provider},
                       policy={"dry_run": False, "rules": [{
                           "name": rule, "match_re": {"alertname": "GPU.*"},
                           "ladder": ["cordon", "drain", "replace"], "remediation_map": {"reboot": "replace"},
                           "requires_approval": []}]},
                       actions={**actions, "replace": {"using": using}})


async def rid_of(h: Any, node: str) -> str:
    """The id of the remediation for `node`, once there is one."""
    return (await await_for(lambda: h.sql("SELECT id FROM remediation WHERE node=?", node), what="remediation"))[0][0]


# ------------------------------------------------------------------------------------------------ kmock

UUID = "GPU-11111111-2222-3333-4444-555555555555"
JOBS = "/apis/batch/v1/namespaces/gpu-health/jobs"


def gpu_node(kube: Any, name: str, *, provider_id: str | None = None, allocatable: str = "7",
             boot: str = "boot-1") -> None:
    """A Ready node with 8 GPUs, `allocatable` of them allocatable, boot id `boot`."""
    kube.add_node(name, provider_id=provider_id)
    kube.add_pod("kube-system", f"dcgm-exporter-{name}", name, daemonset=True)  # stays; declares pods in kmock
    patch_status(kube, name, {"capacity": {"nvidia.com/gpu": "8"}, "allocatable": {"nvidia.com/gpu": allocatable},
                              "nodeInfo": {"bootID": boot}, "conditions": [{"type": "Ready", "status": "True"}]})


def patch_status(kube: Any, name: str, status: dict[str, Any]) -> None:
    """What the kubelet / device plugin would report: a merge patch of the node's status."""
    r = kube.http.patch(f"{kube.url}/api/v1/nodes/{name}", json={"status": status},
                        headers={"Content-Type": "application/merge-patch+json", **SETUP_UA}, timeout=5)
    assert r.status_code < 300, r.text


def job(kube: Any, name: str) -> Any:
    """The executor Job `name` in gpu-health, or None."""
    r = kube.http.get(f"{kube.url}{JOBS}/{name}", headers=SETUP_UA, timeout=5)
    return r.json() if r.status_code == 200 else None


def finish_job(kube: Any, name: str, ok: bool = True, message: str = "") -> None:
    """Play the kubelet: the Job's pod exited 0 (Complete) or failed (BackoffLimitExceeded, `message`)."""
    status = ({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]} if ok else
              {"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                            "message": message}]})
    r = kube.http.patch(f"{kube.url}{JOBS}/{name}", json={"status": status},
                        headers={"Content-Type": "application/merge-patch+json", **SETUP_UA}, timeout=5)
    assert r.status_code < 300, r.text


# ------------------------------------------------------------------------------------------------ AWS (moto)

AWS_KW = {"region_name": "us-east-1", "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


def aws_cfg(aws: Any, *, replacement_timeout: str = "10s", **extra: Any) -> dict[str, Any]:
    """providers.aws for the `aws` fixture: its recording proxy as the endpoint, fast polls and retries."""
    return {"region": "us-east-1", "endpoint_url": aws.url, "access_key_id": "testing",
            "secret_access_key": "testing", "poll_interval": "50ms", "replacement_timeout": replacement_timeout,
            "retry_base": "10ms", "max_attempts": 4, **extra}


# ------------------------------------------------------------------------------------------------ Azure

AZURE_SUB = "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"  # the `az` fixture's subscription


class StaticToken:
    """A TokenCredential that always hands out the same token."""

    def __init__(self, token: str = "good-token") -> None:
        self.token = token

    def get_token(self, *scopes: str, **kwargs: object) -> Any:
        from azure.core.credentials import AccessToken

        return AccessToken(self.token, int(time.time()) + 3600)


def azure_credential(az: Any, p: Any, token: str = "good-token") -> Any:
    """Give the AzureProvider `p` a StaticToken and hand it to the `az` fixture, which closes it."""
    p.credential = StaticToken(token)
    az.providers.append(p)
    return p


def azure_provider(az: Any, tls: tuple[str, str], token: str = "good-token", **extra: Any) -> Any:
    """An AzureProvider against the `az` fake (trusting the `tls` certificate), fast polls and retries."""
    from remediation_webhook.providers.azure import AzureProvider

    p = AzureProvider.from_config({"base_url": az.url, "ca_file": tls[0], "polling_interval": "10ms",
                                   "retry_base": "10ms", "max_attempts": 3, "operation_timeout": "10s", **extra},
                                  "providers.azure")
    return azure_credential(az, p, token)


# ------------------------------------------------------------------------------------------------ HTTP fakes


class HttpFake:
    """What the HTTP fakes (azure_compute, gcp_compute, slurmrestd) share: a real ThreadingHTTPServer on 127.0.0.1
    in a daemon thread, HTTPS when given a certificate. `serve()` starts it; each request whose method is in
    `methods` is read whole and handed, under `self._lock`, to `respond(method, path, query, headers, raw)` (query:
    the first value of each parameter; headers: the request's, case-insensitive; raw: the body's bytes), which
    returns (status, payload, extra headers): payload None is an empty body, a str is text/plain, anything else
    JSON. Every answer closes its connection (no keep-alive sockets left for the GC to find)."""

    methods: tuple[str, ...] = ("GET", "POST")
    url: str

    def respond(self, method: str, path: str, query: dict[str, str], headers: Message,
                raw: bytes) -> tuple[int, Any, dict[str, str]]:
        raise NotImplementedError

    def serve(self, name: str, *, tls: tuple[str, str] | None = None, poll_interval: float = 0.5) -> None:
        self._lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                query = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with outer._lock:
                    status, payload, headers = outer.respond(self.command, url.path, query, self.headers, body)
                if isinstance(payload, str):
                    data, mime = payload.encode(), "text/plain"
                else:
                    data, mime = (json.dumps(payload).encode() if payload is not None else b""), "application/json"
                self.send_response(status)
                self.send_header("Content-Type", mime)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.close_connection = True
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        for method in self.methods:
            setattr(Handler, f"do_{method}", Handler._any)
        self._http = LoopbackServer(Handler, tls=tls, poll_interval=poll_interval, name=name)
        self.url = self._http.url

    def close(self) -> None:
        self._http.close()
