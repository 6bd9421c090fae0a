"""A simulated GPU fleet that speaks pynvml.

Faithful to nvidia-ml-py 13.x (`pynvml`): the same function names and argument order, the same
return types (ints in NVML's own units: mW, mJ, MHz, bytes; pynvml's ctypes structs for memory,
PCI, utilisation, field values and fabric info) and the same exceptions (`pynvml.NVMLError`
subclasses, raised through `pynvml.NVMLError(code)` exactly as the real binding does). It is not
faithful to timing, to the driver's sampling periods, or to per-SKU support beyond the few
models below. Values are deterministic for a seed and a clock, so golden files can pin them.

A fault timeline (YAML, `--sim-config`) turns healthy GPUs into sick ones at given times. With `driver_dir` the
simulator is one process on a simulated node it shares with others (sim_node.py): the fake nvidia-smi
(gpu_health_stack/nvidia_smi.py) resets its GPUs and sets their persistence mode there.
"""

from __future__ import annotations

import dataclasses
import math
import random
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pynvml

from gpu_health_common.durations import parse_duration
from gpu_health_common.validate import read_yaml

from ..errors import ConfigError
from .sim_events import SimEvents
from .sim_node import SimNode, first_at_or_after, last_at_or_before
from .sim_params import check_params, check_top


@dataclass(frozen=True, slots=True)
class GpuModel:
    """What differs between the simulated SKUs."""

    name: str
    memory_bytes: int
    reserved_bytes: int
    nvlinks: int
    pcie_gen: int
    pcie_width: int
    power_limit_mw: int
    idle_power_mw: int
    max_sm_mhz: int
    mem_mhz: int
    slowdown_c: int
    shutdown_c: int
    vbios: str
    fabric: bool
    hbm: bool
    pci_device_id: int
    compute_capability: tuple[int, int] = (9, 0)


MODELS: Mapping[str, GpuModel] = {
    "H100-SXM-80GB": GpuModel(
        "NVIDIA H100 80GB HBM3", 85520809984, 567279616, 18, 5, 16, 700_000, 72_000, 1980, 2619, 90, 92,
        "96.00.89.00.01", True, True, 0x233010DE,
    ),
    "H200-SXM-141GB": GpuModel(
        "NVIDIA H200", 150754820096, 595591168, 18, 5, 16, 700_000, 76_000, 1980, 3201, 90, 92,
        "96.00.A5.00.01", True, True, 0x233510DE,
    ),
    "A100-SXM4-80GB": GpuModel(
        "NVIDIA A100-SXM4-80GB", 85899345920, 531628032, 12, 4, 16, 400_000, 61_000, 1410, 1593, 89, 92,
        "92.00.45.00.06", False, True, 0x20B210DE, compute_capability=(8, 0),
    ),
    "L4": GpuModel(
        "NVIDIA L4", 24152899584, 352321536, 0, 4, 16, 72_000, 16_000, 2040, 6251, 87, 90,
        "95.04.29.00.06", False, False, 0x27B810DE, compute_capability=(8, 9),
    ),
}
DEFAULT_MODEL = "H100-SXM-80GB"
# HGX H100 baseboards put their eight GPUs on these buses.
_BUSES = (0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB)

_REASONS = {
    "gpu_idle": pynvml.nvmlClocksEventReasonGpuIdle,
    "applications_clocks_setting": pynvml.nvmlClocksEventReasonApplicationsClocksSetting,
    "sw_power_cap": pynvml.nvmlClocksEventReasonSwPowerCap,
    "hw_slowdown": pynvml.nvmlClocksEventReasonHwSlowdown,
    "sync_boost": pynvml.nvmlClocksEventReasonSyncBoost,
    "sw_thermal_slowdown": pynvml.nvmlClocksEventReasonSwThermalSlowdown,
    "hw_thermal_slowdown": pynvml.nvmlClocksEventReasonHwThermalSlowdown,
    "hw_power_brake_slowdown": pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown,
}
_NVLINK_COUNTERS = {
    "replay": pynvml.NVML_NVLINK_ERROR_DL_REPLAY,
    "recovery": pynvml.NVML_NVLINK_ERROR_DL_RECOVERY,
    "crc_flit": pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT,
    "crc_data": pynvml.NVML_NVLINK_ERROR_DL_CRC_DATA,
}
# Field ids answered per link (scopeId = link), as nvml.h documents them.
_NVLINK_SCOPED = frozenset({
    pynvml.NVML_FI_DEV_NVLINK_GET_STATE,
    pynvml.NVML_FI_DEV_NVLINK_ERROR_DL_REPLAY,
    pynvml.NVML_FI_DEV_NVLINK_ERROR_DL_RECOVERY,
    pynvml.NVML_FI_DEV_NVLINK_ERROR_DL_CRC,
})
_FABRIC_STATES = {"not_started": 1, "in_progress": 2, "completed": 3}

