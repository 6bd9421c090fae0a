"""DcgmNvml: the slice of pynvml the collectors call, answered from DCGM's watched fields.

With `--backend dcgm` the NVML collectors run unchanged on this object, so they emit the same
families, names and units as on NVML. Each GPU's values come from one dcgmEntityGetLatestValues
call for the whole watched field group, made on the connection's I/O thread at most once per half
update interval (so once per collection cycle) and shared by every call of that cycle. Identity
(UUID, PCI bus id, name, serial, VBIOS, driver) comes from dcgmGetDeviceAttributes at connect time.

Errors, the way NVML raises them (pynvml.NVMLError(code)):
  * a field DCGM reports as NOT_SUPPORTED (blank sentinel or status), a call or field with no DCGM
    equivalent -> NotSupported (FunctionNotFound for a pynvml function this adapter does not know),
    so the series is absent and gpu_nvml_unsupported says so;
  * a blank that means "no data yet" (DCGM_*_BLANK, NOT_FOUND, a field not watched or not sampled)
    -> NoData: absent this cycle. A blank sentinel is never returned as a value;
  * NOT_PERMISSIONED -> NoPermission; a DCGM GPU-lost / reset-required status -> GpuIsLost /
    ResetRequired (the GPU is marked lost, as on NVML);
  * the host engine unreachable or past its deadline -> DcgmUnavailable (NVMLError Unknown, never
    GpuIsLost). Until then, and for at most `max_staleness` seconds, the last values DCGM gave are
    served instead, so the series keep coming through a reconnect; gpu_dcgm_connected and
    gpu_dcgm_last_update_timestamp_seconds say they are not fresh, and so does gpu_collection_stale
    once they are older than two update intervals (as for an NVML GPU whose call is stuck). The
    values' time is their newest DCGM sample's, so a host engine that answers but stopped sampling
    goes stale the same way.

Gaps against NVML: memory in MiB granularity; DCGM has no pending MIG mode (current is returned
for both); NVLink error counters for links 0-17 only, no DL_ECC_DATA counter; the fabric
registration status is 0 on success and NVML_ERROR_UNKNOWN (999) on failure (DCGM keeps a DCGM
error code, not the NVML one); no graphics or video clock.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pynvml

from . import fields as F
from .connection import DcgmConnection, DcgmUnavailable, GpuInfo, acquire, release

_MIB = 1024 * 1024
_KIND_TO_NVML = {
    "not_supported": pynvml.NVML_ERROR_NOT_SUPPORTED,
    "no_data": pynvml.NVML_ERROR_NO_DATA,
    "no_permission": pynvml.NVML_ERROR_NO_PERMISSION,
    "lost": pynvml.NVML_ERROR_GPU_IS_LOST,
    "reset": pynvml.NVML_ERROR_RESET_REQUIRED,
}
# dcgmFabricManagerStatus_t -> NVML fabric state; Failure is "completed" with a failed status.
_FM_STATE = {0: 0, 1: 1, 2: 2, 3: 3, 4: 3}
_LINK_NOT_SUPPORTED, _LINK_UP = 0, 3
_ABSENT = ("nvmlEvent", "nvmlDeviceRegisterEvents", "nvmlDeviceGetSupportedEventTypes")


@dataclass(frozen=True, slots=True)
class DcgmGpuHandle:
    """What nvmlDeviceGetHandleByIndex returns: the NVML-style index and DCGM's GPU id."""

    index: int
    gpu_id: int


@dataclass(frozen=True, slots=True)
class _Snapshot:
    values: Mapping[int, tuple[str, Any]]
    fetched: float  # monotonic
    wall: float


def _error(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)


