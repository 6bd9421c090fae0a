"""NVML Xid events: registration through the pynvml event API, and de-duplication against the kernel log."""

from __future__ import annotations

import queue
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml

from exporter.backends.sim import SimulatedNvml
from exporter.collectors.xid import XidCollector
from exporter.registry import GpuKey
from exporter.xid.nvml_events import NvmlXidEvents, XidDeduper
from exporter.xid.sources import FileSource
from exporter.xid.store import STATE_FILE, XidStore
from tests.xid.xid_support import wait_until

GPU0, GPU1 = GpuKey(0, "GPU-aaaa"), GpuKey(1, "GPU-bbbb")


class FakeEventNvml:
    """Faithful to pynvml's event API signatures: nvmlEventSetCreate() -> set;
    nvmlDeviceGetSupportedEventTypes(handle) -> bitmask; nvmlDeviceRegisterEvents(handle, types, set);
    nvmlEventSetWait_v2(set, timeout_ms) -> c_nvmlEventData_t-like (device, eventType, eventData, gpuInstanceId,
    computeInstanceId), raising NVMLError_Timeout when nothing arrives; nvmlEventSetFree(set).
    Plus the device enumeration calls the registration needs, and nvmlInit/nvmlShutdown with NVML's count of
    inits. GPU 2 does not support Xid events.
    """

    def __init__(self, uuids: list[str]) -> None:
        self.uuids = uuids
        self.handles = [object() for _ in uuids]
        self.registered: list[int] = []
        self.freed = False
        self.events: queue.Queue[Any] = queue.Queue()

    inits = 0  # nvmlInit less nvmlShutdown: NVML counts inits per process

    def nvmlInit(self) -> None:
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.inits -= 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.uuids)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> object:
        return self.handles[index]

    def nvmlDeviceGetUUID(self, handle: object) -> str:
        return self.uuids[self.handles.index(handle)]

    def nvmlEventSetCreate(self) -> object:
        return "event-set"

    def nvmlDeviceGetSupportedEventTypes(self, handle: object) -> int:
        if self.handles.index(handle) == 2:
            return pynvml.nvmlEventTypeClock
        return pynvml.nvmlEventTypeXidCriticalError | pynvml.nvmlEventTypeSingleBitEccError

    def nvmlDeviceRegisterEvents(self, handle: object, event_types: int, event_set: object) -> None:
        assert event_set == "event-set" and event_types == pynvml.nvmlEventTypeXidCriticalError
        self.registered.append(self.handles.index(handle))

    def nvmlEventSetWait_v2(self, event_set: object, timeout_ms: int) -> Any:
        try:
            index, etype, xid = self.events.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT) from None
        return SimpleNamespace(device=self.handles[index], eventType=etype, eventData=xid,
                               gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF)

    def nvmlEventSetFree(self, event_set: object) -> None:
        self.freed = True

    def fire(self, index: int, xid: int, etype: int = pynvml.nvmlEventTypeXidCriticalError) -> None:
        self.events.put((index, etype, xid))


def test_dedup_window_both_ways() -> None:
    d = XidDeduper(window=10)
    d.log_event(GPU0, 79, now=100.0)
    d.nvml_event(GPU0, 79, now=105.0)  # log first: same incident
    assert d.expire(now=200.0) == []
    d.nvml_event(GPU0, 48, now=110.0)  # NVML first, log within the window: same incident
    d.log_event(GPU0, 48, now=112.0)
    assert d.expire(now=200.0) == []
    d.nvml_event(GPU1, 79, now=120.0)  # another GPU: not in the log
    d.nvml_event(GPU0, 13, now=120.0)  # another Xid
    d.nvml_event(GPU0, 79, now=125.0)  # 25 s after the log line: a new incident
    assert d.expire(now=130.0) == []  # still within the window: undecided
    assert sorted(d.expire(now=136.0), key=lambda e: (e[0].uuid, e[1])) == [(GPU0, 13), (GPU0, 79), (GPU1, 79)]
    assert d.expire(now=300.0) == []


def test_dedup_late_log_line_does_not_excuse_old_events() -> None:
    d = XidDeduper(window=10)
    d.nvml_event(GPU0, 31, now=0.0)
    d.log_event(GPU0, 31, now=30.0)
    assert d.expire(now=31.0) == [(GPU0, 31)]


def test_dedup_pending_is_bounded() -> None:
    d = XidDeduper(window=10, max_pending=3)
    for i in range(10):
        d.nvml_event(GPU0, 95, now=float(i) / 100)
    assert len(d.expire(now=0.5)) == 7  # the overflow is decided at once
    assert len(d.expire(now=20.0)) == 3


