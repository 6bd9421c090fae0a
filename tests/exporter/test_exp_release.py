"""A GPU reset asks the exporter to let go of NVML through a file in --state-dir, and gets it back after."""

from __future__ import annotations

import os
import time
from pathlib import Path

from exporter.backends.sim import SimConfig, SimulatedNvml
from exporter.poller import RELEASE_ACK, RELEASE_MAX_AGE, RELEASE_REQUEST, Poller, PollerConfig
from exporter.registry import discover
from exporter.state import ExpectedGpus


def _poller(tmp_path: Path) -> tuple[Poller, SimulatedNvml]:
    sim = SimulatedNvml(SimConfig(gpus=2))
    collectors = [discover()["thermal"]()]
    config = PollerConfig(node="n1", release_dir=tmp_path)
    return Poller(sim, collectors, config, ExpectedGpus(2, None, "boot")), sim


def test_release_request_shuts_nvml_down_and_collection_resumes_after(tmp_path: Path) -> None:
    poller, sim = _poller(tmp_path)
    try:
        body = poller.run_cycle().body.decode()
        assert "gpu_exporter_nvml_released{node=\"n1\"} 0.0" in body and "gpu_temperature_celsius{" in body

        (tmp_path / RELEASE_REQUEST).touch()
        body = poller.run_cycle().body.decode()
        assert (tmp_path / RELEASE_ACK).exists()
        assert not sim._initialized  # nvmlShutdown was called: the device files are closed
        assert "gpu_exporter_nvml_released{node=\"n1\"} 1.0" in body
        assert "gpu_nvml_up{node=\"n1\"} 0.0" in body
        assert "gpu_temperature_celsius{" not in body  # no stale readings while released

        # Released, it stays released and calls nothing.
        poller.run_cycle()
        assert not sim._initialized

        (tmp_path / RELEASE_REQUEST).unlink()
        body = poller.run_cycle().body.decode()
        assert not (tmp_path / RELEASE_ACK).exists()
        assert sim._initialized
        assert "gpu_exporter_nvml_released{node=\"n1\"} 0.0" in body
        assert "gpu_nvml_up{node=\"n1\"} 1.0" in body and "gpu_temperature_celsius{" in body
    finally:
        poller.stop()


def test_a_stale_request_from_a_dead_reset_job_is_ignored(tmp_path: Path) -> None:
    poller, sim = _poller(tmp_path)
    request = tmp_path / RELEASE_REQUEST
    request.touch()
    old = time.time() - RELEASE_MAX_AGE - 60
    os.utime(request, (old, old))
    try:
        body = poller.run_cycle().body.decode()
        assert sim._initialized and not (tmp_path / RELEASE_ACK).exists()
        assert "gpu_exporter_nvml_released{node=\"n1\"} 0.0" in body
    finally:
        poller.stop()
