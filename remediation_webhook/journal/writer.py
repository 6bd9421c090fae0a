"""The journal's writer: SQLite in WAL mode with synchronous=FULL, written by one thread with group commit.

Every write goes through `Journal.run(fn, ...)`: the writer thread takes all queued work, runs each item in
its own SAVEPOINT inside one transaction, commits once (one fsync for the whole group) and only then
resolves the callers' futures. So a webhook is answered 200 only after its alerts are on disk, and many
concurrent deliveries share one fsync.
"""

from __future__ import annotations

import asyncio
import functools
import os
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, NamedTuple, TypeVar

from ..errors import JournalError
from .schema import create_or_migrate

T = TypeVar("T")


class _Item(NamedTuple):
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    fut: Future[Any]
    bare: bool = False


_STOP = _Item(lambda conn: None, (), Future())  # close(): the writer ends after the work queued before it
_SQLITE_HEADER = b"SQLite format 3\x00"


def refuse_foreign_file(path: str) -> None:
    """An existing file that is not a journal (empty, truncated, something else) is never taken for a new one:
    that would silently drop the history, cooldowns and duplicate records it should hold."""
    if path == ":memory:" or not os.path.exists(path):
        return
    with open(path, "rb") as fh:
        head = fh.read(len(_SQLITE_HEADER))
    if head == _SQLITE_HEADER:
        return
    what = "is empty (0 bytes)" if not head else "is not an SQLite database"
    raise JournalError(f"the file {what}: not a journal. To start with a new, empty journal (losing the remediation "
                       f"history, cooldowns and duplicate records), move it away: mv {path} {path}.broken")


class Journal:
    """Owns the SQLite connection; all access runs on its writer thread."""

    def __init__(self, path: str, *, max_batch: int = 512) -> None:
        self.path = path
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._max_batch = max_batch
        self._ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._main, name="journal-writer", daemon=True)
        self._closed = False
        self.commits = 0
        self.errors = 0  # transactions or items that failed in SQLite (gpu_remediation_journal_errors_total)
        self._thread.start()
        try:
            self._ready.result(timeout=30)
        except Exception as exc:
            raise JournalError(f"journal {path}: {exc}") from exc

    # The connection lives only on the writer thread.
    def _main(self) -> None:
        try:
            refuse_foreign_file(self.path)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise JournalError(f"journal {self.path}: cannot switch to WAL mode (got {mode})")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.row_factory = sqlite3.Row
            create_or_migrate(conn)
        except Exception as exc:  # noqa: BLE001 - reported to the constructor
            self._ready.set_exception(exc)
            return
        self._ready.set_result(None)
        try:
            self._serve(conn)
        finally:
            conn.close()

    def _serve(self, conn: sqlite3.Connection) -> None:
        carried: _Item | None = None
        while True:
            item = carried if carried is not None else self._queue.get()
            carried = None
            if item is _STOP:
                return
            if item.bare:
                self._run_bare(conn, item)
                continue
            batch = [item]
            while len(batch) < self._max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP or nxt.bare:  # handled after this group, in queue order
                    carried = nxt
                    break
                batch.append(nxt)
            self._run_batch(conn, batch)

    def _run_bare(self, conn: sqlite3.Connection, item: _Item) -> None:
        """Maintenance that SQLite refuses inside a transaction (a WAL checkpoint), alone, in autocommit."""
        if not item.fut.set_running_or_notify_cancel():
            return
        try:
            item.fut.set_result(item.fn(conn, *item.args))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            self.errors += isinstance(exc, sqlite3.Error)
            item.fut.set_exception(JournalError(f"journal: {exc}") if isinstance(exc, sqlite3.Error) else exc)

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Item]) -> None:
        results: list[tuple[Future[Any], Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self.errors += 1
            for _, _, fut, _ in batch:
                fut.set_exception(JournalError(f"journal: {exc}"))
            return
        for fn, args, fut, _ in batch:
            if not fut.set_running_or_notify_cancel():
                continue
            conn.execute("SAVEPOINT item")
            try:
                value = fn(conn, *args)
                conn.execute("RELEASE item")
                results.append((fut, value, None))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                self.errors += isinstance(exc, sqlite3.Error)
                try:
                    conn.execute("ROLLBACK TO item")
                    conn.execute("RELEASE item")
                except sqlite3.Error:
                    pass
                results.append((fut, None, exc if not isinstance(exc, sqlite3.Error) else JournalError(f"journal: {exc}")))
        try:
            conn.execute("COMMIT")
            self.commits += 1
        except sqlite3.Error as exc:
            self.errors += 1
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            for fut, _, _ in results:
                fut.set_exception(JournalError(f"journal commit failed: {exc}"))
            return
        for fut, value, error in results:
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(value)

    def submit(self, fn: Callable[..., T], *args: Any, bare: bool = False, **kwargs: Any) -> Future[T]:
        fut: Future[T] = Future()
        if self._closed:
            fut.set_exception(JournalError("journal is closed"))
            return fut
        self._queue.put(_Item(functools.partial(fn, **kwargs) if kwargs else fn, args, fut, bare))
        return fut

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run fn(conn, *args, **kwargs) in the next group transaction; returns after the commit."""
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    async def run_bare(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(conn, *args) alone, outside any transaction (checkpoints, incremental vacuum)."""
        return await asyncio.wrap_future(self.submit(fn, *args, bare=True))

    def run_sync(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join(timeout=30)
