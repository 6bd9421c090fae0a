"""Shared helpers for the provider tests: the webhook suite's kmock fake and a harness built like the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

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
