"""The DCGM backend emits what the NVML backend emits: same families, labels, units, unsupported calls."""

from __future__ import annotations

import re

import pynvml
import pytest

from exporter.backends.dcgm import DcgmGpuHandle, DcgmUnavailable, fields
from exporter.device import UNSUPPORTED, Device, to_str

FAULTS = {
    "seed": 3,
    "faults": [
        {"kind": "ecc_uncorrectable", "gpu": 1, "count": 2},
        {"kind": "row_remap_pending", "gpu": 1},
        {"kind": "row_remap_failure", "gpu": 2},
        {"kind": "nvlink_errors", "gpu": 3, "link": 4, "counter": "crc_flit", "count": 17},
        {"kind": "nvlink_errors", "gpu": 3, "link": 17, "counter": "recovery", "count": 2},
        {"kind": "nvlink_down", "gpu": 3, "link": 5},
        {"kind": "pcie_replays", "gpu": 4, "count": 9},
        {"kind": "pcie_downgrade", "gpu": 4, "width": 8},
        {"kind": "throttle", "gpu": 5, "reasons": ["hw_thermal_slowdown", "sw_power_cap"]},
        {"kind": "retired_pages", "gpu": 6, "cause": "double_bit", "count": 2},
        {"kind": "not_supported", "gpu": 6, "call": "nvmlDeviceGetPowerUsage"},
        {"kind": "mig", "gpu": 7},
        {"kind": "gpu_lost", "gpu": 0},
    ],
}
# Framebuffer sizes come from DCGM in whole MiB; every other value must match NVML exactly.
LOSSY = re.compile(r"^gpu_memory_used_bytes\{")


def _lines(text: str) -> set[str]:
    """Every line but the lossy ones and those about the DCGM-only collectors and families."""
    return {line for line in text.splitlines()
            if not LOSSY.match(line) and "gpu_dcgm_" not in line and 'collector="dcgm' not in line}


@pytest.mark.parametrize(
    "sim", [{"seed": 0}, FAULTS, {"model": "L4", "gpus": 2}, {"model": "A100-SXM4-80GB", "gpus": 2}],
    ids=["h100-healthy", "h100-faults", "l4", "a100"],
)
def test_same_exposition_as_the_nvml_backend(make_node, sim, h):
    nvml_text = make_node(sim, backend="sim").cycle()
    dcgm_node = make_node(sim, backend="dcgm")
    dcgm_text = dcgm_node.cycle()
    dcgm_only = {f for f in h.families(dcgm_text) if f.startswith("gpu_dcgm_")}
    assert h.families(dcgm_text) - dcgm_only == h.families(nvml_text)
    assert _lines(dcgm_text) == _lines(nvml_text)
    # Memory: the same up to DCGM's MiB granularity.
    for s in h.samples(nvml_text, "gpu_memory_used_bytes"):
        assert abs(h.value(dcgm_text, "gpu_memory_used_bytes", gpu=s.labels["gpu"]) - s.value) < 1024 * 1024


def test_health_and_connection_families_are_added(make_node, h):
    node = make_node({"gpus": 2})
    node.cycle()
    text = node.cycle()
    assert {f for f in h.families(text) if f.startswith("gpu_dcgm_")} == {
        "gpu_dcgm_connected", "gpu_dcgm_reconnects", "gpu_dcgm_connection_failures", "gpu_dcgm_call_timeouts",
        "gpu_dcgm_last_update_timestamp_seconds", "gpu_dcgm_health_armed", "gpu_dcgm_health_checks",
        "gpu_dcgm_health_status",  # incidents and NVSwitch families appear with incidents and NVSwitches
    }
    assert h.value(text, "gpu_dcgm_connected") == 1
    assert h.value(text, "gpu_dcgm_last_update_timestamp_seconds", gpu="1") == node.wall()


def test_units_are_converted_to_nvml_units(make_node, engine, h):
    node = make_node({"gpus": 1})
    node.cycle()
    handle = node.nvml.nvmlDeviceGetHandleByIndex(0)
    engine.set_value(0, fields.POWER_USAGE, 345.678)  # W, as DCGM reports it
    engine.set_value(0, fields.TOTAL_ENERGY, 123_456_789)  # mJ in both
    engine.set_value(0, fields.FB_TOTAL, 81559)  # MiB
    engine.set_value(0, fields.FB_USED, 1000)
    engine.set_value(0, fields.FB_RESERVED, 541)
    engine.set_value(0, fields.FB_FREE, 80018)
    text = node.cycle(advance=5)
    assert node.nvml.nvmlDeviceGetPowerUsage(handle) == 345678  # mW
    assert h.value(text, "gpu_power_usage_watts") == pytest.approx(345.678)
    assert h.value(text, "gpu_energy_consumption_joules_total") == pytest.approx(123456.789)
    assert h.value(text, "gpu_memory_total_bytes") == 81559 * 2**20
    assert h.value(text, "gpu_memory_used_bytes") == 1000 * 2**20
    assert h.value(text, "gpu_memory_reserved_bytes") == 541 * 2**20
    mem = node.nvml.nvmlDeviceGetMemoryInfo(handle, pynvml.nvmlMemory_v2)
    assert (mem.free, mem.version) == (80018 * 2**20, pynvml.nvmlMemory_v2)


