"""NVML Xid events (``nvmlEventTypeXidCriticalError``) as a complement to the kernel log.

An NVML event carries only the GPU and the Xid number, and events that happened before the exporter started
cannot be replayed; so they never feed ``gpu_xid_errors_total`` (whose counts are rebuilt from the log).
An NVML event for (GPU, Xid) within ``window`` seconds of a log event for the same pair (before or after it)
is the same incident and is dropped; one the log never shows (no log source, or the log lost it) is counted
in ``gpu_xid_nvml_events_total``.

Everything NVML is called on this module's own thread: NVML can hang exactly when Xid 79 or 119 is printed, and
such a hang must block neither the log reader nor a scrape.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pynvml

from exporter.device import to_str
from exporter.registry import GpuKey

log = logging.getLogger(__name__)

DEDUP_WINDOW = 10.0
WAIT_MS = 500


class XidDeduper:
    """Matches NVML Xid events against log events by (GPU uuid, Xid) within a time window; thread-safe.

    Memory is bounded: one timestamp per (GPU, Xid) seen in the log, and at most ``max_pending`` unmatched NVML
    events per (GPU, Xid); past that the oldest is decided at once (counted as not in the log).
    """

    def __init__(self, window: float = DEDUP_WINDOW, max_pending: int = 1024) -> None:
        self.window = window
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self._last_log: dict[tuple[str, int], float] = {}
        self._pending: dict[tuple[GpuKey, int], collections.deque[float]] = {}
        self._decided: list[tuple[GpuKey, int]] = []

    def log_event(self, key: GpuKey, xid: int, now: float) -> None:
        with self._lock:
            self._last_log[(key.uuid, xid)] = now
            for (gpu, code), times in list(self._pending.items()):
                if gpu.uuid == key.uuid and code == xid:
                    # Pending events older than the window were not this incident.
                    self._decided.extend((gpu, code) for t in times if now - t > self.window)
                    del self._pending[(gpu, code)]

    def nvml_event(self, key: GpuKey, xid: int, now: float) -> None:
        with self._lock:
            seen = self._last_log.get((key.uuid, xid))
            if seen is not None and now - seen <= self.window:
                return
            times = self._pending.setdefault((key, xid), collections.deque())
            if len(times) >= self.max_pending:
                times.popleft()
                self._decided.append((key, xid))
            times.append(now)

    def expire(self, now: float) -> list[tuple[GpuKey, int]]:
        """NVML events the log did not show within the window: count these in gpu_xid_nvml_events_total."""
        with self._lock:
            out, self._decided = self._decided, []
            for k, times in list(self._pending.items()):
                while times and now - times[0] > self.window:
                    times.popleft()
                    out.append(k)
                if not times:
                    del self._pending[k]
            return out


def _handle_id(handle: Any) -> Any:
    """A hashable identity for an NVML device handle: its address (event data holds a fresh pointer object)."""
    try:
        return ctypes.cast(handle, ctypes.c_void_p).value
    except (TypeError, ctypes.ArgumentError):
        return id(handle)


class NvmlXidEvents:
    """A daemon thread that registers every GPU for Xid events and waits for them with a timeout.

    ``nvml`` is the exporter's backend (the pynvml module, or a fake with the same five functions); a backend
    without events (the simulator) or a driver that does not support them turns this off with one log line.
    """

    def __init__(
        self,
        nvml: Any,
        on_event: Callable[[GpuKey, int], None],
        *,
        wait_ms: int = WAIT_MS,
    ) -> None:
        self.nvml = nvml
        self.on_event = on_event
        self.wait_ms = wait_ms
        self.registered = 0
        self.retry_interval = 30.0
        self._init_failed = False
        self.ready = threading.Event()  # set once setup finished (or failed)
        self._stop = threading.Event()
        self._release = threading.Event()  # a GPU reset wants NVML let go of
        # True from this thread's nvmlInit to its matching nvmlShutdown: NVML counts inits, and the GPU stays
        # held (`nvidia-smi -r` refuses) until every init in the process is matched.
        self._holding = False
        self._thread = threading.Thread(target=self._run, name="xid-nvml-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        # A thread stuck in a hung NVML call cannot be joined; it is a daemon and dies with the process.
        if self._thread.is_alive():
            self._thread.join(timeout)

    def release(self, timeout: float = 5.0) -> bool:
        """Free the event set and match this thread's nvmlInit with nvmlShutdown, for a GPU reset; True once
        nothing is held (within one event wait, WAIT_MS). False if the thread is stuck in NVML: it still holds."""
        self._release.set()
        deadline = time.monotonic() + timeout
        while self._holding and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self._holding

    def resume(self) -> None:
        """The reset is over: register again (a new nvmlInit, a new event set)."""
        self._release.clear()

    def _setup(self) -> tuple[Any, dict[Any, GpuKey]] | None | bool:
        """(event set, devices) when registered; None when events are unsupported; False to retry later."""
        nvml = self.nvml
        xid_type = pynvml.nvmlEventTypeXidCriticalError
        try:
            nvml.nvmlInit()
        except AttributeError:
            return None
        except pynvml.NVMLError as exc:
            # No driver yet (or a broken one): the poller keeps retrying nvmlInit, and so do we.
            if not self._init_failed:
                log.info("NVML Xid events waiting for NVML", extra={"error": str(exc)})
            self._init_failed = True
            return False
        self._holding = True
        try:
            event_set = nvml.nvmlEventSetCreate()
        except (AttributeError, pynvml.NVMLError) as exc:
            log.info("NVML Xid events not available", extra={"error": str(exc) or type(exc).__name__})
            self._shutdown()
            return None
        devices: dict[Any, GpuKey] = {}
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except pynvml.NVMLError as exc:
            log.info("NVML Xid events not available", extra={"error": str(exc)})
            count = 0
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = to_str(nvml.nvmlDeviceGetUUID(handle))
                if not nvml.nvmlDeviceGetSupportedEventTypes(handle) & xid_type:
                    continue
                nvml.nvmlDeviceRegisterEvents(handle, xid_type, event_set)
            except (AttributeError, pynvml.NVMLError) as exc:
                log.info("NVML Xid events not supported on a GPU", extra={"gpu": index, "error": str(exc)})
                continue
            devices[_handle_id(handle)] = GpuKey(index, uuid)
        if not devices:
            log.info("NVML Xid events: no GPU supports them")
            self._free(event_set)
            self._shutdown()
            return None
        self.registered = len(devices)
        log.info("NVML Xid events registered", extra={"gpus": len(devices)})
        return event_set, devices

    def _free(self, event_set: Any) -> None:
        try:
            self.nvml.nvmlEventSetFree(event_set)
        except (AttributeError, pynvml.NVMLError):
            pass

    def _shutdown(self) -> None:
        if not self._holding:
            return
        try:
            self.nvml.nvmlShutdown()
        except (AttributeError, pynvml.NVMLError) as exc:
            log.warning("NVML Xid events: nvmlShutdown failed", extra={"error": str(exc) or type(exc).__name__})
        self._holding = False

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                setup = self._setup_when_wanted()
                self.ready.set()
                if not setup:
                    return
                event_set, devices = setup
                try:
                    self._wait_events(event_set, devices)
                finally:
                    self._free(event_set)
                    self._shutdown()
        finally:
            self._shutdown()

    def _setup_when_wanted(self) -> tuple[Any, dict[Any, GpuKey]] | None:
        """Set up once no reset holds NVML back, retrying while NVML is not there; None: unsupported or stopped."""
        while True:
            while self._release.is_set():
                if self._stop.wait(0.1):
                    return None
            try:
                setup = self._setup()
            except Exception as exc:  # never let a backend quirk kill the exporter
                log.warning("NVML Xid events setup failed", extra={"error": repr(exc)})
                self._shutdown()
                return None
            if setup is not False:
                return setup
            if self._stop.wait(self.retry_interval):
                return None

    def _wait_events(self, event_set: Any, devices: dict[Any, GpuKey]) -> None:
        """Wait for Xid events until stopped or a GPU reset asks for NVML."""
        failures = 0
        while not self._stop.is_set() and not self._release.is_set():
            try:
                data = self.nvml.nvmlEventSetWait_v2(event_set, self.wait_ms)
            except pynvml.NVMLError_Timeout:
                continue
            except pynvml.NVMLError as exc:
                # GPU lost or similar: keep waiting on the others, without spinning or flooding the log.
                if failures == 0:
                    log.warning("NVML event wait failed", extra={"error": str(exc)})
                failures += 1
                self._stop.wait(min(1.0, 0.05 * failures))
                continue
            failures = 0
            if not int(data.eventType) & pynvml.nvmlEventTypeXidCriticalError:
                continue
            key = devices.get(_handle_id(data.device))
            if key is not None:
                self.on_event(key, int(data.eventData))
