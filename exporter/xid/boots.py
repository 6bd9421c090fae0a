"""Where each boot begins in a saved kernel log, and whether the last boot in it is the one running now.

A syslog file (kern.log, messages) holds several boots back to back. Counting its Xids as this boot's would count a
previous boot's Xid 79 again after every reboot, so the file source and ``scan-log`` split a log at boot boundaries:

- the kernel's first lines: ``Linux version ...``, then ``Command line: ...`` / ``Kernel command line: ...``, and a
  saved /dev/kmsg record with sequence number 0;
- the dmesg monotonic timestamp (``[   12.345678]``, or the microseconds of a saved /dev/kmsg record) going back
  to near zero (under ``RESET_BELOW`` seconds);
- journalctl's ``-- Reboot --`` line, and a change of ``_BOOT_ID`` in ``journalctl -o json`` / ``-o export`` lines.

A boot's first lines show several of these a few lines apart (``Linux version`` and ``Command line`` at timestamp 0):
a sign that boot has not shown yet, less than ``MERGE_LINES`` lines after its start, belongs to it; a sign it has
shown already begins the next boot. Whether a boot is the running one is decided, in order, by
its boot id, by the wall time its first line was logged at (not before this boot began), or by its monotonic
timestamps (none past this boot's uptime); a log that allows none of these is not taken for this boot.
"""

from __future__ import annotations

import calendar
import re
import time
from dataclasses import dataclass, field

__all__ = ["BootIdentity", "BootStart", "BootTracker", "is_current_boot"]

MERGE_LINES = 20
# How much earlier than this boot's start a wall-clock stamp may be and still be this boot's (clock set at boot).
WALL_SLACK = 120.0
# How far a monotonic timestamp may go back before it is a new boot (CPUs' printk clocks are not exactly ordered),
# and below what it must land: a new boot's first lines are logged within its first minute.
MONOTONIC_SLACK = 1.0
RESET_BELOW = 60.0

# [   12.345678]   (dmesg, and syslog lines that kept the kernel's timestamp)
_MONO_RE = re.compile(r"\[\s*(\d+)\.(\d+)\]")
# 4,1234,206764307,-;   (a saved /dev/kmsg record: priority, sequence, microseconds)
_KMSG_RE = re.compile(r"(\d+),(\d+),(\d+),[^;]*;")
# the kernel's first lines, as printed (alone, after a dmesg timestamp, or after a syslog "kernel:" prefix)
_FIRST_LINE_RE = re.compile(r"(?:^|kernel:|\]|;)\s*(?:\[\s*\d+\.\d+\]\s*)?(Linux version \d|(?:Kernel )?[Cc]ommand line: )")
_REBOOT_RE = re.compile(r"^-- Reboot --")
_BOOT_ID_RE = re.compile(r"_BOOT_ID\"?\s*[:=]\s*\"?([0-9a-fA-F]{32})")
# 2024-08-18T13:36:47.378241+00:00 / ...Z   (rsyslog RFC 3339; journalctl -o short-iso)
_ISO_RE = re.compile(r"^(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d):(\d\d)(?:\.\d+)?(Z|[+-]\d\d:?\d\d)?")
# Nov 22 18:29:55   (classic syslog, local time, no year)
_SYSLOG_RE = re.compile(r"^([A-Z][a-z]{2})\s+(\d{1,2}) (\d\d):(\d\d):(\d\d)\b")
# [Fri Aug 30 11:43:09 2024]   (dmesg -T, local time)
_CTIME_RE = re.compile(r"^\[[A-Z][a-z]{2} ([A-Z][a-z]{2})\s+(\d{1,2}) (\d\d):(\d\d):(\d\d) (\d{4})\]")
_MONTHS = {name: i for i, name in enumerate(calendar.month_abbr) if name}


@dataclass(frozen=True, slots=True)
class BootIdentity:
    """The running boot: its id (dashes or not), the wall time it began, and its uptime on the printk clock."""

    boot_id: str | None
    began: float
    uptime: float

    @classmethod
    def here(cls, boot_id: str | None) -> BootIdentity:
        now = time.time()
        return cls(boot_id, now - time.clock_gettime(time.CLOCK_BOOTTIME), time.monotonic())


@dataclass(slots=True)
class BootStart:
    """One boot found in a log: where its first line is, why it is taken for a boot's first line, and what is
    known of that boot so far (its id, when its first line was logged, its largest monotonic timestamp)."""

    line: int  # 0-based index of its first line
    offset: int  # byte offset of its first line, when the caller counts bytes
    reason: str  # its first sign (linux-version, command-line, kmsg-sequence-0, timestamp-reset, reboot-marker,
    # boot-id), or file-start for the boot the file begins in when no sign is on its first line
    boot_id: str | None = None
    wall: float | None = None
    max_monotonic: float | None = None
    signs: list[str] = field(default_factory=list)


