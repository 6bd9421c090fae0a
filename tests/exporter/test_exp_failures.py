"""What the exporter reports when GPUs, NVML calls and collectors go wrong."""

from __future__ import annotations

import threading
import time

import pynvml

# Families of the per-GPU collectors (not the exporter's own core series).
GPU_FAMILY_PREFIXES = ("gpu_temperature", "gpu_memory_", "gpu_power_", "gpu_energy_", "gpu_utilization",
                       "gpu_clock_", "gpu_performance_", "gpu_ecc_", "gpu_retired_", "gpu_remapped_", "gpu_row_",
                       "gpu_nvlink_", "gpu_pcie_", "gpu_fabric_")


def collector_samples(helpers, text, **labels):
    return [s for s in helpers.parse_samples(text)
            if s.name.startswith(GPU_FAMILY_PREFIXES) and all(s.labels.get(k) == v for k, v in labels.items())]


def unsupported_calls(helpers, text, gpu):
    return {s.labels["call"]: s.value for s in helpers.select(text, "gpu_nvml_unsupported", gpu=gpu)}


# --- NotSupported ------------------------------------------------------------------------------


def test_not_supported_power_usage(make_node, helpers):
    faults = [{"kind": "not_supported", "gpu": 4, "call": "nvmlDeviceGetPowerUsage"}]
    node = make_node({"gpus": 8, "faults": faults})
    text = node.cycle()
    usage = helpers.per_gpu(text, "gpu_power_usage_watts")
    assert set(usage) == {str(i) for i in range(8)} - {"4"}
    assert all(v > 0 for v in usage.values())
    # Only the unsupported signal is missing: the rest of the power collector still reports for GPU 4.
    assert helpers.value(text, "gpu_power_limit_watts", gpu="4") == 700
    assert helpers.value(text, "gpu_energy_consumption_joules_total", gpu="4") > 0
    assert unsupported_calls(helpers, text, "4") == {"nvmlDeviceGetPowerUsage": 1}
    for i in set(range(8)) - {4}:
        assert "nvmlDeviceGetPowerUsage" not in unsupported_calls(helpers, text, str(i))
    # NotSupported is not a failure.
    assert helpers.value(text, "gpu_exporter_collector_success", collector="power") == 1
    assert not helpers.select(text, "gpu_nvml_errors_total")
    assert helpers.value(text, "gpu_collection_stale", gpu="4") == 0


def test_not_supported_stays_absent_not_zero_over_cycles(make_node, helpers):
    faults = [{"kind": "not_supported", "gpu": 0, "call": "nvmlDeviceGetTemperature"}]
    node = make_node({"gpus": 2, "faults": faults}, collectors=["thermal"])
    for _ in range(3):
        text = node.cycle(advance=5)
        assert helpers.per_gpu(text, "gpu_temperature_celsius").keys() == {"1"}
        assert unsupported_calls(helpers, text, "0") == {"nvmlDeviceGetTemperature": 1}


def test_unsupported_series_clears_when_the_call_works_again(make_node, helpers):
    faults = [{"kind": "not_supported", "gpu": 0, "call": "nvmlDeviceGetPowerUsage", "at": 0, "until": 10}]
    node = make_node({"gpus": 1, "faults": faults}, collectors=["power"])
    during = node.cycle()
    assert unsupported_calls(helpers, during, "0") == {"nvmlDeviceGetPowerUsage": 1}
    after = node.cycle(advance=10)
    assert helpers.value(after, "gpu_power_usage_watts", gpu="0") > 0
    assert unsupported_calls(helpers, after, "0") == {}


def test_mig_mode_makes_row_remapping_unsupported_not_zero(make_node, helpers):
    faults = [{"kind": "mig", "gpu": 1, "enabled": True}]
    node = make_node({"gpus": 3, "faults": faults})
    text = node.cycle()
    (info,) = helpers.select(text, "gpu_info", gpu="1")
    assert info.labels["mig_mode"] == "enabled"
    for name in ("gpu_remapped_rows", "gpu_row_remap_pending", "gpu_row_remap_failure"):
        assert set(helpers.per_gpu(text, name, **({"cause": "uncorrectable"} if name == "gpu_remapped_rows" else {}))
                   ) == {"0", "2"}, name
        assert not helpers.select(text, name, gpu="1"), name
    assert unsupported_calls(helpers, text, "1") == {"nvmlDeviceGetRemappedRows": 1}
    assert unsupported_calls(helpers, text, "0") == {}
    assert helpers.value(text, "gpu_exporter_collector_success", collector="remapped_rows") == 1
    # The rest of GPU 1 is collected as usual.
    assert helpers.value(text, "gpu_ecc_enabled", gpu="1") == 1
    assert helpers.value(text, "gpu_collection_stale", gpu="1") == 0


