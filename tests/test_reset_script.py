"""The reset Job's own script (remediation_webhook/reset_gpu.sh, the command ResetGpu puts in the Job) run on a
simulated node: a real exporter process whose NVML (collection and its Xid event thread) holds the GPU's device
files, the fake nvidia-smi that refuses a reset while anyone holds them, and the release handshake between them."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gpu_health_stack.procs import http_get as http_bytes
from gpu_health_stack.procs import wait_until
from gpu_health_stack.stack import Stack

from remediation_webhook.actions.reset_gpu import ResetGpu
from remediation_webhook.executor import EXIT_BUSY, EXIT_CHECK, EXIT_PLATFORM, EXIT_UUID

SIM = {"gpus": 4, "model": "H100-SXM-80GB", "faults": [{"kind": "row_remap_pending", "gpu": 1, "at": "0s"}]}
pytestmark = pytest.mark.skipif(shutil.which("find") is None, reason="the script needs find")


def job(uuid: str, name: str = "reset") -> dict[str, Any]:
    """The Job's pod as the webhook writes it, as far as the kubelet's part needs it: the container's command."""
    command = ResetGpu.argv(uuid)
    return {"metadata": {"name": name}, "spec": {"template": {"spec": {"containers": [{"command": command}]}}}}


def http_get(url: str) -> str:
    return http_bytes(url).decode()


def metric(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.fixture(scope="module")
def node() -> Any:
    with Stack() as stack:
        exporter = stack.add_exporter("n1", SIM, expected_gpus=4, driver=True,
                                      extra_args=("--xid.nvml-events", "on"))
        text = wait_until(lambda: (t := http_get(f"{exporter.url}/metrics")) and 'gpu="1"' in t and t, 30,
                          "the exporter's first cycle")
        uuid = re.search(r'gpu_info\{[^}]*gpu="1"[^}]*uuid="(GPU-[^"]+)"', text) or re.search(
            r'gpu_info\{[^}]*uuid="(GPU-[^"]+)"[^}]*gpu="1"', text)
        assert uuid is not None, text[:2000]
        yield stack, exporter, uuid.group(1)


def test_the_reset_is_refused_while_the_exporter_holds_the_gpu_and_done_after_it_lets_go(node) -> None:
    stack, exporter, uuid = node
    home = stack.dir / "nodes" / "n1"
    pid = exporter.proc.popen.pid
    held = Path(f"/proc/{pid}/fd")
    # The exporter's collection and its NVML Xid event thread each initialised NVML: its device files are open.
    assert any(str(home / "driver" / "dev" / "nvidia1") == str(p.readlink()) for p in held.iterdir())
    assert metric(http_get(f"{exporter.url}/metrics"), "gpu_row_remap_pending", gpu="1") == 1

    # No state dir to ask the exporter through (an exporter without --state-dir): the script finds it.
    state = home / "state"
    state.rename(home / "state.away")
    try:
        code, log = stack.run_executor_job("n1", job(uuid, "busy"))
    finally:
        (home / "state.away").rename(state)
    assert code == EXIT_BUSY, log
    assert f"hold {home / 'driver' / 'dev' / 'nvidia1'} (pid:name): {pid}:" in log

    code, log = stack.run_executor_job("n1", job(uuid, "released"))
    assert code == 0, log
    # The acknowledgement names both NVML users of the exporter; nothing else held the GPU.
    assert re.search(rf"exporter released NVML: {pid} released: collection xid", log), log
    assert f"holders of {home / 'driver' / 'dev' / 'nvidia1'}: none" in log
    assert log.rstrip().endswith(f"reset {uuid} at 00000000:2A:00.0; same UUID back; no pending remap or retirement")
    # The request is gone (the script removes it on exit): the exporter takes NVML back and reads the remap applied.
    assert not (state / "release-nvml").exists()
    wait_until(lambda: metric(http_get(f"{exporter.url}/metrics"), "gpu_row_remap_pending", gpu="1") == 0, 30,
               "the exporter to read the pending remap applied")
    assert metric(http_get(f"{exporter.url}/metrics"), "gpu_exporter_nvml_released") == 0


def test_with_the_gpu_operators_driver_root_the_reset_runs_its_nvidia_smi(node, tmp_path) -> None:
    """Where the GPU Operator manages the driver, nvidia-smi lives in the driver container's root (the Job sees it
    under the host's /run): every call goes through `chroot <root> nvidia-smi`. A chroot stand-in on PATH records
    the root it was given and runs the simulated node's nvidia-smi (a real chroot needs a whole root here)."""
    stack, _, uuid = node
    home = stack.dir / "nodes" / "n1"
    root = tmp_path / "driver-root"
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "nvidia-smi").write_text("#!/bin/sh\nexit 99\n")
    (root / "usr" / "bin" / "nvidia-smi").chmod(0o755)
    calls = tmp_path / "chroot-calls"
    chroot = home / "bin" / "chroot"
    chroot.write_text(f'#!/bin/sh\necho "$1 $2" >> {calls}\nshift\nexec "$@"\n')
    chroot.chmod(0o755)
    try:
        code, log = stack.run_executor_job("n1", job(uuid, "operator-driver"),
                                           env={"GPU_HEALTH_DRIVER_ROOT": str(root)})
    finally:
        chroot.unlink()
    assert code == 0, log
    assert f"nvidia-smi from the driver root {root}" in log
    seen = calls.read_text().splitlines()
    assert len(seen) >= 6 and set(seen) == {f"{root} nvidia-smi"}


