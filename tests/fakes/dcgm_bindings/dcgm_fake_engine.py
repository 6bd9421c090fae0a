"""The in-memory host engine behind the fake DCGM bindings in this directory (not a DCGM module).

The fake `dcgm_agent` functions call `ENGINE`. Its GPUs are the exporter's simulated GPUs
(`exporter.backends.sim.SimulatedNvml`), so the DCGM backend on the fake shows the same UUIDs and
the same values as `--backend sim`, converted to DCGM's units the way nv-hostengine converts NVML's
(watts as a double, MiB by integer division, NVML errors stored as blank sentinels; see
DcgmCacheManager.cpp in DCGM 4.6.0).

What tests control, in-process (`ENGINE.reset(...)`, then the methods below) or, for a subprocess,
through a scenario file named by the environment variable DCGM_FAKE_SCENARIO (JSON, or YAML when
the name ends in .yaml/.yml), read when this module is imported:

    {"sim": {...sim config, as --sim-config...}, "clock": 1000.0,   # fixed simulator time, or null
     "nvswitches": 0,
     "blanks": [{"gpu": 0, "field": 140, "kind": "blank|not_found|not_supported|not_permissioned"}],
     "incidents": [{"gpu": 1, "system": "mem", "health": "fail", "code": 4, "msg": "..."},
                   {"nvswitch": 0, "system": "nvswitch_fatal", "health": "fail", "code": 15}]}

Behaviour mirrored from DCGM: a field that is not watched on the entity reads as a blank with status
DCGM_ST_NOT_WATCHED; the first dcgmHealthCheck of a group only arms it and reports nothing; incidents
are reported for entities of the checked group and watched systems only; after `disconnect()` every
call on an existing handle raises DCGMError_ConnectionNotValid and new connections are refused until
`restore()`, and old handles stay invalid (as after an nv-hostengine restart); `stall()` blocks every
call until `unstall()` (a hung host engine). Not mirrored: sampling in the background (values are
computed when read), maxKeepAge/maxKeepSamples, rate-based health thresholds (incidents are set by
the test), MIG entities, links as entities.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pynvml

import dcgm_fields as F
import dcgm_structs as S
import dcgmvalue as V
from exporter.backends.sim import SimHandle, SimulatedNvml, sim_config_from_dict

BLANK_KINDS = {
    "blank": (V.DCGM_INT64_BLANK, V.DCGM_FP64_BLANK, V.DCGM_STR_BLANK),
    "not_found": (V.DCGM_INT64_NOT_FOUND, V.DCGM_FP64_NOT_FOUND, V.DCGM_STR_NOT_FOUND),
    "not_supported": (V.DCGM_INT64_NOT_SUPPORTED, V.DCGM_FP64_NOT_SUPPORTED, V.DCGM_STR_NOT_SUPPORTED),
    "not_permissioned": (V.DCGM_INT64_NOT_PERMISSIONED, V.DCGM_FP64_NOT_PERMISSIONED, V.DCGM_STR_NOT_PERMISSIONED),
}
# How nv-hostengine stores an NVML error in place of a value (DcgmCMUtils.cpp NvmlErrorToInt64Value).
_NVML_TO_BLANK = {
    pynvml.NVML_ERROR_NOT_SUPPORTED: "not_supported",
    pynvml.NVML_ERROR_NO_PERMISSION: "not_permissioned",
    pynvml.NVML_ERROR_NOT_FOUND: "not_found",
}
SYSTEMS = {
    "pcie": S.DCGM_HEALTH_WATCH_PCIE, "nvlink": S.DCGM_HEALTH_WATCH_NVLINK, "pmu": S.DCGM_HEALTH_WATCH_PMU,
    "mcu": S.DCGM_HEALTH_WATCH_MCU, "mem": S.DCGM_HEALTH_WATCH_MEM, "sm": S.DCGM_HEALTH_WATCH_SM,
    "inforom": S.DCGM_HEALTH_WATCH_INFOROM, "thermal": S.DCGM_HEALTH_WATCH_THERMAL,
    "power": S.DCGM_HEALTH_WATCH_POWER, "driver": S.DCGM_HEALTH_WATCH_DRIVER,
    "nvswitch_nonfatal": S.DCGM_HEALTH_WATCH_NVSWITCH_NONFATAL, "nvswitch_fatal": S.DCGM_HEALTH_WATCH_NVSWITCH_FATAL,
    "connectx": S.DCGM_HEALTH_WATCH_CONNECTX,
}
HEALTH = {"pass": S.DCGM_HEALTH_RESULT_PASS, "warn": S.DCGM_HEALTH_RESULT_WARN, "fail": S.DCGM_HEALTH_RESULT_FAIL}

# Field type of each field the fake serves; everything else is int64.
_DOUBLE_FIELDS = {F.DCGM_FI_DEV_BOARD_POWER_WATTS, F.DCGM_FI_DEV_BOARD_POWER_LIMIT_ENFORCED_WATTS,
                  F.DCGM_FI_DEV_BOARD_POWER_RAW_WATTS, F.DCGM_FI_DEV_BOARD_POWER_LIMIT_REQUESTED_WATTS}
_STRING_FIELDS = {F.DCGM_FI_SYSTEM_DRIVER_VERSION, F.DCGM_FI_DEV_GPU_NAME, F.DCGM_FI_DEV_BOARD_SERIAL,
                  F.DCGM_FI_DEV_GPU_UUID, F.DCGM_FI_DEV_PCI_BUS_ID, F.DCGM_FI_DEV_VBIOS_VERSION}


def _nvlink_field_table() -> dict[int, tuple[int, int]]:
    """DCGM per-link error field id -> (link, NVML counter), from this module's own names."""
    counters = {"CRC_FLIT": pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT, "CRC_DATA": pynvml.NVML_NVLINK_ERROR_DL_CRC_DATA,
                "REPLAY": pynvml.NVML_NVLINK_ERROR_DL_REPLAY, "RECOVERY": pynvml.NVML_NVLINK_ERROR_DL_RECOVERY}
    table = {}
    for kind, counter in counters.items():
        for link in range(18):
            table[getattr(F, f"DCGM_FI_DEV_NVLINK_{kind}_ERROR_L{link}_TOTAL")] = (link, counter)
    return table


