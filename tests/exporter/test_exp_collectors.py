"""Each collector on the simulator: its families, labels, units, and how faults move its values."""

from __future__ import annotations

import ctypes

import pynvml
import pytest

from exporter.backends.sim import MODELS, SimulatedNvml
from exporter.device import to_str

H100 = MODELS["H100-SXM-80GB"]

# Per collector: family (sample) name -> labels besides node, gpu and uuid; and samples per GPU.
FAMILIES: dict[str, dict[str, tuple[tuple[str, ...], int]]] = {
    "identity": {
        "gpu_info": (("serial", "pci_bus_id", "model", "driver_version", "vbios_version", "cuda_version",
                      "mig_mode", "persistence_mode"), 1),
    },
    "thermal": {
        "gpu_temperature_celsius": ((), 1),
        "gpu_memory_temperature_celsius": ((), 1),
        "gpu_temperature_threshold_celsius": (("threshold",), 2),
    },
    "power": {
        "gpu_power_usage_watts": ((), 1),
        "gpu_power_limit_watts": ((), 1),
        "gpu_energy_consumption_joules_total": ((), 1),
    },
    "utilization": {
        "gpu_utilization_ratio": ((), 1),
        "gpu_memory_bandwidth_utilization_ratio": ((), 1),
        "gpu_memory_used_bytes": ((), 1),
        "gpu_memory_total_bytes": ((), 1),
        "gpu_memory_reserved_bytes": ((), 1),
    },
    "clocks": {
        "gpu_clock_hertz": (("clock",), 2),
        "gpu_clock_event_reason_active": (("reason",), 9),
        "gpu_performance_state": ((), 1),
    },
    "ecc": {
        "gpu_ecc_enabled": ((), 1),
        "gpu_ecc_errors_total": (("error_type", "counter"), 4),
    },
    "retired_pages": {
        "gpu_retired_pages": (("cause",), 2),
        "gpu_retired_pages_pending": ((), 1),
    },
    "remapped_rows": {
        "gpu_remapped_rows": (("cause",), 2),
        "gpu_row_remap_pending": ((), 1),
        "gpu_row_remap_failure": ((), 1),
    },
    "nvlink": {
        "gpu_nvlink_links_up": ((), 1),
        "gpu_nvlink_links_down": ((), 1),
        "gpu_nvlink_errors_total": (("counter",), 3),
    },
    "pcie": {
        "gpu_pcie_replays_total": ((), 1),
        "gpu_pcie_link_generation": ((), 1),
        "gpu_pcie_link_max_generation": ((), 1),
        "gpu_pcie_link_width_lanes": ((), 1),
        "gpu_pcie_link_max_width_lanes": ((), 1),
    },
    "fabric": {
        "gpu_fabric_state": ((), 1),
        "gpu_fabric_status": ((), 1),
        "gpu_fabric_health": ((), 1),
    },
}


def test_every_gpu_collector_is_covered(helpers):
    assert set(helpers.gpu_collectors()) == set(FAMILIES)


@pytest.mark.parametrize("collector", sorted(FAMILIES))
def test_families_and_labels_for_every_gpu(make_node, helpers, collector):
    node = make_node({"gpus": 8}, collectors=[collector])
    text = node.cycle()
    uuids = {str(i): node.uuid(i) for i in range(8)}
    assert len(set(uuids.values())) == 8

    assert helpers.value(text, "gpu_exporter_collector_success", collector=collector) == 1
    # A collector renders its own families and nothing else besides the core series.
    assert helpers.sample_names(text) - helpers.CORE_FAMILIES == set(FAMILIES[collector])

    for name, (extra, per_gpu) in FAMILIES[collector].items():
        samples = helpers.select(text, name)
        for s in samples:
            assert set(s.labels) == {"node", "gpu", "uuid", *extra}, s
            assert s.labels["node"] == helpers.NODE
            assert s.labels["uuid"] == uuids[s.labels["gpu"]], s
        counts = {gpu: sum(1 for s in samples if s.labels["gpu"] == gpu) for gpu in uuids}
        assert counts == {gpu: per_gpu for gpu in uuids}, name
        # No duplicate series.
        assert len({tuple(sorted(s.labels.items())) for s in samples}) == len(samples)


