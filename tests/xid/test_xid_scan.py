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
        "[  238.178720] nvidia-nvswitch3: SXid (PCI:0000:04:00.0): 22013, Non-fatal, Link 44 Minion Link DLREQ"
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
        "pci_bus_id": "00000000:B3:00.0",
        "name": "GPU_FALLEN_OFF_BUS",
        "action": None,
        "message": "NVRM: The NVIDIA GPU 0000:b3:00.0\nNVRM: (PCI ID: 10de:26b5) installed in this system has\n"
        "NVRM: fallen off the bus and is not responding to commands.",
    },
    {
        "kind": "fallen_off_bus",
        "code": None,
        "pci_bus_id": "00000000:3B:00.0",
        "name": "GPU_FALLEN_OFF_BUS",
        "action": None,
        "message": "NVRM: The NVIDIA GPU 0000:3B:00.0\nNVRM: (PCI ID: 10de:2330) installed in this system has\n"
        "NVRM: fallen off the bus and is not responding to commands.",
    },
    {
        "kind": "xid",
        "code": 45,
        "pci_bus_id": "00000000:01:00.0",
        "name": "ROBUST_CHANNEL_PREEMPTIVE_REMOVAL",
        "action": "WORKFLOW_XID_45",
        "message": "Ch 00000001 caused by previous Xid 149",
        "gpu_instance": 5,
        "caused_by": 149,
    },
    {
        "kind": "xid",
        "code": 154,
        "pci_bus_id": "00000000:01:00.0",
        "name": "GPU_RECOVERY_ACTION_CHANGED",
        "action": "XID_154",
        "message": "GPU recovery action changed from 0x0 (None) to 0x1 (GPU Reset Required)",
        "recovery_action": 1,
    },
    {
        "kind": "sxid",
        "code": 22013,
        "pci_bus_id": "00000000:04:00.0",
        "name": "MINION_NONFATAL",
        "action": "IGNORE",
        "message": "Non-fatal, Link 44 Minion Link DLREQ interrupt",
        "fatal": False,
        "link": 44,
        "catalog_fatal": "non_fatal",
    },
    {
        "kind": "xid",
        "code": 999,
        "pci_bus_id": "00000000:44:00.0",
        "name": "UNKNOWN",
        "action": "UNKNOWN",
        "message": "a code newer than the catalog",
    },
]
for _event in EXPECTED:
    _event["boot"] = 1  # the log holds no boot boundary: all of it is the log's first (and only) boot


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
    # 56 event lines, of which two are continuation lines of an SXid incident printed three times.
    assert len(events) == 54 - 2
    assert events[-1]["kind"] == "fallen_off_bus" and events[-1]["pci_bus_id"] == "00000000:B3:00.0"
    assert {e["kind"] for e in events} == {"xid", "sxid", "fallen_off_bus"}


SXID_INCIDENT = [
    "[   38.175561] nvidia-nvswitch3: SXid (PCI:0000:04:00.0): 24007, Data {0x0000002b, 0x80005302}",
    "[   38.178720] nvidia-nvswitch3: SXid (PCI:0000:04:00.0): 24007, Fatal, Link 28 sourcetrack timeout error (First)",
    "[   38.180708] nvidia-nvswitch3: SXid (PCI:0000:04:00.0): 24007, Severity 1 Engine instance 28 Sub-engine instance 00",
    "[   38.180709] nvidia-nvswitch3: SXid (PCI:0000:04:00.0): 24007, Data {0x00000000, 0x00000001}",
]


def test_an_sxid_incident_is_one_event_with_its_details() -> None:
    events = list(scan(io.StringIO("\n".join([*SXID_INCIDENT, "[   39.0] usb 1-1: new device", *SXID_INCIDENT[1:3]]))))
    assert events == [
        {
            "kind": "sxid", "code": 24007, "pci_bus_id": "00000000:04:00.0",
            "name": "NPORT_SOURCETRACK_SOURCETRACK_TIME_OUT_ERR", "action": "RESTART_VM",
            "message": "Fatal, Link 28 sourcetrack timeout error (First)", "fatal": True, "link": 28,
            "catalog_fatal": "fatal", "boot": 1,
            "data": ["0x0000002b", "0x80005302", "0x00000000", "0x00000001"],
            "severity": 1, "engine_instance": 28, "sub_engine_instance": 0,
        },
        {
            "kind": "sxid", "code": 24007, "pci_bus_id": "00000000:04:00.0",
            "name": "NPORT_SOURCETRACK_SOURCETRACK_TIME_OUT_ERR", "action": "RESTART_VM",
            "message": "Fatal, Link 28 sourcetrack timeout error (First)", "fatal": True, "link": 28,
            "catalog_fatal": "fatal", "boot": 1, "severity": 1, "engine_instance": 28, "sub_engine_instance": 0,
        },
    ]


TWO_BOOTS = [
    "Jun  2 08:00:00 gpu7 kernel: [    0.000000] Linux version 6.8.0-45-generic (buildd@lcy02) #45-Ubuntu SMP",
    "Jun  2 08:00:00 gpu7 kernel: [    0.000000] Command line: BOOT_IMAGE=/vmlinuz-6.8.0-45-generic ro",
    "Jun  2 09:12:44 gpu7 kernel: [ 4364.100000] NVRM: Xid (PCI:0000:18:00): 79, pid=1, name=x, GPU has fallen off the bus.",
    "Jun  2 09:20:01 gpu7 systemd[1]: Stopping ...",
    "Jun  2 09:21:30 gpu7 kernel: [    0.000000] Linux version 6.8.0-45-generic (buildd@lcy02) #45-Ubuntu SMP",
    "Jun  2 09:21:30 gpu7 kernel: [    0.000000] Command line: BOOT_IMAGE=/vmlinuz-6.8.0-45-generic ro",
    "Jun  2 09:30:00 gpu7 kernel: [  510.200000] NVRM: Xid (PCI:10000:01:00): 13, pid=2, name=y, Graphics Exception",
]


@pytest.mark.parametrize(("boot", "codes"), [("all", [79, 13]), ("0", [13]), ("2", [13]), ("-1", [79]), ("1", [79])])
def test_boot_flag(boot: str, codes: list[int], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "syslog"
    path.write_text("\n".join(TWO_BOOTS) + "\n", encoding="utf-8")
    assert main([str(path), "--boot", boot]) == 0
    captured = capsys.readouterr()
    events = [json.loads(line) for line in captured.out.splitlines()]
    assert [e["code"] for e in events] == codes
    assert [e["boot"] for e in events] == ([1, 2] if boot == "all" else [1 if codes == [79] else 2])
    if boot != "all":
        assert "of 2: lines" in captured.err


@pytest.mark.parametrize(("boot", "error"), [("3", "holds 2 boot(s); --boot 3"), ("-2", "--boot -2"),
                                             ("current", "none begins as this machine")])
def test_boot_flag_errors(boot: str, error: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "syslog"
    path.write_text("\n".join(TWO_BOOTS) + "\n", encoding="utf-8")  # June dates: not this machine's boot
    assert main([str(path), "--boot", boot]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and error in captured.err


def test_boot_flag_rejects_a_word(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["x.log", "--boot", "last"])
    assert exit_info.value.code == 2
    assert "expected all, current or a boot number" in capsys.readouterr().err
