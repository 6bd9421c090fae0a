"""The journal's retention pass, every `journal.prune_interval`: old rows go in small transactions (each waits its
turn with deliveries, none holds the writer long), then the freed pages go back to the file system and the WAL is
truncated. What a decision still reads stays (journal/retention.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from typing import TYPE_CHECKING

from gpu_health_common.logs import OnChange

from ..errors import JournalError
from ..journal import prune_batch, reclaim
from ..policy import MAX_HISTORY_WINDOW

if TYPE_CHECKING:
    from .core import Engine

log = logging.getLogger("remediation_webhook.engine")


async def prune(engine: Engine) -> int:
    """One pass; returns the rows deleted."""
    now = engine.clock()
    age = engine.config.retention.age
    # Escalation evidence may count up to MAX_HISTORY_WINDOW back, whatever the retention.
    cutoff, history_cutoff = now - age, now - max(age, MAX_HISTORY_WINDOW)
    total = 0
    while True:
        pruned = await engine.journal.run(prune_batch, cutoff, history_cutoff)
        total += pruned.rows
        if pruned.done:
            break
    if total:
        free, left = None, await engine.journal.run_bare(reclaim)
        while left and (free is None or left < free):  # a few MiB per step; stops if nothing more comes back
            free, left = left, await engine.journal.run_bare(reclaim)
    await engine.journal.run_bare(_checkpoint)
    engine.metrics.journal_pruned.inc(total)
    engine.metrics.journal_last_prune.set(engine.clock())
    return total


def _checkpoint(conn: sqlite3.Connection) -> None:
    # TRUNCATE: the WAL file goes back to zero bytes instead of staying at its largest size.
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


def size(path: str) -> int:
    """The journal's bytes on disk: the database and its WAL."""
    total = 0
    for name in (path, f"{path}-wal"):
        try:
            total += os.stat(name).st_size
        except OSError:
            pass
    return total


async def run_forever(engine: Engine) -> None:
    state = OnChange(log, "journal retention failed; retried next interval", "journal retention runs again")
    while True:
        try:
            rows = await prune(engine)
            if rows:
                log.info("journal pruned", extra={"rows": rows, "bytes": size(engine.journal.path)})
            state.ok()
        except asyncio.CancelledError:
            raise
        except JournalError as exc:
            state.failed(exc)
        except Exception:  # a bug must not end retention for good: GPURemediationJournalNotPruned would say so
            log.exception("journal retention pass failed; retried next interval")
        await asyncio.sleep(engine.config.retention.interval)
