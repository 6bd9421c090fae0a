"""A fake libnvidia-ml: C function pointers that pynvml finds on its loaded library object.

Each exported symbol is a ctypes CFUNCTYPE made from a Python function, with the C signature nvml.h
gives it (`nvmlReturn_t f(nvmlDevice_t, unsigned int *)` ...). pynvml's wrappers call it exactly as they
call the real library: their own ctypes structs and buffers go through the C calling convention, and the
fake writes its answers through the pointers it receives, with nvml.h's layouts (nvml_h.py), and returns
an nvmlReturn_t that pynvml maps to its NVMLError subclasses. A symbol the branch does not export is not
an attribute, so pynvml's own lookup answers NVML_ERROR_FUNCTION_NOT_FOUND.

Faithful to (nvml.h and the NVML API reference, "Initialization and Cleanup", "Device Queries",
"Field Value Queries", "Event Handling Methods"):
- Init counting: every successful nvmlInit_v2 / nvmlInitWithFlags adds one; nvmlShutdown takes one away
  and only the last one shuts NVML down; a shutdown past the count reports no error ("No error will be
  reported if this is called more times than init"). Every call but nvmlErrorString answers
  NVML_ERROR_UNINITIALIZED while the count is 0.
- NVML_INIT_FLAG_NO_GPUS: without it, init on a node without GPUs fails (with NOT_FOUND: the code is not
  documented; the simulator makes the same choice).
- Struct versions: nvmlDeviceGetMemoryInfo_v2 and nvmlDeviceGetGpuFabricInfoV read `version` first and
  answer NVML_ERROR_ARGUMENT_VERSION_MISMATCH for one the branch does not know (drivers.py).
- nvmlDeviceGetFieldValues: every entry carries its own nvmlReturn; an id the fake does not know and a
  scoped NVLink id past the link count are INVALID_ARGUMENT for that entry, NotSupported is per entry too,
  and the call itself succeeds. The link count is NVML_FI_DEV_NVLINK_LINK_COUNT.
- String outputs honour the caller's length (INSUFFICIENT_SIZE when too short, NUL-terminated); NULL
  output pointers and unknown handles are INVALID_ARGUMENT; a lost GPU answers GPU_IS_LOST to every call.
- nvmlEventSetWait_v2 blocks for at most its timeout and answers NVML_ERROR_TIMEOUT when nothing came; while
  `event_wait_hung` is set it does not return at all (a driver that stopped answering), until it is cleared.

Not modelled: values that move by themselves (readings are the node's fixed numbers), other hangs, MIG, the
handle lifetime across nvmlShutdown (handles stay the same pointers after a re-init), NVML_INIT_FLAG_NO_ATTACH,
value types per field checked against a driver (counters are unsigned long long, states and counts unsigned
int), the exact wording of nvmlErrorString, events other than Xid, functions the exporter does not call.
"""

from __future__ import annotations

import ctypes
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from ctypes import CFUNCTYPE, c_int, c_uint, c_ulonglong, c_void_p
from dataclasses import dataclass
from typing import Any

from . import nvml_h as h
from .drivers import Driver
from .node import Gpu, Node

_RET = c_uint  # nvmlReturn_t
_DEV = c_void_p  # nvmlDevice_t
_PTR = c_void_p  # every output pointer: written at its address with nvml.h's type, as the C library does


class _Return(Exception):
    """An implementation's early nvmlReturn_t (a refusal)."""

    def __init__(self, code: int) -> None:
        self.code = code


@dataclass(frozen=True)
class Call:
    """One C call as the library saw it: the calling thread (the exporter names one per GPU), the symbol,
    the GPU its handle named (None for system calls), and a detail (field ids, struct version)."""

    thread: str
    name: str
    gpu: int | None
    detail: Any = None


def _put(ctype: type, addr: int | None, value: Any) -> None:
    if not addr:
        raise _Return(h.ERROR_INVALID_ARGUMENT)
    ctype.from_address(addr).value = value


def _put_str(addr: int | None, length: int, text: str) -> None:
    data = text.encode() + b"\0"
    if not addr:
        raise _Return(h.ERROR_INVALID_ARGUMENT)
    if len(data) > length:
        raise _Return(h.ERROR_INSUFFICIENT_SIZE)
    ctypes.memmove(addr, data, len(data))


class _EventSet:
    def __init__(self) -> None:
        self.buffer = ctypes.create_string_buffer(8)  # its address is the nvmlEventSet_t
        self.gpus: set[int] = set()
        self.pending: list[tuple[int, int]] = []  # (gpu, xid)
        self.cond = threading.Condition()


