"""End to end: a running exporter (simulated GPUs, file source) sees an XID line on /metrics, keeps its counts
across restarts (a crash included, and after the log rolled over), and starts from zero on a new boot."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
DEADLINE = 10.0
# The simulator's GPU i sits on bus 18, 2A, 3A, ... (NVML 00000000:18:00.0 is the kernel's 0000:18:00).
XID79_GPU0 = "kernel: NVRM: Xid (PCI:0000:18:00): 79, pid=1101234, name=nvc:[driver], GPU has fallen off the bus.\n"
XID13_GPU1 = "kernel: NVRM: Xid (PCI:0000:2a:00): 13, pid=77, name=train.py, Graphics SM Warp Exception\n"
XID13_GPU2 = "kernel: NVRM: Xid (PCI:0000:3a:00): 13, pid=78, name=train.py, Graphics SM Warp Exception\n"

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(predicate: Callable[[], object], timeout: float = DEADLINE) -> object:
    end = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
            if value:
                return value
        except OSError:
            pass
        if time.monotonic() > end:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.01)


class Exporter:
    def __init__(self, tmp: Path, log: Path, source: str) -> None:
        self.tmp, self.log, self.source = tmp, log, source
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [
            sys.executable, "-m", "exporter", "--backend", "sim", "--node-name", "node-e2e",
            "--xid.source", self.source, "--state-dir", str(self.tmp / "state"),
            "--xid.boot-id-file", str(self.tmp / "boot_id"), "--xid.nvml-events", "off",
            "--web.listen-address", f"127.0.0.1:{self.port}", "--log.level", "warn",
        ]
        stderr = open(self.tmp / "exporter.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
        self._stderr = stderr
        poll(lambda: "gpu_xid_source_up" in self.metrics())

    def stop(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            self.proc.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()
        self.proc = None

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as resp:
            return resp.read().decode()


def series(body: str, prefix: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(rf"^({prefix}\S*\{{[^}}]*\}}) (\S+)$", body, re.M)}


def value(body: str, metric: str, **labels: str) -> float | None:
    for key, v in series(body, metric).items():
        if key.startswith(metric + "{") and all(f'{k}="{v_}"' in key for k, v_ in labels.items()):
            return v
    return None


def uuid_of(body: str, gpu: int) -> str:
    m = re.search(rf'^gpu_info\{{node="node-e2e",gpu="{gpu}",uuid="([^"]+)"', body, re.M)
    assert m, "gpu_info missing"
    return m.group(1)


def never_lower(before: str, after: str) -> None:
    old, new = series(before, "gpu_xid_errors_total"), series(after, "gpu_xid_errors_total")
    for key, v in old.items():
        assert new.get(key, 0) >= v, f"{key} went down: {v} -> {new.get(key)}"


@contextmanager
def exporter(tmp_path: Path, source: str | None = None) -> Iterator[Exporter]:
    log = tmp_path / "kern.log"
    log.touch()
    (tmp_path / "boot_id").write_text("11111111-boot-one\n")
    e = Exporter(tmp_path, log, source or f"file:{log}")
    try:
        yield e
    finally:
        if e.proc is not None:
            e.stop(signal.SIGKILL)


def append(log: Path, text: str) -> None:
    with open(log, "a") as f:
        f.write(text)


def test_xid_line_reaches_metrics_and_survives_restarts(tmp_path: Path) -> None:
    with exporter(tmp_path) as e:
        e.start()
        body = e.metrics()
        uuid0, uuid1 = uuid_of(body, 0), uuid_of(body, 1)
        assert value(body, "gpu_xid_source_info", source="file") == 1
        assert value(body, "gpu_xid_errors_total") is None
        # An empty file holds no start of this boot: it is read from its end, and the metric says so.
        assert value(body, "gpu_xid_source_boot_found") == 0

        # A line written into the live source moves the counter, with the right GPU and catalog labels.
        t0 = time.monotonic()
        append(e.log, XID79_GPU0)
        labels = dict(gpu="0", uuid=uuid0, pci_bus_id="00000000:18:00.0", xid="79",
                      name="ROBUST_CHANNEL_GPU_HAS_FALLEN_OFF_THE_BUS", action="RESTART_BM")
        poll(lambda: value(e.metrics(), "gpu_xid_errors_total", **labels) == 1)
        # Far sooner than the 5 s collection interval: the XID part is republished on its own.
        assert time.monotonic() - t0 < 2.0
        append(e.log, XID13_GPU1 * 3)
        poll(lambda: value(e.metrics(), "gpu_xid_errors_total", gpu="1", uuid=uuid1, xid="13") == 3)
        body = e.metrics()
        assert value(body, "gpu_fallen_off_bus", gpu="0", uuid=uuid0) == 1
        assert "train.py" not in body and "nvc:[driver]" not in body

        # A crash (SIGKILL): what was shown had been saved, so it comes back, not lower.
        e.stop(signal.SIGKILL)
        e.start()
        after = e.metrics()
        never_lower(body, after)
        assert value(after, "gpu_xid_errors_total", **labels) == 1
        assert value(after, "gpu_xid_errors_total", gpu="1", xid="13") == 3

        # The log rolls over while the exporter is down, and the old lines are gone for good.
        e.stop()
        os.rename(e.log, tmp_path / "kern.log.1")
        e.log.write_text("kernel: usb 1-1: new high-speed USB device\n" + XID13_GPU2)
        (tmp_path / "kern.log.1").unlink()
        e.start()
        rolled = e.metrics()
        never_lower(after, rolled)
        assert value(rolled, "gpu_xid_errors_total", **labels) == 1
        assert value(rolled, "gpu_xid_errors_total", gpu="1", xid="13") == 3
        assert value(rolled, "gpu_xid_errors_total", gpu="2", xid="13") == 1

        # A reboot: the file still holds the old boot's lines (an Xid 79 among them), then the new boot's first
        # line. Counts start from zero, and only the lines from that first line on are this boot's.
        e.stop()
        append(e.log, XID79_GPU0)
        (tmp_path / "boot_id").write_text("22222222-boot-two\n")
        append(e.log, "kernel: [    0.000000] Linux version 6.8.0-45-generic (buildd@lcy02) #45-Ubuntu SMP\n")
        append(e.log, XID13_GPU1)
        e.start()
        fresh = e.metrics()
        assert value(fresh, "gpu_xid_errors_total", xid="79") is None
        assert value(fresh, "gpu_fallen_off_bus") is None
        assert value(fresh, "gpu_xid_errors_total", gpu="2", xid="13") is None
        assert value(fresh, "gpu_xid_errors_total", gpu="1", xid="13") == 1
        assert value(fresh, "gpu_xid_source_boot_found") == 1
        e.stop()


def kmsg_record(seq: int, text: str) -> bytes:
    return f"4,{seq},{1_000_000 + seq},-;{text}\n SUBSYSTEM=pci\n".encode()


def test_kmsg_source_resumes_by_sequence_number(tmp_path: Path) -> None:
    """The same records read again after a restart (the ring buffer still holds them) are not counted twice."""
    fifo = tmp_path / "kmsg"
    os.mkfifo(fifo)
    records = [kmsg_record(0, "Linux version 6.8"), kmsg_record(1, XID79_GPU0.split(": ", 1)[1].rstrip())]
    with exporter(tmp_path, f"kmsg:{fifo}") as e:
        e.start()
        writer = os.open(fifo, os.O_RDWR)
        try:
            for record in records:
                os.write(writer, record)
            poll(lambda: value(e.metrics(), "gpu_xid_errors_total", gpu="0", xid="79") == 1)
            assert value(e.metrics(), "gpu_xid_source_info", source="kmsg") == 1
            e.stop()
            e.start()
            for record in [*records, kmsg_record(2, XID79_GPU0.split(": ", 1)[1].rstrip())]:
                os.write(writer, record)
            poll(lambda: value(e.metrics(), "gpu_xid_lines_read_total") == 3)
            assert value(e.metrics(), "gpu_xid_errors_total", gpu="0", xid="79") == 2
        finally:
            os.close(writer)
        e.stop()

