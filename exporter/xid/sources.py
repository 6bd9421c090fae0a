"""Where kernel-log records come from: /dev/kmsg, journald, a plain log file, or nowhere.

Each source runs one blocking reader thread, off the scrape path, and hands batches to a sink:
``sink(items, position)`` where ``items`` is a list of ``(text, wall_seconds | None)`` records and ``position``
is where reading resumes after them (kmsg: sequence number; journal: cursor; file: ``(inode, offset)``).
``caught_up`` is set once everything present at start has been read (kmsg: EAGAIN; file: end of file; journal:
the non-following ``journalctl`` exited), so the exporter can serve its first scrape with complete counts.

Only file descriptors and processes this module owns are used (no file objects), so an unclosed source never
trips a ResourceWarning.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import select
import shutil
import subprocess
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from exporter.xid.boots import BootIdentity, BootTracker, is_current_boot
from exporter.xid.parse import unescape_kmsg

log = logging.getLogger(__name__)

Item = tuple[str, float | None]
Sink = Callable[[list[Item], Any], None]

KMSG_PATH = "/dev/kmsg"
# Records are at most ~8 KiB; a read with a smaller buffer fails with EINVAL.
KMSG_READ_SIZE = 8192
# A record split across reads (FIFOs, the test seam) is kept until its newline, but never more than this.
MAX_PARTIAL = 64 * 1024
BATCH = 512

# 4,1234,206764307,-;NVRM: Xid ...   (a /dev/kmsg record saved to a file)
_KMSG_LINE_RE = re.compile(r"\d+,\d+,\d+,[^;,]*(?:,[^;]*)?;")
# " SUBSYSTEM=pci" / " DEVICE=+pci:0000:3b:00.0"   (kmsg dictionary lines)
_KMSG_CONT_RE = re.compile(r" [A-Z][A-Z0-9_]*=")


class Source:
    """Base: a reader thread that survives errors, restarting from the last position it handed over."""

    kind = "none"
    retry_delay = 1.0

    def __init__(self) -> None:
        self.caught_up = threading.Event()
        self.up = False
        # Whether what is read begins at this boot's start: kmsg and journald hold only this boot by construction;
        # a log file says so once its boot boundaries are read (see FileSource); None for no source.
        self.boot_found: bool | None = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._position: Any = None
        self.on_lost: Callable[[int], None] = lambda n: None

    @property
    def identity(self) -> str:
        """What a saved position belongs to; a position is only reused for the same identity."""
        return self.kind

    def start(self, sink: Sink, position: Any = None) -> None:
        self._position = position

        def tracked(items: list[Item], pos: Any) -> None:
            self._position = pos
            sink(items, pos)

        self._thread = threading.Thread(target=self._guarded, args=(tracked,), name=f"xid-{self.kind}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)

    def _wake(self) -> None:
        """Interrupt a blocking wait in the reader thread."""

    def _guarded(self, sink: Sink) -> None:
        while not self._stop.is_set():
            try:
                self._run(sink, self._position)
            except Exception as exc:  # the reader must outlive any one bad record or vanished file
                log.warning("XID source failed; retrying", extra={"source": self.kind, "error": repr(exc)})
            self.up = False
            # A broken source must not hold up the first scrape.
            self.caught_up.set()
            self._stop.wait(self.retry_delay)

    def _run(self, sink: Sink, position: Any) -> None:
        raise NotImplementedError


class NullSource(Source):
    """``--xid.source none``: no log; counts saved earlier in this boot are still served."""

    def __init__(self) -> None:
        super().__init__()
        self.boot_found = None

    def start(self, sink: Sink, position: Any = None) -> None:
        self.caught_up.set()


# --- /dev/kmsg ---------------------------------------------------------------------------------


class KmsgSource(Source):
    """/dev/kmsg, one record per ``read()``; also reads a FIFO or pty carrying records in the same format.

    ``read`` is the seam tests use to inject EPIPE and partial records; it has ``os.read``'s signature. A record is
    ``prio,seq,usec,flags[,...];message`` with ``\\xNN`` escapes, followed by dictionary lines starting with a space,
    which are ignored. EPIPE means the kernel overwrote records before we read them: the gap in sequence numbers
    (at least one) is reported through ``on_lost`` and reading continues.
    """

    kind = "kmsg"

    def __init__(
        self,
        path: str = KMSG_PATH,
        *,
        read: Callable[[int, int], bytes] = os.read,
        idle_poll: float = 0.05,
    ) -> None:
        super().__init__()
        self.path = path
        self._read = read
        self._idle_poll = idle_poll
        self._wake_r = self._wake_w = -1
        # printk's clock is CLOCK_MONOTONIC without suspend: good enough to place a record in wall time.
        self._boot_wall = time.time() - time.monotonic()

    @property
    def identity(self) -> str:
        return "kmsg" if self.path == KMSG_PATH else f"kmsg:{self.path}"

    def start(self, sink: Sink, position: Any = None) -> None:
        # Written to by stop(), so that a reader waiting in poll() wakes at once.
        self._wake_r, self._wake_w = os.pipe()
        super().start(sink, position)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def stop(self, timeout: float = 2.0) -> None:
        super().stop(timeout)
        if self._thread is None or not self._thread.is_alive():
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    os.close(fd)
            self._wake_r = self._wake_w = -1

    def _run(self, sink: Sink, position: Any) -> None:
        resume = position if isinstance(position, int) else None
        # The kernel numbers records from 0 at boot: a first record above `expected` means some were lost.
        expected = 0 if resume is None else resume + 1
        overrun = False
        partial = b""
        items: list[Item] = []
        last_seq = resume
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self.up = True
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while not self._stop.is_set():
                try:
                    data = self._read(fd, KMSG_READ_SIZE)
                except BlockingIOError:
                    data = None
                except BrokenPipeError:
                    overrun = True
                    continue
                except OSError as exc:
                    if exc.errno == errno.EPIPE:
                        overrun = True
                        continue
                    if exc.errno != errno.EAGAIN:
                        raise
                    data = None
                if data:
                    partial += data
                    if b"\n" not in data:
                        if len(partial) > MAX_PARTIAL:
                            log.warning("dropping an oversized kmsg record", extra={"bytes": len(partial)})
                            partial = b""
                        continue
                    lines = partial.split(b"\n")
                    partial = lines.pop()
                    for line in lines:
                        if not line or line[:1] == b" ":
                            continue  # dictionary (KEY=value) line of the record before
                        head, sep, msg = line.partition(b";")
                        fields = head.split(b",")
                        if not sep or len(fields) < 3:
                            continue
                        try:
                            seq, usec = int(fields[1]), int(fields[2])
                        except ValueError:
                            continue
                        if resume is not None and seq <= resume:
                            continue
                        if seq > expected or overrun:
                            lost = max(seq - expected, 1 if overrun else 0)
                            if lost:
                                self.on_lost(lost)
                        overrun = False
                        expected = seq + 1
                        last_seq = seq
                        text = unescape_kmsg(msg.decode("utf-8", "backslashreplace"))
                        items.append((text, self._boot_wall + usec / 1e6))
                    if len(items) < BATCH:
                        continue
                if items:
                    sink(items, last_seq)
                    items = []
                if data is None:
                    # EAGAIN: everything in the ring buffer has been read.
                    self.caught_up.set()
                    if not self._stop.is_set():
                        poller.poll()
                elif not data:
                    # End of file: a FIFO without a writer, or a saved dump. Nothing to wait on, so poll slowly.
                    self.caught_up.set()
                    self._stop.wait(self._idle_poll)
        finally:
            self.up = False
            os.close(fd)


# --- plain log file ------------------------------------------------------------------------------


def file_lines(data: bytes) -> list[str]:
    """Split complete lines of a log file into texts, stripping /dev/kmsg headers and dropping dictionary lines."""
    out = []
    for raw in data.split(b"\n"):
        line = raw.decode("utf-8", "replace")
        if line[:1] == " " and _KMSG_CONT_RE.match(line):
            continue
        if line[:1].isdigit() and (m := _KMSG_LINE_RE.match(line)):
            line = unescape_kmsg(line[m.end() :])
        out.append(line)
    return out


class FileSource(Source):
    """A log file followed across rotation (new inode: finish the old file, then read the new one from the start)
    and truncation (size below the offset: read again from the start), polled every ``poll_interval`` seconds.

    Per boot: a syslog file holds earlier boots too. Started without a saved position, the source reads the file's
    boot boundaries (exporter.xid.boots) and begins at this boot's first line; when the file holds no start of this
    boot (rotated away, or the log cannot tell) it begins at the file's end, sets ``boot_found`` False and logs
    it, rather than count another boot's Xids as this one's. ``boot`` describes the running boot (a test seam).

    The position is ``(inode, offset, head, boot_found)``, ``head`` being a CRC of the file's first bytes (up to
    256, all already read), so that a new file that got the old one's inode number, or a file rewritten in place
    while the exporter was down, is read from its start rather than from the old offset. On resume with another
    inode, the rest of the rotated file (found by inode next to it: ``syslog.1`` and the like) is read first.
    """

    kind = "file"
    HEAD = 256

    def __init__(
        self,
        path: str | Path,
        *,
        poll_interval: float = 0.025,
        chunk: int = 64 * 1024,
        boot: BootIdentity | None = None,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        self.poll_interval = poll_interval
        self.chunk = chunk
        self.boot = boot if boot is not None else BootIdentity.here(None)
        self.boot_found = None

    @property
    def identity(self) -> str:
        return f"file:{self.path}"

    def _open(self, path: Path) -> tuple[int, os.stat_result] | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        return fd, os.fstat(fd)

    def _head(self, fd: int, offset: int) -> int:
        return zlib.crc32(os.pread(fd, min(offset, self.HEAD), 0))

    def _resumable(self, fd: int, size: int, saved_offset: int, saved_head: int | None) -> bool:
        return size >= saved_offset and (saved_head is None or self._head(fd, saved_offset) == saved_head)

    def _find_rotated(self, inode: int) -> Path | None:
        try:
            names = os.listdir(self.path.parent)
        except OSError:
            return None
        for name in names:
            if name == self.path.name or not name.startswith(self.path.name):
                continue
            if name.endswith((".gz", ".xz", ".bz2", ".zst", ".tmp")):
                continue
            candidate = self.path.parent / name
            try:
                if os.stat(candidate).st_ino == inode:
                    return candidate
            except OSError:
                continue
        return None

    def _drain(self, fd: int, inode: int, offset: int, sink: Sink, *, final: bool) -> int:
        """Read ``fd`` from ``offset`` to its end, hand over complete lines, return the new offset."""
        partial = b""
        head: int | None = None
        while not self._stop.is_set():
            data = os.pread(fd, self.chunk, offset + len(partial))
            if not data:
                break
            partial += data
            cut = partial.rfind(b"\n")
            if cut < 0:
                if len(partial) > MAX_PARTIAL:
                    offset, partial = offset + len(partial), b""
                continue
            complete, partial = partial[:cut], partial[cut + 1 :]
            offset += cut + 1
            if head is None or offset < self.HEAD:
                head = self._head(fd, offset)
            sink([(text, None) for text in file_lines(complete)], (inode, offset, head, int(bool(self.boot_found))))
        if final and partial:
            # A rotated file gets no more lines: its unterminated last line is complete.
            offset += len(partial)
            position = (inode, offset, self._head(fd, offset), int(bool(self.boot_found)))
            sink([(text, None) for text in file_lines(partial)], position)
        return offset

    def _boot_start(self, fd: int, size: int) -> int:
        """The offset of this boot's first line in the file, or ``size`` (its end) when it holds none."""
        tracker = BootTracker()
        offset = 0
        partial = b""
        while offset + len(partial) < size and not self._stop.is_set():
            data = os.pread(fd, min(self.chunk, size - offset - len(partial)), offset + len(partial))
            if not data:
                break
            partial += data
            lines = partial.split(b"\n")
            partial = lines.pop()
            for raw in lines:
                tracker.feed(raw.decode("utf-8", "replace"), offset)
                offset += len(raw) + 1
        last = tracker.boots[-1]
        where = {"path": str(self.path), "boots_in_file": len(tracker.boots)}
        if is_current_boot(last, self.boot):
            self.boot_found = True
            log.info("XID log file: this boot starts here", extra={**where, "offset": last.offset,
                                                                    "line": last.line + 1, "sign": last.reason})
            return last.offset
        self.boot_found = False
        log.warning(
            "XID log file holds no start of this boot; reading only lines written from now on "
            "(gpu_xid_source_boot_found 0)",
            extra={**where, "offset": size},
        )
        return size

    def _resume(self, fd: int, st: os.stat_result, position: Any, sink: Sink) -> int:
        """The offset to continue ``fd`` at, after reading the rest of a rotated file if there is one."""
        if not (isinstance(position, tuple) and len(position) in (2, 3, 4)):
            return self._boot_start(fd, st.st_size)
        saved_ino, saved_offset = int(position[0]), int(position[1])
        saved_head = position[2] if len(position) >= 3 else None
        # A position saved this boot was inside this boot's lines, unless the file held no start of it then.
        self.boot_found = bool(position[3]) if len(position) == 4 else True
        if saved_ino == st.st_ino:
            if self._resumable(fd, st.st_size, saved_offset, saved_head):
                return saved_offset
            log.info("XID log file was replaced or truncated; reading from its start", extra={"path": str(self.path)})
            return 0
        rotated = self._find_rotated(saved_ino)
        old = self._open(rotated) if rotated is not None else None
        if old is not None:
            try:
                if self._resumable(old[0], old[1].st_size, saved_offset, saved_head):
                    self._drain(old[0], saved_ino, saved_offset, sink, final=True)
            finally:
                os.close(old[0])
        return 0

    def _run(self, sink: Sink, position: Any) -> None:
        fd = ino = None
        offset = 0
        opened = self._open(self.path)
        if opened is not None:
            fd, st = opened
            ino = st.st_ino
            offset = self._resume(fd, st, position, sink)
        self.up = fd is not None
        try:
            while not self._stop.is_set():
                if fd is not None:
                    offset = self._drain(fd, ino, offset, sink, final=False)  # type: ignore[arg-type]
                self.caught_up.set()
                if self._stop.wait(self.poll_interval):
                    break
                if fd is not None and os.fstat(fd).st_size < offset:
                    log.info("XID log file truncated; reading from its start", extra={"path": str(self.path)})
                    offset = 0
                try:
                    current = os.stat(self.path)
                except FileNotFoundError:
                    current = None
                if current is not None and (fd is None or current.st_ino != ino):
                    if fd is not None:
                        # Rotated: lines written before the rename are still in the old file.
                        self._drain(fd, ino, offset, sink, final=True)  # type: ignore[arg-type]
                        os.close(fd)
                        fd = None
                        log.info("XID log file rotated; following the new one", extra={"path": str(self.path)})
                    opened = self._open(self.path)
                    if opened is not None:
                        fd, st = opened
                        ino, offset = st.st_ino, 0
                        self.up = True
                        if self.boot_found is None:
                            # Created after the exporter started: every line in it is this boot's.
                            self.boot_found = True
        finally:
            self.up = False
            if fd is not None:
                os.close(fd)