# --- lost GPUs ---------------------------------------------------------------------------------


def test_gpu_lost(make_node, helpers):
    faults = [{"kind": "gpu_lost", "gpu": 5, "at": 10}]
    node = make_node({"gpus": 8, "faults": faults})
    before = node.cycle()
    lost_uuid = node.uuid(5)
    healthy_count = len(collector_samples(helpers, before, gpu="0"))
    assert len(collector_samples(helpers, before, gpu="5")) == healthy_count > 40

    after = node.cycle(advance=10)
    assert helpers.per_gpu(after, "gpu_lost") == {str(i): (1 if i == 5 else 0) for i in range(8)}
    # A lost GPU's last readings would look like a live GPU: they are gone; who it was stays.
    assert collector_samples(helpers, after, gpu="5") == []
    (info,) = helpers.select(after, "gpu_info", gpu="5")
    assert info.labels["uuid"] == lost_uuid
    for i in set(range(8)) - {5}:
        assert len(collector_samples(helpers, after, gpu=str(i))) == healthy_count, i
        assert helpers.value(after, "gpu_collection_stale", gpu=str(i)) == 0
    # Still enumerated: visible does not drop.
    assert helpers.value(after, "gpu_devices_visible") == 8
    assert helpers.value(after, "gpu_nvml_up") == 1
    # The lost GPU is not collected any more, the others are.
    stamps_before = helpers.per_gpu(before, "gpu_collection_last_success_timestamp_seconds")
    stamps_after = helpers.per_gpu(after, "gpu_collection_last_success_timestamp_seconds")
    assert stamps_after["5"] == stamps_before["5"]
    assert all(stamps_after[g] == stamps_before[g] + 10 for g in stamps_after if g != "5")

    # It stays lost, without crashing, cycle after cycle; and goes stale once its data is old.
    for _ in range(3):
        later = node.cycle(advance=5)
    assert helpers.value(later, "gpu_lost", gpu="5") == 1
    assert collector_samples(helpers, later, gpu="5") == []
    assert helpers.value(later, "gpu_collection_stale", gpu="5") == 1
    assert helpers.value(later, "gpu_collection_stale", gpu="4") == 0


def test_gpu_lost_then_back(make_node, helpers):
    faults = [{"kind": "gpu_lost", "gpu": 2, "at": 10, "until": 20}]
    node = make_node({"gpus": 3, "faults": faults})
    healthy = len(collector_samples(helpers, node.cycle(), gpu="2"))
    assert helpers.value(node.cycle(advance=10), "gpu_lost", gpu="2") == 1
    back = node.cycle(advance=10)
    assert helpers.value(back, "gpu_lost", gpu="2") == 0
    assert len(collector_samples(helpers, back, gpu="2")) == healthy


def test_gpu_fallen_off_the_bus_lowers_visible_not_expected(make_node, helpers):
    faults = [{"kind": "gpu_lost", "gpu": 6, "at": 10, "remove": True}]
    node = make_node({"gpus": 8, "faults": faults})
    before = node.cycle()
    removed_uuid = node.uuid(6)
    assert helpers.value(before, "gpu_devices_visible") == 8
    assert helpers.value(before, "gpu_devices_expected") == 8

    after = node.cycle(advance=10)
    assert helpers.value(after, "gpu_devices_visible") == 7
    assert helpers.value(after, "gpu_devices_expected") == 8
    assert helpers.value(after, "gpu_nvml_up") == 1
    # The seven GPUs still there are all reported, each under its own uuid, with full data.
    infos = helpers.select(after, "gpu_info")
    assert len(infos) == 7
    assert removed_uuid not in {s.labels["uuid"] for s in helpers.parse_samples(after) if "uuid" in s.labels}
    expected_uuids = {s.labels["uuid"] for s in helpers.select(before, "gpu_info")} - {removed_uuid}
    assert {s.labels["uuid"] for s in infos} == expected_uuids
    assert helpers.per_gpu(after, "gpu_collection_stale") == {str(i): 0 for i in range(7)}

    # It stays that way.
    later = node.cycle(advance=5)
    assert helpers.value(later, "gpu_devices_visible") == 7
    assert helpers.value(later, "gpu_devices_expected") == 8


