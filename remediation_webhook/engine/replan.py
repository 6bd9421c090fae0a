"""Occurrences whose owner ended without acting on them are decided again, as if they arrived now.

Two kinds are left behind:
- conflict twins of a remediation's alert (its fingerprint, other labels), held back while it ran: when it ends
  without acting (refused, cancelled for any reason, overridden) or is held, one of them may be the real alert;
- firing alerts merged into a remediation whose own alert turned out not real (another alert's fingerprint) or
  never fired again after it resolved: they still need an owner.
Each is judged again by the current policy and goes through the journal's decision (and, if planned, through
verification like any plan). A person's cancel or override re-plans twins only: merged alerts of the same node
would undo what the person decided.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from ..intake import alert_in, occurrence_alert
from ..journal import AcceptIn, merged as journal_merged, replan, twins as journal_twins
from ..policy import judge

if TYPE_CHECKING:
    from .core import Engine

log = logging.getLogger("remediation_webhook.engine")


async def twins(engine: Engine, rid: str) -> None:
    await _again(engine, rid, journal_twins)


async def merged(engine: Engine, rid: str) -> None:
    await _again(engine, rid, journal_merged)


async def _again(engine: Engine, rid: str, rows: Callable[[sqlite3.Connection, str], list[sqlite3.Row]]) -> None:
    config = engine.config
    found = await engine.journal.run(rows, rid)
    for row in found:
        now = engine.clock()
        judgement = judge(occurrence_alert(row), config.policy, datetime.fromtimestamp(now, UTC))
        batch = AcceptIn(alerts=(), group_key=str(row["group_key"]), truncated=0, now=now, pool=engine.pool,
                         policy_hash=config.policy_hash, safety=config.safety, actor="engine",
                         hold=config.policy.resolved_hold)
        decision, reason, new_rid, events = await engine.journal.run(replan, alert_in(judgement), batch)
        engine.metrics.alerts.labels({"escalated": "merged"}.get(decision, decision)).inc()
        for event in events:
            engine.note(event)
        log.info("occurrence decided again", extra={"fingerprint": row["fingerprint"], "node": row["node"],
                                                    "decision": decision, "reason": reason,
                                                    "remediation_id": new_rid, "after": rid})
    if found:
        engine.wake()
