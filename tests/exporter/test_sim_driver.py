"""The simulator as a process on a shared node (sim-config `driver_dir`): counted inits that hold the device files,
the event API the Xid thread holds NVML through, fault times from the node's boot, resets and persistence mode."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pynvml
import pytest

from exporter.backends.sim import SimHandle, SimulatedNvml, sim_config_from_dict
from exporter.backends.sim_node import SimNode
from exporter.errors import ConfigError
from exporter.xid.nvml_events import NvmlXidEvents


def _sim(driver_dir: Path, **config: object) -> SimulatedNvml:
    return SimulatedNvml(sim_config_from_dict({"gpus": 2, "driver_dir": str(driver_dir), **config}))


def _open_files() -> set[str]:
    """What this process has open, as /proc/self/fd shows it (the view `nvidia-smi -r` and reset_gpu.sh take)."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the directory's own fd, closed by now
            continue
    return out


def _devices(driver_dir: Path, gpus: int = 2) -> set[str]:
    root = driver_dir.resolve() / "dev"
    return {str(root / "nvidiactl"), *(str(root / f"nvidia{i}") for i in range(gpus))}


@pytest.mark.parametrize(("value", "problem"), [
    ("node", "expected an absolute path"),
    (3, "expected an absolute path"),
    ("/etc/hostname", "is not a directory"),
])
def test_driver_dir_is_validated_and_the_error_names_the_key(value: object, problem: str) -> None:
    with pytest.raises(ConfigError, match=f"driver_dir: .*{problem}"):
        sim_config_from_dict({"driver_dir": value})


@pytest.mark.parametrize(("model", "nvswitch"), [("H100-SXM-80GB", True), ("H200-SXM-141GB", True),
                                                 ("A100-SXM4-80GB", False), ("L4", False)])
def test_the_node_directory_holds_the_device_files_and_the_boot_time(tmp_path: Path, model: str,
                                                                     nvswitch: bool) -> None:
    _sim(tmp_path / "node", model=model)
    dev = tmp_path / "node" / "dev"
    expected = {"nvidiactl", "nvidia0", "nvidia1"} | ({f"nvidia-nvswitch{i}" for i in range(4)} if nvswitch else set())
    assert set(os.listdir(dev)) == expected
    boot = float((tmp_path / "node" / "boot").read_text())
    assert boot <= time.time()
    _sim(tmp_path / "node", model=model)
    assert float((tmp_path / "node" / "boot").read_text()) == boot  # the first process's boot stays


def test_inits_are_counted_and_hold_the_device_files_until_the_last_shutdown(tmp_path: Path) -> None:
    sim = _sim(tmp_path / "node")
    devices = _devices(tmp_path / "node")
    assert sim.init_count == 0 and not devices & _open_files()

    sim.nvmlInit()
    sim.nvmlInitWithFlags(0)
    sim.nvmlShutdown()
    assert sim.init_count == 1 and devices <= _open_files()
    assert sim.nvmlDeviceGetCount() == 2  # still initialised

    sim.nvmlShutdown()
    assert sim.init_count == 0 and not devices & _open_files()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        sim.nvmlDeviceGetCount()
    sim.nvmlShutdown()  # one more than the inits: no error, as NVML documents
    assert sim.init_count == 0
    sim.nvmlInit()
    assert sim.init_count == 1 and devices <= _open_files()
    sim.nvmlShutdown()


def test_without_a_driver_dir_inits_are_counted_and_nothing_else_changes() -> None:
    sim = SimulatedNvml(sim_config_from_dict({"gpus": 1}))
    sim.nvmlInit()
    sim.nvmlInit()
    sim.nvmlShutdown()
    assert sim.nvmlDeviceGetCount() == 1
    sim.nvmlShutdown()
    assert sim.init_count == 0 and sim.node is None
    assert not hasattr(sim, "nvmlEventSetCreate")  # the exporter's Xid event thread stays off, as before


def test_the_xid_event_thread_holds_its_own_init_and_gives_it_back_on_release(tmp_path: Path) -> None:
    sim = _sim(tmp_path / "node")
    events = NvmlXidEvents(sim, lambda key, xid: None, wait_ms=20)
    events.start()
    try:
        assert events.ready.wait(5) and events.registered == 2
        assert sim.init_count == 1 and _devices(tmp_path / "node") <= _open_files()
        assert events.release()
        assert sim.init_count == 0 and not _devices(tmp_path / "node") & _open_files()
    finally:
        events.stop()


def test_the_event_api_answers_as_pynvml_does(tmp_path: Path) -> None:
    sim = _sim(tmp_path / "node")
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        sim.nvmlEventSetCreate()
    sim.nvmlInit()
    try:
        handle = sim.nvmlDeviceGetHandleByIndex(0)
        assert sim.nvmlDeviceGetSupportedEventTypes(handle) & pynvml.nvmlEventTypeXidCriticalError
        event_set = sim.nvmlEventSetCreate()
        sim.nvmlDeviceRegisterEvents(handle, pynvml.nvmlEventTypeXidCriticalError, event_set)
        with pytest.raises(pynvml.NVMLError_NotSupported):
            sim.nvmlDeviceRegisterEvents(handle, pynvml.nvmlEventTypePowerSourceChange, event_set)
        with pytest.raises(pynvml.NVMLError_Timeout):
            sim.nvmlEventSetWait_v2(event_set, 1)
        sim.nvmlEventSetFree(event_set)
        with pytest.raises(pynvml.NVMLError_InvalidArgument):
            sim.nvmlEventSetWait_v2(event_set, 1)
    finally:
        sim.nvmlShutdown()