def test_identity_values(make_node, helpers):
    node = make_node({"gpus": 8, "driver_version": "550.90.07", "cuda_version": 12040}, collectors=["identity"])
    text = node.cycle()
    buses = set()
    for i in range(8):
        (info,) = helpers.select(text, "gpu_info", gpu=str(i))
        h = node.handle(i)
        assert info.value == 1
        assert info.labels["uuid"] == node.sim.nvmlDeviceGetUUID(h)
        assert info.labels["serial"] == node.sim.nvmlDeviceGetSerial(h)
        assert info.labels["pci_bus_id"] == to_str(node.sim.nvmlDeviceGetPciInfo_v3(h).busId)
        assert info.labels["model"] == "NVIDIA H100 80GB HBM3"
        assert info.labels["driver_version"] == "550.90.07"
        assert info.labels["vbios_version"] == H100.vbios
        assert info.labels["cuda_version"] == "12.4"
        assert info.labels["mig_mode"] == "disabled"
        assert info.labels["persistence_mode"] == "enabled"
        buses.add(info.labels["pci_bus_id"])
    assert len(buses) == 8


def test_power_in_watts_and_joules(make_node, helpers):
    node = make_node({"gpus": 8}, collectors=["power"])
    text = node.cycle(advance=30)
    for i in range(8):
        h = node.handle(i)
        usage_mw = node.sim.nvmlDeviceGetPowerUsage(h)
        assert helpers.value(text, "gpu_power_usage_watts", gpu=str(i)) == pytest.approx(usage_mw / 1000)
        assert helpers.value(text, "gpu_power_limit_watts", gpu=str(i)) == pytest.approx(H100.power_limit_mw / 1000)
        assert helpers.value(text, "gpu_energy_consumption_joules_total", gpu=str(i)) == pytest.approx(
            node.sim.nvmlDeviceGetTotalEnergyConsumption(h) / 1000
        )
        assert 50 < usage_mw / 1000 < 700


def test_energy_counter_grows_with_time(make_node, helpers):
    node = make_node({"gpus": 2}, collectors=["power"])
    before = helpers.per_gpu(node.cycle(), "gpu_energy_consumption_joules_total")
    after = helpers.per_gpu(node.cycle(advance=10), "gpu_energy_consumption_joules_total")
    for gpu in before:
        # At least the idle draw for 10 s.
        assert after[gpu] - before[gpu] >= 10 * H100.idle_power_mw / 1000


def test_utilization_ratios_and_memory_bytes(make_node, helpers):
    node = make_node({"gpus": 8}, collectors=["utilization"])
    text = node.cycle()
    for i in range(8):
        h = node.handle(i)
        rates = node.sim.nvmlDeviceGetUtilizationRates(h)
        mem = node.sim.nvmlDeviceGetMemoryInfo(h, pynvml.nvmlMemory_v2)
        assert helpers.value(text, "gpu_utilization_ratio", gpu=str(i)) == pytest.approx(rates.gpu / 100)
        assert helpers.value(text, "gpu_memory_bandwidth_utilization_ratio", gpu=str(i)) == pytest.approx(
            rates.memory / 100
        )
        assert 0 <= helpers.value(text, "gpu_utilization_ratio", gpu=str(i)) <= 1
        assert helpers.value(text, "gpu_memory_total_bytes", gpu=str(i)) == H100.memory_bytes
        assert helpers.value(text, "gpu_memory_reserved_bytes", gpu=str(i)) == H100.reserved_bytes
        assert helpers.value(text, "gpu_memory_used_bytes", gpu=str(i)) == mem.used


def test_utilization_fault(make_node, helpers):
    node = make_node(
        {"gpus": 3, "faults": [{"kind": "utilization", "gpu": 2, "at": 5, "percent": 97, "memory_percent": 30}]},
        collectors=["utilization"],
    )
    before = node.cycle()
    after = node.cycle(advance=5)
    assert helpers.value(before, "gpu_utilization_ratio", gpu="2") < 0.5
    assert helpers.value(after, "gpu_utilization_ratio", gpu="2") == pytest.approx(0.97)
    assert helpers.value(after, "gpu_memory_bandwidth_utilization_ratio", gpu="2") == pytest.approx(0.30)
    assert helpers.value(after, "gpu_utilization_ratio", gpu="0") < 0.5


