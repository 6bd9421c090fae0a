"""An intent row without its completion: the process died in the middle of a step, or the Kubernetes API failed
in the middle of one that must not run twice. Read the node: a step that took effect is completed without being
repeated; an idempotent one is run again; a non-idempotent one whose effect cannot be observed goes to a human
(NEEDS_HUMAN). While the API cannot be read at all, nothing is decided: the remediation waits (BLOCKED)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from ..actions.base import Observation, Outcome, StepResult, held_by
from ..errors import InventoryError, InventoryUnavailable, KubeApiError, KubeUnavailable
from ..journal import Remediation, finish_step

if TYPE_CHECKING:
    from .core import Engine


async def run(engine: Engine, rem: Remediation, step: Any) -> bool:
    """True to go on driving the remediation."""
    action = engine.actions.get(step["action"])
    seq = int(step["seq"])
    if action is None or step["dry_run"]:
        await engine.journal.run(finish_step, rem.id, seq, "ABANDONED", "abandoned",
                                 "interrupted by a restart; re-run", [], engine.clock(), event=None, advance=False)
        return True
    ctx = dataclasses.replace(engine.context(rem, engine.saved_identity(rem), False),
                              step_started=float(step["started_at"]))
    try:
        seen = await action.observe(ctx)
    except (KubeUnavailable, InventoryUnavailable) as exc:
        # An outage is no answer: ask again later rather than hand a step to a person that the cluster can tell.
        await engine.park(rem, "BLOCKED", f"cannot read the cluster to reconcile {action.name} yet: {exc}")
        return False
    except KubeApiError as exc:
        if not action.idempotent:
            await engine.ambiguous(rem, seq, action.name, f"cannot read the node after a restart: {exc}", ctx)
            return False
        await engine.park(rem, "BLOCKED", f"cannot reconcile after a restart: {exc}")
        return False
    if seen == Observation.DONE:
        holds = False
        if action.name in ("cordon", "taint"):  # whether the cordon it left is ours: the node says
            try:
                holds = held_by((await engine.inventory.resolve(rem.node)).held_by, rem.id)
            except InventoryError:
                holds = False
        await engine.complete_step(rem, seq, action, ctx, StepResult(
            Outcome.SUCCESS, "reconciled after a restart: already done", holds=holds))
        return True
    if seen == Observation.AMBIGUOUS or (seen == Observation.UNKNOWN and not action.idempotent):
        await engine.ambiguous(rem, seq, action.name, "interrupted by a restart; the node cannot tell whether it "
                                                      "happened", ctx)
        return False
    await engine.journal.run(finish_step, rem.id, seq, "ABANDONED", "abandoned",
                             f"interrupted by a restart; observed {seen.value}; re-run",
                             [c.as_dict() for c in ctx.kube.calls], engine.clock(), event=None, advance=False)
    return True
