"""NVLink: every link in one batched field read, per-GPU totals by default, per-link series behind a flag."""

from __future__ import annotations

import sys

import pynvml
import pytest

from exporter.collectors.nvlink import NvlinkCollector
from exporter.config import parse
from exporter.device import CallTrace, Device
from exporter.registry import CollectorOptions, create, discover

FAULTS = [
    {"kind": "nvlink_errors", "gpu": 1, "at": 10, "link": 5, "counter": "replay", "count": 7},
    {"kind": "nvlink_errors", "gpu": 1, "at": 10, "link": 2, "count": 4},  # crc_flit by default
    {"kind": "nvlink_errors", "gpu": 1, "at": 10, "link": 16, "counter": "crc_data", "count": 3},
    {"kind": "nvlink_down", "gpu": 3, "at": 10, "link": 11},
    {"kind": "nvlink_down", "gpu": 3, "at": 10, "link": 17},
]


def per_link(node):
    node.collectors["nvlink"].per_link = True
    return node


def test_totals_by_default_for_every_link_of_an_h100(make_node, helpers):
    node = make_node({"gpus": 4, "faults": FAULTS}, collectors=["nvlink"])
    before = node.cycle()
    assert helpers.per_gpu(before, "gpu_nvlink_links_up") == {str(i): 18 for i in range(4)}
    assert helpers.per_gpu(before, "gpu_nvlink_links_down") == {str(i): 0 for i in range(4)}
    assert not {n for n in helpers.sample_names(before) if n.startswith("gpu_nvlink_link_")}

    after = node.cycle(advance=10)
    assert helpers.per_gpu(after, "gpu_nvlink_links_up") == {"0": 18, "1": 18, "2": 18, "3": 16}
    assert helpers.per_gpu(after, "gpu_nvlink_links_down") == {"0": 0, "1": 0, "2": 0, "3": 2}
    totals = {(s.labels["gpu"], s.labels["counter"]): s.value for s in helpers.select(after, "gpu_nvlink_errors_total")}
    assert {k: v for k, v in totals.items() if v} == {("1", "replay"): 7, ("1", "crc"): 4 + 3}
    assert {c for _, c in totals} == {"replay", "recovery", "crc"}


def test_per_link_series_reach_links_past_11(make_node, helpers):
    node = per_link(make_node({"gpus": 4, "faults": FAULTS}, collectors=["nvlink"]))
    before = node.cycle()
    for i in range(4):
        links = {s.labels["link"] for s in helpers.select(before, "gpu_nvlink_link_up", gpu=str(i))}
        assert links == {str(n) for n in range(18)}
        for link in links:
            counters = {s.labels["counter"] for s in helpers.select(before, "gpu_nvlink_link_errors_total",
                                                                      gpu=str(i), link=link)}
            assert counters == {"replay", "recovery", "crc"}
    after = node.cycle(advance=10)
    nonzero = {
        (s.labels["gpu"], s.labels["link"], s.labels["counter"]): s.value
        for s in helpers.select(after, "gpu_nvlink_link_errors_total") if s.value
    }
    assert nonzero == {("1", "5", "replay"): 7, ("1", "2", "crc"): 4, ("1", "16", "crc"): 3}
    down = {(s.labels["gpu"], s.labels["link"]) for s in helpers.select(after, "gpu_nvlink_link_up") if s.value == 0}
    assert down == {("3", "11"), ("3", "17")}
    # The totals are there too, and agree with the links.
    assert helpers.per_gpu(after, "gpu_nvlink_links_down") == {"0": 0, "1": 0, "2": 0, "3": 2}


def test_two_nvml_calls_per_gpu_whatever_the_link_count(make_node):
    node = make_node({"gpus": 2}, collectors=["nvlink"])
    trace = CallTrace()
    dev = Device(node.sim, 0, trace=trace)
    node.sim.nvmlInit()
    dev.open()
    trace.latencies.clear()
    links = node.collectors["nvlink"].read(dev)
    assert len(links.links) == 18
    assert {name: len(v) for name, v in trace.latencies.items()} == {"nvmlDeviceGetFieldValues": 2}


def _refusing_link(sim, link: int, code: int):
    """Wrap the simulator's field read so every value of one link answers `code`."""
    real = sim.nvmlDeviceGetFieldValues

    def read(handle, ids):
        values = real(handle, ids)
        for v in values:
            if v.fieldId != pynvml.NVML_FI_DEV_NVLINK_LINK_COUNT and v.scopeId == link:
                v.nvmlReturn = code
        return values

    sim.nvmlDeviceGetFieldValues = read