class DcgmNvml:
    """pynvml-compatible backend over a DcgmConnection (see the module docstring)."""

    def __init__(
        self,
        connection: DcgmConnection,
        *,
        update_interval: float = 5.0,
        max_staleness: float = 300.0,
        clock: Callable[[], float] | None = None,
        owns_connection: bool = False,
    ) -> None:
        self.dcgm_connection = connection
        self.update_interval = update_interval
        self.max_staleness = max_staleness
        self._ttl = update_interval / 2
        self._clock = clock or connection.clock
        self._owns = owns_connection
        self._lock = threading.Lock()
        self._snapshots: dict[int, _Snapshot] = {}
        self._retry_at: dict[int, float] = {}
        self._links: tuple[float, Mapping[int, tuple[int, ...]]] | None = None
        self._links_retry_at = 0.0
        connection.watch_fields(F.WATCHED, update_interval)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], *, interval: float = 5.0, **kwargs: Any) -> DcgmNvml:
        """The backend for --backend dcgm: the shared connection for the --dcgm.* settings, fields
        watched every `interval` (give it --collect-interval).

        Raises BackendUnavailable when the bindings cannot be loaded (the message names the paths
        searched and the package), ConfigError for a bad --dcgm.timeout.
        """
        return cls(acquire(settings), update_interval=interval, owns_connection=True, **kwargs)

    # --- freshness, for the dcgm collector ----------------------------------------------------

    def last_update(self, uuid: str) -> float | None:
        """Wall time of the DCGM values now served for this GPU (their newest sample), None if none yet. The
        poller takes it as the GPU's last success, so values older than two intervals make it stale."""
        gpu = self.dcgm_connection.gpu_by_uuid(uuid)
        if gpu is None:
            return None
        with self._lock:
            snap = self._snapshots.get(gpu.gpu_id)
        return None if snap is None else snap.wall

    # --- plumbing -----------------------------------------------------------------------------

    def _inventory(self) -> tuple[GpuInfo, ...]:
        """The GPUs DCGM supports; doubles as the reconnect trigger when nothing else is asking."""
        try:
            return tuple(self.dcgm_connection.run("inventory", lambda s: s.inventory))
        except DcgmUnavailable:
            known = self.dcgm_connection.inventory()
            if known is None:
                raise
            return known

    def _gpu(self, handle: Any) -> GpuInfo:
        if not isinstance(handle, DcgmGpuHandle):
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        gpu = next((g for g in self.dcgm_connection.inventory() or () if g.gpu_id == handle.gpu_id), None)
        if gpu is None:
            raise _error(pynvml.NVML_ERROR_GPU_NOT_FOUND)
        if gpu.lost:
            raise _error(pynvml.NVML_ERROR_GPU_IS_LOST)
        return gpu

    def _snapshot(self, handle: Any) -> _Snapshot:
        gpu = self._gpu(handle)
        now = self._clock()
        with self._lock:
            snap = self._snapshots.get(gpu.gpu_id)
            retry_at = self._retry_at.get(gpu.gpu_id, -math.inf)
        if snap is not None and now - snap.fetched < self._ttl:
            return snap
        if snap is not None and now < retry_at:
            return self._stale(snap, now, None)
        conn = self.dcgm_connection
        try:
            values, sampled = conn.run("dcgmEntityGetLatestValues", lambda s: s.latest(gpu.gpu_id, F.WATCHED))
        except DcgmUnavailable as exc:
            with self._lock:
                self._retry_at[gpu.gpu_id] = now + self._ttl
            if snap is None:
                raise
            return self._stale(snap, now, exc)
        # The data's time is its newest sample's, not the fetch's: a stalled sampler serves old values.
        wall = conn.wall()
        fresh = _Snapshot(values, now, min(wall, sampled) if sampled is not None else wall)
        with self._lock:
            self._snapshots[gpu.gpu_id] = fresh
            self._retry_at.pop(gpu.gpu_id, None)
        return fresh

    def _stale(self, snap: _Snapshot, now: float, exc: Exception | None) -> _Snapshot:
        if now - snap.fetched > self.max_staleness:
            raise DcgmUnavailable(
                f"DCGM values are {now - snap.fetched:.0f}s old (limit {self.max_staleness:.0f}s)"
                + (f": {exc}" if exc else "")
            )
        return snap

    def _value(self, handle: Any, field_id: int) -> Any:
        kind, value = self._snapshot(handle).values.get(field_id, ("not_supported", None))
        if kind != "ok":
            raise _error(_KIND_TO_NVML[kind])
        return value

    def _int(self, handle: Any, field_id: int) -> int:
        return int(self._value(handle, field_id))

    def _milli(self, handle: Any, field_id: int) -> int:
        """DCGM watts -> NVML milliwatts."""
        return int(round(float(self._value(handle, field_id)) * 1000))

    def _link_states(self, handle: Any) -> tuple[int, ...]:
        gpu = self._gpu(handle)
        now = self._clock()
        with self._lock:
            cached, retry_at = self._links, self._links_retry_at
        if cached is None or (now - cached[0] >= self._ttl and now >= retry_at):
            try:
                states = self.dcgm_connection.run("dcgmGetNvLinkLinkStatus", lambda s: s.link_states())
                cached = (now, states)
                with self._lock:
                    self._links = cached
            except DcgmUnavailable:
                with self._lock:
                    self._links_retry_at = now + self._ttl
                if cached is None or now - cached[0] > self.max_staleness:
                    raise
        return tuple(cached[1].get(gpu.gpu_id, ()))

    def _link_count(self, handle: Any) -> int:
        states = self._link_states(handle)
        supported = [i for i, s in enumerate(states) if s != _LINK_NOT_SUPPORTED]
        return supported[-1] + 1 if supported else 0

    def __getattr__(self, name: str) -> Any:
        # A pynvml function this adapter has no DCGM answer for: what an old driver says of a new call.
        # The event API is absent instead, so that feature checks (hasattr(nvml, "nvmlEventSetCreate"),
        # the XID collector's) see that DCGM gives no NVML events.
        if name.startswith("nvml") and not name.startswith(_ABSENT):
            def unsupported(*args: Any, **kwargs: Any) -> Any:
                raise _error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)

            unsupported.__name__ = name
            return unsupported
        raise AttributeError(name)

    # --- system -------------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self._inventory()

    def nvmlShutdown(self) -> None:
        if self._owns:
            self._owns = False
            release(self.dcgm_connection)

    def close(self) -> None:
        self.nvmlShutdown()

    def nvmlDeviceGetCount(self) -> int:
        return len(self._inventory())

    def nvmlSystemGetDriverVersion(self) -> str:
        inventory = self._inventory()
        return next((g.driver for g in inventory if g.driver), "")

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        for gpu in self.dcgm_connection.inventory() or ():
            with self._lock:
                snap = self._snapshots.get(gpu.gpu_id)
            if snap is None and not gpu.lost:
                try:
                    snap = self._snapshot(DcgmGpuHandle(0, gpu.gpu_id))
                except pynvml.NVMLError:
                    continue
            if snap is not None:
                kind, value = snap.values.get(F.CUDA_DRIVER_VERSION, ("no_data", None))
                if kind == "ok":
                    return int(value)
        raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> DcgmGpuHandle:
        inventory = self._inventory()
        if not 0 <= index < len(inventory):
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return DcgmGpuHandle(index, inventory[index].gpu_id)

    # --- identity -----------------------------------------------------------------------------

    def _identity(self, handle: Any, attr: str) -> str:
        value = getattr(self._gpu(handle), attr)
        if not value or (value.startswith("<<<") and value.endswith(">>>")):
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return value

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        return self._identity(handle, "uuid")

    def nvmlDeviceGetName(self, handle: Any) -> str:
        return self._identity(handle, "name")

    def nvmlDeviceGetSerial(self, handle: Any) -> str:
        return self._identity(handle, "serial")

    def nvmlDeviceGetVbiosVersion(self, handle: Any) -> str:
        return self._identity(handle, "vbios")

    def nvmlDeviceGetIndex(self, handle: Any) -> int:
        self._gpu(handle)
        return handle.index

    def nvmlDeviceGetPciInfo_v3(self, handle: Any) -> Any:
        gpu = self._gpu(handle)
        info = pynvml.nvmlPciInfo_t()
        bus_id = self._identity(handle, "pci_bus_id")
        try:
            domain, bus, rest = bus_id.split(":")
            info.domain, info.bus, info.device = int(domain, 16), int(bus, 16), int(rest.split(".")[0], 16)
        except ValueError:
            pass
        info.pciDeviceId = gpu.pci_device_id
        info.busId = bus_id.encode()
        info.busIdLegacy = bus_id[-12:].encode()
        return info

    def nvmlDeviceGetMigMode(self, handle: Any) -> list[int]:
        mode = self._int(handle, F.MIG_MODE)
        return [mode, mode]

    def nvmlDeviceGetPersistenceMode(self, handle: Any) -> int:
        return self._int(handle, F.PERSISTENCE_MODE)

    # --- thermal and power ----------------------------------------------------------------------

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return self._int(handle, F.GPU_TEMP)

    def nvmlDeviceGetTemperatureThreshold(self, handle: Any, threshold: int) -> int:
        field_id = {
            pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN: F.SLOWDOWN_TEMP,
            pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN: F.SHUTDOWN_TEMP,
        }.get(threshold)
        if field_id is None:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return self._int(handle, field_id)

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        return self._milli(handle, F.POWER_USAGE)

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int:
        return self._milli(handle, F.POWER_LIMIT_ENFORCED)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any) -> int:
        return self._int(handle, F.TOTAL_ENERGY)

    # --- utilisation, memory, clocks ------------------------------------------------------------

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any:
        util = pynvml.c_nvmlUtilization_t()
        util.gpu = self._int(handle, F.GPU_UTIL)
        util.memory = self._int(handle, F.MEM_COPY_UTIL)
        return util

    def nvmlDeviceGetMemoryInfo(self, handle: Any, version: int | None = None) -> Any:
        total = self._int(handle, F.FB_TOTAL) * _MIB
        used = self._int(handle, F.FB_USED) * _MIB
        if not version:
            mem = pynvml.c_nvmlMemory_t()
            mem.total, mem.used, mem.free = total, used, max(0, total - used)
            return mem
        mem = pynvml.c_nvmlMemory_v2_t()
        mem.version = version
        mem.total, mem.used = total, used
        mem.reserved = self._int(handle, F.FB_RESERVED) * _MIB
        mem.free = self._int(handle, F.FB_FREE) * _MIB
        return mem

    def nvmlDeviceGetClockInfo(self, handle: Any, clock: int) -> int:
        field_id = {pynvml.NVML_CLOCK_SM: F.SM_CLOCK, pynvml.NVML_CLOCK_MEM: F.MEM_CLOCK}.get(clock)
        if field_id is None:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return self._int(handle, field_id)

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any) -> int:
        return self._int(handle, F.CLOCKS_EVENT_REASONS)

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: Any) -> int:
        return self._int(handle, F.CLOCKS_EVENT_REASONS)

    def nvmlDeviceGetPerformanceState(self, handle: Any) -> int:
        return self._int(handle, F.PSTATE)

    # --- memory errors --------------------------------------------------------------------------

    def nvmlDeviceGetEccMode(self, handle: Any) -> list[int]:
        current = self._int(handle, F.ECC_MODE)
        try:
            pending = self._int(handle, F.ECC_PENDING)
        except pynvml.NVMLError:
            pending = current
        return [current, pending]

    def nvmlDeviceGetRemappedRows(self, handle: Any) -> tuple[int, int, int, int]:
        return (
            self._int(handle, F.ROW_REMAP_CORRECTABLE),
            self._int(handle, F.ROW_REMAP_UNCORRECTABLE),
            self._int(handle, F.ROW_REMAP_PENDING),
            self._int(handle, F.ROW_REMAP_FAILED),
        )

    # --- interconnects --------------------------------------------------------------------------

    def nvmlDeviceGetNvLinkState(self, handle: Any, link: int) -> int:
        states = self._link_states(handle)
        if not 0 <= link < len(states):
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if states[link] == _LINK_NOT_SUPPORTED:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return pynvml.NVML_FEATURE_ENABLED if states[link] == _LINK_UP else pynvml.NVML_FEATURE_DISABLED

    def nvmlDeviceGetNvLinkErrorCounter(self, handle: Any, link: int, counter: int) -> int:
        ids = F.NVLINK_ERROR_FIELDS.get(counter)
        if ids is None or not 0 <= link < len(ids):
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return self._int(handle, ids[link])

    def nvmlDeviceGetPcieReplayCounter(self, handle: Any) -> int:
        return self._int(handle, F.PCIE_REPLAY)

    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle: Any) -> int:
        return self._int(handle, F.PCIE_LINK_GEN)

    def nvmlDeviceGetCurrPcieLinkWidth(self, handle: Any) -> int:
        return self._int(handle, F.PCIE_LINK_WIDTH)

    def nvmlDeviceGetMaxPcieLinkGeneration(self, handle: Any) -> int:
        return self._int(handle, F.PCIE_MAX_LINK_GEN)

    def nvmlDeviceGetMaxPcieLinkWidth(self, handle: Any) -> int:
        return self._int(handle, F.PCIE_MAX_LINK_WIDTH)

    def nvmlDeviceGetGpuFabricInfoV(self, handle: Any, ref: Any) -> int:
        # Like the C function (and pynvml, which forwards it), this takes a pointer to the struct:
        # ctypes.byref(info) or pointer(info); a bare struct is accepted too.
        info = ref._obj if type(ref).__name__ == "CArgObject" else getattr(ref, "contents", ref)
        status = self._int(handle, F.FABRIC_MANAGER_STATUS)
        if status not in _FM_STATE:  # Unrecognized (5), NvmlTooOld (6)
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        info.state = _FM_STATE[status]
        info.status = pynvml.NVML_ERROR_UNKNOWN if status == 4 else pynvml.NVML_SUCCESS
        if hasattr(info, "healthSummary"):
            try:
                info.healthSummary = self._int(handle, F.FABRIC_HEALTH_SUMMARY)
            except pynvml.NVMLError:
                info.healthSummary = 0  # NVML_GPU_FABRIC_HEALTH_SUMMARY_NOT_SUPPORTED, as NVML's v2 struct
        return pynvml.NVML_SUCCESS

    # --- batched fields -------------------------------------------------------------------------

    def nvmlDeviceGetFieldValues(self, handle: Any, field_ids: Sequence[Any]) -> Any:
        snap = self._snapshot(handle)
        values = (pynvml.c_nvmlFieldValue_t * len(field_ids))()
        stamp = int(snap.wall * 1e6)
        for slot, requested in zip(values, field_ids, strict=True):
            fid, scope = requested if isinstance(requested, tuple) else (requested, 0)
            slot.fieldId, slot.scopeId, slot.timestamp = fid, scope, stamp
            try:
                if fid == F.NVML_NVLINK_LINK_COUNT:
                    value: Any = self._link_count(handle)
                    if not value:
                        raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
                elif fid in F.NVML_FIELDS:
                    kind, value = snap.values.get(F.NVML_FIELDS[fid], ("not_supported", None))
                    if kind != "ok":
                        raise _error(_KIND_TO_NVML[kind])
                else:
                    raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
            except pynvml.NVMLError as exc:
                if isinstance(exc, DcgmUnavailable):
                    raise
                slot.nvmlReturn = exc.value
                continue
            slot.nvmlReturn = pynvml.NVML_SUCCESS
            if isinstance(value, float):
                slot.valueType = pynvml.NVML_VALUE_TYPE_DOUBLE
                slot.value.dVal = value
            elif value < 0:
                slot.valueType = pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG
                slot.value.sllVal = value
            else:
                slot.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
                slot.value.ullVal = value
        return values


def make_dcgm_backend(settings: Mapping[str, Any], interval: float) -> DcgmNvml:
    """What cli.make_backend returns for --backend dcgm (see DcgmNvml.from_settings)."""
    return DcgmNvml.from_settings(settings, interval=interval)


__all__ = ["DcgmGpuHandle", "DcgmNvml", "make_dcgm_backend"]
