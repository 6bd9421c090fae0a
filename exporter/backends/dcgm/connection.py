"""One connection to a DCGM host engine (embedded in this process, or nv-hostengine), shared by the
DCGM backend and the dcgm / dcgm_health collectors.

Every DCGM call runs on this connection's own thread ("dcgm-io"), one at a time. Callers (the
poller's per-GPU workers) wait for it at most `timeout` seconds, then carry on with what they had:
a host engine seen hanging for 45 s must not hold up collection. While a call is stuck past the
deadline no new call is queued (no pile-up), the connection reports itself not connected, and the
call is counted in `timeouts`. A call that fails because the connection is gone (DCGMError
ConnectionNotValid and friends) drops the session; the next caller starts a reconnect on the same
thread, immediately the first time, then after 1, 2, 4 ... up to 30 s between failed attempts.
A reconnect recreates the groups, the field watches and the health watches.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import pynvml

from gpu_health_common.durations import parse_duration

from ...errors import ConfigError
from . import fields
from .bindings import Bindings, load_bindings

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT: Final = 0.5
BACKOFF_INITIAL: Final = 1.0
BACKOFF_CAP: Final = 30.0


class DcgmError(pynvml.NVMLError):
    """A DCGM failure handed to NVML-speaking code: an NVMLError with a DCGM message.

    pynvml.NVMLError(code) looks its message up in libnvidia-ml, which the DCGM backend never loads.
    """

    def __new__(cls, message: str, code: int = pynvml.NVML_ERROR_UNKNOWN) -> DcgmError:
        obj = pynvml.NVMLError.__new__(cls, code)
        obj.message = message
        return obj

    def __init__(self, message: str, code: int = pynvml.NVML_ERROR_UNKNOWN) -> None:
        Exception.__init__(self, message)

    def __str__(self) -> str:
        return self.message


class DcgmUnavailable(DcgmError):
    """The host engine cannot answer now: not connected, connecting, or a call past its deadline.

    Its NVML code is Unknown, never GpuIsLost: a disconnected host engine is not a lost GPU.
    """


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """What DCGM says about one GPU when we connect (dcgmGetDeviceAttributes); fixed while connected."""

    gpu_id: int
    uuid: str
    name: str
    serial: str
    pci_bus_id: str
    vbios: str
    driver: str
    pci_device_id: int
    lost: bool = False


@dataclass(frozen=True, slots=True)
class ConnectionState:
    """The connection as the dcgm collector exports it."""

    address: str
    connected: bool
    connects: int
    reconnects: int
    failures: int
    timeouts: int
    last_error: str


@dataclass(frozen=True, slots=True)
class Incident:
    entity_group: int
    entity_id: int
    system: int
    health: int
    code: int
    message: str


@dataclass(frozen=True, slots=True)
class HealthResult:
    session: int
    check: int  # 1 for the first check of this session's health group: it only arms the watches
    overall: int
    incidents: tuple[Incident, ...]


class _Job:
    __slots__ = ("what", "fn", "on_done", "connect", "done", "result", "error", "started", "abandoned")

    def __init__(self, what: str, fn: Callable[[_Session], Any] | None, on_done: Callable[[Any], None] | None,
                 connect: bool = False) -> None:
        self.what, self.fn, self.on_done, self.connect = what, fn, on_done, connect
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.started: float | None = None
        self.abandoned = False


class _Session:
    """One live handle with its groups and watches. Used on the dcgm-io thread only."""

    def __init__(self, b: Bindings, dcgm_handle: Any, number: int) -> None:
        self.b = b
        self.dcgm_handle = dcgm_handle
        self.handle = dcgm_handle.handle
        self.number = number
        self.inventory: tuple[GpuInfo, ...] = ()
        self.switches: tuple[int, ...] = ()
        self.gpu_group: Any = None
        self.health_group: Any = None
        self.watched: tuple[tuple[int, ...], float] | None = None
        self.health_systems = 0
        self.health_checks = 0

    # --- setup ---------------------------------------------------------------------------

    def discover(self) -> None:
        agent, structs = self.b.dcgm_agent, self.b.dcgm_structs
        inventory = []
        for gpu_id in sorted(agent.dcgmGetAllSupportedDevices(self.handle)):
            try:
                ids = agent.dcgmGetDeviceAttributes(self.handle, gpu_id).identifiers
                inventory.append(GpuInfo(
                    gpu_id=int(gpu_id), uuid=_text(ids.uuid), name=_text(ids.deviceName), serial=_text(ids.serial),
                    pci_bus_id=_text(ids.pciBusId), vbios=_text(ids.vbios), driver=_text(ids.driverVersion),
                    pci_device_id=int(ids.pciDeviceId),
                ))
            except structs.DCGMError as exc:
                if exc.value not in (structs.DCGM_ST_GPU_IS_LOST, structs.DCGM_ST_RESET_REQUIRED):
                    raise
                inventory.append(GpuInfo(int(gpu_id), "", "", "", "", "", "", 0, lost=True))
        self.inventory = tuple(inventory)
        try:
            switches = agent.dcgmGetEntityGroupEntities(self.handle, self.b.dcgm_fields.DCGM_FE_SWITCH, 0)
            self.switches = tuple(sorted(int(s) for s in switches))
        except structs.DCGMError:
            self.switches = ()  # no NVSwitch support on this host (or in this DCGM build)

    def _group(self, name: str, entities: Iterable[tuple[int, int]]) -> Any:
        agent, structs = self.b.dcgm_agent, self.b.dcgm_structs
        group = agent.dcgmGroupCreate(self.handle, structs.DCGM_GROUP_EMPTY, f"{name}-{id(self):x}")
        for entity_group, entity_id in entities:
            agent.dcgmGroupAddEntity(self.handle, group, entity_group, entity_id)
        return group

    def watch_fields(self, field_ids: tuple[int, ...], update_interval: float) -> None:
        if self.watched == (field_ids, update_interval) or not self.inventory:
            return
        agent, structs = self.b.dcgm_agent, self.b.dcgm_structs
        if self.gpu_group is None:
            gpu = self.b.dcgm_fields.DCGM_FE_GPU
            self.gpu_group = self._group("gpu-health-fields", [(gpu, g.gpu_id) for g in self.inventory])
        limit = int(getattr(structs, "DCGM_MAX_FIELD_IDS_PER_FIELD_GROUP", 128))
        freq_us = max(int(update_interval * 1e6), 100_000)
        keep_age = max(60.0, 4 * update_interval)
        for n, start in enumerate(range(0, len(field_ids), limit)):
            chunk = list(field_ids[start:start + limit])
            fg = agent.dcgmFieldGroupCreate(self.handle, chunk, f"gpu-health-{n}-{id(self):x}")
            agent.dcgmWatchFields(self.handle, self.gpu_group, fg, freq_us, keep_age, 4)
        # Without this the first reads would be blank until the host engine's next update loop.
        agent.dcgmUpdateAllFields(self.handle, 1)
        self.watched = (field_ids, update_interval)

    def watch_health(self, systems: int) -> None:
        if self.health_systems == systems or not systems:
            return
        if self.health_group is None:
            fe = self.b.dcgm_fields
            members = [(fe.DCGM_FE_GPU, g.gpu_id) for g in self.inventory if not g.lost]
            members += [(fe.DCGM_FE_SWITCH, s) for s in self.switches]
            if not members:
                return
            self.health_group = self._group("gpu-health-health", members)
        self.b.dcgm_agent.dcgmHealthSet(self.handle, self.health_group, systems)
        self.health_systems = systems
        self.health_checks = 0

    def close(self) -> None:
        self.dcgm_handle.Shutdown()

    # --- reads ---------------------------------------------------------------------------

    def latest(self, gpu_id: int, field_ids: tuple[int, ...]) -> tuple[dict[int, tuple[str, Any]], float | None]:
        """The fields' latest values, and the wall time of the newest sample among them (None if no sample
        carries one): a host engine whose sampling stalled keeps answering with old samples."""
        agent, fe = self.b.dcgm_agent, self.b.dcgm_fields
        values = agent.dcgmEntityGetLatestValues(self.handle, fe.DCGM_FE_GPU, gpu_id, list(field_ids))
        newest = max((int(fv.ts) for fv in values if int(fv.status) == self.b.dcgm_structs.DCGM_ST_OK), default=0)
        return {int(fv.fieldId): decode(self.b, fv) for fv in values}, (newest / 1e6 if newest > 0 else None)

    def link_states(self) -> dict[int, tuple[int, ...]]:
        status = self.b.dcgm_agent.dcgmGetNvLinkLinkStatus(self.handle)
        return {int(status.gpus[i].entityId): tuple(int(s) for s in status.gpus[i].linkState)
                for i in range(int(status.numGpus))}

    def health_check(self) -> HealthResult:
        if self.health_group is None:
            raise DcgmError("DCGM health watches are not set (no GPU or NVSwitch in the health group)")
        resp = self.b.dcgm_agent.dcgmHealthCheck(self.handle, self.health_group)
        self.health_checks += 1
        incidents = []
        for i in range(int(resp.incidentCount)):
            inc = resp.incidents[i]
            incidents.append(Incident(
                int(inc.entityInfo.entityGroupId), int(inc.entityInfo.entityId), int(inc.system), int(inc.health),
                int(inc.error.code), _text(inc.error.msg),
            ))
        return HealthResult(self.number, self.health_checks, int(resp.overallHealth), tuple(incidents))


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def decode(b: Bindings, fv: Any) -> tuple[str, Any]:
    """One dcgmFieldValue as ("ok", value) or (why it has none); a blank sentinel is never a value.

    Kinds: ok, not_supported, no_permission, no_data (blank, not found, not watched, not sampled
    yet), lost (GPU is lost), reset (GPU needs a reset).
    """
    structs, v = b.dcgm_structs, b.dcgmvalue
    status = int(fv.status)
    if status != structs.DCGM_ST_OK:
        return {
            structs.DCGM_ST_GPU_IS_LOST: ("lost", None),
            structs.DCGM_ST_RESET_REQUIRED: ("reset", None),
            structs.DCGM_ST_NOT_SUPPORTED: ("not_supported", None),
            structs.DCGM_ST_NO_PERMISSION: ("no_permission", None),
        }.get(status, ("no_data", None))
    kind = chr(int(fv.fieldType))
    if kind in ("i", "t"):
        value: Any = int(fv.value.i64)
        if value >= v.DCGM_INT64_BLANK:
            return _blank(value, v.DCGM_INT64_NOT_SUPPORTED, v.DCGM_INT64_NOT_PERMISSIONED)
        return ("ok", value)
    if kind == "d":
        value = float(fv.value.dbl)
        if math.isnan(value):
            return ("no_data", None)
        if value >= v.DCGM_FP64_BLANK:
            return _blank(value, v.DCGM_FP64_NOT_SUPPORTED, v.DCGM_FP64_NOT_PERMISSIONED)
        return ("ok", value)
    if kind == "s":
        value = _text(fv.value.str)
        if value.startswith("<<<") and ">>>" in value:
            return _blank(value, v.DCGM_STR_NOT_SUPPORTED, v.DCGM_STR_NOT_PERMISSIONED)
        return ("ok", value)
    return ("no_data", None)  # binary blobs: no field we watch has one


def _blank(value: Any, not_supported: Any, not_permissioned: Any) -> tuple[str, None]:
    if value == not_supported:
        return ("not_supported", None)
    if value == not_permissioned:
        return ("no_permission", None)
    return ("no_data", None)


class DcgmConnection:
    """A host-engine connection with its own I/O thread, deadline, reconnects and health tracker."""

    def __init__(
        self,
        bindings: Bindings,
        *,
        address: str = "",
        timeout: float = DEFAULT_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_cap: float = BACKOFF_CAP,
        connect_timeout: float = 5.0,
    ) -> None:
        self.b = bindings
        self.address = address
        self.timeout = timeout
        self.clock = clock
        self.wall = wall
        self._backoff_initial, self._backoff_cap = backoff_initial, backoff_cap
        self._connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._running: _Job | None = None
        self._session: _Session | None = None
        self._sessions = 0
        self._inventory: tuple[GpuInfo, ...] | None = None
        self._switches: tuple[int, ...] = ()
        self._connecting = False
        self._next_attempt = 0.0
        self._backoff = backoff_initial
        self._stalled: _Job | None = None
        self._closed = False
        self._connects = self._failures = self._timeouts = 0
        self._last_error = "not connected yet"
        self._fields: tuple[tuple[int, ...], float] | None = None
        self._health_systems = 0
        self.health = HealthTracker(self)
        self._thread = threading.Thread(target=self._loop, name="dcgm-io", daemon=True)
        self._thread.start()

    # --- configuration -----------------------------------------------------------------------

    def watch_fields(self, field_ids: Iterable[int], update_interval: float) -> None:
        """Watch these GPU fields every `update_interval` seconds (from the next call on)."""
        with self._lock:
            self._fields = (tuple(field_ids), float(update_interval))

    def watch_health(self, systems: int) -> None:
        """Set health watches on every GPU and NVSwitch for these DCGM_HEALTH_WATCH_* systems."""
        with self._lock:
            self._health_systems |= systems

    @property
    def _where(self) -> str:
        return self.address or "(embedded)"

    @property
    def health_systems(self) -> int:
        return self._health_systems

    # --- state -------------------------------------------------------------------------------

    def state(self) -> ConnectionState:
        with self._lock:
            return ConnectionState(
                address=self.address or "embedded",
                connected=self._session is not None and self._stalled is None,
                connects=self._connects,
                reconnects=max(0, self._connects - 1),
                failures=self._failures,
                timeouts=self._timeouts,
                last_error=self._last_error,
            )

    def inventory(self) -> tuple[GpuInfo, ...] | None:
        """The GPUs of the current session, else of the last one (None before the first connect)."""
        with self._lock:
            return self._inventory

    def switches(self) -> tuple[int, ...]:
        with self._lock:
            return self._switches

    def gpu_by_uuid(self, uuid: str) -> GpuInfo | None:
        return next((g for g in self.inventory() or () if g.uuid == uuid), None)

    # --- calls -------------------------------------------------------------------------------

    def run(self, what: str, fn: Callable[[_Session], Any], *, on_done: Callable[[Any], None] | None = None) -> Any:
        """Run fn(session) on the I/O thread and return its result within `timeout` seconds.

        Raises DcgmUnavailable when not connected or past the deadline (fn still completes later, and
        on_done still gets its result), an NVMLError for DCGM errors that mean something to NVML code
        (GpuIsLost, NotSupported, ...), DcgmError for any other DCGM error.
        """
        job = self._submit(what, fn, on_done)
        if job.done.wait(self.timeout):
            if job.error is not None:
                raise job.error
            return job.result
        with self._lock:
            job.abandoned = True
            if job.started is None:
                busy = self._running.what if self._running else "?"
                reason = "connecting" if self._connecting else f"busy with {busy}"
                raise DcgmUnavailable(f"DCGM host engine {self._where}: {what} not started: {reason}")
            self._timeouts += 1
            if self._stalled is None:
                log.warning("DCGM call past its deadline", extra={"call": what, "timeout": self.timeout})
            self._stalled = job
        raise DcgmUnavailable(f"DCGM host engine {self._where}: {what} timed out after {self.timeout}s")

    def _submit(self, what: str, fn: Callable[[_Session], Any], on_done: Callable[[Any], None] | None) -> _Job:
        now = self.clock()
        where = self._where
        with self._lock:
            if self._closed:
                raise DcgmUnavailable(f"DCGM host engine {where}: connection closed")
            running = self._running
            if running is not None and running.started is not None and now - running.started > self.timeout:
                # Stuck (or a slow connect): queue nothing behind it, so no work piles up.
                raise DcgmUnavailable(
                    f"DCGM host engine {where}: {running.what} has not returned for {now - running.started:.1f}s"
                )
            if self._session is None and not self._connecting:
                if now < self._next_attempt:
                    raise DcgmUnavailable(
                        f"DCGM host engine {where}: not connected ({self._last_error}); "
                        f"next attempt in {self._next_attempt - now:.1f}s"
                    )
                self._connecting = True
                self._jobs.put(_Job("connect", None, None, connect=True))
            job = _Job(what, fn, on_done)
            self._jobs.put(job)
            return job

    def close(self) -> None:
        """Disconnect (or stop the embedded host engine) and end the I/O thread; waits at most `timeout`."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        done = _Job("close", None, None)
        self._jobs.put(done)
        self._jobs.put(None)
        done.done.wait(self.timeout)

    # --- the I/O thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            with self._lock:
                if job.abandoned:
                    job.done.set()
                    continue
                job.started = self.clock()
                self._running = job
            try:
                if job.connect:
                    self._connect()
                elif job.what == "close" and job.fn is None:
                    self._drop("closed", count=False)
                else:
                    job.result = self._call(job)
            except BaseException as exc:  # handed to the caller; this thread must survive anything
                job.error = exc
            finally:
                with self._lock:
                    self._running = None
                    if self._stalled is job:
                        self._stalled = None
                job.done.set()

    def _call(self, job: _Job) -> Any:
        structs = self.b.dcgm_structs
        session = self._session
        if session is None:
            raise DcgmUnavailable(f"DCGM host engine {self._where}: not connected ({self._last_error})")
        try:
            self._configure(session)
            result = job.fn(session)  # type: ignore[misc]
        except structs.DCGMError as exc:
            if exc.value in self._connection_codes():
                self._drop(f"{job.what}: {exc}")
                raise DcgmUnavailable(f"DCGM host engine {self._where}: {job.what}: {exc}") from exc
            raise translate(self.b, exc, job.what) from exc
        if job.on_done is not None:
            job.on_done(result)
        return result

    def _configure(self, session: _Session) -> None:
        with self._lock:
            wanted_fields, systems = self._fields, self._health_systems
        if wanted_fields is not None:
            session.watch_fields(*wanted_fields)
        if systems:
            session.watch_health(systems)

    def _connection_codes(self) -> set[int]:
        s = self.b.dcgm_structs
        names = ("DCGM_ST_CONNECTION_NOT_VALID", "DCGM_ST_UNINITIALIZED", "DCGM_ST_INIT_ERROR", "DCGM_ST_TIMEOUT")
        return {getattr(s, n) for n in names if hasattr(s, n)}

    def _open(self) -> Any:
        pydcgm, structs = self.b.pydcgm, self.b.dcgm_structs
        kwargs: dict[str, Any] = {"opMode": structs.DCGM_OPERATION_MODE_AUTO}
        if self.address.startswith("unix://"):
            kwargs["unixSocketPath"] = self.address[len("unix://"):]
        elif self.address.startswith("/"):
            kwargs["unixSocketPath"] = self.address
        elif self.address:
            kwargs["ipAddress"] = self.address
        if self.address:
            kwargs["timeoutMs"] = int(self._connect_timeout * 1000)
        return pydcgm.DcgmHandle(**kwargs)

    def _connect(self) -> None:
        session: _Session | None = None
        try:
            handle = self._open()
            with self._lock:
                self._sessions += 1
                number = self._sessions
            session = _Session(self.b, handle, number)
            session.discover()
            self._configure(session)
        except Exception as exc:
            if session is not None:
                _quietly(session.close)
            now = self.clock()
            with self._lock:
                self._failures += 1
                self._last_error = f"connect: {exc}"
                self._next_attempt = now + self._backoff
                wait, self._backoff = self._backoff, min(self._backoff * 2, self._backoff_cap)
                self._connecting = False
            log.error("DCGM connect failed", extra={"address": self.address or "embedded", "error": str(exc),
                                                    "retry_in": wait})
            return
        with self._lock:
            self._session = session
            self._inventory = session.inventory
            self._switches = session.switches
            self._connects += 1
            self._backoff = self._backoff_initial
            self._connecting = False
            self._last_error = ""
            first = self._connects == 1
        log.info("DCGM connected" if first else "DCGM reconnected",
                 extra={"address": self.address or "embedded", "gpus": len(session.inventory),
                        "nvswitches": len(session.switches)})

    def _drop(self, why: str, *, count: bool = True) -> None:
        """Forget the session (on the I/O thread); the next caller reconnects, at once the first time."""
        with self._lock:
            session, self._session = self._session, None
            if count:
                self._failures += 1
                self._last_error = why
                self._next_attempt = self.clock()
        if session is not None:
            if count:
                log.error("DCGM connection lost", extra={"address": self.address or "embedded", "error": why})
            _quietly(session.close)


