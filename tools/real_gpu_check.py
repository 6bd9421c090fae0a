#!/usr/bin/env python3
"""Real-GPU check: the NVML collectors against the installed driver, then the exporter end to end.

Run on a machine with an NVIDIA GPU and driver, from the repository root:

    python3 tools/real_gpu_check.py          # on a GPU node
    python3 tools/real_gpu_check.py --sim    # the same checks against the simulator (tests the script)

1. Runs the collection loop in-process on pynvml with call tracing, two cycles (both tiers), and
   prints every NVML function's call count and p50 / max latency.
2. Starts `python -m exporter --backend nvml` on a loopback port, scrapes /metrics, and checks that
   every family is present for each GPU, or that the calls behind it are reported in
   gpu_nvml_unsupported (NotSupported is an answer; silence is not).
Exits 1 if a family is missing without an explanation.

    sudo python3 tools/real_gpu_check.py --reset GPU-<uuid> --yes-reset-this-gpu [--exporter-state DIR]

Off by default, and loud: resets one GPU the operator names with the reset Job's own script
(remediation_webhook/reset_gpu.sh): asks the exporter whose --state-dir is DIR (default
/var/lib/gpu-health-exporter) to release NVML, lists every process holding the GPU's device file, refuses while one
is not paused, resets, checks, and prints each step with its time. Drain the node first: every process using the
GPU would lose it. `--reset --sim` does the same on a simulated node (gpu_health_stack/nvidia_smi.py).
"""

from __future__ import annotations

import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_NVLINK_STATE = ("NVML_FI_DEV_NVLINK_LINK_COUNT", "NVML_FI_DEV_NVLINK_GET_STATE", "nvmlDeviceGetFieldValues",
                 "nvmlDeviceGetNvLinkState")
_NVLINK_ERRORS = ("NVML_FI_DEV_NVLINK_LINK_COUNT", "NVML_FI_DEV_NVLINK_ERROR_DL_REPLAY",
                  "NVML_FI_DEV_NVLINK_ERROR_DL_RECOVERY", "NVML_FI_DEV_NVLINK_ERROR_DL_CRC",
                  "nvmlDeviceGetFieldValues", "nvmlDeviceGetNvLinkErrorCounter")

# Each per-GPU family and the NVML calls (or fields) whose NotSupported explains its absence.
FAMILY_CALLS: dict[str, tuple[str, ...]] = {
    "gpu_info": (),
    "gpu_temperature_celsius": ("nvmlDeviceGetTemperature",),
    "gpu_memory_temperature_celsius": ("NVML_FI_DEV_MEMORY_TEMP", "nvmlDeviceGetFieldValues"),
    "gpu_temperature_threshold_celsius": ("nvmlDeviceGetTemperatureThreshold",),
    "gpu_power_usage_watts": ("nvmlDeviceGetPowerUsage",),
    "gpu_power_limit_watts": ("nvmlDeviceGetEnforcedPowerLimit",),
    "gpu_energy_consumption_joules_total": ("nvmlDeviceGetTotalEnergyConsumption",),
    "gpu_utilization_ratio": ("nvmlDeviceGetUtilizationRates",),
    "gpu_memory_bandwidth_utilization_ratio": ("nvmlDeviceGetUtilizationRates",),
    "gpu_memory_used_bytes": ("nvmlDeviceGetMemoryInfo",),
    "gpu_memory_total_bytes": ("nvmlDeviceGetMemoryInfo",),
    "gpu_memory_reserved_bytes": ("nvmlDeviceGetMemoryInfo",),
    "gpu_clock_hertz": ("nvmlDeviceGetClockInfo",),
    "gpu_clock_event_reason_active": ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"),
    "gpu_performance_state": ("nvmlDeviceGetPerformanceState",),
    "gpu_ecc_enabled": ("nvmlDeviceGetEccMode",),
    "gpu_ecc_errors_total": ("nvmlDeviceGetEccMode", "NVML_FI_DEV_ECC_SBE_VOL_TOTAL", "nvmlDeviceGetFieldValues"),
    "gpu_retired_pages": ("NVML_FI_DEV_RETIRED_SBE", "NVML_FI_DEV_RETIRED_DBE", "nvmlDeviceGetFieldValues"),
    "gpu_retired_pages_pending": ("NVML_FI_DEV_RETIRED_PENDING", "nvmlDeviceGetFieldValues"),
    "gpu_remapped_rows": ("nvmlDeviceGetRemappedRows",),
    "gpu_row_remap_pending": ("nvmlDeviceGetRemappedRows",),
    "gpu_row_remap_failure": ("nvmlDeviceGetRemappedRows",),
    # Scoped fields name their link (NVML_FI_DEV_NVLINK_GET_STATE[5]); the check compares without it. A backend
    # without scoped fields is read link by link (the nvmlDeviceGetNvLink* calls).
    "gpu_nvlink_links_up": _NVLINK_STATE,
    "gpu_nvlink_links_down": _NVLINK_STATE,
    "gpu_nvlink_errors_total": _NVLINK_ERRORS,
    "gpu_nvlink_link_up": _NVLINK_STATE,
    "gpu_nvlink_link_errors_total": _NVLINK_ERRORS,
    "gpu_pcie_replays_total": ("nvmlDeviceGetPcieReplayCounter",),
    "gpu_pcie_link_generation": ("nvmlDeviceGetCurrPcieLinkGeneration",),
    "gpu_pcie_link_max_generation": ("nvmlDeviceGetMaxPcieLinkGeneration",),
    "gpu_pcie_link_width_lanes": ("nvmlDeviceGetCurrPcieLinkWidth",),
    "gpu_pcie_link_max_width_lanes": ("nvmlDeviceGetMaxPcieLinkWidth",),
    "gpu_fabric_state": ("nvmlDeviceGetGpuFabricInfoV",),
    "gpu_fabric_status": ("nvmlDeviceGetGpuFabricInfoV",),
    "gpu_fabric_health": ("nvmlDeviceGetGpuFabricInfoV", "nvmlGpuFabricInfo_v3"),
    "gpu_lost": (),
    "gpu_collection_last_success_timestamp_seconds": (),
    "gpu_collection_stale": (),
}


