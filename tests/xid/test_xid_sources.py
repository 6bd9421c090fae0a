"""XID sources: /dev/kmsg records through a FIFO and the read seam, a followed log file, journalctl JSON."""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from exporter.xid.parse import RecordAssembler
from exporter.xid.sources import (
    FileSource,
    JournalSource,
    KmsgSource,
    NullSource,
    Source,
    journal_item,
    make_source,
    validate_spec,
)
from tests.xid.xid_support import DEADLINE, wait_until


class Collected:
    """A sink that remembers every text and the last position, plus lost-record reports."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.times: list[float | None] = []
        self.position: Any = None
        self.lost = 0
        self.lock = threading.Lock()

    def __call__(self, items: list[tuple[str, float | None]], position: Any) -> None:
        with self.lock:
            self.texts.extend(t for t, _ in items)
            self.times.extend(ts for _, ts in items)
            self.position = position

    def on_lost(self, n: int) -> None:
        self.lost += n

    def start(self, source: Source, position: Any = None) -> Source:
        source.on_lost = self.on_lost
        source.start(self, position)
        return source


@pytest.fixture
def stop_later() -> Iterator[Callable[[Source], Source]]:
    sources: list[Source] = []
    yield lambda s: sources.append(s) or s
    for s in sources:
        s.stop()


# --- /dev/kmsg --------------------------------------------------------------------------------------

KMSG_RECORDS = [
    b"6,0,1000000,-;nvidia-nvswitch2: open (major=510)\n",
    b"4,1,2000000,-;NVRM: Xid (PCI:0000:18:00): 79, pid=1101234, name=nvc:[driver], GPU has fallen off the bus.\n"
    b" SUBSYSTEM=pci\n DEVICE=+pci:0000:18:00.0\n",
    rb"4,2,3000000,-;NVRM: The NVIDIA GPU 0000:3b:00.0\x0aNVRM: (PCI ID: 10de:2330) installed in this system has"
    rb"\x0aNVRM: fallen off the bus and is not responding to commands.\x0a" + b"\n SUBSYSTEM=pci\n",
    b"3,3,4000000,-,caller=T12;NVRM: Xid (PCI:0000:2a:00): 13, pid='<unknown>', name=<unknown>, Graphics Exception\n",
]


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "kmsg"
    os.mkfifo(path)
    return path


def test_kmsg_fifo_records_continuations_and_escapes(fifo: Path, stop_later) -> None:
    got = Collected()
    source = stop_later(got.start(KmsgSource(str(fifo))))
    writer = os.open(fifo, os.O_WRONLY)
    try:
        for record in KMSG_RECORDS:
            os.write(writer, record)
        wait_until(lambda: got.position == 3)
        assert source.caught_up.is_set() and source.up
        assert got.lost == 0
        # Dictionary lines are not records; \x0a is a newline again, inside one record.
        assert len(got.texts) == 4
        assert got.texts[2].count("\n") == 3 and "\\x0a" not in got.texts[2]
        events = [e for text in got.texts for e in RecordAssembler().feed(text)]
        assert [(e.kind, e.code, e.pci_bus_id) for e in events] == [
            ("xid", 79, "00000000:18:00.0"),
            ("fallen_off_bus", None, "00000000:3B:00.0"),
            ("xid", 13, "00000000:2A:00.0"),
        ]
        # Wall time = boot time + the record's microseconds.
        assert got.times[1] - got.times[0] == pytest.approx(1.0)
        # Still following: a record written later arrives too.
        os.write(writer, b"4,4,5000000,-;NVRM: Xid (PCI:0000:18:00): 48, DBE\n")
        wait_until(lambda: got.position == 4)
    finally:
        os.close(writer)


def test_kmsg_resume_skips_records_already_counted(fifo: Path, stop_later) -> None:
    got = Collected()
    stop_later(got.start(KmsgSource(str(fifo)), position=1))
    writer = os.open(fifo, os.O_WRONLY)
    try:
        for record in KMSG_RECORDS:
            os.write(writer, record)
        wait_until(lambda: got.position == 3)
    finally:
        os.close(writer)
    assert len(got.texts) == 2 and got.lost == 0


class ScriptedRead:
    """The read seam: returns or raises the scripted results in turn, then reads the real descriptor."""

    def __init__(self, script: list[bytes | BaseException]) -> None:
        self.script = list(script)

    def __call__(self, fd: int, size: int) -> bytes:
        assert size >= 8192
        if self.script:
            step = self.script.pop(0)
            if isinstance(step, BaseException):
                raise step
            return step
        return os.read(fd, size)


def test_kmsg_epipe_is_counted_and_survived(fifo: Path, stop_later) -> None:
    writer = os.open(fifo, os.O_RDWR)  # keeps the FIFO open and empty: reads say EAGAIN, poll blocks
    try:
        got = Collected()
        read = ScriptedRead([
            KMSG_RECORDS[0],
            BrokenPipeError(errno.EPIPE, "records overwritten"),
            # The kernel resumes at the oldest record still there: seq 1 and 2 were lost.
            KMSG_RECORDS[3],
            OSError(errno.EPIPE, "again"),
            b"4,4,5000000,-;NVRM: Xid (PCI:0000:18:00): 48, DBE\n",  # no gap, but EPIPE: at least one lost
        ])
        source = stop_later(got.start(KmsgSource(str(fifo), read=read)))
        wait_until(lambda: got.position == 4)
        assert got.lost == 3
        assert source.up and source.caught_up.is_set()
        assert [t.split(":")[0] for t in got.texts] == ["nvidia-nvswitch2", "NVRM", "NVRM"]
    finally:
        os.close(writer)


def test_kmsg_partial_record_is_joined(fifo: Path, stop_later) -> None:
    writer = os.open(fifo, os.O_RDWR)
    try:
        got = Collected()
        record = KMSG_RECORDS[1]
        read = ScriptedRead([record[:40], record[40:70], record[70:]])
        stop_later(got.start(KmsgSource(str(fifo), read=read)))
        wait_until(lambda: got.position == 1)
        assert got.texts == [
            "NVRM: Xid (PCI:0000:18:00): 79, pid=1101234, name=nvc:[driver], GPU has fallen off the bus."
        ]
    finally:
        os.close(writer)


def test_kmsg_first_record_after_a_rolled_buffer_counts_the_gap(fifo: Path, stop_later) -> None:
    got = Collected()
    stop_later(got.start(KmsgSource(str(fifo)), position=10))
    writer = os.open(fifo, os.O_WRONLY)
    try:
        os.write(writer, b"6,9,1,-;old\n6,15,2,-;new\n")
        wait_until(lambda: got.position == 15)
    finally:
        os.close(writer)
    # Records 11..14 were overwritten while the exporter was down.
    assert got.texts == ["new"] and got.lost == 4


def test_kmsg_stop_interrupts_a_blocking_wait(fifo: Path) -> None:
    writer = os.open(fifo, os.O_RDWR)
    try:
        source = KmsgSource(str(fifo))
        source.start(Collected())
        assert source.caught_up.wait(DEADLINE)
        t0 = time.monotonic()
        source.stop()
        assert time.monotonic() - t0 < 1.0 and not source.up
    finally:
        os.close(writer)


# --- file ---------------------------------------------------------------------------------------------


# The kernel's first line of a boot, at monotonic time 0: where the file source begins (see test_xid_boots.py).
BOOT_LINE = "[    0.000000] Linux version 6.8.0-45-generic (buildd@lcy02-amd64-075) #45-Ubuntu SMP"


def append(path: Path, *lines: str) -> None:
    with open(path, "a") as f:
        f.write("".join(line + "\n" for line in lines))


def test_file_follows_appends_rotation_and_truncation(tmp_path: Path, stop_later) -> None:
    log = tmp_path / "kern.log"
    append(log, BOOT_LINE, "one", "two")
    got = Collected()
    source = stop_later(got.start(FileSource(log, poll_interval=0.005)))
    wait_until(lambda: got.texts == [BOOT_LINE, "one", "two"])
    assert source.caught_up.is_set() and source.up

    # A partial line waits for its newline.
    with open(log, "a") as f:
        f.write("thr")
        f.flush()
        time.sleep(0.03)
        assert got.texts == [BOOT_LINE, "one", "two"]
        f.write("ee\n")
    wait_until(lambda: got.texts[-1:] == ["three"])

    # Rotation: the writer still appends to the renamed file before the new one appears.
    os.rename(log, tmp_path / "kern.log.1")
    append(tmp_path / "kern.log.1", "four")
    append(log, "five")
    wait_until(lambda: got.texts[-1:] == ["five"])
    assert got.texts == [BOOT_LINE, "one", "two", "three", "four", "five"]
    assert got.position[:2] == (os.stat(log).st_ino, 5)

    # Truncation (copytruncate): read again from the start.
    with open(log, "w") as f:
        f.write("six\n")
    wait_until(lambda: got.texts[-1:] == ["six"])
    assert got.texts.count("five") == 1


def test_file_resume_from_offset_and_from_a_rotated_file(tmp_path: Path) -> None:
    log = tmp_path / "kern.log"
    append(log, BOOT_LINE, "a", "b")
    got = Collected()
    source = got.start(FileSource(log, poll_interval=0.005))
    wait_until(lambda: got.texts == [BOOT_LINE, "a", "b"])
    source.stop()
    saved = got.position

    append(log, "c")
    again = Collected()
    source = again.start(FileSource(log, poll_interval=0.005), position=saved)
    wait_until(lambda: again.texts == ["c"])
    source.stop()

    # Rotated while stopped: the rest of the old file (found by inode) first, then the new file.
    saved = again.position
    append(log, "d")
    os.rename(log, tmp_path / "kern.log.1")
    append(log, "e")
    third = Collected()
    source = third.start(FileSource(log, poll_interval=0.005), position=saved)
    wait_until(lambda: third.texts == ["d", "e"])
    source.stop()


def test_file_rewritten_in_place_while_stopped_is_read_from_its_start(tmp_path: Path) -> None:
    """Same inode, size past the old offset, other content (or a new file that got the old inode number)."""
    log = tmp_path / "kern.log"
    append(log, BOOT_LINE, "old one", "old two")
    got = Collected()
    source = got.start(FileSource(log, poll_interval=0.005))
    wait_until(lambda: got.texts == [BOOT_LINE, "old one", "old two"])
    source.stop()
    inode = os.stat(log).st_ino
    with open(log, "r+") as f:
        f.write(BOOT_LINE + "\nnew one\nnew two\nnew three\n")
    assert os.stat(log).st_ino == inode
    again = Collected()
    source = again.start(FileSource(log, poll_interval=0.005), position=got.position)
    wait_until(lambda: again.texts == [BOOT_LINE, "new one", "new two", "new three"])
    source.stop()


def test_file_strips_kmsg_headers_and_dictionary_lines(tmp_path: Path, stop_later) -> None:
    log = tmp_path / "kmsg.dump"
    log.write_bytes(b"".join(KMSG_RECORDS))
    got = Collected()
    stop_later(got.start(FileSource(log, poll_interval=0.005)))
    wait_until(lambda: len(got.texts) == 4)
    assert got.texts[1].startswith("NVRM: Xid (PCI:0000:18:00): 79")
    assert "\n" in got.texts[2]


def test_file_that_appears_later(tmp_path: Path, stop_later) -> None:
    log = tmp_path / "late.log"
    got = Collected()
    source = stop_later(got.start(FileSource(log, poll_interval=0.005)))
    assert source.caught_up.wait(DEADLINE) and not source.up
    append(log, "hello")
    wait_until(lambda: got.texts == ["hello"])
    assert source.up


# --- journald -----------------------------------------------------------------------------------------

FAKE_JOURNALCTL = r'''#!{python}
"""A fake journalctl: prints the entries of entries.jsonl next to it, honours --after-cursor and -f."""
import json, os, sys, time
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "argv.log"), "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
args = sys.argv[1:]
after = args[args.index("--after-cursor") + 1] if "--after-cursor" in args else None
follow = "-f" in args
path = os.path.join(here, "entries.jsonl")
done = 0
skipping = after is not None
while True:
    with open(path) as f:
        lines = f.read().splitlines()
    for line in lines[done:]:
        done += 1
        if skipping:
            skipping = json.loads(line).get("__CURSOR") != after
            continue
        sys.stdout.write(line + "\n")
    sys.stdout.flush()
    if not follow:
        break
    time.sleep(0.01)
'''


def entry(n: int, message: Any) -> str:
    return json.dumps({"__CURSOR": f"s=abc;i={n}", "__REALTIME_TIMESTAMP": str(1_700_000_000_000_000 + n),
                       "_TRANSPORT": "kernel", "MESSAGE": message})


@pytest.fixture
def journalctl(tmp_path: Path) -> Path:
    script = tmp_path / "journalctl"
    script.write_text(FAKE_JOURNALCTL.replace("{python}", sys.executable))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    (tmp_path / "entries.jsonl").write_text("")
    return script


def add_entries(journalctl: Path, *lines: str) -> None:
    with open(journalctl.parent / "entries.jsonl", "a") as f:
        f.write("".join(line + "\n" for line in lines))


def test_journal_json_catch_up_then_follow(journalctl: Path, stop_later) -> None:
    xid = "NVRM: Xid (PCI:0000:18:00): 79, pid=1, name=x, GPU has fallen off the bus."
    add_entries(
        journalctl,
        entry(1, "usb 1-1: new device"),
        entry(2, list(xid.encode())),  # journald stores non-UTF-8-safe messages as a list of byte values
        entry(3, None),  # too large a field: null
        "not json",
    )
    got = Collected()
    source = stop_later(got.start(JournalSource(str(journalctl), restart_delay=0.05)))
    assert source.caught_up.wait(DEADLINE)
    assert got.texts == ["usb 1-1: new device", xid]
    assert got.position == "s=abc;i=3"
    assert got.times[1] == pytest.approx(1_700_000_000.000002)

    add_entries(journalctl, entry(4, "NVRM: Xid (PCI:0000:2a:00): 13, Graphics Exception"))
    wait_until(lambda: got.position == "s=abc;i=4")
    assert got.texts[-1].endswith("Graphics Exception")
    source.stop()
    assert not source.up
    calls = [json.loads(line) for line in (journalctl.parent / "argv.log").read_text().splitlines()]
    assert calls[0][:4] == ["-k", "-b", "-o", "json"] and "-f" not in calls[0]
    assert "-f" in calls[1] and calls[1][-2:] == ["--after-cursor", "s=abc;i=3"]


def test_journal_resumes_after_cursor_and_restarts_a_dead_follower(journalctl: Path, stop_later) -> None:
    add_entries(journalctl, entry(1, "a"), entry(2, "b"))
    got = Collected()
    source = stop_later(got.start(JournalSource(str(journalctl), restart_delay=0.05), position="s=abc;i=1"))
    wait_until(lambda: got.texts == ["b"])
    # journalctl -f dying (journald restarted) is survived: it is restarted from the last cursor.
    proc = source._proc
    assert proc is not None
    proc.kill()
    add_entries(journalctl, entry(3, "c"))
    wait_until(lambda: got.texts == ["b", "c"])


def test_journal_item_shapes() -> None:
    assert journal_item(b'{"MESSAGE": [72, 105], "__CURSOR": "c"}') == (("Hi", None), "c")
    assert journal_item(b'{"MESSAGE": "x", "__REALTIME_TIMESTAMP": "1500000"}') == (("x", 1.5), None)
    assert journal_item(b"[1]") == (None, None)


def test_missing_journalctl_does_not_hold_up_startup(tmp_path: Path, stop_later) -> None:
    source = stop_later(Collected().start(JournalSource(str(tmp_path / "nope"), restart_delay=0.05)))
    assert source.caught_up.wait(DEADLINE) and not source.up


# --- choosing -------------------------------------------------------------------------------------------


def test_specs() -> None:
    for ok in ("auto", "kmsg", "journal", "none", "file:/var/log/syslog", "kmsg:/tmp/fifo"):
        assert validate_spec(ok) == ok
    for bad in ("", "file:", "syslog", "journal:/x", "kmsg:"):
        with pytest.raises(ValueError):
            validate_spec(bad)
    assert isinstance(make_source("none"), NullSource)
    assert make_source("file:/x").identity == "file:/x"
    assert make_source("kmsg").identity == "kmsg"
    assert make_source("journal", journalctl="/bin/false").kind == "journal"
    assert make_source("auto").kind in ("kmsg", "journal", "none")
