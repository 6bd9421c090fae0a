"""gpu_health_stack/chaos.py: the soak's schedule is reproducible from its seed and holds what issue 16 asks for."""

from __future__ import annotations

import json

import pytest

from exporter.xid.catalog import lookup as xid_lookup
from exporter.xid.sxid_catalog import lookup as sxid_lookup
from gpu_health_stack.chaos import APPLICATION_XIDS, FATAL_SXID, FATAL_XIDS, RESET_XIDS, ChaosConfig, faults, schedule

NODES = [f"node-{i:04d}" for i in range(1000)]


def test_the_same_seed_gives_the_same_run_and_another_seed_another() -> None:
    a, b = schedule(7, NODES, 600), schedule(7, NODES, 600)
    assert a == b and json.dumps([e.as_json() for e in a]) == json.dumps([e.as_json() for e in b])
    assert schedule(8, NODES, 600) != a


def test_ten_minutes_on_a_thousand_nodes_is_the_issues_soak() -> None:
    events = schedule(1, NODES, 600)
    kinds = {e.kind for e in events}
    assert kinds == {"rack_power_loss", "driver_rollout", "nvswitch_fatal", "fatal_xid", "storm", "reboot",
                     "scrape_gap", "restart", "kube_api", "human_uncordon", "stuck_holder"}
    assert faults(events) >= 200
    assert [e.at for e in events] == sorted(e.at for e in events) and all(0 <= e.at <= 600 for e in events)
    (rack,) = [e for e in events if e.kind == "rack_power_loss"]
    assert len(rack.nodes) == 32 and rack.nodes == tuple(NODES[NODES.index(rack.nodes[0]):][:32])  # one rack
    rollout = {e.nodes[0] for e in events if e.kind == "driver_rollout"}
    assert len(rollout) == 300 and {e.params["xid"] for e in events if e.kind == "driver_rollout"} <= set(APPLICATION_XIDS)
    fatal = [e for e in events if e.kind == "fatal_xid"]
    assert len(fatal) == 10
    storm = [e for e in events if e.kind == "storm"]
    # Two storms of 100 nodes each, each within its window, ended one by a skip-backlog reset and one by resume;
    # no storm node has another fatal fault or is in the other storm.
    by_storm = {i: [e for e in storm if e.params["storm"] == i] for i in (0, 1)}
    assert [len(by_storm[i]) for i in (0, 1)] == [100, 100] and len({e.nodes for e in storm}) == 200
    assert [by_storm[i][0].params["reset"] for i in (0, 1)] == ["skip-backlog", "resume"]
    assert all(max(e.at for e in s) - min(e.at for e in s) <= 300 for s in by_storm.values())
    assert not {e.nodes for e in storm} & {e.nodes for e in events if e.kind in ("fatal_xid", "nvswitch_fatal")}
    assert all(0 <= e.params["gpu"] < 8 for e in [*fatal, *storm])
    assert {e.params["component"] for e in events if e.kind == "restart"} == {"webhook", "alertmanager",
                                                                               "prometheus", "exporter", "cold_start"}
    # No other fatal fault lands inside a storm's window.
    for f in fatal:
        assert not any(min(e.at for e in s) - 5 <= f.at <= min(e.at for e in s) + 120 for s in by_storm.values())
    # The GPU held by a process nobody pauses is one that a reset-class fault asks to reset, from that fault on;
    # nobody uncordons that node by hand (its outcome has one cause).
    (holder,) = [e for e in events if e.kind == "stuck_holder"]
    assert any(f.nodes == holder.nodes and f.at == holder.at and f.params["xid"] in RESET_XIDS for f in fatal)
    assert holder.nodes not in {e.nodes for e in events if e.kind == "human_uncordon"}
    assert holder.at == min(f.at for f in fatal if f.params["xid"] in RESET_XIDS and f.nodes == holder.nodes)
    # No random draw: the rest of a seed's schedule is what it was without it.
    assert [e for e in events if e.kind != "stuck_holder"] == schedule(1, NODES, 600, ChaosConfig(stuck_holders=0))
    # A person uncordons only a node the webhook had a reason to cordon, after its fault.
    for e in (e for e in events if e.kind == "human_uncordon"):
        assert any(f.nodes == e.nodes and f.at < e.at for f in fatal)


def test_the_codes_are_what_the_catalogs_and_policy_say() -> None:
    assert all(xid_lookup(x).name != "UNKNOWN" for x in (*FATAL_XIDS, *APPLICATION_XIDS))
    assert sxid_lookup(FATAL_SXID).fatal == "fatal"


def test_time_scale_shortens_every_duration() -> None:
    fast = schedule(5, NODES[:50], 180, ChaosConfig(time_scale=0.2, rack_size=5))
    slow = schedule(5, NODES[:50], 180, ChaosConfig(rack_size=5))
    for kind, key in (("rack_power_loss", "down_for"), ("reboot", "down_for"), ("scrape_gap", "for")):
        assert max(e.params[key] for e in fast if e.kind == kind) <= 0.2 * 180 + 0.001
        assert min(e.params[key] for e in slow if e.kind == kind) >= 15


def test_a_soak_without_a_storm_and_bad_arguments() -> None:
    events = schedule(3, NODES[:50], 180, ChaosConfig(storm_at=-1))
    assert not [e for e in events if e.kind == "storm"]
    with pytest.raises(ValueError):
        schedule(3, [], 60)
    with pytest.raises(ValueError):
        schedule(3, NODES, 0)
