"""The fleet soak's chaos: a seeded random schedule of correlated and component faults (issue 16, build 2).

The schedule is data: a list of Events sorted by time, the same for the same seed, fleet and settings, written into
the soak's report so a failing run can be replayed. What applies it to the fleet simulator and the stack, and what
the oracle expects of it, live beside the soak; this module only decides what happens, when, and to whom.

Kinds:
    rack_power_loss     a rack of `rack_size` consecutive nodes loses power: targets down, back with new boot ids
    driver_rollout      a bad driver rollout: application Xids (13, 31, 43) on `rollout_share` of the nodes, a few
                        each, over a few minutes; no remediation is due for them
    nvswitch_fatal      a fatal SXid on one node's NVSwitch tray
    fatal_xid           one fatal Xid on a node (`fatal_share` of the fleet, spread over the run)
    storm               fatal Xids on `storm_share` of the fleet within `storm_window` seconds (the breaker must trip);
                        one storm per `storms` entry, which names how the operator resets the breaker after it
    reboot              a node reboots: a short gap, then a new boot id
    scrape_gap          some nodes' targets answer nothing for a while (the nodes themselves are fine)
    restart             a component restarts: the webhook (SIGKILL), an Alertmanager peer, Prometheus, an exporter;
                        and near the end a cold start (Prometheus on an empty TSDB, with the webhook down meanwhile)
    kube_api            the Kubernetes API answers 500 or slowly for a while
    human_uncordon      a person uncordons a node the webhook cordoned earlier in the run
    stuck_holder        with the earliest reset-class fatal Xids, a process nobody pauses (a profiler, a user's
                        monitor) holds that node's GPU: the reset Job refuses and the ladder falls back to a reboot,
                        which ends it
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

# Application Xids: the job's fault, not the GPU's; the policy asks for no action.
APPLICATION_XIDS = (13, 31, 43)
# Fatal Xids the shipped policy remediates (rules/xid-policy.yaml): 79 reboot; 48, 95 and 119 reset_gpu.
FATAL_XIDS = (79, 48, 95, 119)
RESET_XIDS = (48, 95, 119)
# A fatal SXid (exporter/xid/sxid-catalog.csv: DLPL_LTSSM_FAULT_UP, fatal).
FATAL_SXID = 20034


@dataclass(frozen=True)
class Event:
    at: float  # seconds from the start of the run
    kind: str
    nodes: tuple[str, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "nodes": list(self.nodes)}


@dataclass(frozen=True)
class ChaosConfig:
    """How much of each; the defaults make a 10-minute soak on 1,000 nodes inject well over 200 faults."""

    rack_size: int = 32
    racks_down: int = 1
    rollout_share: float = 0.30
    fatal_share: float = 0.01
    fatal_xids: tuple[int, ...] = FATAL_XIDS  # the codes a fatal_xid fault draws from
    storm_share: float = 0.10
    storm_window: float = 120.0  # two storms and their resets fit in ten minutes
    # One storm per entry, each ended by the operator's breaker reset of that mode (docs/webhook.md, Safety).
    storms: tuple[str, ...] = ("skip-backlog", "resume")
    storm_at: float | None = None  # None: random, the first near 15 % of the run, the next 45 % later; <0: none
    nvswitch_trays: int = 1
    reboots: int = 5
    scrape_gaps: int = 3
    kube_api_outages: int = 2
    human_uncordons: int = 2
    stuck_holders: int = 1  # reset-class fatal faults whose node also has a holder nobody pauses
    restarts: tuple[str, ...] = ("webhook", "alertmanager", "prometheus", "exporter")
    # Seconds after each storm's window kept free of other fatal faults (the operator's reset comes in them).
    storm_quiet: float = 0.0
    # Near the end, Prometheus and the webhook restart together, Prometheus on an empty TSDB (a pod without a
    # volume): fixed faults whose Xid is still in the log fire again as new alerts, and the journal must know.
    cold_start: bool = True
    # Multiplies every duration (how long a rack stays down, a gap lasts, a rollout spreads, a person waits): a
    # soak at 1 s settings runs its faults 15 times as fast as one at 15 s, in a fifth of the time.
    time_scale: float = 1.0


def schedule(seed: int, nodes: Sequence[str], seconds: float, config: ChaosConfig | None = None) -> list[Event]:
    """The run's events, sorted by time. Faults land in the first 80 % of the run, so their effects can be seen."""
    if not nodes:
        raise ValueError("no nodes")
    if seconds <= 0:
        raise ValueError("seconds must be positive")
    c = config or ChaosConfig()
    rng = random.Random(seed)
    horizon = seconds * 0.8
    fleet = list(nodes)
    events: list[Event] = []

    def when(lo: float = 0.05, hi: float = 1.0) -> float:
        return round(rng.uniform(lo * horizon, hi * horizon), 3)

    def some(share: float) -> list[str]:
        return rng.sample(fleet, max(1, round(share * len(fleet))) if share > 0 else 0)

    k = c.time_scale

    def span(lo: float, hi: float) -> float:
        return round(rng.uniform(lo, hi) * k, 3)

    for _ in range(c.racks_down):
        first = rng.randrange(0, max(1, len(fleet) - c.rack_size + 1))
        events.append(Event(when(), "rack_power_loss", tuple(fleet[first:first + c.rack_size]),
                            {"down_for": span(60, 180)}))

    start = when(0.05, 0.5)
    for node in some(c.rollout_share):
        for _ in range(rng.randint(1, 3)):
            events.append(Event(round(start + rng.uniform(0, 180) * k, 3), "driver_rollout", (node,),
                                {"xid": rng.choice(APPLICATION_XIDS), "gpu": rng.randrange(8)}))

    trays = rng.sample(fleet, min(c.nvswitch_trays, len(fleet)))
    # Storm times first: the other fatal faults keep out of the storms and the operator's reset after each.
    storms = c.storms if c.storm_share > 0 and (c.storm_at is None or c.storm_at >= 0) else ()
    starts = [c.storm_at + i * horizon / len(storms) if c.storm_at is not None
              else round(horizon * (0.15 + 0.45 * i) + rng.uniform(0, 0.1 * horizon), 3)
              for i in range(len(storms))]
    busy = [(at - 5.0, at + c.storm_window + c.storm_quiet) for at in starts]
    if c.cold_start:
        busy.append((horizon * 0.9, horizon))  # the cold start at 97 %: its outage would hold a fault back

    def calm() -> float:
        for _ in range(100):
            at = when()
            if not any(lo <= at <= hi for lo, hi in busy):
                return at
        return at

    fatal = [n for n in some(c.fatal_share) if n not in trays]
    for node in fatal:
        events.append(Event(calm(), "fatal_xid", (node,), {"xid": rng.choice(c.fatal_xids), "gpu": rng.randrange(8)}))

    # A storm's nodes are none of the others' with a fatal fault, and no node is in two storms: each node's
    # expected outcome has one cause.
    spare = [n for n in fleet if n not in set(fatal) | set(trays)]
    for i, reset in enumerate(storms):
        members = rng.sample(spare, min(len(spare), max(1, round(c.storm_share * len(fleet)))))
        spare = [n for n in spare if n not in set(members)]
        for node in members:
            events.append(Event(round(starts[i] + rng.uniform(0, c.storm_window), 3), "storm", (node,),
                                {"xid": 79, "gpu": rng.randrange(8), "storm": i, "reset": reset}))

    for node in trays:
        events.append(Event(calm(), "nvswitch_fatal", (node,), {"sxid": FATAL_SXID}))
    for node in rng.sample(fleet, min(c.reboots, len(fleet))):
        events.append(Event(when(), "reboot", (node,), {"down_for": span(20, 90)}))
    for _ in range(c.scrape_gaps):
        events.append(Event(when(), "scrape_gap", tuple(rng.sample(fleet, min(len(fleet), rng.randint(1, 10)))),
                            {"for": span(15, 90)}))
    for component in c.restarts:
        params: dict[str, Any] = {"signal": "KILL" if component == "webhook" else "TERM",
                                  "down_for": span(2, 10)}
        if component == "alertmanager":
            params["peer"] = rng.randrange(3)
        targets: tuple[str, ...] = (rng.choice(fleet),) if component == "exporter" else ()
        events.append(Event(when(), "restart", targets, {"component": component, **params}))
    if c.cold_start:
        events.append(Event(round(horizon * 0.97, 3), "restart", (), {"component": "cold_start", "signal": "KILL",
                                                                     "down_for": span(5, 10)}))
    for _ in range(c.kube_api_outages):
        events.append(Event(when(), "kube_api", (), {"mode": rng.choice(("500", "slow")), "for": span(10, 60)}))
    for node in rng.sample(fatal, min(c.human_uncordons, len(fatal))):
        first = next(e.at for e in events if e.kind == "fatal_xid" and e.nodes == (node,))
        events.append(Event(round(min(seconds, first + rng.uniform(60, 180) * k), 3), "human_uncordon", (node,)))

    # The earliest reset-class faults, before storms fill the fleet cap; chosen without a random draw, so that a
    # seed's schedule of everything else stays what it was.
    touched = {e.nodes[0] for e in events if e.kind == "human_uncordon"}
    resets = sorted((e for e in events if e.kind == "fatal_xid" and e.params["xid"] in RESET_XIDS
                     and e.nodes[0] not in touched), key=lambda e: e.at)
    for e in resets[:c.stuck_holders]:
        events.append(Event(e.at, "stuck_holder", e.nodes, {"process": "nsys"}))

    events.sort(key=lambda e: (e.at, e.kind, e.nodes))
    return events


def faults(events: Sequence[Event]) -> int:
    """Injected faults, counted per node touched (a rack of 32 is 32 faults), components and people excluded."""
    return sum(len(e.nodes) for e in events if e.kind not in ("restart", "kube_api", "human_uncordon", "stuck_holder"))