_NVLINK_FIELDS = _nvlink_field_table()


class _Blank(Exception):
    def __init__(self, kind: str, status: int = S.DCGM_ST_OK) -> None:
        self.kind, self.status = kind, status


@dataclass
class Incident:
    entity_group: int
    entity_id: int
    system: int
    health: int
    code: int
    msg: str


@dataclass
class Session:
    """One handle: embedded or a client connection, with the groups and watches it made."""

    handle: int
    embedded: bool
    address: str
    groups: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    field_groups: dict[int, list[int]] = field(default_factory=dict)
    watches: dict[tuple[int, int], tuple[int, float, int]] = field(default_factory=dict)
    health: dict[int, int] = field(default_factory=dict)
    checks: Counter = field(default_factory=Counter)


class FakeHostEngine:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        # Handle and group ids are never reused, not even across reset(): a handle left over from an
        # earlier test (disconnected late, or by DcgmHandle.__del__) must not close a new session.
        self.ids = itertools.count(1)
        self.reset()

    # --- test controls -------------------------------------------------------------------

    def reset(self, scenario: dict[str, Any] | None = None, *, clock: Any = None, wall: Any = None) -> None:
        """Start over: a new fleet from `scenario`, no sessions, connected, not stalled. `wall` stamps samples
        (dcgmFieldValue ts, microseconds since the epoch; time.time by default)."""
        scenario = dict(scenario or {})
        self.wall = wall or time.time
        self.sampling_stopped_at: float | None = None
        fixed = scenario.get("clock", None)
        if clock is None and fixed is not None:
            clock = lambda: float(fixed)  # noqa: E731
        with self._lock:
            self.sim = SimulatedNvml(sim_config_from_dict(scenario.get("sim") or {}),
                                     **({"clock": clock} if clock is not None else {}))
            self.sim.nvmlInit()
            self.nvswitches = list(range(int(scenario.get("nvswitches", 0))))
            self.overrides: dict[tuple[int, int], Any] = {}
            self.incidents: dict[tuple[int, int, int, int], Incident] = {}
            self.sessions: dict[int, Session] = {}
            self.up = True
            self.library_missing = False
            self.calls: Counter = Counter()
            self._gate = threading.Event()
            self._gate.set()
            self.stalled_calls = 0
        for b in scenario.get("blanks", []):
            self.set_blank(int(b["gpu"]), int(b["field"]), b.get("kind", "blank"))
        for i in scenario.get("incidents", []):
            if "nvswitch" in i:
                entity = (F.DCGM_FE_SWITCH, int(i["nvswitch"]))
            else:
                entity = (F.DCGM_FE_GPU, int(i.get("gpu", 0)))
            self.add_incident(*entity, i.get("system", "mem"), i.get("health", "fail"), int(i.get("code", 4)),
                              i.get("msg", ""))

    def set_blank(self, gpu: int, field_id: int, kind: str = "blank") -> None:
        """Make a field read as one of DCGM's blank sentinels."""
        if kind not in BLANK_KINDS:
            raise ValueError(f"blank kind {kind!r}; choose from {sorted(BLANK_KINDS)}")
        with self._lock:
            self.overrides[(gpu, field_id)] = _Blank(kind)

    def set_value(self, gpu: int, field_id: int, value: Any) -> None:
        with self._lock:
            self.overrides[(gpu, field_id)] = value

    def clear_override(self, gpu: int, field_id: int) -> None:
        with self._lock:
            self.overrides.pop((gpu, field_id), None)

    def add_incident(self, entity_group: int, entity_id: int, system: str | int, health: str | int, code: int,
                     msg: str = "") -> None:
        """An incident every later armed health check reports until `clear_incident`."""
        sysbit = SYSTEMS[system] if isinstance(system, str) else system
        result = HEALTH[health] if isinstance(health, str) else health
        with self._lock:
            self.incidents[(entity_group, entity_id, sysbit, code)] = Incident(
                entity_group, entity_id, sysbit, result, code, msg or f"fake incident {code}")

    def clear_incident(self, entity_group: int, entity_id: int, system: str | int, code: int) -> None:
        sysbit = SYSTEMS[system] if isinstance(system, str) else system
        with self._lock:
            self.incidents.pop((entity_group, entity_id, sysbit, code), None)

    def disconnect(self) -> None:
        """The host engine goes away: existing handles are dead, new connections refused."""
        with self._lock:
            self.up = False
            self.sessions = {h: s for h, s in self.sessions.items() if s.embedded}

    def restore(self) -> None:
        """The host engine is back (a new process: old handles stay invalid)."""
        with self._lock:
            self.up = True

    def stop_sampling(self) -> None:
        """The host engine answers but samples no more: every field keeps its last value and timestamp."""
        with self._lock:
            self.sampling_stopped_at = self.wall()
            self._frozen: dict[tuple[int, int], Any] = {}

    def resume_sampling(self) -> None:
        with self._lock:
            self.sampling_stopped_at = None

    def sample_time(self) -> float:
        return self.sampling_stopped_at if self.sampling_stopped_at is not None else self.wall()

    def stall(self) -> None:
        """Every call from now on blocks until unstall(): a hung host engine."""
        self._gate.clear()

    def unstall(self) -> None:
        self._gate.set()

    def health_checks(self) -> int:
        return sum(sum(s.checks.values()) for s in self.sessions.values())

    # --- used by the fake dcgm_agent ------------------------------------------------------

    def enter(self, name: str, handle: Any = None) -> Session | None:
        """Count the call, block while stalled, and resolve the handle (None for handle-less calls)."""
        with self._lock:
            self.calls[name] += 1
        if not self._gate.is_set():
            with self._lock:
                self.stalled_calls += 1
            self._gate.wait()
        if handle is None:
            return None
        key = handle.value if hasattr(handle, "value") else handle
        with self._lock:
            session = self.sessions.get(key)
            if session is None or (not session.embedded and not self.up):
                raise S.DCGMError(S.DCGM_ST_CONNECTION_NOT_VALID)
            return session

    def open_session(self, *, embedded: bool, address: str = "") -> int:
        with self._lock:
            if not embedded and not self.up:
                raise S.DCGMError(S.DCGM_ST_CONNECTION_NOT_VALID)
            handle = next(self.ids)
            self.sessions[handle] = Session(handle, embedded, address)
            return handle

    def close_session(self, handle: Any) -> None:
        key = handle.value if hasattr(handle, "value") else handle
        with self._lock:
            self.sessions.pop(key, None)

    def gpu_ids(self) -> list[int]:
        """DCGM GPU ids: the simulated GPUs still on the bus (a lost GPU keeps its id, as in DCGM)."""
        sim = self.sim
        return [g.index for g in sim._gpus if not any(f.params.get("remove") for f in sim._active(g, "gpu_lost"))]

    def handle_of(self, gpu_id: int) -> SimHandle:
        if gpu_id not in self.gpu_ids():
            raise S.DCGMError(S.DCGM_ST_BADPARAM)
        return SimHandle(gpu_id)

    def attributes(self, gpu_id: int) -> Any:
        h = self.handle_of(gpu_id)
        attrs = S.c_dcgmDeviceAttributes_v3()
        attrs.version = S.dcgmDeviceAttributes_version3
        try:
            ids = attrs.identifiers
            pci = self.sim.nvmlDeviceGetPciInfo_v3(h)
            ids.brandName = "Nvidia"
            ids.deviceName = self.sim.nvmlDeviceGetName(h)
            ids.pciBusId = pci.busId.decode() if isinstance(pci.busId, bytes) else pci.busId
            ids.serial = self.sim.nvmlDeviceGetSerial(h)
            ids.uuid = self.sim.nvmlDeviceGetUUID(h)
            ids.vbios = self.sim.nvmlDeviceGetVbiosVersion(h)
            ids.pciDeviceId = pci.pciDeviceId
            ids.driverVersion = self.sim.nvmlSystemGetDriverVersion()
            attrs.thermalSettings.slowdownTemp = self.sim.nvmlDeviceGetTemperatureThreshold(
                h, pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN)
            attrs.thermalSettings.shutdownTemp = self.sim.nvmlDeviceGetTemperatureThreshold(
                h, pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN)
            limit = self.sim.nvmlDeviceGetEnforcedPowerLimit(h) // 1000
            attrs.powerLimits.enforcedPowerLimit = limit
            attrs.powerLimits.curPowerLimit = limit
            attrs.memoryUsage.fbTotal = self.sim.model.memory_bytes // (1024 * 1024)
            attrs.settings.persistenceModeEnabled = self.sim.nvmlDeviceGetPersistenceMode(h)
        except pynvml.NVMLError as exc:
            if exc.value == pynvml.NVML_ERROR_GPU_IS_LOST:
                raise S.DCGMError(S.DCGM_ST_GPU_IS_LOST) from exc
            raise S.DCGMError(S.DCGM_ST_NVML_ERROR) from exc
        return attrs

    def link_states(self, gpu_id: int) -> list[int]:
        h = self.handle_of(gpu_id)
        states = []
        for link in range(S.DCGM_NVLINK_MAX_LINKS_PER_GPU):
            try:
                on = self.sim.nvmlDeviceGetNvLinkState(h, link)
            except pynvml.NVMLError:
                states.append(S.DcgmNvLinkLinkStateNotSupported)
                continue
            states.append(S.DcgmNvLinkLinkStateUp if on == pynvml.NVML_FEATURE_ENABLED else S.DcgmNvLinkLinkStateDown)
        return states

    def watched(self, session: Session, entity: tuple[int, int], field_id: int) -> bool:
        for (group, fg) in session.watches:
            if entity in session.groups.get(group, ()) and field_id in session.field_groups.get(fg, ()):
                return True
        return False

    def read(
        self, session: Session, entity_group: int, entity_id: int, field_id: int, live: bool
    ) -> tuple[str, Any, int]:
        """(field type char, value, status) for one field of one entity, as dcgm*GetLatestValues returns it."""
        kind = "d" if field_id in _DOUBLE_FIELDS else "s" if field_id in _STRING_FIELDS else "i"
        blanks = {"i": 0, "d": 1, "s": 2}
        if entity_group != F.DCGM_FE_GPU or entity_id not in self.gpu_ids():
            return kind, BLANK_KINDS["not_found"][blanks[kind]], S.DCGM_ST_BADPARAM
        if not live and not self.watched(session, (entity_group, entity_id), field_id):
            return kind, BLANK_KINDS["blank"][blanks[kind]], S.DCGM_ST_NOT_WATCHED
        try:
            with self._lock:
                override = self.overrides.get((entity_id, field_id), None)
            if isinstance(override, _Blank):
                raise override
            if self.sampling_stopped_at is not None:
                key = (entity_id, field_id)
                if key not in self._frozen:
                    self._frozen[key] = override if override is not None else self._compute(entity_id, field_id)
                value = self._frozen[key]
            else:
                value = override if override is not None else self._compute(entity_id, field_id)
        except _Blank as blank:
            return kind, BLANK_KINDS[blank.kind][blanks[kind]], blank.status
        if kind == "d":
            value = float(value)
        elif kind == "i":
            value = int(value)
        return kind, value, S.DCGM_ST_OK

    def _compute(self, gpu_id: int, fid: int) -> Any:
        sim, h = self.sim, SimHandle(gpu_id)
        try:
            return self._from_sim(sim, h, fid)
        except pynvml.NVMLError as exc:
            if exc.value == pynvml.NVML_ERROR_GPU_IS_LOST:
                raise _Blank("blank", S.DCGM_ST_GPU_IS_LOST) from exc
            raise _Blank(_NVML_TO_BLANK.get(exc.value, "blank")) from exc

    @staticmethod
    def _nvml_field(sim: SimulatedNvml, h: SimHandle, nvml_id: int) -> int:
        (fv,) = sim.nvmlDeviceGetFieldValues(h, [nvml_id])
        if fv.nvmlReturn != pynvml.NVML_SUCCESS:
            raise pynvml.NVMLError(fv.nvmlReturn)
        return fv.value.ullVal

    def _from_sim(self, sim: SimulatedNvml, h: SimHandle, fid: int) -> Any:
        mib = 1024 * 1024
        if fid in _NVLINK_FIELDS:
            link, counter = _NVLINK_FIELDS[fid]
            return sim.nvmlDeviceGetNvLinkErrorCounter(h, link, counter)
        if fid == F.DCGM_FI_CUDA_DRIVER_VERSION:
            return sim.nvmlSystemGetCudaDriverVersion()
        if fid == F.DCGM_FI_SYSTEM_DRIVER_VERSION:
            return sim.nvmlSystemGetDriverVersion()
        if fid == F.DCGM_FI_DEV_GPU_PERSISTENCE_MODE:
            return sim.nvmlDeviceGetPersistenceMode(h)
        if fid == F.DCGM_FI_DEV_MIG_MODE:
            return sim.nvmlDeviceGetMigMode(h)[0]
        if fid == F.DCGM_FI_DEV_SM_CLOCK:
            return sim.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)
        if fid == F.DCGM_FI_DEV_MEM_CLOCK:
            return sim.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM)
        if fid == F.DCGM_FI_DEV_CLOCKS_EVENT_REASONS:
            return sim.nvmlDeviceGetCurrentClocksEventReasons(h)
        if fid == F.DCGM_FI_DEV_MEMORY_TEMP_CELSIUS:
            return self._nvml_field(sim, h, pynvml.NVML_FI_DEV_MEMORY_TEMP)
        if fid == F.DCGM_FI_DEV_GPU_TEMP_CELSIUS:
            return sim.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)
        if fid == F.DCGM_FI_DEV_BOARD_POWER_WATTS:
            return sim.nvmlDeviceGetPowerUsage(h) / 1000.0
        if fid == F.DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION:
            return sim.nvmlDeviceGetTotalEnergyConsumption(h)
        if fid == F.DCGM_FI_DEV_GPU_TEMP_SLOWDOWN_CELSIUS:
            return sim.nvmlDeviceGetTemperatureThreshold(h, pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN)
        if fid == F.DCGM_FI_DEV_GPU_TEMP_SHUTDOWN_CELSIUS:
            return sim.nvmlDeviceGetTemperatureThreshold(h, pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN)
        if fid == F.DCGM_FI_DEV_BOARD_POWER_LIMIT_ENFORCED_WATTS:
            return sim.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0
        if fid in (F.DCGM_FI_DEV_FABRIC_MANAGER_STATUS, F.DCGM_FI_DEV_FABRIC_MANAGER_ERROR,
                   F.DCGM_FI_DEV_FABRIC_HEALTH_SUMMARY):
            return self._fabric(sim, h, fid)
        if fid == F.DCGM_FI_DEV_GPU_PSTATE:
            return sim.nvmlDeviceGetPerformanceState(h)
        if fid == F.DCGM_FI_DEV_PCIE_REPLAY_TOTAL:
            return sim.nvmlDeviceGetPcieReplayCounter(h)
        if fid in (F.DCGM_FI_DEV_GPU_UTIL_RATIO, F.DCGM_FI_DEV_MEM_COPY_UTIL):
            util = sim.nvmlDeviceGetUtilizationRates(h)
            return util.gpu if fid == F.DCGM_FI_DEV_GPU_UTIL_RATIO else util.memory
        if fid == F.DCGM_FI_DEV_PCIE_MAX_LINK_GEN:
            return sim.nvmlDeviceGetMaxPcieLinkGeneration(h)
        if fid == F.DCGM_FI_DEV_PCIE_MAX_LINK_WIDTH:
            return sim.nvmlDeviceGetMaxPcieLinkWidth(h)
        if fid == F.DCGM_FI_DEV_PCIE_LINK_GEN:
            return sim.nvmlDeviceGetCurrPcieLinkGeneration(h)
        if fid == F.DCGM_FI_DEV_PCIE_LINK_WIDTH:
            return sim.nvmlDeviceGetCurrPcieLinkWidth(h)
        if fid in (F.DCGM_FI_DEV_FB_TOTAL, F.DCGM_FI_DEV_FB_FREE, F.DCGM_FI_DEV_FB_USED, F.DCGM_FI_DEV_FB_RESERVED):
            mem = sim.nvmlDeviceGetMemoryInfo(h, pynvml.nvmlMemory_v2)
            return {F.DCGM_FI_DEV_FB_TOTAL: mem.total, F.DCGM_FI_DEV_FB_FREE: mem.free,
                    F.DCGM_FI_DEV_FB_USED: mem.used, F.DCGM_FI_DEV_FB_RESERVED: mem.reserved}[fid] // mib
        if fid in (F.DCGM_FI_DEV_ECC_MODE, F.DCGM_FI_DEV_ECC_PENDING):
            current, pending = sim.nvmlDeviceGetEccMode(h)
            return current if fid == F.DCGM_FI_DEV_ECC_MODE else pending
        nvml_fields = {
            F.DCGM_FI_DEV_ECC_SBE_VOL_TOTAL: pynvml.NVML_FI_DEV_ECC_SBE_VOL_TOTAL,
            F.DCGM_FI_DEV_ECC_DBE_VOL_TOTAL: pynvml.NVML_FI_DEV_ECC_DBE_VOL_TOTAL,
            F.DCGM_FI_DEV_ECC_SBE_AGG_TOTAL: pynvml.NVML_FI_DEV_ECC_SBE_AGG_TOTAL,
            F.DCGM_FI_DEV_ECC_DBE_AGG_TOTAL: pynvml.NVML_FI_DEV_ECC_DBE_AGG_TOTAL,
            F.DCGM_FI_DEV_PAGE_RETIRED_SBE_TOTAL: pynvml.NVML_FI_DEV_RETIRED_SBE,
            F.DCGM_FI_DEV_PAGE_RETIRED_DBE_TOTAL: pynvml.NVML_FI_DEV_RETIRED_DBE,
            F.DCGM_FI_DEV_PAGE_RETIRED_PENDING: pynvml.NVML_FI_DEV_RETIRED_PENDING,
        }
        if fid in nvml_fields:
            return self._nvml_field(sim, h, nvml_fields[fid])
        remap = {F.DCGM_FI_DEV_ROW_REMAP_CORRECTABLE_TOTAL: 0, F.DCGM_FI_DEV_ROW_REMAP_UNCORRECTABLE_TOTAL: 1,
                 F.DCGM_FI_DEV_ROW_REMAP_PENDING: 2, F.DCGM_FI_DEV_ROW_REMAP_FAILED: 3}
        if fid in remap:
            return sim.nvmlDeviceGetRemappedRows(h)[remap[fid]]
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    @staticmethod
    def _fabric(sim: SimulatedNvml, h: SimHandle, fid: int) -> int:
        info = pynvml.c_nvmlGpuFabricInfo_v3_t()
        info.version = pynvml.nvmlGpuFabricInfo_v3
        sim.nvmlDeviceGetGpuFabricInfoV(h, ctypes.byref(info))
        if fid == F.DCGM_FI_DEV_FABRIC_HEALTH_SUMMARY:
            return int(info.healthSummary)
        # DcgmCacheManager::GetFMStatusFromStruct
        if info.state == 3:
            status = S.DcgmFMStatusSuccess if info.status == pynvml.NVML_SUCCESS else S.DcgmFMStatusFailure
            error = S.DCGM_ST_OK if info.status == pynvml.NVML_SUCCESS else S.DCGM_ST_NVML_ERROR
        else:
            status, error = int(info.state), V.DCGM_INT64_BLANK
        return status if fid == F.DCGM_FI_DEV_FABRIC_MANAGER_STATUS else error

    def health_check(self, session: Session, group: int) -> list[Incident]:
        """Incidents for one dcgmHealthCheck; the group's first check arms it and returns none."""
        if group not in session.groups:
            raise S.DCGMError(S.DCGM_ST_BADPARAM)
        with self._lock:
            session.checks[group] += 1
            if session.checks[group] == 1:
                return []
            systems = session.health.get(group, 0)
            members = set(session.groups[group])
            return [i for i in self.incidents.values()
                    if (i.entity_group, i.entity_id) in members and i.system & systems]


def _load_scenario() -> dict[str, Any] | None:
    path = os.environ.get("DCGM_FAKE_SCENARIO")
    if not path:
        return None
    with open(path, encoding="utf-8") as fh:
        if path.endswith((".yaml", ".yml")):
            import yaml

            return yaml.safe_load(fh) or {}
        return json.load(fh)


ENGINE = FakeHostEngine()
if (_scenario := _load_scenario()) is not None:
    ENGINE.reset(_scenario)