class FakeNvmlLibrary:
    """libnvidia-ml of one driver branch on one node; install it with `installed()` (install.py)."""

    def __init__(self, driver: Driver, node: Node) -> None:
        self.driver = driver
        self.node = node
        self.init_count = 0
        self.calls: list[Call] = []
        self.faults: list[str] = []  # exceptions inside the fake: a bug here, never an NVML answer
        self.event_wait_hung = threading.Event()
        self.event_wait_hanging = threading.Event()  # set while a call is inside the hang
        self._lock = threading.Lock()
        # A device handle is the address of a small buffer the fake owns, as a real nvmlDevice_t points at
        # the library's own per-device state.
        self._handle_buffers = [ctypes.create_string_buffer(16) for _ in node.gpus]
        self._by_handle = {ctypes.addressof(b): gpu for b, gpu in zip(self._handle_buffers, node.gpus)}
        self._event_sets: dict[int, _EventSet] = {}
        self._errors = {code: ctypes.create_string_buffer(text.encode()) for code, text in h.ERROR_STRINGS.items()}
        self._exports: dict[str, Any] = {}
        for name, (argtypes, device, impl) in self._table().items():
            if name not in driver.missing:
                self._exports[name] = CFUNCTYPE(_RET, *argtypes)(self._entry(name, device, impl))
        # const char *nvmlErrorString(nvmlReturn_t): usable before init; pynvml sets restype c_char_p itself.
        self._exports["nvmlErrorString"] = CFUNCTYPE(c_void_p, c_uint)(self._error_string)

    def __getattr__(self, name: str) -> Any:
        # pynvml looks every symbol up with getattr(nvmlLib, name): AttributeError is its FunctionNotFound.
        try:
            return self.__dict__["_exports"][name]
        except KeyError:
            raise AttributeError(name) from None

    # --- what tests read --------------------------------------------------------------------

    @property
    def initialized(self) -> bool:
        return self.init_count > 0

    def handle_of(self, gpu: Gpu) -> int:
        return ctypes.addressof(self._handle_buffers[gpu.index])

    def counts(self, *, by: str = "thread") -> Counter[Any]:
        """Calls per thread (by="thread"), per symbol (by="name") or per (thread, symbol) (by="both")."""
        with self._lock:
            calls = list(self.calls)
        key: Callable[[Call], Any] = {
            "thread": lambda c: c.thread, "name": lambda c: c.name, "both": lambda c: (c.thread, c.name),
        }[by]
        return Counter(key(c) for c in calls)

    def clear_calls(self) -> None:
        with self._lock:
            self.calls.clear()

    def raise_xid(self, gpu: int, xid: int) -> None:
        """Deliver an Xid critical-error event to every event set the GPU is registered in."""
        for event_set in list(self._event_sets.values()):
            with event_set.cond:
                if gpu in event_set.gpus:
                    event_set.pending.append((gpu, xid))
                    event_set.cond.notify_all()

    # --- the calling convention -------------------------------------------------------------

    def _entry(self, name: str, device: bool, impl: Callable[..., Any]) -> Callable[..., int]:
        def entry(*args: Any) -> int:
            gpu: Gpu | None = None
            try:
                if device:
                    gpu = self._by_handle.get(args[0] or 0)
                self._record(name, gpu, None)
                if name not in ("nvmlInit_v2", "nvmlInitWithFlags", "nvmlShutdown") and not self.init_count:
                    return h.ERROR_UNINITIALIZED
                if device:
                    if gpu is None:
                        return h.ERROR_INVALID_ARGUMENT
                    if gpu.lost:
                        return h.ERROR_GPU_IS_LOST
                    impl(gpu, *args[1:])
                else:
                    impl(*args)
                return h.SUCCESS
            except _Return as ret:
                return ret.code
            except Exception:  # a ctypes callback must not raise: it would read as SUCCESS
                self.faults.append(f"{name}: {traceback.format_exc()}")
                return h.ERROR_UNKNOWN

        return entry

    def _record(self, name: str, gpu: Gpu | None, detail: Any) -> None:
        with self._lock:
            self.calls.append(Call(threading.current_thread().name, name, None if gpu is None else gpu.index, detail))

    def _detail(self, detail: Any) -> None:
        """Attach a detail to the calling thread's last call (recorded before the implementation ran)."""
        me = threading.current_thread().name
        with self._lock:
            for i in range(len(self.calls) - 1, -1, -1):
                if self.calls[i].thread == me:
                    c = self.calls[i]
                    self.calls[i] = Call(c.thread, c.name, c.gpu, detail)
                    return

    def _error_string(self, code: int) -> int:
        return ctypes.addressof(self._errors.get(code, self._errors[h.ERROR_UNKNOWN]))

    def _table(self) -> dict[str, tuple[tuple[Any, ...], bool, Callable[..., Any]]]:
        """symbol -> (C argument types, takes a device handle first, implementation)."""
        return {
            "nvmlInit_v2": ((), False, lambda: self._init(0)),
            "nvmlInitWithFlags": ((c_uint,), False, self._init),
            "nvmlShutdown": ((), False, self._shutdown),
            "nvmlSystemGetDriverVersion": ((_PTR, c_uint), False,
                                           lambda buf, n: _put_str(buf, n, self.driver.version)),
            "nvmlSystemGetCudaDriverVersion": ((_PTR,), False, lambda p: _put(c_int, p, self.driver.cuda)),
            "nvmlSystemGetCudaDriverVersion_v2": ((_PTR,), False, lambda p: _put(c_int, p, self.driver.cuda)),
            "nvmlDeviceGetCount_v2": ((_PTR,), False, lambda p: _put(c_uint, p, len(self.node.gpus))),
            "nvmlDeviceGetHandleByIndex_v2": ((c_uint, _PTR), False, self._handle_by_index),
            "nvmlDeviceGetUUID": ((_DEV, _PTR, c_uint), True, lambda g, b, n: _put_str(b, n, g.uuid)),
            "nvmlDeviceGetSerial": ((_DEV, _PTR, c_uint), True, lambda g, b, n: _put_str(b, n, g.serial)),
            "nvmlDeviceGetName": ((_DEV, _PTR, c_uint), True, lambda g, b, n: _put_str(b, n, g.name)),
            "nvmlDeviceGetVbiosVersion": ((_DEV, _PTR, c_uint), True, lambda g, b, n: _put_str(b, n, g.vbios)),
            "nvmlDeviceGetPciInfo_v3": ((_DEV, _PTR), True, self._pci_info),
            "nvmlDeviceGetMigMode": ((_DEV, _PTR, _PTR), True, self._two(h.FEATURE_DISABLED, h.FEATURE_DISABLED)),
            "nvmlDeviceGetPersistenceMode": ((_DEV, _PTR), True, lambda g, p: _put(c_uint, p, h.FEATURE_ENABLED)),
            "nvmlDeviceGetTemperature": ((_DEV, c_uint, _PTR), True, self._temperature),
            "nvmlDeviceGetTemperatureThreshold": ((_DEV, c_uint, _PTR), True, self._threshold),
            "nvmlDeviceGetCurrentClocksEventReasons": ((_DEV, _PTR), True,
                                                       lambda g, p: _put(c_ulonglong, p, g.clock_reasons)),
            "nvmlDeviceGetCurrentClocksThrottleReasons": ((_DEV, _PTR), True,
                                                          lambda g, p: _put(c_ulonglong, p, g.clock_reasons)),
            "nvmlDeviceGetClockInfo": ((_DEV, c_uint, _PTR), True, self._clock),
            "nvmlDeviceGetPerformanceState": ((_DEV, _PTR), True, lambda g, p: _put(c_uint, p, g.pstate)),
            "nvmlDeviceGetEccMode": ((_DEV, _PTR, _PTR), True, self._two(h.FEATURE_ENABLED, h.FEATURE_ENABLED)),
            "nvmlDeviceGetPcieReplayCounter": ((_DEV, _PTR), True, lambda g, p: _put(c_uint, p, g.pcie[0])),
            "nvmlDeviceGetCurrPcieLinkGeneration": ((_DEV, _PTR), True, lambda g, p: _put(c_uint, p, g.pcie[1])),
            "nvmlDeviceGetMaxPcieLinkGeneration": ((_DEV, _PTR), True, lambda g, p: _put(c_uint, p, g.pcie[2])),
            "nvmlDeviceGetCurrPcieLinkWidth": ((_DEV, _PTR), True, lambda g, p: _put(c_uint, p, g.pcie[3])),
            "nvmlDeviceGetMaxPcieLinkWidth": ((_DEV, _PTR), True, lambda g, p: _put(c_uint, p, g.pcie[4])),
            "nvmlDeviceGetPowerUsage": ((_DEV, _PTR), True, lambda g, p: _put(c_uint, p, g.power_mw)),
            "nvmlDeviceGetEnforcedPowerLimit": ((_DEV, _PTR), True, lambda g, p: _put(c_uint, p, g.power_limit_mw)),
            "nvmlDeviceGetTotalEnergyConsumption": ((_DEV, _PTR), True,
                                                    lambda g, p: _put(c_ulonglong, p, g.energy_mj)),
            "nvmlDeviceGetRemappedRows": ((_DEV, _PTR, _PTR, _PTR, _PTR), True, self._remapped_rows),
            "nvmlDeviceGetUtilizationRates": ((_DEV, _PTR), True, self._utilization),
            "nvmlDeviceGetMemoryInfo_v2": ((_DEV, _PTR), True, self._memory),
            "nvmlDeviceGetFieldValues": ((_DEV, c_int, _PTR), True, self._field_values),
            "nvmlDeviceGetGpuFabricInfo": ((_DEV, _PTR), True, self._fabric),
            "nvmlDeviceGetGpuFabricInfoV": ((_DEV, _PTR), True, self._fabric_v),
            "nvmlDeviceGetNvLinkState": ((_DEV, c_uint, _PTR), True, self._nvlink_state),
            "nvmlDeviceGetNvLinkErrorCounter": ((_DEV, c_uint, c_uint, _PTR), True, self._nvlink_counter),
            "nvmlDeviceGetSupportedEventTypes": ((_DEV, _PTR), True,
                                                 lambda g, p: _put(c_ulonglong, p, h.EVENT_TYPE_XID_CRITICAL_ERROR)),
            "nvmlDeviceRegisterEvents": ((_DEV, c_ulonglong, c_void_p), True, self._register_events),
            "nvmlEventSetCreate": ((_PTR,), False, self._event_set_create),
            "nvmlEventSetWait_v2": ((c_void_p, _PTR, c_uint), False, self._event_set_wait),
            "nvmlEventSetFree": ((c_void_p,), False, self._event_set_free),
        }

    # --- init ------------------------------------------------------------------------------

    def _init(self, flags: int) -> None:
        self._detail(flags)
        if not self.node.gpus and not flags & h.INIT_FLAG_NO_GPUS:
            raise _Return(h.ERROR_NOT_FOUND)
        with self._lock:
            self.init_count += 1

    def _shutdown(self) -> None:
        with self._lock:
            self.init_count = max(0, self.init_count - 1)

    # --- devices ---------------------------------------------------------------------------

    def _handle_by_index(self, index: int, out: int | None) -> None:
        if index >= len(self.node.gpus):
            raise _Return(h.ERROR_INVALID_ARGUMENT)
        gpu = self.node.gpus[index]
        if gpu.lost:
            raise _Return(h.ERROR_GPU_IS_LOST)
        _put(c_void_p, out, self.handle_of(gpu))

    @staticmethod
    def _two(first: int, second: int) -> Callable[..., None]:
        """(current, pending) pairs: ECC and MIG mode."""

        def impl(gpu: Gpu, current: int | None, pending: int | None) -> None:
            _put(c_uint, current, first)
            _put(c_uint, pending, second)

        return impl

    @staticmethod
    def _pci_info(gpu: Gpu, out: int | None) -> None:
        if not out:
            raise _Return(h.ERROR_INVALID_ARGUMENT)
        info = h.PciInfo.from_address(out)
        info.busIdLegacy = f"0000:{gpu.bus:02X}:00.0".encode()
        info.domain, info.bus, info.device = 0, gpu.bus, 0
        info.pciDeviceId, info.pciSubSystemId = gpu.pci_device_id, gpu.pci_subsystem_id
        info.busId = gpu.bus_id.encode()

    @staticmethod
    def _temperature(gpu: Gpu, sensor: int, out: int | None) -> None:
        if sensor != 0:  # NVML_TEMPERATURE_GPU is the only sensor
            raise _Return(h.ERROR_INVALID_ARGUMENT)
        _put(c_uint, out, gpu.temperature)

    @staticmethod
    def _threshold(gpu: Gpu, kind: int, out: int | None) -> None:
        # NVML_TEMPERATURE_THRESHOLD_SHUTDOWN = 0, _SLOWDOWN = 1; the others are not modelled.
        values = {0: gpu.shutdown, 1: gpu.slowdown}
        if kind not in values:
            raise _Return(h.ERROR_NOT_SUPPORTED)
        _put(c_uint, out, values[kind])

    @staticmethod
    def _clock(gpu: Gpu, kind: int, out: int | None) -> None:
        # NVML_CLOCK_GRAPHICS = 0, _SM = 1, _MEM = 2, _VIDEO = 3.
        values = {0: gpu.sm_mhz, 1: gpu.sm_mhz, 2: gpu.memory_mhz}
        if kind not in values:
            raise _Return(h.ERROR_NOT_SUPPORTED)
        _put(c_uint, out, values[kind])

    @staticmethod
    def _remapped_rows(gpu: Gpu, *outs: int | None) -> None:
        for out, value in zip(outs, gpu.remapped, strict=True):
            _put(c_uint, out, value)

    @staticmethod
    def _utilization(gpu: Gpu, out: int | None) -> None:
        if not out:
            raise _Return(h.ERROR_INVALID_ARGUMENT)
        rates = h.Utilization.from_address(out)
        rates.gpu, rates.memory = gpu.utilization

    def _memory(self, gpu: Gpu, out: int | None) -> None:
        if not out:
            raise _Return(h.ERROR_INVALID_ARGUMENT)
        mem = h.Memory_v2.from_address(out)
        self._detail(mem.version)
        if mem.version != h.MEMORY_V2:
            raise _Return(h.ERROR_ARGUMENT_VERSION_MISMATCH)
        total, reserved, used = gpu.memory
        mem.total, mem.reserved, mem.used, mem.free = total, reserved, used, total - reserved - used

    # --- batched fields --------------------------------------------------------------------

    def _field_values(self, gpu: Gpu, count: int, values: int | None) -> None:
        if count < 0 or (count and not values):
            raise _Return(h.ERROR_INVALID_ARGUMENT)
        size = ctypes.sizeof(h.FieldValue)
        entries = [h.FieldValue.from_address(values + i * size) for i in range(count)] if count else []
        self._detail(tuple((e.fieldId, e.scopeId) for e in entries))
        now_us = int(time.time() * 1e6)
        for entry in entries:
            entry.timestamp, entry.latencyUsec = now_us, 0
            ret, value_type, value = self._field(gpu, entry.fieldId, entry.scopeId)
            entry.nvmlReturn = ret
            if ret == h.SUCCESS:
                entry.valueType = value_type
                if value_type == h.VALUE_TYPE_UNSIGNED_INT:
                    entry.value.uiVal = value
                else:
                    entry.value.ullVal = value

    @staticmethod
    def _field(gpu: Gpu, fid: int, scope: int) -> tuple[int, int, int]:
        uint, ull = h.VALUE_TYPE_UNSIGNED_INT, h.VALUE_TYPE_UNSIGNED_LONG_LONG
        if fid in h.NVLINK_SCOPED:
            if not gpu.nvlinks:
                return h.ERROR_NOT_SUPPORTED, 0, 0
            if scope >= gpu.nvlinks:
                return h.ERROR_INVALID_ARGUMENT, 0, 0
            if (fid, scope) in gpu.link_unsupported:
                return h.ERROR_NOT_SUPPORTED, 0, 0
            if fid == h.FI_NVLINK_GET_STATE:
                state = h.NVLINK_STATE_INACTIVE if scope in gpu.links_down else h.NVLINK_STATE_ACTIVE
                return h.SUCCESS, uint, state
            return h.SUCCESS, ull, gpu.link_errors.get((fid, scope), 0)
        if fid == h.FI_NVLINK_LINK_COUNT:
            return (h.SUCCESS, uint, gpu.nvlinks) if gpu.nvlinks else (h.ERROR_NOT_SUPPORTED, 0, 0)
        if fid == h.FI_MEMORY_TEMP:
            return h.SUCCESS, uint, gpu.memory_temperature
        if fid in (h.FI_ECC_SBE_VOL_TOTAL, h.FI_ECC_DBE_VOL_TOTAL, h.FI_ECC_SBE_AGG_TOTAL, h.FI_ECC_DBE_AGG_TOTAL):
            return h.SUCCESS, ull, gpu.ecc.get(fid, 0)
        if fid in (h.FI_RETIRED_SBE, h.FI_RETIRED_DBE, h.FI_RETIRED_PENDING):
            return (h.SUCCESS, ull, 0) if gpu.page_retirement else (h.ERROR_NOT_SUPPORTED, 0, 0)
        return h.ERROR_INVALID_ARGUMENT, 0, 0

    # --- fabric ----------------------------------------------------------------------------

    @staticmethod
    def _fill_fabric(info: Any, gpu: Gpu) -> None:
        info.clusterUuid[:] = bytes(range(16))
        info.status, info.cliqueId, info.state = h.SUCCESS, 1, h.GPU_FABRIC_STATE_COMPLETED

    def _fabric(self, gpu: Gpu, out: int | None) -> None:
        if not out:
            raise _Return(h.ERROR_INVALID_ARGUMENT)
        if not gpu.fabric:
            raise _Return(h.ERROR_NOT_SUPPORTED)
        self._fill_fabric(h.GpuFabricInfo.from_address(out), gpu)

    def _fabric_v(self, gpu: Gpu, out: int | None) -> None:
        if not out:
            raise _Return(h.ERROR_INVALID_ARGUMENT)
        version = c_uint.from_address(out).value
        self._detail(version)
        if version not in self.driver.fabric_versions:
            raise _Return(h.ERROR_ARGUMENT_VERSION_MISMATCH)
        if not gpu.fabric:
            raise _Return(h.ERROR_NOT_SUPPORTED)
        info: Any = (h.GpuFabricInfo_v3 if version == h.FABRIC_V3 else h.GpuFabricInfo_v2).from_address(out)
        self._fill_fabric(info, gpu)
        info.healthMask = 0
        if version == h.FABRIC_V3:
            info.healthSummary = gpu.fabric_health_summary

    # --- per-link calls (the collector's fallback) -----------------------------------------

    @staticmethod
    def _nvlink_state(gpu: Gpu, link: int, out: int | None) -> None:
        if link >= gpu.nvlinks:
            raise _Return(h.ERROR_INVALID_ARGUMENT)
        _put(c_uint, out, h.FEATURE_DISABLED if link in gpu.links_down else h.FEATURE_ENABLED)

    @staticmethod
    def _nvlink_counter(gpu: Gpu, link: int, counter: int, out: int | None) -> None:
        if link >= gpu.nvlinks:
            raise _Return(h.ERROR_INVALID_ARGUMENT)
        fid = {h.NVLINK_ERROR_DL_REPLAY: h.FI_NVLINK_ERROR_DL_REPLAY,
               h.NVLINK_ERROR_DL_RECOVERY: h.FI_NVLINK_ERROR_DL_RECOVERY,
               h.NVLINK_ERROR_DL_CRC_FLIT: h.FI_NVLINK_ERROR_DL_CRC}.get(counter)
        if fid is None and counter != h.NVLINK_ERROR_DL_CRC_DATA:
            raise _Return(h.ERROR_INVALID_ARGUMENT)
        # The scoped CRC field counts flit and data CRC errors together; the fake puts them all on flit.
        _put(c_ulonglong, out, 0 if fid is None else gpu.link_errors.get((fid, link), 0))

    # --- events ----------------------------------------------------------------------------

    def _event_set_create(self, out: int | None) -> None:
        event_set = _EventSet()
        _put(c_void_p, out, ctypes.addressof(event_set.buffer))
        self._event_sets[ctypes.addressof(event_set.buffer)] = event_set

    def _register_events(self, gpu: Gpu, types: int, set_handle: int | None) -> None:
        event_set = self._event_sets.get(set_handle or 0)
        if event_set is None or types & ~h.EVENT_TYPE_XID_CRITICAL_ERROR:
            raise _Return(h.ERROR_INVALID_ARGUMENT if event_set is None else h.ERROR_NOT_SUPPORTED)
        with event_set.cond:
            event_set.gpus.add(gpu.index)

    def _event_set_wait(self, set_handle: int | None, out: int | None, timeout_ms: int) -> None:
        while self.event_wait_hung.is_set():
            self.event_wait_hanging.set()
            time.sleep(0.01)
        self.event_wait_hanging.clear()
        event_set = self._event_sets.get(set_handle or 0)
        if event_set is None or not out:
            raise _Return(h.ERROR_INVALID_ARGUMENT)
        with event_set.cond:
            if not event_set.cond.wait_for(lambda: event_set.pending, timeout_ms / 1000):
                raise _Return(h.ERROR_TIMEOUT)
            gpu, xid = event_set.pending.pop(0)
        data = h.EventData.from_address(out)
        data.device = self.handle_of(self.node.gpus[gpu])
        data.eventType, data.eventData = h.EVENT_TYPE_XID_CRITICAL_ERROR, xid
        data.gpuInstanceId = data.computeInstanceId = 0xFFFFFFFF

    def _event_set_free(self, set_handle: int | None) -> None:
        if self._event_sets.pop(set_handle or 0, None) is None:
            raise _Return(h.ERROR_INVALID_ARGUMENT)