def _quietly(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception as exc:  # tearing down a dead connection fails in many ways; none matters
        log.debug("DCGM teardown", extra={"error": repr(exc)})


def translate(b: Bindings, exc: Any, what: str) -> pynvml.NVMLError:
    """A DCGMError as the NVMLError NVML would have raised for the same condition."""
    s = b.dcgm_structs
    codes = {
        "DCGM_ST_GPU_IS_LOST": pynvml.NVML_ERROR_GPU_IS_LOST,
        "DCGM_ST_RESET_REQUIRED": pynvml.NVML_ERROR_RESET_REQUIRED,
        "DCGM_ST_NOT_SUPPORTED": pynvml.NVML_ERROR_NOT_SUPPORTED,
        "DCGM_ST_FIELD_UNSUPPORTED_BY_API": pynvml.NVML_ERROR_NOT_SUPPORTED,
        "DCGM_ST_NO_PERMISSION": pynvml.NVML_ERROR_NO_PERMISSION,
        "DCGM_ST_REQUIRES_ROOT": pynvml.NVML_ERROR_NO_PERMISSION,
        "DCGM_ST_NO_DATA": pynvml.NVML_ERROR_NO_DATA,
        "DCGM_ST_NOT_WATCHED": pynvml.NVML_ERROR_NO_DATA,
        "DCGM_ST_STALE_DATA": pynvml.NVML_ERROR_NO_DATA,
    }
    for name, code in codes.items():
        if getattr(s, name, None) == exc.value:
            return pynvml.NVMLError(code)
    return DcgmError(f"DCGM {what}: {exc}")


# --- health ------------------------------------------------------------------------------------

_PASS, _WARN, _FAIL = 0, 1, 2


def level(result: int) -> int:
    """DCGM_HEALTH_RESULT_PASS (0) / WARN (10) / FAIL (20) as 0 / 1 / 2."""
    return _FAIL if result >= 20 else _WARN if result >= 10 else _PASS


@dataclass(frozen=True, slots=True)
class NodeHealth:
    """Health state for the whole node, shared by every GPU's reading."""

    armed: bool
    checks: int
    systems: int
    switches: Mapping[int, Mapping[str, int]]  # NVSwitch id -> system -> 0/1/2 (only when armed)
    switch_incidents: Mapping[tuple[int, str, int], int]  # (switch, system, code) -> incidents seen


@dataclass(frozen=True, slots=True)
class GpuHealth:
    armed: bool
    status: Mapping[str, int] | None  # system -> 0 pass, 1 warn, 2 fail; None until armed
    incidents: Mapping[tuple[str, int], int]  # (system, DCGM_FR_* code) -> incidents seen
    node: NodeHealth


@dataclass
class HealthTracker:
    """dcgmHealthCheck once per slow cycle, shared by the GPUs; incidents counted when they appear.

    A check is made when a GPU asks for health it has already seen (its first read of a new slow
    cycle); the other GPUs of that cycle wait for it (at most --dcgm.timeout) and get the same result.
    The first check after (re)connecting only arms DCGM's watches ("On the first call, stateful
    information ... is created but no error results are provided"): its result is discarded and
    nothing is reported as healthy before the second. An incident is keyed by entity, system and
    DCGM_FR_* code; it is counted once when it appears, however many checks it stays in, and again
    if it clears and comes back.
    """

    conn: DcgmConnection
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _seq: int = 0
    _consumed: dict[str, int] = field(default_factory=dict)
    _inflight: threading.Event | None = None
    _session: int = 0
    _armed: bool = False
    _status: dict[tuple[int, int], dict[int, int]] = field(default_factory=dict)
    _present: set[tuple[int, int, int, int]] = field(default_factory=set)
    _counts: dict[tuple[int, int, int, int], int] = field(default_factory=dict)
    _checks: int = 0

    def for_gpu(self, uuid: str) -> GpuHealth:
        with self._lock:
            waiter = self._inflight
            seen = self._consumed.get(uuid)
            # A GPU that has seen the latest result is in its next slow cycle: time for a new check.
            # Before any result, the first GPU to ask starts one; the others wait for it.
            starter = waiter is None and ((seen is not None and seen >= self._seq) or self._seq == 0)
            if starter:
                self._inflight = threading.Event()
        if starter:
            try:
                self.conn.run("dcgmHealthCheck", lambda s: s.health_check(), on_done=self._apply)
            except pynvml.NVMLError as exc:
                # Not connected or stuck: keep the last state; the dcgm collector says why.
                log.debug("DCGM health check skipped", extra={"error": str(exc)})
            finally:
                with self._lock:
                    event, self._inflight = self._inflight, None
                if event is not None:
                    event.set()
        elif waiter is not None:
            waiter.wait(self.conn.timeout)
        with self._lock:
            self._consumed[uuid] = self._seq
            return self._view(uuid)

    def node(self) -> NodeHealth:
        with self._lock:
            return self._node_view()

    def _apply(self, result: HealthResult) -> None:
        """On the I/O thread, with the check's result, even if its caller has stopped waiting."""
        fe = self.conn.b.dcgm_fields
        with self._lock:
            self._seq += 1
            self._checks += 1
            if result.session != self._session or result.check <= 1:
                self._session = result.session
                self._armed = result.check > 1
                if not self._armed:
                    return
            self._armed = True
            status: dict[tuple[int, int], dict[int, int]] = {}
            present: dict[tuple[int, int, int, int], Incident] = {}
            for inc in result.incidents:
                entity = (inc.entity_group, inc.entity_id)
                worst = status.setdefault(entity, {})
                worst[inc.system] = max(worst.get(inc.system, _PASS), level(inc.health))
                present[(inc.entity_group, inc.entity_id, inc.system, inc.code)] = inc
            for key in present.keys() - self._present:
                self._counts[key] = self._counts.get(key, 0) + 1
                inc = present[key]
                log.warning("DCGM health incident", extra={
                    "entity": "gpu" if inc.entity_group == fe.DCGM_FE_GPU else f"group{inc.entity_group}",
                    "id": inc.entity_id, "system": fields.system_name(inc.system), "code": inc.code,
                    "health": level(inc.health), "detail": inc.message})
            for key in self._present - present.keys():
                log.info("DCGM health incident cleared", extra={
                    "id": key[1], "system": fields.system_name(key[2]), "code": key[3]})
            self._present = set(present)
            self._status = status

    def _node_view(self) -> NodeHealth:
        fe = self.conn.b.dcgm_fields
        systems = self.conn.health_systems
        switches: dict[int, dict[str, int]] = {}
        if self._armed:
            for switch in self.conn.switches():
                seen = self._status.get((fe.DCGM_FE_SWITCH, switch), {})
                switches[switch] = {name: seen.get(fields.HEALTH_SYSTEMS[name], _PASS)
                                    for name in fields.NVSWITCH_SYSTEMS if systems & fields.HEALTH_SYSTEMS[name]}
        incidents = {(eid, fields.system_name(system), code): n
                     for (group, eid, system, code), n in self._counts.items() if group == fe.DCGM_FE_SWITCH}
        return NodeHealth(self._armed, self._checks, systems, switches, incidents)

    def _view(self, uuid: str) -> GpuHealth:
        fe = self.conn.b.dcgm_fields
        node = self._node_view()
        gpu = self.conn.gpu_by_uuid(uuid)
        if gpu is None:
            return GpuHealth(self._armed, None, {}, node)
        entity = (fe.DCGM_FE_GPU, gpu.gpu_id)
        status = None
        if self._armed:
            seen = self._status.get(entity, {})
            status = {name: seen.get(fields.HEALTH_SYSTEMS[name], _PASS)
                      for name in fields.GPU_SYSTEMS if node.systems & fields.HEALTH_SYSTEMS[name]}
        incidents = {(fields.system_name(system), code): n
                     for (group, eid, system, code), n in self._counts.items() if (group, eid) == entity}
        return GpuHealth(self._armed, status, incidents, node)


# --- sharing one connection between the backend and the collectors ----------------------------

_shared_lock = threading.Lock()
_shared: dict[tuple[str, str], list[Any]] = {}  # key -> [connection, references]


def parse_timeout(value: object) -> float:
    if value in (None, ""):
        return DEFAULT_TIMEOUT
    seconds = parse_duration(value, "--dcgm.timeout", error=ConfigError)
    if seconds <= 0:
        raise ConfigError("--dcgm.timeout: must be above zero")
    return seconds


def acquire(settings: Mapping[str, Any], **kwargs: Any) -> DcgmConnection:
    """The process's connection for these --dcgm.* settings, created on first use.

    Raises BackendUnavailable when the bindings cannot be loaded, ConfigError for a bad --dcgm.timeout.
    """
    timeout = parse_timeout(settings.get("dcgm_timeout"))
    bindings = load_bindings(settings.get("dcgm_bindings_path") or None)
    key = (bindings.path, str(settings.get("dcgm_address") or ""))
    with _shared_lock:
        entry = _shared.get(key)
        if entry is None or entry[0]._closed:
            entry = _shared[key] = [DcgmConnection(bindings, address=key[1], timeout=timeout, **kwargs), 0]
        entry[1] += 1
        return entry[0]


def release(conn: DcgmConnection) -> None:
    """Drop one reference; the last one closes the connection."""
    with _shared_lock:
        for key, entry in list(_shared.items()):
            if entry[0] is conn:
                entry[1] -= 1
                if entry[1] > 0:
                    return
                del _shared[key]
                break
    conn.close()