def test_clocks_in_hertz(make_node, helpers):
    node = make_node({"gpus": 8}, collectors=["clocks"])
    text = node.cycle()
    for i in range(8):
        h = node.handle(i)
        sm = node.sim.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)
        assert helpers.value(text, "gpu_clock_hertz", gpu=str(i), clock="sm") == sm * 1e6
        assert helpers.value(text, "gpu_clock_hertz", gpu=str(i), clock="memory") == H100.mem_mhz * 1e6
        assert helpers.value(text, "gpu_clock_event_reason_active", gpu=str(i), reason="hw_thermal_slowdown") == 0
        assert helpers.value(text, "gpu_performance_state", gpu=str(i)) == node.sim.nvmlDeviceGetPerformanceState(h)


def test_throttle_sets_reason_and_lowers_sm_clock(make_node, helpers):
    faults = [{"kind": "throttle", "gpu": 2, "at": 10}]
    node = make_node({"gpus": 4, "faults": faults}, collectors=["clocks"])
    before = node.cycle()
    after = node.cycle(advance=10)
    assert helpers.value(before, "gpu_clock_event_reason_active", gpu="2", reason="hw_thermal_slowdown") == 0
    assert helpers.value(after, "gpu_clock_event_reason_active", gpu="2", reason="hw_thermal_slowdown") == 1
    for other in ("0", "1", "3"):
        assert helpers.value(after, "gpu_clock_event_reason_active", gpu=other, reason="hw_thermal_slowdown") == 0
    # Only the reason asked for is set.
    active = {s.labels["reason"] for s in helpers.select(after, "gpu_clock_event_reason_active", gpu="2") if s.value}
    assert active == {"hw_thermal_slowdown"}
    sm = node.sim.nvmlDeviceGetClockInfo(node.handle(2), pynvml.NVML_CLOCK_SM)
    assert helpers.value(after, "gpu_clock_hertz", gpu="2", clock="sm") == sm * 1e6
    assert helpers.value(after, "gpu_clock_hertz", gpu="2", clock="sm") < helpers.value(
        before, "gpu_clock_hertz", gpu="2", clock="sm"
    )


def test_throttle_with_named_reasons(make_node, helpers):
    faults = [{"kind": "throttle", "gpu": 0, "reasons": ["sw_power_cap", "hw_power_brake_slowdown"]}]
    node = make_node({"gpus": 1, "faults": faults}, collectors=["clocks"])
    text = node.cycle()
    active = {s.labels["reason"] for s in helpers.select(text, "gpu_clock_event_reason_active") if s.value}
    assert active == {"sw_power_cap", "hw_power_brake_slowdown"}


def test_thermal_values(make_node, helpers):
    node = make_node({"gpus": 8}, collectors=["thermal"])
    text = node.cycle()
    for i in range(8):
        h = node.handle(i)
        temp = node.sim.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)
        (mem,) = node.sim.nvmlDeviceGetFieldValues(h, [pynvml.NVML_FI_DEV_MEMORY_TEMP])
        assert helpers.value(text, "gpu_temperature_celsius", gpu=str(i)) == temp
        assert helpers.value(text, "gpu_memory_temperature_celsius", gpu=str(i)) == mem.value.ullVal
        assert helpers.value(text, "gpu_temperature_threshold_celsius", gpu=str(i), threshold="slowdown") == 90
        assert helpers.value(text, "gpu_temperature_threshold_celsius", gpu=str(i), threshold="shutdown") == 92
        assert 20 < temp < 80


def test_temperature_ramp_follows_the_clock(make_node, helpers):
    faults = [{"kind": "temperature_ramp", "gpu": 1, "at": "10s", "over": "20s", "to": 95}]
    node = make_node({"gpus": 2, "faults": faults}, collectors=["thermal"])
    temps = []
    for advance in (0, 10, 10, 10, 10):
        text = node.cycle(advance=advance)
        temps.append(helpers.value(text, "gpu_temperature_celsius", gpu="1"))
        assert temps[-1] == node.sim.nvmlDeviceGetTemperature(node.handle(1), pynvml.NVML_TEMPERATURE_GPU)
    start, not_yet, halfway, done, later = temps
    assert not_yet == pytest.approx(start, abs=1)
    assert not_yet < halfway < done
    assert halfway == pytest.approx((not_yet + 95) / 2, abs=2)
    assert done == 95 and later == 95
    # GPU 0 has no ramp.
    assert helpers.value(text, "gpu_temperature_celsius", gpu="0") < 60


