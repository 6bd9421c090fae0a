"""The fake nvidia-smi (gpu_health_stack/nvidia_smi.py) on a simulated node, and the real reset script against it.

Every process here is real: the fake runs through its shell shim, holders are Python processes with a
SimulatedNvml initialised on the same node, and reset_gpu.sh runs under /bin/sh.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.backends.sim import SimHandle, SimulatedNvml, load_sim_config
from gpu_health_stack.nvidia_smi import install_nvidia_smi

ROOT = Path(__file__).resolve().parent.parent
RESET_SCRIPT = ROOT / "remediation_webhook" / "reset_gpu.sh"
BUS0, BUS1 = "00000000:18:00.0", "00000000:2A:00.0"
# A process with the node's GPUs open: NVML initialised, as the exporter or a CUDA job would have it.
HOLDER = textwrap.dedent("""
    import ctypes, sys
    from exporter.backends.sim import SimulatedNvml, load_sim_config
    if len(sys.argv) > 2:  # PR_SET_NAME: the name /proc/<pid>/comm shows
        ctypes.CDLL(None).prctl(15, sys.argv[2].encode(), 0, 0, 0)
    sim = SimulatedNvml(load_sim_config(sys.argv[1]))
    sim.nvmlInit()
    print("holding", flush=True)
    sys.stdin.read()
    sim.nvmlShutdown()
""")


@dataclass
class Node:
    tmp: Path
    config: Path
    driver_dir: Path
    uuids: list[str]

    def env(self, **extra: str) -> dict[str, str]:
        return {"PATH": f"{self.tmp / 'bin'}:/usr/bin:/bin", "HOME": str(self.tmp), **extra}

    def smi(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.tmp / "bin" / "nvidia-smi", *args], env=self.env(), capture_output=True,
                              text=True, timeout=30)

    def sim(self) -> SimulatedNvml:
        return SimulatedNvml(load_sim_config(str(self.config)))


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Any]:
    def build(**sim: Any) -> Node:
        driver_dir = tmp_path.resolve() / "node"
        config = tmp_path / "sim.yaml"
        config.write_text(yaml.safe_dump({"gpus": 2, "seed": 7, "driver_dir": str(driver_dir), **sim}))
        install_nvidia_smi(tmp_path / "bin", config)
        node = Node(tmp_path, config, driver_dir, [])
        node.uuids = [g.uuid for g in node.sim()._gpus]
        return node

    yield build


@pytest.fixture
def holders() -> Iterator[Any]:
    """Start holder processes (optionally under another name); every one is ended after the test."""
    started: list[subprocess.Popen[str]] = []

    def start(node: Node, name: str | None = None) -> subprocess.Popen[str]:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(node.config), *([name] if name else [])],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        started.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == "holding\n"
        return proc

    yield start
    for proc in started:
        end(proc)


def end(proc: subprocess.Popen[str]) -> None:
    """Let a holder shut NVML down and exit."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    proc.wait(timeout=10)
    proc.stdout.close()


# --- formats and exit codes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "expected"), [
    ("H100-SXM-80GB", "9.0, Disabled, Enabled"),
    ("A100-SXM4-80GB", "8.0, Disabled, Enabled"),
    ("L4", "8.9, [N/A], Enabled"),
])
def test_query_gpu_answers_one_csv_line_for_the_gpu_by_uuid_bus_id_or_index(make_node: Any, model: str,
                                                                            expected: str) -> None:
    node = make_node(model=model)
    fields = "--query-gpu=pci.bus_id,uuid,compute_cap,mig.mode.current,persistence_mode"
    for ident in (node.uuids[1], BUS1, "1"):
        out = node.smi(fields, "--format=csv,noheader", "-i", ident)
        assert (out.returncode, out.stdout) == (0, f"{BUS1}, {node.uuids[1]}, {expected}\n")


def test_unknown_gpus_arguments_and_fields_fail_with_nvidia_smis_exit_codes(make_node: Any) -> None:
    node = make_node()
    out = node.smi("--query-gpu=pci.bus_id", "--format=csv,noheader", "-i", "GPU-00000000-0000-0000-0000-0")
    assert (out.returncode, out.stdout, out.stderr) == (6, "", "No devices were found\n")
    out = node.smi("-q", "--display=ECC", "-i", "0")
    assert out.returncode == 2 and "'--display=ECC'" in out.stderr
    out = node.smi("--query-gpu=clocks.sm", "--format=csv,noheader", "-i", "0")
    assert out.returncode == 2 and '"clocks.sm"' in out.stderr
    assert node.smi("--query-compute-apps=pid", "--format=csv,noheader", "-i", "0").stdout == ""


