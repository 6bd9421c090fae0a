"""Per-boot XID counts, kept across exporter restarts so that a counter never goes down within a boot.

Replaying the kernel log is not enough: the ring buffer rolls over, a replayed count can come back lower, and
Prometheus reads the dip as a counter reset and counts the old XIDs again. So the store persists, per boot id, the
counts together with the source position they cover (kmsg sequence number, journal cursor, or file inode and
offset), in one file, replaced atomically. A restart loads both and resumes reading after that position; what is
shown on /metrics is always what was saved first, so a crash can never lose a count that was already scraped.

No fsync: the file only has to survive the exporter process, not the machine. A machine crash is a new boot,
and a new boot id starts from zero anyway.

Memory is bounded by the label sets (GPUs x Xid codes, NVSwitches x SXid codes), never by the number of lines:
a storm of 800,000 identical lines is 800,000 increments of one integer.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter.pci import canonical_pci_id
from exporter.registry import GpuKey
from exporter.xid.parse import KernelEvent

log = logging.getLogger(__name__)

STATE_FILE = "xid-state.json"
FORMAT_VERSION = 1
FALLEN_OFF_BUS_XID = 79


def _pci(saved: Any) -> str:
    """A PCI id from a state file in NVML's spelling: earlier versions saved the kernel's ``0000:3b:00``.

    Converting on load keeps a count that was scraped under the old spelling going under the new one, instead of
    starting it again from zero (which Prometheus would read as a reset) for the rest of the boot.
    """
    try:
        return canonical_pci_id(str(saved))
    except ValueError:
        return str(saved)


def _merge(pairs: Iterable[tuple[Any, Any]], combine: Callable[[Any, Any], Any]) -> dict[Any, Any]:
    """Build a dict, combining values whose keys became equal once their PCI ids were converted."""
    out: dict[Any, Any] = {}
    for key, value in pairs:
        out[key] = combine(out[key], value) if key in out else value
    return out


@dataclass(frozen=True, slots=True)
class XidView:
    """An immutable copy of the store: what was saved and is rendered. Keys are PCI ids, never per-line text."""

    boot_id: str
    source: str
    position: Any
    xid: Mapping[tuple[str, int], tuple[int, float]] = field(default_factory=dict)  # (pci, xid) -> (count, last ts)
    sxid: Mapping[tuple[str, int], tuple[int, int, float]] = field(default_factory=dict)  # -> (count, fatal, last ts)
    fallen_off_bus: Mapping[str, float] = field(default_factory=dict)  # pci -> first seen (wall seconds)
    recovery_action: Mapping[str, int] = field(default_factory=dict)  # pci -> latest Xid 154 action
    gpus: Mapping[str, GpuKey] = field(default_factory=dict)  # pci -> GPU, learned this boot
    nvml_only: Mapping[tuple[int, str, int], int] = field(default_factory=dict)  # (gpu, uuid, xid) -> count
    lines_read: int = 0
    kmsg_records_lost: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "boot_id": self.boot_id,
            "source": self.source,
            "position": self.position,
            "xid": [[pci, code, count, ts] for (pci, code), (count, ts) in sorted(self.xid.items())],
            "sxid": [[pci, code, c, f, ts] for (pci, code), (c, f, ts) in sorted(self.sxid.items())],
            "fallen_off_bus": dict(sorted(self.fallen_off_bus.items())),
            "recovery_action": dict(sorted(self.recovery_action.items())),
            "gpus": {pci: [k.index, k.uuid] for pci, k in sorted(self.gpus.items())},
            "nvml_only": [[gpu, uuid, code, count] for (gpu, uuid, code), count in sorted(self.nvml_only.items())],
            "lines_read": self.lines_read,
            "kmsg_records_lost": self.kmsg_records_lost,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> XidView:
        return cls(
            boot_id=str(data["boot_id"]),
            source=str(data.get("source", "")),
            position=_position(data.get("position")),
            xid=_merge(
                (((_pci(p), int(c)), (int(n), float(ts))) for p, c, n, ts in data.get("xid", [])),
                lambda a, b: (max(a[0], b[0]), max(a[1], b[1])),
            ),
            sxid=_merge(
                (((_pci(p), int(c)), (int(n), int(f), float(ts))) for p, c, n, f, ts in data.get("sxid", [])),
                lambda a, b: (max(a[0], b[0]), max(a[1], b[1]), max(a[2], b[2])),
            ),
            fallen_off_bus=_merge(((_pci(p), float(ts)) for p, ts in data.get("fallen_off_bus", {}).items()), min),
            recovery_action={_pci(p): int(a) for p, a in data.get("recovery_action", {}).items()},
            gpus={_pci(p): GpuKey(int(i), str(u)) for p, (i, u) in data.get("gpus", {}).items()},
            nvml_only={(int(g), str(u), int(c)): int(n) for g, u, c, n in data.get("nvml_only", [])},
            lines_read=int(data.get("lines_read", 0)),
            kmsg_records_lost=int(data.get("kmsg_records_lost", 0)),
        )


def _position(value: Any) -> Any:
    # JSON has no tuples: a file position comes back as a list.
    return tuple(value) if isinstance(value, list) else value


class XidStore:
    """The live counts, fed by the reader thread and the NVML event thread; ``view()`` copies them for rendering.

    On load, state of this boot and this source resumes: counts continue and ``resume_position`` says where to
    read from. State of this boot but another source (say kmsg became unreadable and auto picked journald) has
    no usable position, so the source is replayed from its start and each count shown is the larger of the
    saved and the replayed one: never lower, and the same XIDs are not counted twice. State of another boot is
    ignored: counts start from zero.
    """

    def __init__(self, path: Path | None, boot_id: str, source: str, *, errors: Any = None) -> None:
        self.path = path
        self.boot_id = boot_id
        self.source = source
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._save_failing = False
        self._errors = errors  # exporter.state.WriteErrors: gpu_exporter_state_write_errors_total{file="xid"}
        self._xid: dict[tuple[str, int], list[Any]] = {}  # -> [count, last ts]
        self._sxid: dict[tuple[str, int], list[Any]] = {}  # -> [count, fatal count, last ts]
        self._fallen: dict[str, float] = {}
        self._recovery: dict[str, int] = {}
        self._gpus: dict[str, GpuKey] = {}
        self._nvml_only: dict[tuple[int, str, int], int] = {}
        self._lines = 0
        self._lost = 0
        self._position: Any = None
        # Counts of a replaced source: shown as a floor under the replayed counts.
        self._floor_xid: dict[tuple[str, int], int] = {}
        self._floor_sxid: dict[tuple[str, int], tuple[int, int]] = {}
        self.resume_position: Any = None
        self.restored = "none"  # none | resumed | merged | other-boot
        self._load()

    # --- loading -------------------------------------------------------------------------

    def _load(self) -> None:
        if self.path is None:
            return
        try:
            saved = XidView.from_json(json.loads(self.path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable XID state", extra={"path": str(self.path), "error": str(exc)})
            return
        if saved.boot_id != self.boot_id:
            self.restored = "other-boot"
            return
        # Whatever the source, these never go down and are not replayed from the log.
        self._nvml_only = dict(saved.nvml_only)
        self._lines, self._lost = saved.lines_read, saved.kmsg_records_lost
        self._gpus = dict(saved.gpus)
        self._fallen = dict(saved.fallen_off_bus)
        self._recovery = dict(saved.recovery_action)
        if saved.source == self.source and saved.position is not None:
            self.restored = "resumed"
            self.resume_position = self._position = saved.position
            self._xid = {k: [n, ts] for k, (n, ts) in saved.xid.items()}
            self._sxid = {k: [n, f, ts] for k, (n, f, ts) in saved.sxid.items()}
        else:
            self.restored = "merged"
            self._floor_xid = {k: n for k, (n, _ts) in saved.xid.items()}
            self._floor_sxid = {k: (n, f) for k, (n, f, _ts) in saved.sxid.items()}
            # Timestamps are kept; counts start from the floor once replayed events arrive.
            self._xid = {k: [0, ts] for k, (_n, ts) in saved.xid.items()}
            self._sxid = {k: [0, 0, ts] for k, (_n, _f, ts) in saved.sxid.items()}

    # --- updates (any thread) ----------------------------------------------------------------

    def record(
        self,
        events: Iterable[tuple[KernelEvent, float, int]],
        lines: int,
        position: Any,
        resolve: Callable[[str], GpuKey | None],
    ) -> list[tuple[GpuKey, int]]:
        """Count ``events`` read with ``lines`` lines, up to ``position``.

        Each entry is (event, wall time of its last occurrence, occurrences in a row): a storm of one line is one
        entry. ``resolve`` maps a kernel PCI id to a GPU (a dict lookup, never NVML). Returns the Xids of known
        GPUs, for de-duplicating NVML events.
        """
        seen: list[tuple[GpuKey, int]] = []
        with self._lock:
            self._lines += lines
            if position is not None:
                self._position = position
            for event, ts, n in events:
                code = event.code
                if event.kind == "xid" and code is not None:
                    pci = event.pci_bus_id
                    entry = self._xid.get((pci, code))
                    if entry is None:
                        self._xid[(pci, code)] = [n, ts]
                    else:
                        entry[0] += n
                        entry[1] = max(entry[1], ts)
                    key = self._resolve_locked(pci, resolve)
                    if key is not None:
                        seen.append((key, code))
                    if code == FALLEN_OFF_BUS_XID:
                        self._fallen.setdefault(pci, ts)
                    if event.recovery_action is not None:
                        self._recovery[pci] = event.recovery_action
                elif event.kind == "sxid" and code is not None:
                    entry = self._sxid.get((event.pci_bus_id, code))
                    if entry is None:
                        entry = self._sxid[(event.pci_bus_id, code)] = [0, 0, ts]
                    entry[0] += n
                    entry[1] += n if event.fatal is True else 0
                    entry[2] = max(entry[2], ts)
                elif event.kind == "fallen_off_bus":
                    pci = event.pci_bus_id
                    self._fallen.setdefault(pci, ts)
                    self._resolve_locked(pci, resolve)
        return seen

    def _resolve_locked(self, pci: str, resolve: Callable[[str], GpuKey | None]) -> GpuKey | None:
        key = self._gpus.get(pci)
        if key is None:
            key = resolve(pci)
            if key is not None:
                self._gpus[pci] = key
        return key

    def learn(self, pci: str, key: GpuKey) -> None:
        """Remember which GPU a PCI id is, for the rest of the boot (it may fall off the bus later)."""
        with self._lock:
            self._gpus.setdefault(pci, key)

    def add_lost(self, records: int) -> None:
        with self._lock:
            self._lost += records

    def add_nvml_only(self, key: GpuKey, xid: int) -> None:
        with self._lock:
            k = (key.index, key.uuid, xid)
            self._nvml_only[k] = self._nvml_only.get(k, 0) + 1

    # --- reading -----------------------------------------------------------------------------

    def view(self) -> XidView:
        with self._lock:
            xid = {k: (max(n, self._floor_xid.get(k, 0)), ts) for k, (n, ts) in self._xid.items()}
            for k, n in self._floor_xid.items():
                if k not in xid:
                    xid[k] = (n, 0.0)
            sxid: dict[tuple[str, int], tuple[int, int, float]] = {}
            for k, (n, f, ts) in self._sxid.items():
                fn, ff = self._floor_sxid.get(k, (0, 0))
                sxid[k] = (max(n, fn), max(f, ff), ts)
            for k, (n, f) in self._floor_sxid.items():
                if k not in sxid:
                    sxid[k] = (n, f, 0.0)
            return XidView(
                boot_id=self.boot_id,
                source=self.source,
                position=self._position,
                xid=xid,
                sxid=sxid,
                fallen_off_bus=dict(self._fallen),
                recovery_action=dict(self._recovery),
                gpus=dict(self._gpus),
                nvml_only=dict(self._nvml_only),
                lines_read=self._lines,
                kmsg_records_lost=self._lost,
            )

    def save(self, view: XidView) -> bool:
        """Write ``view`` atomically (temporary file, then rename); False if it could not be written."""
        if self.path is None:
            return True
        with self._save_lock:
            tmp = self.path.with_name(self.path.name + ".tmp")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_text(json.dumps(view.to_json(), separators=(",", ":")), encoding="utf-8")
                os.replace(tmp, self.path)
            except OSError as exc:
                # Counts are still shown (a dip after a restart is then possible); said once, not per event,
                # and counted, so that the loss is visible without reading logs.
                if self._errors is not None:
                    self._errors.failed("xid")
                if not self._save_failing:
                    log.warning("cannot persist XID state", extra={"path": str(self.path), "error": str(exc)})
                self._save_failing = True
                return False
            if self._save_failing:
                log.info("XID state persisted again", extra={"path": str(self.path)})
            self._save_failing = False
        return True
