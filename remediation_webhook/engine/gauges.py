"""The webhook's gauges, read from the journal in one transaction: remediation states and their age, breaker,
pause, budgets, the history the rules read (docs/webhook-metrics-contract.md), the last notification."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import SafetyConfig
from ..journal import get_meta, set_meta, state_counts, state_since, successful_counts
from ..safety import budgets
from . import retention

if TYPE_CHECKING:
    from .core import Engine


@dataclass(frozen=True)
class Snapshot:
    states: dict[str, int]
    since: dict[str, float]
    breaker: dict[str, Any] | None
    pause: dict[str, Any] | None
    budgets: dict[str, int]
    history: dict[tuple[str, str, str, str], dict[str, int]]
    last_notification: float


def snapshot(conn: sqlite3.Connection, now: float, safety: SafetyConfig, pool: int | None,
             notified: float = 0.0) -> Snapshot:
    last = get_meta(conn, "last_notification")
    if notified > (float(last["at"]) if last else 0.0):
        set_meta(conn, "last_notification", {"at": notified})
        last = {"at": notified}
    return Snapshot(states=state_counts(conn), since=state_since(conn), breaker=get_meta(conn, "breaker"),
                    pause=get_meta(conn, "pause"), budgets=budgets(conn, now, safety, pool),
                    history=successful_counts(conn, now), last_notification=float(last["at"]) if last else 0.0)


async def refresh(engine: Engine) -> None:
    m = engine.metrics
    snap = await engine.journal.run(snapshot, engine.clock(), engine.config.safety, engine.pool,
                                    engine.last_notification)
    m.set_states(snap.states, snap.since)
    m.breaker_open.set(1 if snap.breaker else 0)
    m.breaker_since.set(float(snap.breaker["since"]) if snap.breaker else 0)
    m.paused.set(1 if snap.pause else 0)
    m.paused_since.set(float(snap.pause["since"]) if snap.pause else 0)
    for name, left in snap.budgets.items():
        m.budget.labels(name).set(left)
    if engine.pool is not None:
        m.pool.set(engine.pool)
    m.set_history(snap.history)
    if snap.last_notification:
        engine.notified(snap.last_notification)
    m.sync_journal_errors(engine.journal.errors)
    m.journal_bytes.set(retention.size(engine.journal.path))
