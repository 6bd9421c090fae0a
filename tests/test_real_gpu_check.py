"""The real-GPU check must not rot between the sessions that have a GPU: run it on the simulator."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_real_gpu_check_passes_on_the_simulator() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "real_gpu_check.py"), "--sim"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "8 GPUs checked" in result.stdout
    assert " 0 unexplained gaps" in result.stdout
    # Every NVML function the collectors call shows up with its latency.
    assert "nvmlDeviceGetFieldValues" in result.stdout
    assert "nvmlDeviceGetRemappedRows" in result.stdout


def test_reset_mode_refuses_without_its_flag_and_runs_the_job_script_on_a_simulated_node(tmp_path) -> None:
    script = [sys.executable, str(ROOT / "tools" / "real_gpu_check.py"), "--reset", "GPU-1"]
    refused = subprocess.run(script, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert refused.returncode == 2 and "RESETS GPU GPU-1" in refused.stderr
    assert "Refusing without --yes-reset-this-gpu" in refused.stderr
    done = subprocess.run([*script, "--sim", "--exporter-state", str(tmp_path / "none")], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    # Each step of the Job's script, with its time, then the verdict.
    assert re.search(r"\[\d+\.\d s\] holders of \S+/dev/nvidia1: none", done.stdout), done.stdout
    assert re.search(r"\[\d+\.\d s\] reset GPU-\S+ at 00000000:2A:00.0; same UUID back", done.stdout)
    assert re.search(r"exit 0 \(reset and checked\) after \d+\.\ds", done.stdout)
