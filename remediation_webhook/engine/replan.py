"""Occurrences whose owner ended without acting on them are decided again, as if they arrived now.

A remediation cancelled because Alertmanager did not confirm its alert (another alert's fingerprint with other
labels, or an alert it no longer has) or because its alert never fired again after it resolved leaves two kinds
of occurrence behind: conflict twins of its alert (one of them may be the real alert) and other firing alerts
that were merged into it. Each is judged again by the current policy and goes through the journal's decision.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from ..intake import alert_in, occurrence_alert
from ..journal import AcceptIn, Remediation, orphans as journal_orphans, replan
from ..policy import judge

if TYPE_CHECKING:
    from .core import Engine

log = logging.getLogger("remediation_webhook.engine")


async def has_twins(engine: Engine, rem: Remediation) -> bool:
    rows = await engine.journal.run(journal_orphans, rem.id)
    return any(r["fingerprint"] == rem.source_fp and r["decision"] == "conflict" for r in rows)


async def orphans(engine: Engine, rid: str) -> None:
    config = engine.config
    for row in await engine.journal.run(journal_orphans, rid):
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
    engine.wake()
