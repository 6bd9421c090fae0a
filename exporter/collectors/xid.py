"""Xid and SXid events from the kernel log, counted per boot and shown on /metrics within milliseconds.

Sources (``--xid.source``): /dev/kmsg, journald (``journalctl -k``), a plain log file, or none; ``auto`` takes
kmsg if it is readable, else journald. NVML Xid events complement the log (``--xid.nvml-events``).

Node tier: there is no per-GPU NVML read. The PCI id in a line is turned into a GPU with the poller's PCI map
(a dict lookup, refreshed on the slow tier), never a live NVML call: NVML fails or hangs exactly when Xid 79 or
119 is printed. A PCI id nobody knows is still counted, with ``gpu`` and ``uuid`` "unknown". Every PCI id, the
map's keys included, is in NVML's spelling (``00000000:18:00.0``, exporter.pci), the one ``gpu_info`` carries.

Counts are per boot and never go down within one: they are saved with the position read to before they are
shown (see exporter.xid.store). Before the first scrape the source is read to its end (bounded by a deadline).
A line reaches /metrics without waiting for the next collection: new events publish a fresh snapshot through
the poller's ``republish`` at once, at most every 20 ms during a storm.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..registry import CollectorOptions, GpuKey, RenderContext, Tier, node_family
from ..state import BOOT_ID_PATH, read_boot_id
from ..xid.catalog import lookup
from ..xid.nvml_events import NvmlXidEvents, XidDeduper
from ..xid.parse import KernelEvent, RecordAssembler
from ..pci import canonical_pci_id
from ..xid.sxid_catalog import lookup as lookup_sxid
from ..xid.sources import Item, Source, make_source, validate_spec
from ..xid.store import STATE_FILE, XidStore, XidView

log = logging.getLogger(__name__)

UNKNOWN = "unknown"


def _source_flag(text: str) -> str:
    try:
        return validate_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class XidCollector:
    name = "xid"
    description = (
        "Xid/SXid events from the kernel log (kmsg, journald or a file) and NVML, counted per boot: "
        "gpu_xid_errors_total and friends."
    )
    tier = Tier.NODE
    default_enabled = True

    CATCHUP_TIMEOUT = 10.0
    # During a storm, one snapshot per this many seconds; a lone event is published at once.
    MIN_REPUBLISH_INTERVAL = 0.02
    # Lines without events (only the position and lines read move) are saved and shown at most this often.
    LAZY_INTERVAL = 1.0
    # Parsed lines remembered for storms; bounded, so distinct messages cost at most this many entries.
    PARSE_CACHE_SIZE = 1024

    def __init__(
        self,
        node: str,
        store: XidStore,
        source: Source,
        *,
        pci_map: Callable[[], Mapping[str, GpuKey]] = dict,
        nvml: Any = None,
        nvml_events: bool = False,
    ) -> None:
        self.node = node
        self.store = store
        self.source = source
        self._raw_pci_map = pci_map
        self._pci_seen: tuple[Mapping[str, GpuKey], dict[str, GpuKey]] | None = None
        self._assembler = RecordAssembler()
        self._cache: dict[str, list[KernelEvent]] = {}
        self._publish_lock = threading.Lock()
        self._view: XidView = store.view()
        self._gen = 0
        self._changed = threading.Event()
        self._dirty = False
        self._closing = threading.Event()
        self._republish: Callable[[], None] | None = None
        self._dedup = XidDeduper() if nvml_events else None
        self._events = NvmlXidEvents(nvml, self._on_nvml_event) if nvml_events else None
        self._publisher = threading.Thread(target=self._publish_loop, name="xid-publish", daemon=True)
        self._started = False

    # --- flags and construction ------------------------------------------------------------------

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--xid.source", dest="xid_source", default="auto", type=_source_flag, metavar="SOURCE",
            help="Where Xid/SXid lines are read: auto (kmsg if readable, else journal), kmsg (/dev/kmsg), journal "
                 "(journalctl -k), file:PATH (a log file, followed across rotation, from this boot's first line; "
                 "from its end when it holds none), or none. (default auto)",
        )
        parser.add_argument(
            "--xid.journalctl", dest="xid_journalctl", default="journalctl",
            help="journalctl binary for the journal source. (default journalctl, from PATH)",
        )
        parser.add_argument(
            "--xid.nvml-events", dest="xid_nvml_events", choices=("auto", "on", "off"), default="auto",
            help="Also wait for NVML Xid events (counted in gpu_xid_nvml_events_total when the log does not show "
                 "them): auto means on when the backend has NVML events (nvml, not sim). (default auto)",
        )
        parser.add_argument(
            "--xid.boot-id-file", dest="xid_boot_id_file", default=BOOT_ID_PATH,
            help="File holding this boot's id; XID counts, the log position and the expected GPU count are kept "
                 f"per boot id. (default {BOOT_ID_PATH})",
        )

    @classmethod
    def from_options(cls, options: CollectorOptions) -> XidCollector:
        settings = options.settings
        boot_id_file = str(settings.get("xid_boot_id_file") or BOOT_ID_PATH)
        # The node's boot id, read once by the exporter (the expected GPU count is kept per the same boot).
        boot_id = options.boot_id if options.boot_id is not None else read_boot_id(boot_id_file)
        source = make_source(
            str(settings.get("xid_source") or "auto"),
            journalctl=str(settings.get("xid_journalctl") or "journalctl"),
            boot_id=boot_id if boot_id not in ("", "unknown") else None,
        )
        path = Path(options.state_dir) / STATE_FILE if options.state_dir else None
        if boot_id in ("", "unknown") and path is not None:
            # Without a boot id, another boot's counts and kmsg position would be taken for this boot's.
            log.warning("no boot id; XID counts are not kept across restarts", extra={"path": boot_id_file})
            path = None
        mode = settings.get("xid_nvml_events") or "auto"
        events = mode == "on" or (mode == "auto" and hasattr(options.nvml, "nvmlEventSetCreate"))
        collector = cls(
            options.node,
            XidStore(path, boot_id, source.identity, errors=options.state_errors),
            source,
            pci_map=options.pci_map,
            nvml=options.nvml,
            nvml_events=events and options.nvml is not None,
        )
        # Not started here: the poller calls start() after its first enumeration, so that the history read
        # during catch-up already finds the GPUs in the PCI map instead of counting them as "unknown".
        return collector

    def start(self, catchup_timeout: float | None = None) -> None:
        """Read the source to its end (bounded), save, and start following; returns before the first scrape."""
        if self._started:
            return
        timeout = self.CATCHUP_TIMEOUT if catchup_timeout is None else catchup_timeout
        t0 = time.monotonic()
        self.source.on_lost = self.store.add_lost
        self.source.start(self._ingest, self.store.resume_position)
        caught_up = self.source.caught_up.wait(timeout)
        self._publish()
        self._publisher.start()
        if self._events is not None:
            self._events.start()
        self._started = True
        view = self._view
        log.info(
            "XID source",
            extra={
                "source": self.source.identity,
                "up": self.source.up,
                "state": self.store.restored,
                "caught_up": caught_up,
                "catchup_seconds": round(time.monotonic() - t0, 3),
                "xid_series": len(view.xid),
                "nvml_events": self._events is not None,
            },
        )
        if not caught_up:
            log.warning("XID catch-up did not finish in time; counts complete in the background",
                        extra={"timeout_seconds": timeout})

    def bind_republish(self, republish: Callable[[], None]) -> None:
        """The poller's hook that publishes a snapshot with this collector re-rendered (no NVML calls)."""
        self._republish = republish

    def release_nvml(self, timeout: float) -> bool:
        """A GPU reset asks every NVML user in the process to let go: the Xid event thread frees its event set and
        matches its own nvmlInit. True once nothing of ours is held (the kernel log keeps being read)."""
        return self._events is None or self._events.release(timeout)

    def resume_nvml(self) -> None:
        if self._events is not None:
            self._events.resume()

    def close(self) -> None:
        self._republish = None
        self._closing.set()
        self._changed.set()
        self.source.stop()
        if self._events is not None:
            self._events.stop()
        if self._started:
            self._publisher.join(2.0)
        self._publish()

    # --- the event path (reader thread) ----------------------------------------------------------

    def _parse(self, text: str) -> list[KernelEvent]:
        """The assembler's events for one line, from a small cache keyed by the text from "NVRM:"/"SXid" on.

        Every Xid/SXid pattern starts at one of those two words, so a line's events do not depend on its prefix
        (timestamps, host): a storm of one message parses once. Only lines giving exactly one Xid/SXid event are
        cached; on a hit the assembler is told an unrelated line went by, as feeding it would have.
        """
        i, j = text.find("NVRM:"), text.find("SXid")
        if i < 0 or 0 <= j < i:
            i = j
        if i < 0:
            return self._assembler.feed(text)
        key = text[i:].rstrip("\r\n")
        cached = self._cache.get(key)
        if cached is not None:
            self._assembler.unrelated()
            return cached
        events = self._assembler.feed(text)
        if len(events) == 1 and events[0].kind in ("xid", "sxid"):
            if len(self._cache) >= self.PARSE_CACHE_SIZE:
                self._cache.clear()
            self._cache[key] = events
        return events

    def _ingest(self, items: list[Item], position: Any) -> None:
        now = time.time()
        parse = self._parse
        # Runs of the same event (a storm hits the cache and yields the same object) are counted once.
        events: list[tuple[KernelEvent, float, int]] = []
        last: KernelEvent | None = None
        for text, ts in items:
            for event in parse(text):
                when = now if ts is None else ts
                if event is last:
                    events[-1] = (event, when, events[-1][2] + 1)
                else:
                    events.append((event, when, 1))
                    last = event
        seen = self.store.record(events, len(items), position, self._resolve)
        if events:
            if self._dedup is not None and seen:
                mono = time.monotonic()
                for key, code in seen:
                    self._dedup.log_event(key, code, mono)
            self._changed.set()
        else:
            self._dirty = True

    def _pci_map(self) -> Mapping[str, GpuKey]:
        """The poller's PCI map with its keys in NVML's spelling, converted once per map the poller publishes.

        The poller replaces its map (copy on write) rather than changing it, so the map object is the cache key.
        """
        raw = self._raw_pci_map()
        seen = self._pci_seen
        if seen is not None and seen[0] is raw:
            return seen[1]
        converted: dict[str, GpuKey] = {}
        for pci, key in raw.items():
            try:
                converted[canonical_pci_id(pci)] = key
            except ValueError:
                log.warning("PCI map entry is not a PCI address; ignored", extra={"pci_bus_id": pci})
        self._pci_seen = (raw, converted)
        return converted

    def _resolve(self, pci: str) -> GpuKey | None:
        return self._pci_map().get(pci)

    def _on_nvml_event(self, key: GpuKey, xid: int) -> None:
        if self._dedup is not None:
            self._dedup.nvml_event(key, xid, time.monotonic())

    # --- publishing --------------------------------------------------------------------------------

    def _publish(self) -> None:
        """Save the current counts, then make them what /metrics shows: a shown count is always a saved one."""
        with self._publish_lock:
            view = self.store.view()
            self.store.save(view)
            self._view = view
            self._gen += 1
        republish = self._republish
        if republish is not None:
            republish()

    def _publish_loop(self) -> None:
        while not self._closing.is_set():
            urgent = self._changed.wait(self.LAZY_INTERVAL)
            if self._closing.is_set():
                return
            if self._dedup is not None:
                for key, xid in self._dedup.expire(time.monotonic()):
                    self.store.add_nvml_only(key, xid)
                    urgent = True
            if urgent:
                self._changed.clear()
            elif not self._dirty:
                continue
            self._dirty = False
            try:
                self._publish()
            except Exception:
                log.exception("XID publish failed")
            if urgent:
                self._closing.wait(self.MIN_REPUBLISH_INTERVAL)

    def version(self) -> object:
        """Part of the poller's render cache key: changes when the rendered text may change."""
        return self._gen, self.source.up, tuple(self._pci_map().items())

    # --- rendering ---------------------------------------------------------------------------------

    def families(self, ctx: RenderContext) -> Iterable[Metric]:
        view = self._view
        node = ctx.node
        pci_map = self._pci_map()

        def gpu(pci: str) -> tuple[str, str]:
            key = view.gpus.get(pci)
            if key is None:
                key = pci_map.get(pci)
                if key is None:
                    return UNKNOWN, UNKNOWN
                self.store.learn(pci, key)
            return str(key.index), key.uuid

        gpu_labels = ["node", "gpu", "uuid", "pci_bus_id"]
        errors = CounterMetricFamily(
            "gpu_xid_errors",
            "Xid lines in the kernel log this boot, by GPU and Xid, with the NVIDIA catalog's mnemonic and immediate "
            "action (RESTART_APP, RESET_GPU, RESTART_BM, ...). Kept across exporter restarts; never goes down.",
            labels=[*gpu_labels, "xid", "name", "action"],
        )
        last = GaugeMetricFamily(
            "gpu_xid_last_timestamp_seconds", "When the last Xid line of this GPU and Xid was logged.",
            labels=[*gpu_labels, "xid"],
        )
        for (pci, code), (count, ts) in sorted(view.xid.items()):
            index, uuid = gpu(pci)
            info = lookup(code)
            errors.add_metric([node, index, uuid, pci, str(code), info.name, info.action], count)
            if ts > 0:
                last.add_metric([node, index, uuid, pci, str(code)], ts)
        yield errors
        yield last

        sw_labels = ["node", "nvswitch_pci_bus_id", "sxid"]
        sxid = CounterMetricFamily(
            "gpu_sxid_errors",
            "SXid incidents in the kernel log this boot, per NVSwitch and SXid (continuation lines of an incident "
            "are not counted again), with the driver's mnemonic and the Fabric Manager guide's action "
            "(IGNORE, RESTART_VM, RESET_GPUS_AND_NVSWITCHES, RESTART_BM, ...).",
            labels=[*sw_labels, "name", "action"],
        )
        sxid_fatal = CounterMetricFamily(
            "gpu_sxid_fatal_errors", "SXid incidents the driver marked Fatal this boot, per NVSwitch.", labels=sw_labels
        )
        sxid_last = GaugeMetricFamily("gpu_sxid_last_timestamp_seconds", "When the last SXid line was logged.",
                                      labels=sw_labels)
        for (pci, code), (count, fatal, ts) in sorted(view.sxid.items()):
            sw_info = lookup_sxid(code)
            sxid.add_metric([node, pci, str(code), sw_info.name, sw_info.action], count)
            sxid_fatal.add_metric([node, pci, str(code)], fatal)
            if ts > 0:
                sxid_last.add_metric([node, pci, str(code)], ts)
        yield from (sxid, sxid_fatal, sxid_last)

        recovery = GaugeMetricFamily(
            "gpu_recovery_action",
            "GPU recovery action from the last Xid 154 this boot (NVML_GPU_RECOVERY_ACTION_*: 0 none, 1 GPU reset, "
            "2 node reboot, 3 drain P2P, 4 drain and reset, ...); 0 when none was logged.",
            labels=gpu_labels,
        )
        known = {**pci_map, **view.gpus}
        for pci in sorted(set(known) | set(view.recovery_action)):
            index, uuid = gpu(pci)
            recovery.add_metric([node, index, uuid, pci], view.recovery_action.get(pci, 0))
        yield recovery

        fallen = GaugeMetricFamily(
            "gpu_fallen_off_bus",
            "1 for each PCI device the kernel log said fell off the bus this boot (NVRM message or Xid 79).",
            labels=gpu_labels,
        )
        fallen_at = GaugeMetricFamily(
            "gpu_fallen_off_bus_timestamp_seconds",
            "When the kernel log first said the PCI device fell off the bus this boot.",
            labels=gpu_labels,
        )
        for pci, ts in sorted(view.fallen_off_bus.items()):
            index, uuid = gpu(pci)
            fallen.add_metric([node, index, uuid, pci], 1)
            if ts > 0:
                fallen_at.add_metric([node, index, uuid, pci], ts)
        yield fallen
        yield fallen_at

        nvml_only = CounterMetricFamily(
            "gpu_xid_nvml_events",
            "NVML Xid events the kernel log did not show within 10 s (no log source, or lines lost); this boot.",
            labels=["node", "gpu", "uuid", "xid"],
        )
        for (index_, uuid_, code), count in sorted(view.nvml_only.items()):
            nvml_only.add_metric([node, str(index_), uuid_, str(code)], count)
        yield nvml_only

        info = GaugeMetricFamily("gpu_xid_source_info", "The kernel-log source XIDs are read from; always 1.",
                                 labels=["node", "source"])
        info.add_metric([node, self.source.kind], 1)
        yield info
        yield node_family(GaugeMetricFamily, node, "gpu_xid_source_up",
                          "1 if the kernel-log source is open and being read, else 0.", int(self.source.up))
        if self.source.boot_found is not None:
            yield node_family(
                GaugeMetricFamily, node, "gpu_xid_source_boot_found",
                "1 if the kernel-log source is read from this boot's first line (kmsg and journald always); 0 if a "
                "log file holds no start of this boot, so reading began at its end and earlier lines of this boot "
                "are not counted.",
                int(self.source.boot_found),
            )
        yield node_family(CounterMetricFamily, node, "gpu_xid_lines_read",
                          "Kernel-log lines or records read this boot.", view.lines_read)
        yield node_family(
            CounterMetricFamily, node, "gpu_xid_kmsg_records_lost",
            "Kernel-log records overwritten in the /dev/kmsg ring buffer before they were read (EPIPE, sequence gaps).",
            view.kmsg_records_lost)
