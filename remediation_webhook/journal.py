"""The durable journal: SQLite in WAL mode with synchronous=FULL, written by one thread with group commit.

Every write goes through `Journal.run(fn, ...)`: the writer thread takes all queued work, runs each item in
its own SAVEPOINT inside one transaction, commits once (one fsync for the whole group) and only then
resolves the callers' futures. So a webhook is answered 200 only after its alerts are on disk, and many
concurrent deliveries share one fsync.

Tables: occurrence (one row per alert occurrence: fingerprint + startsAt + status), remediation (at most
one active per node, enforced by a partial unique index), step (an intent row written before each side
effect, completed after it), action_result (every finished action: the source of the persistent metrics),
node_mark (cordons and taints we placed), audit (append-only), meta (pause switch, breaker).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import queue
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from .config import BreakerConfig, RateLimit, SafetyConfig
from .errors import JournalError

log = logging.getLogger(__name__)
T = TypeVar("T")

ACTIVE = ("PLANNED", "BLOCKED", "AWAITING_APPROVAL", "RUNNING", "NEEDS_HUMAN", "HEALTHY_DELAY")
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED", "REFUSED", "DRY_RUN_RECORDED", "CLOSED")
_ACTIVE_SQL = ",".join(f"'{s}'" for s in ACTIVE)
# Remediations that count as an attempt on the node (per-node attempt cap).
_ATTEMPTED_SQL = "'RUNNING','NEEDS_HUMAN','HEALTHY_DELAY','SUCCEEDED','FAILED','CLOSED'"

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS occurrence(
  fingerprint TEXT NOT NULL, starts_at TEXT NOT NULL, status TEXT NOT NULL,
  first_seen REAL NOT NULL, last_seen REAL NOT NULL, deliveries INTEGER NOT NULL DEFAULT 1,
  alertname TEXT NOT NULL, node TEXT, wants TEXT NOT NULL DEFAULT '', labels_json TEXT NOT NULL,
  group_key TEXT NOT NULL, decision TEXT NOT NULL, reason TEXT NOT NULL, remediation_id TEXT, fault_ts REAL,
  PRIMARY KEY (fingerprint, starts_at, status));
CREATE INDEX IF NOT EXISTS occurrence_first_seen ON occurrence(first_seen);
CREATE INDEX IF NOT EXISTS occurrence_node_seen ON occurrence(node, first_seen);
CREATE TABLE IF NOT EXISTS remediation(
  id TEXT PRIMARY KEY, node TEXT NOT NULL, gpu TEXT NOT NULL, uuid TEXT NOT NULL,
  alertname TEXT NOT NULL, rule TEXT NOT NULL, ladder_json TEXT NOT NULL, target INTEGER NOT NULL,
  next_rung INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
  dry_run INTEGER NOT NULL, approvals_json TEXT NOT NULL DEFAULT '[]', requires_approval_json TEXT NOT NULL,
  source_fp TEXT NOT NULL, source_starts_at TEXT NOT NULL, starts_ts REAL NOT NULL,
  node_uid TEXT, provider_id TEXT, node_created REAL,
  policy_hash TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL, finished_at REAL,
  not_before REAL NOT NULL DEFAULT 0, started INTEGER NOT NULL DEFAULT 0);
CREATE UNIQUE INDEX IF NOT EXISTS remediation_one_active_per_node ON remediation(node) WHERE state IN ({_ACTIVE_SQL});
CREATE INDEX IF NOT EXISTS remediation_state ON remediation(state);
CREATE INDEX IF NOT EXISTS remediation_node ON remediation(node, created_at);
CREATE INDEX IF NOT EXISTS remediation_source ON remediation(source_fp, source_starts_at);
CREATE TABLE IF NOT EXISTS step(
  remediation_id TEXT NOT NULL, seq INTEGER NOT NULL, rung INTEGER NOT NULL, action TEXT NOT NULL,
  state TEXT NOT NULL, dry_run INTEGER NOT NULL, started_at REAL NOT NULL, finished_at REAL,
  outcome TEXT NOT NULL DEFAULT '', detail TEXT NOT NULL DEFAULT '', calls_json TEXT NOT NULL DEFAULT '[]',
  PRIMARY KEY (remediation_id, seq));
CREATE INDEX IF NOT EXISTS step_action_started ON step(action, started_at);
CREATE TABLE IF NOT EXISTS action_result(
  id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, node TEXT NOT NULL, gpu TEXT NOT NULL,
  uuid TEXT NOT NULL, action TEXT NOT NULL, result TEXT NOT NULL, remediation_id TEXT);
CREATE TABLE IF NOT EXISTS node_mark(node TEXT PRIMARY KEY, remediation_id TEXT NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS audit(
  id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, actor TEXT NOT NULL, event TEXT NOT NULL,
  remediation_id TEXT, node TEXT, detail_json TEXT NOT NULL DEFAULT '{{}}');
CREATE INDEX IF NOT EXISTS audit_remediation ON audit(remediation_id);
"""