def test_a_link_answering_not_supported_does_not_stop_enumeration(make_node, helpers):
    node = per_link(make_node({"gpus": 1}, collectors=["nvlink"]))
    _refusing_link(node.sim, 3, pynvml.NVML_ERROR_NOT_SUPPORTED)
    text = node.cycle()
    assert helpers.value(text, "gpu_exporter_collector_success", collector="nvlink") == 1
    links = {s.labels["link"] for s in helpers.select(text, "gpu_nvlink_link_up")}
    assert links == {str(n) for n in range(18)} - {"3"}
    assert helpers.value(text, "gpu_nvlink_links_up", gpu="0") == 17
    assert helpers.value(text, "gpu_nvlink_links_down", gpu="0") == 0
    unsupported = {s.labels["call"] for s in helpers.select(text, "gpu_nvml_unsupported")}
    assert unsupported == {
        "NVML_FI_DEV_NVLINK_GET_STATE[3]", "NVML_FI_DEV_NVLINK_ERROR_DL_REPLAY[3]",
        "NVML_FI_DEV_NVLINK_ERROR_DL_RECOVERY[3]", "NVML_FI_DEV_NVLINK_ERROR_DL_CRC[3]",
    }


def test_the_simulator_refuses_a_field_id_it_does_not_know(make_node):
    node = make_node({"gpus": 1}, collectors=[])
    node.sim.nvmlInit()
    handle = node.handle(0)
    invented, past_links = node.sim.nvmlDeviceGetFieldValues(
        handle, [pynvml.NVML_FI_MAX + 7, (pynvml.NVML_FI_DEV_NVLINK_GET_STATE, 18)]
    )
    assert invented.nvmlReturn == pynvml.NVML_ERROR_INVALID_ARGUMENT
    assert past_links.nvmlReturn == pynvml.NVML_ERROR_INVALID_ARGUMENT
    dev = Device(node.sim, 0)
    dev.open()
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        dev.fields([pynvml.NVML_FI_MAX + 7])


def test_a_backend_without_scoped_fields_is_read_link_by_link(make_node, helpers):
    """DCGM has no scoped NVLink fields: every one answers NotSupported, so the per-link calls are used."""
    faults = [dict(f, gpu=0) for f in FAULTS]
    node = per_link(make_node({"gpus": 1, "faults": faults}, collectors=["nvlink"]))
    for link in range(18):
        _refusing_link(node.sim, link, pynvml.NVML_ERROR_NOT_SUPPORTED)
    text = node.cycle(advance=10)
    assert helpers.value(text, "gpu_exporter_collector_success", collector="nvlink") == 1
    assert helpers.value(text, "gpu_nvlink_links_up", gpu="0") == 16
    assert helpers.value(text, "gpu_nvlink_links_down", gpu="0") == 2
    totals = {s.labels["counter"]: s.value for s in helpers.select(text, "gpu_nvlink_errors_total")}
    assert totals == {"replay": 7, "recovery": 0, "crc": 7}
    assert helpers.value(text, "gpu_nvlink_link_errors_total", link="16", counter="crc") == 3
    # The refused scoped ids are not reported: the fallback read every value.
    assert not helpers.select(text, "gpu_nvml_unsupported")


def test_per_link_flag_reaches_the_collector():
    available = discover()
    assert parse(["--collector.nvlink.per-link"], available).settings["nvlink_per_link"] is True
    assert parse([], available).settings["nvlink_per_link"] is False
    on = create(available["nvlink"], CollectorOptions(settings={"nvlink_per_link": True}))
    off = create(available["nvlink"], CollectorOptions())
    assert isinstance(on, NvlinkCollector) and on.per_link and not off.per_link


def test_a_link_that_stops_answering_leaves_a_gap_not_a_dip(make_node, helpers):
    """The per-GPU totals are counters: a link's value missing for a cycle must not make them smaller."""
    faults = [{"kind": "nvlink_errors", "gpu": 0, "at": 0, "link": 9, "counter": "replay", "count": 5}]
    node = make_node({"gpus": 1, "faults": faults}, collectors=["nvlink"])
    assert helpers.value(node.cycle(), "gpu_nvlink_errors_total", counter="replay") == 5
    real = node.sim.nvmlDeviceGetFieldValues
    _refusing_link(node.sim, 9, pynvml.NVML_ERROR_NOT_SUPPORTED)
    gap = node.cycle(advance=30)
    assert helpers.select(gap, "gpu_nvlink_errors_total", counter="replay") == []
    assert helpers.value(gap, "gpu_exporter_collector_success", collector="nvlink") == 1
    node.sim.nvmlDeviceGetFieldValues = real
    assert helpers.value(node.cycle(advance=30), "gpu_nvlink_errors_total", counter="replay") == 5


def test_the_slow_tier_of_an_h100_costs_at_most_20_nvml_calls_per_gpu():
    """benchmarks/nvml_calls.py, as benchmarks/exporter_scrape.py prints it: the issue's target."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "nvml_calls.py"
    spec = importlib.util.spec_from_file_location("nvml_calls", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["nvml_calls"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["nvml_calls"]
    calls = module.measure(2, "H100-SXM-80GB")
    assert calls.slow_total <= module.TARGET_SLOW_CALLS == 20
    assert not {name for name in calls.both if "NvLink" in name}