def test_an_unknown_uuid_is_not_found(node) -> None:
    stack, _, _ = node
    code, log = stack.run_executor_job("n1", job("GPU-00000000-0000-0000-0000-000000000000", "unknown"))
    assert code == EXIT_UUID and "not found" in log


def test_a_script_argument_that_is_no_uuid_never_reaches_nvidia_smi(node) -> None:
    stack, _, _ = node
    for bad in ("GPU-1; reboot", "-r", "GPU-$(id)"):
        code, _ = stack.run_executor_job("n1", job(bad, "bad"))
        assert code == 2


@pytest.mark.parametrize(("model", "expect"), [("A100-SXM4-80GB", 0), ("L4", 0)])
def test_gpus_without_nvswitch_reset_alone(tmp_path, model, expect) -> None:
    with Stack() as stack:
        stack.add_exporter("n2", {"gpus": 2, "model": model}, expected_gpus=2, driver=True)
        uuid = subprocess.run([str(stack.dir / "nodes" / "n2" / "bin" / "nvidia-smi"), "--query-gpu=uuid",
                               "--format=csv,noheader", "-i", "0"], capture_output=True, text=True,
                              check=True).stdout.strip()
        code, log = stack.run_executor_job("n2", job(uuid))
        assert code == expect, log
        assert "NVSwitch no" in log


@pytest.mark.parametrize(("cc", "why"), [
    ("7.0", "NVSwitch system before Ampere (compute capability 7.0): every GPU and NVSwitch must be reset together"),
    ("8.0", "Ampere NVSwitch system and Fabric Manager is not running: a single GPU cannot be reset"),
    ("10.0", "NVSwitch system of compute capability 10.0: NVIDIA documents no single-GPU reset for it"),
])
def test_nvswitch_systems_the_documentation_gives_no_single_gpu_reset_hand_over_to_a_reboot(node, tmp_path, cc,
                                                                                              why) -> None:
    """The simulator's NVSwitch model is an H100 board; a V100 HGX-2, an A100 HGX (no Fabric Manager running here)
    and a B200 HGX are the same node with nvidia-smi answering their compute capability. The script must refuse
    each before it touches the GPU (docs/reset.md, 3c)."""
    stack, _, uuid = node
    home = stack.dir / "nodes" / "n1"
    real = (home / "bin" / "nvidia-smi").read_text()
    wrapper = tmp_path / "bin"
    wrapper.mkdir()
    (wrapper / "nvidia-smi").write_text(
        f"#!/bin/sh\ncase \"$1\" in --query-gpu=compute_cap) echo {cc}; exit 0;; esac\n" + real.split("\n", 1)[1])
    (wrapper / "nvidia-smi").chmod(0o755)
    resets = home / "driver" / "resets"

    def done() -> dict[str, str]:
        return {p.name: p.read_text() for p in resets.iterdir()} if resets.exists() else {}

    before = done()
    (home / "bin").rename(home / "bin.real")
    wrapper.rename(home / "bin")
    # Blackwell boards have no NVSwitch device file on the host (NVLink Subnet Manager runs the switches): the
    # fabric registration alone must mark the system.
    switches = sorted((home / "driver" / "dev").glob("nvidia-nvswitch*")) if cc == "10.0" else []
    for f in switches:
        f.rename(f.with_name("hidden-" + f.name))
    try:
        code, log = stack.run_executor_job("n1", job(uuid, f"cc-{cc}"))
    finally:
        for f in switches:
            f.with_name("hidden-" + f.name).rename(f)
        shutil.rmtree(home / "bin")
        (home / "bin.real").rename(home / "bin")
    assert code == EXIT_PLATFORM, log
    assert why in log
    assert done() == before  # no reset was attempted


def test_a_gpu_that_does_not_register_with_the_fabric_after_the_reset_fails_the_check() -> None:
    """Hopper NVSwitch: after a reset the GPU must register with the NVLink fabric (Completed, Success) before it
    counts as repaired; one stuck In Progress is a failed check, and the ladder goes on to a reboot."""
    with Stack() as stack:
        sim = {"gpus": 2, "faults": [{"kind": "fabric", "gpu": 0, "state": "in_progress"}]}
        stack.add_exporter("n3", sim, expected_gpus=2, driver=True)
        uuid = subprocess.run([str(stack.dir / "nodes" / "n3" / "bin" / "nvidia-smi"), "--query-gpu=uuid",
                               "--format=csv,noheader", "-i", "0"], capture_output=True, text=True,
                              check=True).stdout.strip()
        code, log = stack.run_executor_job("n3", job(uuid), env={"GPU_HEALTH_FABRIC_WAIT": "2"})
    assert code == EXIT_CHECK, log
    assert "was successfully reset" in log
    assert "did not register with the NVLink fabric within 2s (state In Progress" in log
