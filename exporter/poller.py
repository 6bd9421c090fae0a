"""Collection, decoupled from scrapes.

A loop thread wakes every --collect-interval, hands each GPU's due collectors to that GPU's own
worker thread, waits a bounded time, renders every family once, and publishes the result as a
pre-rendered snapshot. Scrapes only ever read the latest snapshot.

A stuck NVML call cannot be cancelled (a 45 s hang was seen with Xid 119). So each GPU has exactly
one worker: while it is stuck, it gets no new work (no thread pile-up), its GPU is reported stale
with the stuck call counted, and every other GPU keeps being collected.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pynvml
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .backends import Nvml
from .device import CallTrace, Device, nvml_init, to_str
from .errors import GpuLost
from .registry import Collector, FleetView, GpuKey, RenderContext, Tier, node_family
from .render import Snapshot, exposition
from .state import ExpectedGpus, WriteErrors

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PollerConfig:
    node: str
    interval: float = 5.0
    slow_interval: float = 30.0
    # How long a cycle waits for workers before publishing what it has; a call running longer is stuck.
    deadline: float = 1.0
    version: str = "dev"
    # Where a GPU reset asks the exporter to let go of NVML (see release_requested); None disables it.
    release_dir: Path | None = None


RELEASE_REQUEST = "release-nvml"
RELEASE_ACK = "nvml-released"
# A request older than this is a leftover of an executor that died: collection resumes.
RELEASE_MAX_AGE = 600.0
# What the exporter writes to --state-dir (gpu_exporter_state_write_errors_total's `file`), all shown from the start.
STATE_FILES = ("expected_gpus", "xid", "nvml_release_ack")


def _write_ack(path: Path, errors: WriteErrors, users: Sequence[str]) -> None:
    try:
        path.write_text(f"{os.getpid()}\nreleased: {' '.join(users)}\n", encoding="ascii")
    except OSError as exc:
        errors.failed("nvml_release_ack")
        log.warning("cannot acknowledge the NVML release", extra={"path": str(path), "error": str(exc)})


_MISSING = object()
_REINIT_CODES = frozenset(
    {pynvml.NVML_ERROR_UNINITIALIZED, pynvml.NVML_ERROR_DRIVER_NOT_LOADED, pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH}
)


class Worker:
    """One daemon thread running one job at a time. A job that never returns blocks only this worker."""

    def __init__(self, name: str, on_done: Callable[[], None]) -> None:
        self.name = name
        self.busy = False
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._on_done = on_done
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> bool:
        if self.busy:
            return False
        self.busy = True
        self._jobs.put(job)
        return True

    def stop(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception:  # a job records its own errors; this only keeps the worker alive
                log.exception("worker job failed", extra={"worker": self.name})
            finally:
                self.busy = False
                self._on_done()


@dataclass
class GpuState:
    """What the poller knows about one GPU; written by its worker, read by the loop."""

    device: Device
    worker: Worker
    readings: dict[str, Any] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)
    errors: dict[str, int] = field(default_factory=dict)
    read_seconds: dict[str, float] = field(default_factory=dict)
    # Bumped on every read or failure of a collector; unchanged means its rendered text is still good.
    generation: dict[str, int] = field(default_factory=dict)
    last_success: float = 0.0
    duration: float = 0.0
    lost: bool = False
    stuck_calls: int = 0
    stuck_counted: float | None = None
    # The worker was still busy when a cycle's deadline expired; cleared when its job ends.
    overran: bool = False
    slow_done: bool = False

    @property
    def key(self) -> GpuKey:
        return GpuKey(self.device.index, self.device.uuid)


class Poller:
    """Owns the workers and the loop; `snapshot` is the only thing the HTTP side reads."""

    def __init__(
        self,
        nvml: Nvml,
        collectors: Sequence[Collector],
        config: PollerConfig,
        expected: ExpectedGpus,
        *,
        wall: Callable[[], float] = time.time,
        trace: CallTrace | None = None,
        worker: Callable[[str, Callable[[], None]], Worker] = Worker,
    ) -> None:
        self.nvml = nvml
        self.collectors = list(collectors)
        self.config = config
        self.expected = expected
        self.wall = wall
        self.trace = trace
        self.snapshot = Snapshot.empty()
        self.cycles = 0
        self.last_cycle_monotonic = 0.0
        self._cond = threading.Condition()
        # What runs the NVML jobs: a thread each (a fleet simulator runs them on its own thread instead).
        self._new_worker = worker
        self._system = worker("nvml-system", self._notify)
        self._gpus: dict[int, GpuState] = {}
        self._nvml_up = False
        self._nvml_error = ""
        self._initialized = False
        self._visible = 0
        self._driver = ""
        self._next_slow = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rendered: dict[str, tuple[object, str, bool]] = {}
        self._collectors_started = False
        self._released = False
        self._holders_released = False  # collectors asked to let go of NVML (release_nvml) and not resumed
        # The last published render (fleet, GPU states, per-collector texts + core text), for republish().
        self._publish_lock = threading.Lock()
        self._published: tuple[FleetView, list[GpuState], list[str]] | None = None
        for collector in self.collectors:
            bind = getattr(collector, "bind_republish", None)
            if bind is not None:
                bind(lambda name=collector.name: self.republish(name))
        # Kept after a GPU disappears: its XIDs must still land on the right gpu and uuid.
        self._pci: dict[str, GpuKey] = {}

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="collection-loop", daemon=True)
        self._thread.start()

    def pci_map(self) -> dict[str, GpuKey]:
        """PCI id in NVML's spelling ("00000000:3B:00.0", a VMD domain whole) to GPU, as last seen on the slow tier."""
        return self._pci

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=self.config.deadline + 1)
        for state in self._gpus.values():
            state.worker.stop()
        self._system.stop()
        self._each_collector("close")

    def _loop(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                self.run_cycle()
            except Exception:
                log.exception("collection cycle failed")
            next_at += self.config.interval
            # After a long stall, skip the missed ticks instead of running them back to back.
            next_at = max(next_at, time.monotonic())
            self._stop.wait(next_at - time.monotonic())

    # --- one cycle -----------------------------------------------------------------------

    def run_cycle(self) -> Snapshot:
        """Collect what is due, wait at most `deadline`, publish a new snapshot, and return it."""
        now = time.monotonic()
        if self._release_cycle():
            with self._publish_lock:
                self.snapshot = self._render()
            self.cycles += 1
            self.last_cycle_monotonic = time.monotonic()
            return self.snapshot
        # Half an interval of slack: cycles start with jitter, and a slow tier missed by microseconds
        # would otherwise slip a whole fast interval every time.
        slow_due = now >= self._next_slow - self.config.interval / 2
        if slow_due:
            self._next_slow = now + self.config.slow_interval
        # Enumeration every cycle (one cheap call), so a GPU that leaves is noticed within one interval.
        if self._system.submit(lambda sd=slow_due: self._system_job(sd)):
            self._wait(lambda: not self._system.busy, now + self.config.deadline)
        self._sync_gpus()
        for state in self._gpus.values():
            due = [c for c in self.collectors if c.tier is Tier.FAST or (c.tier is Tier.SLOW and (slow_due or not state.slow_done))]
            state.worker.submit(lambda s=state, d=due, sd=slow_due: self._gpu_job(s, d, sd))
        self._wait(lambda: not any(s.worker.busy for s in self._gpus.values()), now + self.config.deadline)
        for state in self._gpus.values():
            if state.worker.busy:
                self._note_stuck(state)
        if not self._collectors_started:
            # Event-driven collectors (XID) start once the GPUs are enumerated and the PCI map is filled.
            self._collectors_started = True
            self._each_collector("start")
        with self._publish_lock:
            self.snapshot = self._render()
        self.cycles += 1
        self.last_cycle_monotonic = time.monotonic()
        return self.snapshot

    def _release_cycle(self) -> bool:
        """Let go of NVML while a GPU reset asks for it; True while released (no collection this cycle).

        `nvidia-smi -r` fails while any process holds the GPU's device files, our own NVML handle included. The
        reset Job (remediation_webhook/executor.py) creates RELEASE_REQUEST in --state-dir, waits for RELEASE_ACK,
        resets, and removes the request; the exporter then initialises NVML again.
        """
        directory = self.config.release_dir
        if directory is None:
            return False
        request, ack = directory / RELEASE_REQUEST, directory / RELEASE_ACK
        try:
            age = time.time() - request.stat().st_mtime
            wanted = age < RELEASE_MAX_AGE
        except OSError:
            wanted = False
        if wanted and not self._released:
            # Every NVML user of the process, or the reset finds the GPU held: NVML counts inits per process.
            holders = [c for c in self.collectors if hasattr(c, "release_nvml")]
            stuck = [c.name for c in holders if not c.release_nvml(self.config.deadline)]
            self._holders_released = True
            if stuck:
                log.warning("an NVML user did not let go for the GPU reset; asking again next cycle",
                            extra={"collectors": stuck})
                return False
            if any(s.worker.busy for s in self._gpus.values()) or not self._system.submit(self._shutdown_job):
                return False  # a worker is inside NVML; try again next cycle
            self._wait(lambda: not self._system.busy, time.monotonic() + self.config.deadline)
            if self._system.busy:
                return False
            for state in self._gpus.values():
                state.worker.stop()
            self._gpus.clear()
            self._released = True
            users = ["collection", *(c.name for c in holders)]
            _write_ack(ack, self.expected.errors, users)
            log.warning("released NVML for a GPU reset", extra={"request": str(request), "released": users})
        elif not wanted:
            if self._holders_released:
                self._holders_released = False
                self._each_collector("resume_nvml")
            if self._released:
                self._released = False
                try:
                    ack.unlink()
                except OSError:
                    pass
                log.warning("GPU reset done; collecting again")
        return self._released

    def _each_collector(self, method: str) -> None:
        """Call `method` on every collector that has it (the optional parts of the Collector protocol)."""
        for collector in self.collectors:
            fn = getattr(collector, method, None)
            if fn is not None:
                fn()

    def _shutdown_job(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except pynvml.NVMLError as exc:
            log.warning("nvmlShutdown failed", extra={"error": str(exc)})
        self._initialized = False
        self._nvml_up, self._nvml_error = False, "released for a GPU reset"

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _wait(self, done: Callable[[], bool], until: float) -> None:
        with self._cond:
            while not done():
                remaining = until - time.monotonic()
                if remaining <= 0:
                    return
                self._cond.wait(remaining)

    def _note_stuck(self, state: GpuState) -> None:
        """The GPU's job outlived this cycle's deadline: stale now, and the call it is in counted once."""
        state.overran = True
        current = state.device.current_call
        if current is None:
            return
        name, started = current
        if state.stuck_counted != started:
            state.stuck_counted = started
            state.stuck_calls += 1
            log.warning("NVML call stuck", extra={"gpu": state.device.index, "call": name})

    # --- jobs, on worker threads ---------------------------------------------------------

    def _system_job(self, slow: bool) -> None:
        try:
            if not self._initialized:
                nvml_init(self.nvml)
                self._initialized = True
            self._visible = int(self.nvml.nvmlDeviceGetCount())
            if slow or not self._driver:
                self._driver = to_str(self.nvml.nvmlSystemGetDriverVersion())
            self._nvml_up, self._nvml_error = True, ""
        except pynvml.NVMLError as exc:
            if self._nvml_up or not self._nvml_error:
                log.error("NVML unavailable", extra={"error": str(exc)})
            self._nvml_up, self._nvml_error = False, str(exc)
            if exc.value in _REINIT_CODES:
                # The driver was unloaded or replaced under us: a fresh nvmlInit is the only way back.
                self._initialized = False
        if self._nvml_up:
            self.expected.observe(self._visible)

    def _sync_gpus(self) -> None:
        if not self._nvml_up:
            return
        for index in range(self._visible):
            if index not in self._gpus:
                device = Device(self.nvml, index, trace=self.trace)
                self._gpus[index] = GpuState(device, self._new_worker(f"nvml-gpu{index}", self._notify))
        for index in [i for i in self._gpus if i >= self._visible]:
            # Gone from enumeration (fell off the bus and out of PCI): gpu_devices_visible shows it.
            self._gpus.pop(index).worker.stop()

    def _gpu_job(self, state: GpuState, due: Iterable[Collector], slow: bool) -> None:
        dev = state.device
        started = time.monotonic()
        try:
            if dev.handle is None or slow or state.lost:
                before = dev.uuid
                dev.open()
                if before not in ("unknown", dev.uuid):
                    # The GPU that had this index left enumeration; the index now names another GPU.
                    self._forget(state)
                    due = [c for c in self.collectors if c.tier is not Tier.NODE]
                pci = dev.pci_bus_id
                if self._pci.get(pci) != state.key:
                    # Copy-on-write: readers on other threads only ever see a complete map.
                    self._pci = {**self._pci, pci: state.key}
            for collector in due:
                t0 = time.monotonic()
                dev.begin(collector.name)
                try:
                    state.readings[collector.name] = collector.read(dev)  # type: ignore[attr-defined]
                    dev.end()
                    state.failed.discard(collector.name)
                except GpuLost:
                    raise
                except Exception as exc:
                    # Costs this collector's series for this GPU only.
                    state.readings.pop(collector.name, None)
                    state.failed.add(collector.name)
                    state.errors[collector.name] = state.errors.get(collector.name, 0) + 1
                    log.warning(
                        "collector failed", extra={"gpu": dev.index, "collector": collector.name, "error": repr(exc)}
                    )
                finally:
                    state.read_seconds[collector.name] = time.monotonic() - t0
                    state.generation[collector.name] = state.generation.get(collector.name, 0) + 1
            if slow:
                state.slow_done = True
            state.lost = False
            state.last_success = self._data_time(dev.uuid)
        except GpuLost as exc:
            if not state.lost:
                log.error("GPU lost", extra={"gpu": dev.index, "uuid": dev.uuid, "error": str(exc)})
            state.lost = True
            state.failed.clear()
            dev.handle = None
            # A lost GPU's last temperatures and counters would read as a live, healthy GPU.
            state.readings = {k: v for k, v in state.readings.items() if k == "identity"}
            for name in state.generation:
                state.generation[name] += 1
        except pynvml.NVMLError as exc:
            log.warning("GPU open failed", extra={"gpu": dev.index, "error": str(exc)})
            dev.handle = None
        finally:
            state.duration = time.monotonic() - started
            state.overran = False

    def _data_time(self, uuid: str) -> float:
        """When the values just read were measured: now on NVML; on DCGM, its newest sample, which may be
        minutes old while it serves cached values through an outage (then the GPU turns stale)."""
        now = self.wall()
        measured = getattr(self.nvml, "last_update", None)
        when = measured(uuid) if measured is not None else None
        return min(now, when) if when is not None else now

    @staticmethod
    def _forget(state: GpuState) -> None:
        dev = state.device
        dev.cache.clear()
        dev.unsupported_by.clear()
        state.readings.clear()
        state.failed.clear()
        state.errors.clear()
        state.slow_done = False
        for name in state.generation:
            state.generation[name] += 1

    # --- rendering -----------------------------------------------------------------------

    def _render(self) -> Snapshot:
        node = self.config.node
        now_wall = self.wall()
        fleet = FleetView(self._nvml_up, self._visible if self._nvml_up else 0, self.expected.value, self._driver)
        states = sorted(self._gpus.values(), key=lambda s: s.device.index)
        texts: list[str] = []
        success = GaugeMetricFamily(
            "gpu_exporter_collector_success", "1 if the collector's last run succeeded on every GPU, else 0.",
            labels=["node", "collector"],
        )
        duration = GaugeMetricFamily(
            "gpu_exporter_collector_duration_seconds",
            "Seconds the collector's last run took, summed over GPUs, rendering included.",
            labels=["node", "collector"],
        )
        for collector in self.collectors:
            t0 = time.monotonic()
            text, ok = self._render_collector(collector, node, fleet, states)
            texts.append(text)
            spent = time.monotonic() - t0 + sum(s.read_seconds.get(collector.name, 0.0) for s in states)
            success.add_metric([node, collector.name], 1 if ok else 0)
            duration.add_metric([node, collector.name], spent)
        texts.append(exposition([success, duration, *self._core_families(node, fleet, states, now_wall)]))
        self._published = (fleet, states, texts)
        return Snapshot(
            body="".join(texts).encode(),
            created=now_wall,
            gpus=[self._summary(s, now_wall) for s in states],
            fleet=fleet,
        )

    def _render_collector(
        self, collector: Collector, node: str, fleet: FleetView, states: list[GpuState]
    ) -> tuple[str, bool]:
        # Slow-tier text is reused until one of its readings changes: most cycles re-render only fast data.
        version = getattr(collector, "version", None)
        key: object = (
            fleet if collector.tier is Tier.NODE else fleet.nvml_up,
            tuple((s.device.index, s.device.uuid, s.generation.get(collector.name, 0)) for s in states),
            # A node collector whose data changes between cycles (XID events) says so with version().
            version() if version is not None else None,
        )
        cached = self._rendered.get(collector.name)
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        # A GPU collector does not run while NVML is down (or released for a reset): that is no success.
        ok = (collector.tier is Tier.NODE or fleet.nvml_up) and not any(collector.name in s.failed for s in states)
        # get() once per GPU: a worker finishing late may replace a reading while we render.
        got = [(s.key, s.readings.get(collector.name, _MISSING)) for s in states]
        readings = [(key, r) for key, r in got if r is not _MISSING]
        try:
            text = exposition(collector.families(RenderContext(node, readings, fleet)))
        except Exception as exc:
            ok, text = False, ""
            log.warning("collector render failed", extra={"collector": collector.name, "error": repr(exc)})
        self._rendered[collector.name] = (key, text, ok)
        return text, ok

    def republish(self, name: str) -> None:
        """Publish a snapshot in which only collector `name` is re-rendered and everything else is as last published.

        For node collectors whose data changes between cycles (XID events reach /metrics in milliseconds, not at
        the next --collect-interval). Any thread; no NVML call and no waiting on workers, so a stuck GPU cannot
        delay it; serialised with the loop's own publishing.
        """
        with self._publish_lock:
            if self._published is None:
                return  # nothing published yet: the first cycle renders everything anyway
            fleet, states, texts = self._published
            index = next((i for i, c in enumerate(self.collectors) if c.name == name), None)
            if index is None:
                return
            text, _ok = self._render_collector(self.collectors[index], self.config.node, fleet, states)
            if text == texts[index]:
                return
            texts = [*texts]
            texts[index] = text
            self._published = (fleet, states, texts)
            old = self.snapshot
            self.snapshot = Snapshot(body="".join(texts).encode(), created=old.created, gpus=old.gpus, fleet=old.fleet)
    def _core_families(
        self, node: str, fleet: FleetView, states: list[GpuState], now_wall: float
    ) -> Iterable[Metric]:
        node_gauge = partial(node_family, GaugeMetricFamily, node)

        yield node_gauge("gpu_nvml_up", "1 if NVML initialised and enumerates GPUs, else 0.", int(fleet.nvml_up))
        yield node_gauge(
            "gpu_exporter_nvml_released",
            "1 while the exporter has let go of NVML because a GPU reset asked it to, else 0.",
            int(self._released),
        )
        yield node_gauge("gpu_devices_visible", "GPUs NVML enumerates now.", fleet.visible)
        if fleet.expected is not None:  # unknown (no flag, no GPU seen this boot): absent, not a false 0
            yield node_gauge(
                "gpu_devices_expected",
                "GPUs this node should have: --expected-gpus, else the most seen since boot.",
                fleet.expected,
            )
        build = GaugeMetricFamily(
            "gpu_exporter_build_info", "Exporter version and driver, always 1.", labels=["node", "version", "driver_version"]
        )
        build.add_metric([node, self.config.version, fleet.driver_version], 1)
        yield build
        yield node_gauge(
            "gpu_exporter_last_collection_timestamp_seconds", "When the collection loop last published.", now_wall
        )
        write_errors = CounterMetricFamily(
            "gpu_exporter_state_write_errors",
            "Failed writes to --state-dir, by what was written; what they kept may be lost at the next restart.",
            labels=["node", "file"],
        )
        for what, count in sorted({**dict.fromkeys(STATE_FILES, 0), **self.expected.errors.counts()}.items()):
            write_errors.add_metric([node, what], count)
        yield write_errors

        labels = ["node", "gpu", "uuid"]
        lost = GaugeMetricFamily("gpu_lost", "1 if NVML reports the GPU lost or needing a reset, else 0.", labels=labels)
        fresh = GaugeMetricFamily(
            "gpu_collection_last_success_timestamp_seconds", "When this GPU was last fully collected.", labels=labels
        )
        took = GaugeMetricFamily(
            "gpu_collection_duration_seconds", "Seconds this GPU's last collection took.", labels=labels
        )
        stale = GaugeMetricFamily(
            "gpu_collection_stale",
            "1 if this GPU's data is older than two collection intervals or an NVML call is stuck, else 0.",
            labels=labels,
        )
        stuck = CounterMetricFamily("gpu_nvml_stuck_calls", "NVML calls that ran past the deadline.", labels=labels)
        errors = CounterMetricFamily(
            "gpu_nvml_errors", "Collector reads that failed with an unexpected error.", labels=[*labels, "collector"]
        )
        unsupported = GaugeMetricFamily(
            "gpu_nvml_unsupported",
            "1 for each NVML call or field this GPU or driver does not support; its signal is absent, not healthy.",
            labels=[*labels, "call"],
        )
        for s in states:
            key = [node, str(s.device.index), s.device.uuid]
            lost.add_metric(key, int(s.lost))
            fresh.add_metric(key, s.last_success)
            took.add_metric(key, s.duration)
            stale.add_metric(key, int(self._is_stale(s, now_wall)))
            stuck.add_metric(key, s.stuck_calls)
            for name, count in sorted(s.errors.copy().items()):
                errors.add_metric([*key, name], count)
            for call in sorted(s.device.unsupported.copy()):
                unsupported.add_metric([*key, call], 1)
        yield from (f for f in (lost, fresh, took, stale, stuck, errors, unsupported) if f.samples)

    def _is_stale(self, state: GpuState, now_wall: float) -> bool:
        return (state.overran and state.worker.busy) or now_wall - state.last_success > 2 * self.config.interval

    def _summary(self, s: GpuState, now_wall: float) -> dict[str, Any]:
        identity = s.readings.get("identity")
        return {
            "gpu": s.device.index,
            "uuid": s.device.uuid,
            "pci_bus_id": s.device.pci_bus_id,
            "model": getattr(identity, "model", ""),
            "lost": s.lost,
            "stale": self._is_stale(s, now_wall),
            "age_seconds": round(now_wall - s.last_success, 1) if s.last_success else None,
            "unsupported": sorted(s.device.unsupported.copy()),
        }
