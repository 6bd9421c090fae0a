"""``gpu-health-exporter scan-log PATH``: print the Xid/SXid/fallen-off-the-bus events of a saved kernel log as JSON.

For checking the parser against a node's real log (dmesg, dmesg -T, journalctl -k, syslog, or a raw /dev/kmsg dump)
before trusting the exporter's counters: one JSON object per event, one per line, so the output pipes into ``jq``.

Each event says which boot of the log it belongs to (``boot``, 1 for the first; see exporter.xid.boots), and
``--boot`` prints one boot only: ``current`` (the boot this machine runs, as the exporter's file source decides it),
``0`` the log's last boot, ``-1`` the one before, ``1`` its first. An SXid incident is one event: the driver's
continuation lines (``Severity ... Engine instance ...``, ``Data {...}``) fold into it, as ``severity``,
``engine_instance``, ``sub_engine_instance`` and ``data``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from exporter.state import BOOT_ID_PATH, read_boot_id
from exporter.xid.boots import BootIdentity, BootTracker, is_current_boot
from exporter.xid.catalog import lookup
from exporter.xid.parse import KernelEvent, RecordAssembler, SxidDetail, parse_sxid_detail, unescape_kmsg
from exporter.xid.sxid_catalog import lookup as lookup_sxid

FALLEN_OFF_BUS_NAME = "GPU_FALLEN_OFF_BUS"

# 4,1234,206764307,-;NVRM: Xid (PCI:0000:01:00): 79, GPU has fallen off the bus
_KMSG_RE = re.compile(r"\d+,\d+,\d+,[^;,]*(?:,[^;]*)?;")
# " SUBSYSTEM=pci" / " DEVICE=+pci:0000:3b:00.0"   (kmsg dictionary lines that follow a record)
_KMSG_CONT_RE = re.compile(r" [A-Z][A-Z0-9_]*=")
_OPTIONAL = ("gpu_instance", "compute_instance", "caused_by", "recovery_action", "fatal", "link")


def event_dict(event: KernelEvent, boot: int | None = None) -> dict[str, Any]:
    """Return the JSON shape of ``event``: the fixed keys always, the optional ones only when the line set them."""
    name: str | None = None
    action: str | None = None
    extra: dict[str, Any] = {}
    if event.kind == "xid" and event.code is not None:
        info = lookup(event.code)
        name, action = info.name, info.action
    elif event.kind == "sxid" and event.code is not None:
        sw = lookup_sxid(event.code)
        name, action = sw.name, sw.action
        extra["catalog_fatal"] = sw.fatal
    elif event.kind == "fallen_off_bus":
        name = FALLEN_OFF_BUS_NAME
    out: dict[str, Any] = {
        "kind": event.kind,
        "code": event.code,
        "pci_bus_id": event.pci_bus_id,
        "name": name,
        "action": action,
        "message": event.message,
    }
    for key in _OPTIONAL:
        value = getattr(event, key)
        if value is not None:
            out[key] = value
    out.update(extra)
    if boot is not None:
        out["boot"] = boot
    return out


def _add_detail(out: dict[str, Any], detail: SxidDetail) -> None:
    if detail.severity is not None:
        out["severity"] = detail.severity
        out["engine_instance"] = detail.engine_instance
        out["sub_engine_instance"] = detail.sub_engine_instance
    if detail.data is not None:
        out["data"] = [*out.get("data", []), *detail.data]


class _Incidents:
    """Fold SXid continuation lines into the incident they belong to (same NVSwitch, same code).

    The incident's own line is held until a line that is not one of its continuation lines arrives (or the input
    ends), so its details can join it; continuation lines that come first (a data record logged before the error
    line) wait for it, until any other line arrives.
    """

    def __init__(self) -> None:
        self._held: dict[str, Any] | None = None
        self._early: list[SxidDetail] = []

    def line(self, text: str, events: list[KernelEvent], boot: int | None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        detail = parse_sxid_detail(text) if "SXid" in text else None
        if detail is not None:
            held = self._held
            if held is not None and (held["pci_bus_id"], held["code"]) == (detail.pci_bus_id, detail.code):
                _add_detail(held, detail)
            else:
                out += self.flush()
                if self._early and (self._early[0].pci_bus_id, self._early[0].code) != (detail.pci_bus_id, detail.code):
                    self._early = []
                self._early.append(detail)
            return out
        for event in events:
            out += self.flush(keep_early=event.kind == "sxid")
            shaped = event_dict(event, boot)
            if event.kind != "sxid":
                out.append(shaped)
                continue
            for early in self._early:
                if (early.pci_bus_id, early.code) == (event.pci_bus_id, event.code):
                    _add_detail(shaped, early)
            self._early = []
            self._held = shaped
        if not events:
            out += self.flush()
        return out

    def flush(self, *, keep_early: bool = False) -> list[dict[str, Any]]:
        held, self._held = self._held, None
        if not keep_early:
            self._early = []
        return [held] if held is not None else []


def _texts(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(raw line, text to parse): /dev/kmsg records lose their header and escapes; dictionary lines are dropped."""
    for line in lines:
        if line.startswith(" ") and _KMSG_CONT_RE.match(line):
            continue
        text = line
        if line[:1].isdigit() and (m := _KMSG_RE.match(line)):
            text = unescape_kmsg(line[m.end() :].rstrip("\r\n"))
        yield line, text


