"""The remediation webhook as a process of the stack (`python -m remediation_webhook --config ...`), exactly as
deployed: its own listeners with bearer tokens, its SQLite journal in the stack's folder, Alertmanager's API for
verification and a Kubernetes API (kmock) for the inventory and the actions. Read through its admin API."""

from __future__ import annotations

import secrets
import sys
from pathlib import Path
from typing import Any

import yaml

from .procs import Proc, free_port, http_get, http_json

ROOT = Path(__file__).resolve().parent.parent


class Webhook:
    def __init__(self, home: Path, config: dict[str, Any], *, env: dict[str, str] | None = None) -> None:
        """`config` is the webhook's YAML as a dict without web, admin and journal, which are filled in here."""
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.admin_port = free_port()
        # One token for Alertmanager's deliveries, one for Prometheus' scrapes, one for the admin API.
        self.am_token, self.scrape_token, self.admin_token = (secrets.token_hex(16) for _ in range(3))
        (home / "web.tokens").write_text(f"{self.am_token}\n{self.scrape_token}\n")
        (home / "admin.token").write_text(f"{self.admin_token}\n")
        self.am_token_file = home / "am.token"
        self.am_token_file.write_text(self.am_token + "\n")
        self.scrape_token_file = home / "scrape.token"
        self.scrape_token_file.write_text(self.scrape_token + "\n")
        full = {
            "web": {"listen_address": f"127.0.0.1:{self.port}", "bearer_token_file": str(home / "web.tokens")},
            "admin": {"listen_address": f"127.0.0.1:{self.admin_port}",
                      "bearer_token_file": str(home / "admin.token")},
            "journal": {"path": str(home / "journal.db")},
            **config,
        }
        self.config_path = home / "webhook.yaml"
        self.config_path.write_text(yaml.safe_dump(full, sort_keys=False))
        self.proc = Proc("webhook", [sys.executable, "-m", "remediation_webhook", "--config", str(self.config_path),
                                     "--log.level", "info"], home, env=env, cwd=ROOT)
        self.proc.wait_http(f"{self.url}/readyz", timeout=60)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alerts_url(self) -> str:
        return f"{self.url}/v1/alerts"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def scrape_config(self, instance: str = "") -> dict[str, Any]:
        """Prometheus' job for the webhook's /metrics: honor_labels keeps the `node` of its history metrics.
        `instance`: the series' instance label, as a recreated pod (a new pod IP) would give them."""
        job: dict[str, Any] = {"job_name": "gpu-health-webhook", "honor_labels": True,
                               "authorization": {"type": "Bearer", "credentials_file": str(self.scrape_token_file)},
                               "static_configs": [{"targets": [f"127.0.0.1:{self.port}"]}]}
        if instance:
            job["relabel_configs"] = [{"target_label": "instance", "replacement": instance}]
        return job

    def stop(self) -> None:
        self.proc.stop()

    def start(self) -> None:
        """Start it again on the same ports and journal (Alertmanager's receiver URL does not change)."""
        self.proc.start()
        self.proc.wait_http(f"{self.url}/readyz", timeout=60)

    # ---- admin API

    def admin(self, path: str, body: Any = None, method: str | None = None) -> Any:
        return http_json(f"{self.admin_url}{path}", body, method,
                         headers={"Authorization": f"Bearer {self.admin_token}"})

    def remediations(self, node: str = "", state: str = "") -> list[dict[str, Any]]:
        query = "&".join(f"{k}={v}" for k, v in (("node", node), ("state", state)) if v)
        return list(self.admin(f"/v1/remediations?limit=1000&{query}")["remediations"])

    def remediation(self, rid: str) -> dict[str, Any]:
        return dict(self.admin(f"/v1/remediations/{rid}"))

    def breaker(self) -> dict[str, Any]:
        return dict(self.admin("/v1/breaker"))

    def metrics(self) -> str:
        return http_get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {self.scrape_token}"}).decode()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 when there is none)."""
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        for family in text_string_to_metric_families(self.metrics()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

    def close(self) -> None:
        self.proc.stop()
