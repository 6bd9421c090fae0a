"""The stack: exporters with simulated GPUs, Prometheus with rules/, Alertmanager with the shipped route."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import urllib.parse
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from .procs import Proc, free_port, http_get, http_json, wait_until

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = "/usr/bin/prometheus"
ALERTMANAGER = "/usr/bin/prometheus-alertmanager"


def _unix(rfc3339: str) -> float:
    """Prometheus' RFC 3339 times carry nanoseconds, which datetime does not take."""
    head, _, frac = rfc3339.rstrip("Z").partition(".")
    return datetime.fromisoformat(head).replace(tzinfo=timezone.utc).timestamp() + float(f"0.{frac or 0}")


def missing_binaries() -> list[str]:
    """Debian binaries the stack needs and this machine lacks (apt-get install prometheus prometheus-alertmanager)."""
    return [b for b in (PROMETHEUS, ALERTMANAGER) if not Path(b).exists()]


@dataclass
class Exporter:
    node: str
    port: int
    proc: Proc
    xid_log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Stack:
    """Everything on 127.0.0.1, in one temporary folder; close() stops every process."""

    def __init__(self, *, interval: str = "1s", slow_interval: str = "2s", keep_dir: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="gpu-health-stack-"))
        self.interval = interval
        self.slow_interval = slow_interval
        self.keep_dir = keep_dir
        self.exporters: dict[str, Exporter] = {}
        self.prometheus: Proc | None = None
        self.alertmanager: Proc | None = None
        self.prom_port = free_port()
        self.am_port = free_port()
        self.extra: list[Proc] = []

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for proc in [*self.extra, *(e.proc for e in self.exporters.values()), self.prometheus, self.alertmanager]:
            if proc is not None:
                proc.stop()
        if not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    # --- exporters -----------------------------------------------------------------------

    def add_exporter(self, node: str, sim: dict[str, Any] | None = None, *, expected_gpus: int | None = 8) -> Exporter:
        home = self.dir / "nodes" / node
        home.mkdir(parents=True, exist_ok=True)
        (home / "sim.yaml").write_text(yaml.safe_dump(sim or {"gpus": 8}))
        (home / "boot_id").write_text(f"boot-{node}-1\n")
        xid_log = home / "kern.log"
        xid_log.touch()
        port = free_port()
        argv = [
            sys.executable, "-m", "exporter", "--backend", "sim", "--sim-config", str(home / "sim.yaml"),
            "--node-name", node, "--web.listen-address", f"127.0.0.1:{port}", "--state-dir", str(home / "state"),
            "--xid.source", f"file:{xid_log}", "--xid.boot-id-file", str(home / "boot_id"),
            "--xid.nvml-events", "off", "--collect-interval", self.interval,
            "--collect-interval.slow", self.slow_interval, "--collect-timeout", "500ms", "--log.level", "warn",
        ]
        if expected_gpus is not None:
            argv += ["--expected-gpus", str(expected_gpus)]
        proc = Proc(f"exporter-{node}", argv, self.dir, cwd=ROOT)
        exporter = Exporter(node, port, proc, xid_log)
        self.exporters[node] = exporter
        proc.wait_http(f"{exporter.url}/healthz")
        return exporter

    def restart_exporter(self, node: str) -> None:
        exporter = self.exporters[node]
        exporter.proc.stop()
        exporter.proc.start()
        exporter.proc.wait_http(f"{exporter.url}/healthz")

    def inject_xid(self, node: str, line: str) -> None:
        """Append a kernel-log line to the node's log, which its exporter follows."""
        with open(self.exporters[node].xid_log, "a", encoding="utf-8") as fh:
            fh.write(line.rstrip("\n") + "\n")

    # --- Prometheus ----------------------------------------------------------------------

    def start_prometheus(self, extra_scrape_configs: list[dict[str, Any]] | None = None) -> None:
        config = {
            "global": {"scrape_interval": self.interval, "evaluation_interval": self.interval,
                       "scrape_timeout": self.interval},
            "rule_files": [str(p) for p in sorted((ROOT / "rules").glob("*.rules.yaml"))]
            + [str(p) for p in sorted((ROOT / "rules").glob("*.alerts.yaml"))],
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{self.am_port}"]}]}]},
            "scrape_configs": [
                {
                    "job_name": "gpu-health-exporter",
                    "honor_labels": True,
                    "static_configs": [
                        {"targets": [f"127.0.0.1:{e.port}"], "labels": {"node": e.node}}
                        for e in self.exporters.values()
                    ],
                },
                *(extra_scrape_configs or []),
            ],
        }
        path = self.dir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.prometheus = Proc("prometheus", [
            PROMETHEUS, f"--config.file={path}", f"--storage.tsdb.path={self.dir / 'prom-data'}",
            f"--web.listen-address=127.0.0.1:{self.prom_port}", "--web.enable-lifecycle",
            f"--web.external-url=http://127.0.0.1:{self.prom_port}",
        ], self.dir)
        self.prometheus.wait_http(f"{self.prom_url}/-/ready")
        # Prometheus holds new targets back for about 5 s; wait until every exporter is scraped.
        wait_until(lambda: self.query('count(up{job="gpu-health-exporter"} == 1)') == [len(self.exporters)]
                   or None, 30, "Prometheus to scrape every exporter")

    @property
    def prom_url(self) -> str:
        return f"http://127.0.0.1:{self.prom_port}"

    def query(self, expr: str) -> list[float]:
        """Values of an instant query, in result order."""
        data = http_json(f"{self.prom_url}/api/v1/query?query={urllib.parse.quote(expr)}")
        return [float(r["value"][1]) for r in data["data"]["result"]]

    def query_series(self, expr: str) -> list[dict[str, Any]]:
        data = http_json(f"{self.prom_url}/api/v1/query?query={urllib.parse.quote(expr)}")
        return list(data["data"]["result"])

    def wait_rule_evaluations(self, since: float, rounds: int = 3, timeout: float = 30) -> None:
        """Wait until every rule group has been evaluated `rounds` intervals after `since` (unix time)."""
        step = float(self.interval.rstrip("s"))

        def evaluated() -> bool:
            groups = http_json(f"{self.prom_url}/api/v1/rules")["data"]["groups"]
            return bool(groups) and all(_unix(g["lastEvaluation"]) >= since + rounds * step for g in groups)

        wait_until(evaluated, timeout, f"{rounds} rule evaluations")

    def prometheus_alerts(self, state: str = "firing") -> list[dict[str, Any]]:
        data = http_json(f"{self.prom_url}/api/v1/alerts")
        return [a for a in data["data"]["alerts"] if a["state"] == state]

    # --- Alertmanager --------------------------------------------------------------------

    def start_alertmanager(self, webhook_url: str | None = None, token_file: Path | None = None) -> None:
        """The shipped route (deploy/alertmanager/alertmanager.yml) with test timings and local endpoints."""
        config = yaml.safe_load((ROOT / "deploy" / "alertmanager" / "alertmanager.yml").read_text())

        def fast(route: dict[str, Any]) -> None:
            # group_wait 0s and group_interval 1s: the test configuration's latency, not the production one.
            for key, value in (("group_wait", "0s"), ("group_interval", "1s")):
                if key in route or route is config["route"]:
                    route[key] = value
            for child in route.get("routes", []):
                fast(child)

        fast(config["route"])
        for receiver in config["receivers"]:
            for hook in receiver.get("webhook_configs", []):
                if webhook_url is None:
                    receiver.pop("webhook_configs")
                    break
                hook["url"] = webhook_url
                auth = hook.get("http_config", {}).get("authorization")
                if auth is not None:
                    if token_file is None:
                        hook["http_config"].pop("authorization")
                    else:
                        auth["credentials_file"] = str(token_file)
        path = self.dir / "alertmanager.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.alertmanager = Proc("alertmanager", [
            ALERTMANAGER, f"--config.file={path}", f"--storage.path={self.dir / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{self.am_port}", "--cluster.listen-address=",
            f"--web.external-url=http://127.0.0.1:{self.am_port}",
        ], self.dir)
        self.alertmanager.wait_http(f"{self.am_url}/-/ready")

    @property
    def am_url(self) -> str:
        return f"http://127.0.0.1:{self.am_port}"

    def restart_alertmanager(self) -> None:
        assert self.alertmanager is not None
        self.alertmanager.stop()
        self.alertmanager.start()
        self.alertmanager.wait_http(f"{self.am_url}/-/ready")

    def am_alerts(self) -> list[dict[str, Any]]:
        return list(json.loads(http_get(f"{self.am_url}/api/v2/alerts")))
