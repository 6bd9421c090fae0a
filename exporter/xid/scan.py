"""``gpu-health-exporter scan-log PATH``: print the Xid/SXid/fallen-off-the-bus events of a saved kernel log as JSON.

For checking the parser against a node's real log (dmesg, dmesg -T, journalctl -k, syslog, or a raw /dev/kmsg dump)
before trusting the exporter's counters: one JSON object per event, one per line, so the output pipes into ``jq``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from typing import Any, TextIO

from exporter.xid.catalog import lookup
from exporter.xid.parse import KernelEvent, RecordAssembler, unescape_kmsg

FALLEN_OFF_BUS_NAME = "GPU_FALLEN_OFF_BUS"

# 4,1234,206764307,-;NVRM: Xid (PCI:0000:01:00): 79, GPU has fallen off the bus
_KMSG_RE = re.compile(r"\d+,\d+,\d+,[^;,]*(?:,[^;]*)?;")
# " SUBSYSTEM=pci" / " DEVICE=+pci:0000:3b:00.0"   (kmsg dictionary lines that follow a record)
_KMSG_CONT_RE = re.compile(r" [A-Z][A-Z0-9_]*=")
_OPTIONAL = ("gpu_instance", "compute_instance", "caused_by", "recovery_action", "fatal")


def event_dict(event: KernelEvent) -> dict[str, Any]:
    """Return the JSON shape of ``event``: the fixed keys always, the optional ones only when the line set them."""
    name: str | None = None
    action: str | None = None
    if event.kind == "xid" and event.code is not None:
        info = lookup(event.code)
        name, action = info.name, info.action
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
    return out


def scan(stream: TextIO) -> Iterator[dict[str, Any]]:
    """Yield one dict per event in ``stream``; /dev/kmsg records lose their header and escapes first."""
    assembler = RecordAssembler()
    for line in stream:
        if line.startswith(" ") and _KMSG_CONT_RE.match(line):
            continue
        if line[:1].isdigit() and (m := _KMSG_RE.match(line)):
            line = unescape_kmsg(line[m.end() :].rstrip("\r\n"))
        for event in assembler.feed(line):
            yield event_dict(event)
    for event in assembler.flush():
        yield event_dict(event)


def main(argv: list[str]) -> int:
    """Run ``scan-log`` on ``argv`` (the arguments after the subcommand); 0 on success, 1 if PATH cannot be read."""
    parser = argparse.ArgumentParser(
        prog="gpu-health-exporter scan-log",
        description="Print the Xid, SXid and fallen-off-the-bus events in a kernel log, one JSON object per line.",
    )
    parser.add_argument(
        "path", metavar="PATH", help="kernel log (dmesg, journalctl -k, syslog, /dev/kmsg dump); - for stdin"
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
        return _print_events(stream)
    finally:
        if stream is not sys.stdin:
            stream.close()


def _print_events(stream: TextIO) -> int:
    """Write each event as one JSON line; flush per line so a `tail -f | scan-log -` pipe shows events at once."""
    for event in scan(stream):
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
