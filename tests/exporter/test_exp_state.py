"""The expected GPU count: a high-water mark kept per boot id in --state-dir, unless --expected-gpus fixes it."""

from __future__ import annotations

import json
import logging
import os

import pytest
import requests

from exporter.state import ExpectedGpus, read_boot_id


def test_high_water_mark_is_persisted_per_boot(tmp_path):
    first = ExpectedGpus(None, tmp_path, "boot-a")
    assert first.value is None  # unknown until NVML answers once this boot
    first.observe(8)
    assert first.value == 8
    first.observe(6)  # a GPU fell off: the mark stays
    assert first.value == 8

    saved = json.loads((tmp_path / ExpectedGpus.FILE).read_text())
    assert saved == {"boot_id": "boot-a", "max_visible": 8}

    # An exporter restart within the same boot remembers the eight, though only six are visible now.
    restarted = ExpectedGpus(None, tmp_path, "boot-a")
    assert restarted.value == 8
    restarted.observe(6)
    assert restarted.value == 8
    restarted.observe(9)
    assert ExpectedGpus(None, tmp_path, "boot-a").value == 9


def test_new_boot_starts_over(tmp_path):
    old = ExpectedGpus(None, tmp_path, "boot-a")
    old.observe(8)
    rebooted = ExpectedGpus(None, tmp_path, "boot-b")
    assert rebooted.value is None
    rebooted.observe(7)
    assert rebooted.value == 7
    assert json.loads((tmp_path / ExpectedGpus.FILE).read_text()) == {"boot_id": "boot-b", "max_visible": 7}
    # The old boot's mark is gone for good.
    assert ExpectedGpus(None, tmp_path, "boot-a").value is None


def test_fixed_value_wins(tmp_path):
    learned = ExpectedGpus(None, tmp_path, "boot-a")
    learned.observe(8)
    fixed = ExpectedGpus(4, tmp_path, "boot-a")
    assert fixed.value == 4
    fixed.observe(10)
    assert fixed.value == 4
    assert ExpectedGpus(0, tmp_path, "boot-a").value == 0


def test_a_node_seen_with_no_gpu_expects_none_not_unknown(tmp_path):
    ExpectedGpus(None, tmp_path, "boot-a").observe(0)
    assert ExpectedGpus(None, tmp_path, "boot-a").value == 0


def test_without_state_dir_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expected = ExpectedGpus(None, None, "boot-a")
    expected.observe(8)
    assert expected.value == 8
    assert list(tmp_path.iterdir()) == []
    assert ExpectedGpus(None, None, "boot-a").value is None


def test_state_dir_is_created(tmp_path):
    state = tmp_path / "a" / "b"
    ExpectedGpus(None, state, "boot-a").observe(2)
    assert ExpectedGpus(None, state, "boot-a").value == 2


@pytest.mark.parametrize("content", ["not json", "", '{"boot_id": "boot-a"}'])
def test_unreadable_or_partial_state_is_ignored(tmp_path, content):
    (tmp_path / ExpectedGpus.FILE).write_text(content)
    expected = ExpectedGpus(None, tmp_path, "boot-a")
    assert expected.value is None
    expected.observe(3)
    assert ExpectedGpus(None, tmp_path, "boot-a").value == 3