# --- a collector with a bug --------------------------------------------------------------------


def test_collector_exception_costs_only_that_collector(make_node, helpers, monkeypatch):
    node = make_node({"gpus": 4})
    healthy = node.cycle()
    all_names = helpers.sample_names(healthy)
    thermal_names = {"gpu_temperature_celsius", "gpu_memory_temperature_celsius", "gpu_temperature_threshold_celsius"}
    assert thermal_names <= all_names

    def boom(dev):
        raise RuntimeError("collector bug")

    monkeypatch.setattr(node.collectors["thermal"], "read", boom)
    broken = node.cycle(advance=5)
    success = {s.labels["collector"]: s.value for s in helpers.select(broken, "gpu_exporter_collector_success")}
    assert success.pop("thermal") == 0
    assert set(success.values()) == {1}
    names = helpers.sample_names(broken)
    assert not names & thermal_names
    assert names == all_names - thermal_names | {"gpu_nvml_errors_total"}
    assert helpers.per_gpu(broken, "gpu_nvml_errors_total", collector="thermal") == {str(i): 1 for i in range(4)}
    # A collector bug does not make the GPU stale or lost.
    assert set(helpers.per_gpu(broken, "gpu_collection_stale").values()) == {0}
    assert set(helpers.per_gpu(broken, "gpu_lost").values()) == {0}

    monkeypatch.undo()
    fixed = node.cycle(advance=5)
    assert helpers.value(fixed, "gpu_exporter_collector_success", collector="thermal") == 1
    assert thermal_names <= helpers.sample_names(fixed)
    # The error counter is a counter: it keeps its count.
    assert helpers.per_gpu(fixed, "gpu_nvml_errors_total", collector="thermal") == {str(i): 1 for i in range(4)}


def test_collector_exception_on_one_gpu(make_node, helpers, monkeypatch):
    node = make_node({"gpus": 4}, collectors=["power", "thermal"])
    thermal = node.collectors["thermal"]
    real_read = thermal.read

    def flaky(dev):
        if dev.index == 2:
            raise ValueError("bad reading")
        return real_read(dev)

    monkeypatch.setattr(thermal, "read", flaky)
    text = node.cycle()
    assert helpers.value(text, "gpu_exporter_collector_success", collector="thermal") == 0
    assert helpers.value(text, "gpu_exporter_collector_success", collector="power") == 1
    assert set(helpers.per_gpu(text, "gpu_temperature_celsius")) == {"0", "1", "3"}
    assert set(helpers.per_gpu(text, "gpu_power_usage_watts")) == {"0", "1", "2", "3"}
    assert helpers.per_gpu(text, "gpu_nvml_errors_total", collector="thermal") == {"2": 1}


def test_collector_render_exception(make_node, helpers, monkeypatch):
    node = make_node({"gpus": 2}, collectors=["power", "clocks"])

    def boom(ctx):
        raise KeyError("render bug")

    monkeypatch.setattr(node.collectors["clocks"], "families", boom)
    text = node.cycle()
    assert helpers.value(text, "gpu_exporter_collector_success", collector="clocks") == 0
    assert helpers.value(text, "gpu_exporter_collector_success", collector="power") == 1
    names = helpers.sample_names(text)
    assert not {n for n in names if n.startswith(("gpu_clock_", "gpu_performance_"))}
    assert {"gpu_power_usage_watts", "gpu_power_limit_watts"} <= names


# --- a hung NVML call --------------------------------------------------------------------------