def test_event_thread_registers_and_reports() -> None:
    fake = FakeEventNvml(["GPU-aaaa", "GPU-bbbb", "GPU-cccc"])
    got: list[tuple[GpuKey, int]] = []
    events = NvmlXidEvents(fake, lambda key, xid: got.append((key, xid)), wait_ms=20)
    events.start()
    try:
        assert events.ready.wait(5)
        assert fake.registered == [0, 1] and events.registered == 2
        fake.fire(1, 79)
        fake.fire(0, 0, etype=pynvml.nvmlEventTypeSingleBitEccError)  # not an Xid
        fake.fire(0, 13)
        wait_until(lambda: len(got) == 2)
        assert got == [(GPU1, 79), (GPU0, 13)]
    finally:
        events.stop()
    assert fake.freed


def test_backend_without_events_turns_them_off() -> None:
    events = NvmlXidEvents(SimulatedNvml(), lambda key, xid: None)
    events.start()
    assert events.ready.wait(5) and events.registered == 0
    events.stop()


def test_collector_counts_only_events_the_log_did_not_show(tmp_path: Path) -> None:
    log = tmp_path / "kern.log"
    log.touch()
    fake = FakeEventNvml(["GPU-aaaa", "GPU-bbbb"])
    store = XidStore(tmp_path / STATE_FILE, "boot-1", f"file:{log}")
    c = XidCollector("n", store, FileSource(log, poll_interval=0.005), pci_map=lambda: {"00000000:18:00.0": GPU0},
                     nvml=fake, nvml_events=True)
    assert c._dedup is not None
    c._dedup.window = 0.3
    c.LAZY_INTERVAL = 0.05  # how often undecided NVML events are looked at
    c.start(catchup_timeout=5)
    try:
        assert c._events is not None and c._events.ready.wait(5)
        with open(log, "a") as f:
            f.write("NVRM: Xid (PCI:0000:18:00): 79, pid=1, name=x, GPU has fallen off the bus.\n")
        wait_until(lambda: c._view.xid.get(("00000000:18:00.0", 79), (0,))[0] == 1)
        fake.fire(0, 79)  # the same incident as the log line
        fake.fire(1, 119)  # the log never shows this one
        wait_until(lambda: c._view.nvml_only != {}, timeout=5)
        time.sleep(0.4)
        assert c._view.nvml_only == {(1, "GPU-bbbb", 119): 1}
    finally:
        c.close()
    # NVML-only counts cannot be replayed, so they are kept across restarts like the others.
    assert XidStore(tmp_path / STATE_FILE, "boot-1", "none").view().nvml_only == {(1, "GPU-bbbb", 119): 1}


def test_event_wait_errors_do_not_kill_the_thread() -> None:
    fake = FakeEventNvml(["GPU-aaaa"])
    calls = {"n": 0}
    real_wait = fake.nvmlEventSetWait_v2

    def flaky(event_set: object, timeout_ms: int) -> Any:
        calls["n"] += 1
        if calls["n"] <= 2:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return real_wait(event_set, timeout_ms)

    fake.nvmlEventSetWait_v2 = flaky  # type: ignore[method-assign]
    got: list[tuple[GpuKey, int]] = []
    events = NvmlXidEvents(fake, lambda key, xid: got.append((key, xid)), wait_ms=20)
    events.start()
    try:
        fake.fire(0, 62)
        wait_until(lambda: got == [(GPU0, 62)])
    finally:
        events.stop()


def test_a_release_frees_the_event_set_and_matches_the_init_and_resume_registers_again() -> None:
    fake = FakeEventNvml(["GPU-aaaa", "GPU-bbbb"])
    got: list[tuple[GpuKey, int]] = []
    events = NvmlXidEvents(fake, lambda key, xid: got.append((key, xid)), wait_ms=20)
    assert events.release(1.0)  # not started: nothing held
    events.resume()
    events.start()
    try:
        assert events.ready.wait(5) and fake.inits == 1
        assert events.release(2.0)
        assert fake.freed and fake.inits == 0
        fake.freed, fake.registered = False, []
        events.resume()
        wait_until(lambda: fake.registered == [0, 1])
        assert fake.inits == 1
        fake.fire(0, 48)
        wait_until(lambda: got == [(GPU0, 48)])
    finally:
        events.stop()
    assert fake.freed and fake.inits == 0  # stopping matches the init too


def test_no_gpu_with_events_matches_the_init_at_once() -> None:
    fake = FakeEventNvml(["GPU-aaaa", "GPU-bbbb", "GPU-cccc"])
    fake.nvmlDeviceGetSupportedEventTypes = lambda handle: pynvml.nvmlEventTypeClock  # type: ignore[method-assign]
    events = NvmlXidEvents(fake, lambda key, xid: None, wait_ms=20)
    events.start()
    try:
        assert events.ready.wait(5) and events.registered == 0
        wait_until(lambda: fake.inits == 0)
        assert fake.freed
    finally:
        events.stop()
