"""Both services under hostile load, measured from the legitimate client's side and by the process's RSS.

Each service runs as its own process behind bcrypt basic auth (cost 10), with its default limits: the exporter
as `gpu-health-exporter --backend sim`; the webhook as `gpu-health-webhook` builds it (cli.serve), in dry-run
with a static inventory and an in-memory stand-in for the Kubernetes API (webhook_throughput.py's). Meanwhile:

- idle:  --idle connections (2,000) held open from 127.0.0.1-8 (250 per address, under the per-client cap),
         half of them after half a request header (slowloris); each one the server closes is opened again;
- flood: --flood-threads clients from 127.0.0.9-12 sending wrong passwords as fast as they are answered;
- legit: from 127.0.0.100, on one kept-alive connection as Prometheus and Alertmanager use, a scrape of the
         exporter's /metrics, or an Alertmanager-shaped notification to the webhook, every --interval seconds
         for --seconds; its latencies are the figure of merit. The first request (its password not yet
         verified, so it waits for a bcrypt check behind the flood's) is reported apart.

Then, for the webhook, --big concurrent deliveries of about 1 MiB each (the largest body it accepts): what the
budget of bytes in flight (web.max_bytes_in_flight, 8 MiB) lets it hold at once.

RSS is read from /proc/<pid>/status: baseline after a warm-up, the peak while under load, and after.

    python benchmarks/hostile_load.py [--idle 2000] [--seconds 30] [--interval 0.1] [--flood-threads 8] [--big 100]

The last line is `hostile_legit_p99_ms=<the larger of the two services' p99>`. Targets: at most 100 ms, and RSS
growth under the idle and flood load at most 20 MiB for each service.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import json
import os
import resource
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import bcrypt
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

USER, PASSWORD = "prom", b"the-right-password"
LEGIT = "127.0.0.100"
NODES = [f"gpu-{i:03d}" for i in range(64)]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def auth(password: bytes) -> str:
    return "Basic " + base64.b64encode(USER.encode() + b":" + password).decode()


# --- the services ----------------------------------------------------------------------------------------------

class Service:
    def __init__(self, name: str, argv: list[str], port: int, tmp: Path, path: str) -> None:
        self.name, self.port, self.path = name, port, path
        self.log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"{name} exited:\n{(tmp / f'{name}.log').read_text()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                conn.request("GET", "/healthz")
                if conn.getresponse().status in (200, 401):
                    conn.close()
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{name} did not start")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def start_exporter(tmp: Path, web_yml: Path) -> Service:
    port = _port()
    return Service("exporter", [sys.executable, "-m", "exporter", "--backend", "sim",
                                "--web.listen-address", f"127.0.0.1:{port}", "--web.config.file", str(web_yml),
                                "--state-dir", "", "--xid.source", "none", "--xid.nvml-events", "off"],
                   port, tmp, "/metrics")


def start_webhook(tmp: Path, web_yml: Path) -> Service:
    port = _port()
    cfg = {
        "web": {"listen_address": f"127.0.0.1:{port}", "config_file": str(web_yml)},
        "admin": {"listen_address": f"127.0.0.1:{_port()}"},
        "journal": {"path": str(tmp / "journal.db")},
        "inventory": {"kind": "static", "nodes": {n: {"labels": {"pool": "gpu"}} for n in NODES}},
        "kubernetes": {"host": "http://127.0.0.1:9"},  # never reached: the stand-in answers
        "policy": {"dry_run": True, "rules": [{"name": "gpu", "match_re": {"alertname": "GPU.*"},
                                               "ladder": ["cordon", "drain"]}]},
        "safety": {"breaker": {"max_nodes": 1_000_000, "max_percent": 100}},
    }
    path = tmp / "webhook.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return Service("webhook", [sys.executable, str(Path(__file__).resolve()), "--child-webhook", str(path)],
                   port, tmp, "/v1/alerts")


def child_webhook(config_path: str) -> int:
    """The webhook as `gpu-health-webhook --config` runs it, with the Kubernetes stand-in."""
    from gpu_health_common import logs
    from gpu_health_common.serving import raise_nofile_limit
    from remediation_webhook.cli import serve
    from remediation_webhook.config import load_config
    from webhook_throughput import MemoryKube

    logs.setup("warning", "logfmt")
    raise_nofile_limit()
    asyncio.run(serve(load_config(config_path), kube=MemoryKube()))  # type: ignore[arg-type]
    return 0


def notification(i: int, annotation_bytes: int = 0) -> bytes:
    node = NODES[i % len(NODES)]
    labels = {"alertname": "GPUXidFatal", "node": node, "severity": "critical", "remediation": "cordon",
              "gpu": "0", "uuid": "GPU-1b2c3d4e-0000-1111-2222-333344445555", "xid": "79"}
    alerts = [{"status": "firing", "labels": labels,
               "annotations": {"summary": "Xid 79", "description": "x" * annotation_bytes},
               "startsAt": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() - 60)),
               "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "http://prometheus:9090/graph",
               "fingerprint": f"{i:016x}"}]
    return json.dumps({
        "version": "4", "groupKey": f'{{}}:{{alertname="GPUXidFatal", node="{node}"}}', "truncatedAlerts": 0,
        "status": "firing", "receiver": "gpu-remediation", "groupLabels": {"alertname": "GPUXidFatal", "node": node},
        "commonLabels": labels, "commonAnnotations": {}, "externalURL": "http://alertmanager:9093",
        "alerts": alerts}).encode()


# --- the load --------------------------------------------------------------------------------------------------

class Idle(threading.Thread):
    """Holds `n` connections open, spread over 127.0.0.1-8; reopens each one the server closes."""

    def __init__(self, port: int, n: int) -> None:
        super().__init__(daemon=True)
        self.port, self.n = port, n
        self.stop = threading.Event()
        self.opened = 0
        self.reopened = 0
        self.refused = 0
        self.sel = selectors.DefaultSelector()

    def _open(self, i: int) -> None:
        s = socket.socket()
        s.setblocking(True)
        s.settimeout(5)
        try:
            s.bind((f"127.0.0.{1 + i % 8}", 0))
            s.connect(("127.0.0.1", self.port))
            if i % 2:
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and never the rest
        except OSError:
            self.refused += 1
            s.close()
            return
        s.setblocking(False)
        self.sel.register(s, selectors.EVENT_READ, i)
        self.opened += 1

    def run(self) -> None:
        for i in range(self.n):
            self._open(i)
        while not self.stop.is_set():
            for key, _ in self.sel.select(0.2):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""
                if not data:  # closed by the server: come back
                    self.sel.unregister(sock)
                    sock.close()
                    self.reopened += 1
                    self._open(key.data)
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]

    def held(self) -> int:
        return len(self.sel.get_map())


class Flood(threading.Thread):
    """Wrong passwords from one address, one request at a time, as fast as they are answered."""

    def __init__(self, port: int, path: str, source: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port, self.path, self.source, self.stop = port, path, source, stop
        self.codes: dict[int, int] = {}

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10, source_address=(self.source, 0))
                conn.request("GET", self.path, headers={"Authorization": auth(b"wrong-%d" % i)})
                code = conn.getresponse().status
                conn.close()
            except OSError:
                code = 0
            self.codes[code] = self.codes.get(code, 0) + 1


def legit(svc: Service, seconds: float, interval: float) -> tuple[float, list[float], int]:
    """(first request's ms, the others' ms, errors)."""
    conn: http.client.HTTPConnection | None = None
    times: list[float] = []
    errors = 0
    i = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        i += 1
        t0 = time.perf_counter()
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10, source_address=(LEGIT, 0))
            headers = {"Authorization": auth(PASSWORD)}
            if svc.name == "webhook":
                headers |= {"Content-Type": "application/json", "User-Agent": "Alertmanager/0.27.0"}
                conn.request("POST", svc.path, body=notification(i), headers=headers)
            else:
                headers |= {"Accept": "text/plain"}
                conn.request("GET", svc.path, headers=headers)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                errors += 1
        except (OSError, http.client.HTTPException):
            errors += 1
            if conn is not None:
                conn.close()
            conn = None
        times.append((time.perf_counter() - t0) * 1000)
        time.sleep(max(0.0, interval - (time.perf_counter() - t0)))
    if conn is not None:
        conn.close()
    return times[0], times[1:], errors


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98] if len(values) >= 2 else (values[0] if values else 0.0)


def under_load(svc: Service, args: argparse.Namespace) -> float:
    # Warm-up: the legitimate client once (its password verified and cached would hide the first-request cost,
    # so a throwaway client with the same password is not used), then the service's own caches.
    for _ in range(5):
        conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
        conn.request("GET", "/healthz")
        conn.getresponse().read()
        conn.close()
    time.sleep(1)
    base = rss_mib(svc.proc.pid)

    idle = Idle(svc.port, args.idle)
    idle.start()
    deadline = time.monotonic() + 60
    while idle.held() < args.idle * 0.95 and time.monotonic() < deadline:
        time.sleep(0.2)
    stop = threading.Event()
    floods = [Flood(svc.port, svc.path if svc.name == "exporter" else "/metrics", f"127.0.0.{9 + i % 4}", stop)
              for i in range(args.flood_threads)]
    for f in floods:
        f.start()
    time.sleep(1)

    peak = [base]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            peak[0] = max(peak[0], rss_mib(svc.proc.pid))
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    held_during = idle.held()
    first, times, errors = legit(svc, args.seconds, args.interval)
    sampling.set()
    sampler.join()
    stop.set()
    idle.stop.set()
    idle.join()
    for f in floods:
        f.join()
    time.sleep(2)
    after = rss_mib(svc.proc.pid)
    codes: dict[int, int] = {}
    for f in floods:
        for k, v in f.codes.items():
            codes[k] = codes.get(k, 0) + v
    q99 = p99(times)
    print(f"{svc.name}: legit {len(times) + 1} requests, {errors} errors; first {first:.1f} ms (password checked), "
          f"then p50 {statistics.median(times):.1f} ms, p99 {q99:.1f} ms, max {max(times):.1f} ms")
    print(f"{svc.name}: idle {held_during} held ({idle.reopened} closed by the server and reopened, "
          f"{idle.refused} refused); flood answers {dict(sorted(codes.items()))}")
    print(f"{svc.name}: RSS {base:.1f} MiB before, {peak[0]:.1f} MiB peak (+{peak[0] - base:.1f}), "
          f"{after:.1f} MiB after")
    return q99


def big_deliveries(svc: Service, n: int) -> None:
    body = notification(0, annotation_bytes=1_040_000)
    assert len(body) <= 1 << 20, len(body)
    base = rss_mib(svc.proc.pid)
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib(svc.proc.pid))
            time.sleep(0.1)

    def post(i: int) -> tuple[int, float]:
        t0 = time.perf_counter()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=60,
                                              source_address=(f"127.0.1.{1 + i % 50}", 0))
            conn.request("POST", svc.path, body=body, headers={"Authorization": auth(PASSWORD),
                                                               "Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            conn.close()
            return resp.status, time.perf_counter() - t0
        except (OSError, http.client.HTTPException):
            return 0, time.perf_counter() - t0

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(post, range(n)))
    done.set()
    sampler.join()
    time.sleep(2)
    after = rss_mib(svc.proc.pid)
    codes: dict[int, int] = {}
    for code, _ in results:
        codes[code] = codes.get(code, 0) + 1
    print(f"webhook: {n} concurrent deliveries of {len(body) / 1048576:.2f} MiB: answers {dict(sorted(codes.items()))}, "
          f"slowest {max(t for _, t in results):.1f} s; RSS {base:.1f} MiB before, {peak[0]:.1f} MiB peak "
          f"(+{peak[0] - base:.1f}), {after:.1f} MiB after")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--flood-threads", type=int, default=8)
    parser.add_argument("--big", type=int, default=100)
    parser.add_argument("--child-webhook", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_webhook:
        return child_webhook(args.child_webhook)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.idle + args.big + 512
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(want, soft)), hard))
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        web_yml = tmp / "web.yml"
        hashed = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(rounds=10)).decode()
        web_yml.write_text(yaml.safe_dump({"basic_auth_users": {USER: hashed}}))
        worst = 0.0
        for start in (start_exporter, start_webhook):
            svc = start(tmp, web_yml)
            try:
                worst = max(worst, under_load(svc, args))
                if svc.name == "webhook" and args.big:
                    big_deliveries(svc, args.big)
            finally:
                svc.stop()
    print(f"hostile_legit_p99_ms={worst:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
