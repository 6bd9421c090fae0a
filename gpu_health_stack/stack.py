"""The stack: exporters with simulated GPUs, Prometheus with rules/, Alertmanager with the shipped route."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from collections.abc import Callable, Sequence
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


@dataclass(frozen=True)
class Timings:
    """The latency-relevant settings of a stack. The defaults are the test configuration: 1 s scrape and
    evaluation, group_wait 0s and group_interval 1s on every route, exporters collecting every 1 s (slow tier 2 s).
    `Timings.fast_path()` reads the shipped production fast path from deploy/ instead."""

    scrape_interval: str = "1s"
    evaluation_interval: str = "1s"
    collect_interval: str = "1s"
    slow_interval: str = "2s"
    # None: Alertmanager's routes keep the values of the file they come from.
    group_wait: str | None = "0s"
    group_interval: str | None = "1s"
    repeat_interval: str | None = None
    # Prometheus re-sends a firing alert (with its current annotations) this often; None: its default, 1m.
    resend_delay: str | None = None
    prometheus_file: Path | None = None  # scrape and rule settings taken from this file (targets are ours)
    alertmanager_file: Path = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"

    @classmethod
    def fast_path(cls) -> Timings:
        """deploy/prometheus/prometheus.fast-path.yml and deploy/alertmanager/alertmanager.fast-path.yml exactly;
        the exporter at its defaults (5 s, slow tier 30 s: Xids are published at once, not on the cycle)."""
        prom = ROOT / "deploy" / "prometheus" / "prometheus.fast-path.yml"
        cfg = yaml.safe_load(prom.read_text())
        job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "gpu-health-exporter")
        return cls(scrape_interval=job.get("scrape_interval", cfg["global"]["scrape_interval"]),
                   evaluation_interval=cfg["global"]["evaluation_interval"], collect_interval="5s",
                   slow_interval="30s", group_wait=None, group_interval=None, prometheus_file=prom,
                   alertmanager_file=ROOT / "deploy" / "alertmanager" / "alertmanager.fast-path.yml")


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    import re

    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration))


class Stack:
    """Everything on 127.0.0.1, in one temporary folder; close() stops every process."""

    def __init__(self, *, timings: Timings | None = None, keep_dir: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="gpu-health-stack-"))
        self.timings = timings or Timings()
        self.interval = self.timings.evaluation_interval
        self.keep_dir = keep_dir
        self.exporters: dict[str, Exporter] = {}
        self.prometheus: Proc | None = None
        self.alertmanager: Proc | None = None
        self.prom_port = free_port()
        self.am_port = free_port()
        self.extra: list[Proc] = []
        self.closers: list[Any] = []  # objects with close(), closed last-in first-out after the processes
        # More of the exporter job (gpu_health_stack.fleetsim.FleetSim.attach): lists appended to the job's own
        # (file_sd_configs, relabel_configs), and how many more of its targets start_prometheus waits to see up.
        self.exporter_job_extra: dict[str, list[Any]] = {}
        self.exporter_job_targets: Callable[[], int] = lambda: 0
        # Where Prometheus sends alerts: the stack's one Alertmanager, or every peer of a cluster (am_cluster).
        self.alertmanager_targets: list[str] | None = None

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for proc in [*self.extra, *(e.proc for e in self.exporters.values()), self.prometheus, self.alertmanager]:
            if proc is not None:
                proc.stop()
        while self.closers:
            try:
                self.closers.pop().close()
            except Exception:  # noqa: BLE001 - closing the rest matters more
                pass
        if not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    # --- exporters -----------------------------------------------------------------------

    def add_exporter(self, node: str, sim: dict[str, Any] | None = None, *, expected_gpus: int | None = 8,
                     extra_args: Sequence[str] = (), driver: bool = False) -> Exporter:
        """`driver`: the node gets a simulated driver (sim-config driver_dir: device files its NVML holds open,
        resets that end faults) and the fake nvidia-smi, so that run_executor_job can run a reset Job on it."""
        home = self.dir / "nodes" / node
        home.mkdir(parents=True, exist_ok=True)
        sim = dict(sim or {"gpus": 8})
        if driver:
            from .nvidia_smi import install_nvidia_smi

            sim["driver_dir"] = str(home / "driver")
            install_nvidia_smi(home / "bin", home / "sim.yaml")
        (home / "sim.yaml").write_text(yaml.safe_dump(sim))
        (home / "boot_id").write_text(f"boot-{node}-1\n")
        xid_log = home / "kern.log"
        xid_log.touch()
        port = free_port()
        argv = [
            sys.executable, "-m", "exporter", "--backend", "sim", "--sim-config", str(home / "sim.yaml"),
            "--node-name", node, "--web.listen-address", f"127.0.0.1:{port}", "--state-dir", str(home / "state"),
            "--xid.source", f"file:{xid_log}", "--xid.boot-id-file", str(home / "boot_id"),
            "--xid.nvml-events", "off", "--collect-interval", self.timings.collect_interval,
            "--collect-interval.slow", self.timings.slow_interval, "--collect-timeout", "500ms",
            "--log.level", "warn",
        ]
        if expected_gpus is not None:
            argv += ["--expected-gpus", str(expected_gpus)]
        argv += list(extra_args)
        proc = Proc(f"exporter-{node}", argv, self.dir, cwd=ROOT)
        exporter = Exporter(node, port, proc, xid_log)
        self.exporters[node] = exporter
        proc.wait_http(f"{exporter.url}/healthz")
        return exporter

    def run_executor_job(self, node: str, job: dict[str, Any], *, timeout: float = 120,
                         env: dict[str, str] | None = None) -> tuple[int, str]:
        """The kubelet's part for an executor Job pinned to a simulated node (added with driver=True): run its
        container's command as it stands, with the node's paths in the environment the script reads (device
        files, the exporter's state dir, no driver root, a termination log). (exit code, termination log)."""
        home = self.dir / "nodes" / node
        container = job["spec"]["template"]["spec"]["containers"][0]
        log = home / f"termination-log-{job['metadata']['name']}"
        environ = {e["name"]: e["value"] for e in container.get("env") or [] if "value" in e}
        environ.update({"PATH": f"{home / 'bin'}:/usr/bin:/bin", "LANG": "C", "GPU_HEALTH_DEV": str(home / "driver" / "dev"),
                    "GPU_HEALTH_EXPORTER_STATE": str(home / "state"),
                    "GPU_HEALTH_DRIVER_ROOT": str(home / "no-driver-root"), "GPU_HEALTH_TERMINATION_LOG": str(log),
                    **(env or {})})
        out = subprocess.run(list(container["command"]), env=environ, capture_output=True, text=True, timeout=timeout,
                             check=False)
        (home / f"job-{job['metadata']['name']}.log").write_text(out.stdout + out.stderr)
        return out.returncode, log.read_text() if log.exists() else ""

    def restart_exporter(self, node: str, *, new_boot: bool = False) -> None:
        """Stop and start the node's exporter; `new_boot` gives it a new boot id (the machine rebooted)."""
        exporter = self.exporters[node]
        exporter.proc.stop()
        if new_boot:
            boot = exporter.xid_log.parent / "boot_id"
            n = int(boot.read_text().strip().rsplit("-", 1)[1]) + 1
            boot.write_text(f"boot-{node}-{n}\n")
            exporter.xid_log.write_text("")
        exporter.proc.start()
        exporter.proc.wait_http(f"{exporter.url}/healthz")

    def kill_exporter(self, node: str) -> None:
        self.exporters[node].proc.kill()

    def start_exporter(self, node: str) -> None:
        exporter = self.exporters[node]
        exporter.proc.start()
        exporter.proc.wait_http(f"{exporter.url}/healthz")

    def inject_xid(self, node: str, line: str) -> None:
        """Append a kernel-log line to the node's log, which its exporter follows."""
        with open(self.exporters[node].xid_log, "a", encoding="utf-8") as fh:
            fh.write(line.rstrip("\n") + "\n")

    # --- Prometheus ----------------------------------------------------------------------

    def prometheus_config(self, extra_scrape_configs: list[dict[str, Any]] | None = None, *,
                          send_alerts: bool = True) -> dict[str, Any]:
        """Prometheus' configuration: rules/, the exporters (and extra jobs), the stack's Alertmanager, and the
        timings (with a prometheus_file, its global and exporter-job settings)."""
        t = self.timings
        timeout = min(seconds(t.scrape_interval), 10.0)
        exporter_job: dict[str, Any] = {"job_name": "gpu-health-exporter", "honor_labels": True}
        config: dict[str, Any] = {
            "global": {"scrape_interval": t.scrape_interval, "evaluation_interval": t.evaluation_interval,
                       "scrape_timeout": f"{timeout:g}s"},
        }
        if t.prometheus_file is not None:
            # The file's global and job settings (intervals, honor_labels), with our targets and rule paths.
            shipped = yaml.safe_load(t.prometheus_file.read_text())
            config["global"] = {**shipped.get("global", {}), **{k: v for k, v in config["global"].items()
                                                                if k not in shipped.get("global", {})}}
            job = next(j for j in shipped["scrape_configs"] if j["job_name"] == "gpu-health-exporter")
            exporter_job.update({k: v for k, v in job.items() if k not in ("file_sd_configs", "static_configs")})
        exporter_job["static_configs"] = [{"targets": [f"127.0.0.1:{e.port}"], "labels": {"node": e.node}}
                                          for e in self.exporters.values()]
        for key, items in self.exporter_job_extra.items():
            exporter_job[key] = [*exporter_job.get(key, []), *items]
        config.update({
            "rule_files": [str(p) for p in sorted((ROOT / "rules").glob("*.rules.yaml"))]
            + [str(p) for p in sorted((ROOT / "rules").glob("*.alerts.yaml"))],
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": self.alertmanager_targets
                                                                or [f"127.0.0.1:{self.am_port}"]}]}]
                         if send_alerts else []},
            "scrape_configs": [exporter_job, *(extra_scrape_configs or [])],
        })
        return config

    def start_prometheus(self, extra_scrape_configs: list[dict[str, Any]] | None = None) -> None:
        t = self.timings
        path = self.dir / "prometheus.yml"
        path.write_text(yaml.safe_dump(self.prometheus_config(extra_scrape_configs), sort_keys=False))
        self.prometheus = Proc("prometheus", [
            PROMETHEUS, f"--config.file={path}", f"--storage.tsdb.path={self.dir / 'prom-data'}",
            f"--web.listen-address=127.0.0.1:{self.prom_port}", "--web.enable-lifecycle",
            f"--web.external-url=http://127.0.0.1:{self.prom_port}",
            *([f"--rules.alert.resend-delay={t.resend_delay}"] if t.resend_delay else []),
        ], self.dir)
        self.prometheus.wait_http(f"{self.prom_url}/-/ready")
        # Prometheus holds new targets back for about 5 s; wait until every exporter is scraped.
        wait_until(lambda: self.query('count(up{job="gpu-health-exporter"} == 1)')
                   == [len(self.exporters) + self.exporter_job_targets()]
                   or None, 30 + 2 * seconds(t.scrape_interval), "Prometheus to scrape every exporter")

    def reload_prometheus(self, extra_scrape_configs: list[dict[str, Any]] | None = None, *,
                          send_alerts: bool = True) -> None:
        """Write a new configuration (another relabelling of the webhook's job; `send_alerts` False: Prometheus
        cannot reach Alertmanager) and POST /-/reload."""
        path = self.dir / "prometheus.yml"
        path.write_text(yaml.safe_dump(self.prometheus_config(extra_scrape_configs, send_alerts=send_alerts),
                                       sort_keys=False))
        http_json(f"{self.prom_url}/-/reload", {}, "POST")

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
        step = seconds(self.timings.evaluation_interval)

        def evaluated() -> bool:
            groups = http_json(f"{self.prom_url}/api/v1/rules")["data"]["groups"]
            # A group with an interval of its own (the 5-minute NVLink history) is not waited for.
            return bool(groups) and all(_unix(g["lastEvaluation"]) >= since + rounds * step for g in groups
                                        if float(g.get("interval") or step) <= step)

        wait_until(evaluated, timeout, f"{rounds} rule evaluations")

    def prometheus_alerts(self, state: str = "firing") -> list[dict[str, Any]]:
        data = http_json(f"{self.prom_url}/api/v1/alerts")
        return [a for a in data["data"]["alerts"] if a["state"] == state]

    # --- Alertmanager --------------------------------------------------------------------

    def alertmanager_config(self, webhook_url: str | None = None, token_file: Path | None = None) -> dict[str, Any]:
        """The shipped route (Timings.alertmanager_file: deploy/alertmanager/alertmanager.yml unless told otherwise)
        with local endpoints and, unless the timings keep the file's, the test configuration's timings."""
        config = yaml.safe_load(self.timings.alertmanager_file.read_text())
        t = self.timings

        def fast(route: dict[str, Any]) -> None:
            # group_wait 0s and group_interval 1s: the test configuration's latency, not the production one.
            for key, value in (("group_wait", t.group_wait), ("group_interval", t.group_interval),
                               ("repeat_interval", t.repeat_interval)):
                if value is not None and (key in route or route is config["route"]):
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
        return config

    def start_alertmanager(self, webhook_url: str | None = None, token_file: Path | None = None) -> None:
        path = self.dir / "alertmanager.yml"
        path.write_text(yaml.safe_dump(self.alertmanager_config(webhook_url, token_file), sort_keys=False))
        self.alertmanager = Proc("alertmanager", [
            ALERTMANAGER, f"--config.file={path}", f"--storage.path={self.dir / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{self.am_port}", "--cluster.listen-address=",
            f"--web.external-url=http://127.0.0.1:{self.am_port}",
        ], self.dir)
        self.alertmanager.wait_http(f"{self.am_url}/-/ready")

    @property
    def am_url(self) -> str:
        return f"http://127.0.0.1:{self.am_port}"

    def restart_alertmanager(self, *, crash: bool = False) -> None:
        """Stop (SIGTERM: Alertmanager saves its notification log; `crash`: SIGKILL, it saves nothing) and start."""
        assert self.alertmanager is not None
        if crash:
            self.alertmanager.kill()
        else:
            self.alertmanager.stop()
        self.alertmanager.start()
        self.alertmanager.wait_http(f"{self.am_url}/-/ready")

    def am_alerts(self) -> list[dict[str, Any]]:
        return list(json.loads(http_get(f"{self.am_url}/api/v2/alerts")))

    def post_am_alerts(self, alerts: list[dict[str, Any]]) -> None:
        """Send alerts to Alertmanager as Prometheus does (POST /api/v2/alerts)."""
        http_json(f"{self.am_url}/api/v2/alerts", alerts, "POST")
