"""The exporter on the real pynvml wrappers over a fake of NVML's C library, as an R535, R550 and R580 driver.

The simulator tests replace pynvml; these keep it (nvidia-ml-py's structs, struct versions, argument
conversions and error mapping all run) and fake only libnvidia-ml underneath (tests/fakes/nvml_clib).
The poller is built as the exporter builds it (exporter.cli.build_poller, with the `pynvml` module as
the backend, as `--backend auto` does).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pynvml
import pytest

from exporter.cli import build_poller
from exporter.config import parse
from exporter.device import nvml_init
from exporter.poller import RELEASE_ACK, RELEASE_REQUEST, Poller
from exporter.registry import discover
from tests.fakes.nvml_clib import DRIVERS, R550, Driver, FakeNvmlLibrary, Node, hgx_h100, installed
from tests.fakes.nvml_clib import nvml_h

BRANCHES = sorted(DRIVERS)
GPU_THREADS = [f"nvml-gpu{i}" for i in range(8)]


@dataclass
class ClibNode:
    lib: FakeNvmlLibrary
    poller: Poller

    def cycle(self) -> str:
        return self.poller.run_cycle().body.decode()


@pytest.fixture
def clib_node(tmp_path: Path) -> Iterator[Callable[..., ClibNode]]:
    """Build the exporter's poller over the fake library; every one is stopped and the library removed."""
    made: list[ClibNode] = []
    available = discover()
    stack = ExitStack()

    def build(driver: Driver, *, node: Node | None = None, fast: bool = False, args: tuple[str, ...] = ()) -> ClibNode:
        # fast: a 1 s interval and slow interval, so a test can run the slow tier again after 0.6 s.
        interval, slow = ("1s", "1s") if fast else ("5s", "30s")
        lib = stack.enter_context(installed(FakeNvmlLibrary(driver, node or hgx_h100())))
        config = parse(["--node-name", "test-node", "--state-dir", str(tmp_path / "state"), "--xid.source", "none",
                        "--xid.nvml-events", "off", "--collect-interval", interval, "--collect-interval.slow", slow,
                        "--collect-timeout", "1s", *args], available)
        built = ClibNode(lib, build_poller(config, pynvml, available, boot_id="test-boot"))  # type: ignore[arg-type]
        made.append(built)
        return built

    with stack:
        yield build
        for built in made:
            built.poller.stop()
    for built in made:
        assert built.lib.faults == []


def _unsupported(helpers: Any, text: str, gpu: str = "0") -> set[str]:
    return {s.labels["call"] for s in helpers.select(text, "gpu_nvml_unsupported", gpu=gpu)}


@pytest.mark.parametrize("branch", BRANCHES)
def test_every_collector_reads_the_node_through_pynvml(clib_node, make_node, helpers, branch):
    driver = DRIVERS[branch]
    text = clib_node(driver).cycle()
    for name in helpers.gpu_collectors():
        assert helpers.value(text, "gpu_exporter_collector_success", collector=name) == 1, name
    assert helpers.value(text, "gpu_nvml_up") == 1
    assert helpers.value(text, "gpu_devices_visible") == 8

    info = helpers.select(text, "gpu_info", gpu="3")[0].labels
    assert info["driver_version"] == driver.version
    assert info["cuda_version"] == {12020: "12.2", 12040: "12.4", 13000: "13.0"}[driver.cuda]
    assert info["model"] == "NVIDIA H100 80GB HBM3"
    assert info["pci_bus_id"] == "00000000:5D:00.0"
    assert info["uuid"] == hgx_h100().gpus[3].uuid and info["serial"] == "1653223000003"
    assert (info["mig_mode"], info["persistence_mode"]) == ("disabled", "enabled")
    assert helpers.select(text, "gpu_exporter_build_info")[0].labels["driver_version"] == driver.version

    # Values written through pynvml's own structs and buffers, in the exporter's units.
    assert helpers.value(text, "gpu_temperature_celsius", gpu="0") == 34
    assert helpers.value(text, "gpu_memory_temperature_celsius", gpu="0") == 41
    assert helpers.value(text, "gpu_temperature_threshold_celsius", gpu="0", threshold="slowdown") == 87
    assert helpers.value(text, "gpu_power_usage_watts", gpu="0") == pytest.approx(71.5)
    assert helpers.value(text, "gpu_power_limit_watts", gpu="0") == 700
    assert helpers.value(text, "gpu_clock_hertz", gpu="0", clock="sm") == 1980e6
    assert helpers.value(text, "gpu_clock_event_reason_active", gpu="0", reason="gpu_idle") == 1
    assert helpers.value(text, "gpu_memory_total_bytes", gpu="0") == 85_520_809_984  # the v2 struct's version held
    assert helpers.value(text, "gpu_memory_reserved_bytes", gpu="0") == 578_813_952
    assert helpers.value(text, "gpu_ecc_enabled", gpu="0") == 1
    assert helpers.value(text, "gpu_pcie_link_width_lanes", gpu="0") == 16
    assert helpers.value(text, "gpu_remapped_rows", gpu="0", cause="uncorrectable") == 0
    assert helpers.per_gpu(text, "gpu_nvlink_links_up") == {str(i): 18 for i in range(8)}
    assert helpers.value(text, "gpu_fabric_state", gpu="7") == 3

    # Beside the simulator's H100 node: the same families, less what a real H100 or this branch lacks.
    sim_text = make_node({"gpus": 8, "model": "H100-SXM-80GB"}).cycle()
    absent = {"gpu_retired_pages", "gpu_retired_pages_pending"}  # Hopper remaps rows, retires no pages
    if branch != "R580":
        absent.add("gpu_fabric_health")
    gpu_families = {n for n in helpers.sample_names(sim_text) if n not in helpers.CORE_FAMILIES}
    assert gpu_families - helpers.sample_names(text) == absent
    assert {"NVML_FI_DEV_RETIRED_SBE", "NVML_FI_DEV_RETIRED_DBE", "NVML_FI_DEV_RETIRED_PENDING"} <= _unsupported(
        helpers, text)


