"""Delivery through a real Alertmanager 0.25 (Debian) posting to the receiver over HTTP with a bearer token."""

from __future__ import annotations

import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.webhook.webhook_support import await_for, base_config, free_port
from remediation_webhook.alertmanager import Alertmanagers
from remediation_webhook.config import AlertmanagerConfig

AM = shutil.which("prometheus-alertmanager") or "/usr/bin/prometheus-alertmanager"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path(AM).exists(),
                                                   reason="needs Debian's prometheus-alertmanager (apt-get install "
                                                          "prometheus-alertmanager)")]
TOKEN = "alertmanager-to-receiver-token"


class Alertmanager:
    def __init__(self, tmp: Path, webhook_url: str, *, group_by: list[str], repeat_interval: str = "1h") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = {
            "route": {"receiver": "remediation", "group_by": group_by, "group_wait": "0s", "group_interval": "1s",
                      "repeat_interval": repeat_interval},
            "receivers": [{"name": "remediation", "webhook_configs": [{
                "url": webhook_url, "send_resolved": True, "max_alerts": 0,
                "http_config": {"authorization": {"type": "Bearer", "credentials": TOKEN},
                                "follow_redirects": False}}]}],
        }
        (tmp / "am.yml").write_text(yaml.safe_dump(cfg))
        self.proc = subprocess.Popen(
            [AM, f"--config.file={tmp / 'am.yml'}", f"--storage.path={tmp / 'am-data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address=", "--log.level=warn",
             f"--web.external-url={self.url}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def ready(self, session: aiohttp.ClientSession) -> bool:
        try:
            async with session.get(f"{self.url}/-/ready") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(name="am_factory")
async def _am_factory(tmp_path):
    made: list[Alertmanager] = []
    session = aiohttp.ClientSession()

    async def make(webhook_url: str, **kw: Any) -> tuple[Alertmanager, aiohttp.ClientSession]:
        am = Alertmanager(tmp_path, webhook_url, **kw)
        made.append(am)
        await await_for(lambda: am.ready(session), 10, what="alertmanager ready")
        return am, session

    yield make
    await session.close()
    for am in made:
        am.stop()


def _am_alert(node: str, *, alertname: str = "GPUXidFatal", ends: datetime | None = None,
              starts: datetime | None = None, remediation: str = "cordon") -> dict[str, Any]:
    out: dict[str, Any] = {"labels": {"alertname": alertname, "node": node, "severity": "critical",
                                      "remediation": remediation},
                           "annotations": {"summary": "test"}, "generatorURL": "http://prometheus/graph"}
    if starts:
        out["startsAt"] = starts.isoformat()
    if ends:
        out["endsAt"] = ends.isoformat()
    return out


async def _post_alerts(am: Alertmanager, session: aiohttp.ClientSession, alerts: list[dict[str, Any]]) -> None:
    async with session.post(f"{am.url}/api/v2/alerts", json=alerts) as r:
        assert r.status == 200, await r.text()


async def _receiver(harness, tmp_path, kube, **sections):
    (tmp_path / "am-token").write_text(TOKEN + "\n")
    raw = base_config(tmp_path, kube.url, web={"listen_address": "127.0.0.1:0", "bearer_token_file": "am-token"},
                      **sections)
    h = await harness(raw, checker=None, start=False)
    return h, raw


async def _wire(h, am_url: str) -> None:
    h.engine.alertmanager = Alertmanagers(AlertmanagerConfig(urls=(am_url,), timeout=5))
    await h.engine.start()


async def test_repeated_notifications_make_one_remediation(harness, tmp_path, kube, am_factory):
    kube.add_node("n1")
    h, _ = await _receiver(harness, tmp_path, kube)
    am, session = await am_factory(str(h.client.make_url("/v1/alerts")), group_by=["alertname", "node"],
                                   repeat_interval="1s")
    await _wire(h, am.url)
    await _post_alerts(am, session, [_am_alert("n1")])
    await await_for(lambda: (h.sql("SELECT deliveries FROM occurrence") or [(0,)])[0][0] >= 3, 20,
                    what="three deliveries of the same notification")
    await h.settle()
    assert h.states() == {"n1": "SUCCEEDED"}
    assert len([c for c in kube.calls(mutating=True) if c[0] == "PATCH"]) == 1
    assert h.metric("gpu_remediation_webhook_duplicate_alerts_total") >= 2


async def test_mixed_group_only_the_firing_alert_acts(harness, tmp_path, kube, am_factory):
    kube.add_node("n1")
    kube.add_node("n2")
    h, _ = await _receiver(harness, tmp_path, kube)
    am, session = await am_factory(str(h.client.make_url("/v1/alerts")), group_by=["alertname"])
    await _wire(h, am.url)
    now = datetime.now(UTC)
    # n2 fired and resolved; n1 fires: one group, and the notification carries both. The firing alert goes first:
    # with group_wait 0s Alertmanager may flush the group between the two; a group holding only a resolved alert
    # that was never notified sends nothing and then forgets it, which made this test time out on a loaded machine.
    await _post_alerts(am, session, [_am_alert("n1"),
                                     _am_alert("n2", starts=now - timedelta(minutes=5), ends=now - timedelta(seconds=1))])
    await await_for(lambda: len(h.sql("SELECT 1 FROM occurrence")) >= 2, 15, what="both alerts delivered")
    await h.settle()
    seen = dict(h.sql("SELECT node, status FROM occurrence"))
    assert seen == {"n1": "firing", "n2": "resolved"}
    assert h.states() == {"n1": "SUCCEEDED"}
    assert kube.cordoned() == ["n1"]


async def test_alert_silenced_in_alertmanager_between_delivery_and_action(harness, tmp_path, kube, am_factory):
    kube.add_node("n1")
    h, _ = await _receiver(harness, tmp_path, kube, policy={"dry_run": False, "rules": [
        {"name": "gpu", "match_re": {"alertname": "GPU.*"}, "ladder": ["cordon"], "requires_approval": ["cordon"]}]})
    am, session = await am_factory(str(h.client.make_url("/v1/alerts")), group_by=["alertname", "node"])
    await _wire(h, am.url)
    await _post_alerts(am, session, [_am_alert("n1")])
    await await_for(lambda: h.states() == {"n1": "AWAITING_APPROVAL"}, 15, what="delivery")
    now = datetime.now(UTC)
    silence = {"matchers": [{"name": "node", "value": "n1", "isRegex": False}], "startsAt": now.isoformat(),
               "endsAt": (now + timedelta(hours=1)).isoformat(), "createdBy": "sre", "comment": "hands off"}
    async with session.post(f"{am.url}/api/v2/silences", json=silence) as r:
        assert r.status == 200

    async def silenced() -> bool:
        async with session.get(f"{am.url}/api/v2/alerts") as r:
            return any(a["status"]["silencedBy"] for a in await r.json())
    await await_for(silenced, 10, what="alertmanager to apply the silence")
    rid = h.sql("SELECT id FROM remediation")[0][0]
    assert (await h.admin.post(f"/v1/remediations/{rid}:approve")).status == 200
    await h.settle()
    assert h.states() == {"n1": "CANCELLED"}
    assert "silenced" in h.sql("SELECT reason FROM remediation")[0][0]
    assert kube.calls(mutating=True) == []


async def test_storm_of_200_nodes_trips_the_breaker_and_stays_under_the_cap(harness, tmp_path, kube, am_factory):
    for i in range(200):
        kube.add_node(f"gpu-{i:03d}")
    h, _ = await _receiver(harness, tmp_path, kube)
    am, session = await am_factory(str(h.client.make_url("/v1/alerts")), group_by=["alertname", "node"])
    await _wire(h, am.url)
    await _post_alerts(am, session, [_am_alert(f"gpu-{i:03d}") for i in range(200)])
    # Generous waits, not timings: under two pytest workers on two cores this once missed a 10 s settle.
    await await_for(lambda: h.sql("SELECT COUNT(*) FROM occurrence")[0][0] == 200, 60, what="200 deliveries")
    await h.settle(timeout=60)
    assert h.metric("gpu_remediation_breaker_open") == 1
    await h.drive_until(lambda: h.sql("SELECT COUNT(*) FROM remediation WHERE state='BLOCKED'")[0][0] >= 190, 60,
                        "190 plans held by the open breaker")
    assert len(kube.cordoned()) <= h.services.config.safety.fleet_cap(200) == 4


async def test_wrong_token_from_alertmanager_is_refused(harness, tmp_path, kube, am_factory):
    kube.add_node("n1")
    (tmp_path / "am-token").write_text("a-different-token-entirely\n")
    raw = base_config(tmp_path, kube.url, web={"listen_address": "127.0.0.1:0", "bearer_token_file": "am-token"})
    h = await harness(raw)
    am, session = await am_factory(str(h.client.make_url("/v1/alerts")), group_by=["alertname", "node"])
    await _post_alerts(am, session, [_am_alert("n1")])

    async def failed_twice() -> bool:  # Alertmanager keeps retrying at every group_interval
        async with session.get(f"{am.url}/metrics") as r:
            for line in (await r.text()).splitlines():
                if line.startswith('alertmanager_notifications_failed_total{integration="webhook"'):
                    return float(line.split()[-1]) >= 2
        return False
    await await_for(failed_twice, 15, what="alertmanager to fail twice")
    assert h.sql("SELECT COUNT(*) FROM occurrence")[0][0] == 0
    assert h.metric("gpu_remediation_webhook_requests_total", code="200") is None
    assert kube.calls(mutating=True) == []


async def test_alertmanager_peers_one_down_is_no_veto_all_down_is_and_a_silence_on_one_is(harness, tmp_path, kube,
                                                                                         am_factory):
    """Alertmanager in HA: Prometheus sends every alert to every peer, and the webhook asks every peer before it
    acts. One peer down is not a veto; all down is (fail closed); a silence on any one peer is a human veto."""
    for n in ("n1", "n2", "n3"):
        kube.add_node(n)
    h, _ = await _receiver(harness, tmp_path, kube, policy={"dry_run": False, "rules": [
        {"name": "gpu", "match_re": {"alertname": "GPU.*"}, "ladder": ["cordon"], "requires_approval": ["cordon"]}]},
        safety={"breaker": {"max_nodes": 50, "max_percent": 100, "min_nodes": 50},
                "fleet_cap": {"max_nodes": 4, "max_percent": 100}})
    url = str(h.client.make_url("/v1/alerts"))
    (a, session), (b, _) = [await am_factory(url, group_by=["alertname", "node"]) for _ in range(2)]
    h.engine.alertmanager = Alertmanagers(AlertmanagerConfig(urls=(a.url, b.url), timeout=2))
    await h.engine.start()
    for am in (a, b):
        await _post_alerts(am, session, [_am_alert(n) for n in ("n1", "n2", "n3")])
    await await_for(lambda: set(h.states().values()) == {"AWAITING_APPROVAL"} and len(h.states()) == 3, 15,
                    what="three deliveries")
    rid = dict(h.sql("SELECT node, id FROM remediation"))
    # A silence on peer b only (no gossip between these two): a veto for n3.
    now = datetime.now(UTC)
    silence = {"matchers": [{"name": "node", "value": "n3", "isRegex": False}], "startsAt": now.isoformat(),
               "endsAt": (now + timedelta(hours=1)).isoformat(), "createdBy": "sre", "comment": "hands off"}
    async with session.post(f"{b.url}/api/v2/silences", json=silence) as r:
        assert r.status == 200
    # Peer a goes down: n1 still acts, on peer b's word; n3 is vetoed by b's silence.
    a.stop()
    for node in ("n1", "n3"):
        assert (await h.admin.post(f"/v1/remediations/{rid[node]}:approve")).status == 200
    await h.until_state("n1", "SUCCEEDED")
    await h.until_state("n3", "CANCELLED")
    assert "silenced" in h.sql("SELECT reason FROM remediation WHERE node='n3'")[0][0]
    # Both down: n2 waits (fail closed).
    b.stop()
    assert (await h.admin.post(f"/v1/remediations/{rid['n2']}:approve")).status == 200
    await h.until_state("n2", "BLOCKED")
    assert "no Alertmanager answered (2 of 2 down)" in h.sql("SELECT reason FROM remediation WHERE node='n2'")[0][0]
    assert kube.cordoned() == ["n1"]
