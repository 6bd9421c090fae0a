"""Growth without bound (issue 14, problem 3): metric series for node names nobody resolved, a journal never
pruned, labels of alerts that ask for nothing kept whole, and request bodies held in memory without a bound."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import pytest

from remediation_webhook.app import BUDGET
from remediation_webhook.config import build_config
from remediation_webhook.engine import retention
from remediation_webhook.errors import ConfigError
from tests.webhook.webhook_support import alert, base_config, notification

DAY = 86400.0
# A storm this size would trip the breaker and fill the fleet cap; these tests are about what is kept.
SAFETY = {"breaker": {"max_nodes": 10_000, "max_percent": 100, "min_nodes": 10_000},
          "fleet_cap": {"max_nodes": 10, "max_percent": 100}, "per_node": {"cooldown": "0s", "max_attempts": 10}}


def _series(h, name: str) -> list[dict[str, str]]:
    return [s.labels for m in h.services.metrics.registry.collect() for s in m.samples if s.name == name]


def _samples(h, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for m in h.services.metrics.registry.collect()
            for s in m.samples if s.name == name}


async def test_thousands_of_unknown_node_names_make_one_overflow_series(harness, kube, tmp_path):
    kube.add_node("real")
    h = await harness(safety=SAFETY)
    await h.post(notification(alert("real")))
    await h.until_state("real", "SUCCEEDED")
    # 6,000 valid names the inventory has never heard of, in six deliveries of Alertmanager's size
    for part in range(6):
        body = notification(*(alert(f"ghost-{part}-{i}", alertname="DiskFull") for i in range(1000)))
        body["groupKey"] = f'{{}}:{{part="{part}"}}'
        assert (await h.post(body)).status == 200
    nodes = {s["node"] for s in _series(h, "gpu_remediation_actions_total")}
    assert nodes == {"real", "_unresolved"}
    assert h.metric("gpu_remediation_actions_total", node="_unresolved", gpu="", uuid="", action="cordon",
                    result="blocked") == 6000
    before = _samples(h, "gpu_remediation_actions_total")
    assert len(h.services.metrics.render()) < 64 * 1024
    # a restart reloads the same few series
    await h.engine.stop()
    h.journal.close()
    h2 = await harness(safety=SAFETY)
    assert _samples(h2, "gpu_remediation_actions_total") == before


async def test_a_node_refused_after_the_inventory_resolved_it_keeps_its_own_series(harness, kube):
    kube.add_node("n1", labels={"gpu-health.io/remediation-opt-out": "true"})
    h = await harness(safety=SAFETY)
    await h.post(notification(alert("n1")))
    await h.until_state("n1", "REFUSED")
    assert h.metric("gpu_remediation_actions_total", node="n1", gpu="", uuid="", action="cordon",
                    result="blocked") == 1


async def test_labels_of_an_alert_that_asks_for_nothing_are_stored_truncated(harness, kube):
    h = await harness(safety=SAFETY)
    noisy = alert("n1", alertname="DiskFull", **{f"l{i}": "v" * 4000 for i in range(100)})
    assert (await h.post(notification(noisy))).status == 200
    (stored,) = h.sql("SELECT labels_json FROM occurrence")[0]
    assert len(stored) < 64 * 300  # at most 64 labels of 256 characters, against 400 kB sent


def _age(h, days: float) -> None:
    """Let `days` pass for the engine (its clock is what retention cuts by)."""
    h.engine.clock = lambda: time.time() + days * DAY


async def _work(h, kube) -> None:
    """Two successful remediations on n1 (released since), one refused on a node that is not there, one still
    waiting on n3 (paused), one whose cordon we still hold on n4, and many alerts that ask for nothing."""
    for n in ("n1", "n3", "n4"):
        kube.add_node(n)
    for fp in ("01", "02"):
        await h.post(notification(alert("n1", fingerprint=fp)))
        await h.until_state("n1", "SUCCEEDED")
        kube.uncordon("n1")
        await h.engine._refresh_pool(force=True)  # the sweep sees a person uncordoned it
        assert not h.sql("SELECT 1 FROM node_mark WHERE node='n1'")
    await h.post(notification(alert("gone")))
    await h.until_state("gone", "REFUSED")
    await h.post(notification(alert("n4")))
    await h.until_state("n4", "SUCCEEDED")
    for part in range(20):
        body = notification(*(alert(f"x{part}-{i}", alertname="DiskFull", text="y" * 200) for i in range(200)))
        body["groupKey"] = f'{{}}:{{part="{part}"}}'
        await h.post(body)
    assert (await h.admin.post("/v1/pause", json={"reason": "test"})).status == 200
    await h.post(notification(alert("n3")))
    await h.settle()
    assert h.states()["n3"] == "PLANNED"


def _size(path: str) -> int:
    return sum(os.path.getsize(p) for p in (path, f"{path}-wal") if os.path.exists(p))


async def test_retention_drops_old_work_and_keeps_what_decisions_read(harness, kube):
    h = await harness(safety=SAFETY)
    await _work(h, kube)
    counters = _samples(h, "gpu_remediation_actions_total")
    last_success = _samples(h, "gpu_remediation_last_success_timestamp_seconds")
    fixes = h.sql("SELECT node, action, finished_at FROM history ORDER BY finished_at")
    assert [n for n, _, _ in fixes] == ["n1", "n1", "n4"]
    await h.engine.refresh_gauges()
    grown = _size(h.journal.path)
    assert h.metric("gpu_remediation_journal_size_bytes") == grown

    _age(h, 89)  # within retention: nothing goes
    assert await retention.prune(h.engine) == 0
    _age(h, 100)
    assert await retention.prune(h.engine) > 4000

    # kept: the unfinished remediation and its occurrence, the one whose cordon we hold, the newest fix of n1
    assert sorted(h.states().items()) == [("n3", "PLANNED"), ("n4", "SUCCEEDED")]
    assert {n for (n,) in h.sql("SELECT node FROM occurrence")} == {"n3"}
    assert h.sql("SELECT node, action, finished_at FROM history ORDER BY finished_at") == [fixes[1], fixes[2]]
    assert h.sql("SELECT COUNT(*) FROM action_result") == [(0,)]
    assert h.sql("SELECT COUNT(*) FROM audit") == [(0,)]
    # the lifetime totals and the last times survive, in this process and after a restart
    assert _samples(h, "gpu_remediation_actions_total") == counters
    await h.engine.stop()
    h.journal.close()
    h2 = await harness(safety=SAFETY)
    assert _samples(h2, "gpu_remediation_actions_total") == counters
    assert _samples(h2, "gpu_remediation_last_success_timestamp_seconds") == last_success
    # the space went back to the file system, and the WAL was truncated
    assert _size(h2.journal.path) < grown / 2
    assert h2.sql("PRAGMA auto_vacuum") == [(2,)]
    assert h2.metric("gpu_remediation_journal_pruned_rows_total") is not None


async def test_escalation_history_is_kept_for_90_days_whatever_the_retention(harness, kube):
    h = await harness(safety=SAFETY, journal={"retention": "8d"})
    await _work(h, kube)
    _age(h, 30)
    await retention.prune(h.engine)
    assert "n1" not in h.states()  # the remediations went
    assert [n for (n,) in h.sql("SELECT node FROM history ORDER BY finished_at")] == ["n1", "n1", "n4"]
    _age(h, 91)
    await retention.prune(h.engine)
    assert [n for (n,) in h.sql("SELECT node FROM history ORDER BY finished_at")] == ["n1", "n4"]


async def test_a_pass_that_raises_does_not_end_retention(harness, kube, monkeypatch, caplog):
    h = await harness(journal={"prune_interval": "1s"}, start=False)
    real, calls = retention.prune, []

    async def flaky(engine):
        calls.append(None)
        if len(calls) == 1:
            raise RuntimeError("a bug in one pass")
        return await real(engine)

    monkeypatch.setattr(retention, "prune", flaky)
    task = asyncio.create_task(retention.run_forever(h.engine))
    try:
        for _ in range(50):
            if h.metric("gpu_remediation_journal_last_prune_timestamp_seconds"):
                break
            await asyncio.sleep(0.1)
    finally:
        task.cancel()
    assert len(calls) >= 2 and h.metric("gpu_remediation_journal_last_prune_timestamp_seconds") > 0
    assert "journal retention pass failed" in caplog.text


@pytest.mark.parametrize(("journal", "key"), [
    ({"retention": "7d"}, "8 days"),
    ({"retention": "9d"}, "safety.attempts_window"),
    ({"retention": "9d", "prune_interval": "0s"}, "journal.prune_interval"),
    ({"retention": "9d", "prune_interval": "13h"}, "GPURemediationJournalNotPruned"),
])
def test_retention_shorter_than_a_decision_reads_is_refused(tmp_path: Path, journal: dict, key: str):
    cfg = base_config(tmp_path, "http://127.0.0.1:9", journal=journal,
                      safety={"per_node": {"attempts_window": "10d"}} if "attempts" in key else {})
    with pytest.raises(ConfigError, match=r"journal\.") as err:
        build_config(cfg, base=tmp_path)
    assert key in str(err.value)


# ------------------------------------------------------------------------------------------- bytes in flight

def _hold(port: int, length: int) -> socket.socket:
    """A client that announces a body of `length` bytes and sends none of it (yet)."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(f"POST /v1/alerts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {length}\r\n\r\n".encode())
    return s