def _slow_again(node: ClibNode) -> str:
    """Run a cycle that also runs the slow tier (more than half of the 1 s interval after the last one)."""
    time.sleep(0.6)
    return node.cycle()


@pytest.mark.parametrize("branch", BRANCHES)
def test_fabric_uses_the_struct_each_branch_knows(clib_node, helpers, branch):
    node = clib_node(DRIVERS[branch], fast=True)
    node.cycle()
    text = _slow_again(node)
    assert helpers.value(text, "gpu_exporter_collector_success", collector="fabric") == 1
    assert helpers.per_gpu(text, "gpu_fabric_state") == {str(i): 3 for i in range(8)}
    assert helpers.per_gpu(text, "gpu_fabric_status") == {str(i): 0 for i in range(8)}
    fabric = [(c.name, c.detail) for c in node.lib.calls if c.thread == "nvml-gpu0" and "Fabric" in c.name]
    v2, v3 = nvml_h.FABRIC_V2, nvml_h.FABRIC_V3
    if branch == "R580":
        assert helpers.value(text, "gpu_fabric_health", gpu="0") == 0  # H100: summary NOT_SUPPORTED
        assert "nvmlGpuFabricInfo_v3" not in _unsupported(helpers, text)
        assert fabric == [("nvmlDeviceGetGpuFabricInfoV", v3)] * 2
        return
    assert helpers.select(text, "gpu_fabric_health") == []
    assert "nvmlGpuFabricInfo_v3" in _unsupported(helpers, text)
    if branch == "R550":
        # v3 refused once (ARGUMENT_VERSION_MISMATCH), then v2, remembered for the GPU.
        assert fabric == [("nvmlDeviceGetGpuFabricInfoV", v3)] + [("nvmlDeviceGetGpuFabricInfoV", v2)] * 2
    else:
        # R535: pynvml finds no nvmlDeviceGetGpuFabricInfoV symbol and never reaches C; the old call answers.
        assert fabric == [("nvmlDeviceGetGpuFabricInfo", None)] * 2