def test_q_has_the_layout_and_values_reset_gpu_sh_reads(make_node: Any) -> None:
    node = make_node(faults=[{"kind": "row_remap_pending", "gpu": 0}])
    out = node.smi("-q", "-i", node.uuids[0])
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    start = lines.index(f"GPU {BUS0}")
    for line in [
        "    Product Name                          : NVIDIA H100 80GB HBM3",
        "    Persistence Mode                      : Enabled",
        f"    GPU UUID                              : {node.uuids[0]}",
        "    Minor Number                          : 0",
        "    GPU Recovery Action                   : None",
        "    Retired Pages",
        "        Pending Page Blacklist            : N/A",
        "    Remapped Rows",
        "        Uncorrectable Error               : 1",
        "        Pending                           : Yes",
        "        Remapping Failure Occurred        : No",
        "    Fabric",
        "        State                             : Completed",
        "        Status                            : Success",
    ]:
        assert line in lines[start:], line


def test_nvlink_status_shows_each_link_or_inactive(make_node: Any) -> None:
    node = make_node(faults=[{"kind": "nvlink_down", "gpu": 0, "link": 1}])
    out = node.smi("nvlink", "-s", "-i", "0").stdout.splitlines()
    assert out[:3] == [f"GPU 0: NVIDIA H100 80GB HBM3 (UUID: {node.uuids[0]})",
                       "\t Link 0: 26.562 GB/s", "\t Link 1: <inactive>"]
    assert len(out) == 19


# --- reset and persistence mode ------------------------------------------------------------------------------------


def test_reset_is_refused_while_another_process_holds_the_gpu_and_clears_a_pending_remap_after(
        make_node: Any, holders: Any) -> None:
    node = make_node(faults=[{"kind": "row_remap_pending", "gpu": 0}])
    holder = holders(node)
    out = node.smi("-r", "-i", BUS0)
    assert out.returncode == 255
    assert f"GPU {BUS0} is currently in use by another process." in out.stderr
    assert "Please first kill all processes using this device" in out.stderr
    assert str(holder.pid) not in out.stdout + out.stderr  # the real tool names no process either
    assert not (node.driver_dir / "resets" / node.uuids[0]).exists()

    end(holder)
    out = node.smi("-r", "-i", BUS0)
    assert (out.returncode, out.stdout) == (0, f"GPU {BUS0} was successfully reset.\nAll done.\n")
    assert "        Pending                           : No" in node.smi("-q", "-i", BUS0).stdout.splitlines()
    fresh = node.sim()
    fresh.nvmlInit()
    assert fresh.nvmlDeviceGetRemappedRows(SimHandle(0)) == (0, 1, 0, 0)
    fresh.nvmlShutdown()


def test_a_lost_gpu_cannot_be_reset(make_node: Any) -> None:
    node = make_node(faults=[{"kind": "gpu_lost", "gpu": 1}])
    out = node.smi("-r", "-i", BUS1)
    assert out.returncode == 15 and "GPU is lost" in out.stderr
    assert node.smi("-r", "-i", BUS0).returncode == 0


def test_nvidia_persistenced_blocks_a_reset_only_while_persistence_mode_is_on(make_node: Any,
                                                                              holders: Any) -> None:
    node = make_node()
    daemon = holders(node, "nvidia-persistenced")
    assert Path(f"/proc/{daemon.pid}/comm").read_text() == "nvidia-persiste\n"
    assert node.smi("-r", "-i", BUS0).returncode == 255

    out = node.smi("-pm", "0", "-i", node.uuids[0])
    assert (out.returncode, out.stdout) == (0, f"Disabled persistence mode for GPU {BUS0}.\nAll done.\n")
    assert node.smi("--query-gpu=persistence_mode", "--format=csv,noheader", "-i", BUS0).stdout == "Disabled\n"
    assert node.smi("-r", "-i", BUS0).returncode == 0
    assert node.smi("-r", "-i", BUS1).returncode == 255  # GPU 1 is still in persistence mode

    out = node.smi("-pm", "1", "-i", node.uuids[0])
    assert out.stdout == f"Enabled persistence mode for GPU {BUS0}.\nAll done.\n"
    assert node.smi("-r", "-i", BUS0).returncode == 255