MetricEvent = tuple[str, str, str, str, str]  # node, gpu, uuid, action, result


# ------------------------------------------------------------------------------------------ the writer

class Journal:
    """Owns the SQLite connection; all access runs on its writer thread."""

    def __init__(self, path: str, *, max_batch: int = 512) -> None:
        self.path = path
        self._queue: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], Future[Any]] | None] = queue.SimpleQueue()
        self._max_batch = max_batch
        self._ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._main, name="journal-writer", daemon=True)
        self._closed = False
        self.commits = 0
        self._thread.start()
        try:
            self._ready.result(timeout=30)
        except Exception as exc:
            raise JournalError(f"journal {path}: {exc}") from exc

    # The connection lives only on the writer thread.
    def _main(self) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise JournalError(f"journal {self.path}: cannot switch to WAL mode (got {mode})")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.row_factory = sqlite3.Row
            conn.executescript(SCHEMA)
        except Exception as exc:  # noqa: BLE001 - reported to the constructor
            self._ready.set_exception(exc)
            return
        self._ready.set_result(None)
        try:
            self._serve(conn)
        finally:
            conn.close()

    def _serve(self, conn: sqlite3.Connection) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            stop = False
            while len(batch) < self._max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._run_batch(conn, batch)
            if stop:
                return

    def _run_batch(self, conn: sqlite3.Connection, batch: list[tuple[Callable[..., Any], tuple[Any, ...], Future[Any]]]) -> None:
        results: list[tuple[Future[Any], Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            for _, _, fut in batch:
                fut.set_exception(JournalError(f"journal: {exc}"))
            return
        for fn, args, fut in batch:
            if not fut.set_running_or_notify_cancel():
                continue
            conn.execute("SAVEPOINT item")
            try:
                value = fn(conn, *args)
                conn.execute("RELEASE item")
                results.append((fut, value, None))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
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

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        fut: Future[T] = Future()
        if self._closed:
            fut.set_exception(JournalError("journal is closed"))
            return fut
        self._queue.put((functools.partial(fn, **kwargs) if kwargs else fn, args, fut))
        return fut

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run fn(conn, *args, **kwargs) in the next group transaction; returns after the commit."""
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def run_sync(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join(timeout=30)


# ------------------------------------------------------------------------------------------------ rows

@dataclass(frozen=True)
class Remediation:
    id: str
    node: str
    gpu: str
    uuid: str
    alertname: str
    rule: str
    ladder: tuple[str, ...]
    target: int
    next_rung: int
    state: str
    reason: str
    dry_run: bool
    approvals: frozenset[int]
    requires_approval: frozenset[str]
    source_fp: str
    source_starts_at: str
    starts_ts: float
    node_uid: str | None
    provider_id: str | None
    node_created: float | None
    policy_hash: str
    created_at: float
    updated_at: float
    finished_at: float | None
    not_before: float
    started: bool

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Remediation:
        return cls(id=row["id"], node=row["node"], gpu=row["gpu"], uuid=row["uuid"], alertname=row["alertname"],
                   rule=row["rule"], ladder=tuple(json.loads(row["ladder_json"])), target=row["target"],
                   next_rung=row["next_rung"], state=row["state"], reason=row["reason"], dry_run=bool(row["dry_run"]),
                   approvals=frozenset(json.loads(row["approvals_json"])),
                   requires_approval=frozenset(json.loads(row["requires_approval_json"])),
                   source_fp=row["source_fp"], source_starts_at=row["source_starts_at"], starts_ts=row["starts_ts"],
                   node_uid=row["node_uid"], provider_id=row["provider_id"], node_created=row["node_created"],
                   policy_hash=row["policy_hash"], created_at=row["created_at"], updated_at=row["updated_at"],
                   finished_at=row["finished_at"], not_before=row["not_before"], started=bool(row["started"]))

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "node": self.node, "gpu": self.gpu, "uuid": self.uuid, "alertname": self.alertname,
                "rule": self.rule, "ladder": list(self.ladder), "target": self.ladder[self.target],
                "next_rung": self.next_rung, "state": self.state, "reason": self.reason, "dry_run": self.dry_run,
                "requires_approval": sorted(self.requires_approval), "approved_rungs": sorted(self.approvals),
                "source": {"fingerprint": self.source_fp, "startsAt": self.source_starts_at},
                "node_identity": {"uid": self.node_uid, "providerID": self.provider_id,
                                  "created": self.node_created},
                "policy_hash": self.policy_hash, "created_at": self.created_at, "updated_at": self.updated_at,
                "finished_at": self.finished_at}


def audit(conn: sqlite3.Connection, now: float, actor: str, event: str, remediation_id: str | None = None,
          node: str | None = None, **detail: Any) -> None:
    conn.execute("INSERT INTO audit(ts, actor, event, remediation_id, node, detail_json) VALUES (?,?,?,?,?,?)",
                 (now, actor, event, remediation_id, node, json.dumps(detail, default=str)))


def _result(conn: sqlite3.Connection, now: float, event: MetricEvent, remediation_id: str | None,
            out: list[MetricEvent]) -> None:
    conn.execute("INSERT INTO action_result(ts, node, gpu, uuid, action, result, remediation_id) VALUES (?,?,?,?,?,?,?)",
                 (now, *event, remediation_id))
    out.append(event)


def get_meta(conn: sqlite3.Connection, key: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    return json.loads(row[0]) if row else None


def set_meta(conn: sqlite3.Connection, key: str, value: Mapping[str, Any] | None) -> None:
    if value is None:
        conn.execute("DELETE FROM meta WHERE key=?", (key,))
    else:
        conn.execute("INSERT INTO meta(key, value) VALUES (?,?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                     (key, json.dumps(value)))


def load(conn: sqlite3.Connection, remediation_id: str) -> Remediation | None:
    row = conn.execute("SELECT * FROM remediation WHERE id=?", (remediation_id,)).fetchone()
    return Remediation.from_row(row) if row else None


# ------------------------------------------------------------------------------------------- accepting

@dataclass(frozen=True)
class AlertIn:
    """One alert, already judged by the policy (pure), as the accept transaction needs it."""

    fingerprint: str
    starts_key: str
    starts_ts: float
    status: str
    alertname: str
    labels_json: str
    node: str | None
    gpu: str
    uuid: str
    decision: str
    reason: str
    wants: str = ""
    rule: str = ""
    ladder: tuple[str, ...] = ()
    target_index: int = -1
    dry_run: bool = True
    requires_approval: tuple[str, ...] = ()
    fault_ts: float | None = None
    blocked_event: MetricEvent | None = None  # metric labels if a refusal counts as a blocked action
    skip_event: MetricEvent | None = None  # first rung's labels, counted if a plan is refused (a skipped storm)


@dataclass(frozen=True)
class AcceptIn:
    alerts: tuple[AlertIn, ...]
    group_key: str
    truncated: int
    now: float
    pool: int | None
    policy_hash: str
    safety: SafetyConfig
    actor: str = "alertmanager"


@dataclass
class AcceptOut:
    accepted: int = 0
    duplicates: int = 0
    ignored: int = 0
    refused: int = 0
    rejected: int = 0
    merged: int = 0
    remediation_ids: list[str] = field(default_factory=list)
    metric_events: list[MetricEvent] = field(default_factory=list)
    breaker_tripped: str = ""
    undo_scheduled: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "duplicates": self.duplicates, "ignored": self.ignored,
                "refused": self.refused, "rejected": self.rejected, "merged": self.merged,
                "remediation_ids": self.remediation_ids,
                **({"breaker_tripped": self.breaker_tripped} if self.breaker_tripped else {})}


def accept(conn: sqlite3.Connection, batch: AcceptIn) -> AcceptOut:
    """Journal one notification: occurrences, decisions, planned remediations, audit; trips the breaker."""
    out = AcceptOut()
    now, safety = batch.now, batch.safety
    breaker_open = get_meta(conn, "breaker") is not None
    skip = skip_cutoff(get_meta(conn, "breaker_reset"))
    window_start = now - safety.breaker.window
    new_node = False  # a node not alerting within the breaker window before: the storm count may grow
    for a in batch.alerts:
        row = conn.execute("SELECT deliveries, remediation_id, fault_ts FROM occurrence "
                           "WHERE fingerprint=? AND starts_at=? AND status=?",
                           (a.fingerprint, a.starts_key, a.status)).fetchone()
        if row is not None:
            if not _recurrence(conn, a, row):
                conn.execute("UPDATE occurrence SET deliveries=deliveries+1, last_seen=? "
                             "WHERE fingerprint=? AND starts_at=? AND status=?",
                             (now, a.fingerprint, a.starts_key, a.status))
                out.duplicates += 1
                continue
            conn.execute("UPDATE occurrence SET deliveries=deliveries+1, last_seen=?, fault_ts=? "
                         "WHERE fingerprint=? AND starts_at=? AND status=?",
                         (now, a.fault_ts, a.fingerprint, a.starts_key, a.status))
            audit(conn, now, batch.actor, "recurrence", row["remediation_id"], a.node, fingerprint=a.fingerprint,
                  fault_ts=a.fault_ts)
        else:
            # An alert of a skipped storm no longer counts towards the next storm, like the backlog it belongs to.
            wants = "" if storm_skip_reason(skip, a.starts_ts, a.fault_ts) else a.wants
            if a.status == "firing" and a.node is not None and wants and not new_node:
                new_node = conn.execute("SELECT 1 FROM occurrence WHERE node=? AND first_seen>=? AND status='firing' "
                                        "AND wants!='' LIMIT 1", (a.node, window_start)).fetchone() is None
            conn.execute("INSERT INTO occurrence(fingerprint, starts_at, status, first_seen, last_seen, alertname, "
                         "node, wants, labels_json, group_key, decision, reason, fault_ts) "
                         "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                         (a.fingerprint, a.starts_key, a.status, now, now, a.alertname[:1000], a.node, wants,
                          a.labels_json, batch.group_key[:2000], a.decision, a.reason, a.fault_ts))
        if a.status == "firing":
            if a.alertname in safety.breaker.trip_on_alerts and not breaker_open:
                breaker_open = _trip(conn, now, f"alert {a.alertname} is firing", batch.actor, out)
        decision, reason, rid = _decide(conn, a, batch, breaker_open, skip, out)
        conn.execute("UPDATE occurrence SET decision=?, reason=?, remediation_id=? "
                     "WHERE fingerprint=? AND starts_at=? AND status=?",
                     (decision, reason, rid, a.fingerprint, a.starts_key, a.status))
    if batch.truncated and safety.breaker.trip_on_truncated and not breaker_open:
        breaker_open = _trip(conn, now, f"a notification arrived with {batch.truncated} truncated alerts",
                             batch.actor, out)
    if new_node and not breaker_open:
        window = safety.breaker.window
        n = conn.execute("SELECT COUNT(DISTINCT node) FROM occurrence WHERE status='firing' AND node IS NOT NULL "
                         "AND wants!='' AND first_seen>=?", (window_start,)).fetchone()[0]
        threshold = safety.breaker.threshold(batch.pool)
        if n > threshold:
            _trip(conn, now, f"{n} nodes alerting within {window:.0f}s (threshold {threshold})", batch.actor, out)
    return out


def _recurrence(conn: sqlite3.Connection, a: AlertIn, row: sqlite3.Row) -> bool:
    """A re-sent firing occurrence whose fault_timestamp is newer than our successful action is a recurrence."""
    if a.status != "firing" or a.decision != "plan" or a.fault_ts is None or row["remediation_id"] is None:
        return False
    if row["fault_ts"] is not None and a.fault_ts <= row["fault_ts"]:
        return False
    rem = conn.execute("SELECT state, finished_at FROM remediation WHERE id=?", (row["remediation_id"],)).fetchone()
    return bool(rem and rem["state"] in ("SUCCEEDED", "CLOSED") and rem["finished_at"] is not None
                and a.fault_ts > rem["finished_at"])


def _trip(conn: sqlite3.Connection, now: float, reason: str, actor: str, out: AcceptOut) -> bool:
    set_meta(conn, "breaker", {"reason": reason, "since": now})
    conn.execute("UPDATE remediation SET state='BLOCKED', reason='breaker open', updated_at=? WHERE state='PLANNED'",
                 (now,))
    audit(conn, now, actor, "breaker_tripped", reason=reason)
    out.breaker_tripped = reason
    return True


def skip_cutoff(reset: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The last breaker reset if it was a skip-backlog one (its `skip_before` is the storm's cut-off), else None."""
    if reset is None or reset.get("mode") != "skip-backlog" or reset.get("skip_before") is None:
        return None
    return reset


def storm_skip_reason(skip: Mapping[str, Any] | None, starts_ts: float, fault_ts: float | None = None) -> str:
    """Why an alert that began at `starts_ts` belongs to the storm skipped by `skip` ('' if it does not).

    An alert belongs to the skipped storm when it began at or before the skip-backlog reset: a group Alertmanager
    delivers later, or an alert still pending in Prometheus at the reset. It is acted on once it resolves and fires
    again (a new startsAt), when its fault_timestamp annotation says a new fault came after the reset (a recurrence
    of a still-firing alert), or after a later `resume` reset; a later skip-backlog reset moves the cut-off.
    """
    began = max(starts_ts, fault_ts if fault_ts is not None else starts_ts)
    if skip is None or began > float(skip["skip_before"]):
        return ""
    at = datetime.fromtimestamp(float(skip["skip_before"]), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"began before the breaker reset with skip-backlog at {at} by {skip.get('by', '?')}"


def _decide(conn: sqlite3.Connection, a: AlertIn, batch: AcceptIn, breaker_open: bool,
            skip: Mapping[str, Any] | None, out: AcceptOut) -> tuple[str, str, str | None]:
    now, safety = batch.now, batch.safety
    if a.status == "resolved":
        out.ignored += 1
        if safety.undo_enabled:
            rid = _schedule_undo(conn, a, now, safety.healthy_delay, batch.actor)
            if rid:
                out.undo_scheduled.append(rid)
                return "undo_scheduled", "resolved; undo after the healthy delay", rid
        return "ignored", "resolved", None
    if a.decision == "reject":
        out.rejected += 1
        audit(conn, now, batch.actor, "rejected", None, a.node, fingerprint=a.fingerprint, reason=a.reason)
        return "rejected", a.reason, None
    if a.decision == "ignore":
        out.ignored += 1
        return "ignored", a.reason, None
    if a.decision == "refuse":
        out.refused += 1
        audit(conn, now, batch.actor, "refused", None, a.node, fingerprint=a.fingerprint, reason=a.reason)
        if a.blocked_event:
            _result(conn, now, a.blocked_event, None, out.metric_events)
        return "refused", a.reason, None
    skipped = storm_skip_reason(skip, a.starts_ts, a.fault_ts)
    if skipped:  # part of a storm the operator chose not to act on: refused like the backlog it missed
        out.refused += 1
        audit(conn, now, batch.actor, "refused", None, a.node, fingerprint=a.fingerprint, startsAt=a.starts_key,
              reason=skipped)
        if a.skip_event:
            _result(conn, now, a.skip_event, None, out.metric_events)
        return "refused", skipped, None
    assert a.node is not None
    active = conn.execute(f"SELECT * FROM remediation WHERE node=? AND state IN ({_ACTIVE_SQL})", (a.node,)).fetchone()
    if active is not None:
        rem = Remediation.from_row(active)
        out.merged += 1
        if rem.rule == a.rule and a.target_index > rem.target and rem.ladder == a.ladder[: len(rem.ladder)] \
                and len(a.ladder) > len(rem.ladder) and rem.state != "HEALTHY_DELAY":
            conn.execute("UPDATE remediation SET target=?, ladder_json=?, updated_at=? WHERE id=?",
                         (a.target_index, json.dumps(a.ladder), now, rem.id))
            audit(conn, now, batch.actor, "escalated", rem.id, a.node, to=a.ladder[a.target_index],
                  fingerprint=a.fingerprint)
            return "escalated", f"raised the active remediation to {a.ladder[a.target_index]}", rem.id
        audit(conn, now, batch.actor, "merged", rem.id, a.node, fingerprint=a.fingerprint)
        return "merged", "the node already has an active remediation", rem.id
    refusal = _per_node_refusal(conn, a, now, safety)
    rid = uuid.uuid4().hex
    state, reason = "PLANNED", a.reason
    if refusal:
        state, reason = "REFUSED", refusal
    elif breaker_open:
        state, reason = "BLOCKED", "breaker open"
    conn.execute(
        "INSERT INTO remediation(id, node, gpu, uuid, alertname, rule, ladder_json, target, state, reason, dry_run, "
        "requires_approval_json, source_fp, source_starts_at, starts_ts, policy_hash, created_at, updated_at, "
        "finished_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (rid, a.node, a.gpu, a.uuid, a.alertname[:1000], a.rule, json.dumps(a.ladder), a.target_index, state, reason,
         int(a.dry_run), json.dumps(sorted(a.requires_approval)), a.fingerprint, a.starts_key, a.starts_ts,
         batch.policy_hash, now, now, now if state == "REFUSED" else None))
    audit(conn, now, batch.actor, "planned" if state != "REFUSED" else "refused", rid, a.node,
          fingerprint=a.fingerprint, startsAt=a.starts_key, rule=a.rule, ladder=list(a.ladder), dry_run=a.dry_run,
          reason=reason)
    if state == "REFUSED":
        out.refused += 1
        if a.blocked_event:
            _result(conn, now, a.blocked_event, rid, out.metric_events)
        return "refused", refusal or "", rid
    out.accepted += 1
    out.remediation_ids.append(rid)
    return "planned", reason, rid


def _per_node_refusal(conn: sqlite3.Connection, a: AlertIn, now: float, safety: SafetyConfig) -> str | None:
    # Dry-run history counts for dry-run (so it shows what live would do) and not for live, and vice versa.
    last = conn.execute("SELECT * FROM remediation WHERE node=? AND dry_run=? AND state IN "
                        "('SUCCEEDED','FAILED','CLOSED','DRY_RUN_RECORDED') ORDER BY finished_at DESC LIMIT 1",
                        (a.node, int(a.dry_run))).fetchone()
    if last is not None and safety.cooldown and now - (last["finished_at"] or 0) < safety.cooldown:
        prev = Remediation.from_row(last)
        higher = prev.rule == a.rule and a.target_index > prev.target
        if not higher:
            return f"node in cooldown until {(last['finished_at'] or 0) + safety.cooldown:.0f}"
    attempts = conn.execute(f"SELECT COUNT(*) FROM remediation WHERE node=? AND dry_run=? AND started=1 AND "
                            f"created_at>=? AND state IN ({_ATTEMPTED_SQL},'DRY_RUN_RECORDED')",
                            (a.node, int(a.dry_run), now - safety.attempts_window)).fetchone()[0]
    if attempts >= safety.max_attempts:
        return f"attempt cap reached ({attempts} in {safety.attempts_window:.0f}s): a human must look"
    return None


def _schedule_undo(conn: sqlite3.Connection, a: AlertIn, now: float, delay: float, actor: str) -> str | None:
    row = conn.execute("SELECT id, node FROM remediation WHERE source_fp=? AND source_starts_at=? AND state='SUCCEEDED' "
                       "AND dry_run=0 ORDER BY created_at DESC LIMIT 1", (a.fingerprint, a.starts_key)).fetchone()
    if row is None:
        return None
    try:
        conn.execute("UPDATE remediation SET state='HEALTHY_DELAY', not_before=?, reason=?, updated_at=? WHERE id=?",
                     (now + delay, "alert resolved; waiting for the healthy delay before undoing our cordon", now,
                      row["id"]))
    except sqlite3.IntegrityError:
        audit(conn, now, actor, "undo_skipped", row["id"], row["node"], reason="another remediation is active")
        return None
    audit(conn, now, actor, "undo_scheduled", row["id"], row["node"], due=now + delay)
    return str(row["id"])


# --------------------------------------------------------------------------------------------- engine

def runnable(conn: sqlite3.Connection, now: float) -> list[Remediation]:
    rows = conn.execute("SELECT * FROM remediation WHERE state IN ('PLANNED','BLOCKED','RUNNING','HEALTHY_DELAY') "
                        "AND not_before<=? ORDER BY created_at", (now,)).fetchall()
    return [Remediation.from_row(r) for r in rows]


def save_identity(conn: sqlite3.Connection, rid: str, uid: str, provider_id: str, created: float | None,
                  now: float) -> None:
    conn.execute("UPDATE remediation SET node_uid=?, provider_id=?, node_created=?, updated_at=? WHERE id=?",
                 (uid, provider_id, created, now, rid))
    audit(conn, now, "engine", "resolved", rid, None, uid=uid, providerID=provider_id, created=created)


def transition(conn: sqlite3.Connection, rid: str, state: str, reason: str, now: float, *,
               expect: Sequence[str] | None = None, actor: str = "engine",
               event: MetricEvent | None = None, not_before: float = 0.0) -> bool:
    """Move a remediation to `state` (only from `expect` states if given); journals and audits it."""
    row = conn.execute("SELECT state, node, reason FROM remediation WHERE id=?", (rid,)).fetchone()
    if row is None or (expect is not None and row["state"] not in expect):
        return False
    same = row["state"] == state and row["reason"] == reason
    finished = now if state in TERMINAL else None
    conn.execute("UPDATE remediation SET state=?, reason=?, updated_at=?, finished_at=COALESCE(?, finished_at), "
                 "not_before=? WHERE id=?", (state, reason, now, finished, not_before, rid))
    if not same:
        audit(conn, now, actor, state.lower(), rid, row["node"], reason=reason, previous=row["state"])
    if event is not None:
        _result(conn, now, event, rid, [])
    return True


@dataclass(frozen=True)
class Gates:
    """What begin_step checks atomically with writing the intent row."""

    cordons: bool
    fleet_cap: int
    rate_limit: RateLimit | None


def begin_step(conn: sqlite3.Connection, rid: str, rung: int, action: str, dry_run: bool, gates: Gates,
               now: float) -> int | str:
    """Write the intent row and return its seq, or return why the step may not start now."""
    rem = load(conn, rid)
    if rem is None or rem.state not in ("PLANNED", "BLOCKED", "RUNNING", "HEALTHY_DELAY"):
        return f"remediation is {rem.state if rem else 'gone'}"
    pause = get_meta(conn, "pause")
    if pause is not None:
        return "paused"
    if get_meta(conn, "breaker") is not None and rem.state != "HEALTHY_DELAY":
        return "breaker open"
    if not dry_run:
        if gates.cordons:
            held = cordon_holders(conn)
            if rem.node not in held and len(held) >= gates.fleet_cap:
                return f"fleet cap reached ({len(held)} of {gates.fleet_cap} nodes held by us)"
        if gates.rate_limit is not None:
            used = rate_used(conn, action, now, gates.rate_limit)
            if used >= gates.rate_limit.max:
                return f"rate limit for {action} reached ({used} per {gates.rate_limit.per:.0f}s)"
    seq = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM step WHERE remediation_id=?", (rid,)).fetchone()[0]
    conn.execute("INSERT INTO step(remediation_id, seq, rung, action, state, dry_run, started_at) VALUES (?,?,?,?,?,?,?)",
                 (rid, seq, rung, action, "INTENT", int(dry_run), now))
    state = "HEALTHY_DELAY" if rem.state == "HEALTHY_DELAY" else "RUNNING"
    conn.execute("UPDATE remediation SET state=?, reason='', started=1, updated_at=? WHERE id=?", (state, now, rid))
    audit(conn, now, "engine", "step_intent", rid, rem.node, seq=seq, action=action, dry_run=dry_run)
    return int(seq)


def finish_step(conn: sqlite3.Connection, rid: str, seq: int, state: str, outcome: str, detail: str,
                calls: Iterable[Mapping[str, Any]], now: float, *, event: MetricEvent | None,
                advance: bool, mark: str | None = None) -> None:
    """Complete the intent row; `mark` = 'set' or 'clear' records whether we now hold a cordon on the node."""
    conn.execute("UPDATE step SET state=?, outcome=?, detail=?, calls_json=?, finished_at=? "
                 "WHERE remediation_id=? AND seq=?",
                 (state, outcome, detail[:4000], json.dumps(list(calls), default=str), now, rid, seq))
    row = conn.execute("SELECT node FROM remediation WHERE id=?", (rid,)).fetchone()
    if advance:
        conn.execute("UPDATE remediation SET next_rung=next_rung+1, updated_at=? WHERE id=?", (now, rid))
    if event is not None:
        _result(conn, now, event, rid, [])
    if mark == "set" and row is not None:
        conn.execute("INSERT INTO node_mark(node, remediation_id, updated_at) VALUES (?,?,?) "
                     "ON CONFLICT(node) DO UPDATE SET remediation_id=excluded.remediation_id, updated_at=excluded.updated_at",
                     (row["node"], rid, now))
    elif mark == "clear" and row is not None:
        conn.execute("DELETE FROM node_mark WHERE node=?", (row["node"],))
    audit(conn, now, "engine", "step_" + state.lower(), rid, row["node"] if row else None, seq=seq,
          outcome=outcome, detail=detail[:1000])


def open_step(conn: sqlite3.Connection, rid: str) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM step WHERE remediation_id=? AND state='INTENT' ORDER BY seq DESC LIMIT 1",
                        (rid,)).fetchone()


def cordon_holders(conn: sqlite3.Connection) -> set[str]:
    """Nodes cordoned by us, plus nodes whose live remediation is in flight: in-flight counts."""
    held = {r[0] for r in conn.execute("SELECT node FROM node_mark")}
    held |= {r[0] for r in conn.execute(
        "SELECT node FROM remediation WHERE dry_run=0 AND started=1 AND state IN "
        "('RUNNING','NEEDS_HUMAN','AWAITING_APPROVAL','HEALTHY_DELAY')")}
    return held


def clear_mark(conn: sqlite3.Connection, node: str, now: float, reason: str) -> None:
    if conn.execute("DELETE FROM node_mark WHERE node=?", (node,)).rowcount:
        audit(conn, now, "engine", "mark_cleared", None, node, reason=reason)


def marks(conn: sqlite3.Connection) -> dict[str, str]:
    return {r[0]: r[1] for r in conn.execute("SELECT node, remediation_id FROM node_mark")}


def rate_used(conn: sqlite3.Connection, action: str, now: float, limit: RateLimit) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM step WHERE action=? AND dry_run=0 AND started_at>=? "
                            "AND state!='CANCELLED'", (action, now - limit.per)).fetchone()[0])