@pytest.mark.parametrize("branch", BRANCHES)
def test_nvlink_in_batches_and_c_calls_per_gpu_per_tier(clib_node, branch):
    node = clib_node(DRIVERS[branch], fast=True)
    lib = node.lib
    node.cycle()  # opens every GPU; the fabric struct version is settled
    lib.clear_calls()
    _slow_again(node)
    both, slow_calls = lib.counts(by="thread"), list(lib.calls)
    for _ in range(3):
        lib.clear_calls()
        node.cycle()  # at once: the fast tier only, unless this machine stalled past half an interval
        if not lib.counts(by="name")["nvmlDeviceGetHandleByIndex_v2"]:
            break
    fast = lib.counts(by="thread")
    for thread in GPU_THREADS:
        # Issue 15: the slow tier at most 20 NVML calls per GPU on an 18-link H100, counted at the C library.
        assert both[thread] - fast[thread] <= 20, (thread, both[thread], fast[thread])
        assert fast[thread] == 11, (thread, fast[thread])
    # NVLink's share: the link count, then one scoped batch of every link's state and counters; never a
    # link past the count the driver gave.
    reads = [c.detail for c in slow_calls if c.thread == "nvml-gpu0" and c.name == "nvmlDeviceGetFieldValues"]
    nvlink = [r for r in reads if r[0][0] in (nvml_h.FI_NVLINK_LINK_COUNT, *nvml_h.NVLINK_SCOPED)]
    assert nvlink == [((nvml_h.FI_NVLINK_LINK_COUNT, 0),),
                      tuple((fid, link) for link in range(18) for fid in (165, 161, 162, 163))]


@pytest.mark.parametrize("branch", BRANCHES)
def test_nvlink_down_errors_and_unsupported_per_link(clib_node, helpers, branch):
    node = hgx_h100()
    gpu = node.gpus[2]
    gpu.links_down.add(5)
    gpu.link_errors[(nvml_h.FI_NVLINK_ERROR_DL_REPLAY, 17)] = 7
    gpu.link_errors[(nvml_h.FI_NVLINK_ERROR_DL_CRC, 0)] = 3
    gpu.link_unsupported.add((nvml_h.FI_NVLINK_ERROR_DL_RECOVERY, 11))
    text = clib_node(DRIVERS[branch], node=node, args=("--collector.nvlink.per-link",)).cycle()
    assert helpers.value(text, "gpu_exporter_collector_success", collector="nvlink") == 1
    assert helpers.value(text, "gpu_nvlink_links_up", gpu="2") == 17
    assert helpers.value(text, "gpu_nvlink_links_down", gpu="2") == 1
    assert helpers.value(text, "gpu_nvlink_link_up", gpu="2", link="5") == 0
    assert helpers.value(text, "gpu_nvlink_errors_total", gpu="2", counter="replay") == 7
    assert helpers.value(text, "gpu_nvlink_errors_total", gpu="2", counter="crc") == 3
    assert helpers.value(text, "gpu_nvlink_link_errors_total", gpu="2", link="17", counter="replay") == 7
    # The link whose counter is NotSupported: absent, said so, and the links after it still read.
    assert helpers.select(text, "gpu_nvlink_link_errors_total", gpu="2", link="11", counter="recovery") == []
    assert "NVML_FI_DEV_NVLINK_ERROR_DL_RECOVERY[11]" in _unsupported(helpers, text, gpu="2")
    assert helpers.value(text, "gpu_nvlink_link_errors_total", gpu="2", link="12", counter="recovery") == 0


def test_a_lost_gpu_is_mapped_by_pynvml_and_reported(clib_node, helpers):
    node = hgx_h100()
    node.gpus[4].lost = True
    text = clib_node(R550, node=node).cycle()
    assert helpers.per_gpu(text, "gpu_lost") == {str(i): int(i == 4) for i in range(8)}
    assert helpers.value(text, "gpu_temperature_celsius", gpu="3") == 34


def test_a_reset_release_shuts_nvml_down_to_a_count_of_zero(clib_node, helpers, tmp_path):
    node = clib_node(R550)
    lib = node.lib
    node.cycle()
    assert lib.init_count == 1  # the poller's one nvmlInit
    request = tmp_path / "state" / RELEASE_REQUEST
    request.touch()
    text = node.cycle()
    assert helpers.value(text, "gpu_exporter_nvml_released") == 1
    assert lib.init_count == 0 and not lib.initialized
    # NVML is really down: through pynvml, any call now answers Uninitialized.
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        pynvml.nvmlDeviceGetCount()
    lib.clear_calls()
    node.cycle()
    assert lib.calls == []  # released: no NVML call while the reset runs
    request.unlink()
    text = node.cycle()
    assert lib.init_count == 1
    assert helpers.value(text, "gpu_nvml_up") == 1
    assert helpers.value(text, "gpu_temperature_celsius", gpu="0") == 34