async def test_bytes_in_flight_are_bounded_and_the_excess_gets_503_with_retry_after(harness, kube):
    kube.add_node("n1")
    h = await harness(safety=SAFETY, web={"listen_address": "127.0.0.1:0", "max_body_bytes": 100_000,
                                          "max_bytes_in_flight": 200_000, "read_timeout": "1s"})
    budget = h.client.app[BUDGET]
    # bodies announced and never sent take their bytes from the budget until their read timeout (408)
    holders = [_hold(h.client.server.port, 100_000) for _ in range(2)]
    try:
        await _until(lambda: budget.used == 200_000)
        await _until(lambda: budget.used == 0)
        for s in holders:
            s.settimeout(5)
            assert s.recv(100).startswith(b"HTTP/1.1 408")
    finally:
        for s in holders:
            s.close()
    # while large deliveries fill the budget, one more waits for room up to the read timeout, then gets 503
    async with budget.hold(200_000, 1):
        t0 = time.monotonic()
        r = await h.post(notification(alert("n1")))
        assert r.status == 503 and r.headers["Retry-After"] == "5", await r.text()
        assert 0.9 <= time.monotonic() - t0 < 5
        assert "overloaded" in (await r.json())["error"]
    assert h.metric("gpu_remediation_webhook_requests_total", code="503") == 1
    # one that finds room as others finish gets in
    async with budget.hold(200_000, 1):
        pending = asyncio.ensure_future(h.post(notification(alert("n1"))))
        await asyncio.sleep(0.3)
        assert not pending.done()
    assert (await pending).status == 200
    assert budget.used == 0
    # a body announced larger than max_body_bytes never waits for the budget
    r = await h.client.post("/v1/alerts", data=b"x" * 100_001, headers={"Content-Type": "application/json"})
    assert r.status == 413


async def _until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_a_budget_smaller_than_one_body_is_refused(tmp_path: Path):
    cfg = base_config(tmp_path, "http://127.0.0.1:9",
                      web={"listen_address": "127.0.0.1:0", "max_body_bytes": 2_000_000,
                           "max_bytes_in_flight": 1_000_000})
    with pytest.raises(ConfigError, match=r"web\.max_bytes_in_flight"):
        build_config(cfg, base=tmp_path)
