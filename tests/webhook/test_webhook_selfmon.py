"""The remediator's own state, as rules/remediator.alerts.yaml reads it (docs/webhook-metrics-contract.md)."""

from __future__ import annotations

import time

import pytest

from remediation_webhook.errors import JournalError
from tests.webhook.webhook_support import alert, await_for, notification


async def test_a_new_webhook_counts_the_time_without_notifications_from_its_start(harness):
    before = time.time()
    h = await harness()
    assert before <= h.metric("gpu_remediation_webhook_last_notification_timestamp_seconds") <= time.time()


async def test_breaker_and_pause_say_since_when(harness, kube):
    kube.add_node("n1")
    h = await harness()
    assert h.metric("gpu_remediation_breaker_open_since_timestamp_seconds") == 0
    assert h.metric("gpu_remediation_paused_since_timestamp_seconds") == 0
    before = time.time()
    await h.post(notification(alert("n1"), truncated=3))  # trips the breaker
    await h.admin.post("/v1/pause", json={"reason": "maintenance"})
    await h.engine.refresh_gauges()
    assert h.metric("gpu_remediation_breaker_open") == 1
    assert before <= h.metric("gpu_remediation_breaker_open_since_timestamp_seconds") <= time.time()
    assert before <= h.metric("gpu_remediation_paused_since_timestamp_seconds") <= time.time()
    # A restarted webhook says the same: both are in the journal.
    await h.engine.stop()
    h.journal.close()
    h2 = await harness()
    assert before <= h2.metric("gpu_remediation_breaker_open_since_timestamp_seconds") <= time.time()
    assert h2.metric("gpu_remediation_paused") == 1
    await h2.admin.post("/v1/breaker:reset", json={"mode": "resume"})
    await h2.admin.delete("/v1/pause")
    await h2.engine.refresh_gauges()
    assert h2.metric("gpu_remediation_breaker_open_since_timestamp_seconds") == 0
    assert h2.metric("gpu_remediation_paused_since_timestamp_seconds") == 0


async def test_the_oldest_remediation_of_each_state_and_the_engine_tick(harness, kube):
    for n in ("n1", "n2"):
        kube.add_node(n)
    h = await harness(policy={"dry_run": False, "rules": [{"name": "gpu", "match_re": {"alertname": "GPU.*"},
                                                            "ladder": ["cordon"], "requires_approval": ["cordon"]}]},
                      safety={"fleet_cap": {"max_nodes": 4, "max_percent": 100}})
    await h.post(notification(alert("n1")))
    await h.until_state("n1", "AWAITING_APPROVAL")
    first = time.time()
    await h.post(notification(alert("n2")))
    await h.until_state("n2", "AWAITING_APPROVAL")
    await h.engine.refresh_gauges()
    since = h.metric("gpu_remediation_state_since_timestamp_seconds", state="AWAITING_APPROVAL")
    assert since is not None and since <= first  # the oldest one's
    assert h.metric("gpu_remediation_state_since_timestamp_seconds", state="BLOCKED") is None
    assert h.metric("gpu_remediation_remediations", state="AWAITING_APPROVAL") == 2
    for rid, in h.sql("SELECT id FROM remediation"):
        await h.admin.post(f"/v1/remediations/{rid}:cancel")
    await h.engine.refresh_gauges()
    assert h.metric("gpu_remediation_state_since_timestamp_seconds", state="AWAITING_APPROVAL") is None
    # The engine's loop stamps every pass (tick 50ms in these tests).
    tick = await await_for(lambda: h.metric("gpu_remediation_engine_last_tick_timestamp_seconds"), what="a tick")
    await await_for(lambda: h.metric("gpu_remediation_engine_last_tick_timestamp_seconds") > tick, what="next tick")


async def test_journal_errors_are_counted(harness):
    h = await harness()
    with pytest.raises(JournalError, match="no such table"):
        h.journal.run_sync(lambda conn: conn.execute("INSERT INTO no_such_table VALUES (1)"))
    assert h.journal.errors == 1
    await h.engine.refresh_gauges()
    assert h.metric("gpu_remediation_journal_errors_total") == 1
    h.journal.run_sync(lambda conn: None)  # a good transaction counts nothing
    await h.engine.refresh_gauges()
    assert h.metric("gpu_remediation_journal_errors_total") == 1