@pytest.mark.parametrize("kind", ["blank", "not_found", "not_supported", "not_permissioned"])
def test_blank_values_are_never_exported(make_node, engine, kind, h):
    node = make_node({"gpus": 2})
    blanked = [fields.GPU_TEMP, fields.MEMORY_TEMP, fields.POWER_USAGE, fields.TOTAL_ENERGY, fields.PCIE_REPLAY,
               fields.ECC_SBE_VOL_TOTAL, fields.SM_CLOCK, fields.FABRIC_HEALTH_SUMMARY, fields.NVLINK_ERROR_FIELDS[
                   pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT][3]]
    for fid in blanked:
        engine.set_blank(1, fid, kind)
    text = node.cycle()
    for fam in ("gpu_temperature_celsius", "gpu_memory_temperature_celsius", "gpu_power_usage_watts",
                "gpu_energy_consumption_joules_total", "gpu_pcie_replays_total"):
        assert h.samples(text, fam, gpu="1") == [], fam
        assert len(h.samples(text, fam, gpu="0")) == 1, fam
    assert h.samples(text, "gpu_clock_hertz", gpu="1", clock="sm") == []
    assert h.samples(text, "gpu_ecc_errors_total", gpu="1", error_type="corrected", counter="volatile") == []
    if kind != "not_permissioned":  # an error, not an absence: the NVLink collector fails for that GPU
        # Link 3's flit CRC counter never answered: the GPU's CRC total is the rest, not the blank.
        assert h.value(text, "gpu_nvlink_errors_total", gpu="1", counter="crc") == h.value(
            text, "gpu_nvlink_errors_total", gpu="0", counter="crc")
    # No sentinel anywhere: the int64 blanks are ~9.2e18, the double blanks 2**47 (~1.4e14) and up.
    for fam in text_string_families(text):
        for s in fam:
            assert s.value < 1e14, s


def text_string_families(text: str):
    from prometheus_client.parser import text_string_to_metric_families

    return [fam.samples for fam in text_string_to_metric_families(text)]


def test_not_supported_blank_is_reported_unsupported(make_node, engine, h):
    node = make_node({"gpus": 1})
    engine.set_blank(0, fields.GPU_TEMP, "not_supported")
    engine.set_blank(0, fields.MEMORY_TEMP, "not_supported")
    text = node.cycle()
    assert h.value(text, "gpu_nvml_unsupported", call="nvmlDeviceGetTemperature") == 1
    assert h.value(text, "gpu_nvml_unsupported", call="NVML_FI_DEV_MEMORY_TEMP") == 1
    assert h.value(text, "gpu_exporter_collector_success", collector="thermal") == 1


def test_blank_means_no_data_not_unsupported(make_node, engine, h):
    node = make_node({"gpus": 1})
    node.cycle()
    engine.set_blank(0, fields.GPU_TEMP, "blank")
    node.cycle(advance=5)
    handle = node.nvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLError) as exc:
        node.nvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
    assert exc.value.value == pynvml.NVML_ERROR_NO_DATA
    engine.clear_override(0, fields.GPU_TEMP)
    text = node.cycle(advance=5)
    assert len(h.samples(text, "gpu_temperature_celsius", gpu="0")) == 1
    assert h.samples(text, "gpu_nvml_unsupported", call="nvmlDeviceGetTemperature") == []


def test_a_blank_costs_only_its_own_series(make_node, engine, h):
    node = make_node({"gpus": 1})
    engine.set_blank(0, fields.GPU_TEMP, "blank")
    text = node.cycle()
    assert h.samples(text, "gpu_temperature_celsius") == []
    assert len(h.samples(text, "gpu_memory_temperature_celsius")) == 1
    assert h.value(text, "gpu_exporter_collector_success", collector="thermal") == 1


def test_unknown_pynvml_call_is_function_not_found(make_node):
    node = make_node({"gpus": 1})
    node.cycle()
    dev = Device(node.nvml, 0)
    dev.open()
    if hasattr(dev, "begin"):
        dev.begin("clocks")
    assert dev.optional("nvmlDeviceGetViolationStatus", 0) is UNSUPPORTED
    if hasattr(dev, "end"):
        dev.end()
    assert "nvmlDeviceGetViolationStatus" in dev.unsupported
    with pytest.raises(AttributeError):
        node.nvml.not_a_pynvml_name  # noqa: B018
    # DCGM has no NVML event API: feature checks must see it missing, not failing.
    assert not hasattr(node.nvml, "nvmlEventSetCreate")
    assert not hasattr(node.nvml, "nvmlDeviceRegisterEvents")


