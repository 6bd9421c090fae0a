"""The real-GPU check must not rot between the sessions that have a GPU: run it on the simulator."""

from __future__ import annotations

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
