"""The sweep that gives GPU Operator operands back to nodes where a reset of ours paused them and no longer will.

At every pool refresh the nodes carrying our pause label are read (actions/_operands.py). One whose remediation
still has its reset step open is left alone: that step, or its re-run after a restart, puts them back. So is one
whose reset Job still runs (restoring would start the device plugin in the middle of the reset). Every other pause
(the remediation finished, was cancelled or interrupted, or the journal never heard of it) is undone now, journaled
in the audit log and counted. The gauges feed GPURemediationOperandsPausedTooLong.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..actions._operands import LABEL_PAUSED, Paused, paused, restore_patch
from ..errors import KubeApiError, KubeNotFound
from ..executor import job_name, job_state
from ..journal import TERMINAL, audit, load, open_step

if TYPE_CHECKING:
    from .core import Engine

log = logging.getLogger("remediation_webhook.engine")


async def sweep(engine: Engine) -> None:
    if engine.kube is None:
        return
    try:
        nodes = await engine.kube.list_nodes(LABEL_PAUSED)
    except KubeApiError as exc:
        log.warning("cannot list nodes with paused GPU Operator operands", extra={"error": str(exc)})
        return
    still: dict[str, float] = {}
    for node in nodes:
        mark = paused(node)
        if mark is None:
            continue
        name = str(node["metadata"]["name"])
        why = "its remediation is running" if engine.busy(name) else await _leave(engine, mark)
        restore = restore_patch(node)
        if why or restore is None or engine.busy(name):
            still[name] = mark.at  # 0 when unreadable: the alert names the node at once
            continue
        patch, back, kept = restore
        try:
            await engine.kube.patch_node(name, patch)
        except KubeApiError as exc:
            log.warning("cannot restore GPU Operator operands", extra={"node": name, "error": str(exc)})
            still[name] = mark.at
            continue
        engine.metrics.operand_restores.inc()
        rid = mark.remediation if mark.readable else None
        await engine.journal.run(audit, engine.clock(), "engine", "operands_restored", rid, name,
                                 restored=back, left=kept, paused_by=mark.remediation)
        log.warning("GPU Operator operands restored by the sweep",
                    extra={"node": name, "remediation": mark.remediation, "restored": back, "left": kept})
    engine.metrics.operands_paused.set(len(still))
    engine.metrics.operands_paused_since.clear()
    for name, at in still.items():
        engine.metrics.operands_paused_since.labels(name).set(at)


async def _leave(engine: Engine, mark: Paused) -> str:
    """Why the pause must stay for now ("" to restore it)."""
    rem = await engine.journal.run(load, mark.remediation) if mark.readable else None
    if rem is not None and rem.state not in TERMINAL:
        step = await engine.journal.run(open_step, rem.id)
        if step is not None and step["action"] == "reset_gpu":
            return "its reset step is open"
    executor: Any = getattr(engine.actions.get("reset_gpu"), "executor", None)
    if executor is None or not mark.remediation:
        return ""
    try:
        job = await executor.api.read_job(executor.settings.namespace, job_name("reset_gpu", mark.remediation))
    except KubeNotFound:
        return ""
    except KubeApiError as exc:
        return f"cannot read its Job: {exc}"
    return "its Job still runs" if job_state(job)[0] == "running" else ""
