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

from exporter.pci import canonical_pci_id

__all__ = ["KernelEvent", "RecordAssembler", "SxidDetail", "parse_line", "parse_sxid_detail", "unescape_kmsg"]

# [domain:]bus:device; VMD domains print 5+ digits, and some NVRM lines print no domain at all ("GPU 18:00.0:")
_PCI = r"(?:[0-9a-fA-F]{4,8}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}"

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
# Continuation lines the driver prints after (or, for a data record logged first, before) an SXid's own line, with
# the same code (src/common/nvswitch/kernel/error_nvswitch.c): part of that incident, not incidents themselves.
# ... SXid (PCI:0000:04:00.0): 22013, Severity 0 Engine instance 44 Sub-engine instance 00
# ... SXid (PCI:0000:04:00.0): 22013, Data {0x0000002b, 0x0000002b, ...}
_SXID_DETAIL_RE = re.compile(
    r"Severity\s+(?P<severity>\d+)\s+Engine instance\s+(?P<engine>\d+)\s+Sub-engine instance\s+(?P<sub>\d+)"
    r"|Data\s*\{(?P<data>[^}]*)\}?"
)
# Fatal, Link 28 sourcetrack timeout error (First)   /   Non-fatal, Link 04 RX Short Error Rate   (SXid)
_SXID_LINK_RE = re.compile(r"\bLink\s+(\d+)\b")
# NVRM: GPU 0000:44:00.0: GPU has fallen off the bus.   /   NVRM: GPU 18:00.0: GPU has fallen off the bus.
# (runtime, next to Xid 79; NV_DEV_PRINTF, whose domain some drivers and log tools leave out)
_FOB_RUNTIME_RE = re.compile(rf"NVRM:\s+GPU\s+(?:PCI:)?(?P<pci>{_PCI}(?:\.[0-7])?):\s+GPU has fallen off the bus")
# The probe-time record, one printk of three lines (src/nvidia/arch/nvalloc/unix/src/osapi.c):
#   NVRM: The NVIDIA GPU 0000:b3:00.0
#   NVRM: (PCI ID: 10de:26b5) installed in this system has
#   NVRM: fallen off the bus and is not responding to commands.
# Whole in one text (kmsg "\x0a", rsyslog "#012", dmesg's indented lines joined), or split into lines that a log
# pipeline may deliver in another order; the first line may carry the PCI ID too, and the address may lack a domain.
_FOB_PROBE_RE = re.compile(rf"NVRM:\s+The NVIDIA GPU\s+(?P<pci>{_PCI}(?:\.[0-7])?)\b.*?fallen off the bus", re.DOTALL)
_FOB_START_RE = re.compile(rf"NVRM:\s+The NVIDIA GPU\s+(?P<pci>{_PCI}(?:\.[0-7])?)(?![0-9a-fA-F:.])")
_FOB_MIDDLE_RE = re.compile(r"NVRM:\s+(?:\(PCI ID:\s*[0-9a-fA-F]{4}:[0-9a-fA-F]{4}\)\s+)?installed in this system has\s*$")
_FOB_END_RE = re.compile(r"NVRM:\s+fallen off the bus and is not responding")
# SAW_MVB Nonfatal XC0 i0 Link 0 (0x...)   /   NETIR_LINK_EVT  Fatal   XC0 i0 Link 09 (0x...)   (Xid 144-150)
_NVLINK5_SEVERITY_RE = re.compile(r"\S+\s+(Fatal|Non-?fatal)\b")
# Non-fatal, Link 44 Minion Link DLREQ interrupt   /   Fatal, Link 28 ...   /   Correctable, Link 03 ...   (SXid)
_SXID_SEVERITY_RE = re.compile(r"(Fatal|Non-?fatal|Correctable)\b")
# Ch 00000001 caused by previous Xid 149   (Xid 45, drivers 570.124.04+)
_CAUSED_BY_RE = re.compile(r"caused by previous Xid (\d+)")
# GPU recovery action changed from 0x0 (None) to 0x1 (GPU Reset Required)   (Xid 154)
_RECOVERY_RE = re.compile(r"recovery action changed from 0x[0-9a-fA-F]+\b.*?\bto 0x([0-9a-fA-F]+)")
# \x0a   (an escaped byte in a /dev/kmsg record; runs are decoded together so UTF-8 sequences survive)
_KMSG_ESCAPES_RE = re.compile(r"(?:\\x[0-9a-fA-F]{2})+")


