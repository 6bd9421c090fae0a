#!/usr/bin/env python3
"""What the fleet simulator (gpu_health_stack.fleetsim) costs at N simulated 8-GPU nodes, beside Debian's Prometheus.

Run from the repository's venv:

    .venv/bin/python benchmarks/fleet_sim.py --nodes 1000                 # with Prometheus (rules/, 15 s), ~5 min
    .venv/bin/python benchmarks/fleet_sim.py --nodes 1000 --no-prometheus  # this script scrapes every 15 s itself

It starts `python -m gpu_health_stack.fleetsim --nodes N` (collection every 15 s, slow tier 60 s), then Prometheus
with rules/ at a 15 s scrape and evaluation interval over the simulator's targets.json (gpu_health_stack.stack.Stack,
the same configuration the end-to-end tests use), waits until every node is `up` and one more interval, and measures
over --window seconds:

* the simulator's CPU in cores: utime+stime from /proc/<pid>/stat over the window, divided by the window;
* its RSS (VmRSS) and thread count at the end;
* scrape latency per node target: every `scrape_duration_seconds` of the window (p50, p99, max over all targets'
  scrapes), as Prometheus measured them; without Prometheus, this script's own sequential keep-alive scrapes,
  one per node per interval;
* the simulator's own figures: mean CPU per node cycle and the largest lag of its shared schedule;
* Prometheus' CPU and RSS over the same window, for the 2-core budget.

The last line is exactly `fleet_sim_cpu_cores=<cores>`.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gpu_health_stack.fleetsim import FleetSim  # noqa: E402
from gpu_health_stack.procs import http_get, http_json  # noqa: E402
from gpu_health_stack.stack import Stack, Timings, missing_binaries  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), from /proc/<pid>/stat, in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        data = fh.read()
    fields = data[data.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_fleet(args: argparse.Namespace, directory: Path) -> tuple[subprocess.Popen[str], int, str]:
    argv = [sys.executable, "-m", "gpu_health_stack.fleetsim", "--nodes", str(args.nodes), "--dir", str(directory),
            "--collect-interval", args.interval, "--collect-interval.slow", args.slow_interval,
            *(f"--exporter-flag={flag}" for flag in args.exporter_flag)]
    with open(directory.parent / "fleetsim.log", "w") as err:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until every node ran its first cycle
    m = re.search(r"listening on http://([\d.]+):(\d+) .*started_in=([\d.]+)s", line)
    if m is None:
        proc.kill()
        raise SystemExit(f"fleetsim did not start: {line!r}; see {directory.parent / 'fleetsim.log'}")
    return proc, int(m.group(2)), m.group(3)


def own_scrapes(port: int, nodes: list[str], interval: float, until: float) -> list[float]:
    """One scrape per node per interval, sequential over keep-alive connections, as evenly spread as Prometheus."""
    conns: dict[str, http.client.HTTPConnection] = {}
    took: list[float] = []
    step = interval / len(nodes)
    next_at = time.monotonic()
    i = 0
    while time.monotonic() < until:
        node = nodes[i % len(nodes)]
        i += 1
        conn = conns.get(node) or conns.setdefault(node, http.client.HTTPConnection("127.0.0.1", port, timeout=10))
        t0 = time.monotonic()
        conn.request("GET", f"/node/{node}/metrics")
        resp = conn.getresponse()
        resp.read()
        took.append(time.monotonic() - t0)
        next_at += step
        time.sleep(max(0.0, next_at - time.monotonic()))
    for conn in conns.values():
        conn.close()
    return took


def prom(stack: Stack, expr: str) -> list[dict[str, Any]]:
    """An instant query, with the patience a Prometheus busy with 1,000 targets needs."""
    data = http_json(f"{stack.prom_url}/api/v1/query?query={urllib.parse.quote(expr)}", timeout=120)
    return list(data["data"]["result"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--interval", default="15s", help="scrape, evaluation and collection interval (default 15s)")
    p.add_argument("--slow-interval", default="60s", help="the nodes' slow collection tier (default 60s)")
    p.add_argument("--window", type=float, default=120.0, help="seconds measured (default 120)")
    p.add_argument("--no-prometheus", dest="prometheus", action="store_false")
    p.add_argument("--exporter-flag", action="append", default=[], metavar="FLAG",
                   help="an exporter flag every node gets, e.g. --exporter-flag=--collector.nvlink.per-link")
    args = p.parse_args()
    interval = float(args.interval.rstrip("s"))
    if args.prometheus and missing_binaries():
        raise SystemExit(f"needs {missing_binaries()} (or --no-prometheus)")
    scratch = Path(tempfile.mkdtemp(prefix="fleet-sim-bench-"))
    proc = None
    stack = None
    try:
        t0 = time.monotonic()
        proc, port, started_in = start_fleet(args, scratch / "fleet")
        print(f"fleetsim: {args.nodes} nodes of 8 GPUs started in {started_in} s (pid {proc.pid}, port {port})",
              flush=True)
        nodes = [g["labels"]["node"] for g in http_json(f"http://127.0.0.1:{port}/sd", timeout=30)]
        prom_pid = None
        if args.prometheus:
            stack = Stack(timings=Timings(scrape_interval=args.interval, evaluation_interval=args.interval))
            stack.exporter_job_extra = {"file_sd_configs": [{"files": [str(scratch / "fleet" / "targets.json")]}],
                                        "relabel_configs": FleetSim.relabel_configs()}
            stack.exporter_job_targets = lambda: args.nodes
            stack.start_prometheus()
            assert stack.prometheus is not None and stack.prometheus.popen is not None
            prom_pid = stack.prometheus.popen.pid
            print(f"prometheus: every node up after {time.monotonic() - t0:.0f} s", flush=True)
        time.sleep(interval)  # one full interval of steady state before measuring
        own0 = _own(port)
        c0, w0 = cpu_seconds(proc.pid), time.monotonic()
        p0 = cpu_seconds(prom_pid) if prom_pid else 0.0
        took: list[float] = []
        if args.prometheus:
            time.sleep(args.window)
        else:
            took = own_scrapes(port, nodes, interval, w0 + args.window)
        c1, w1 = cpu_seconds(proc.pid), time.monotonic()
        p1 = cpu_seconds(prom_pid) if prom_pid else 0.0
        own1 = _own(port)
        window = w1 - w0
        cores = (c1 - c0) / window
        cycles = own1["fleetsim_cycles_total"] - own0["fleetsim_cycles_total"]
        cycle_s = own1["fleetsim_cycle_seconds_total"] - own0["fleetsim_cycle_seconds_total"]
        print(f"window: {window:.0f} s, {cycles:.0f} node cycles ({cycles / window * interval:.0f} per interval), "
              f"{1000 * cycle_s / max(cycles, 1):.2f} ms wall per cycle, schedule lag last "
              f"{own1['fleetsim_schedule_lag_seconds_last']:.2f} s, max since start (start-up included) "
              f"{own1['fleetsim_schedule_lag_seconds_max']:.2f} s")
        print(f"fleetsim: {cores:.3f} cores, RSS {status(proc.pid, 'VmRSS') / 1024:.0f} MiB, "
              f"{status(proc.pid, 'Threads')} threads", flush=True)
        if stack is not None and prom_pid is not None:
            print(f"prometheus: {(p1 - p0) / window:.3f} cores, RSS {status(prom_pid, 'VmRSS') / 1024:.0f} MiB",
                  flush=True)
            print(f"together: {cores + (p1 - p0) / window:.3f} of {os.cpu_count()} cores", flush=True)
            result = prom(stack, f'scrape_duration_seconds{{job="gpu-health-exporter"}}[{int(window)}s]')
            took = [float(v) for r in result for _, v in r["values"]]
            up = prom(stack, 'count(up{job="gpu-health-exporter"} == 1)')
            samples = prom(stack, 'sum(scrape_samples_scraped{job="gpu-health-exporter"})')
            print(f"prometheus: {float(up[0]['value'][1]) if up else 0:.0f} targets up, "
                  f"{float(samples[0]['value'][1]) if samples else 0:.0f} samples per round of scrapes")
        print(f"scrape latency per node target ({len(took)} scrapes, {'Prometheus' if stack else 'this script'}): "
              f"p50 {1000 * pct(took, 0.5):.1f} ms, p99 {1000 * pct(took, 0.99):.1f} ms, "
              f"max {1000 * max(took, default=float('nan')):.1f} ms")
        print(f"fleet_sim_cpu_cores={cores:.3f}")
    finally:
        close_all(stack, proc, scratch)
    return 0


def close_all(stack: Stack | None, proc: subprocess.Popen[str] | None, scratch: Path) -> None:
    """Prometheus, then the simulator (SIGTERM to its process group, SIGKILL after 30 s), then the scratch folder."""
    if stack is not None:
        stack.close()
    if proc is not None:
        stop_fleet(proc)
    shutil.rmtree(scratch, ignore_errors=True)


def stop_fleet(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def _own(port: int) -> dict[str, float]:
    """The simulator's own /metrics, flattened: name plus the `of` label's value when there is one."""
    out: dict[str, float] = {}
    for line in http_get(f"http://127.0.0.1:{port}/metrics", timeout=30).decode().splitlines():
        if line.startswith("#") or not line:
            continue
        key, value = line.rsplit(" ", 1)
        m = re.match(r'(\w+)(?:\{\w+="(\w+)"\})?', key)
        assert m is not None
        out[m.group(1) + (f"_{m.group(2)}" if m.group(2) else "")] = float(value)
    return out


if __name__ == "__main__":
    threading.current_thread().name = "fleet-sim-bench"
    sys.exit(main())
