#!/usr/bin/env python3
"""Scrape cost of gpu-health-exporter, and the same scrape served by node_exporter's textfile collector.

Run from the repository's venv:  .venv/bin/python benchmarks/exporter_scrape.py   (about 80 s)

What it does, in one run, on loopback only:

* For 8 and 64 simulated GPUs it starts the real exporter (`python -m exporter --backend sim`) and measures
  /metrics latency (p50/p99 over sequential keep-alive requests), requests/s under a concurrent keep-alive
  load, exporter CPU per scrape (from /proc/<pid>/stat utime+stime, raw and minus the idle collection
  loop's CPU), RSS after the load, and the exposition's size.
* It starts a second exporter per GPU count with --collect-interval 1s --collect-interval.slow 6s (the
  default 5s/30s proportion, sped up) and lets it idle: process CPU over the window divided by the cycles
  run is the "CPU per collection cycle".
* It writes the 8-GPU exposition to a textfile directory, serves it with node_exporter
  (--collector.disable-defaults --collector.textfile) and measures it the same way, and reports both servers'
  CPU per hour at a 15 s scrape interval, serving and collection apart.
* It counts the NVML calls per GPU of a fast-tier and a slow-tier cycle on 8 simulated H100s (18 NVLinks
  each), in-process with call tracing (benchmarks/nvml_calls.py).

Requests carry `Accept-Encoding: gzip`, as Prometheus's do, unless --identity is given; an identity
(uncompressed) requests/s figure is reported as well for the 8-GPU pair. The last line printed is exactly
`ratio_vs_node_exporter=<our requests/s / node_exporter's, 8 GPUs>`.

Uses only the standard library. Every child process is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nvml_calls

REPO = Path(__file__).resolve().parent.parent
NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

TARGET_RATIO = 1.0
TARGET_RSS_MIB = 60.0
TARGET_CYCLE_MS = 5.0


# --- processes -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the benchmark itself dies without cleaning up (Linux prctl)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class Children:
    """Every process started here; stop_all() terminates them, then kills what is left."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: Sequence[str], *, stderr_path: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(
                list(argv), cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                start_new_session=True,  # a Ctrl-C in the terminal reaches us, not them; we stop them ourselves
                preexec_fn=_die_with_parent,
            )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.procs):
            try:
                self.stop(proc)
            except Exception as exc:  # keep stopping the others
                print(f"warning: could not stop pid {proc.pid}: {exc!r}", file=sys.stderr)


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), from /proc/<pid>/stat, in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        data = fh.read()
    # The command name (field 2) may contain spaces; fields after its closing ")" are space separated.
    fields = data[data.rindex(b")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / CLK_TCK


def sched_seconds(pid: int) -> float | None:
    """Precise CPU time summed over the live threads (/proc/<pid>/task/*/schedstat), None if unavailable."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as fh:
                    total += int(fh.read().split()[0])
            except FileNotFoundError:  # a thread that just exited
                continue
    except OSError:
        return None
    return total / 1e9


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# --- HTTP ------------------------------------------------------------------------------------------


def get(conn: http.client.HTTPConnection, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    conn.request("GET", path, headers=headers)
    resp = conn.getresponse()
    body = resp.read()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


def wait_ready(proc: subprocess.Popen[bytes], port: int, stderr_path: Path, deadline_s: float = 60.0) -> float:
    """Poll /metrics until it answers 200 with a body; returns seconds waited. Fails fast if the process died."""
    t0 = time.monotonic()
    delay = 0.02
    while True:
        if proc.poll() is not None:
            err = stderr_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"process exited with {proc.returncode} before serving /metrics:\n{err}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            try:
                status, _, body = get(conn, "/metrics", {})
            finally:
                conn.close()
            if status == 200 and body:
                return time.monotonic() - t0
        except OSError:
            pass
        if time.monotonic() - t0 > deadline_s:
            raise RuntimeError(f"/metrics on port {port} not ready after {deadline_s:.0f}s")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


@dataclass
class LoadResult:
    requests: int
    errors: int
    wall: float
    cpu: float  # target process CPU seconds over the load (utime+stime)
    client_cpu: float  # this process's CPU seconds over the load

    @property
    def rps(self) -> float:
        return self.requests / self.wall if self.wall else 0.0


def latency_run(port: int, headers: dict[str, str], n: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for _ in range(5):  # warm the connection and the server's caches
            get(conn, "/metrics", headers)
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            status, _, body = get(conn, "/metrics", headers)
            out.append(time.perf_counter() - t0)
            if status != 200 or not body:
                raise RuntimeError(f"/metrics answered {status} with {len(body)} bytes")
        return sorted(out)
    finally:
        conn.close()


def load_run(pid: int, port: int, headers: dict[str, str], threads: int, seconds: float, max_requests: int) -> LoadResult:
    """`threads` clients, each with its own keep-alive connection, until `seconds` pass or `max_requests` are done."""
    counts = [0] * threads
    errors = [0] * threads
    barrier = threading.Barrier(threads + 1)
    stop_at = [0.0]
    per_thread_cap = max(1, max_requests // threads)

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            get(conn, "/metrics", headers)  # connect before the clock starts
            barrier.wait()
            done = 0
            while done < per_thread_cap and time.monotonic() < stop_at[0]:
                try:
                    status, _, body = get(conn, "/metrics", headers)
                    if status != 200 or not body:
                        errors[i] += 1
                except (OSError, http.client.HTTPException):
                    errors[i] += 1
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                done += 1
            counts[i] = done
        finally:
            conn.close()

    workers = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    stop_at[0] = time.monotonic() + 3600  # placeholder until every client is connected
    cpu0, client0 = cpu_seconds(pid), time.process_time()
    t0 = time.monotonic()
    stop_at[0] = t0 + seconds
    barrier.wait()
    for w in workers:
        w.join(seconds + 30)
    wall = time.monotonic() - t0
    cpu1, client1 = cpu_seconds(pid), time.process_time()
    return LoadResult(sum(counts), sum(errors), wall, cpu1 - cpu0, client1 - client0)


def idle_cpu_rate(pid: int, seconds: float) -> float:
    """Process CPU seconds per wall second while nobody scrapes it.

    A short window holds only a few 10 ms clock ticks, so the scheduler's nanosecond per-thread clocks
    are used where the kernel has them, utime+stime otherwise."""
    clock: Callable[[int], float | None] = sched_seconds if sched_seconds(pid) is not None else cpu_seconds
    c0, t0 = clock(pid), time.monotonic()
    time.sleep(seconds)
    c1 = clock(pid)
    return (c1 - c0) / (time.monotonic() - t0) if c0 is not None and c1 is not None else 0.0


# --- one measured target ---------------------------------------------------------------------------


@dataclass
class ScrapeFigures:
    name: str
    ready_s: float
    body_bytes: int
    gzip_bytes: int
    samples: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    load: LoadResult
    idle_rate: float  # CPU s per s
    rss: float
    identity_rps: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def cpu_per_scrape_raw_ms(self) -> float:
        return 1000 * self.load.cpu / max(1, self.load.requests)

    @property
    def cpu_per_scrape_ms(self) -> float:
        return 1000 * max(0.0, self.load.cpu - self.idle_rate * self.load.wall) / max(1, self.load.requests)


def count_samples(body: bytes) -> int:
    return sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))


def measure_scrapes(
    name: str, proc: subprocess.Popen[bytes], port: int, ready_s: float, args: argparse.Namespace,
    headers: dict[str, str], identity: bool,
) -> tuple[ScrapeFigures, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        _, _, plain = get(conn, "/metrics", {})
        _, h, gz = get(conn, "/metrics", {"Accept-Encoding": "gzip"})
    finally:
        conn.close()
    gz_bytes = len(gz) if h.get("content-encoding") == "gzip" else len(gzip.compress(plain))
    idle = idle_cpu_rate(proc.pid, args.idle_window)
    lat = latency_run(port, headers, args.latency_requests)
    load = load_run(proc.pid, port, headers, args.threads, args.load_seconds, args.max_requests)
    rss = rss_mib(proc.pid)
    figures = ScrapeFigures(
        name=name, ready_s=ready_s, body_bytes=len(plain), gzip_bytes=gz_bytes, samples=count_samples(plain),
        p50_ms=1000 * percentile(lat, 50), p99_ms=1000 * percentile(lat, 99), max_ms=1000 * lat[-1], load=load, idle_rate=idle, rss=rss,
    )
    if load.errors:
        figures.notes.append(f"{load.errors} failed requests under load")
    if identity and "Accept-Encoding" in headers:
        figures.identity_rps = load_run(
            proc.pid, port, {}, args.threads, args.identity_seconds, args.max_requests
        ).rps
    return figures, plain


@dataclass
class CycleFigures:
    gpus: int
    window: float
    cycles: float
    cpu_ticks: float  # utime+stime over the window
    cpu_sched: float | None  # the same from the scheduler's per-thread clocks
    rss: float
    bursts: list[float] = field(default_factory=list)  # CPU seconds of each cycle seen, in order

    @property
    def ms_per_cycle(self) -> float:
        return 1000 * self.cpu_ticks / self.cycles

    @property
    def ms_per_cycle_sched(self) -> float | None:
        return None if self.cpu_sched is None else 1000 * self.cpu_sched / self.cycles

    def split(self) -> tuple[list[float], list[float]]:
        """Cycles that ran only the fast tier, and those that also ran the slow tier (over twice the median)."""
        if not self.bursts:
            return [], []
        median = sorted(self.bursts)[len(self.bursts) // 2]
        return [b for b in self.bursts if b <= 2 * median], [b for b in self.bursts if b > 2 * median]

    def weighted_ms(self, fast_per_slow: float) -> float | None:
        """CPU per cycle with the slow tier on exactly 1 cycle in (fast_per_slow + 1), as 5s/30s gives."""
        fast, slow = self.split()
        if not fast or not slow:
            return None
        mean_fast, mean_slow = sum(fast) / len(fast), sum(slow) / len(slow)
        return 1000 * (fast_per_slow * mean_fast + mean_slow) / (fast_per_slow + 1)


def last_collection(port: int) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        _, _, body = get(conn, "/metrics", {})
    finally:
        conn.close()
    for line in body.splitlines():
        if line.startswith(b"gpu_exporter_last_collection_timestamp_seconds"):
            return float(line.rsplit(None, 1)[1])
    raise RuntimeError("no gpu_exporter_last_collection_timestamp_seconds in /metrics")


def measure_cycles(
    gpus: int, proc: subprocess.Popen[bytes], port: int, interval: float, window: float, settle: float,
    poll: float = 0.05,
) -> CycleFigures:
    """Idle exporter: CPU over the window / cycles; and, sampling the per-thread CPU clocks every `poll`
    seconds (reads /proc only, costs the exporter nothing), the CPU of each cycle as one burst."""
    time.sleep(settle)  # past the start-up cycles and imports
    ts0 = last_collection(port)
    c0, s0, t0 = cpu_seconds(proc.pid), sched_seconds(proc.pid), time.monotonic()
    # [start, CPU seconds] per cycle. Cycles start one interval apart, so CPU used within 0.8 interval of a
    # burst's start belongs to that cycle, even across a quiet sample (a cycle descheduled on a busy machine).
    bursts: list[list[float]] = []
    prev, first_poll = s0, None
    while s0 is not None and time.monotonic() - t0 < window:
        time.sleep(poll)
        now, at = sched_seconds(proc.pid), time.monotonic()
        if now is None or prev is None:
            break
        first_poll = at if first_poll is None else first_poll
        delta, prev = now - prev, now
        if delta > 1e-4:  # the idle process uses no CPU between cycles
            if bursts and at - bursts[-1][0] < 0.8 * interval:
                bursts[-1][1] += delta
            else:
                bursts.append([at, delta])
    # The first burst may have begun before the window, the last may still be running: keep neither.
    if bursts and bursts[0][0] == first_poll:
        bursts = bursts[1:]
    whole = [cpu for _, cpu in bursts[:-1]]
    if s0 is None:
        time.sleep(window)
    c1, s1, t1 = cpu_seconds(proc.pid), sched_seconds(proc.pid), time.monotonic()
    ts1 = last_collection(port)
    wall = t1 - t0
    # The loop is on a fixed tick; the published timestamps confirm it is keeping up.
    cycles_seen = round((ts1 - ts0) / interval)
    cycles = wall / interval
    if abs(cycles_seen - cycles) > 2:
        print(f"note: {gpus} GPUs: {cycles_seen} cycles published in a {wall:.1f}s window of "
              f"{interval:g}s ticks; the loop is falling behind", file=sys.stderr)
        cycles = max(1.0, float(cycles_seen))
    if whole and abs(len(whole) - cycles) > max(3, 0.15 * cycles):
        print(f"note: {gpus} GPUs: {len(whole)} CPU bursts for ~{cycles:.0f} cycles; per-tier split dropped",
              file=sys.stderr)
        whole = []
    sched = None if s0 is None or s1 is None else s1 - s0
    return CycleFigures(gpus, wall, cycles, c1 - c0, sched, rss_mib(proc.pid), whole)


# --- driver ----------------------------------------------------------------------------------------


def exporter_argv(sim_yaml: Path, port: int, extra: Sequence[str] = ()) -> list[str]:
    return [
        sys.executable, "-m", "exporter", "--backend", "sim", "--sim-config", str(sim_yaml),
        "--web.listen-address", f"127.0.0.1:{port}", "--state-dir", "", "--log.level", "error", *extra,
    ]


def node_exporter_argv(port: int, textfile_dir: Path) -> list[str]:
    return [
        NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{port}", "--collector.disable-defaults",
        "--collector.textfile", f"--collector.textfile.directory={textfile_dir}", "--log.level=error",
    ]


def with_process(
    children: Children, argv: Sequence[str], port: int, stderr_path: Path, cwd: Path | None,
    body: Callable[[subprocess.Popen[bytes], float], object],
) -> object:
    proc = children.start(argv, stderr_path=stderr_path, cwd=cwd)
    try:
        ready = wait_ready(proc, port, stderr_path)
        return body(proc, ready)
    finally:
        children.stop(proc)


def fmt_check(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


SCRAPE_INTERVAL_S = 15.0  # Prometheus' usual scrape interval, for the CPU-per-hour comparison
COLLECT_INTERVAL_S = 5.0  # the exporter's default --collect-interval


def print_cpu_per_hour(ours: ScrapeFigures, node: ScrapeFigures, cycle: CycleFigures | None,
                       fast_per_slow: float) -> None:
    """CPU seconds per hour of each server at one scrape every 15 s: serving, collection and the total.

    Serving = CPU per scrape x 240 scrapes. Collection: the exporter's collection loop, from the 5:1 cycle
    figure (x 720 cycles of 5 s) where measured, else its idle CPU rate (which includes the idle HTTP
    server); node_exporter collects the textfile inside each scrape (in its CPU per scrape), so its
    collection is its idle CPU rate (Go runtime). Whatever writes the textfile is not counted."""
    scrapes = 3600 / SCRAPE_INTERVAL_S
    weighted = cycle.weighted_ms(fast_per_slow) if cycle is not None else None
    ours_collect = (weighted / 1000 * 3600 / COLLECT_INTERVAL_S) if weighted is not None else ours.idle_rate * 3600
    rows = [
        (ours.name, ours.cpu_per_scrape_ms / 1000 * scrapes, ours_collect),
        (node.name, node.cpu_per_scrape_ms / 1000 * scrapes, node.idle_rate * 3600),
    ]
    print(f"CPU per hour at a {SCRAPE_INTERVAL_S:g} s scrape interval (CPU seconds per hour; "
          f"{scrapes:.0f} scrapes, {3600 / COLLECT_INTERVAL_S:.0f} collection cycles of 5 s):")
    head = f"{'target':<26} {'serving s/h':>12} {'collection s/h':>15} {'total s/h':>10} {'% of a core':>12}"
    print(head)
    print("-" * len(head))
    for name, serving, collection in rows:
        total = serving + collection
        print(f"{name:<26} {serving:>12.2f} {collection:>15.2f} {total:>10.2f} {100 * total / 3600:>11.3f}%")
    print("serving = CPU/scrape x scrapes; collection = the exporter's 5:1 CPU per cycle x cycles (else its idle")
    print("CPU rate), node_exporter's idle CPU rate (it reads the textfile inside each scrape). The program that")
    print("writes node_exporter's textfile is not counted.")
    print()


def print_report(
    scrapes: list[ScrapeFigures], cycles: list[CycleFigures], args: argparse.Namespace, headers: dict[str, str],
    calls: nvml_calls.TierCalls | None = None,
) -> float:
    enc = "gzip" if "Accept-Encoding" in headers else "identity"
    print()
    print(f"gpu-health-exporter scrape benchmark  (python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"clock tick {1000 / CLK_TCK:g} ms)")
    print(f"requests: Accept-Encoding {enc}; latency = {args.latency_requests} sequential keep-alive GETs; "
          f"load = {args.threads} threads x keep-alive for {args.load_seconds:g}s")
    print()
    head = (f"{'target':<26} {'body KiB':>9} {'gz KiB':>7} {'samples':>7} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
            f"{'req/s':>8} {'CPU/scrape ms':>13} {'(raw)':>7} {'scrapes/core-s':>14} {'RSS MiB':>8} {'client CPU':>10}")
    print(head)
    print("-" * len(head))
    for f in scrapes:
        client_util = f.load.client_cpu / f.load.wall if f.load.wall else 0.0
        capacity = f"{1000 / f.cpu_per_scrape_ms:.0f}" if f.cpu_per_scrape_ms > 0 else "-"
        print(f"{f.name:<26} {f.body_bytes / 1024:>9.1f} {f.gzip_bytes / 1024:>7.1f} {f.samples:>7} "
              f"{f.p50_ms:>7.2f} {f.p99_ms:>7.2f} {f.max_ms:>7.2f} {f.load.rps:>8.0f} {f.cpu_per_scrape_ms:>13.3f} "
              f"{f.cpu_per_scrape_raw_ms:>7.3f} {capacity:>14} {f.rss:>8.1f} {client_util:>9.0%}")
    print()
    print("CPU/scrape = (process utime+stime over the load - idle CPU rate x load time) / scrapes; (raw) = without")
    print("the idle correction. scrapes/core-s = 1000 / CPU/scrape: what one core of the server could answer.")
    print("client CPU = this benchmark's own CPU during the load, as a share of one core: near 100% means the")
    print("Python client, not the server, limits req/s (then req/s is a floor for the server).")
    for f in scrapes:
        extra = []
        if f.identity_rps is not None:
            extra.append(f"identity (no gzip) req/s {f.identity_rps:.0f}")
        extra.append(f"ready after {f.ready_s:.2f}s")
        extra.append(f"idle CPU {1000 * f.idle_rate:.2f} ms/s")
        extra.extend(f.notes)
        print(f"  {f.name}: " + "; ".join(extra))
    node = next((f for f in scrapes if f.name.startswith("node_exporter")), None)
    ours8 = next((f for f in scrapes if f.name.startswith("gpu-health-exporter 8")), None)
    if node and ours8:
        print(f"  node_exporter's exposition = the 8-GPU file + {node.samples - ours8.samples} samples of its own "
              "(go_*, process_*, promhttp_*, node_scrape_collector_*, node_textfile_*).")
    print()
    fast_per_slow = args.cycle_slow / args.cycle_interval - 1
    if cycles:
        print(f"collection loop, idle, --collect-interval {args.cycle_interval:g}s --collect-interval.slow "
              f"{args.cycle_slow:g}s (slow tier due every {args.cycle_slow / args.cycle_interval:g}th cycle, "
              "as with the default 5s/30s):")
        head = (f"{'GPUs':>6} {'window s':>9} {'cycles':>7} {'CPU/cycle ms':>13} {'(schedstat)':>12} "
                f"{'fast ms':>8} {'slow ms':>8} {'n slow':>6} {'5:1 ms':>7} {'RSS MiB':>8}")
        print(head)
        print("-" * len(head))
        for c in cycles:
            sched = c.ms_per_cycle_sched
            fast, slow = c.split()
            weighted = c.weighted_ms(fast_per_slow)

            def ms(values: list[float]) -> str:
                return f"{1000 * sum(values) / len(values):.2f}" if values else "-"

            print(f"{c.gpus:>6} {c.window:>9.1f} {c.cycles:>7.1f} {c.ms_per_cycle:>13.2f} "
                  f"{'-' if sched is None else f'{sched:.2f}':>12} {ms(fast):>8} {ms(slow):>8} {len(slow):>6} "
                  f"{'-' if weighted is None else f'{weighted:.2f}':>7} {c.rss:>8.1f}")
        print(f"CPU/cycle: whole-process utime+stime over the window / cycles ({1000 / CLK_TCK:g} ms ticks); "
              "(schedstat): the same from")
        print("the scheduler's per-thread clocks (ns). fast/slow ms: mean CPU of each cycle without / with the slow")
        print("tier, from the per-thread clocks sampled every 50 ms; 5:1 ms = (5 x fast + slow) / 6, the exact default")
        print("mix (the loop's slow tick can slip by one cycle, so a window's own mix varies). All include the idle")
        print("HTTP server's share, and the simulator's own cost in place of NVML's.")
        print()

    cycle8 = next((c for c in cycles if c.gpus == 8), None)
    if ours8 and node:
        print_cpu_per_hour(ours8, node, cycle8, fast_per_slow)
    if calls is not None:
        print("\n".join(nvml_calls.report(calls, "H100-SXM-80GB, 18 NVLinks")))
        print()

    ratio = ours8.load.rps / node.load.rps if ours8 and node and node.load.rps else float("nan")
    print("targets:")
    if ours8 and node:
        print(f"  requests/s vs node_exporter, 8 GPUs   {ratio:7.2f}   target >= {TARGET_RATIO:.1f}     "
              f"{fmt_check(ratio >= TARGET_RATIO)}")
    for f in scrapes:
        if f.name.startswith("gpu-health-exporter"):
            label = f"RSS after load, {f.name[len('gpu-health-exporter '):]}"
            print(f"  {label:<37} {f.rss:7.1f}   target <= {TARGET_RSS_MIB:g} MiB  {fmt_check(f.rss <= TARGET_RSS_MIB)}")
    if calls is not None:
        ok = calls.slow_total <= nvml_calls.TARGET_SLOW_CALLS
        print(f"  {'NVML calls per GPU, slow tier, H100':<37} {calls.slow_total:7g}   "
              f"target <= {nvml_calls.TARGET_SLOW_CALLS}      {fmt_check(ok)}")
    for c in cycles:
        weighted = c.weighted_ms(fast_per_slow)
        figure = c.ms_per_cycle if weighted is None else weighted
        how = "window" if weighted is None else "5:1"
        label = f"CPU per 5 s cycle ({how}), {c.gpus} GPUs"
        target = f"target <= {TARGET_CYCLE_MS:g} ms   {fmt_check(figure <= TARGET_CYCLE_MS)}" if c.gpus == 8 else "(no target)"
        print(f"  {label:<37} {figure:7.2f}   {target}")
    return ratio


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 64], help="simulated GPU counts (default 8 64)")
    p.add_argument("--latency-requests", type=int, default=300)
    p.add_argument("--threads", type=int, default=4, help="concurrent keep-alive clients (default 4)")
    p.add_argument("--load-seconds", type=float, default=3.0)
    p.add_argument("--identity-seconds", type=float, default=2.0, help="0 skips the uncompressed req/s figure")
    p.add_argument("--max-requests", type=int, default=200_000, help="cap per load run, all threads together")
    p.add_argument("--idle-window", type=float, default=5.0,
                   help="idle CPU window before the scrape load, seconds (one default 5s collection cycle)")
    p.add_argument("--cycle-window", type=float, default=18.0, help="idle window for CPU per cycle (default 18)")
    p.add_argument("--cycle-interval", type=float, default=1.0)
    p.add_argument("--cycle-slow", type=float, default=6.0)
    p.add_argument("--identity", action="store_true", help="scrape without Accept-Encoding: gzip")
    p.add_argument("--no-node-exporter", action="store_true")
    args = p.parse_args(argv)

    headers = {} if args.identity else {"Accept-Encoding": "gzip"}
    identity_too = args.identity_seconds > 0
    children = Children()
    # SIGTERM (and SIGHUP) unwind like Ctrl-C, so the finally below stops the children.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    scrapes: list[ScrapeFigures] = []
    cycles: list[CycleFigures] = []
    try:
        with tempfile.TemporaryDirectory(prefix="gpu-exporter-bench-") as tmp:
            tmpdir = Path(tmp)
            body8: bytes | None = None
            for n in args.gpus:
                sim = tmpdir / f"sim{n}.yaml"
                sim.write_text(f"gpus: {n}\n", encoding="utf-8")
                port = free_port()
                print(f"[{n} GPUs] scrape measurements ...", file=sys.stderr, flush=True)

                def scrape_body(proc: subprocess.Popen[bytes], ready: float, n: int = n, port: int = port):
                    return measure_scrapes(f"gpu-health-exporter {n} GPUs", proc, port, ready, args, headers,
                                           identity_too and n == 8)

                fig, body = with_process(children, exporter_argv(sim, port), port, tmpdir / f"exp{n}.err", REPO,
                                         scrape_body)  # type: ignore[misc]
                scrapes.append(fig)
                if n == 8:
                    body8 = body

                if args.cycle_window > 0:
                    print(f"[{n} GPUs] idle collection loop, {args.cycle_window:g}s ...", file=sys.stderr, flush=True)
                    port = free_port()
                    extra = ["--collect-interval", f"{args.cycle_interval:g}s",
                             "--collect-interval.slow", f"{args.cycle_slow:g}s"]
                    cycles.append(with_process(  # type: ignore[arg-type]
                        children, exporter_argv(sim, port, extra), port, tmpdir / f"cyc{n}.err", REPO,
                        lambda proc, ready, n=n, port=port: measure_cycles(
                            n, proc, port, args.cycle_interval, args.cycle_window, settle=2 * args.cycle_interval),
                    ))

            if not args.no_node_exporter:
                if body8 is None:
                    print("note: node_exporter comparison needs 8 in --gpus; skipped", file=sys.stderr)
                elif not os.access(NODE_EXPORTER, os.X_OK):
                    print(f"note: {NODE_EXPORTER} not found; node_exporter comparison skipped", file=sys.stderr)
                else:
                    print("[node_exporter textfile, 8 GPUs] scrape measurements ...", file=sys.stderr, flush=True)
                    textfile = tmpdir / "textfile"
                    textfile.mkdir()
                    (textfile / "gpu.prom.tmp").write_bytes(body8)
                    os.replace(textfile / "gpu.prom.tmp", textfile / "gpu.prom")
                    port = free_port()

                    def node_body(proc: subprocess.Popen[bytes], ready: float, port: int = port):
                        fig, body = measure_scrapes("node_exporter textfile 8", proc, port, ready, args, headers,
                                                    identity_too)
                        if b"node_textfile_scrape_error 0" not in body:
                            fig.notes.append("node_textfile_scrape_error is not 0: the file was not parsed")
                        return fig, body

                    fig, _ = with_process(children, node_exporter_argv(port, textfile), port,  # type: ignore[misc]
                                          tmpdir / "node.err", None, node_body)
                    scrapes.append(fig)
    except KeyboardInterrupt:
        print("\ninterrupted; stopping child processes", file=sys.stderr)
        return 130
    finally:
        children.stop_all()

    print("[8 x H100] NVML calls per GPU per tier ...", file=sys.stderr, flush=True)
    calls = nvml_calls.measure(8, "H100-SXM-80GB")
    ratio = print_report(scrapes, cycles, args, headers, calls)
    print(f"ratio_vs_node_exporter={ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