def scan(stream: Iterable[str], *, boots: BootTracker | None = None) -> Iterator[dict[str, Any]]:
    """Yield one dict per event in ``stream``, each with the number of its boot in the log."""
    tracker = boots if boots is not None else BootTracker()
    assembler = RecordAssembler()
    incidents = _Incidents()
    for raw, text in _texts(stream):
        tracker.feed(raw.rstrip("\r\n"))
        boot = len(tracker.boots)
        yield from incidents.line(text, assembler.feed(text), boot)
    assembler.flush()
    yield from incidents.flush()


def choose_boot(lines: list[str], boot: str, here: BootIdentity) -> tuple[int, int, int, str]:
    """The lines ``[start, end)`` of the chosen boot, its number, and a sentence for stderr; ValueError if none."""
    tracker = BootTracker()
    for line in lines:
        tracker.feed(line.rstrip("\r\n"))
    found = tracker.boots
    if boot == "current":
        index = len(found) - 1
        if not is_current_boot(found[index], here):
            raise ValueError(
                f"the log holds {len(found)} boot(s) and none begins as this machine's current boot did "
                "(no first line of it, or its boot id or dates say another boot)"
            )
    else:
        n = int(boot)
        index = n - 1 if n > 0 else len(found) - 1 + n
        if not 0 <= index < len(found):
            raise ValueError(f"the log holds {len(found)} boot(s); --boot {boot} is not one of them")
    start = found[index].line
    end = found[index + 1].line if index + 1 < len(found) else len(lines)
    note = (
        f"boot {index + 1} of {len(found)}: lines {start + 1}-{end}"
        + (f", begins with: {found[index].reason}" if found[index].reason != "file-start" else ", from the log's start")
    )
    return start, end, index + 1, note


def _boot_arg(text: str) -> str:
    if text in ("all", "current"):
        return text
    try:
        int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected all, current or a boot number (1, 0, -1, ...), got {text!r}")
    return text


def main(argv: list[str]) -> int:
    """Run ``scan-log`` on ``argv`` (the arguments after the subcommand); 0 on success, 1 if PATH cannot be read or
    holds no such boot."""
    parser = argparse.ArgumentParser(
        prog="gpu-health-exporter scan-log",
        description="Print the Xid, SXid and fallen-off-the-bus events in a kernel log, one JSON object per line.",
    )
    parser.add_argument(
        "path", metavar="PATH", help="kernel log (dmesg, journalctl -k, syslog, /dev/kmsg dump); - for stdin"
    )
    parser.add_argument(
        "--boot", default="all", type=_boot_arg, metavar="BOOT",
        help="which boot of the log to print: all; current (the boot this machine runs, as the exporter's file "
             "source decides); 1 the first, 2 the second, ...; 0 the last, -1 the one before, ... "
             "Anything but all reads the whole input before printing. (default all)",
    )
    args = parser.parse_args(argv)
    if args.path == "-":
        stream = sys.stdin
        # Kernel logs can hold bytes that are not UTF-8 (process names); never die on one.
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    else:
        try:
            stream = open(args.path, encoding="utf-8", errors="replace")
        except OSError as exc:
            print(f"scan-log: cannot open {args.path}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    try:
        if args.boot == "all":
            return _print_events(scan(stream))
        lines = list(stream)
        try:
            start, end, number, note = choose_boot(lines, args.boot, BootIdentity.here(_boot_id()))
        except ValueError as exc:
            print(f"scan-log: {args.path}: {exc}", file=sys.stderr)
            return 1
        print(f"scan-log: {args.path}: {note}", file=sys.stderr)
        return _print_events({**event, "boot": number} for event in scan(lines[start:end]))
    finally:
        if stream is not sys.stdin:
            stream.close()


def _boot_id() -> str | None:
    boot_id = read_boot_id(BOOT_ID_PATH)
    return boot_id if boot_id not in ("", "unknown") else None


def _print_events(events: Iterable[dict[str, Any]]) -> int:
    """Write each event as one JSON line; flush per line so a `tail -f | scan-log -` pipe shows events at once."""
    for event in events:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