def test_identity_comes_from_dcgm_attributes(make_node, engine, h):
    node = make_node({"gpus": 2})
    text = node.cycle()
    sim = engine.sim
    for i in range(2):
        gpu = sim.nvmlDeviceGetHandleByIndex(i)
        (info,) = h.samples(text, "gpu_info", gpu=str(i))
        assert info.labels["uuid"] == sim.nvmlDeviceGetUUID(gpu)
        assert info.labels["serial"] == sim.nvmlDeviceGetSerial(gpu)
        assert info.labels["pci_bus_id"] == to_str(sim.nvmlDeviceGetPciInfo_v3(gpu).busId)
        assert info.labels["cuda_version"] == "12.4"
    pci = node.nvml.nvmlDeviceGetPciInfo_v3(DcgmGpuHandle(1, 1))
    assert (pci.domain, pci.bus, pci.device) == (0, 0x2A, 0)


def test_nvlink_links_and_counters_from_dcgm(make_node, h):
    # DCGM has no scoped NVLink fields: the collector falls back to the per-link calls, which DCGM answers.
    node = make_node(FAULTS, collectors=["nvlink"], settings={"nvlink_per_link": True})
    text = node.cycle()
    assert len(h.samples(text, "gpu_nvlink_link_up", gpu="3")) == 18
    assert h.value(text, "gpu_nvlink_link_up", gpu="3", link="5") == 0
    assert h.value(text, "gpu_nvlink_links_down", gpu="3") == 1
    assert h.value(text, "gpu_nvlink_link_errors_total", gpu="3", link="4", counter="crc") == 17
    assert h.value(text, "gpu_nvlink_link_errors_total", gpu="3", link="17", counter="recovery") == 2
    handle = node.nvml.nvmlDeviceGetHandleByIndex(3)
    with pytest.raises(pynvml.NVMLError) as exc:
        node.nvml.nvmlDeviceGetNvLinkErrorCounter(handle, 18, pynvml.NVML_NVLINK_ERROR_DL_REPLAY)
    assert exc.value.value == pynvml.NVML_ERROR_NOT_SUPPORTED
    with pytest.raises(pynvml.NVMLError) as exc:
        node.nvml.nvmlDeviceGetNvLinkErrorCounter(handle, 0, pynvml.NVML_NVLINK_ERROR_DL_ECC_DATA)
    assert exc.value.value == pynvml.NVML_ERROR_NOT_SUPPORTED


def test_values_are_read_once_per_cycle(make_node, engine):
    node = make_node({"gpus": 2})
    node.cycle()
    before = engine.calls["dcgmEntityGetLatestValues"]
    node.cycle(advance=5)
    # One field-group read per GPU per cycle, however many pynvml calls the collectors made.
    assert engine.calls["dcgmEntityGetLatestValues"] - before == 2


def test_field_group_fits_dcgm_limits():
    assert len(fields.WATCHED) == len(set(fields.WATCHED)) <= 128
    assert len(fields.NVLINK_FIELD_NAMES) == 4 * fields.NVLINK_LINKS


def test_field_ids_match_dcgm_names(engine):
    import dcgm_fields

    # The fake's dcgm_fields carries DCGM 4.6.0's names and ids; ours are literals and must agree.
    for fid, name in fields.NAMES.items():
        assert getattr(dcgm_fields, name) == fid, name


def test_host_engine_down_at_start_is_not_a_lost_gpu(make_node, engine, h):
    node = make_node({"gpus": 2}, address="localhost:5555")
    engine.disconnect()  # the fake refuses remote connections while "down"
    with pytest.raises(DcgmUnavailable) as exc:
        node.nvml.nvmlInit()
    assert exc.value.value == pynvml.NVML_ERROR_UNKNOWN
    assert "localhost:5555" in str(exc.value)
    text = node.cycle(advance=2)
    assert h.value(text, "gpu_nvml_up") == 0
    assert h.value(text, "gpu_dcgm_connected") == 0
    assert h.samples(text, "gpu_lost") == []
    engine.restore()
    node.cycle(advance=5)  # nvmlInit succeeds; GPUs appear
    text = node.cycle(advance=5)
    assert h.value(text, "gpu_nvml_up") == 1
    assert len(h.samples(text, "gpu_temperature_celsius")) == 2
    assert engine.sessions and all(s.address == "tcp://localhost:5555" for s in engine.sessions.values())
