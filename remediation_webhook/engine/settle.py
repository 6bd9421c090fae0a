"""Escalation by persistence: a ladder that still climbs.

"Already remediated" is about faults that happened before the repair. A condition (a pending row remap, an NVLink
link down: an alert without fault_timestamp) that still fires `policy.settle_time` after its rung succeeded is not
fixed: the remediation is reopened at the next rung of its rule (journaled as escalated_by_persistence; approvals,
gates and verification apply as to any rung), or, past the rule's last rung, handed to a person (NEEDS_HUMAN).
Nothing climbs when the alert resolved, is silenced or inhibited, when the node is another machine now, or when a
person uncordoned it meanwhile (people win).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..actions.base import held_by
from ..alertmanager import AlertState
from ..errors import AlertmanagerUnavailable, InventoryUnavailable, NodeNotFound
from ..journal import Remediation, climb, settle_due, settled

if TYPE_CHECKING:
    from .core import Engine

log = logging.getLogger("remediation_webhook.engine")


async def check(engine: Engine) -> None:
    if engine.config.policy.settle_time <= 0:
        return
    for rem in await engine.journal.run(settle_due, engine.clock()):
        if engine.busy(rem.node) or rem.id in engine.settling:
            continue
        engine.settling.add(rem.id)
        try:
            await _one(engine, rem)
        finally:
            engine.settling.discard(rem.id)


async def _one(engine: Engine, rem: Remediation) -> None:
    journal, now = engine.journal, engine.clock()

    async def done(why: str) -> None:
        await journal.run(settled, rem.id, now, why)

    async def later() -> None:
        await journal.run(settled, rem.id, now, "", later=now + engine.config.engine.tick)

    status, labels = await engine.source(rem)
    if status == "resolved":
        await done("its alert resolved: fixed")
        return
    if engine.alertmanager is None:
        await done("no Alertmanager to ask whether the alert still fires")
        return
    try:
        state = await engine.alertmanager.state(rem.source_fp, rem.alertname, rem.node, labels)
    except AlertmanagerUnavailable:
        await later()
        return
    if state in (AlertState.UNPROCESSED, AlertState.RESTARTED):
        await later()
        return
    if state != AlertState.ACTIVE:
        await done(f"its alert is {state.value} in Alertmanager: not escalated")
        return
    try:
        node = await engine.inventory.resolve(rem.node)
    except NodeNotFound:
        await done("the node is gone")
        return
    except InventoryUnavailable:
        await later()
        return
    if rem.node_uid and node.uid != rem.node_uid:
        await done("another machine carries the node's name now")
        return
    if rem.hold_placed and node.held_by is not None and not held_by(node.held_by, rem.id):
        await done("someone else uncordoned the node since: people win, not escalated")
        return
    rule = next((r for r in engine.config.policy.rules if r.name == rem.rule), None)
    settle = engine.config.policy.settle_time
    ladder = rem.ladder
    if rule is not None and rule.ladder[: len(rem.ladder)] == rem.ladder and len(rule.ladder) > len(rem.ladder):
        ladder = rule.ladder[: len(rem.ladder) + 1]
        reason = (f"{rem.alertname} still fires {settle:.0f}s after {rem.ladder[-1]} succeeded: escalation by "
                  f"persistence to {ladder[-1]}")
    else:
        reason = (f"{rem.alertname} still fires {settle:.0f}s after {rem.ladder[-1]}, the last rung of rule "
                  f"{rem.rule}, succeeded: a person must look")
    why_not = await journal.run(climb, rem.id, ladder, now, reason)
    log.warning("condition persists after a successful rung", extra={
        "remediation_id": rem.id, "node": rem.node, "reason": reason, "not_escalated": why_not})
    engine.wake()
