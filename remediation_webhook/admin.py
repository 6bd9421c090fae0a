"""The admin API, on its own listener with its own credentials. Every change is audited with its actor.

GET  /v1/remediations?state=&node=&since=&limit=     list
GET  /v1/remediations/{id}                            one, with steps, occurrences and audit trail
POST /v1/remediations/{id}:approve | /{id}/approve    let an AWAITING_APPROVAL step run
POST /v1/remediations/{id}:cancel  | /{id}/cancel     cancel an unfinished remediation
POST /v1/pause, DELETE /v1/pause (= POST /v1/resume)  the global kill switch (checked before every step)
GET  /v1/breaker; POST /v1/breaker:reset {"mode": "resume"|"skip-backlog", "reason": "..."}
     resume: the backlog runs (each step still verified). skip-backlog: the backlog is cancelled, and a firing
     alert that began at or before the reset (the same storm, delivered late by Alertmanager or still pending in
     Prometheus at the reset) is refused, journaled and audited, and counted as blocked, without a remediation.
     Its fault_timestamp, when it has one, decides (the same fault firing again after a Prometheus restart is still
     the storm's); without one, it is acted on once it resolves and fires again; an alert that begins after the
     reset acts.
     The cut-off is GET /v1/breaker's "skip_before" (Unix seconds); it survives restarts, a later skip-backlog
     reset moves it, a resume reset keeps it.
GET  /v1/slots                                        nodes holding a slot of the fleet cap (our cordon, in flight)
POST /v1/slots/{node}:release | /{node}/release        give a node's slot back by hand (the node is left as it is);
     409 while an unfinished, started remediation holds the node (cancel it first)
GET  /v1/policy                                       the effective policy and its hash
POST /v1/evaluate                                     plan a pasted Alertmanager payload; acts on nothing
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from gpu_health_common.serving import read_body

from . import journal as j
from .actions.base import Outcome
from .app import SERVICES, Services, judge_all
from .auth import ACTOR, middleware as auth_middleware
from .config import effective_policy
from .engine import replan
from .errors import InventoryError, JournalError, KubeApiError, PayloadError
from .kube import RecordingKube
from .models import Target, parse_notification, valid_node_name
from .policy import target_refusal

_ID = "[0-9a-f]{32}"
log = logging.getLogger(__name__)


def _actor(request: web.Request) -> str:
    return str(request.get(ACTOR, "anonymous"))


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        data = json.loads(await read_body(request, request.app[SERVICES].config.admin.limits))
    except ValueError as exc:
        raise web.HTTPBadRequest(text="body is not valid JSON\n") from exc
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text="body must be a JSON object\n")
    return data


def _reason(body: dict[str, Any]) -> str:
    reason = body.get("reason", "")
    if not isinstance(reason, str):
        raise web.HTTPBadRequest(text="reason must be a string\n")
    return reason[:1000]


async def list_remediations(request: web.Request) -> web.Response:
    s = request.app[SERVICES]
    q = request.query
    try:
        since = float(q.get("since", "0"))
        limit = max(1, min(int(q.get("limit", "100")), 1000))
    except ValueError as exc:
        raise web.HTTPBadRequest(text="since and limit must be numbers\n") from exc
    items = await s.journal.run(j.list_remediations, q.get("state", ""), q.get("node", ""), since, limit)
    return web.json_response({"remediations": items})


async def show_remediation(request: web.Request) -> web.Response:
    s = request.app[SERVICES]
    item = await s.journal.run(j.detail, request.match_info["id"])
    if item is None:
        raise web.HTTPNotFound(text="no such remediation\n")
    return web.json_response(item)


async def remediation_verb(request: web.Request) -> web.Response:
    s = request.app[SERVICES]
    rid, verb = request.match_info["id"], request.match_info["verb"]
    reason = _reason(await _body(request))
    now = time.time()
    if verb == "approve":
        error = await s.journal.run(j.approve, rid, _actor(request), now, reason)
    else:
        rem = await s.journal.run(j.load, rid)
        event = None
        if rem is not None and rem.state in j.ACTIVE:
            action = rem.ladder[min(rem.next_rung, rem.target)]
            event = s.engine.metric_event(rem, action, "blocked")
        s.engine.cancel(rid, reason or "by the admin API")
        error = await s.journal.run(j.cancel, rid, _actor(request), now, reason, event)
        if not error and event is not None:
            s.metrics.action_finished(*event, now)
        if not error:
            await replan.twins(s.engine, rid)  # a conflict twin of its alert may be the real one
    if error == "not found":
        raise web.HTTPNotFound(text="no such remediation\n")
    if error:
        raise web.HTTPConflict(text=error + "\n")
    s.engine.wake()
    return web.json_response(await s.journal.run(j.detail, rid))


async def _set_paused(request: web.Request, paused: bool) -> web.Response:
    s = request.app[SERVICES]
    reason = _reason(await _body(request))
    await s.journal.run(j.set_pause, paused, _actor(request), time.time(), reason)
    s.engine.set_paused(paused)
    s.metrics.paused.set(int(paused))
    return web.json_response({"paused": paused})


async def pause(request: web.Request) -> web.Response:
    return await _set_paused(request, True)


async def resume(request: web.Request) -> web.Response:
    return await _set_paused(request, False)


async def breaker(request: web.Request) -> web.Response:
    s = request.app[SERVICES]
    status = await s.journal.run(j.breaker_status, time.time(), s.config.safety.breaker, s.engine.pool)
    status["paused"] = await s.journal.run(j.get_meta, "pause")
    return web.json_response(status)


async def breaker_reset(request: web.Request) -> web.Response:
    s = request.app[SERVICES]
    body = await _body(request)
    mode = body.get("mode")
    if mode not in ("resume", "skip-backlog"):
        raise web.HTTPBadRequest(text='mode must be "resume" or "skip-backlog"\n')
    reason = _reason(body)
    now = time.time()

    def blocked(rem: j.Remediation) -> j.MetricEvent | None:
        return s.engine.metric_event(rem, rem.ladder[min(rem.next_rung, rem.target)], "blocked")

    out = await s.journal.run(j.reset_breaker, mode, _actor(request), now, reason, blocked)
    if mode == "skip-backlog":
        for rid in out["skipped"]:
            rem = await s.journal.run(j.load, rid)
            if rem is not None:
                ev = blocked(rem)
                if ev is not None:
                    s.metrics.action_finished(*ev, now)
            await replan.twins(s.engine, rid)
    s.metrics.breaker_open.set(0)
    s.engine.wake()
    return web.json_response(out)


async def policy(request: web.Request) -> web.Response:
    return web.json_response(effective_policy(request.app[SERVICES].config))


async def evaluate(request: web.Request) -> web.Response:
    """Plan a pasted payload exactly as the receiver would, reading live state; writes and journals nothing."""
    s = request.app[SERVICES]
    try:
        notification = parse_notification(json.loads(await read_body(request, s.config.admin.limits)))
    except (ValueError, RecursionError, PayloadError) as exc:
        msg = str(exc) if isinstance(exc, PayloadError) else "body is not valid JSON"
        return web.json_response({"error": msg}, status=400)
    now = time.time()
    paused = await s.journal.run(j.get_meta, "pause") is not None
    breaker_open = await s.journal.run(j.get_meta, "breaker") is not None
    skip = j.skip_cutoff(await s.journal.run(j.get_meta, "breaker_reset"))
    plans = []
    for jd in judge_all(notification, s.config, datetime.fromtimestamp(now, UTC)):
        a = jd.alert
        plan: dict[str, Any] = {"fingerprint": a.fingerprint, "startsAt": a.starts_key, "status": a.status,
                                "decision": jd.decision, "reason": jd.reason}
        if isinstance(jd.target, Target):
            plan["node"] = jd.target.node
        if jd.decision == "plan" and isinstance(jd.target, Target):
            plan.update({"rule": jd.rule.name if jd.rule else "", "ladder": list(jd.ladder), "dry_run": jd.dry_run,
                         "paused": paused, "breaker_open": breaker_open})
            skipped = j.storm_skip_reason(skip, a.starts_at.timestamp(), jd.fault_ts)
            journal_says = await s.journal.run(_journal_verdict, jd, now)
            if skipped:
                plan["refused"] = skipped
            elif journal_says:
                plan.update(journal_says)
            else:
                plan.update(await _plan_calls(s, jd.target, list(jd.ladder)))
        plans.append(plan)
    return web.json_response({"policy_hash": s.config.policy_hash, "alerts": plans})


def _journal_verdict(conn: Any, jd: Any, now: float) -> dict[str, str]:
    """What the journal would say before any call: already remediated, or an escalation it does not confirm."""
    t = jd.target
    if jd.fault_ts is not None:
        fix = j.last_fix(conn, t.node, t.uuid, jd.ladder[-1], jd.dry_run)
        if fix is not None and fix.covers(jd.fault_ts):
            return {"already_remediated": fix.reason(jd.fault_ts)}
    if jd.evidence is not None:
        why = j.unconfirmed(conn, t.node, t.uuid, jd.evidence, now, jd.dry_run)
        if why:
            return {"refused": why}
    return {}


async def slots(request: web.Request) -> web.Response:
    s = request.app[SERVICES]
    held = await s.journal.run(j.slots)
    return web.json_response({"fleet_cap": s.config.safety.fleet_cap(s.engine.pool), "held": held})


async def release_slot(request: web.Request) -> web.Response:
    s = request.app[SERVICES]
    node = request.match_info["node"]
    if not valid_node_name(node):
        raise web.HTTPBadRequest(text="not a node name\n")
    error = await s.journal.run(j.release_slot, node, _actor(request), time.time(), _reason(await _body(request)))
    if error == "not found":
        raise web.HTTPNotFound(text=f"{node} holds no slot of ours\n")
    if error:
        raise web.HTTPConflict(text=error + "\n")
    s.metrics.slot_releases.labels("admin").inc()
    s.engine.wake()
    return web.json_response({"released": node, "held": await s.journal.run(j.slots)})


async def _plan_calls(s: Services, target: Target, ladder: list[str]) -> dict[str, Any]:
    from .actions.base import ActionContext

    try:
        node = await s.engine.inventory.resolve(target.node)
    except InventoryError as exc:
        return {"node_error": str(exc)}
    refusal = target_refusal(node, s.config.policy.targets)
    if refusal:
        return {"refused": refusal}
    steps = []
    if s.engine.kube is None:
        return {"steps": [{"action": a} for a in ladder]}
    for name in ladder:
        kube = RecordingKube(s.engine.kube, dry_run=True)
        ctx = ActionContext(remediation_id="0" * 32, node=node, target=target, reason="evaluate", kube=kube,
                            dry_run=True, should_stop=lambda: None, sleep=_no_sleep, clock=time.time)
        try:
            result = await s.config.actions[name].run(ctx)
            outcome = result.outcome.value if result.outcome != Outcome.DRY_RUN else "would_run"
            steps.append({"action": name, "outcome": outcome, "detail": result.detail,
                          "calls": [c.as_dict() for c in kube.calls]})
        except KubeApiError as exc:
            steps.append({"action": name, "error": str(exc), "calls": [c.as_dict() for c in kube.calls]})
    return {"node_identity": {"uid": node.uid, "providerID": node.provider_id}, "steps": steps}


async def _no_sleep(_: float) -> None:
    return None


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


@web.middleware
async def journal_unavailable(request: web.Request, handler: Any) -> web.StreamResponse:
    """A journal that cannot commit (a full disk) is a 503 with one log line, not a traceback per request."""
    try:
        return await handler(request)
    except JournalError as exc:
        log.error("journal unavailable; admin request refused", extra={"path": request.path, "error": str(exc)})
        return web.json_response({"error": "journal unavailable"}, status=503, headers={"Retry-After": "10"})


def create_admin_app(services: Services) -> web.Application:
    listener = services.config.admin
    app = web.Application(client_max_size=services.config.web.max_body_bytes,
                          middlewares=[auth_middleware(listener, open_paths=frozenset({"/healthz"}),
                                                       realm="gpu-health-webhook-admin"), journal_unavailable])
    app[SERVICES] = services
    r = app.router
    r.add_get("/healthz", healthz)
    r.add_get("/v1/remediations", list_remediations)
    r.add_get(f"/v1/remediations/{{id:{_ID}}}", show_remediation)
    r.add_post(f"/v1/remediations/{{id:{_ID}}}:{{verb:approve|cancel}}", remediation_verb)
    r.add_post(f"/v1/remediations/{{id:{_ID}}}/{{verb:approve|cancel}}", remediation_verb)
    r.add_post("/v1/pause", pause)
    r.add_delete("/v1/pause", resume)
    r.add_post("/v1/resume", resume)
    r.add_get("/v1/breaker", breaker)
    r.add_post("/v1/breaker:reset", breaker_reset)
    r.add_post("/v1/breaker/reset", breaker_reset)
    r.add_get("/v1/slots", slots)
    r.add_post("/v1/slots/{node:[^/:]+}:release", release_slot)
    r.add_post("/v1/slots/{node:[^/:]+}/release", release_slot)
    r.add_get("/v1/policy", policy)
    r.add_post("/v1/evaluate", evaluate)
    return app