def test_hung_call_is_isolated_counted_once_and_recovers(make_node, helpers):
    deadline = 0.2
    faults = [{"kind": "hang", "gpu": 3, "call": "nvmlDeviceGetPowerUsage", "at": 10}]
    node = make_node({"gpus": 8, "faults": faults}, deadline=deadline, slow_interval=3600)
    first = node.cycle()
    assert set(helpers.per_gpu(first, "gpu_collection_stale").values()) == {0}
    stamp0 = helpers.per_gpu(first, "gpu_collection_last_success_timestamp_seconds")
    threads = threading.active_count()

    # The hang starts: the cycle still ends at about the deadline.
    started = time.monotonic()
    second = node.cycle(advance=10)
    took = time.monotonic() - started
    assert took < deadline + 0.5, took
    stamp1 = helpers.per_gpu(second, "gpu_collection_last_success_timestamp_seconds")
    assert stamp1["3"] == stamp0["3"]
    assert all(stamp1[g] == stamp0[g] + 10 for g in stamp1 if g != "3")

    third_started = time.monotonic()
    third = node.cycle(advance=5)
    assert time.monotonic() - third_started < deadline + 0.5
    stale = helpers.per_gpu(third, "gpu_collection_stale")
    assert stale == {str(i): (1 if i == 3 else 0) for i in range(8)}
    assert helpers.value(third, "gpu_nvml_stuck_calls_total", gpu="3") == 1
    assert {g: v for g, v in helpers.per_gpu(third, "gpu_nvml_stuck_calls_total").items() if v} == {"3": 1}
    stamp2 = helpers.per_gpu(third, "gpu_collection_last_success_timestamp_seconds")
    assert stamp2["3"] == stamp0["3"]
    assert all(stamp2[g] == stamp1[g] + 5 for g in stamp2 if g != "3")
    # The other GPUs keep being collected: their power readings follow the simulator.
    for i in set(range(8)) - {3}:
        assert helpers.value(third, "gpu_power_usage_watts", gpu=str(i)) > 0
    # A hung call is not a collector failure, and the exporter keeps publishing.
    assert helpers.value(third, "gpu_exporter_collector_success", collector="power") == 1
    assert helpers.value(third, "gpu_exporter_last_collection_timestamp_seconds") == node.wall()

    # More cycles: no thread pile-up, and the same stuck call is not counted again.
    for _ in range(2):
        fourth = node.cycle(advance=5)
        assert threading.active_count() == threads
    assert helpers.value(fourth, "gpu_nvml_stuck_calls_total", gpu="3") == 1
    assert helpers.value(fourth, "gpu_collection_stale", gpu="3") == 1
    assert {t.name for t in threading.enumerate()} >= {f"nvml-gpu{i}" for i in range(8)}
    assert sum(1 for t in threading.enumerate() if t.name == "nvml-gpu3") == 1

    # The call returns: the GPU is collected again and no longer stale.
    node.sim.release_hangs()

    def recovered():
        text = node.cycle(advance=5)
        return text if helpers.value(text, "gpu_collection_stale", gpu="3") == 0 else None

    text = helpers.wait_for(recovered, 5, "GPU 3 to recover after release_hangs()")
    assert helpers.value(text, "gpu_collection_last_success_timestamp_seconds", gpu="3") > stamp0["3"]
    assert helpers.value(text, "gpu_nvml_stuck_calls_total", gpu="3") == 1
    assert threading.active_count() == threads


class _SlowBeforeHang:
    """The simulator, with GPU 3's first fast-tier call taking `delay` s once the hang is active.

    The hung call then starts part-way into the cycle, as a call behind slow ones does on a real node.
    """

    def __init__(self, sim, delay: float) -> None:
        self._sim = sim
        self._delay = delay

    def __getattr__(self, name):
        return getattr(self._sim, name)

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle):
        if handle.index == 3 and self._sim.elapsed() >= 10:
            time.sleep(self._delay)  # models a slow NVML call, not synchronisation
        return self._sim.nvmlDeviceGetCurrentClocksEventReasons(handle)


def test_gpu_that_misses_the_deadline_is_reported_in_that_cycle(make_node, helpers):
    deadline = 0.3
    faults = [{"kind": "hang", "gpu": 3, "call": "nvmlDeviceGetPowerUsage", "at": 10}]
    node = make_node({"gpus": 4, "faults": faults}, collectors=["clocks", "power"], deadline=deadline,
                     slow_interval=3600)
    node.poller.nvml = _SlowBeforeHang(node.sim, delay=deadline / 3)
    node.cycle()
    text = node.cycle(advance=10)
    assert node.poller._gpus[3].worker.busy  # the deadline passed with GPU 3 still inside NVML
    assert helpers.value(text, "gpu_collection_stale", gpu="3") == 1
    assert helpers.value(text, "gpu_nvml_stuck_calls_total", gpu="3") == 1


def test_hang_on_every_gpu_still_publishes(make_node, helpers):
    deadline = 0.2
    faults = [{"kind": "hang", "gpu": i, "call": "nvmlDeviceGetTemperature", "at": 10} for i in range(4)]
    node = make_node({"gpus": 4, "faults": faults}, deadline=deadline, slow_interval=3600)
    node.cycle()
    node.cycle(advance=10)
    started = time.monotonic()
    text = node.cycle(advance=5)
    assert time.monotonic() - started < deadline + 0.5
    assert helpers.per_gpu(text, "gpu_collection_stale") == {str(i): 1 for i in range(4)}
    assert helpers.per_gpu(text, "gpu_nvml_stuck_calls_total") == {str(i): 1 for i in range(4)}
    assert helpers.value(text, "gpu_nvml_up") == 1


