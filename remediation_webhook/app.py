"""The receiver: POST /v1/alerts (Alertmanager v4 body), GET /healthz, /readyz, /metrics.

Accept path: parse strictly, judge every alert by its own status with the (pure) policy, journal the
occurrences and planned remediations in one group-committed transaction, answer 200, wake the engine.
400 for a malformed body, 401 without valid credentials, 408 for a body not sent within the read timeout, 413 over
the body limit, 503 when the journal cannot commit or when web.max_bytes_in_flight stayed full for the read timeout
(with Retry-After). Policy refusals are 200 and journaled: Alertmanager must not retry them.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiohttp import web

from gpu_health_common.serving import ByteBudget, Counters, Overloaded, read_body

from .auth import middleware as auth_middleware
from .config import Config
from .engine import Engine
from .errors import InventoryError, JournalError, PayloadError
from .intake import alert_in
from .journal import AcceptIn, Journal, accept, ping
from .metrics import CONTENT_TYPE, Metrics
from .models import Notification, parse_notification
from .policy import Judgement, judge

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Services:
    config: Config
    journal: Journal
    engine: Engine
    metrics: Metrics
    http: Counters = field(default_factory=Counters)  # what the listeners' limits turned away


SERVICES = web.AppKey("services", Services)
BUDGET = web.AppKey("budget", ByteBudget)


def judge_all(notification: Notification, config: Config, now: datetime) -> list[Judgement]:
    return [judge(a, config.policy, now) for a in notification.alerts]


async def receive(request: web.Request) -> web.Response:
    s = request.app[SERVICES]
    listener = s.config.web
    # Charged before a byte of the body is read, released after the journal answered: a flood of large
    # notifications waits here (its bodies in the kernel's socket buffers) instead of in our memory.
    size = request.content_length if request.content_length is not None else listener.max_body_bytes
    if size > listener.max_body_bytes:
        s.metrics.requests.labels("413").inc()
        raise web.HTTPRequestEntityTooLarge(max_size=listener.max_body_bytes, actual_size=size)
    try:
        async with request.app[BUDGET].hold(size, listener.limits.read_timeout):
            return await _receive(request, s)
    except Overloaded as exc:
        log.warning("too many request bytes in flight; answering 503 so Alertmanager retries",
                    extra={"error": str(exc)})
        s.metrics.requests.labels("503").inc()
        return web.json_response({"error": "overloaded: too many notifications in flight, retry later"},
                                 status=503, headers={"Retry-After": "5"})


async def _receive(request: web.Request, s: Services) -> web.Response:
    t0 = time.perf_counter()
    try:
        body = await read_body(request, s.config.web.limits, s.http)
    except web.HTTPRequestEntityTooLarge:
        s.metrics.requests.labels("413").inc()
        raise
    except web.HTTPRequestTimeout:
        s.metrics.requests.labels("408").inc()
        raise
    try:
        notification = parse_notification(json.loads(body))
    except (ValueError, RecursionError, PayloadError) as exc:
        s.metrics.requests.labels("400").inc()
        msg = str(exc) if isinstance(exc, PayloadError) else "body is not valid JSON"
        return web.json_response({"error": msg}, status=400)
    now = time.time()
    judgements = judge_all(notification, s.config, datetime.fromtimestamp(now, UTC))
    batch = AcceptIn(alerts=tuple(alert_in(j) for j in judgements), group_key=notification.group_key,
                     truncated=notification.truncated_alerts, now=now, pool=s.engine.pool,
                     policy_hash=s.config.policy_hash, safety=s.config.safety, hold=s.config.policy.resolved_hold)
    try:
        result = await s.journal.run(accept, batch)
    except JournalError as exc:
        log.error("journal unavailable; answering 503 so Alertmanager retries", extra={"error": str(exc)})
        s.metrics.requests.labels("503").inc()
        return web.json_response({"error": "journal unavailable"}, status=503)
    s.metrics.accept_seconds.observe(time.perf_counter() - t0)
    s.metrics.requests.labels("200").inc()
    s.engine.notified(now)
    for decision, n in result.decisions().items():
        if n:
            s.metrics.alerts.labels(decision).inc(n)
    if result.duplicates:
        s.metrics.duplicates.inc(result.duplicates)
    if notification.truncated_alerts:
        s.metrics.truncated.inc(notification.truncated_alerts)
    if result.breaker_tripped:
        s.metrics.breaker_trips.inc()
        s.metrics.breaker_open.set(1)
        log.warning("circuit breaker tripped", extra={"reason": result.breaker_tripped})
    for event in result.metric_events:
        s.metrics.action_finished(*event, now)
    if result.conflicts:
        log.warning("alerts reuse the fingerprint of another alert with other labels (forged or corrupted); they "
                    "wait for Alertmanager's word", extra={"conflicts": result.conflicts})
    if result.remediation_ids or result.undo_scheduled or result.breaker_tripped:
        s.engine.wake()
    return web.json_response(result.as_dict())


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    s = request.app[SERVICES]
    problems = []
    try:
        await s.journal.run(ping, time.time())
    except JournalError as exc:
        problems.append(f"journal: {exc}")
    try:
        await s.engine.inventory.ready()
    except InventoryError as exc:
        problems.append(f"inventory {s.engine.inventory.kind}: {exc}")
    if problems:
        return web.Response(status=503, text="\n".join(problems) + "\n")
    return web.Response(text="ready\n")


async def metrics(request: web.Request) -> web.Response:
    s = request.app[SERVICES]
    return web.Response(body=s.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


def create_app(services: Services) -> web.Application:
    listener = services.config.web
    app = web.Application(
        client_max_size=listener.max_body_bytes,
        middlewares=[auth_middleware(listener, open_paths=frozenset({"/healthz", "/readyz"}),
                                     realm="gpu-health-webhook")])
    app[SERVICES] = services
    app[BUDGET] = ByteBudget(listener.max_bytes_in_flight)
    app.router.add_post("/v1/alerts", receive)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
