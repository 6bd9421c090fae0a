"""The fleet cap from reality, people win, and a drain that judges its deadline by what is left: against kmock, with
the test playing the person who runs `kubectl uncordon`."""

from __future__ import annotations

import json
from typing import Any

from tests.webhook.webhook_support import alert, await_for, notification

POOL = {"breaker": {"max_nodes": 50, "max_percent": 100, "min_nodes": 50}}  # no storm in these small fleets


def _policy(ladder: tuple[str, ...] = ("cordon",), **rule: Any) -> dict[str, Any]:
    return {"dry_run": False, "rules": [{"name": "gpu", "match_re": {"alertname": "GPU.*"}, "ladder": list(ladder),
                                         **rule}]}


async def _one_slot(harness: Any, kube: Any, *nodes: str) -> Any:
    """A fleet cap of one node; `nodes` exist and the first is cordoned by us (SUCCEEDED), the others wait."""
    for node in nodes:
        kube.add_node(node)
    h = await harness(policy=_policy(), safety={"fleet_cap": {"max_nodes": 1, "max_percent": 100}, **POOL})
    await h.post(notification(alert(nodes[0])))
    await h.until_state(nodes[0], "SUCCEEDED")
    for node in nodes[1:]:
        await h.post(notification(alert(node)))
        await h.until_state(node, "BLOCKED")
    assert "fleet cap reached" in h.sql("SELECT reason FROM remediation WHERE state='BLOCKED'")[0][0]
    return h


def _audit(h: Any, event: str) -> list[dict[str, Any]]:
    return [{"actor": actor, "node": node, **json.loads(detail)} for actor, node, detail in
            h.sql("SELECT actor, node, detail_json FROM audit WHERE event=? ORDER BY id", event)]


async def test_a_person_uncordoning_frees_the_slot_at_the_next_pool_refresh(harness, kube):
    h = await _one_slot(harness, kube, "a", "b")
    kube.uncordon("a")  # a person looked at node a and put it back in service
    await h.engine._refresh_pool(force=True)  # one pool refresh
    assert h.sql("SELECT node FROM node_mark") == []
    assert _audit(h, "mark_cleared") == [{"actor": "engine", "node": "a", "reason": "someone else uncordoned the node"}]
    assert h.metric("gpu_remediation_slot_releases_total", reason="uncordoned") == 1
    await h.until_state("b", "SUCCEEDED")
    assert kube.cordoned() == ["b"]  # b took the slot; a stays as the person left it
    assert h.states() == {"a": "SUCCEEDED", "b": "SUCCEEDED"}


async def test_a_slot_released_by_hand_through_the_admin_api(harness, kube):
    h = await _one_slot(harness, kube, "a", "b")
    held = await (await h.admin.get("/v1/slots")).json()
    assert held["fleet_cap"] == 1 and [s["node"] for s in held["held"]] == ["a"]
    assert (await h.admin.post("/v1/slots/nope:release")).status == 404
    assert (await h.admin.post("/v1/slots/NOT_A_NODE:release")).status == 400
    r = await h.admin.post("/v1/slots/a:release", json={"reason": "RMA opened, node stays out"})
    assert r.status == 200 and (await r.json())["released"] == "a"
    assert _audit(h, "mark_cleared")[0]["reason"] == "released by anonymous through the admin API: RMA opened, " \
                                                     "node stays out"
    assert h.metric("gpu_remediation_slot_releases_total", reason="admin") == 1
    await h.until_state("b", "SUCCEEDED")
    assert kube.cordoned() == ["a", "b"]  # a keeps its cordon: releasing the slot changes nothing on the node
    # b's remediation is finished but its node is ours: released too (one that still holds it: next test).
    kube.add_node("c")
    await h.post(notification(alert("c")))
    await h.until_state("c", "BLOCKED")
    r = await h.admin.post("/v1/slots/b/release")
    assert r.status == 200
    await h.until_state("c", "SUCCEEDED")