def approve(conn: sqlite3.Connection, rid: str, actor: str, now: float, reason: str) -> str:
    rem = load(conn, rid)
    if rem is None:
        return "not found"
    if rem.state != "AWAITING_APPROVAL":
        return f"remediation is {rem.state}, not AWAITING_APPROVAL"
    approvals = sorted(rem.approvals | {rem.next_rung})
    conn.execute("UPDATE remediation SET approvals_json=?, state='PLANNED', reason='', updated_at=? WHERE id=?",
                 (json.dumps(approvals), now, rid))
    audit(conn, now, actor, "approved", rid, rem.node, rung=rem.next_rung, action=rem.ladder[rem.next_rung],
          reason=reason)
    return ""


def cancel(conn: sqlite3.Connection, rid: str, actor: str, now: float, reason: str,
           event: MetricEvent | None) -> str:
    rem = load(conn, rid)
    if rem is None:
        return "not found"
    if rem.state not in ACTIVE:
        return f"remediation is already {rem.state}"
    conn.execute("UPDATE remediation SET state='CANCELLED', reason=?, updated_at=?, finished_at=? WHERE id=?",
                 (f"cancelled by {actor}: {reason}", now, now, rid))
    conn.execute("UPDATE step SET state='CANCELLED', outcome='cancelled', finished_at=? "
                 "WHERE remediation_id=? AND state='INTENT'", (now, rid))
    if event is not None:
        _result(conn, now, event, rid, [])
    audit(conn, now, actor, "cancelled", rid, rem.node, reason=reason, previous=rem.state)
    return ""


