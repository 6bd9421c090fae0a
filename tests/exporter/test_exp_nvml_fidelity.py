"""What only a real driver shows: missing functions, refused struct versions, a node without GPUs."""

from __future__ import annotations

import pynvml
import pytest

from exporter.backends.sim import SimConfig, SimulatedNvml
from exporter.device import UNSUPPORTED, Device, nvml_init


class Driver:
    """The simulator seen through an older driver: `missing` functions are gone, `refuses` struct versions.

    The functions are removed at the Python level, as nvidia-ml-py without them (or a backend without them)
    would present them; the C-level view of the same drivers is tests/fakes/nvml_clib.
    """

    def __init__(self, sim: SimulatedNvml, *, missing: frozenset[str] = frozenset(),
                 refuses: frozenset[int] = frozenset()) -> None:
        self._sim, self._missing, self._refuses = sim, missing, refuses

    def __getattr__(self, name: str):
        if name in self._missing:
            raise AttributeError(name)
        return getattr(self._sim, name)

    def nvmlDeviceGetGpuFabricInfoV(self, handle, ref):
        if "nvmlDeviceGetGpuFabricInfoV" in self._missing:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        if ref._obj.version in self._refuses:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        return self._sim.nvmlDeviceGetGpuFabricInfoV(handle, ref)

    def nvmlDeviceGetGpuFabricInfo(self, handle, ref):
        info = ref._obj
        assert not hasattr(info, "version"), "the old call takes the unversioned struct"
        self._sim._gpu(handle, "nvmlDeviceGetGpuFabricInfo")
        info.state, info.status = pynvml.NVML_GPU_FABRIC_STATE_COMPLETED, pynvml.NVML_SUCCESS
        return pynvml.NVML_SUCCESS


R550 = {"refuses": frozenset({pynvml.nvmlGpuFabricInfo_v3})}
R535 = {"missing": frozenset({"nvmlDeviceGetGpuFabricInfoV"})}


@pytest.mark.parametrize("driver", [R550, R535], ids=["R550", "R535"])
def test_fabric_falls_back_to_the_struct_the_driver_knows(make_node, helpers, driver):
    node = make_node({"gpus": 2}, collectors=["fabric"])
    node.poller.nvml = Driver(node.sim, **driver)
    for _ in range(2):  # the second cycle starts from the version that answered
        text = node.cycle(advance=30)
        assert helpers.value(text, "gpu_exporter_collector_success", collector="fabric") == 1
        assert helpers.per_gpu(text, "gpu_fabric_state") == {"0": 3, "1": 3}
        assert helpers.per_gpu(text, "gpu_fabric_status") == {"0": 0, "1": 0}
        # No health summary before the v3 struct, and the series says why.
        assert helpers.select(text, "gpu_fabric_health") == []
        calls = {s.labels["call"] for s in helpers.select(text, "gpu_nvml_unsupported", gpu="0")}
        assert calls == {"nvmlGpuFabricInfo_v3"}


def test_fabric_on_r580_reads_the_v3_struct(make_node, helpers):
    node = make_node({"gpus": 1}, collectors=["fabric"])
    node.poller.nvml = Driver(node.sim)
    text = node.cycle()
    assert helpers.value(text, "gpu_fabric_health", gpu="0") == 0
    assert helpers.select(text, "gpu_nvml_unsupported") == []


def test_a_function_gone_from_the_bindings_reads_as_unsupported(make_node, helpers):
    node = make_node({"gpus": 1}, collectors=["remapped_rows", "pcie"])
    node.poller.nvml = Driver(node.sim, missing=frozenset({"nvmlDeviceGetRemappedRows",
                                                          "nvmlDeviceGetPcieReplayCounter"}))
    text = node.cycle()
    for collector in ("remapped_rows", "pcie"):
        assert helpers.value(text, "gpu_exporter_collector_success", collector=collector) == 1, collector
    calls = {s.labels["call"] for s in helpers.select(text, "gpu_nvml_unsupported", gpu="0")}
    assert {"nvmlDeviceGetRemappedRows", "nvmlDeviceGetPcieReplayCounter"} <= calls
    assert helpers.value(text, "gpu_pcie_link_width_lanes", gpu="0") == 16


def test_a_missing_function_raises_as_nvml_does_from_call():
    sim = SimulatedNvml(SimConfig(gpus=1))
    sim.nvmlInit()
    dev = Device(Driver(sim, missing=frozenset({"nvmlDeviceGetSerial"})), 0)
    dev.open()
    with pytest.raises(pynvml.NVMLError_FunctionNotFound):
        dev.call("nvmlDeviceGetSerial")
    assert dev.current_call is None
    dev.begin("x")
    assert dev.optional("nvmlDeviceGetSerial") is UNSUPPORTED
    dev.end()
    assert dev.unsupported == {"nvmlDeviceGetSerial"}


def test_a_refused_struct_version_reads_as_unsupported():
    sim = SimulatedNvml(SimConfig(gpus=1))
    sim.nvmlInit()

    class Refusing:
        def __getattr__(self, name):
            return getattr(sim, name)

        def nvmlDeviceGetMemoryInfo(self, handle, version=None):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)

    dev = Device(Refusing(), 0)
    dev.open()
    assert dev.optional("nvmlDeviceGetMemoryInfo", pynvml.nvmlMemory_v2) is UNSUPPORTED


def test_nvml_init_on_a_node_without_gpus():
    sim = SimulatedNvml(SimConfig(gpus=0))
    # NVML refuses to start without a GPU unless told not to; the exporter tells it.
    with pytest.raises(pynvml.NVMLError):
        sim.nvmlInit()
    nvml_init(sim)
    assert sim.nvmlDeviceGetCount() == 0


def test_nvml_init_without_init_with_flags_uses_nvml_init():
    calls = []

    class Old:
        def nvmlInit(self):
            calls.append("nvmlInit")

    nvml_init(Old())  # type: ignore[arg-type]
    assert calls == ["nvmlInit"]
