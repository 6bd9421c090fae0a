"""Per boot: a log file's boot boundaries, and the file source and collector counting only the running boot."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from exporter.registry import FleetView, GpuKey, RenderContext
from exporter.render import exposition
from exporter.xid.boots import BootIdentity, BootTracker, is_current_boot
from exporter.collectors.xid import XidCollector
from exporter.xid.sources import FileSource
from exporter.xid.store import STATE_FILE, XidStore

NOW = time.time()
# This machine booted 10 minutes ago.
HERE = BootIdentity("6f1d3c1e-7a0b-4a39-9d7e-0c5b1b2f8a11", began=NOW - 600, uptime=600.0)


def syslog(seconds_ago: float) -> str:
    return time.strftime("%b %d %H:%M:%S", time.localtime(NOW - seconds_ago)) + " gpu7 kernel: "


# Two boots in one syslog file: the earlier one (a day ago) ends with an Xid 79, the running one has an Xid 13.
EARLIER = [
    syslog(86400) + "[    0.000000] Linux version 6.8.0-45-generic (buildd@lcy02-amd64-075) #45-Ubuntu SMP",
    syslog(86400) + "[    0.000000] Command line: BOOT_IMAGE=/vmlinuz-6.8.0-45-generic root=UUID=3f0e ro",
    syslog(86400) + "[    0.004000] x86/fpu: Supporting XSAVE feature 0x001: 'x87 floating point registers'",
    syslog(700) + "[85700.312000] NVRM: Xid (PCI:0000:18:00): 79, pid=1101234, name=nvc:[driver], GPU has fallen off the bus.",
    syslog(700) + "[85700.312100] NVRM: GPU 0000:18:00.0: GPU has fallen off the bus.",
]
CURRENT = [
    syslog(590) + "[    0.000000] Linux version 6.8.0-45-generic (buildd@lcy02-amd64-075) #45-Ubuntu SMP",
    syslog(590) + "[    0.000000] Command line: BOOT_IMAGE=/vmlinuz-6.8.0-45-generic root=UUID=3f0e ro",
    syslog(300) + "[  290.100000] NVRM: Xid (PCI:0000:2a:00): 13, pid=77, name=train.py, Graphics SM Warp Exception",
]
GPU0, GPU1 = GpuKey(0, "GPU-aaaa"), GpuKey(1, "GPU-bbbb")
PCI_MAP = {"00000000:18:00.0": GPU0, "00000000:2A:00.0": GPU1}


def boots_of(lines: list[str]) -> BootTracker:
    tracker = BootTracker(now=NOW)
    for line in lines:
        tracker.feed(line)
    return tracker


def test_two_boots_in_a_syslog() -> None:
    found = boots_of(EARLIER + CURRENT).boots
    assert [(b.line, b.reason) for b in found] == [(0, "linux-version"), (5, "timestamp-reset")]
    assert found[1].signs == ["timestamp-reset", "linux-version", "command-line"]
    assert not is_current_boot(found[0], HERE) and is_current_boot(found[1], HERE)


@pytest.mark.parametrize(
    ("lines", "boots", "reason"),
    [
        # dmesg output only: the monotonic clock going back to zero.
        (["[ 5000.1] a", "[ 5001.2] b", "[    1.5] c", "[    2.0] d"], 2, "timestamp-reset"),
        # A saved /dev/kmsg dump: sequence numbers start again at 0.
        (["6,41,9000000,-;a", "6,42,9100000,-;b", "6,0,0,-;Linux version 6.8.0", "6,1,10,-;c"], 2, "kmsg-sequence-0"),
        # journalctl's marker between boots.
        (["Jun 02 kernel: a", "-- Reboot --", "Jun 03 kernel: b"], 2, "reboot-marker"),
        # journalctl -o json: _BOOT_ID changes.
        (['{"_BOOT_ID":"' + "a" * 32 + '","MESSAGE":"x"}', '{"_BOOT_ID":"' + "b" * 32 + '","MESSAGE":"y"}'], 2,
         "boot-id"),
        # Printk clocks of two CPUs a little out of order, and a late clock value that is no reboot.
        (["[ 5000.9] a", "[ 5000.4] b", "[ 300.0] c"], 1, "file-start"),
    ],
)
def test_boundary_signs(lines: list[str], boots: int, reason: str) -> None:
    found = boots_of(lines).boots
    assert len(found) == boots and found[-1].reason == reason


def test_a_file_that_begins_inside_a_boot_is_not_this_boot_by_its_dates() -> None:
    """Rotated: the file holds the running boot's later lines but not its first one."""
    found = boots_of(CURRENT[2:]).boots
    assert [b.reason for b in found] == ["file-start"] and not is_current_boot(found[0], HERE)


def test_journal_boot_id_decides() -> None:
    ours = HERE.boot_id.replace("-", "")  # type: ignore[union-attr]
    lines = ['{"_BOOT_ID":"' + "a" * 32 + '"}', '{"_BOOT_ID":"' + ours + '","MESSAGE":"NVRM: Xid ..."}']
    found = boots_of(lines).boots
    assert len(found) == 2 and is_current_boot(found[1], HERE) and not is_current_boot(found[0], HERE)


def _collector(log: Path, state: Path) -> XidCollector:
    store = XidStore(state / STATE_FILE, "boot-2", f"file:{log}")
    c = XidCollector("node-a", store, FileSource(log, poll_interval=0.005, boot=HERE), pci_map=lambda: PCI_MAP)
    c.start(catchup_timeout=5)
    return c


def _metrics(c: XidCollector) -> str:
    return exposition(c.families(RenderContext("node-a", [], FleetView(True, 2, 2, "x"))))


def test_file_source_counts_only_this_boot(tmp_path: Path) -> None:
    """After a reboot, the earlier boot's Xid 79 in the same syslog is neither counted nor a fallen-off GPU."""
    log = tmp_path / "syslog"
    log.write_text("\n".join(EARLIER + CURRENT) + "\n")
    c = _collector(log, tmp_path)
    try:
        text = _metrics(c)
        assert 'xid="79"' not in text and "gpu_fallen_off_bus{" not in text
        assert 'gpu_xid_errors_total{node="node-a",gpu="1",uuid="GPU-bbbb",pci_bus_id="00000000:2A:00.0",xid="13"' in text
        assert 'gpu_xid_source_boot_found{node="node-a"} 1.0' in text
        assert 'gpu_xid_lines_read_total{node="node-a"} 3.0' in text
    finally:
        c.close()


def test_file_without_this_boots_start_is_read_from_its_end(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = tmp_path / "syslog"
    log.write_text("\n".join(EARLIER) + "\n")
    c = _collector(log, tmp_path)
    try:
        text = _metrics(c)
        assert "gpu_xid_errors_total{" not in text and "gpu_fallen_off_bus{" not in text
        assert 'gpu_xid_source_boot_found{node="node-a"} 0.0' in text
        assert any("holds no start of this boot" in r.getMessage() for r in caplog.records)
        with open(log, "a") as f:
            f.write(CURRENT[2] + "\n")
        deadline = time.monotonic() + 5
        while 'xid="13"' not in _metrics(c) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert 'xid="13"' in _metrics(c)
    finally:
        c.close()
    # A restart this boot resumes where it was, and still says the boot's start was not found.
    c = _collector(log, tmp_path)
    try:
        text = _metrics(c)
        assert 'gpu_xid_source_boot_found{node="node-a"} 0.0' in text and 'xid="79"' not in text
    finally:
        c.close()