# --- journald ------------------------------------------------------------------------------------


def journal_item(line: bytes) -> tuple[Item | None, str | None]:
    """One ``journalctl -o json`` line -> ((MESSAGE, wall time), __CURSOR); MESSAGE may be a list of byte values."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None, None
    if not isinstance(entry, dict):
        return None, None
    cursor = entry.get("__CURSOR")
    message = entry.get("MESSAGE")
    if isinstance(message, list):
        try:
            message = bytes(message).decode("utf-8", "replace")
        except (TypeError, ValueError):
            message = None
    if not isinstance(message, str):
        return None, cursor if isinstance(cursor, str) else None
    ts: float | None
    try:
        ts = int(entry["__REALTIME_TIMESTAMP"]) / 1e6
    except (KeyError, TypeError, ValueError):
        ts = None
    return (message, ts), cursor if isinstance(cursor, str) else None


class JournalSource(Source):
    """Kernel messages of this boot from ``journalctl -k -b -o json``, run with an argument list (no shell).

    Catch-up runs it without ``-f`` until it exits; then ``-f`` follows from the last cursor, and is restarted from
    the last cursor whenever it exits. ``journalctl`` is injectable (a fake script in tests).
    """

    kind = "journal"

    def __init__(self, journalctl: str = "journalctl", *, restart_delay: float = 1.0) -> None:
        super().__init__()
        self.journalctl = journalctl
        self.retry_delay = restart_delay
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def argv(self, *, follow: bool, cursor: str | None) -> list[str]:
        argv = [self.journalctl, "-k", "-b", "-o", "json", "--all", "--no-pager"]
        if follow:
            argv += ["-f", "--no-tail"]
        if cursor:
            argv += ["--after-cursor", cursor]
        return argv

    def _wake(self) -> None:
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()

    def _run(self, sink: Sink, position: Any) -> None:
        cursor = position if isinstance(position, str) else None
        if not self.caught_up.is_set():
            cursor, rc, err = self._read(self.argv(follow=False, cursor=cursor), cursor, sink)
            if rc != 0 and not self._stop.is_set():
                log.warning("journalctl failed", extra={"status": rc, "stderr": err})
            self.caught_up.set()
        while not self._stop.is_set():
            cursor, rc, err = self._read(self.argv(follow=True, cursor=cursor), cursor, sink)
            if self._stop.is_set():
                break
            log.warning("journalctl exited; restarting", extra={"status": rc, "stderr": err})
            self._stop.wait(self.retry_delay)

    def _read(self, argv: list[str], cursor: str | None, sink: Sink) -> tuple[str | None, int, str]:
        with tempfile.TemporaryFile() as errors:
            with self._lock:
                if self._stop.is_set():
                    return cursor, 0, ""
                proc = self._proc = subprocess.Popen(  # noqa: S603 - fixed argument list, no shell
                    argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors, close_fds=True
                )
            assert proc.stdout is not None
            fd = proc.stdout.fileno()
            self.up = True
            partial = b""
            try:
                while True:
                    data = os.read(fd, 64 * 1024)
                    if not data:
                        break
                    partial += data
                    if b"\n" not in data:
                        if len(partial) > 16 * MAX_PARTIAL:
                            partial = b""
                        continue
                    lines = partial.split(b"\n")
                    partial = lines.pop()
                    items: list[Item] = []
                    for line in lines:
                        item, line_cursor = journal_item(line)
                        if item is not None:
                            items.append(item)
                        if line_cursor is not None:
                            cursor = line_cursor
                    sink(items, cursor)
            finally:
                self.up = False
                proc.stdout.close()
                if proc.poll() is None:
                    proc.terminate()
                try:
                    rc = proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    rc = proc.wait()
                with self._lock:
                    self._proc = None
            errors.seek(0, os.SEEK_END)
            errors.seek(max(0, errors.tell() - 500))
            err = errors.read().decode("utf-8", "replace").strip()
        return cursor, rc, err


# --- choosing ------------------------------------------------------------------------------------


def kmsg_readable(path: str = KMSG_PATH) -> bool:
    """True if ``path`` opens for reading (dmesg_restrict and container setups refuse it at open)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def validate_spec(spec: str) -> str:
    """``auto``, ``kmsg``, ``journal``, ``none``, ``file:PATH`` or ``kmsg:PATH``; raise ValueError otherwise."""
    kind, sep, arg = spec.partition(":")
    if (not sep and kind in ("auto", "kmsg", "journal", "none")) or (sep and kind in ("file", "kmsg") and arg):
        return spec
    raise ValueError(f"expected auto, kmsg, journal, file:PATH or none, got {spec!r}")


def make_source(spec: str, *, journalctl: str = "journalctl", boot_id: str | None = None) -> Source:
    """The source ``--xid.source`` names; ``auto`` is kmsg if readable, else journald if journalctl exists.

    ``boot_id`` is this boot's id, which a log file's journal boot ids are matched against.
    """
    kind, _, arg = validate_spec(spec).partition(":")
    if kind == "auto":
        if kmsg_readable():
            return KmsgSource()
        if shutil.which(journalctl):
            return JournalSource(journalctl)
        return NullSource()
    if kind == "kmsg":
        return KmsgSource(arg or KMSG_PATH)
    if kind == "journal":
        return JournalSource(journalctl)
    if kind == "file":
        return FileSource(arg, boot=BootIdentity.here(boot_id))
    return NullSource()
