"""Webhook accept throughput: notifications/s answered 200 (each after its synchronous=FULL journal commit) and
the p99 accept latency, in dry-run.

The receiver runs in a child process exactly as `gpu-health-webhook` builds it, except that the inventory is
a static list of nodes and the Kubernetes API is an in-memory stand-in (dry-run only reads it), so the
engine's background work runs too. The parent posts Alertmanager-shaped notifications from C concurrent
connections: every notification is a new alert occurrence (firing) for one of N nodes, and every fourth is
re-sent once (a duplicate), as Alertmanager's repeats and HA peers do.

    python benchmarks/webhook_throughput.py [--notifications 4000] [--concurrency 32] [--nodes 500]

The last line is `webhook_notifications_per_s=<value>`. Targets: >= 500/s and p99 <= 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class MemoryKube:
    """Just enough of KubeApi for dry-run: nodes exist, have no pods; writes never reach it."""

    async def read_node(self, name: str) -> dict[str, Any]:
        return {"metadata": {"name": name, "uid": f"uid-{name}", "creationTimestamp": "2020-01-01T00:00:00Z",
                             "labels": {"pool": "gpu"}}, "spec": {"providerID": f"static://{name}"}}

    async def list_nodes(self, label_selector: str = "") -> list[dict[str, Any]]:
        return []

    async def patch_node(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        raise AssertionError("dry-run must not write")

    async def list_pods_on_node(self, node: str) -> list[dict[str, Any]]:
        return []

    async def evict_pod(self, namespace: str, name: str, grace: int | None) -> None:
        raise AssertionError("dry-run must not write")

    async def delete_pod(self, namespace: str, name: str, grace: int | None) -> None:
        raise AssertionError("dry-run must not write")

    async def create_event(self, namespace: str, body: dict[str, Any]) -> None:
        raise AssertionError("dry-run must not write")

    async def ping(self) -> None:
        return None

    def close(self) -> None:
        return None


def config(directory: Path, port: int, nodes: int) -> dict[str, Any]:
    return {
        "web": {"listen_address": f"127.0.0.1:{port}"},
        "admin": {"listen_address": "127.0.0.1:0"},
        "journal": {"path": str(directory / "journal.db")},
        "inventory": {"kind": "static", "nodes": {f"gpu-{i:04d}": {"labels": {"pool": "gpu"}} for i in range(nodes)}},
        "kubernetes": {"host": "http://127.0.0.1:9"},
        "policy": {"dry_run": True, "rules": [{"name": "gpu", "match_re": {"alertname": "GPU.*"},
                                               "ladder": ["cordon", "drain"]}]},
        # A benchmark of the accept path, not of the breaker: keep it closed (everything else at its default,
        # so a node's later occurrences merge into its remediation or meet its cooldown, as in production).
        "safety": {"breaker": {"max_nodes": 1_000_000, "max_percent": 100}},
        "engine": {"tick": "1s"},
    }


async def serve(port: int, directory: Path, nodes: int) -> None:
    from aiohttp import web

    from remediation_webhook.app import create_app
    from remediation_webhook.cli import build_services
    from remediation_webhook.config import build_config

    cfg = build_config(config(directory, port, nodes), base=directory)
    services = await build_services(cfg, kube=MemoryKube())  # type: ignore[arg-type]
    await services.engine.start()
    runner = web.AppRunner(create_app(services), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await services.engine.stop()
        services.journal.close()


def body(i: int, node: str, starts: str) -> bytes:
    labels = {"alertname": "GPUXidFatal", "node": node, "severity": "critical", "remediation": "cordon", "gpu": "0",
              "uuid": "GPU-1b2c3d4e-0000-1111-2222-333344445555", "xid": "79"}
    return json.dumps({
        "version": "4", "groupKey": f'{{}}:{{alertname="GPUXidFatal", node="{node}"}}', "truncatedAlerts": 0,
        "status": "firing", "receiver": "gpu\\-remediation", "groupLabels": {"alertname": "GPUXidFatal", "node": node},
        "commonLabels": labels, "commonAnnotations": {"summary": "Xid 79"}, "externalURL": "http://alertmanager:9093",
        "alerts": [{"status": "firing", "labels": labels, "annotations": {"summary": "Xid 79"}, "startsAt": starts,
                    "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "http://prometheus:9090/graph",
                    "fingerprint": f"{i:016x}"}]}).encode()


async def load(port: int, total: int, concurrency: int, nodes: int) -> tuple[float, list[float], int]:
    import aiohttp

    url = f"http://127.0.0.1:{port}/v1/alerts"
    starts = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() - 60))
    bodies = []
    for i in range(total):
        if i % 4 == 3:
            bodies.append(bodies[-1])  # a duplicate delivery
        else:
            bodies.append(body(i, f"gpu-{i % nodes:04d}", starts))
    latencies: list[float] = []
    errors = 0
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    headers = {"Content-Type": "application/json", "User-Agent": "Alertmanager/0.25.0"}

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while not queue.empty():
            b = queue.get_nowait()
            t0 = time.perf_counter()
            async with session.post(url, data=b, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    errors += 1
            latencies.append(time.perf_counter() - t0)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        warm: asyncio.Queue[bytes] = queue
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    del warm
    return elapsed, latencies, errors


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--notifications", type=int, default=4000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--nodes", type=int, default=500)
    p.add_argument("--serve", nargs=2, metavar=("PORT", "DIR"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        asyncio.run(serve(int(args.serve[0]), Path(args.serve[1]), args.nodes))
        return 0

    import socket

    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="webhook-bench-", dir=os.environ.get("BENCH_DIR")) as tmp:
        child = subprocess.Popen([sys.executable, os.environ.get("BENCH_SERVER", __file__), "--serve", str(port), tmp, "--nodes", str(args.nodes)],
                                 stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                if time.monotonic() > deadline or child.poll() is not None:
                    print("receiver did not start", file=sys.stderr)
                    return 1
                time.sleep(0.05)
            asyncio.run(load(port, min(400, args.notifications), args.concurrency, args.nodes))  # warm-up
            elapsed, latencies, errors = asyncio.run(load(port, args.notifications, args.concurrency, args.nodes))
            metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        finally:
            child.terminate()
            child.wait(30)
        journal = Path(tmp) / "journal.db"
        import sqlite3

        db = sqlite3.connect(journal)
        mode = db.execute("PRAGMA journal_mode").fetchone()[0]
        occurrences = db.execute("SELECT COUNT(*) FROM occurrence").fetchone()[0]
        db.close()
    latencies.sort()
    p50 = statistics.median(latencies) * 1000
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
    rate = len(latencies) / elapsed
    dupes = next((line.split()[-1] for line in metrics.splitlines()
                  if line.startswith("gpu_remediation_webhook_duplicate_alerts_total ")), "0")
    print(f"notifications: {len(latencies)} (concurrency {args.concurrency}, {args.nodes} nodes, errors {errors}); "
          f"journal: {mode}, synchronous=FULL, {occurrences} occurrences, duplicates counted {dupes}")
    print(f"accept latency: p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {latencies[-1] * 1000:.1f} ms")
    print(f"targets: >= 500/s {'met' if rate >= 500 else 'MISSED'}; p99 <= 50 ms {'met' if p99 <= 50 else 'MISSED'}")
    print(f"webhook_notifications_per_s={rate:.0f}")
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