def set_pause(conn: sqlite3.Connection, paused: bool, actor: str, now: float, reason: str) -> None:
    set_meta(conn, "pause", {"by": actor, "since": now, "reason": reason} if paused else None)
    if not paused:
        conn.execute("UPDATE remediation SET not_before=0 WHERE state='BLOCKED'")  # look again now
    audit(conn, now, actor, "paused" if paused else "resumed", reason=reason)


def reset_breaker(conn: sqlite3.Connection, mode: str, actor: str, now: float, reason: str,
                  blocked_event: Callable[[Remediation], MetricEvent | None]) -> dict[str, Any]:
    """mode resume: the backlog runs (each step still verified); skip-backlog: it is cancelled, and firing alerts
    that began at or before now (the same storm, delivered late) are refused until the next reset
    (`skip_before` in the breaker_reset meta; see storm_skip_reason). A resume reset lifts that cut-off."""
    state = get_meta(conn, "breaker")
    skipped: list[str] = []
    if mode == "skip-backlog":
        for row in conn.execute("SELECT * FROM remediation WHERE state IN ('PLANNED','BLOCKED')").fetchall():
            rem = Remediation.from_row(row)
            conn.execute("UPDATE remediation SET state='CANCELLED', reason=?, updated_at=?, finished_at=? WHERE id=?",
                         ("breaker reset with skip-backlog", now, now, rem.id))
            ev = blocked_event(rem)
            if ev is not None:
                _result(conn, now, ev, rem.id, [])
            skipped.append(rem.id)
    # Occurrences seen before the reset no longer count towards the next storm.
    set_meta(conn, "breaker", None)
    reset: dict[str, Any] = {"at": now, "by": actor, "mode": mode, "reason": reason}
    if mode == "skip-backlog":
        reset["skip_before"] = now
    set_meta(conn, "breaker_reset", reset)
    conn.execute("UPDATE remediation SET not_before=0 WHERE state='BLOCKED'")  # look again now
    conn.execute("UPDATE occurrence SET wants='' WHERE first_seen<=? AND status='firing'", (now,))
    audit(conn, now, actor, "breaker_reset", mode=mode, reason=reason, was=state, skipped=skipped,
          skip_before=reset.get("skip_before"))
    return {"was": state, "mode": mode, "skipped": skipped, "skip_before": reset.get("skip_before")}