def test_gpu_fallen_off_the_bus_stays_visible_as_missing_between_slow_cycles(make_node, helpers):
    faults = [{"kind": "gpu_lost", "gpu": 6, "at": 10, "remove": True}]
    node = make_node({"gpus": 8, "faults": faults}, slow_interval=3600)
    node.cycle()
    removed_uuid = node.uuid(6)
    lost = node.cycle(advance=10)
    assert helpers.value(lost, "gpu_lost", uuid=removed_uuid) == 1
    for _ in range(2):
        text = node.cycle(advance=5)
        gpus_by_uuid: dict[str, set[str]] = {}
        for s in helpers.select(text, "gpu_lost"):
            gpus_by_uuid.setdefault(s.labels["uuid"], set()).add(s.labels["gpu"])
        assert all(len(g) == 1 for g in gpus_by_uuid.values()), gpus_by_uuid
        still_lost = [s.value for s in helpers.select(text, "gpu_lost", uuid=removed_uuid)] == [1]
        missing = helpers.value(text, "gpu_devices_visible") < helpers.value(text, "gpu_devices_expected")
        assert still_lost or missing


# --- NVML itself unavailable -------------------------------------------------------------------


class _DriverNotLoadedYet:
    """The simulator, with nvmlInit failing as it does before the kernel driver is loaded."""

    def __init__(self, sim) -> None:
        self._sim = sim
        self.loaded = False
        self.init_calls = 0

    def __getattr__(self, name):
        return getattr(self._sim, name)

    def nvmlInitWithFlags(self, flags):
        self.init_calls += 1
        if not self.loaded:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
        return self._sim.nvmlInitWithFlags(flags)

    def nvmlInit(self):
        return self.nvmlInitWithFlags(0)

    def nvmlDeviceGetCount(self):
        if not self.loaded:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
        return self._sim.nvmlDeviceGetCount()


def test_nvml_unavailable_is_reported_and_retried(make_node, helpers):
    node = make_node({"gpus": 2}, slow_interval=3600)
    nvml = _DriverNotLoadedYet(node.sim)
    node.poller.nvml = nvml
    for _ in range(2):
        text = node.cycle(advance=5)
        assert helpers.value(text, "gpu_nvml_up") == 0
        assert helpers.value(text, "gpu_devices_visible") == 0
        assert not helpers.select(text, "gpu_lost")
        assert not helpers.select(text, "gpu_info")
        # The GPU collectors did not run: no success. Nothing seen this boot: the expected count is unknown.
        success = {s.labels["collector"]: s.value for s in helpers.select(text, "gpu_exporter_collector_success")}
        assert success and set(success.values()) == {0}, success
        assert not helpers.select(text, "gpu_devices_expected")
    # Retried every cycle while down, though the slow tier is not due.
    assert nvml.init_calls == 2

    nvml.loaded = True
    text = node.cycle(advance=5)
    assert helpers.value(text, "gpu_nvml_up") == 1
    assert helpers.value(text, "gpu_devices_visible") == 2
    assert set(helpers.per_gpu(text, "gpu_temperature_celsius")) == {"0", "1"}
    assert set(helpers.per_gpu(text, "gpu_collection_stale").values()) == {0}
    assert {s.value for s in helpers.select(text, "gpu_exporter_collector_success")} == {1}
    assert helpers.value(text, "gpu_devices_expected") == 2

    nvml.loaded = False  # the driver is unloaded under the exporter
    text = node.cycle(advance=5)
    assert helpers.value(text, "gpu_nvml_up") == 0
    assert helpers.value(text, "gpu_devices_expected") == 2  # seen this boot: still expected
    assert {s.value for s in helpers.select(text, "gpu_exporter_collector_success")} == {0}


def test_a_node_without_gpus_is_nvml_up_with_none_visible(make_node, helpers):
    """NVML initialises with NVML_INIT_FLAG_NO_GPUS: no GPU is 0 visible, not NVML down."""
    node = make_node({"gpus": 0})
    text = node.cycle()
    assert helpers.value(text, "gpu_nvml_up") == 1
    assert helpers.value(text, "gpu_devices_visible") == 0
    assert helpers.value(text, "gpu_devices_expected") == 0
