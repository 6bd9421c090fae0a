"""`gpu-health-exporter scan-log`: JSON lines out of a kernel log, including /dev/kmsg records."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.xid.scan import main, scan

ROOT = Path(__file__).resolve().parent.parent.parent

LOG = "\n".join(
    [
        "[ 1843.308145] NVRM: The NVIDIA GPU 0000:b3:00.0",
        "               NVRM: (PCI ID: 10de:26b5) installed in this system has",
        "               NVRM: fallen off the bus and is not responding to commands.",
        "6,3964,206764307,-;nvidia-nvswitch2: open (major=510)",
        r"4,3965,206764400,-;NVRM: The NVIDIA GPU 0000:3B:00.0\x0aNVRM: (PCI ID: 10de:2330) installed in this system"
        r" has\x0aNVRM: fallen off the bus and is not responding to commands.\x0a",
        " SUBSYSTEM=pci",
        " DEVICE=+pci:0000:3b:00.0",
        "3,3966,206765000,-,caller=T12;NVRM: Xid (PCI:0000:01:00 GPU-I:05): 45, pid=12542, name=VLLM::Worker,"
        " Ch 00000001 caused by previous Xid 149",
        "Mar 29 15:38:59 kernel: NVRM: Xid (PCI:0000:01:00): 154, GPU recovery action changed from 0x0 (None) to 0x1"
        " (GPU Reset Required)",
        "[   38.178720] nvidia-nvswitch3: SXid (PCI:0000:04:00.0): 22013, Non-fatal, Link 44 Minion Link DLREQ"
        " interrupt",
        "NVRM: Xid (PCI:0000:44:00): 999, a code newer than the catalog",
        "nvidia-smi: query Xid errors",
        "",
    ]
)

EXPECTED = [
    {
        "kind": "fallen_off_bus",
        "code": None,
        "pci_bus_id": "0000:b3:00.0",
        "name": "GPU_FALLEN_OFF_BUS",
        "action": None,
        "message": "NVRM: The NVIDIA GPU 0000:b3:00.0\nNVRM: (PCI ID: 10de:26b5) installed in this system has\n"
        "NVRM: fallen off the bus and is not responding to commands.",
    },
    {
        "kind": "fallen_off_bus",
        "code": None,
        "pci_bus_id": "0000:3b:00.0",
        "name": "GPU_FALLEN_OFF_BUS",
        "action": None,
        "message": "NVRM: The NVIDIA GPU 0000:3B:00.0\nNVRM: (PCI ID: 10de:2330) installed in this system has\n"
        "NVRM: fallen off the bus and is not responding to commands.",
    },
    {
        "kind": "xid",
        "code": 45,
        "pci_bus_id": "0000:01:00",
        "name": "ROBUST_CHANNEL_PREEMPTIVE_REMOVAL",
        "action": "WORKFLOW_XID_45",
        "message": "Ch 00000001 caused by previous Xid 149",
        "gpu_instance": 5,
        "caused_by": 149,
    },
    {
        "kind": "xid",
        "code": 154,
        "pci_bus_id": "0000:01:00",
        "name": "GPU_RECOVERY_ACTION_CHANGED",
        "action": "XID_154",
        "message": "GPU recovery action changed from 0x0 (None) to 0x1 (GPU Reset Required)",
        "recovery_action": 1,
    },
    {
        "kind": "sxid",
        "code": 22013,
        "pci_bus_id": "0000:04:00.0",
        "name": None,
        "action": None,
        "message": "Non-fatal, Link 44 Minion Link DLREQ interrupt",
        "fatal": False,
    },
    {
        "kind": "xid",
        "code": 999,
        "pci_bus_id": "0000:44:00",
        "name": "UNKNOWN",
        "action": "UNKNOWN",
        "message": "a code newer than the catalog",
    },
]


def test_scan_stream() -> None:
    assert list(scan(io.StringIO(LOG))) == EXPECTED


def test_main_prints_json_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "kern.log"
    path.write_text(LOG, encoding="utf-8")
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert [json.loads(line) for line in out.splitlines()] == EXPECTED


def test_main_reads_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(LOG))
    assert main(["-"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(EXPECTED)


def test_main_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "absent.log")]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "cannot open" in captured.err and "absent.log" in captured.err


def test_module_entry_point_on_the_samples() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "exporter.xid.scan", str(ROOT / "tests" / "fixtures" / "kmsg-samples.txt")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(events) == 54
    assert events[-1]["kind"] == "fallen_off_bus" and events[-1]["pci_bus_id"] == "0000:b3:00.0"
    assert {e["kind"] for e in events} == {"xid", "sxid", "fallen_off_bus"}