# ------------------------------------------------------------------------------------------- reading

def restore_metrics(conn: sqlite3.Connection) -> tuple[list[tuple[MetricEvent, int]], list[tuple[tuple[str, str, str, str], float]]]:
    counts = [((r[0], r[1], r[2], r[3], r[4]), int(r[5])) for r in conn.execute(
        "SELECT node, gpu, uuid, action, result, COUNT(*) FROM action_result GROUP BY node, gpu, uuid, action, result")]
    last = [((r[0], r[1], r[2], r[3]), float(r[4])) for r in conn.execute(
        "SELECT node, gpu, uuid, action, MAX(ts) FROM action_result WHERE result='success' GROUP BY node, gpu, uuid, action")]
    return counts, last


def state_counts(conn: sqlite3.Connection) -> dict[str, int]:
    return {r[0]: int(r[1]) for r in conn.execute(
        f"SELECT state, COUNT(*) FROM remediation WHERE state IN ({_ACTIVE_SQL}) GROUP BY state")}


def list_remediations(conn: sqlite3.Connection, state: str = "", node: str = "", since: float = 0.0,
                      limit: int = 100) -> list[dict[str, Any]]:
    sql, args = "SELECT * FROM remediation WHERE created_at>=?", [since]
    if state:
        sql += " AND state=?"
        args.append(state)
    if node:
        sql += " AND node=?"
        args.append(node)
    sql += " ORDER BY created_at DESC LIMIT ?"
    args.append(limit)
    return [Remediation.from_row(r).as_dict() for r in conn.execute(sql, args)]