# --- remediation_webhook/reset_gpu.sh end to end -------------------------------------------------------------------


def run_reset(node: Node, uuid: str, exporter_state: Path | None = None) -> tuple[int, str, str]:
    tlog = node.tmp / "termination-log"
    tlog.unlink(missing_ok=True)
    env = node.env(
        GPU_HEALTH_DEV=str(node.driver_dir / "dev"),
        GPU_HEALTH_EXPORTER_STATE=str(exporter_state or node.tmp / "no-exporter"),
        GPU_HEALTH_DRIVER_ROOT=str(node.tmp / "no-driver-root"),
        GPU_HEALTH_TERMINATION_LOG=str(tlog),
        GPU_HEALTH_RELEASE_WAIT="10" if exporter_state else "2",
    )
    out = subprocess.run(["/bin/sh", "-c", RESET_SCRIPT.read_text(), "gpu-health-reset", uuid], env=env,
                         capture_output=True, text=True, timeout=60)
    return out.returncode, out.stdout + out.stderr, tlog.read_text() if tlog.exists() else ""


def test_reset_gpu_sh_refuses_a_holder_resets_once_it_is_gone_and_rejects_an_unknown_uuid(
        make_node: Any, holders: Any) -> None:
    node = make_node(faults=[{"kind": "row_remap_pending", "gpu": 0}])
    holder = holders(node)
    name = Path(f"/proc/{holder.pid}/comm").read_text().strip()
    code, output, tlog = run_reset(node, node.uuids[0])
    assert code == 10, output
    assert f" {holder.pid}:{name}" in tlog.splitlines()[-1]

    end(holder)
    code, output, tlog = run_reset(node, node.uuids[0])
    assert code == 0, output
    assert "same UUID back" in tlog.splitlines()[-1]
    assert f"reset {BUS0}: GPU {BUS0} was successfully reset. All done." in tlog

    code, output, tlog = run_reset(node, "GPU-00000000-0000-0000-0000-000000000000")
    assert code == 12 and "not found (nvidia-smi exit 6)" in tlog, output


def test_reset_gpu_sh_turns_persistence_off_when_persistenced_alone_holds_the_gpu_and_back_on_after(
        make_node: Any, holders: Any) -> None:
    """docs/reset.md, 2: nvidia-persistenced may stay; when the reset is refused with it the only holder, the
    script turns persistence mode off for that GPU, resets again, and turns it back on."""
    node = make_node(faults=[{"kind": "row_remap_pending", "gpu": 0}])
    daemon = holders(node, "nvidia-persistenced")
    code, output, tlog = run_reset(node, node.uuids[0])
    assert code == 0, output
    assert f"holders of {node.driver_dir / 'dev' / 'nvidia0'}: {daemon.pid}:nvidia-persiste" in tlog
    assert "reset refused (exit 255:" in tlog and "persistence mode is on: nvidia-smi -pm 0, then again" in tlog
    assert "persistence mode on again" in tlog and tlog.rstrip().endswith("no pending remap or retirement")
    assert node.smi("--query-gpu=persistence_mode", "--format=csv,noheader", "-i", BUS0).stdout == "Enabled\n"


def test_reset_gpu_sh_reports_persistence_it_could_not_turn_back_on(make_node: Any, holders: Any) -> None:
    """The GPU was reset, but `-pm 1` fails: the step must not pass as repaired with persistence off and nobody
    told. The script ends 15 and says what to do, in the termination log the webhook journals."""
    node = make_node()
    holders(node, "nvidia-persistenced")
    shim = node.tmp / "bin" / "nvidia-smi"
    real = shim.read_text()
    shim.write_text('#!/bin/sh\nif [ "$1" = -pm ] && [ "$2" = 1 ]; then echo "Unable to set" >&2; exit 255; fi\n'
                    + real.split("\n", 1)[1])
    code, output, tlog = run_reset(node, node.uuids[0])
    assert code == 15, output
    assert "was successfully reset" in tlog
    assert f"could not turn persistence mode back on for {node.uuids[0]} after the reset" in tlog
