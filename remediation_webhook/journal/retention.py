"""Journal retention: rows older than `journal.retention` (90 days by default) go, in small batches, and the space
is given back to the file system; what the webhook's decisions still need stays.

Kept whatever their age: unfinished remediations, the remediations whose cordon we still hold (marks), the
occurrences of unfinished ones, the remediations a kept occurrence names (an alert still re-sent: its `last_seen`
is recent), and the newest successful action per node, GPU and kind (the already-remediated check compares a fault, however old,
with the newest fix). Folded before deletion: the finished actions, into per-series totals (so the restored
counters keep their lifetime totals and the last success and failure times stay known).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from .rows import OVERFLOW_NODE
from .schema import ACTIVE_SQL

# Rows deleted per transaction: the writer thread is never held long (one batch is a few milliseconds).
BATCH = 2000


@dataclass(frozen=True)
class Pruned:
    rows: int
    done: bool  # nothing older than the cut-off is left


def prune_batch(conn: sqlite3.Connection, cutoff: float, history_cutoff: float) -> Pruned:
    """Delete up to BATCH old rows of each table (one journal transaction)."""
    n = 0
    # Finished actions: folded into the totals first.
    old = conn.execute("SELECT id, node, gpu, uuid, action, result, ts FROM action_result WHERE ts<? ORDER BY id "
                       "LIMIT ?", (cutoff, BATCH)).fetchall()
    known = {r[0] for r in conn.execute("SELECT node FROM known_node")} if old else set()
    for _, node, gpu, uuid, action, result, ts in old:
        if node not in known:  # a name never resolved: its total joins the overflow series for good
            node, gpu, uuid = OVERFLOW_NODE, "", ""
        conn.execute("INSERT INTO action_total(node, gpu, uuid, action, result, count, last_ts) VALUES "
                     "(?,?,?,?,?,1,?) ON CONFLICT(node, gpu, uuid, action, result) DO UPDATE SET "
                     "count=count+1, last_ts=MAX(last_ts, excluded.last_ts)", (node, gpu, uuid, action, result, ts))
    if old:
        conn.execute(f"DELETE FROM action_result WHERE id IN ({','.join('?' * len(old))})", [r[0] for r in old])
        n += len(old)
    # Occurrences last seen long ago (an alert still re-sent is seen at every delivery), not of an unfinished
    # remediation.
    n += conn.execute(
        f"DELETE FROM occurrence WHERE rowid IN (SELECT o.rowid FROM occurrence o WHERE o.last_seen<? AND NOT EXISTS "
        f"(SELECT 1 FROM remediation r WHERE r.id=o.remediation_id AND r.state IN ({ACTIVE_SQL})) LIMIT ?)",
        (cutoff, BATCH)).rowcount
    # Remediations finished long ago, unless we still hold their node or an occurrence kept names them.
    gone = [r[0] for r in conn.execute(
        f"SELECT id FROM remediation r WHERE state NOT IN ({ACTIVE_SQL}) AND COALESCE(finished_at, updated_at)<? AND "
        f"id NOT IN (SELECT remediation_id FROM node_mark) AND NOT EXISTS (SELECT 1 FROM occurrence o WHERE "
        f"o.remediation_id=r.id) LIMIT ?", (cutoff, BATCH))]
    if gone:
        marks = ",".join("?" * len(gone))
        conn.execute(f"DELETE FROM step WHERE remediation_id IN ({marks})", gone)
        conn.execute(f"DELETE FROM remediation WHERE id IN ({marks})", gone)
        n += len(gone)
    n += conn.execute("DELETE FROM audit WHERE id IN (SELECT id FROM audit WHERE ts<? ORDER BY id LIMIT ?)",
                      (cutoff, BATCH)).rowcount
    # History: what escalation windows may still count, and the newest fix of every series.
    n += conn.execute(
        "DELETE FROM history WHERE id IN (SELECT h.id FROM history h WHERE h.finished_at<? AND h.id <> (SELECT "
        "n.id FROM history n WHERE n.node=h.node AND n.uuid=h.uuid AND n.action=h.action AND n.dry_run=h.dry_run "
        "ORDER BY n.finished_at DESC LIMIT 1) LIMIT ?)", (history_cutoff, BATCH)).rowcount
    return Pruned(n, n == 0)


def reclaim(conn: sqlite3.Connection, pages: int = 4096) -> int:
    """Give free pages back to the file system (auto_vacuum=INCREMENTAL); returns the free pages left."""
    conn.execute(f"PRAGMA incremental_vacuum({int(pages)})").fetchall()
    return int(conn.execute("PRAGMA freelist_count").fetchone()[0])