def test_unwritable_state_dir_keeps_counting(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the directory should be
    expected = ExpectedGpus(None, blocker / "state", "boot-a")
    with caplog.at_level(logging.WARNING, logger="exporter.state"):
        expected.observe(5)
    assert expected.value == 5
    assert any("cannot persist" in r.getMessage() for r in caplog.records)
    assert expected.errors.counts() == {"expected_gpus": 1}


def test_a_failed_state_write_is_a_metric(tmp_path, make_node, helpers):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    node = make_node({"gpus": 2}, expected=ExpectedGpus(None, blocker / "state", "boot-a"))
    text = node.cycle()
    assert helpers.value(text, "gpu_exporter_state_write_errors_total", file="expected_gpus") == 1
    assert helpers.value(text, "gpu_devices_expected") == 2  # still counted, in memory

    fine = make_node({"gpus": 2}, expected=ExpectedGpus(None, tmp_path / "state", "boot-a"))
    assert helpers.value(fine.cycle(), "gpu_exporter_state_write_errors_total", file="expected_gpus") == 0


def test_read_boot_id(tmp_path):
    path = tmp_path / "boot_id"
    path.write_text("d735ce35-7a08-4a7a-8858-4fb0fc163252\n")
    assert read_boot_id(str(path)) == "d735ce35-7a08-4a7a-8858-4fb0fc163252"
    assert read_boot_id(str(tmp_path / "missing")) == "unknown"
    if os.path.exists("/proc/sys/kernel/random/boot_id"):
        assert len(read_boot_id()) == 36


def test_poller_reports_the_remembered_count_after_a_restart(make_node, helpers, tmp_path):
    # Before the restart: eight GPUs seen.
    node = make_node({"gpus": 8}, expected=ExpectedGpus(None, tmp_path, "boot-a"))
    text = node.cycle()
    assert (helpers.value(text, "gpu_devices_visible"), helpers.value(text, "gpu_devices_expected")) == (8, 8)

    # After it, in the same boot, one GPU is gone from enumeration.
    faults = [{"kind": "gpu_lost", "gpu": 7, "at": 0, "remove": True}]
    restarted = make_node({"gpus": 8, "faults": faults}, expected=ExpectedGpus(None, tmp_path, "boot-a"))
    text = restarted.cycle()
    assert (helpers.value(text, "gpu_devices_visible"), helpers.value(text, "gpu_devices_expected")) == (7, 8)

    # A new boot learns afresh.
    rebooted = make_node({"gpus": 8, "faults": faults}, expected=ExpectedGpus(None, tmp_path, "boot-b"))
    text = rebooted.cycle()
    assert (helpers.value(text, "gpu_devices_visible"), helpers.value(text, "gpu_devices_expected")) == (7, 7)


def test_poller_reports_the_fixed_count(make_node, helpers, tmp_path):
    node = make_node({"gpus": 2}, expected=ExpectedGpus(8, tmp_path, "boot-a"))
    text = node.cycle()
    assert (helpers.value(text, "gpu_devices_visible"), helpers.value(text, "gpu_devices_expected")) == (2, 8)


def test_exporter_process_reads_the_count_of_this_boot(tmp_path, helpers):
    """End to end: the real exporter finds the mark an earlier run of this boot left in --state-dir."""
    state = tmp_path / "state"
    state.mkdir()
    (state / ExpectedGpus.FILE).write_text(json.dumps({"boot_id": read_boot_id(), "max_visible": 5}))
    proc = helpers.start_exporter(tmp_path, sim={"gpus": 3})
    try:
        proc.wait_ready()
        text = requests.get(proc.url + "/metrics", timeout=5).text
        assert (helpers.value(text, "gpu_devices_visible"), helpers.value(text, "gpu_devices_expected")) == (3, 5)
        assert json.loads((state / ExpectedGpus.FILE).read_text())["max_visible"] == 5
    finally:
        assert proc.stop() == 0, proc.stderr()


def test_one_boot_id_for_everything_kept_per_boot(tmp_path, helpers):
    """--xid.boot-id-file is the one source: the expected GPU count and the XID counts are kept under the same id."""
    boot = tmp_path / "boot_id"
    boot.write_text("11111111-2222-3333-4444-555555555555\n")
    log = tmp_path / "kern.log"
    log.write_text("")
    proc = helpers.start_exporter(tmp_path, "--xid.boot-id-file", str(boot), "--xid.source", f"file:{log}",
                                  "--xid.nvml-events", "off", sim={"gpus": 2})
    try:
        proc.wait_ready()
        requests.get(proc.url + "/metrics", timeout=5)
    finally:
        assert proc.stop() == 0, proc.stderr()
    state = tmp_path / "state"
    assert json.loads((state / ExpectedGpus.FILE).read_text())["boot_id"] == "11111111-2222-3333-4444-555555555555"
    assert json.loads((state / "xid-state.json").read_text())["boot_id"] == "11111111-2222-3333-4444-555555555555"


def test_a_failed_xid_state_write_is_counted(tmp_path):
    from exporter.state import WriteErrors
    from exporter.xid.store import XidStore

    blocker = tmp_path / "file"
    blocker.write_text("x")
    errors = WriteErrors()
    store = XidStore(blocker / "xid-state.json", "boot-a", "none", errors=errors)
    assert store.save(store.view()) is False
    assert errors.counts() == {"xid": 1}
