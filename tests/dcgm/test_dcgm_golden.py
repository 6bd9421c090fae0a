"""The whole /metrics of the DCGM backend on the fake bindings, pinned in tests/dcgm/golden-dcgm.prom.

Two cycles (the first only arms DCGM's health watches), a fixed clock, faults, health incidents and
NVSwitches. Regenerate after an intended change with: UPDATE_GOLDEN=1 python -m pytest tests/dcgm
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

GOLDEN = Path(__file__).parent / "golden-dcgm.prom"
SIM = {
    "seed": 5,
    "faults": [
        {"kind": "ecc_uncorrectable", "gpu": 1, "count": 2},
        {"kind": "row_remap_pending", "gpu": 1},
        {"kind": "nvlink_errors", "gpu": 3, "link": 4, "counter": "crc_flit", "count": 17},
        {"kind": "nvlink_down", "gpu": 3, "link": 5},
        {"kind": "throttle", "gpu": 5, "reasons": ["hw_thermal_slowdown"]},
        {"kind": "not_supported", "gpu": 6, "call": "nvmlDeviceGetPowerUsage"},
    ],
}
SCENARIO = {
    "nvswitches": 4,
    "blanks": [{"gpu": 2, "field": 140, "kind": "not_supported"}],
    "incidents": [
        {"gpu": 1, "system": "mem", "health": "fail", "code": 4, "msg": "Volatile DBEs detected"},
        {"gpu": 1, "system": "mem", "health": "warn", "code": 85, "msg": "Row remapping pending"},
        {"gpu": 3, "system": "nvlink", "health": "fail", "code": 14, "msg": "NVLink 5 is down"},
        {"nvswitch": 2, "system": "nvswitch_fatal", "health": "fail", "code": 15},
    ],
}

ROOT = Path(__file__).resolve().parents[2]
FAKE = ROOT / "tests" / "fakes" / "dcgm_bindings"


def render(make_node) -> str:
    node = make_node(SIM, scenario=SCENARIO)
    node.cycle()
    return node.cycle(advance=30)


def test_golden(make_node):
    got = render(make_node)
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(got)
    assert got == GOLDEN.read_text(), f"{GOLDEN} differs; if intended, regenerate with UPDATE_GOLDEN=1"


def test_golden_has_the_nvml_families_and_the_health_series(make_node, h):
    text = GOLDEN.read_text()
    nvml = make_node(SIM, backend="sim").cycle()
    assert {f for f in h.families(text) if not f.startswith("gpu_dcgm_")} == h.families(nvml)
    assert {f for f in h.families(text) if f.startswith("gpu_dcgm_")} >= {
        "gpu_dcgm_connected", "gpu_dcgm_health_armed", "gpu_dcgm_health_status", "gpu_dcgm_health_incidents",
        "gpu_dcgm_nvswitch_health_status", "gpu_dcgm_nvswitch_health_incidents",
    }
    assert "9223372036854775" not in text and "e+14" not in text  # no blank sentinel leaked


def test_promtool_check_metrics():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus); .ci/run installs it")
    result = subprocess.run([promtool, "check", "metrics"], input=GOLDEN.read_bytes(), capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_cli_backend_dcgm_on_the_fake(tmp_path: Path, h):
    """`gpu-health-exporter --backend dcgm` on the fake: the NVML families plus the health series."""
    scenario = tmp_path / "scenario.json"
    scenario.write_text(json.dumps({**SCENARIO, "sim": SIM}))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "NODE_NAME"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["DCGM_FAKE_SCENARIO"] = str(scenario)
    common = ["--web.listen-address", f"127.0.0.1:{port}", "--state-dir", str(tmp_path / "state"),
              "--node-name", "node-a", "--collect-interval", "200ms", "--collect-interval.slow", "200ms",
              "--collect-timeout", "200ms", "--dcgm.timeout", "100ms"]
    stderr = tmp_path / "stderr.log"
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "exporter", "--backend", "dcgm", "--dcgm.bindings-path", str(FAKE), *common],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
        )
    try:
        body = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert proc.poll() is None, stderr.read_text()
            try:
                body = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            except requests.ConnectionError:
                body = ""
            if re.search(r'^gpu_dcgm_health_armed\{node="node-a"\} 1', body, re.M):
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"health never armed:\n{body[-2000:]}\n{stderr.read_text()[-2000:]}")
        golden = GOLDEN.read_text()
        incidents = {"gpu_dcgm_health_incidents", "gpu_dcgm_nvswitch_health_incidents"}
        assert h.families(body) >= h.families(golden) - incidents
        assert re.search(r'^gpu_dcgm_health_status\{[^}]*gpu="1"[^}]*system="mem"\} 2', body, re.M)
        promtool = shutil.which("promtool")
        if promtool:
            result = subprocess.run([promtool, "check", "metrics"], input=body.encode(), capture_output=True)
            assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
