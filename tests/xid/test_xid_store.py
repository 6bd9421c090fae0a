"""Per-boot XID counts: kept across restarts, never lower within a boot, from zero on a new boot; the collector."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from exporter.backends.sim import SimConfig, SimulatedNvml
from exporter.collectors.xid import XidCollector
from exporter.poller import Poller, PollerConfig
from exporter.registry import CollectorOptions, GpuKey
from exporter.render import exposition
from exporter.state import ExpectedGpus
from exporter.xid.parse import parse_line
from exporter.xid.sources import FileSource, NullSource
from exporter.xid.store import STATE_FILE, XidStore, XidView
from tests.xid.xid_support import wait_until

GPU0 = GpuKey(0, "GPU-aaaa")
GPU1 = GpuKey(1, "GPU-bbbb")
PCI_MAP = {"00000000:18:00.0": GPU0, "00000000:2A:00.0": GPU1}
XID79 = "NVRM: Xid (PCI:0000:18:00): 79, pid=1101234, name=nvc:[driver], GPU has fallen off the bus."
XID13 = "NVRM: Xid (PCI:0000:18:00): 13, pid=7, name=python3, Graphics SM Warp Exception"
XID154 = "NVRM: Xid (PCI:0000:2a:00): 154, GPU recovery action changed from 0x0 (None) to 0x2 (Node Reboot Required)"
SXID = "nvidia-nvswitch3: SXid (PCI:0000:04:00.0): 24007, Fatal, Link 28 sourcetrack timeout error (First)"
UNKNOWN_PCI = "NVRM: Xid (PCI:0000:77:00): 31, pid=9, name=secret-job, MMU Fault"
# Syslog's prefix, dated now: a log file is read from this boot's first line, which cannot predate this boot.
SYSLOG = time.strftime("%b %d %H:%M:%S") + " host kernel: "
# The kernel's first line of a boot, at monotonic time 0.
BOOT_LINE = SYSLOG + "[    0.000000] Linux version 6.8.0-45-generic #45-Ubuntu SMP"


def events(*lines: str, ts: float = 100.0) -> list:
    return [(parse_line(line), ts, 1) for line in lines]


def xid_counts(view: XidView) -> dict[tuple[str, int], int]:
    return {k: n for k, (n, _ts) in view.xid.items()}


# --- the store ------------------------------------------------------------------------------------------


def test_store_resumes_same_boot_and_source(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    store = XidStore(path, "boot-1", "kmsg")
    store.record(events(XID79, XID13, XID13, SXID, XID154), 9, 41, PCI_MAP.get)
    store.add_lost(2)
    store.add_nvml_only(GPU1, 48)
    assert store.save(store.view())
    assert not list(tmp_path.glob("*.tmp"))

    again = XidStore(path, "boot-1", "kmsg")
    assert again.restored == "resumed" and again.resume_position == 41
    view = again.view()
    assert xid_counts(view) == {("00000000:18:00.0", 79): 1, ("00000000:18:00.0", 13): 2, ("00000000:2A:00.0", 154): 1}
    assert view.sxid == {("00000000:04:00.0", 24007): (1, 1, 100.0)}
    assert view.recovery_action == {"00000000:2A:00.0": 2}
    assert view.fallen_off_bus == {"00000000:18:00.0": 100.0}
    assert view.gpus == PCI_MAP
    assert view.nvml_only == {(1, "GPU-bbbb", 48): 1}
    assert (view.lines_read, view.kmsg_records_lost) == (9, 2)
    # Counting continues from the saved counts.
    again.record(events(XID13), 1, 42, PCI_MAP.get)
    assert xid_counts(again.view())[("00000000:18:00.0", 13)] == 3


def test_new_boot_starts_from_zero(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    store = XidStore(path, "boot-1", "kmsg")
    store.record(events(XID79), 1, 7, PCI_MAP.get)
    store.save(store.view())
    fresh = XidStore(path, "boot-2", "kmsg")
    assert fresh.restored == "other-boot" and fresh.resume_position is None
    assert fresh.view().xid == {} and fresh.view().gpus == {}


def test_other_source_replays_under_a_floor(tmp_path: Path) -> None:
    """kmsg became unreadable and auto picked journald: replay it, never show less, never count twice."""
    path = tmp_path / STATE_FILE
    store = XidStore(path, "boot-1", "kmsg")
    store.record(events(XID79, XID13, XID13), 3, 7, PCI_MAP.get)
    store.save(store.view())

    other = XidStore(path, "boot-1", "journal")
    assert other.restored == "merged" and other.resume_position is None
    assert xid_counts(other.view()) == {("00000000:18:00.0", 79): 1, ("00000000:18:00.0", 13): 2}
    # The journal holds the same lines (and one the ring buffer had lost): max, not sum.
    other.record(events(XID79, XID13, XID13, XID13), 4, "cursor", PCI_MAP.get)
    assert xid_counts(other.view()) == {("00000000:18:00.0", 79): 1, ("00000000:18:00.0", 13): 3}


def test_unreadable_state_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    path.write_text("{not json")
    store = XidStore(path, "boot-1", "kmsg")
    assert store.restored == "none" and store.view().xid == {}


def test_storm_is_bounded(tmp_path: Path) -> None:
    """800,000 identical lines are one integer; nothing per line is kept."""
    store = XidStore(None, "boot-1", "file:x")
    event = parse_line("NVRM: Xid (PCI:0000:18:00): 95, pid=7062, Uncontained: LTC TAG (0x2, 0x1). RST: Yes")
    for _ in range(100):
        store.record([(event, 1.0, 8000)], 8000, None, PCI_MAP.get)
    view = store.view()
    assert xid_counts(view) == {("00000000:18:00.0", 95): 800_000}
    assert len(json.dumps(view.to_json())) < 1000


# --- the collector, on a file source --------------------------------------------------------------------


def collector_on(log: Path, state: Path | None, boot: str = "boot-1", pci_map=lambda: PCI_MAP) -> XidCollector:
    store = XidStore(state / STATE_FILE if state else None, boot, f"file:{log}")
    c = XidCollector("node-a", store, FileSource(log, poll_interval=0.005), pci_map=pci_map)
    c.start(catchup_timeout=5)
    return c


def metrics(c: XidCollector) -> str:
    from exporter.registry import FleetView, RenderContext

    return exposition(c.families(RenderContext("node-a", [], FleetView(True, 2, 2, "x"))))


def sample(text: str, metric: str, /, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(metric + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_collector_counts_labels_and_restart(tmp_path: Path) -> None:
    log = tmp_path / "kern.log"
    lines = [BOOT_LINE, SYSLOG + XID79, XID13, XID154, SXID, UNKNOWN_PCI, "noise"]
    log.write_text("\n".join(lines) + "\n")
    c = collector_on(log, tmp_path)
    try:
        text = metrics(c)
        assert sample(text, "gpu_xid_errors_total", gpu="0", uuid="GPU-aaaa", xid="79",
                      name="ROBUST_CHANNEL_GPU_HAS_FALLEN_OFF_THE_BUS", action="RESTART_BM") == 1
        # Unknown PCI ids are counted, with gpu and uuid "unknown"; no pid or process name is ever a label.
        assert sample(text, "gpu_xid_errors_total", gpu="unknown", uuid="unknown", pci_bus_id="00000000:77:00.0") == 1
        assert "secret-job" not in text and "pid" not in text
        assert sample(text, "gpu_recovery_action", gpu="1", uuid="GPU-bbbb") == 2
        assert sample(text, "gpu_recovery_action", gpu="0") == 0
        assert sample(text, "gpu_fallen_off_bus", gpu="0", pci_bus_id="00000000:18:00.0") == 1
        assert sample(text, "gpu_fallen_off_bus_timestamp_seconds", gpu="0", pci_bus_id="00000000:18:00.0") == (
            sample(text, "gpu_xid_last_timestamp_seconds", xid="79"))
        assert sample(text, "gpu_sxid_errors_total", nvswitch_pci_bus_id="00000000:04:00.0", sxid="24007") == 1
        assert sample(text, "gpu_sxid_fatal_errors_total", sxid="24007") == 1
        assert sample(text, "gpu_xid_source_info", source="file") == 1
        assert sample(text, "gpu_xid_source_up") == 1
        assert sample(text, "gpu_xid_lines_read_total") == 7
        assert sample(text, "gpu_xid_last_timestamp_seconds", xid="79") == pytest.approx(time.time(), abs=60)

        # A new line shows after a publish, which happens at once for events.
        version = c.version()
        with open(log, "a") as f:
            f.write(XID13 + "\n")
        wait_until(lambda: sample(metrics(c), "gpu_xid_errors_total", xid="13") == 2)
        assert c.version() != version
    finally:
        c.close()

    # Restart: same counts from the state file, and only new lines are added.
    with open(log, "a") as f:
        f.write(XID13 + "\n")
    c = collector_on(log, tmp_path)
    try:
        text = metrics(c)
        assert sample(text, "gpu_xid_errors_total", xid="13") == 3
        assert sample(text, "gpu_xid_errors_total", xid="79") == 1
        assert c.store.restored == "resumed"
    finally:
        c.close()


def test_a_shown_count_was_saved_first(tmp_path: Path) -> None:
    """Whatever families() renders is what the state file holds (a crash cannot make it go down)."""
    log = tmp_path / "kern.log"
    log.write_text(BOOT_LINE + "\n" + XID79 + "\n")
    c = collector_on(log, tmp_path)
    try:
        for _ in range(5):
            with open(log, "a") as f:
                f.write(XID13 + "\n")
            shown = sample(metrics(c), "gpu_xid_errors_total", xid="13") or 0
            saved = json.loads((tmp_path / STATE_FILE).read_text())
            on_disk = sum(n for _p, code, n, _ts in saved["xid"] if code == 13)
            assert on_disk >= shown
    finally:
        c.close()


def test_gpu_learned_once_stays_after_it_leaves_the_map(tmp_path: Path) -> None:
    log = tmp_path / "kern.log"
    log.write_text(BOOT_LINE + "\n" + XID79 + "\n")
    current = dict(PCI_MAP)
    c = collector_on(log, tmp_path, pci_map=lambda: current)
    c.close()
    current.clear()  # the GPU fell off the bus: NVML no longer lists it after the restart
    c = collector_on(log, tmp_path, pci_map=lambda: current)
    try:
        assert sample(metrics(c), "gpu_xid_errors_total", xid="79", gpu="0", uuid="GPU-aaaa") == 1
    finally:
        c.close()


def test_none_source_serves_saved_counts(tmp_path: Path) -> None:
    store = XidStore(tmp_path / STATE_FILE, "boot-1", "kmsg")
    store.record(events(XID79), 1, 3, PCI_MAP.get)
    store.save(store.view())
    c = XidCollector("node-a", XidStore(tmp_path / STATE_FILE, "boot-1", "none"), NullSource(),
                     pci_map=lambda: PCI_MAP)
    c.start(catchup_timeout=1)
    try:
        text = metrics(c)
        assert sample(text, "gpu_xid_errors_total", xid="79") == 1
        assert sample(text, "gpu_xid_source_info", source="none") == 1
        assert sample(text, "gpu_xid_source_up") == 0
    finally:
        c.close()


# --- the poller hook ------------------------------------------------------------------------------------


def test_poller_republishes_without_waiting_for_the_next_cycle(tmp_path: Path) -> None:
    log = tmp_path / "kern.log"
    log.touch()
    nvml = SimulatedNvml(SimConfig(gpus=2))
    holder: list[Poller] = []
    options = CollectorOptions(
        node="node-a", state_dir=tmp_path, nvml=nvml,
        pci_map=lambda: holder[0].pci_map() if holder else {},
        settings={"xid_source": f"file:{log}", "xid_boot_id_file": str(tmp_path / "boot_id")},
    )
    (tmp_path / "boot_id").write_text("boot-x\n")
    xid = XidCollector.from_options(options)
    config = PollerConfig(node="node-a", interval=3600, slow_interval=3600)
    poller = Poller(nvml, [xid], config, ExpectedGpus(None, None, "b"))
    holder.append(poller)
    try:
        poller.run_cycle()
        assert b"gpu_xid_errors_total" not in poller.snapshot.body
        cycles = poller.cycles
        with open(log, "a") as f:
            f.write("[ 12.5] NVRM: Xid (PCI:0000:2a:00): 48, pid=1, name=x, DBE (0x1)\n")
        wait_until(lambda: b'xid="48"' in poller.snapshot.body)
        body = poller.snapshot.body.decode()
        assert poller.cycles == cycles  # no collection cycle ran: only the XID part was re-rendered
        assert 'gpu="1"' in next(line for line in body.splitlines() if 'xid="48"' in line)
        assert "gpu_nvml_up" in body and "gpu_exporter_collector_success" in body
        # The regular cycle renders the same text from its cache key (version() unchanged).
        assert poller.run_cycle().body.decode().count('xid="48"') == body.count('xid="48"')
    finally:
        poller.stop()
    saved = json.loads((tmp_path / STATE_FILE).read_text())
    assert saved["boot_id"] == "boot-x" and saved["position"][1] == os.path.getsize(log)


def test_unwritable_state_dir_is_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    store = XidStore(blocker / STATE_FILE, "boot-1", "kmsg")
    store.record(events(XID79), 1, 1, PCI_MAP.get)
    assert not store.save(store.view())
    assert not store.save(store.view())
    assert [r.getMessage() for r in caplog.records].count("cannot persist XID state") == 1


def test_without_a_boot_id_nothing_is_persisted(tmp_path: Path) -> None:
    options = CollectorOptions(node="n", state_dir=tmp_path, settings={
        "xid_source": "none", "xid_boot_id_file": str(tmp_path / "missing"), "xid_nvml_events": "off"})
    c = XidCollector.from_options(options)
    c.close()
    assert c.store.path is None and not (tmp_path / STATE_FILE).exists()


def test_flags_reach_settings_and_bad_sources_are_refused() -> None:
    from exporter.config import parse
    from exporter.errors import ConfigError
    from exporter.registry import discover

    config = parse(["--node-name", "n", "--xid.source", "file:/var/log/kern.log", "--xid.nvml-events", "off"],
                   discover())
    assert "xid" in config.collectors
    assert config.settings["xid_source"] == "file:/var/log/kern.log"
    assert config.settings["xid_nvml_events"] == "off"
    assert config.settings["xid_journalctl"] == "journalctl"
    with pytest.raises(ConfigError, match="--xid.source"):
        parse(["--node-name", "n", "--xid.source", "syslog"], discover())


SXID_INCIDENT = [
    "[   38.175561] nvidia-nvswitch3: SXid (PCI:0000:04:00.0): 24007, Data {0x0000002b, 0x0000002b, 0x00000000}",
    "[   38.178720] nvidia-nvswitch3: SXid (PCI:0000:04:00.0): 24007, Fatal, Link 28 sourcetrack timeout error (First)",
    "[   38.180708] nvidia-nvswitch3: SXid (PCI:0000:04:00.0): 24007, Severity 1 Engine instance 28 Sub-engine instance 00",
]


def test_an_sxid_incident_counts_once_with_catalog_labels(tmp_path: Path) -> None:
    log = tmp_path / "kern.log"
    log.write_text("\n".join([BOOT_LINE, *SXID_INCIDENT]) + "\n")
    c = collector_on(log, tmp_path)
    try:
        text = metrics(c)
        assert sample(text, "gpu_sxid_errors_total", nvswitch_pci_bus_id="00000000:04:00.0", sxid="24007",
                      name="NPORT_SOURCETRACK_SOURCETRACK_TIME_OUT_ERR", action="RESTART_VM") == 1
        assert sample(text, "gpu_sxid_fatal_errors_total", sxid="24007") == 1
    finally:
        c.close()


def test_vmd_domain_maps_to_its_gpu(tmp_path: Path) -> None:
    """A 5-digit (VMD) domain is kept whole, so the Xid lands on the GPU NVML lists at 00010000:01:00.0.

    The PCI map is in NVML's spelling, as the poller reads it from nvmlDeviceGetPciInfo; a GPU in domain 0 at the
    same bus is another device and must not take the VMD GPU's Xid.
    """
    log = tmp_path / "kern.log"
    log.write_text(BOOT_LINE + "\nNVRM: Xid (PCI:10000:01:00): 79, pid=1, name=x, GPU has fallen off the bus.\n")
    vmd = {"00010000:01:00.0": GpuKey(3, "GPU-vmd"), "00000000:01:00.0": GpuKey(0, "GPU-domain0")}
    c = collector_on(log, tmp_path, pci_map=lambda: vmd)
    try:
        text = metrics(c)
        assert sample(text, "gpu_xid_errors_total", gpu="3", uuid="GPU-vmd", pci_bus_id="00010000:01:00.0") == 1
        assert sample(text, "gpu_fallen_off_bus", gpu="3", pci_bus_id="00010000:01:00.0") == 1
        assert sample(text, "gpu_xid_errors_total", gpu="unknown") is None
        assert sample(text, "gpu_xid_errors_total", gpu="0") is None
    finally:
        c.close()


def test_kernel_style_pci_map_keys_still_resolve(tmp_path: Path) -> None:
    """The poller's map may still be keyed by the kernel's 0000:18:00; the collector converts its keys."""
    log = tmp_path / "kern.log"
    log.write_text(BOOT_LINE + "\n" + XID13 + "\n")
    c = collector_on(log, tmp_path, pci_map=lambda: {"0000:18:00": PCI_MAP["00000000:18:00.0"]})
    try:
        assert sample(metrics(c), "gpu_xid_errors_total", gpu="0", pci_bus_id="00000000:18:00.0", xid="13") == 1
    finally:
        c.close()


def test_state_saved_with_kernel_spelling_continues_under_nvml_spelling(tmp_path: Path) -> None:
    """A state file from before the PCI id change: its counts continue under the new label, never from zero."""
    (tmp_path / STATE_FILE).write_text(json.dumps({
        "version": 1, "boot_id": "boot-1", "source": "file:x", "position": None,
        "xid": [["0000:18:00", 79, 2, 5.0]], "sxid": [["0000:04:00.0", 24007, 1, 1, 5.0]],
        "fallen_off_bus": {"0000:18:00": 5.0}, "gpus": {"0000:18:00": [0, "GPU-aaaa"]},
    }))
    view = XidStore(tmp_path / STATE_FILE, "boot-1", "file:x").view()
    assert view.xid == {("00000000:18:00.0", 79): (2, 5.0)}
    assert set(view.sxid) == {("00000000:04:00.0", 24007)}
    assert view.fallen_off_bus == {"00000000:18:00.0": 5.0} and set(view.gpus) == {"00000000:18:00.0"}