def test_ecc_uncorrectable_fault_moves_the_counter(make_node, helpers):
    faults = [{"kind": "ecc_uncorrectable", "gpu": 2, "at": 10, "count": 3}]
    node = make_node({"gpus": 4, "faults": faults}, collectors=["ecc"])
    before = node.cycle()
    after = node.cycle(advance=10)
    for text in (before, after):
        assert helpers.per_gpu(text, "gpu_ecc_enabled") == {str(i): 1 for i in range(4)}
    assert helpers.per_gpu(before, "gpu_ecc_errors_total", error_type="uncorrected", counter="volatile") == {
        str(i): 0 for i in range(4)
    }
    assert helpers.per_gpu(after, "gpu_ecc_errors_total", error_type="uncorrected", counter="volatile") == {
        "0": 0, "1": 0, "2": 3, "3": 0
    }
    assert helpers.value(after, "gpu_ecc_errors_total", gpu="2", error_type="uncorrected", counter="aggregate") == 3
    # The sim carries corrected aggregate history of 3 per GPU index; the volatile count starts at zero.
    assert helpers.value(after, "gpu_ecc_errors_total", gpu="2", error_type="corrected", counter="aggregate") == 6
    assert helpers.value(after, "gpu_ecc_errors_total", gpu="2", error_type="corrected", counter="volatile") == 0


def test_ecc_corrected_rate_keeps_counting(make_node, helpers):
    faults = [{"kind": "ecc_corrected", "gpu": 0, "at": 0, "rate": 2}]
    node = make_node({"gpus": 1, "faults": faults}, collectors=["ecc"])
    first = helpers.value(node.cycle(advance=5), "gpu_ecc_errors_total", error_type="corrected", counter="volatile")
    second = helpers.value(node.cycle(advance=5), "gpu_ecc_errors_total", error_type="corrected", counter="volatile")
    assert (first, second) == (10, 20)


def test_slow_tier_is_not_reread_on_fast_cycles(make_node, helpers):
    faults = [{"kind": "ecc_uncorrectable", "gpu": 0, "at": 10, "count": 1}, {"kind": "throttle", "gpu": 0, "at": 10}]
    node = make_node({"gpus": 1, "faults": faults}, collectors=["ecc", "clocks"], slow_interval=3600)
    node.cycle()
    text = node.cycle(advance=10)
    # clocks is on the fast tier and sees the throttle; ECC waits for the slow tier.
    assert helpers.value(text, "gpu_clock_event_reason_active", reason="hw_thermal_slowdown") == 1
    assert helpers.value(text, "gpu_ecc_errors_total", error_type="uncorrected", counter="volatile") == 0


def test_retired_pages(make_node, helpers):
    faults = [
        {"kind": "retired_pages", "gpu": 1, "at": 10, "cause": "double_bit", "count": 3, "pending": True},
        {"kind": "retired_pages", "gpu": 2, "at": 10, "cause": "single_bit", "count": 2, "pending": False},
    ]
    node = make_node({"gpus": 3, "faults": faults}, collectors=["retired_pages"])
    before = node.cycle()
    assert {s.value for s in helpers.select(before, "gpu_retired_pages")} == {0}
    assert {s.value for s in helpers.select(before, "gpu_retired_pages_pending")} == {0}
    after = node.cycle(advance=10)
    assert helpers.per_gpu(after, "gpu_retired_pages", cause="double_bit") == {"0": 0, "1": 3, "2": 0}
    assert helpers.per_gpu(after, "gpu_retired_pages", cause="multiple_single_bit") == {"0": 0, "1": 0, "2": 2}
    assert helpers.per_gpu(after, "gpu_retired_pages_pending") == {"0": 0, "1": 1, "2": 0}


