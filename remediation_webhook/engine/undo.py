"""Undo (off by default): the healthy delay passed after the alert resolved; remove our cordon and taint if no
remediation alert fires for the node again and it is still the same machine. A cordon or taint someone else
placed is never removed (the uncordon action checks our annotations)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..actions.base import Outcome, StepResult
from ..errors import InventoryUnavailable, KubeApiError, NodeNotFound
from ..journal import Gates, Remediation, begin_step, finish_step, transition

if TYPE_CHECKING:
    from .core import Engine


async def run(engine: Engine, rem: Remediation) -> None:
    journal, now = engine.journal, engine.clock()

    async def postpone(why: object) -> None:
        await journal.run(transition, rem.id, "HEALTHY_DELAY", f"undo postponed: {why}", now,
                          not_before=now + engine.config.engine.tick)

    if engine.alertmanager is not None:
        try:
            firing = await engine.alertmanager.active_for_node(rem.node)
        except Exception as exc:  # noqa: BLE001 - any failure means: not now
            await postpone(exc)
            return
        if any(a.get("labels", {}).get("remediation") not in (None, "", "none") for a in firing):
            await journal.run(transition, rem.id, "CLOSED", "a remediation alert fires again for the "
                              "node; our cordon stays", now)
            return
    try:
        node = await engine.inventory.resolve(rem.node)
    except NodeNotFound:
        await journal.run(transition, rem.id, "CLOSED", "node gone; nothing to undo", now)
        return
    except InventoryUnavailable as exc:
        await postpone(exc)
        return
    if node.uid != rem.node_uid:
        await journal.run(transition, rem.id, "CLOSED", "node replaced; nothing to undo", now)
        return
    action = engine.actions["uncordon"]
    seq = await journal.run(begin_step, rem.id, rem.next_rung, action.name, False, Gates(False, 1 << 30, None), now)
    if isinstance(seq, str):
        await postpone(seq)
        return
    ctx = engine.context(rem, node, False)
    try:
        result = await action.run(ctx)
    except KubeApiError as exc:
        result = StepResult(Outcome.FAILURE, str(exc))
    ok = result.outcome == Outcome.SUCCESS
    await journal.run(finish_step, rem.id, seq, "SUCCEEDED" if ok else "FAILED", result.outcome.value,
                      result.detail, [c.as_dict() for c in ctx.kube.calls], engine.clock(), event=None,
                      advance=False, mark="clear" if ok else None)
    await journal.run(transition, rem.id, "CLOSED", "undone after the healthy delay" if ok else
                      f"undo failed: {result.detail}", engine.clock())
