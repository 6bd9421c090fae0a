"""dcgm_health: armed only after the second check, incidents counted when they appear, pass again when cleared."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.backends.dcgm import fields
from exporter.collectors.dcgm_health import DcgmHealthCollector, validate_settings
from exporter.errors import ConfigError
from exporter.registry import CollectorOptions

GPU, SWITCH = 1, 3  # dcgm_fields.DCGM_FE_GPU, DCGM_FE_SWITCH
DBE = 4  # DCGM_FR_VOLATILE_DBE_DETECTED
PCI_REPLAY_RATE = 3  # DCGM_FR_PCI_REPLAY_RATE
NVSWITCH_FATAL = 15  # DCGM_FR_NVSWITCH_FATAL_ERROR

FAKE = Path(__file__).resolve().parents[1] / "fakes" / "dcgm_bindings"


def statuses(h, text: str, gpu: str) -> dict[str, float]:
    return {s.labels["system"]: s.value for s in h.samples(text, "gpu_dcgm_health_status", gpu=gpu)}


def test_first_check_only_arms(make_node, engine, h):
    node = make_node({"gpus": 2})
    # Present from the start: DCGM's first check reports nothing, so neither may we.
    engine.add_incident(GPU, 1, "mem", "fail", DBE)
    first = node.cycle()
    assert h.value(first, "gpu_dcgm_health_armed") == 0
    assert h.value(first, "gpu_dcgm_health_checks_total") == 1
    assert h.samples(first, "gpu_dcgm_health_status") == []  # nothing reads as healthy before armed
    assert h.samples(first, "gpu_dcgm_health_incidents_total") == []

    second = node.cycle(advance=30)
    assert h.value(second, "gpu_dcgm_health_armed") == 1
    assert h.value(second, "gpu_dcgm_health_checks_total") == 2
    assert statuses(h, second, "0") == {name: 0 for name in fields.GPU_SYSTEMS}
    assert statuses(h, second, "1")["mem"] == 2
    assert h.value(second, "gpu_dcgm_health_incidents_total", gpu="1", system="mem", error_code="4",
                 error="DCGM_FR_VOLATILE_DBE_DETECTED") == 1


def test_one_check_per_slow_cycle_for_all_gpus(make_node, engine):
    node = make_node({"gpus": 8})
    for n in range(1, 4):
        node.cycle(advance=30)
        assert engine.health_checks() == n


def test_incident_appears_is_counted_once_and_clears(make_node, engine, h):
    node = make_node({"gpus": 2})
    node.cycle()
    text = node.cycle(advance=30)
    assert statuses(h, text, "1")["pcie"] == 0

    engine.add_incident(GPU, 1, "pcie", "warn", PCI_REPLAY_RATE, "replay rate above threshold")
    text = node.cycle(advance=30)
    assert statuses(h, text, "1")["pcie"] == 1
    assert h.value(text, "gpu_dcgm_health_incidents_total", gpu="1", system="pcie", error_code="3") == 1

    engine.add_incident(GPU, 1, "pcie", "fail", PCI_REPLAY_RATE)  # same incident, now failing
    text = node.cycle(advance=30)
    assert statuses(h, text, "1")["pcie"] == 2
    assert h.value(text, "gpu_dcgm_health_incidents_total", gpu="1", system="pcie", error_code="3") == 1

    engine.clear_incident(GPU, 1, "pcie", PCI_REPLAY_RATE)
    text = node.cycle(advance=30)
    assert statuses(h, text, "1")["pcie"] == 0
    assert h.value(text, "gpu_dcgm_health_incidents_total", gpu="1", system="pcie", error_code="3") == 1
    assert statuses(h, text, "0") == {name: 0 for name in fields.GPU_SYSTEMS}

    engine.add_incident(GPU, 1, "pcie", "warn", PCI_REPLAY_RATE)  # back again: a new incident
    text = node.cycle(advance=30)
    assert h.value(text, "gpu_dcgm_health_incidents_total", gpu="1", system="pcie", error_code="3") == 2


def test_two_codes_on_one_system_take_the_worst(make_node, engine, h):
    node = make_node({"gpus": 1})
    node.cycle()
    engine.add_incident(GPU, 0, "mem", "warn", 6)  # DCGM_FR_PENDING_PAGE_RETIREMENTS
    engine.add_incident(GPU, 0, "mem", "fail", DBE)
    text = node.cycle(advance=30)
    assert statuses(h, text, "0")["mem"] == 2
    assert {s.labels["error"] for s in h.samples(text, "gpu_dcgm_health_incidents_total")} == {
        "DCGM_FR_PENDING_PAGE_RETIREMENTS", "DCGM_FR_VOLATILE_DBE_DETECTED"}


def test_nvswitch_health(make_node, engine, h):
    node = make_node({"gpus": 2}, scenario={"nvswitches": 2})
    first = node.cycle()
    assert "gpu_dcgm_nvswitch_health_status" not in h.families(first)
    engine.add_incident(SWITCH, 1, "nvswitch_fatal", "fail", NVSWITCH_FATAL)
    text = node.cycle(advance=30)
    got = {(s.labels["nvswitch"], s.labels["system"]): s.value
           for s in h.samples(text, "gpu_dcgm_nvswitch_health_status")}
    assert got == {("0", "nvswitch_nonfatal"): 0, ("0", "nvswitch_fatal"): 0,
                   ("1", "nvswitch_nonfatal"): 0, ("1", "nvswitch_fatal"): 2}
    assert h.value(text, "gpu_dcgm_nvswitch_health_incidents_total", nvswitch="1", system="nvswitch_fatal",
                 error_code="15", error="DCGM_FR_NVSWITCH_FATAL_ERROR") == 1
    # An NVSwitch incident is not pinned on any GPU.
    assert h.samples(text, "gpu_dcgm_health_incidents_total") == []


def test_health_systems_flag_limits_watches_and_series(make_node, engine, h):
    node = make_node({"gpus": 1}, settings={"dcgm_health_systems": "mem,pcie"})
    node.cycle()
    text = node.cycle(advance=30)
    assert set(statuses(h, text, "0")) == {"mem", "pcie"}
    (session,) = engine.sessions.values()
    assert set(session.health.values()) == {fields.HEALTH_SYSTEMS["mem"] | fields.HEALTH_SYSTEMS["pcie"]}
    engine.add_incident(GPU, 0, "thermal", "fail", 40)  # not watched: DCGM does not report it
    text = node.cycle(advance=30)
    assert h.samples(text, "gpu_dcgm_health_incidents_total") == []


@pytest.mark.parametrize("bad", ["mem,bogus", ",", "all,mem"])
def test_bad_health_systems_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="--dcgm.health-systems"):
        validate_settings({"dcgm_health_systems": bad})


def test_bad_timeout_is_a_config_error():
    with pytest.raises(ConfigError, match="--dcgm.timeout"):
        validate_settings({"dcgm_timeout": "soon"})
    with pytest.raises(ConfigError, match="--dcgm.timeout"):
        validate_settings({"dcgm_timeout": "0s"})


def test_reconnect_rearms_without_recounting(make_node, engine, h):
    node = make_node({"gpus": 1})
    node.cycle()
    engine.add_incident(GPU, 0, "mem", "fail", DBE)
    text = node.cycle(advance=30)
    assert h.value(text, "gpu_dcgm_health_incidents_total", gpu="0", system="mem", error_code="4") == 1

    # The host engine restarts: new session, new watches, first check only arms again.
    for session in list(engine.sessions.values()):
        engine.close_session(session.handle)
    # The cycle's first read finds the session gone; the next DCGM call reconnects at once, and the
    # health check of this cycle is the first on the new watches: it only arms them.
    text = node.cycle(advance=30)
    assert h.value(text, "gpu_dcgm_reconnects_total") == 1
    assert h.value(text, "gpu_dcgm_health_armed") == 0
    assert h.samples(text, "gpu_dcgm_health_status") == []
    text = node.cycle(advance=30)
    assert h.value(text, "gpu_dcgm_health_armed") == 1
    assert statuses(h, text, "0")["mem"] == 2
    # The incident never went away: still counted once.
    assert h.value(text, "gpu_dcgm_health_incidents_total", gpu="0", system="mem", error_code="4") == 1
    assert h.value(text, "gpu_dcgm_reconnects_total") == 1


def test_health_beside_the_nvml_backend(make_node, engine, h):
    """NVML for readings, DCGM for health: GPUs are matched by UUID."""
    node = make_node({"gpus": 2}, backend="sim", collectors=["thermal"])
    options = CollectorOptions(node="node-a", nvml=node.nvml, settings={"dcgm_bindings_path": str(FAKE)})
    health = DcgmHealthCollector.from_options(options)
    node.poller.collectors.append(health)
    try:
        node.cycle()
        engine.add_incident(GPU, 1, "nvlink", "fail", 14)  # DCGM_FR_NVLINK_DOWN
        text = node.cycle(advance=30)
        uuid1 = node.nvml.nvmlDeviceGetUUID(node.nvml.nvmlDeviceGetHandleByIndex(1))
        assert h.value(text, "gpu_dcgm_health_status", gpu="1", system="nvlink") == 2
        assert h.samples(text, "gpu_dcgm_health_status", gpu="1", system="nvlink")[0].labels["uuid"] == uuid1
        assert len(h.samples(text, "gpu_temperature_celsius")) == 2
        # No field watches beside NVML: DCGM only runs the health checks.
        assert all(not s.watches for s in engine.sessions.values())
    finally:
        node.poller.collectors.remove(health)
        health.close()