def test_row_remap_pending_and_failure(make_node, helpers):
    faults = [
        {"kind": "row_remap_pending", "gpu": 1, "at": 10},
        {"kind": "row_remap_failure", "gpu": 2, "at": 10},
    ]
    node = make_node({"gpus": 4, "faults": faults}, collectors=["remapped_rows"])
    before = node.cycle()
    assert helpers.per_gpu(before, "gpu_row_remap_pending") == {str(i): 0 for i in range(4)}
    assert helpers.per_gpu(before, "gpu_row_remap_failure") == {str(i): 0 for i in range(4)}
    after = node.cycle(advance=10)
    assert helpers.per_gpu(after, "gpu_row_remap_pending") == {"0": 0, "1": 1, "2": 0, "3": 0}
    assert helpers.per_gpu(after, "gpu_row_remap_failure") == {"0": 0, "1": 0, "2": 1, "3": 0}
    for i in range(4):
        correctable, uncorrectable, _, _ = node.sim.nvmlDeviceGetRemappedRows(node.handle(i))
        assert helpers.value(after, "gpu_remapped_rows", gpu=str(i), cause="correctable") == correctable
        assert helpers.value(after, "gpu_remapped_rows", gpu=str(i), cause="uncorrectable") == uncorrectable
    assert helpers.value(after, "gpu_remapped_rows", gpu="1", cause="uncorrectable") == 1


def test_pcie_values_downgrade_and_replays(make_node, helpers):
    faults = [
        {"kind": "pcie_downgrade", "gpu": 0, "at": 10, "width": 8, "generation": 3},
        {"kind": "pcie_replays", "gpu": 1, "at": 10, "count": 5},
    ]
    node = make_node({"gpus": 3, "faults": faults}, collectors=["pcie"])
    before = node.cycle()
    for name, expected in (
        ("gpu_pcie_link_generation", 5), ("gpu_pcie_link_max_generation", 5),
        ("gpu_pcie_link_width_lanes", 16), ("gpu_pcie_link_max_width_lanes", 16), ("gpu_pcie_replays_total", 0),
    ):
        assert helpers.per_gpu(before, name) == {str(i): expected for i in range(3)}, name
    after = node.cycle(advance=10)
    assert helpers.per_gpu(after, "gpu_pcie_link_width_lanes") == {"0": 8, "1": 16, "2": 16}
    assert helpers.per_gpu(after, "gpu_pcie_link_generation") == {"0": 3, "1": 5, "2": 5}
    # The maximum is what the slot supports; a downgrade does not move it.
    assert helpers.per_gpu(after, "gpu_pcie_link_max_width_lanes") == {"0": 16, "1": 16, "2": 16}
    assert helpers.per_gpu(after, "gpu_pcie_link_max_generation") == {"0": 5, "1": 5, "2": 5}
    assert helpers.per_gpu(after, "gpu_pcie_replays_total") == {"0": 0, "1": 5, "2": 0}


def test_fabric_state(make_node, helpers):
    faults = [
        {"kind": "fabric", "gpu": 1, "at": 10, "state": "in_progress"},
        {"kind": "fabric", "gpu": 2, "at": 10, "state": "not_started"},
    ]
    node = make_node({"gpus": 3, "faults": faults}, collectors=["fabric"])
    before = node.cycle()
    assert helpers.per_gpu(before, "gpu_fabric_state") == {"0": 3, "1": 3, "2": 3}
    assert helpers.per_gpu(before, "gpu_fabric_status") == {"0": 0, "1": 0, "2": 0}
    after = node.cycle(advance=10)
    assert helpers.per_gpu(after, "gpu_fabric_state") == {"0": 3, "1": 2, "2": 1}


