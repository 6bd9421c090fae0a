"""XID latency and flood cost of a running exporter, on loopback.

Starts ``python -m exporter --backend sim --xid.source file:<tmp>/kern.log`` and then:

1. latency: appends one Xid line at a time to the log and times how long until /metrics shows the counter moved
   (N samples, a random pause between them so writes do not fall into step with the file poll), prints p50/p99;
2. flood: appends 1,000,000 identical Xid 95 lines (NVSentinel saw ~800,000 in one storm), waits until /metrics
   counts them all, and prints the exporter's CPU seconds and RSS growth for it.

The last line is ``xid_p99_ms=<value>``. Targets: p99 <= 100 ms; RSS growth <= 5 MiB.
Usage: python benchmarks/xid_latency.py [--samples 200] [--flood 1000000]
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PCI = "0000:18:00"  # the simulator's GPU 0 (NVML 00000000:18:00.0)
LATENCY_LINE = f"kernel: NVRM: Xid (PCI:{PCI}): 13, pid=4242, name=python3, Graphics SM Warp Exception\n"
FLOOD_LINE = f"kernel: NVRM: Xid (PCI:{PCI}): 95, pid=7062, Uncontained: LTC TAG (0x2, 0x1). RST: Yes, D-RST: No\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Scraper:
    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)

    def body(self) -> str:
        try:
            self.conn.request("GET", "/metrics")
            return self.conn.getresponse().read().decode()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            raise

    def xid(self, code: int) -> float:
        m = re.search(rf'^gpu_xid_errors_total{{[^}}]*xid="{code}"[^}}]*}} (\S+)$', self.body(), re.M)
        return float(m.group(1)) if m else 0.0


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def proc_mem(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) * 1024
    hwm = int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) * 1024
    return rss, hwm


def wait_for(predicate, timeout: float, poll: float = 0.0005) -> float:
    """Seconds until predicate() is true; raises TimeoutError after `timeout`."""
    t0 = time.perf_counter()
    while True:
        try:
            if predicate():
                return time.perf_counter() - t0
        except (OSError, http.client.HTTPException):
            pass
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError
        if poll:
            time.sleep(poll)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--flood", type=int, default=1_000_000)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="xid-bench-") as tmp:
        log = Path(tmp) / "kern.log"
        log.touch()
        port = free_port()
        cmd = [
            sys.executable, "-m", "exporter", "--backend", "sim", "--node-name", "bench",
            "--xid.source", f"file:{log}", "--state-dir", str(Path(tmp) / "state"),
            "--web.listen-address", f"127.0.0.1:{port}", "--log.level", "warn",
        ]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL)
        try:
            scraper = Scraper(port)
            wait_for(lambda: "gpu_xid_source_up" in scraper.body(), 30, poll=0.05)

            # 1. latency
            lat: list[float] = []
            with open(log, "a", buffering=1) as f:
                for i in range(1, args.samples + 1):
                    time.sleep(random.uniform(0.005, 0.05))
                    f.write(LATENCY_LINE)
                    f.flush()
                    lat.append(wait_for(lambda n=i: scraper.xid(13) >= n, 10, poll=0))
            p50, p99 = percentile(lat, 0.50) * 1000, percentile(lat, 0.99) * 1000
            print(f"latency: {len(lat)} lines, p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {max(lat) * 1000:.1f} ms")

            # 2. flood
            time.sleep(1.5)  # let the debounced saves of the latency phase settle
            cpu0, (rss0, hwm0) = proc_cpu(proc.pid), proc_mem(proc.pid)
            t0 = time.perf_counter()
            block = FLOOD_LINE * 10_000
            with open(log, "a") as f:
                left = args.flood
                while left:
                    n = min(left, 10_000)
                    f.write(block if n == 10_000 else FLOOD_LINE * n)
                    left -= n
            written = time.perf_counter() - t0
            took = wait_for(lambda: scraper.xid(95) >= args.flood, 600, poll=0.05)
            cpu1, (rss1, hwm1) = proc_cpu(proc.pid), proc_mem(proc.pid)
            size = log.stat().st_size
            print(
                f"flood: {args.flood} identical Xid 95 lines ({size / 2**20:.0f} MiB) written in {written:.2f} s, "
                f"all counted {took:.1f} s after the last write"
            )
            print(
                f"flood: exporter CPU {cpu1 - cpu0:.2f} s ({(cpu1 - cpu0) / args.flood * 1e6:.1f} us/line), "
                f"RSS {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB (growth {(rss1 - rss0) / 2**20:.2f} MiB), "
                f"peak RSS growth {(max(hwm1, rss1) - max(hwm0, rss0)) / 2**20:.2f} MiB"
            )
            ok = p99 <= 100 and (rss1 - rss0) <= 5 * 2**20
            print(f"targets (p99 <= 100 ms, RSS growth <= 5 MiB): {'met' if ok else 'NOT met'}")
            print(f"xid_p99_ms={p99:.1f}")
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