# Each fault kind and the keys it takes besides at/until/gpu/kind.
_FAULT_KEYS: Mapping[str, frozenset[str]] = {
    "temperature_ramp": frozenset({"to", "over"}),
    "ecc_corrected": frozenset({"count", "rate"}),
    "ecc_uncorrectable": frozenset({"count", "rate"}),
    "row_remap_pending": frozenset(),
    "row_remap_failure": frozenset(),
    "retired_pages": frozenset({"cause", "count", "pending"}),
    "nvlink_errors": frozenset({"link", "counter", "count", "rate"}),
    "nvlink_down": frozenset({"link"}),
    "pcie_replays": frozenset({"count", "rate"}),
    "pcie_downgrade": frozenset({"width", "generation"}),
    "throttle": frozenset({"reasons"}),
    "gpu_lost": frozenset({"remove"}),
    "hang": frozenset({"call"}),
    "not_supported": frozenset({"call"}),
    "nvml_error": frozenset({"call", "code"}),
    "mig": frozenset({"enabled"}),
    "fabric": frozenset({"state"}),
    "utilization": frozenset({"percent", "memory_percent"}),
}
_COMMON_KEYS = frozenset({"at", "until", "gpu", "kind"})
# What a GPU reset (`nvidia-smi -r` on a driver_dir node) ends: a pending row remap is applied by the reset. A lost
# GPU, a link down, a failed remap, pages waiting for retirement (a reboot applies them) and the rest outlast it;
# the volatile ECC counters restart at zero (see _ecc).
_CLEARED_BY_RESET = frozenset({"row_remap_pending"})


@dataclass(frozen=True, slots=True)
class Fault:
    """One entry of the timeline: active on `gpu` from `at` until `until` seconds after start."""

    kind: str
    gpu: int
    at: float
    until: float | None
    params: Mapping[str, Any]

    def active(self, t: float) -> bool:
        return t >= self.at and (self.until is None or t < self.until)

    def amount(self, t: float) -> int:
        """A counter fault's contribution at time t: a step of `count` plus `rate` per second."""
        if t < self.at:
            return 0
        end = t if self.until is None else min(t, self.until)
        return int(self.params.get("count", 0 if "rate" in self.params else 1)) + int(
            float(self.params.get("rate", 0)) * (end - self.at)
        )


@dataclass(frozen=True, slots=True)
class SimConfig:
    """The simulated node: how many GPUs of which model, and what goes wrong when."""

    gpus: int = 8
    model: str = DEFAULT_MODEL
    seed: int = 0
    driver_version: str = "550.90.07"
    cuda_version: int = 12040
    faults: tuple[Fault, ...] = ()
    # A directory shared with other processes (device files, boot time, resets, persistence): sim_node.py.
    driver_dir: str | None = None


def load_sim_config(path: str) -> SimConfig:
    """Parse and validate a --sim-config file; errors name the file and the key."""
    raw = read_yaml(path, f"--sim-config {path}", error=ConfigError) or {}
    try:
        return sim_config_from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"--sim-config {path}: {exc}") from exc


def sim_config_from_dict(raw: Any) -> SimConfig:
    if not isinstance(raw, dict):
        raise ConfigError("top level must be a mapping")
    unknown = set(raw) - {"gpus", "model", "seed", "driver_version", "cuda_version", "faults", "driver_dir"}
    if unknown:
        raise ConfigError(f"unknown key {sorted(unknown)[0]}")
    gpus = raw.get("gpus", 8)
    if not isinstance(gpus, int) or isinstance(gpus, bool) or not 0 <= gpus <= 1024:
        raise ConfigError(f"gpus: expected an integer from 0 to 1024, got {gpus!r}")
    model = raw.get("model", DEFAULT_MODEL)
    if model not in MODELS:
        raise ConfigError(f"model: unknown model {model!r}; choose one of {', '.join(MODELS)}")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"seed: expected an integer, got {seed!r}")
    faults_raw = raw.get("faults") or []
    if not isinstance(faults_raw, list):
        raise ConfigError("faults: expected a list")
    faults = tuple(_parse_fault(f, i, gpus) for i, f in enumerate(faults_raw))
    check_top(raw)
    return SimConfig(
        gpus=gpus,
        model=model,
        seed=seed,
        driver_version=str(raw.get("driver_version", "550.90.07")),
        cuda_version=int(raw.get("cuda_version", 12040)),
        faults=faults,
        driver_dir=raw.get("driver_dir"),
    )