@dataclass(frozen=True, slots=True)
class KernelEvent:
    """One Xid, SXid or fallen-off-the-bus record; only bounded, label-safe fields besides ``message``.

    ``pci_bus_id`` is NVML's spelling for every kind (``00000000:18:00.0``, see exporter.pci), so that it joins
    ``gpu_info``. ``message`` is free text for humans; never use it as a label.
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
    link: int | None = None  # SXid "Link 44": the NVSwitch port


@dataclass(frozen=True, slots=True)
class SxidDetail:
    """A continuation line of an SXid incident: ``Severity ... Engine instance ...`` or ``Data {...}``.

    Never counted: the driver prints these with the incident's code after (or before) the line that reports it.
    """

    code: int
    pci_bus_id: str
    severity: int | None = None
    engine_instance: int | None = None
    sub_engine_instance: int | None = None
    data: tuple[str, ...] | None = None


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
    return KernelEvent("fallen_off_bus", None, canonical_pci_id(match.group("pci")), message)


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
        pci_bus_id=canonical_pci_id(match.group("pci")),
        message=rest,
        gpu_instance=int(gi) if gi is not None else None,
        compute_instance=int(ci) if ci is not None else None,
        caused_by=caused_by,
        recovery_action=recovery,
        fatal=fatal,
    )


def _sxid_match(line: str) -> tuple[re.Match[str], str] | None:
    if "SXid" in line and (m := _SXID_RE.search(line)):
        return m, (m.group("rest") or "").rstrip()
    return None


def parse_sxid_detail(line: str) -> SxidDetail | None:
    """Return the continuation line of an SXid incident in ``line`` (Severity/Engine or Data), or None."""
    found = _sxid_match(line)
    if found is None:
        return None
    m, rest = found
    detail = _SXID_DETAIL_RE.match(rest)
    if detail is None:
        return None
    code, pci = int(m.group("code")), canonical_pci_id(m.group("pci"))
    if detail.group("severity") is not None:
        return SxidDetail(code, pci, int(detail.group("severity")), int(detail.group("engine")), int(detail.group("sub")))
    return SxidDetail(code, pci, data=tuple(word.strip() for word in detail.group("data").split(",") if word.strip()))


def parse_line(line: str) -> KernelEvent | None:
    """Return the event in one kernel-log line (or one whole record), or None if it holds none.

    An SXid continuation line (``Severity ...``, ``Data {...}``) is no event: see ``parse_sxid_detail``. A
    probe-time fallen-off-the-bus record split over several lines is not seen here; feed lines to
    ``RecordAssembler`` for that.
    """
    if "Xid" in line:
        if found := _sxid_match(line):
            m, rest = found
            if _SXID_DETAIL_RE.match(rest):
                return None
            sev = _SXID_SEVERITY_RE.match(rest)
            fatal = sev.group(1) == "Fatal" if sev else None
            link = _SXID_LINK_RE.search(rest) if sev else None
            return KernelEvent(
                "sxid", int(m.group("code")), canonical_pci_id(m.group("pci")), rest, fatal=fatal,
                link=int(link.group(1)) if link else None,
            )
        if m := _XID_RE.search(line):
            return _xid_event(m)
    if "fallen off the bus" in line:
        if m := _FOB_RUNTIME_RE.search(line):
            return KernelEvent(
                "fallen_off_bus", None, canonical_pci_id(m.group("pci")), line[m.start() :].strip()
            )
        if m := _FOB_PROBE_RE.search(line):
            return _probe_event(line, m)
    return None


_PROBE_ORDER = ("start", "middle", "end")


def _probe_piece(line: str) -> tuple[str, str | None] | None:
    """Which line of the probe-time record ``line`` is, with the PCI id for the first: or None."""
    if "NVRM:" not in line:
        return None
    if "The NVIDIA GPU" in line and (m := _FOB_START_RE.search(line)):
        return "start", m.group("pci")
    if "installed in this system has" in line and _FOB_MIDDLE_RE.search(line):
        return "middle", None
    if "fallen off the bus and" in line and _FOB_END_RE.search(line):
        return "end", None
    return None


class RecordAssembler:
    """Turn a stream of lines into events, joining the probe-time fallen-off-the-bus record when it arrives split.

    dmesg prints that one record as three lines (the last two indented), syslog/journal exports may prefix each,
    and a pipeline that sorts by time or merges CPUs' buffers may hand them over in another order. The record is
    complete once its first line (which names the GPU) and its last (which says it fell off the bus) are both in,
    whatever the order; the middle line is kept when present. Pieces wait at most ``MAX_GAP`` unrelated lines,
    which are parsed as usual meanwhile; a piece seen twice starts a new record (the old one lost a line).
    """

    MAX_GAP = 4

    def __init__(self) -> None:
        self._parts: dict[str, str] = {}
        self._pci: str | None = None
        self._gap = 0

    def feed(self, line: str) -> list[KernelEvent]:
        """Consume one line (or one whole record); return the events it completes."""
        line = line.rstrip("\r\n")
        if "fallen off the bus" not in line or "The NVIDIA GPU" not in line:
            piece = _probe_piece(line)
            if piece is not None:
                return self._add(piece[0], piece[1], line)
        self.unrelated()
        event = parse_line(line)
        return [event] if event is not None else []

    def _add(self, kind: str, pci: str | None, line: str) -> list[KernelEvent]:
        if kind in self._parts:
            self._parts, self._pci = {}, None
        self._parts[kind] = line[line.find("NVRM:") :].strip()
        self._gap = 0
        if pci is not None:
            self._pci = pci
        if self._pci is None or "end" not in self._parts:
            return []
        message = "\n".join(self._parts[k] for k in _PROBE_ORDER if k in self._parts)
        event = KernelEvent("fallen_off_bus", None, canonical_pci_id(self._pci), message)
        self._parts, self._pci = {}, None
        return [event]

    def unrelated(self) -> None:
        """A line that is no piece of the record went by (fed, or skipped by a caller's cache)."""
        if self._parts:
            self._gap += 1
            if self._gap > self.MAX_GAP:
                self._parts, self._pci, self._gap = {}, None, 0

    def flush(self) -> list[KernelEvent]:
        """End of input: an unfinished record is not an event, so drop it; returns a list for symmetry with feed."""
        self._parts, self._pci, self._gap = {}, None, 0
        return []
