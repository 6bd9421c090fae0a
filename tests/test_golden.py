"""The whole /metrics output of a seeded simulated node with a fixed clock, pinned in a golden file.

Regenerate after an intended change with: UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from exporter.backends.sim import SimulatedNvml, sim_config_from_dict
from exporter.cli import build_poller
from exporter.config import parse
from exporter.registry import discover

GOLDEN = Path(__file__).parent / "golden"
WALL = 1_800_000_000.0
# Durations are real measurements; everything else is a function of the seed and the clock.
# The XID timestamps are when the line was read: a file source has no trustworthy event time.
_VOLATILE = re.compile(
    r"^((?:gpu_exporter_collector_duration_seconds|gpu_collection_duration_seconds"
    r"|gpu_xid_last_timestamp_seconds|gpu_sxid_last_timestamp_seconds"
    r"|gpu_fallen_off_bus_timestamp_seconds)\{[^}]*\}) .*$",
    re.M,
)


def render(sim_config: dict, argv: list[str], tmp_path: Path) -> str:
    available = discover()
    (tmp_path / "boot_id").write_text("boot-1\n")
    argv = [a.replace("{golden}", str(GOLDEN)) for a in argv]
    config = parse(
        ["--backend", "sim", "--node-name", "node-a", "--state-dir", str(tmp_path),
         "--xid.boot-id-file", str(tmp_path / "boot_id"), "--xid.nvml-events", "off", *argv],
        available,
    )
    nvml = SimulatedNvml(sim_config_from_dict(sim_config), clock=lambda: 1000.0)
    poller = build_poller(config, nvml, available, boot_id="boot-1", wall=lambda: WALL)
    try:
        body = poller.run_cycle().body.decode()
    finally:
        poller.stop()
    return _VOLATILE.sub(r"\1 0.0", body)


CASES = {
    # What `gpu-health-exporter --backend sim` serves: 8 healthy H100 SXM 80GB.
    "h100x8-healthy": ({"seed": 0}, ["--expected-gpus", "8", "--xid.source", "none"]),
    # Faults that are active from the start, one per family that has a fault kind.
    "h100x8-faults": (
        {
            "seed": 3,
            "faults": [
                {"kind": "ecc_uncorrectable", "gpu": 1, "count": 2},
                {"kind": "row_remap_pending", "gpu": 1},
                {"kind": "row_remap_failure", "gpu": 2},
                {"kind": "nvlink_errors", "gpu": 3, "link": 4, "counter": "crc_flit", "count": 17},
                {"kind": "nvlink_down", "gpu": 3, "link": 5},
                {"kind": "pcie_replays", "gpu": 4, "count": 9},
                {"kind": "pcie_downgrade", "gpu": 4, "width": 8},
                {"kind": "throttle", "gpu": 5, "reasons": ["hw_thermal_slowdown", "sw_power_cap"]},
                {"kind": "retired_pages", "gpu": 6, "cause": "double_bit", "count": 2},
                {"kind": "not_supported", "gpu": 6, "call": "nvmlDeviceGetPowerUsage"},
                {"kind": "nvml_error", "gpu": 5, "call": "nvmlDeviceGetPcieReplayCounter"},
                {"kind": "mig", "gpu": 7},
                {"kind": "gpu_lost", "gpu": 0},
            ],
        },
        ["--expected-gpus", "8", "--xid.source", "none"],
    ),
    # NVLink with --collector.nvlink.per-link: every link of every GPU, links past 11 included.
    "h100x8-nvlink-per-link": (
        {
            "seed": 0,
            "faults": [
                {"kind": "nvlink_errors", "gpu": 3, "link": 4, "counter": "crc_flit", "count": 17},
                {"kind": "nvlink_errors", "gpu": 3, "link": 16, "counter": "recovery", "count": 2},
                {"kind": "nvlink_down", "gpu": 3, "link": 5},
                {"kind": "nvlink_down", "gpu": 6, "link": 17},
            ],
        },
        ["--expected-gpus", "8", "--collector.disable-defaults", "--collector.nvlink", "--collector.nvlink.per-link"],
    ),
    # A kernel log with Xid, SXid, Xid 154 and fallen-off-the-bus records, read by the xid collector at start.
    "h100x8-xid": ({"seed": 0}, ["--xid.source", "file:{golden}/kern.log"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str, tmp_path: Path) -> None:
    sim_config, argv = CASES[case]
    got = render(sim_config, argv, tmp_path)
    path = GOLDEN / f"{case}.prom"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(got)
    assert got == path.read_text(), f"{path} differs; if intended, regenerate with UPDATE_GOLDEN=1"


@pytest.mark.parametrize("case", sorted(CASES))
def test_promtool_check_metrics(case: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus); .ci/run installs it")
    body = (GOLDEN / f"{case}.prom").read_bytes()
    result = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