def in_process_latency(backend: str) -> None:
    import pynvml

    from exporter.backends.sim import SimulatedNvml
    from exporter.cli import build_poller
    from exporter.config import parse
    from exporter.device import CallTrace
    from exporter.registry import discover

    nvml = SimulatedNvml() if backend == "sim" else pynvml
    available = discover()
    # The exporter's default collectors, as `--backend nvml` runs them, minus the kernel log.
    config = parse(["--backend", backend, "--node-name", "check", "--state-dir", "", "--xid.source", "none",
                    "--xid.nvml-events", "off", "--collect-timeout", "5s"], available)
    trace = CallTrace()
    poller = build_poller(config, nvml, available, boot_id="check", trace=trace)
    t0 = time.process_time()
    poller.run_cycle()  # both tiers
    first = time.process_time() - t0
    t0 = time.process_time()
    poller.run_cycle()  # fast tier only
    fast = time.process_time() - t0
    poller.stop()
    print(f"GPUs visible: {poller.snapshot.fleet.visible if poller.snapshot.fleet else 0}")
    print(f"CPU per cycle: both tiers {first * 1e3:.2f} ms, fast tier {fast * 1e3:.2f} ms")
    print(f"{'NVML function':50} {'calls':>6} {'p50 ms':>9} {'max ms':>9}")
    for name, samples in sorted(trace.latencies.items()):
        print(f"{name:50} {len(samples):6d} {statistics.median(samples) * 1e3:9.3f} {max(samples) * 1e3:9.3f}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape_exporter(backend: str) -> int:
    from prometheus_client.parser import text_string_to_metric_families

    port = free_port()
    with tempfile.TemporaryDirectory() as state:
        proc = subprocess.Popen(
            [sys.executable, "-m", "exporter", "--backend", backend, "--web.listen-address", f"127.0.0.1:{port}",
             "--state-dir", state, "--xid.source", "none", "--collect-timeout", "2s",
             "--collector.nvlink.per-link"],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        try:
            body = ""
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    t0 = time.monotonic()
                    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
                    print(f"/metrics answered in {(time.monotonic() - t0) * 1e3:.1f} ms, {len(body)} bytes")
                    break
                except OSError:
                    time.sleep(0.2)
            else:
                print("exporter did not answer within 60 s")
                return 1
        finally:
            proc.terminate()
            proc.wait(10)

    present: dict[str, set[str]] = defaultdict(set)
    unsupported: dict[str, set[str]] = defaultdict(set)
    gpus: set[str] = set()
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            gpu = s.labels.get("gpu")
            if gpu is None:
                continue
            gpus.add(gpu)
            present[s.name].add(gpu)
            if s.name == "gpu_nvml_unsupported":
                unsupported[gpu].add(re.sub(r"\[\d+\]$", "", s.labels["call"]))
    failures = 0
    for gpu in sorted(gpus, key=int):
        for family, calls in FAMILY_CALLS.items():
            if gpu in present[family]:
                continue
            why = unsupported[gpu] & set(calls)
            if why:
                print(f"GPU {gpu}: {family} absent, not supported: {', '.join(sorted(why))}")
            else:
                print(f"GPU {gpu}: {family} MISSING without a NotSupported explanation")
                failures += 1
    print(f"{len(gpus)} GPUs checked, {len(FAMILY_CALLS)} families each, {failures} unexplained gaps")
    return 1 if failures or not gpus else 0


RESET_WARNING = """
*** gpu-health: this RESETS GPU {uuid} ***
Every process using it loses it; run only on a cordoned, drained node. The same script as the reset_gpu Job:
release the exporter's NVML, find the holders, refuse while one is not paused, nvidia-smi -r, check.
"""


def reset_check(uuid: str, state_dir: str, sim: bool) -> int:
    """Run the reset Job's script on this node for `uuid` (a simulated node with `sim`) and print its steps."""
    from remediation_webhook.actions.reset_gpu import ResetGpu

    print(RESET_WARNING.format(uuid=uuid), file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="gpu-health-reset-") as tmp:
        env = {**os.environ, "GPU_HEALTH_EXPORTER_STATE": state_dir, "GPU_HEALTH_DRIVER_ROOT": "/run/nvidia/driver",
               "GPU_HEALTH_TERMINATION_LOG": f"{tmp}/termination-log"}
        if sim:
            uuid, env = _sim_node(Path(tmp), env)
        began = time.monotonic()
        done = subprocess.run(ResetGpu.argv(uuid), env=env, capture_output=True, text=True, check=False)
        took = time.monotonic() - began
    print(done.stdout, end="")
    print(done.stderr, end="", file=sys.stderr)
    meaning = {0: "reset and checked", 2: "not a GPU UUID", 10: "a holder nobody paused", 11: "MIG enabled",
               12: "GPU not found, or another UUID after the reset", 13: "nvidia-smi -r failed",
               14: "this platform needs a reboot", 15: "a check after the reset failed"}
    print(f"exit {done.returncode} ({meaning.get(done.returncode, 'unexpected')}) after {took:.1f}s")
    return done.returncode


def _sim_node(tmp: Path, env: dict[str, str]) -> tuple[str, dict[str, str]]:
    """A simulated node with a pending row remap on GPU 1 and the fake nvidia-smi first on PATH; (GPU 1's UUID, env)."""
    import yaml

    from exporter.backends.sim import SimulatedNvml, sim_config_from_dict
    from gpu_health_stack.nvidia_smi import install_nvidia_smi

    raw = {"gpus": 8, "driver_dir": str(tmp / "driver"), "faults": [{"kind": "row_remap_pending", "gpu": 1}]}
    (tmp / "sim.yaml").write_text(yaml.safe_dump(raw))
    install_nvidia_smi(tmp / "bin", tmp / "sim.yaml")
    nvml = SimulatedNvml(sim_config_from_dict(raw))
    nvml.nvmlInit()
    uuid = str(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(1)))
    nvml.nvmlShutdown()
    return uuid, {**env, "PATH": f"{tmp / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}",
                  "GPU_HEALTH_DEV": str(tmp / "driver" / "dev")}


def main() -> int:
    args = sys.argv[1:]
    if "--reset" in args:
        i = args.index("--reset")
        uuid = args[i + 1] if i + 1 < len(args) else ""
        if "--yes-reset-this-gpu" not in args and "--sim" not in args:
            print(RESET_WARNING.format(uuid=uuid or "<uuid>")
                  + "Refusing without --yes-reset-this-gpu.", file=sys.stderr)
            return 2
        state = args[args.index("--exporter-state") + 1] if "--exporter-state" in args else \
            "/var/lib/gpu-health-exporter"
        return reset_check(uuid, state, "--sim" in args)
    backend = "sim" if "--sim" in args else "nvml"
    in_process_latency(backend)
    return scrape_exporter(backend)


if __name__ == "__main__":
    sys.exit(main())