async def test_releasing_a_node_whose_remediation_holds_it_is_refused(harness, kube):
    kube.add_node("a")
    h = await harness(policy=_policy(("cordon", "drain"), requires_approval=["drain"]), safety=POOL)
    await h.post(notification(alert("a", remediation="drain")))
    await h.until_state("a", "AWAITING_APPROVAL")
    r = await h.admin.post("/v1/slots/a:release")
    assert r.status == 409 and "cancel it first" in await r.text()


async def test_an_uncordon_while_the_remediation_waits_stops_it_for_good(harness, kube):
    kube.add_node("a")
    kube.add_pod("team-a", "train", "a")
    h = await harness(policy=_policy(("cordon", "drain"), requires_approval=["drain"]), safety=POOL)
    a = alert("a", remediation="drain")
    await h.post(notification(a))
    await h.until_state("a", "AWAITING_APPROVAL")
    kube.uncordon("a")
    await h.engine._refresh_pool(force=True)
    assert h.states() == {"a": "OVERRIDDEN"}
    assert "someone else uncordoned the node" in h.sql("SELECT reason FROM remediation")[0][0]
    assert h.metric("gpu_remediation_overrides_total") == 1 and h.sql("SELECT node FROM node_mark") == []
    # Re-sends of the same alert never cordon it again.
    assert (await (await h.post(notification(a))).json())["duplicates"] == 1
    await h.settle()
    assert kube.cordoned() == [] and kube.pods("a") == ["team-a/train"]
    assert len([c for c in kube.calls(mutating=True) if c[0] == "PATCH"]) == 1


async def test_an_uncordon_during_the_drain_stops_it_for_good(harness, kube):
    kube.add_node("a")
    kube.add_pod("team-a", "train", "a")
    kube.add_pod("team-a", "serve", "a")
    kube.evictions[("team-a", "serve")] = [429] * 1000  # a disruption budget that never lets go
    h = await harness(policy=_policy(("cordon", "drain")), safety=POOL,
                      actions={"drain": {"poll_interval": "20ms", "retry_interval": "20ms",
                                         "max_retry_interval": "50ms", "timeout": "30s"}})
    a = alert("a", remediation="drain")
    await h.post(notification(a))
    # The engine's own loop runs the drain in the background; it waits on the budget.
    await await_for(lambda: kube.pods("a") == ["team-a/serve"], what="the drain to evict what it can")
    assert h.states() == {"a": "RUNNING"}
    kube.uncordon("a")
    await h.until_state("a", "OVERRIDDEN")
    step = h.sql("SELECT action, state, outcome, detail FROM step WHERE action='drain'")[0]
    assert step[:3] == ("drain", "CANCELLED", "overridden") and "uncordoned by someone else" in step[3]
    await h.post(notification(a))
    await h.settle()
    assert kube.cordoned() == [] and kube.pods("a") == ["team-a/serve"]


async def test_a_drain_whose_last_eviction_outlasts_the_deadline_succeeds(harness, kube):
    """The eviction takes 1.5 s and the drain's deadline is 1 s: the pod is gone when the deadline is judged, so the
    drain succeeded (it used to fail with "1 pods left", reading the list taken before the eviction)."""
    kube.add_node("a")
    kube.add_pod("team-a", "train", "a")
    kube.eviction_delay[("team-a", "train")] = 1.5
    h = await harness(policy=_policy(("cordon", "drain")), safety=POOL,
                      actions={"drain": {"poll_interval": "20ms", "timeout": "1s"}})
    await h.post(notification(alert("a", remediation="drain")))
    await h.until_state("a", "SUCCEEDED")
    assert kube.pods("a") == []
    assert h.sql("SELECT state, detail FROM step WHERE action='drain'") == [
        ("SUCCEEDED", "drained: 1 pods evicted, 0 evictions blocked by disruption budgets on the way")]

