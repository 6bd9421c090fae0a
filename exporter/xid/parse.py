"""Find NVIDIA Xid, SXid and "fallen off the bus" records in kernel-log text.

The parser runs on every kernel-log line of a busy node, so each entry point first does a plain substring test and
only then a precompiled regex. Lines are matched anywhere after any prefix (dmesg seconds or dates, syslog
``host kernel:``, journal, ``dmesg --decode``), because the prefix depends on who collected the log, not on the driver.

Events never carry the pid or process name the driver prints: those are unbounded and would explode metric label
cardinality (and leak workload names), so they are dropped here rather than trusted to be dropped later.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["KernelEvent", "RecordAssembler", "parse_line", "unescape_kmsg"]

_PCI = r"[0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}"  # domain:bus:device; VMD domains print 5+ digits

# NVRM: Xid (PCI:0000:cb:00): 13, pid='<unknown>', name=<unknown>, Graphics SM Warp Exception on (GPC 7, ...
# NVRM: Xid (0000:01:00): 31, Ch 0000000b, engmask 00000120, intr 10000000            (pre-2016 drivers: no "PCI:")
# NVRM: Xid (PCI:0000:01:00 GPU-I:05 GPU-CI:01): 13, ...                               (MIG attribution)
# The ".f" function is accepted and dropped: the driver never prints it, but some tools' fixtures do.
_XID_RE = re.compile(
    rf"NVRM:\s+Xid\s*\((?:PCI:)?(?P<pci>{_PCI})(?:\.[0-7])?"
    r"(?:\s+GPU-I:(?P<gi>\d+))?(?:\s+GPU-CI:(?P<ci>\d+))?\):\s*(?P<code>\d+)(?:,\s*(?P<rest>.*))?"
)
# pid='<unknown>', name=<unknown>, Graphics Exception: ...   /   pid=1101234, name=nvc:[driver], GPU has fallen off ...
# pid=7062, Contained: CE User Channel (0x9). RST: No, D-RST: No                        (pid without name)
_PID_NAME_RE = re.compile(r"pid=(?:'?<unknown>'?|\d+)(?:,\s*|$)(?:name=(?:'?<unknown>'?|.*?)(?:,\s*|$))?")
# nvidia-nvswitch3: SXid (PCI:0000:04:00.0): 22013, Non-fatal, Link 44 Minion Link DLREQ interrupt
_SXID_RE = re.compile(rf"SXid\s*\((?:PCI:)?(?P<pci>{_PCI}(?:\.[0-7])?)\):\s*(?P<code>\d+)(?:,\s*(?P<rest>.*))?")
# NVRM: GPU 0000:44:00.0: GPU has fallen off the bus.                                  (runtime, next to Xid 79)
_FOB_RUNTIME_RE = re.compile(rf"NVRM:\s+GPU\s+(?:PCI:)?(?P<pci>{_PCI}(?:\.[0-7])?):\s+GPU has fallen off the bus")
# NVRM: The NVIDIA GPU 0000:b3:00.0\nNVRM: (PCI ID: 10de:26b5) installed in this system has\nNVRM: fallen off ...
# (probe time, one printk with embedded newlines; rsyslog writes them as "#012", raw /dev/kmsg as "\x0a")
_FOB_START_RE = re.compile(rf"NVRM:\s+The NVIDIA GPU\s+(?P<pci>{_PCI}(?:\.[0-7])?)")
_FOB_PROBE_RE = re.compile(rf"NVRM:\s+The NVIDIA GPU\s+(?P<pci>{_PCI}(?:\.[0-7])?)\b.*?fallen off the bus", re.DOTALL)
# NVRM: (PCI ID: 10de:26b5) installed in this system has   /   NVRM: fallen off the bus and is not responding ...
_FOB_CONT_RE = re.compile(r"NVRM:\s+(?:\(PCI ID:|fallen off the bus)")
# SAW_MVB Nonfatal XC0 i0 Link 0 (0x...)   /   NETIR_LINK_EVT  Fatal   XC0 i0 Link 09 (0x...)   (Xid 144-150)
_NVLINK5_SEVERITY_RE = re.compile(r"\S+\s+(Fatal|Non-?fatal)\b")
# Non-fatal, Link 44 Minion Link DLREQ interrupt   /   Fatal, Link 28 sourcetrack timeout error (First)   (SXid)
_SXID_SEVERITY_RE = re.compile(r"(Fatal|Non-?fatal)\b")
# Ch 00000001 caused by previous Xid 149   (Xid 45, drivers 570.124.04+)
_CAUSED_BY_RE = re.compile(r"caused by previous Xid (\d+)")
# GPU recovery action changed from 0x0 (None) to 0x1 (GPU Reset Required)   (Xid 154)
_RECOVERY_RE = re.compile(r"recovery action changed from 0x[0-9a-fA-F]+\b.*?\bto 0x([0-9a-fA-F]+)")
# \x0a   (an escaped byte in a /dev/kmsg record; runs are decoded together so UTF-8 sequences survive)
_KMSG_ESCAPES_RE = re.compile(r"(?:\\x[0-9a-fA-F]{2})+")


@dataclass(frozen=True, slots=True)
class KernelEvent:
    """One Xid, SXid or fallen-off-the-bus record; only bounded, label-safe fields besides ``message``.

    ``pci_bus_id`` is lower case: ``dddd:bb:dd`` for Xid (the kernel prints no function), and as printed (with
    ``.f`` when present) for SXid and fallen-off-the-bus. ``message`` is free text for humans; never use it as a label.
    """

    kind: str  # "xid", "sxid" or "fallen_off_bus"
    code: int | None  # Xid/SXid number; None for fallen_off_bus
    pci_bus_id: str
    message: str  # text after "NNN, " (Xid/SXid), or the record from "NVRM:" on (fallen_off_bus)
    gpu_instance: int | None = None  # MIG "GPU-I:05"
    compute_instance: int | None = None  # MIG "GPU-CI:01"
    caused_by: int | None = None  # Xid 45 "... caused by previous Xid 149"
    recovery_action: int | None = None  # Xid 154: the new NVML recovery action ("to 0x1 (GPU Reset Required)" -> 1)
    fatal: bool | None = None  # the driver's own Fatal/Nonfatal word (Xid 144-150, SXid) when printed


def unescape_kmsg(text: str) -> str:
    r"""Undo /dev/kmsg escaping: ``\xNN`` becomes the byte it stands for (``\x0a`` a newline, ``\x5c`` a backslash).

    The kernel escapes every byte below 0x20 or above 0x7e, so multi-byte UTF-8 arrives as several escapes; a run is
    decoded as UTF-8, and bytes that are not valid UTF-8 are left escaped rather than guessed at.
    """
    if "\\x" not in text:
        return text
    return _KMSG_ESCAPES_RE.sub(
        lambda m: bytes.fromhex(m.group(0).replace("\\x", "")).decode("utf-8", "backslashreplace"), text
    )


def _probe_event(text: str, match: re.Match[str]) -> KernelEvent:
    """Build the fallen_off_bus event of a probe-time record; drop per-line prefixes so both shapes read the same."""
    parts = text[match.start() :].rstrip().split("\n")
    message = "\n".join(part[part.find("NVRM:") :] if "NVRM:" in part else part.strip() for part in parts)
    return KernelEvent("fallen_off_bus", None, match.group("pci").lower(), message)


def _xid_event(match: re.Match[str]) -> KernelEvent:
    """Build an xid event, dropping the pid/name the driver may print before the message."""
    code = int(match.group("code"))
    rest = (match.group("rest") or "").rstrip()
    if rest.startswith("pid="):
        pid_name = _PID_NAME_RE.match(rest)
        if pid_name:
            rest = rest[pid_name.end() :]
    caused_by = recovery = fatal = None
    if "caused by" in rest and (m := _CAUSED_BY_RE.search(rest)):
        caused_by = int(m.group(1))
    if code == 154 and (m := _RECOVERY_RE.search(rest)):
        recovery = int(m.group(1), 16)
    if 144 <= code <= 150 and (m := _NVLINK5_SEVERITY_RE.match(rest)):
        fatal = m.group(1) == "Fatal"
    gi, ci = match.group("gi"), match.group("ci")
    return KernelEvent(
        kind="xid",
        code=code,
        pci_bus_id=match.group("pci").lower(),
        message=rest,
        gpu_instance=int(gi) if gi is not None else None,
        compute_instance=int(ci) if ci is not None else None,
        caused_by=caused_by,
        recovery_action=recovery,
        fatal=fatal,
    )


def parse_line(line: str) -> KernelEvent | None:
    """Return the event in one kernel-log line (or one whole record), or None if it holds none.

    A probe-time fallen-off-the-bus record split over several lines is not seen here; feed lines to
    ``RecordAssembler`` for that.
    """
    if "Xid" in line:
        if "SXid" in line and (m := _SXID_RE.search(line)):
            rest = (m.group("rest") or "").rstrip()
            sev = _SXID_SEVERITY_RE.match(rest)
            fatal = sev.group(1) == "Fatal" if sev else None
            return KernelEvent("sxid", int(m.group("code")), m.group("pci").lower(), rest, fatal=fatal)
        if m := _XID_RE.search(line):
            return _xid_event(m)
    if "fallen off the bus" in line:
        if m := _FOB_RUNTIME_RE.search(line):
            return KernelEvent("fallen_off_bus", None, m.group("pci").lower(), line[m.start() :].strip())
        if m := _FOB_PROBE_RE.search(line):
            return _probe_event(line, m)
    return None


class RecordAssembler:
    """Turn a stream of lines into events, joining the probe-time fallen-off-the-bus record when it arrives split.

    dmesg prints that one record as three lines (the last two indented), and syslog/journal exports may prefix each;
    the first line names the GPU, the last says it fell off the bus, so neither line alone is an event. An
    unfinished record is dropped when an unrelated line arrives, since without its last line it is not this message.
    """

    _MAX_LINES = 3

    def __init__(self) -> None:
        self._pending: list[str] = []

    def feed(self, line: str) -> list[KernelEvent]:
        """Consume one line (or one whole record); return the events it completes."""
        line = line.rstrip("\r\n")
        if self._pending:
            if _FOB_CONT_RE.search(line):
                self._pending.append(line)
                text = "\n".join(self._pending)
                if m := _FOB_PROBE_RE.search(text):
                    self._pending = []
                    return [_probe_event(text, m)]
                if len(self._pending) < self._MAX_LINES:
                    return []
            self._pending = []
        if "The NVIDIA GPU" in line and "fallen off the bus" not in line and _FOB_START_RE.search(line):
            self._pending = [line]
            return []
        event = parse_line(line)
        return [event] if event is not None else []

    def flush(self) -> list[KernelEvent]:
        """End of input: an unfinished record is not an event, so drop it; returns a list for symmetry with feed."""
        self._pending = []
        return []