def _parse_fault(raw: Any, i: int, gpus: int) -> Fault:
    where = f"faults[{i}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping")
    kind = raw.get("kind")
    if kind not in _FAULT_KEYS:
        raise ConfigError(f"{where}.kind: expected one of {', '.join(_FAULT_KEYS)}, got {kind!r}")
    unknown = set(raw) - _COMMON_KEYS - _FAULT_KEYS[kind]
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]} for kind {kind}")
    gpu = raw.get("gpu", 0)
    if not isinstance(gpu, int) or isinstance(gpu, bool) or not 0 <= gpu < max(gpus, 1):
        raise ConfigError(f"{where}.gpu: expected a GPU index below {gpus}, got {gpu!r}")
    params = {k: v for k, v in raw.items() if k not in _COMMON_KEYS}
    check_params(params, where)
    if kind == "temperature_ramp":
        params["over"] = parse_duration(params.get("over", 0), f"{where}.over", error=ConfigError)
        params["to"] = float(params.get("to", 95))
    if kind == "nvlink_errors" and params.get("counter", "crc_flit") not in _NVLINK_COUNTERS:
        raise ConfigError(f"{where}.counter: expected one of {', '.join(_NVLINK_COUNTERS)}")
    if kind == "throttle":
        bad = [r for r in params.get("reasons", []) if r not in _REASONS]
        if bad:
            raise ConfigError(f"{where}.reasons: unknown reason {bad[0]!r}; choose from {', '.join(_REASONS)}")
    if kind == "fabric" and params.get("state") not in _FABRIC_STATES:
        raise ConfigError(f"{where}.state: expected one of {', '.join(_FABRIC_STATES)}")
    if kind in ("hang", "not_supported", "nvml_error") and not str(params.get("call", "")).startswith("nvml"):
        raise ConfigError(f"{where}.call: expected a pynvml function name such as nvmlDeviceGetPowerUsage")
    until = raw.get("until")
    return Fault(
        kind=kind,
        gpu=gpu,
        at=parse_duration(raw.get("at", 0), f"{where}.at", error=ConfigError),
        until=None if until is None else parse_duration(until, f"{where}.until", error=ConfigError),
        params=params,
    )


@dataclass(frozen=True, slots=True)
class SimHandle:
    """What nvmlDeviceGetHandleByIndex returns: opaque to callers, as the real c_nvmlDevice_t is."""

    index: int


@dataclass
class _Gpu:
    index: int
    uuid: str
    serial: str
    bus: int
    base_temp: float
    phase: float
    util: int
    faults: list[Fault] = field(default_factory=list)  # the timeline's, cut short by the resets below
    timeline: list[Fault] = field(default_factory=list)
    resets: tuple[float, ...] = ()  # seconds since boot (driver_dir only)