def _booted(driver_dir: Path, ago: float) -> None:
    driver_dir.mkdir(parents=True)
    (driver_dir / "boot").write_text(f"{time.time() - ago}\n")


def test_fault_times_count_from_the_node_boot(tmp_path: Path) -> None:
    _booted(tmp_path / "node", ago=100)
    sim = _sim(tmp_path / "node", faults=[{"kind": "row_remap_pending", "gpu": 0, "at": 50},
                                          {"kind": "row_remap_pending", "gpu": 1, "at": 50, "until": 60}])
    sim.nvmlInit()
    assert sim.elapsed() >= 100
    assert sim.nvmlDeviceGetRemappedRows(SimHandle(0))[2] == 1
    assert sim.nvmlDeviceGetRemappedRows(SimHandle(1))[2] == 0
    sim.nvmlShutdown()


def test_a_reset_applies_a_pending_remap_and_restarts_volatile_ecc_but_leaves_the_rest(tmp_path: Path) -> None:
    _booted(tmp_path / "node", ago=100)
    faults = [
        {"kind": "row_remap_pending", "gpu": 0, "at": 10},
        {"kind": "nvlink_down", "gpu": 0, "link": 1, "at": 10},
        {"kind": "ecc_corrected", "gpu": 0, "count": 5, "at": 10},
        {"kind": "row_remap_pending", "gpu": 1, "at": 70},  # began after the reset: still pending
        {"kind": "gpu_lost", "gpu": 2, "at": 10},
    ]
    before = _sim(tmp_path / "node", gpus=3, faults=faults)
    node = SimNode(tmp_path / "node", 3, nvswitch=True)
    for index in range(3):
        node.record_reset(before._gpus[index].uuid, node.boot + 50)

    sim = _sim(tmp_path / "node", gpus=3, faults=faults)
    sim.nvmlInit()
    gpu0 = SimHandle(0)
    assert sim.nvmlDeviceGetRemappedRows(gpu0) == (0, 1, 0, 0)  # the remap is applied, its count stays
    assert sim.nvmlDeviceGetNvLinkState(gpu0, 1) == pynvml.NVML_FEATURE_DISABLED
    volatile, aggregate = (sim.nvmlDeviceGetTotalEccErrors(gpu0, pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, c)
                           for c in (pynvml.NVML_VOLATILE_ECC, pynvml.NVML_AGGREGATE_ECC))
    assert (volatile, aggregate) == (0, 5)
    assert sim.nvmlDeviceGetRemappedRows(SimHandle(1))[2] == 1
    assert sim.is_lost(2)
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        sim.nvmlDeviceGetUUID(SimHandle(2))
    sim.nvmlShutdown()


def test_a_running_simulator_reads_the_resets_directory_at_most_every_check_interval(tmp_path: Path) -> None:
    sim = _sim(tmp_path / "node", faults=[{"kind": "row_remap_pending", "gpu": 0}])
    assert sim.node is not None
    sim.nvmlInit()
    assert sim.nvmlDeviceGetRemappedRows(SimHandle(0))[2] == 1
    sim.node.check_every = 3600.0
    SimNode(tmp_path / "node", 2, nvswitch=True).record_reset(sim._gpus[0].uuid, time.time())
    assert sim.nvmlDeviceGetRemappedRows(SimHandle(0))[2] == 1  # not looked at again yet
    sim.node.check_every = 0.0
    assert sim.nvmlDeviceGetRemappedRows(SimHandle(0))[2] == 0
    sim.nvmlShutdown()


def test_persistence_mode_is_the_nodes(tmp_path: Path) -> None:
    sim = _sim(tmp_path / "node")
    assert sim.node is not None
    sim.nvmlInit()
    assert sim.nvmlDeviceGetPersistenceMode(SimHandle(0)) == pynvml.NVML_FEATURE_ENABLED
    SimNode(tmp_path / "node", 2, nvswitch=True).set_persistence(sim._gpus[0].uuid, False)
    fresh = _sim(tmp_path / "node")
    fresh.nvmlInit()
    assert fresh.nvmlDeviceGetPersistenceMode(SimHandle(0)) == pynvml.NVML_FEATURE_DISABLED
    assert fresh.nvmlDeviceGetPersistenceMode(SimHandle(1)) == pynvml.NVML_FEATURE_ENABLED
    fresh.nvmlShutdown()
    sim.nvmlShutdown()


def test_handles_by_uuid_and_bus_id_find_the_gpu_or_answer_not_found(tmp_path: Path) -> None:
    sim = _sim(tmp_path / "node")
    sim.nvmlInit()
    uuid = sim.nvmlDeviceGetUUID(SimHandle(1))
    assert sim.nvmlDeviceGetHandleByUUID(uuid) == SimHandle(1)
    for bus in ("00000000:2A:00.0", "0000:2a:00.0", b"2A:00.0"):
        assert sim.nvmlDeviceGetHandleByPciBusId_v2(bus) == SimHandle(1)
    with pytest.raises(pynvml.NVMLError_NotFound):
        sim.nvmlDeviceGetHandleByUUID("GPU-00000000-0000-0000-0000-000000000000")
    assert sim.nvmlDeviceGetMinorNumber(SimHandle(1)) == 1
    assert sim.nvmlDeviceGetCudaComputeCapability(SimHandle(1)) == (9, 0)
    sim.nvmlShutdown()