def detail(conn: sqlite3.Connection, rid: str) -> dict[str, Any] | None:
    rem = load(conn, rid)
    if rem is None:
        return None
    steps = [{"seq": r["seq"], "rung": r["rung"], "action": r["action"], "state": r["state"],
              "dry_run": bool(r["dry_run"]), "started_at": r["started_at"], "finished_at": r["finished_at"],
              "outcome": r["outcome"], "detail": r["detail"], "calls": json.loads(r["calls_json"])}
             for r in conn.execute("SELECT * FROM step WHERE remediation_id=? ORDER BY seq", (rid,))]
    trail = [{"ts": r["ts"], "actor": r["actor"], "event": r["event"], "detail": json.loads(r["detail_json"])}
             for r in conn.execute("SELECT * FROM audit WHERE remediation_id=? ORDER BY id", (rid,))]
    occurrences = [{"fingerprint": r["fingerprint"], "startsAt": r["starts_at"], "status": r["status"],
                    "deliveries": r["deliveries"], "decision": r["decision"]}
                   for r in conn.execute("SELECT * FROM occurrence WHERE remediation_id=?", (rid,))]
    return {**rem.as_dict(), "steps": steps, "audit": trail, "occurrences": occurrences}


def breaker_status(conn: sqlite3.Connection, now: float, breaker: BreakerConfig, pool: int | None) -> dict[str, Any]:
    state = get_meta(conn, "breaker")
    n = conn.execute("SELECT COUNT(DISTINCT node) FROM occurrence WHERE status='firing' AND node IS NOT NULL "
                     "AND wants!='' AND first_seen>=?", (now - breaker.window,)).fetchone()[0]
    backlog = conn.execute("SELECT COUNT(*) FROM remediation WHERE state IN ('PLANNED','BLOCKED')").fetchone()[0]
    last_reset = get_meta(conn, "breaker_reset")
    skip = skip_cutoff(last_reset)
    return {"open": state is not None, **({"reason": state["reason"], "since": state["since"]} if state else {}),
            "alerting_nodes_in_window": n, "threshold": breaker.threshold(pool), "window_seconds": breaker.window,
            "backlog": backlog, "last_reset": last_reset,
            # firing alerts that began at or before this time belong to the skipped storm and are refused
            "skip_before": skip["skip_before"] if skip else None}


def ping(conn: sqlite3.Connection, now: float) -> None:
    set_meta(conn, "readyz", {"at": now})