class SimulatedNvml:
    """pynvml for N simulated GPUs. Thread-safe: the exporter calls it from one thread per GPU.

    Init is counted as NVML counts it: each nvmlInit adds one, each nvmlShutdown takes one away, and calls answer
    UNINITIALIZED only while the count is 0. A shutdown past the count is no error (nvml.h: "No error will be
    reported if this is called more times than init"; pynvml passes that success through and floors its own count
    at 0), so the count stays 0.

    With `driver_dir` (sim_node.py) the simulator is one process on a shared simulated node: while initialised it
    holds the device files open, fault times count from the node's boot, resets done by the fake nvidia-smi end
    the faults a reset clears, persistence mode is the node's, and the event API (sim_events.py) exists. Without
    it the event API is absent, as before, so the exporter's Xid event thread stays off.
    """

    def __init__(self, config: SimConfig | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or SimConfig()
        self.model = MODELS[self.config.model]
        self._clock = clock
        self._start = clock()
        self._init_count = 0
        self._init_lock = threading.Lock()
        self._release = threading.Event()
        self.node: SimNode | None = None
        if self.config.driver_dir is not None:
            self.node = SimNode(self.config.driver_dir, self.config.gpus, nvswitch=self.model.fabric)
            # Fault times count from the node's boot, so that every process on the node sees a fault at once.
            self._start -= time.time() - self.node.boot
            # Device files left open by an object nobody shut down are closed when it is collected.
            weakref.finalize(self, self.node.close_devices)
            events = SimEvents(self)
            self.nvmlEventSetCreate = events.nvmlEventSetCreate
            self.nvmlDeviceGetSupportedEventTypes = events.nvmlDeviceGetSupportedEventTypes
            self.nvmlDeviceRegisterEvents = events.nvmlDeviceRegisterEvents
            self.nvmlEventSetWait_v2 = events.nvmlEventSetWait_v2
            self.nvmlEventSetFree = events.nvmlEventSetFree
        rng = random.Random(self.config.seed)
        self._gpus = []
        for i in range(self.config.gpus):
            uuid = "GPU-%08x-%04x-%04x-%04x-%012x" % (
                rng.getrandbits(32), rng.getrandbits(16), rng.getrandbits(16), rng.getrandbits(16), rng.getrandbits(48)
            )
            gpu = _Gpu(
                index=i,
                uuid=uuid,
                serial=str(1650923000000 + rng.randrange(100000)),
                bus=_BUSES[i] if i < len(_BUSES) else 0x100 + i,
                base_temp=32 + rng.random() * 6,
                phase=rng.random() * math.tau,
                util=rng.randrange(0, 100),
            )
            gpu.timeline = gpu.faults = [f for f in self.config.faults if f.gpu == i]
            self._gpus.append(gpu)

    # --- controls for tests and demos (not part of pynvml) ---------------------------------

    def elapsed(self) -> float:
        return self._clock() - self._start

    def release_hangs(self) -> None:
        """Let every simulated hung call return (a test's way of ending a hang early)."""
        self._release.set()

    @property
    def init_count(self) -> int:
        """nvmlInit calls not yet matched by nvmlShutdown."""
        return self._init_count

    @property
    def _initialized(self) -> bool:
        return self._init_count > 0

    def is_lost(self, index: int) -> bool:
        """Whether GPU `index` has fallen off the bus now (for the event wait and the fake nvidia-smi)."""
        return bool(self._active(self._gpus[index], "gpu_lost"))

    def _sync_resets(self, gpu: _Gpu) -> None:
        """Cut the faults a reset clears short at the first reset after they began (cheap: sim_node caches)."""
        if self.node is None:
            return
        resets = self.node.resets(gpu.uuid)
        if resets != gpu.resets:
            gpu.faults = [_cut_by_reset(f, resets) for f in gpu.timeline]
            gpu.resets = resets

    # --- helpers -------------------------------------------------------------------------

    def _active(self, gpu: _Gpu, kind: str) -> list[Fault]:
        if not gpu.faults:
            return []
        t = self.elapsed()
        return [f for f in gpu.faults if f.kind == kind and f.active(t)]

    def _total(self, gpu: _Gpu, kind: str, t: float | None = None, **match: Any) -> int:
        if not gpu.faults:
            return 0
        t = self.elapsed() if t is None else t
        return sum(
            f.amount(t)
            for f in gpu.faults
            if f.kind == kind and all(f.params.get(k, d) == v for k, (v, d) in match.items())
        )

    def _gpu(self, handle: SimHandle, call: str) -> _Gpu:
        if not self._initialized:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        if not isinstance(handle, SimHandle) or handle.index >= len(self._gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        gpu = self._gpus[handle.index]
        self._sync_resets(gpu)
        if not gpu.faults:
            return gpu
        if self._active(gpu, "gpu_lost"):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        for f in self._active(gpu, "hang"):
            if f.params.get("call") == call:
                # A hung driver call blocks its caller; a real one cannot be interrupted either.
                remaining = None if f.until is None else f.until - self.elapsed()
                self._release.wait(remaining)
        for f in self._active(gpu, "not_supported"):
            if f.params.get("call") == call:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        for f in self._active(gpu, "nvml_error"):
            if f.params.get("call") == call:
                raise pynvml.NVMLError(int(f.params.get("code", pynvml.NVML_ERROR_UNKNOWN)))
        return gpu

    def _busy(self, gpu: _Gpu) -> float:
        """Utilisation 0..1, steady per GPU with a slow wobble, overridable by a fault."""
        for f in self._active(gpu, "utilization"):
            return float(f.params.get("percent", 100)) / 100
        return min(1.0, max(0.0, gpu.util / 100 + 0.05 * math.sin(self.elapsed() / 47 + gpu.phase)))

    # --- system ------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self.nvmlInitWithFlags(0)

    def nvmlInitWithFlags(self, flags: int) -> None:
        # NVML refuses to initialise on a node where it finds no GPU unless told not to (nvml.h:
        # NVML_INIT_FLAG_NO_GPUS "Don't fail nvmlInit() when no GPUs are found"). The code it fails
        # with is not documented; NOT_FOUND stands for it here.
        if not self.config.gpus and not flags & pynvml.NVML_INIT_FLAG_NO_GPUS:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        with self._init_lock:
            self._init_count += 1
            if self._init_count == 1 and self.node is not None:
                self.node.open_devices()

    def nvmlShutdown(self) -> None:
        with self._init_lock:
            if not self._init_count:
                return  # more shutdowns than inits: no error, as NVML documents
            self._init_count -= 1
            if not self._init_count and self.node is not None:
                self.node.close_devices()

    def nvmlSystemGetDriverVersion(self) -> str:
        return self.config.driver_version

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return self.config.cuda_version

    def nvmlDeviceGetCount(self) -> int:
        if not self._initialized:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        # A GPU that fell off the bus and out of PCI is not enumerated any more.
        return sum(1 for g in self._gpus if not any(f.params.get("remove") for f in self._active(g, "gpu_lost")))

    def nvmlDeviceGetHandleByIndex(self, index: int) -> SimHandle:
        if not self._initialized:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        visible = [g for g in self._gpus if not any(f.params.get("remove") for f in self._active(g, "gpu_lost"))]
        if not 0 <= index < len(visible):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        handle = SimHandle(visible[index].index)
        self._gpu(handle, "nvmlDeviceGetHandleByIndex")
        return handle

    def nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> SimHandle:
        want = uuid.decode() if isinstance(uuid, bytes) else uuid
        return self._handle_where(lambda g: g.uuid == want, "nvmlDeviceGetHandleByUUID")

    def nvmlDeviceGetHandleByPciBusId_v2(self, pciBusId: str | bytes) -> SimHandle:
        want = (pciBusId.decode() if isinstance(pciBusId, bytes) else pciBusId).upper()
        # NVML takes the domain in 8 or 4 digits, or none ("18:00.0").
        return self._handle_where(lambda g: want in _bus_ids(g.bus), "nvmlDeviceGetHandleByPciBusId_v2")

    def nvmlDeviceGetHandleByPciBusId(self, pciBusId: str | bytes) -> SimHandle:
        return self.nvmlDeviceGetHandleByPciBusId_v2(pciBusId)

    def _handle_where(self, match: Callable[[_Gpu], bool], call: str) -> SimHandle:
        """The lookups answer for the GPU asked for; a lost one is GPU_IS_LOST (through _gpu), a stranger NOT_FOUND."""
        if not self._initialized:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        gpu = next((g for g in self._gpus if match(g)), None)
        if gpu is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        handle = SimHandle(gpu.index)
        self._gpu(handle, call)
        return handle

    # --- identity ------------------------------------------------------------------------

    def nvmlDeviceGetUUID(self, handle: SimHandle) -> str:
        return self._gpu(handle, "nvmlDeviceGetUUID").uuid

    def nvmlDeviceGetName(self, handle: SimHandle) -> str:
        self._gpu(handle, "nvmlDeviceGetName")
        return self.model.name

    def nvmlDeviceGetSerial(self, handle: SimHandle) -> str:
        return self._gpu(handle, "nvmlDeviceGetSerial").serial

    def nvmlDeviceGetIndex(self, handle: SimHandle) -> int:
        return self._gpu(handle, "nvmlDeviceGetIndex").index

    def nvmlDeviceGetMinorNumber(self, handle: SimHandle) -> int:
        # /dev/nvidia<minor>: the driver numbers them in probe order, which is the index here.
        return self._gpu(handle, "nvmlDeviceGetMinorNumber").index

    def nvmlDeviceGetCudaComputeCapability(self, handle: SimHandle) -> tuple[int, int]:
        self._gpu(handle, "nvmlDeviceGetCudaComputeCapability")
        return self.model.compute_capability

    def nvmlDeviceGetPciInfo_v3(self, handle: SimHandle) -> Any:
        gpu = self._gpu(handle, "nvmlDeviceGetPciInfo_v3")
        info = pynvml.nvmlPciInfo_t()
        info.domain, info.bus, info.device = 0, gpu.bus, 0
        info.pciDeviceId = self.model.pci_device_id
        info.busId = b"00000000:%02X:00.0" % gpu.bus
        info.busIdLegacy = b"0000:%02X:00.0" % gpu.bus
        return info

    def nvmlDeviceGetVbiosVersion(self, handle: SimHandle) -> str:
        self._gpu(handle, "nvmlDeviceGetVbiosVersion")
        return self.model.vbios

    def nvmlDeviceGetMigMode(self, handle: SimHandle) -> list[int]:
        gpu = self._gpu(handle, "nvmlDeviceGetMigMode")
        if self.model.name == "NVIDIA L4":
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        on = any(f.params.get("enabled", True) for f in self._active(gpu, "mig"))
        return [int(on), int(on)]

    def nvmlDeviceGetPersistenceMode(self, handle: SimHandle) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetPersistenceMode")
        if self.node is not None and not self.node.persistence(gpu.uuid):
            return pynvml.NVML_FEATURE_DISABLED
        return pynvml.NVML_FEATURE_ENABLED

    # --- thermal and power -------------------------------------------------------------

    def _temperature(self, gpu: _Gpu) -> float:
        temp = gpu.base_temp + 20 * self._busy(gpu)
        t = self.elapsed()
        for f in self._active(gpu, "temperature_ramp"):
            over = float(f.params["over"])
            frac = 1.0 if over <= 0 else min(1.0, (t - f.at) / over)
            temp = temp + (float(f.params["to"]) - temp) * frac
        return temp

    def nvmlDeviceGetTemperature(self, handle: SimHandle, sensor: int) -> int:
        return int(self._temperature(self._gpu(handle, "nvmlDeviceGetTemperature")))

    def nvmlDeviceGetTemperatureThreshold(self, handle: SimHandle, threshold: int) -> int:
        self._gpu(handle, "nvmlDeviceGetTemperatureThreshold")
        thresholds = {
            pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN: self.model.shutdown_c,
            pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN: self.model.slowdown_c,
        }
        if threshold not in thresholds:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return thresholds[threshold]

    def nvmlDeviceGetPowerUsage(self, handle: SimHandle) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetPowerUsage")
        return self._power_mw(gpu)

    def _power_mw(self, gpu: _Gpu) -> int:
        span = self.model.power_limit_mw * 0.9 - self.model.idle_power_mw
        return int(self.model.idle_power_mw + span * self._busy(gpu))

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: SimHandle) -> int:
        self._gpu(handle, "nvmlDeviceGetEnforcedPowerLimit")
        return self.model.power_limit_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: SimHandle) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetTotalEnergyConsumption")
        # mJ since driver load: a day's worth before we started, then the current draw integrated.
        return int(86400 * self.model.idle_power_mw + self._power_mw(gpu) * self.elapsed()) + gpu.index * 1000

    # --- utilisation, memory, clocks -------------------------------------------------------

    def nvmlDeviceGetUtilizationRates(self, handle: SimHandle) -> Any:
        gpu = self._gpu(handle, "nvmlDeviceGetUtilizationRates")
        util = pynvml.c_nvmlUtilization_t()
        util.gpu = int(100 * self._busy(gpu))
        util.memory = int(60 * self._busy(gpu))
        for f in self._active(gpu, "utilization"):
            util.memory = int(f.params.get("memory_percent", util.memory))
        return util

    def nvmlDeviceGetMemoryInfo(self, handle: SimHandle, version: int | None = None) -> Any:
        gpu = self._gpu(handle, "nvmlDeviceGetMemoryInfo")
        mem = pynvml.c_nvmlMemory_v2_t() if version else pynvml.c_nvmlMemory_t()
        if version:
            mem.version = version
            mem.reserved = self.model.reserved_bytes
        mem.total = self.model.memory_bytes
        mem.used = int((self.model.memory_bytes - self.model.reserved_bytes) * self._busy(gpu) * 0.9)
        mem.free = mem.total - mem.used - (self.model.reserved_bytes if version else 0)
        return mem

    def nvmlDeviceGetClockInfo(self, handle: SimHandle, clock: int) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetClockInfo")
        if clock == pynvml.NVML_CLOCK_MEM:
            return self.model.mem_mhz
        sm = int(345 + (self.model.max_sm_mhz - 345) * self._busy(gpu))
        if self._active(gpu, "throttle"):
            sm = sm // 2
        return sm

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: SimHandle) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetCurrentClocksEventReasons")
        mask = pynvml.nvmlClocksEventReasonGpuIdle if self._busy(gpu) < 0.05 else 0
        for f in self._active(gpu, "throttle"):
            for reason in f.params.get("reasons", ["hw_thermal_slowdown"]):
                mask |= _REASONS[reason]
        return mask

    def nvmlDeviceGetPerformanceState(self, handle: SimHandle) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetPerformanceState")
        return 0 if self._busy(gpu) >= 0.05 else 8

    # --- memory errors -----------------------------------------------------------------

    def nvmlDeviceGetEccMode(self, handle: SimHandle) -> list[int]:
        self._gpu(handle, "nvmlDeviceGetEccMode")
        return [pynvml.NVML_FEATURE_ENABLED, pynvml.NVML_FEATURE_ENABLED]

    def nvmlDeviceGetTotalEccErrors(self, handle: SimHandle, error_type: int, counter_type: int) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetTotalEccErrors")
        return self._ecc(gpu, error_type, counter_type)

    def _ecc(self, gpu: _Gpu, error_type: int, counter_type: int) -> int:
        kind = "ecc_corrected" if error_type == pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED else "ecc_uncorrectable"
        # Aggregate counts persist in the InfoROM across driver reloads, so they start above zero.
        history = 3 * gpu.index if counter_type == pynvml.NVML_AGGREGATE_ECC and kind == "ecc_corrected" else 0
        total = self._total(gpu, kind)
        if counter_type == pynvml.NVML_VOLATILE_ECC and gpu.resets:
            # Volatile counts are since the GPU was last initialised, which a reset does again.
            reset = last_at_or_before(gpu.resets, self.elapsed())
            if reset is not None:
                total -= self._total(gpu, kind, reset)
        return history + total

    def nvmlDeviceGetRetiredPages(self, handle: SimHandle, cause: int) -> list[int]:
        gpu = self._gpu(handle, "nvmlDeviceGetRetiredPages")
        name = "double_bit" if cause == pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR else "single_bit"
        count = self._total(gpu, "retired_pages", cause=(name, "double_bit"))
        return [0x7FFFA8000 + 0x1000 * i for i in range(count)]

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: SimHandle) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetRetiredPagesPendingStatus")
        return int(any(f.params.get("pending", True) for f in self._active(gpu, "retired_pages")))

    def nvmlDeviceGetRemappedRows(self, handle: SimHandle) -> tuple[int, int, int, int]:
        gpu = self._gpu(handle, "nvmlDeviceGetRemappedRows")
        if self.model.name != "NVIDIA L4" and any(self.nvmlDeviceGetMigMode(handle)):
            # nvml.h: "On MIG-enabled GPUs with active instances, querying the number of remapped rows is not supported"
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        pending = bool(self._active(gpu, "row_remap_pending"))
        failed = bool(self._active(gpu, "row_remap_failure"))
        uncorrectable = self._total(gpu, "row_remap_pending") + self._total(gpu, "row_remap_failure")
        return (gpu.index % 2, uncorrectable, int(pending), int(failed))

    # --- interconnects -----------------------------------------------------------------

    def nvmlDeviceGetNvLinkState(self, handle: SimHandle, link: int) -> int:
        gpu = self._nvlink(handle, link, "nvmlDeviceGetNvLinkState")
        down = any(f.params.get("link", 0) == link for f in self._active(gpu, "nvlink_down"))
        return pynvml.NVML_FEATURE_DISABLED if down else pynvml.NVML_FEATURE_ENABLED

    def nvmlDeviceGetNvLinkErrorCounter(self, handle: SimHandle, link: int, counter: int) -> int:
        gpu = self._nvlink(handle, link, "nvmlDeviceGetNvLinkErrorCounter")
        name = next(k for k, v in _NVLINK_COUNTERS.items() if v == counter)
        return self._total(gpu, "nvlink_errors", link=(link, 0), counter=(name, "crc_flit"))

    def _nvlink(self, handle: SimHandle, link: int, call: str) -> _Gpu:
        gpu = self._gpu(handle, call)
        if not 0 <= link < self.model.nvlinks:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED if link == 0 else pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return gpu

    def nvmlDeviceGetPcieReplayCounter(self, handle: SimHandle) -> int:
        return self._total(self._gpu(handle, "nvmlDeviceGetPcieReplayCounter"), "pcie_replays")

    def _pcie(self, handle: SimHandle, call: str, key: str, default: int) -> int:
        gpu = self._gpu(handle, call)
        for f in self._active(gpu, "pcie_downgrade"):
            return int(f.params.get(key, default))
        return default

    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle: SimHandle) -> int:
        return self._pcie(handle, "nvmlDeviceGetCurrPcieLinkGeneration", "generation", self.model.pcie_gen)

    def nvmlDeviceGetCurrPcieLinkWidth(self, handle: SimHandle) -> int:
        return self._pcie(handle, "nvmlDeviceGetCurrPcieLinkWidth", "width", self.model.pcie_width)

    def nvmlDeviceGetMaxPcieLinkGeneration(self, handle: SimHandle) -> int:
        self._gpu(handle, "nvmlDeviceGetMaxPcieLinkGeneration")
        return self.model.pcie_gen

    def nvmlDeviceGetMaxPcieLinkWidth(self, handle: SimHandle) -> int:
        self._gpu(handle, "nvmlDeviceGetMaxPcieLinkWidth")
        return self.model.pcie_width

    def nvmlDeviceGetGpuFabricInfoV(self, handle: SimHandle, ref: Any) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetGpuFabricInfoV")
        # Like the C function, this takes a pointer (ctypes.byref) to a versioned struct.
        info = ref._obj
        if not self.model.fabric:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        state = _FABRIC_STATES["completed"]
        for f in self._active(gpu, "fabric"):
            state = _FABRIC_STATES[f.params["state"]]
        info.status = pynvml.NVML_SUCCESS
        info.state = state
        info.cliqueId = 0
        info.healthMask = 0
        if hasattr(info, "healthSummary"):
            # H100 reports the summary as NOT_SUPPORTED (gpud); later parts fill it in.
            info.healthSummary = 0
        return pynvml.NVML_SUCCESS

    # --- batched fields ----------------------------------------------------------------

    def nvmlDeviceGetFieldValues(self, handle: SimHandle, field_ids: list[Any]) -> Any:
        """Each value answers on its own, as the driver's do: a value, NotSupported, or a refusal.

        An id the simulator does not model is refused with INVALID_ARGUMENT (what the driver answers
        for an id it does not know), so a collector asking for an invented or untaught field fails its
        tests instead of reading as "not supported". Scoped NVLink ids refuse a link past the count.
        """
        gpu = self._gpu(handle, "nvmlDeviceGetFieldValues")
        values = (pynvml.c_nvmlFieldValue_t * len(field_ids))()
        now_us = int(self._clock() * 1e6)
        for slot, fid in zip(values, field_ids, strict=True):
            fid, scope = fid if isinstance(fid, tuple) else (fid, 0)
            slot.fieldId, slot.scopeId, slot.timestamp = fid, scope, now_us
            try:
                value = self._field(gpu, fid, scope)
            except pynvml.NVMLError as exc:
                slot.nvmlReturn = exc.value
                continue
            if value is None:
                slot.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
                continue
            slot.nvmlReturn = pynvml.NVML_SUCCESS
            slot.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
            slot.value.ullVal = value
        return values

    def _field(self, gpu: _Gpu, fid: int, scope: int = 0) -> int | None:
        if fid in _NVLINK_SCOPED:
            if not self.model.nvlinks:
                return None
            if not 0 <= scope < self.model.nvlinks:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            return self._nvlink_field(gpu, fid, scope)
        if fid == pynvml.NVML_FI_DEV_MEMORY_TEMP:
            return int(self._temperature(gpu) + 8) if self.model.hbm else None
        if fid == pynvml.NVML_FI_DEV_NVLINK_LINK_COUNT:
            return self.model.nvlinks if self.model.nvlinks else None
        if fid == pynvml.NVML_FI_DEV_PCIE_REPLAY_COUNTER:
            return self._total(gpu, "pcie_replays")
        ecc = {
            pynvml.NVML_FI_DEV_ECC_SBE_VOL_TOTAL: (pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_VOLATILE_ECC),
            pynvml.NVML_FI_DEV_ECC_DBE_VOL_TOTAL: (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC),
            pynvml.NVML_FI_DEV_ECC_SBE_AGG_TOTAL: (pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_AGGREGATE_ECC),
            pynvml.NVML_FI_DEV_ECC_DBE_AGG_TOTAL: (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_AGGREGATE_ECC),
        }
        if fid in ecc:
            return self._ecc(gpu, *ecc[fid])
        if fid == pynvml.NVML_FI_DEV_RETIRED_SBE:
            return self._total(gpu, "retired_pages", cause=("single_bit", "double_bit"))
        if fid == pynvml.NVML_FI_DEV_RETIRED_DBE:
            return self._total(gpu, "retired_pages", cause=("double_bit", "double_bit"))
        if fid == pynvml.NVML_FI_DEV_RETIRED_PENDING:
            return int(any(f.params.get("pending", True) for f in self._active(gpu, "retired_pages")))
        raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    def _nvlink_field(self, gpu: _Gpu, fid: int, link: int) -> int:
        if fid == pynvml.NVML_FI_DEV_NVLINK_GET_STATE:
            down = any(f.params.get("link", 0) == link for f in self._active(gpu, "nvlink_down"))
            return pynvml.NVML_NVLINK_STATE_INACTIVE if down else pynvml.NVML_NVLINK_STATE_ACTIVE
        # The scoped CRC counter counts every CRC error of the link: flit and data.
        names = {
            pynvml.NVML_FI_DEV_NVLINK_ERROR_DL_REPLAY: ("replay",),
            pynvml.NVML_FI_DEV_NVLINK_ERROR_DL_RECOVERY: ("recovery",),
            pynvml.NVML_FI_DEV_NVLINK_ERROR_DL_CRC: ("crc_flit", "crc_data"),
        }[fid]
        return sum(self._total(gpu, "nvlink_errors", link=(link, 0), counter=(n, "crc_flit")) for n in names)


def _bus_ids(bus: int) -> tuple[str, ...]:
    return ("00000000:%02X:00.0" % bus, "0000:%02X:00.0" % bus, "%02X:00.0" % bus)


def _cut_by_reset(fault: Fault, resets: tuple[float, ...]) -> Fault:
    """The fault as the first reset after its start leaves it: ended there if a reset clears its kind."""
    if fault.kind not in _CLEARED_BY_RESET:
        return fault
    reset = first_at_or_after(resets, fault.at)
    if reset is None or (fault.until is not None and fault.until <= reset):
        return fault
    return dataclasses.replace(fault, until=reset)