def test_l4_has_no_nvlink_or_fabric_and_says_so(make_node, helpers):
    node = make_node({"gpus": 2, "model": "L4"})
    text = node.cycle()
    names = helpers.sample_names(text)
    assert not {n for n in names if n.startswith(("gpu_nvlink_", "gpu_fabric_"))}
    # Absent because unsupported, not because the collectors failed.
    for collector in ("nvlink", "fabric", "thermal"):
        assert helpers.value(text, "gpu_exporter_collector_success", collector=collector) == 1
    for i in range(2):
        unsupported = {s.labels["call"]: s.value for s in helpers.select(text, "gpu_nvml_unsupported", gpu=str(i))}
        assert unsupported.get("nvmlDeviceGetGpuFabricInfoV") == 1
        assert unsupported.get("NVML_FI_DEV_NVLINK_LINK_COUNT") == 1
        # No HBM on an L4: no memory temperature, and the field is reported unsupported.
        assert unsupported.get("NVML_FI_DEV_MEMORY_TEMP") == 1
    assert "gpu_memory_temperature_celsius" not in names
    # Everything the L4 does have is still there.
    assert helpers.per_gpu(text, "gpu_memory_total_bytes") == {"0": MODELS["L4"].memory_bytes,
                                                                "1": MODELS["L4"].memory_bytes}
    (info,) = helpers.select(text, "gpu_info", gpu="0")
    assert info.labels["model"] == "NVIDIA L4"
    assert info.labels["mig_mode"] == "unsupported"


def test_h100_reports_nothing_unsupported_for_nvlink_and_fabric(make_node, helpers):
    node = make_node({"gpus": 2})
    text = node.cycle()
    calls = {s.labels["call"] for s in helpers.select(text, "gpu_nvml_unsupported")}
    assert not {c for c in calls if "NvLink" in c or "NVLINK" in c or "Fabric" in c}


class _RealBindingFabric:
    """The simulator, except that nvmlDeviceGetGpuFabricInfoV behaves as nvidia-ml-py's real binding does.

    The real function hands its second argument straight to the C function, which takes a pointer
    (`nvmlGpuFabricInfoV_t *`): callers must pass `ctypes.byref(info)`. A bare ctypes Structure would
    be passed by value, which the C side would read as a garbage pointer.
    """

    def __init__(self, sim: SimulatedNvml) -> None:
        self._sim = sim

    def __getattr__(self, name: str):
        return getattr(self._sim, name)

    def nvmlDeviceGetGpuFabricInfoV(self, handle, info_ptr):
        if type(info_ptr).__name__ != "CArgObject" and not isinstance(info_ptr, ctypes._Pointer):
            raise TypeError("nvmlDeviceGetGpuFabricInfoV needs ctypes.byref(info), got a struct passed by value")
        info = info_ptr._obj if type(info_ptr).__name__ == "CArgObject" else info_ptr.contents
        if info.version != pynvml.nvmlGpuFabricInfo_v3:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        return self._sim.nvmlDeviceGetGpuFabricInfoV(handle, info_ptr)


def test_fabric_calls_nvml_with_a_pointer(make_node, helpers):
    node = make_node({"gpus": 2}, collectors=["fabric"])
    node.poller.nvml = _RealBindingFabric(node.sim)
    text = node.cycle()
    assert helpers.value(text, "gpu_exporter_collector_success", collector="fabric") == 1
    assert helpers.per_gpu(text, "gpu_fabric_state") == {"0": 3, "1": 3}


def test_the_pci_map_and_status_use_gpu_infos_spelling(make_node, helpers):
    """One PCI id everywhere: the map the XID collector joins on, the status page, and gpu_info agree."""
    node = make_node({"gpus": 2})
    text = node.cycle()
    info = {s.labels["pci_bus_id"]: s.labels["gpu"] for s in helpers.select(text, "gpu_info")}
    assert info and all(len(k.split(":")[0]) == 8 and k.endswith(".0") for k in info)
    assert {pci: str(key.index) for pci, key in node.poller.pci_map().items()} == info
    assert {g["pci_bus_id"] for g in node.poller.snapshot.gpus} == set(info)


def test_a_pci_id_spelt_otherwise_by_the_backend_is_nvmls_everywhere(make_node, helpers, monkeypatch):
    """A backend that prints the legacy, lower-case form (a DCGM build, an old driver) still joins."""
    node = make_node({"gpus": 1})
    real = node.sim.nvmlDeviceGetPciInfo_v3

    def legacy(handle):
        info = real(handle)
        info.busId = info.busIdLegacy.lower()  # "0000:1b:00.0"
        return info

    monkeypatch.setattr(node.sim, "nvmlDeviceGetPciInfo_v3", legacy)
    text = node.cycle()
    (pci,) = {s.labels["pci_bus_id"] for s in helpers.select(text, "gpu_info")}
    assert len(pci.split(":")[0]) == 8 and pci == pci.upper()
    assert set(node.poller.pci_map()) == {pci}