def test_a_reset_release_lets_the_xid_event_thread_go_too(clib_node, helpers, tmp_path):
    """Issue 17: the NVML Xid event thread calls nvmlInit itself, and NVML counts inits per process: the release
    for a GPU reset frees its event set and matches its init too, so that the count reaches 0 (before, it stayed
    at 1 and `nvidia-smi -r` found the GPU held). After the reset it registers again; stopping matches its init."""
    node = clib_node(R550, args=("--xid.nvml-events", "on"))
    lib = node.lib
    node.cycle()  # starts the event thread once the GPUs are enumerated
    helpers.wait_for(lambda: lib.counts(by="name")["nvmlDeviceRegisterEvents"] == 8, 5, "Xid event registration")
    assert lib.init_count == 2
    # The poller's init says NVML_INIT_FLAG_NO_GPUS; the event thread's is pynvml.nvmlInit (flags 0).
    assert sorted(c.detail for c in lib.calls if c.name == "nvmlInitWithFlags") == [0, pynvml.NVML_INIT_FLAG_NO_GPUS]
    (tmp_path / "state" / RELEASE_REQUEST).touch()
    text = node.cycle()
    assert helpers.value(text, "gpu_exporter_nvml_released") == 1
    assert lib.init_count == 0 and not lib.initialized
    assert lib.counts(by="name")["nvmlEventSetFree"] == 1
    ack = (tmp_path / "state" / RELEASE_ACK).read_text().splitlines()
    assert ack[1] == "released: collection xid"
    lib.clear_calls()
    time.sleep(0.3)
    node.cycle()
    assert lib.calls == []  # released: neither the poller nor the event thread calls NVML while the reset runs
    (tmp_path / "state" / RELEASE_REQUEST).unlink()
    text = node.cycle()
    helpers.wait_for(lambda: lib.init_count == 2, 5, "the event thread's new nvmlInit")
    helpers.wait_for(lambda: lib.counts(by="name")["nvmlDeviceRegisterEvents"] == 8, 5, "registration again")
    assert helpers.value(text, "gpu_exporter_nvml_released") == 0
    node.poller.stop()
    assert lib.counts(by="name")["nvmlEventSetFree"] == 1  # counted since clear_calls: the one at stop
    helpers.wait_for(lambda: lib.init_count <= 1, 5, "the event thread's nvmlShutdown on stop")


def test_an_event_thread_stuck_in_nvml_holds_the_ack_back(clib_node, helpers, tmp_path):
    """An NVML user that does not let go (its event wait hangs in the driver) is named, and the reset gets no
    acknowledgement (it would find the GPU held) and nothing is let go half-way; the next cycle asks again."""
    node = clib_node(R550, args=("--xid.nvml-events", "on"))
    lib = node.lib
    node.cycle()
    helpers.wait_for(lambda: lib.counts(by="name")["nvmlDeviceRegisterEvents"] == 8, 5, "Xid event registration")
    lib.event_wait_hung.set()
    assert lib.event_wait_hanging.wait(5)  # the event thread is inside the hung call
    (tmp_path / "state" / RELEASE_REQUEST).touch()
    text = node.cycle()
    assert helpers.value(text, "gpu_exporter_nvml_released") == 0
    assert not (tmp_path / "state" / RELEASE_ACK).exists()
    assert lib.init_count == 2
    lib.event_wait_hung.clear()
    text = node.cycle()
    assert helpers.value(text, "gpu_exporter_nvml_released") == 1 and lib.init_count == 0
    assert (tmp_path / "state" / RELEASE_ACK).exists()


def test_nvml_init_with_no_gpus_flag_on_a_node_without_gpus():
    lib = FakeNvmlLibrary(R550, Node([]))
    with installed(lib):
        with pytest.raises(pynvml.NVMLError_NotFound):
            pynvml.nvmlInit()
        nvml_init(pynvml)  # type: ignore[arg-type]
        assert lib.init_count == 1
        assert pynvml.nvmlDeviceGetCount() == 0
        pynvml.nvmlShutdown()
    assert lib.faults == []


def test_the_poller_on_a_node_without_gpus_sees_zero_gpus(clib_node, helpers):
    node = clib_node(R550, node=Node([]))
    text = node.cycle()
    assert helpers.value(text, "gpu_nvml_up") == 1
    assert helpers.value(text, "gpu_devices_visible") == 0
    inits = [c.detail for c in node.lib.calls if c.name.startswith("nvmlInit")]
    assert inits == [pynvml.NVML_INIT_FLAG_NO_GPUS]
