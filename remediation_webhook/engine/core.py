"""The executor: one asyncio task per node, driving its remediation rung by rung.

For each rung: the alert's own status in the journal (resolved: the plan is held), gates (pause, breaker, fleet
cap, rate limit), approval, verification against Alertmanager and the inventory (and that no person undid our
cordon meanwhile), then the intent row (committed), then the action, then the completion row, the metric and a
Kubernetes Event. On start, remediations left RUNNING with an open intent row are reconciled (reconcile.py).
Besides the remediations, every tick: the fleet-cap sweep (fleet.py) and the operand sweep (operands.py) at
each pool refresh, the settle check of condition alerts
(settle.py) and the gauges (gauges.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from gpu_health_common.logs import OnChange

from ..actions.base import Action, ActionContext, Outcome, StepResult, held_by
from ..alertmanager import AlertChecker, AlertState
from ..config import Config
from ..errors import (
    AlertmanagerUnavailable,
    InventoryUnavailable,
    JournalError,
    KubeApiError,
    KubeUnavailable,
    NodeNotFound,
)
from ..inventory.base import Inventory, NodeIdentity
from ..journal import (
    Gates,
    Journal,
    MetricEvent,
    Remediation,
    audit,
    begin_step,
    complete,
    drop_escalation,
    finish_step,
    get_meta,
    hold_remediation,
    know_node,
    load,
    mark_forged,
    occurrence,
    OVERFLOW_NODE,
    open_step,
    override,
    resolved_nodes,
    runnable,
    save_identity,
    source_occurrence,
    transition,
    unconfirmed,
)
from ..kube import KubeApi, RecordingKube
from ..metrics import Metrics
from ..models import Target, printable
from ..policy import metric_target, target_refusal
from ..safety import Verdict, gate_check, gates_for, verify
from . import fleet, gauges, operands, reconcile, replan, retention, settle, undo

log = logging.getLogger("remediation_webhook.engine")


class Engine:
    def __init__(self, config: Config, journal: Journal, inventory: Inventory, kube: KubeApi | None,
                 alertmanager: AlertChecker | None, metrics: Metrics, *,
                 actions: Mapping[str, Action] | None = None, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.config = config
        self.journal = journal
        self.inventory = inventory
        self.kube = kube
        self.alertmanager = alertmanager
        self.metrics = metrics
        self.actions = dict(actions if actions is not None else config.actions)
        self.clock = clock
        self.sleep = sleep
        self.pool: int | None = None
        self._pool_at = float("-inf")
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancelled: dict[str, str] = {}
        self._paused = False
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._prune_task: asyncio.Task[None] | None = None
        self._gauges_at = float("-inf")
        self.settling: set[str] = set()  # remediations whose settle check is in progress
        # Nodes the inventory resolved: only they get series of their own (others share the overflow series).
        self.known: set[str] = set()
        # When the last notification was journaled: kept in the journal by the gauge refresh (at most a second
        # late), so a restart does not reset it and accepting one costs no extra write.
        self.last_notification = 0.0

    # ------------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        from ..journal import restore_metrics

        counts, last = await self.journal.run(restore_metrics)
        self.metrics.restore(counts, last)
        self.known = set(await self.journal.run(resolved_nodes))
        self._paused = await self.journal.run(get_meta, "pause") is not None
        if await self.journal.run(get_meta, "last_notification") is None:
            # Never notified yet: a new webhook has GPURemediationNoNotifications' grace from its start on, not an
            # alert at once (the watchdog arrives within minutes when the route works).
            self.notified(self.clock())
        await self._refresh_pool(force=True)
        await self.refresh_gauges()
        self._loop_task = asyncio.create_task(self._loop(), name="engine")
        self._prune_task = asyncio.create_task(retention.run_forever(self), name="journal-retention")

    async def stop(self) -> None:
        tasks = [t for t in (self._loop_task, self._prune_task, *self._tasks.values()) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        try:
            await self.refresh_gauges()  # keeps the last notification's time in the journal
        except JournalError as exc:
            log.warning("could not save the engine's state at stop", extra={"error": str(exc)})
        if self.alertmanager is not None:
            await self.alertmanager.close()

    def wake(self) -> None:
        self._wake.set()

    def notified(self, at: float) -> None:
        self.last_notification = max(self.last_notification, at)
        self.metrics.last_notification.set(self.last_notification)

    def set_paused(self, paused: bool) -> None:
        self._paused = paused
        if not paused:
            self.wake()

    def cancel(self, rid: str, reason: str) -> None:
        self._cancelled[rid] = reason

    def busy(self, node: str) -> bool:
        """A task is driving the node's remediation right now (it decides for itself)."""
        return node in self._tasks

    async def idle(self, timeout: float = 30.0) -> None:
        """Wait until no remediation task is running (tests and benchmarks)."""
        deadline = time.monotonic() + timeout
        while self._tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def _loop(self) -> None:
        journal = OnChange(log, "journal unavailable; the engine waits for it",
                           "journal available again; the engine runs")  # not a traceback per tick
        while True:
            try:
                await self.schedule()
                self.metrics.engine_tick.set(self.clock())
                journal.ok()
            except asyncio.CancelledError:
                raise
            except JournalError as exc:
                journal.failed(exc)
            except Exception:
                log.exception("engine tick failed")
            try:
                await asyncio.wait_for(self._wake.wait(), self.config.engine.tick)
            except TimeoutError:
                pass
            self._wake.clear()

    async def schedule(self) -> None:
        await self._refresh_pool()
        now = self.clock()
        # While paused or tripped, only remediations with a step in flight (to reconcile it), holds that expire
        # and undos run: the backlog waits without costing anything.
        held = self._paused or await self.journal.run(get_meta, "breaker") is not None
        for rem in await self.journal.run(runnable, now):
            if rem.node in self._tasks or (held and rem.state in ("PLANNED", "BLOCKED")):
                continue
            task = asyncio.create_task(self._guarded(rem.id), name=f"remediation-{rem.node}")
            self._tasks[rem.node] = task
            task.add_done_callback(lambda _t, node=rem.node: self._tasks.pop(node, None))
        await settle.check(self)
        if time.monotonic() - self._gauges_at >= max(1.0, self.config.engine.tick):
            await self.refresh_gauges()

    async def refresh_gauges(self) -> None:
        self._gauges_at = time.monotonic()
        await gauges.refresh(self)

    async def _refresh_pool(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._pool_at < self.config.engine.pool_refresh:
            return
        self._pool_at = now
        try:
            self.pool = await self.inventory.pool_size(self.config.policy.targets.node_selector)
        except InventoryUnavailable as exc:
            log.warning("cannot size the node pool; percentage caps use the last size", extra={"error": str(exc)})
        await fleet.sweep(self)
        await operands.sweep(self)

    async def _guarded(self, rid: str) -> None:
        try:
            await self._drive(rid)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("remediation failed unexpectedly", extra={"remediation_id": rid})
            await self.journal.run(transition, rid, "BLOCKED", "internal error; retried on the next tick",
                                   self.clock(), expect=("PLANNED", "RUNNING", "BLOCKED"),
                                   not_before=self.clock() + self.config.engine.tick)

    # ---------------------------------------------------------------------------------------- one remediation

    def metric_event(self, rem: Remediation, action: str, result: str) -> MetricEvent | None:
        if action not in self.actions or self.actions[action].internal:
            return None
        if rem.node not in self.known:
            return OVERFLOW_NODE, "", "", action, result
        return (*metric_target(action, Target(rem.node, rem.gpu, rem.uuid)), action, result)

    def note(self, event: MetricEvent | None, at: float | None = None) -> None:
        """Count a finished action; `at`: the time the journal recorded for it (the restored gauges show that)."""
        if event is not None:
            self.metrics.action_finished(*event, self.clock() if at is None else at)

    async def park(self, rem: Remediation, state: str, reason: str, *, blocked_action: str = "",
                   expect: tuple[str, ...] | None = None) -> bool:
        """Move it to `state` (never out of a finished state: a person's cancel wins); True if it moved."""
        if rem.state == state and rem.reason == reason and state != "BLOCKED":
            return False
        terminal = state in ("REFUSED", "CANCELLED")
        event = self.metric_event(rem, blocked_action or rem.ladder[rem.target], "blocked") if terminal else None
        # A blocked remediation is looked at again after a tick, not in a busy loop.
        now = self.clock()
        later = now + self.config.engine.tick if state == "BLOCKED" else 0.0
        moved = await self.journal.run(transition, rem.id, state, reason, now, event=event, not_before=later,
                                       expect=expect)
        if moved:
            self.note(event, now)
            log.info("remediation %s", state.lower(), extra={"remediation_id": rem.id, "node": rem.node,
                                                              "reason": reason})
        if moved and terminal:
            await replan.twins(self, rem.id)  # it ends without acting: its alert's twin may be the real one
        return bool(moved)

    async def hold(self, rem: Remediation, why: str, *, unless_firing: bool = False) -> bool:
        held = await self.journal.run(hold_remediation, rem.id, self.clock(), self.config.policy.resolved_hold,
                                      "engine", why, unless_firing=unless_firing)
        if held:
            log.info("remediation held", extra={"remediation_id": rem.id, "node": rem.node, "reason": why})
        return bool(held)

    async def overridden(self, rem: Remediation, detail: str) -> None:
        moved, freed = await self.journal.run(override, rem.id, self.clock(), detail)
        if moved:
            self.metrics.overrides.inc()
            if freed:
                self.metrics.slot_releases.labels("overridden").inc()
            log.warning("remediation overridden by a person", extra={"remediation_id": rem.id, "node": rem.node,
                                                                     "detail": detail})
            await replan.twins(self, rem.id)

    async def _drive(self, rid: str) -> None:
        rem = await self.journal.run(load, rid)
        if rem is None:
            return
        if rem.state == "HEALTHY_DELAY":
            await undo.run(self, rem)
            return
        if rem.state == "HELD":
            # Expired only when its hold ran out: a task that was already on its way (the remediation was BLOCKED
            # on the fleet cap when its alert resolved) finds it HELD too, and must leave it (the fleet soak saw
            # such a plan cancelled at once instead of after resolved_hold).
            if rem.not_before <= self.clock():
                await self._expire(rem)
            return
        step = await self.journal.run(open_step, rid)
        if step is not None and not await reconcile.run(self, rem, step):
            return
        rem = await self.journal.run(load, rid)
        assert rem is not None
        if rem.node_uid is None and not await self._resolve(rem):
            return
        while True:
            rem = await self.journal.run(load, rid)
            assert rem is not None
            if rem.state not in ("PLANNED", "BLOCKED", "RUNNING"):
                return
            if rem.next_rung > rem.target:
                await self.journal.run(complete, rid, self.clock(), self.config.policy.settle_time)
                return
            if not await self._rung(rem):
                return

    async def _expire(self, rem: Remediation) -> None:
        # expect HELD: a resume that just came in wins.
        if await self.park(rem, "CANCELLED", f"its alert resolved and did not fire again within "
                                             f"{self.config.policy.resolved_hold:.0f}s (policy.resolved_hold)",
                           expect=("HELD",)):
            await replan.merged(self, rem.id)  # its merged alerts still fire: they need an owner

    async def _resolve(self, rem: Remediation) -> bool:
        try:
            node = await self.inventory.resolve(rem.node)
        except NodeNotFound:
            await self.park(rem, "REFUSED", "node not found in the inventory")
            return False
        except InventoryUnavailable as exc:
            await self.park(rem, "BLOCKED", f"inventory unavailable: {exc}")
            return False
        if rem.node not in self.known:  # a real node from now on: its actions get series of their own
            await self.journal.run(know_node, rem.node)
            self.known.add(rem.node)
        refusal = target_refusal(node, self.config.policy.targets)
        if refusal:
            await self.park(rem, "REFUSED", refusal)
            return False
        if node.created_at is not None and node.created_at > rem.starts_ts:
            await self.park(rem, "CANCELLED", "the node was created after the alert started: it is another machine")
            return False
        if rem.evidence is not None:
            # The journal counted by node name; the history must also be this machine's (one recreated under the
            # name by someone else, as an instance group's auto-heal does, starts again).
            why = await self.journal.run(unconfirmed, rem.node, rem.uuid, rem.evidence, self.clock(), rem.dry_run,
                                         node.created_at)
            if why:
                await self.park(rem, "REFUSED", why)
                return False
        await self.journal.run(save_identity, rem.id, node.uid, node.provider_id, node.created_at, self.clock())
        return True

    def _should_stop(self, rid: str) -> Callable[[], str | None]:
        def check() -> str | None:
            if rid in self._cancelled:
                return f"cancelled: {self._cancelled[rid]}"
            return "paused" if self._paused else None
        return check

    def context(self, rem: Remediation, node: NodeIdentity, dry_run: bool) -> ActionContext:
        # Without Kubernetes (a Slurm inventory) actions still get a recorder; every Kubernetes call through
        # it fails as unavailable, which only provider-backed actions can avoid.
        kube: KubeApi = self.kube if self.kube is not None else _NoKube()
        reason = printable(f"{rem.alertname} on {rem.node}: rule {rem.rule}, remediation {rem.id}", 500)
        return ActionContext(remediation_id=rem.id, node=node, target=Target(rem.node, rem.gpu, rem.uuid),
                             reason=reason, kube=RecordingKube(kube, dry_run=dry_run), dry_run=dry_run,
                             should_stop=self._should_stop(rem.id), sleep=self.sleep, clock=self.clock,
                             note=self._provider_event, hold_placed=rem.hold_placed and not dry_run)

    def _provider_event(self, provider: str, action: str, kind: str) -> None:
        self.metrics.provider_events.labels(provider, action, kind).inc()

    def saved_identity(self, rem: Remediation) -> NodeIdentity:
        return NodeIdentity(name=rem.node, uid=rem.node_uid or "", provider_id=rem.provider_id or "",
                            created_at=rem.node_created)

    async def source(self, rem: Remediation) -> tuple[str, Mapping[str, str] | None]:
        """The last status the journal saw for the remediation's own alert, and its labels ("", None if unknown)."""
        row = await self.journal.run(source_occurrence, rem)
        return (str(row["status"]), json.loads(row["labels_json"])) if row is not None else ("", None)

    async def _rung(self, rem: Remediation) -> bool:
        """Run the next rung; True to continue with the one after it."""
        status, labels = await self.source(rem)
        if status == "resolved":
            await self.hold(rem, "its alert resolved", unless_firing=True)
            return False
        name = rem.ladder[rem.next_rung]
        action = self.actions[name]
        gates = gates_for(action, self.config.safety, self.pool)
        why = await self.journal.run(gate_check, rem.id, name, rem.dry_run, gates, self.clock())
        if why:
            await self.park(rem, "BLOCKED", why)
            return False
        if name in rem.requires_approval and rem.next_rung not in rem.approvals and not rem.dry_run:
            await self.park(rem, "AWAITING_APPROVAL", f"{name} requires approval through the admin API")
            return False
        if rem.escalation is not None and rem.next_rung > rem.source_target:
            why = await self._escalation_stands(rem)
            if why is None:
                return False
            if why:
                await self.journal.run(drop_escalation, rem.id, self.clock(), why)
                return True  # on with the rungs its own alert asked for (or done)
        check = await verify(rem, self.inventory, self.alertmanager, retries=self.config.engine.verify_retries,
                             sleep=self.sleep, labels=labels)
        if check.verdict == Verdict.BLOCK:
            await self.park(rem, "BLOCKED", check.reason)
            return False
        if check.verdict == Verdict.HOLD:
            # Its alert may come back (an Alertmanager that lost it); a twin of it may be the real one meanwhile.
            if await self.hold(rem, check.reason):
                await replan.twins(self, rem.id)
            return False
        if check.verdict == Verdict.CANCEL:
            if check.alert == AlertState.MISMATCH:
                await self.journal.run(mark_forged, rem, self.clock(), check.reason)
            await self._cancel_step(rem, name, check.reason)
            if check.alert == AlertState.MISMATCH:
                await replan.merged(self, rem.id)  # its alert was not real: the alerts merged into it need an owner
            return False
        assert check.node is not None
        if rem.hold_placed and not rem.dry_run and check.node.held_by is not None \
                and not held_by(check.node.held_by, rem.id):
            await self.overridden(rem, f"someone else uncordoned {rem.node} (or removed our taint) before {name}; "
                                       f"the remediation stops and never cordons it again for this alert")
            return False
        started = await self.journal.run(begin_step, rem.id, rem.next_rung, name, rem.dry_run, gates, self.clock())
        if isinstance(started, str):
            await self.park(rem, "BLOCKED", started)
            return False
        return await self._execute(rem, started, action, check.node)

    async def _escalation_stands(self, rem: Remediation) -> str | None:
        """Before a rung another alert asked for (it raised this remediation's target when it merged): is that alert
        active in Alertmanager, with its labels? "" yes; None not now (parked BLOCKED); else why not."""
        assert rem.escalation is not None
        if self.alertmanager is None:
            return ""
        row = await self.journal.run(occurrence, rem.escalation)
        if row is None:
            return "the alert that raised the target is not in the journal"
        try:
            state = await self.alertmanager.state(rem.escalation[0], row["alertname"], rem.node,
                                                  json.loads(row["labels_json"]))
        except AlertmanagerUnavailable as exc:
            await self.park(rem, "BLOCKED", f"cannot verify the alert that raised the target: {exc}")
            return None
        if state == AlertState.ACTIVE:
            return ""
        if state in (AlertState.UNPROCESSED, AlertState.RESTARTED):
            await self.park(rem, "BLOCKED", f"the alert that raised the target is {state.value} in Alertmanager")
            return None
        return f"the alert that raised the target ({row['alertname']}) is {state.value} in Alertmanager"

    async def _cancel_step(self, rem: Remediation, name: str, reason: str) -> None:
        """A failed verification: journal a cancelled step, cancel the remediation, count it as blocked."""
        seq = await self.journal.run(begin_step, rem.id, rem.next_rung, name, rem.dry_run,
                                     Gates(False, 1 << 30, None), self.clock())
        if isinstance(seq, int):
            await self.journal.run(finish_step, rem.id, seq, "CANCELLED", "cancelled", reason, [], self.clock(),
                                   event=None, advance=False)
        await self.park(rem, "CANCELLED", reason, blocked_action=name)

    async def _execute(self, rem: Remediation, seq: int, action: Action, node: NodeIdentity) -> bool:
        ctx = self.context(rem, node, rem.dry_run)
        t0 = time.monotonic()
        try:
            result = await action.run(ctx)
        except (KubeUnavailable, InventoryUnavailable) as exc:
            if action.idempotent:
                await self.journal.run(finish_step, rem.id, seq, "ERROR", "error", f"transient: {exc}",
                                       [c.as_dict() for c in ctx.kube.calls], self.clock(), event=None, advance=False)
                await self.park(rem, "BLOCKED", f"kubernetes unavailable: {exc}")
                return False
            # The API failed in the middle of a step that must not run twice (a 500 on the reboot Job's create
            # may or may not have created it). The intent row stays open: before anything is repeated, the next
            # drive reads what happened (reconcile.py), once the API answers; only what cannot be read is a
            # human's.
            await self.park(rem, "BLOCKED", f"kubernetes unavailable during {action.name}; its outcome is read from "
                                            f"the cluster before anything is repeated: {exc}")
            return False
        except KubeApiError as exc:
            result = StepResult(Outcome.FAILURE, f"kubernetes refused: {exc}")
        self.metrics.step_seconds.labels(action.name, result.outcome.value).observe(time.monotonic() - t0)
        return await self.complete_step(rem, seq, action, ctx, result)

    async def complete_step(self, rem: Remediation, seq: int, action: Action, ctx: ActionContext,
                            result: StepResult) -> bool:
        if result.outcome == Outcome.INTERRUPTED:
            await self.journal.run(finish_step, rem.id, seq, "CANCELLED", "interrupted", result.detail,
                                   [c.as_dict() for c in ctx.kube.calls], self.clock(), event=None, advance=False)
            if rem.id in self._cancelled:
                return False
            await self.park(rem, "BLOCKED", "paused")
            return False
        if result.outcome == Outcome.OVERRIDDEN:
            await self.journal.run(finish_step, rem.id, seq, "CANCELLED", "overridden", result.detail,
                                   [c.as_dict() for c in ctx.kube.calls], self.clock(), event=None, advance=False)
            await self.overridden(rem, result.detail)
            return False
        await self._node_event(rem, seq, action.name, ctx, result)
        ok = result.outcome in (Outcome.SUCCESS, Outcome.DRY_RUN)
        event = self.metric_event(rem, action.name, result.outcome.value)
        state = {Outcome.SUCCESS: "SUCCEEDED", Outcome.DRY_RUN: "DRY_RUN", Outcome.FAILURE: "FAILED"}[result.outcome]
        # The node holds a slot of the fleet cap while it carries our cordon (in flight, it holds one anyway).
        mark = "set" if ok and action.cordons and not rem.dry_run and (result.holds or rem.hold_placed) else None
        finished = self.clock()
        await self.journal.run(finish_step, rem.id, seq, state, result.outcome.value, result.detail,
                               [c.as_dict() for c in ctx.kube.calls], finished, event=event, advance=ok,
                               mark=mark, holds=result.holds and ok and not rem.dry_run)
        self.note(event, finished)
        log.info("step finished", extra={"remediation_id": rem.id, "node": rem.node, "action": action.name,
                                         "outcome": result.outcome.value, "detail": result.detail})
        if not ok and result.fallback and await self._fall_back(rem, action.name, result.detail):
            return True
        if not ok:
            await self.journal.run(transition, rem.id, "FAILED", f"{action.name} failed: {result.detail}; "
                                   f"escalated to a human", self.clock())
        if ok and result.needs_human and not rem.dry_run:
            await self.journal.run(transition, rem.id, "NEEDS_HUMAN", f"{action.name}: {result.detail}", self.clock())
            return False
        return ok

    async def _fall_back(self, rem: Remediation, failed: str, detail: str) -> bool:
        """A rung that says "fall back" failed: run the rule's next rung (reset_gpu -> reboot), extending the
        remediation's ladder when the alert asked for no more. True when there is a next rung to run."""
        rule = next((r for r in self.config.policy.rules if r.name == rem.rule), None)
        nxt = rem.next_rung + 1
        if nxt < len(rem.ladder):
            ladder = rem.ladder
        elif rule is not None and rule.ladder[: len(rem.ladder)] == rem.ladder and nxt < len(rule.ladder):
            ladder = rule.ladder[: nxt + 1]
        else:
            return False
        self.metrics.provider_events.labels("engine", failed, "fallback").inc()
        await self.journal.run(_fallback_row, rem.id, ladder, nxt, failed, ladder[nxt], detail, self.clock())
        log.warning("falling back to the next rung", extra={"remediation_id": rem.id, "node": rem.node,
                                                             "action": failed, "next": ladder[nxt]})
        return True

    async def ambiguous(self, rem: Remediation, seq: int, action: str, detail: str, ctx: ActionContext | None) -> None:
        calls = [c.as_dict() for c in ctx.kube.calls] if ctx else []
        await self.journal.run(finish_step, rem.id, seq, "AMBIGUOUS", "unknown", detail, calls, self.clock(),
                               event=None, advance=False)
        await self.journal.run(transition, rem.id, "NEEDS_HUMAN",
                               f"{action} may or may not have happened and cannot safely be repeated: {detail}",
                               self.clock())

    async def _node_event(self, rem: Remediation, seq: int, action: str, ctx: ActionContext,
                          result: StepResult) -> None:
        ns = self.config.kubernetes.event_namespace if self.config.kubernetes else "default"
        now = datetime.fromtimestamp(self.clock(), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        name = re.sub(r"[^a-z0-9.-]", "-", f"{rem.node[:200]}.{rem.id[:12]}.{seq}")
        body: dict[str, Any] = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": name, "namespace": ns, "labels": {"gpu-health.io/remediation-id": rem.id}},
            "involvedObject": {"apiVersion": "v1", "kind": "Node", "name": rem.node, "uid": ctx.node.uid},
            "reason": "GPURemediation" + "".join(p.capitalize() for p in action.split("_")),
            "message": printable(f"{action} {result.outcome.value}: {result.detail} ({ctx.reason})", 1000),
            "type": "Normal" if result.outcome != Outcome.FAILURE else "Warning",
            "source": {"component": "gpu-health-webhook"}, "reportingComponent": "gpu-health-webhook",
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        try:
            await ctx.kube.create_event(ns, body)
        except KubeApiError as exc:
            log.warning("could not create the node Event", extra={"node": rem.node, "error": str(exc)})


def _fallback_row(conn: Any, rid: str, ladder: tuple[str, ...], nxt: int, failed: str, to: str, detail: str,
                  now: float) -> None:
    """Advance past the failed rung and, if needed, raise the target to the next rung (journal + audit)."""
    import json

    # The next rung is the remediation's own (its alert's fault still stands), not another alert's escalation.
    conn.execute("UPDATE remediation SET next_rung=?, target=MAX(target, ?), source_target=MAX(source_target, ?), "
                 "ladder_json=?, updated_at=? WHERE id=?", (nxt, nxt, nxt, json.dumps(list(ladder)), now, rid))
    audit(conn, now, "engine", "fallback", rid, None, failed=failed, to=to, detail=detail[:500])


class _NoKube:
    """The KubeApi of a deployment without Kubernetes: every call is unavailable."""

    async def _no(self, *args: Any, **kwargs: Any) -> Any:
        raise KubeUnavailable(0, "NoKubernetes", "no kubernetes: section configured")

    read_node = list_nodes = patch_node = list_pods_on_node = evict_pod = delete_pod = create_event = _no

    async def ping(self) -> None:
        await self._no()

    def close(self) -> None:
        return None