def _wall(line: str, now: float) -> float | None:
    """The wall time a line's prefix gives, or None; a syslog date without a year is taken as the last year's
    date that is not in the future."""
    if m := _ISO_RE.match(line):
        y, mo, d, h, mi, s, tz = m.groups()
        fields = (int(y), int(mo), int(d), int(h), int(mi), int(s), 0, 0, -1)
        if tz is None:
            return time.mktime(fields)
        base = calendar.timegm(fields)
        if tz == "Z":
            return float(base)
        sign = 1 if tz[0] == "+" else -1
        digits = tz[1:].replace(":", "")
        return float(base - sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60))
    if m := _CTIME_RE.match(line):
        mon, d, h, mi, s, y = m.groups()
        if mon in _MONTHS:
            return time.mktime((int(y), _MONTHS[mon], int(d), int(h), int(mi), int(s), 0, 0, -1))
    if m := _SYSLOG_RE.match(line):
        mon, d, h, mi, s = m.groups()
        if mon in _MONTHS:
            year = time.localtime(now).tm_year
            stamp = time.mktime((year, _MONTHS[mon], int(d), int(h), int(mi), int(s), 0, 0, -1))
            return stamp if stamp <= now + 86400 else time.mktime(
                (year - 1, _MONTHS[mon], int(d), int(h), int(mi), int(s), 0, 0, -1)
            )
    return None


class BootTracker:
    """Feed a log's lines in order; ``boots`` lists each boot found, the first from the log's start."""

    def __init__(self, now: float | None = None) -> None:
        self._now = time.time() if now is None else now
        self.boots: list[BootStart] = [BootStart(0, 0, "file-start")]
        self._line = -1
        self._mono: float | None = None
        self._boot_id: str | None = None

    def feed(self, line: str, offset: int = 0) -> BootStart | None:
        """Consume one line; return the boot it begins, if it begins one."""
        self._line += 1
        signs: list[str] = []
        mono = None
        if line[:1].isdigit() and (k := _KMSG_RE.match(line)):
            mono = int(k.group(3)) / 1e6
            if int(k.group(2)) == 0:
                signs.append("kmsg-sequence-0")  # the kernel numbers a boot's records from 0
        elif "[" in line and (m := _MONO_RE.search(line)):
            mono = int(m.group(1)) + float("0." + m.group(2))
        if mono is not None:
            if self._mono is not None and mono + MONOTONIC_SLACK < self._mono and mono < RESET_BELOW:
                signs.append("timestamp-reset")
            self._mono = mono
        if ("Linux version" in line or "ommand line: " in line) and (f := _FIRST_LINE_RE.search(line)):
            signs.append("linux-version" if f.group(1).startswith("Linux") else "command-line")
        elif line.startswith("-- Reboot --"):
            signs.append("reboot-marker")
        boot_id = None
        if "_BOOT_ID" in line and (b := _BOOT_ID_RE.search(line)):
            boot_id = b.group(1).lower()
            if self._boot_id is not None and boot_id != self._boot_id:
                signs.append("boot-id")
            self._boot_id = boot_id
        current = self.boots[-1]
        started = None
        if signs:
            # The first lines of one boot show several signs a few lines apart, each once; the file's first boot
            # takes them only from its first line on (otherwise the file began inside an earlier boot).
            if current.reason == "file-start" and not current.signs:
                merge = self._line == 0
            else:
                merge = self._line - current.line <= MERGE_LINES and not set(signs) & set(current.signs)
            if merge:
                if current.reason == "file-start":
                    current.reason = signs[0]
                current.signs.extend(signs)
            else:
                current = started = BootStart(self._line, offset, signs[0], signs=list(signs))
                self.boots.append(current)
        if boot_id is not None and current.boot_id is None:
            current.boot_id = boot_id
        if current.wall is None:
            current.wall = _wall(line, self._now)
        if mono is not None and (current.max_monotonic is None or mono > current.max_monotonic):
            current.max_monotonic = mono
        return started


def is_current_boot(boot: BootStart, here: BootIdentity) -> bool:
    """Whether ``boot`` (a boot found in a log) is the running one; False when the log cannot tell.

    A boot that is only "the start of the file" is never taken for this one by its timestamps alone: the file may
    begin in the middle of an older boot (rotation), and only a first line proves where a boot began.
    """
    if boot.boot_id is not None and here.boot_id:
        return boot.boot_id == here.boot_id.replace("-", "").lower()
    if boot.reason == "file-start":
        return False
    if boot.wall is not None:
        return boot.wall >= here.began - WALL_SLACK
    if boot.max_monotonic is not None:
        return boot.max_monotonic <= here.uptime + MONOTONIC_SLACK
    return False
