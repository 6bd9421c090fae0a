"""The fleet soak (issue 16): a simulated fleet under a seeded chaos schedule, with every real component in the
loop, judged by the oracle.

The world: the fleet simulator (``python -m gpu_health_stack.fleetsim``, its own process, driven through its HTTP
control API), Debian's Prometheus with rules/ scraping every node and the webhook, three Debian Alertmanager peers
in one gossip cluster (Prometheus sends to all three; the webhook verifies against all three), the webhook live
against kmock (one Node and one training pod per simulated node) through an API front that can fail
(gpu_health_stack.kube_front), with reboots and GPU resets done by executor Jobs.

The runner applies the schedule (gpu_health_stack.chaos) and plays what kmock has no controller for: the Job
controller and the kubelet (a reboot Job reboots the simulated node, whose new boot id the Node reports; a reset
Job succeeds), an operator who resets the breaker after each storm (with the storm's mode, once the storm is over),
and people who uncordon by hand. When the schedule is done and the fleet has settled, it takes the evidence (the
API front's request log, the journal read-only, the breaker's history) and hands it to the oracle.

    report = Soak(SoakConfig.short(seed=1)).run()
    assert not report.violations

Progress goes to `progress` (one line per event batch and phase); nothing else is printed.
"""

from __future__ import annotations

import heapq
import shutil
import json
import os
import sqlite3
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .am_cluster import AlertmanagerCluster, ClusterTimings
from .chaos import ChaosConfig, Event, faults, schedule
from .fleet import GPU_LABELS, base_webhook_config
from .gpu_operator import OPERATOR_LABELS
from .fleetsim import FleetSim
from .kube import KubeFake
from .kube_front import KubeFront
from .oracle import (
    BreakerSpan,
    Call,
    Evidence,
    Fault,
    Limits,
    Occ,
    PersonUncordon,
    Rem,
    ResetRun,
    Step,
    Verdict,
    judge,
    percentile,
)
from .procs import Proc, free_port, http_get, http_json, wait_until
from .scenarios import BUS, EXECUTOR_NAMESPACE
from .stack import ROOT, Stack, Timings, seconds
from .webhook import Webhook

# The policy's rung for each fatal code (rules/xid-policy.yaml, rules/nvlink.alerts.yaml).
RUNG = {79: "reboot", 48: "reset_gpu", 95: "reset_gpu", 119: "reset_gpu", 20034: "reboot"}
XID_TEXT = {79: "GPU has fallen off the bus.", 48: "An uncorrectable double bit error (DBE) has been detected.",
            95: "Uncontained: DBE error detected.", 119: "Timeout after 6s of waiting for RPC response from GPU0 GSP!",
            13: "Graphics SM Warp Exception on (GPC 1, TPC 3, SM 0): Out Of Range Address",
            31: "Ch 00000010, intr 10000000. MMU Fault: ENGINE GRAPHICS GPCCLIENT_T1_0 faulted @ 0x7f_12340000.",
            43: "Ch 00000008"}
NAMESPACE = "ml"
TEST_ONLY_ENV = "GPU_HEALTH_WEBHOOK_TEST_ONLY_NO_ALREADY_REMEDIATED"


def xid_line(code: int, gpu: int) -> str:
    return f"NVRM: Xid (PCI:0000:{BUS[gpu]}:00): {code}, pid=4242, name=python3, {XID_TEXT[code]}"


def sxid_line(code: int) -> str:
    return f"nvidia-nvswitch2: SXid (PCI:0000:07:00.0): {code}, Fatal, Link 12 LTSSM Fault Up"


@dataclass(frozen=True)
class SoakConfig:
    nodes: int = 50
    seconds: float = 180.0  # the schedule's length; the soak then settles for `settle` more
    seed: int = 1
    timings: Timings = field(default_factory=Timings)
    xid_poll: float = 0.25
    chaos: ChaosConfig = field(default_factory=ChaosConfig)
    am: ClusterTimings = field(default_factory=ClusterTimings)
    operator_delay: float = 8.0  # from a trip (and the storm's end) to the operator's breaker reset
    reboot_seconds: float = 3.0  # how long a reboot by our Job keeps the node away
    reset_seconds: float = 1.0  # how long a reset Job runs
    settle: float = 30.0
    deadline: float = 60.0  # a remediation older than this with no outcome at the end is stuck
    fleet_cap: tuple[int, float] = (8, 20.0)  # max_nodes, max_percent
    rate: tuple[tuple[str, int, str], ...] = (("cordon", 40, "1h"), ("drain", 40, "1h"), ("reset_gpu", 20, "1h"),
                                               ("reboot", 20, "1h"))
    breaker: tuple[str, int, float] = ("30s", 3, 6.0)  # window, min_nodes, max_percent
    cooldown: str = "60s"
    step_timeouts: str = "60s"  # drain timeout, Job timeout, reboot and reset verification
    poll: str = "200ms"
    pool_refresh: str = "5s"
    backfill_days: float = 0.0
    no_already_remediated_check: bool = False  # the test-only switch (SoakConfig.unchecked shows what it lets through)
    # The simulator stands in for as many machines as nodes: at 1,000 it would take the cores Prometheus needs on
    # one machine, which a real fleet's exporters never do (docs/sizing.md). 10: it yields to Prometheus.
    sim_nice: int = 0

    @classmethod
    def short(cls, seed: int = 1, **changes: Any) -> SoakConfig:
        """`make test`'s soak: what `benchmarks/fleet_soak.py --nodes 50 --interval 1s --minutes 3` runs."""
        return cls.at_scale(50, 3.0, seed, "1s", **changes)

    @classmethod
    def at_scale(cls, nodes: int = 1000, minutes: float = 10.0, seed: int = 1, interval: str = "15s",
                 **changes: Any) -> SoakConfig:
        """The benchmark's soak: production-like 15 s scrape and evaluation, the shipped fast-path Alertmanager
        route (group_wait 0s for critical alerts), exporters collecting every 15 s; 1 s settings shrink it."""
        fast = seconds(interval) < 5
        # resend_delay: how long Alertmanager keeps an alert Prometheus stopped sending (four times it); scaled
        # down so that the cold start's outage outlasts it, as a longer outage does at the 1 m default.
        # The exporters publish an Xid the moment they read it, between collection cycles: collecting every 2 s
        # instead of 1 s costs the fault-to-cordon path nothing and halves the simulator's CPU.
        timings = (Timings(resend_delay="1s", collect_interval="2s", slow_interval="4s") if fast else
                   Timings(scrape_interval=interval, evaluation_interval=interval, collect_interval=interval,
                           slow_interval="60s", group_wait=None, group_interval=None, resend_delay="15s",
                           alertmanager_file=ROOT / "deploy" / "alertmanager" / "alertmanager.fast-path.yml"))
        scale = 0.2 if fast else 1.0
        # At least five nodes with a fatal fault outside the storms, so that the latency figures mean something.
        operator_delay = 8.0 if fast else 60.0
        chaos = ChaosConfig(rack_size=min(32, max(2, nodes // 10)), fatal_share=max(0.01, 5 / nodes),
                            storm_window=8.0 if fast else 120.0, time_scale=scale,
                            storm_quiet=operator_delay + 10 * seconds(interval))
        base = cls(nodes=nodes, seconds=minutes * 60, seed=seed, timings=timings, chaos=chaos,
                   xid_poll=0.25 if fast else 1.0, operator_delay=operator_delay,
                   reboot_seconds=3.0 if fast else 30.0, reset_seconds=1.0 if fast else 10.0,
                   settle=30.0 if fast else 120.0, deadline=60.0 if fast else 300.0,
                   fleet_cap=(max(8, nodes // 25), 5.0 if nodes >= 200 else 20.0),
                   rate=(("cordon", max(40, nodes // 5), "1h"), ("drain", max(40, nodes // 5), "1h"),
                         ("reset_gpu", max(20, nodes // 10), "1h"), ("reboot", max(20, nodes // 10), "1h")),
                   # Above the background faults' rate, below a storm's (10 % within 8 s, or 2 minutes).
                   breaker=("15s" if fast else "5m", 3, 6.0 if nodes < 200 else 5.0),
                   # Short enough that a fixed fault firing again after the cold start meets the journal's
                   # already-remediated check, not the cooldown: that check is what the soak must see hold.
                   cooldown="5s" if fast else "60s", step_timeouts="60s" if fast else "5m",
                   poll="200ms" if fast else "1s", pool_refresh="5s" if fast else "30s",
                   backfill_days=0.0 if fast else 7.0, sim_nice=0 if fast else 10)
        return replace(base, **changes)

    @classmethod
    def unchecked(cls, seed: int = 1) -> SoakConfig:
        """The run that shows the oracle can fail: the journal's already-remediated check switched off (the
        test-only switch), two GPU resets, then a Prometheus cold start. A reset leaves its Xid in the log, so
        the wiped Prometheus fires it again as a new alert before it has scraped the webhook's history, and only
        the journal's check stands between that alert and a second remediation. Two faulty nodes of 20 and no
        storm: three nodes alerting at once fire GPURemediationStorm (keep_firing_for holds fixed ones for 10
        minutes), and the open breaker would hold the second remediation back (seen: it made the run pass). No stuck
        holder: its node would be rebooted, and a reboot leaves no Xid of the old boot to fire again."""
        c = cls.at_scale(20, 1.25, seed, "1s", settle=30.0, no_already_remediated_check=True,
                         breaker=("15s", 100, 100.0), fleet_cap=(20, 100.0))
        chaos = replace(c.chaos, storms=(), fatal_share=0.1, fatal_xids=(48, 95, 119), rollout_share=0.1,
                        nvswitch_trays=0, reboots=0, scrape_gaps=0, kube_api_outages=0, racks_down=0, restarts=(),
                        human_uncordons=0, stuck_holders=0, cold_start=True)
        return replace(c, chaos=chaos)

    def node_names(self) -> list[str]:
        return [f"fleet-{i:04d}" for i in range(self.nodes)]

    def webhook_config(self) -> dict[str, Any]:
        # A fault that needs a reboot gets one without trying a reset first; a reset that fails falls back to one.
        rules = [{"name": "reboot", "match_re": {"alertname": "GPU.+"},
                  "match": {"severity": "critical", "remediation": "reboot"},
                  "ladder": ["cordon", "drain", "reboot"], "requires_approval": []},
                 {"name": "reset", "match_re": {"alertname": "GPU.+"}, "match": {"severity": "critical"},
                  "ladder": ["cordon", "drain", "reset_gpu", "reboot"], "requires_approval": []}]
        window, min_nodes, percent = self.breaker
        return {
            "policy": {"dry_run": False, "max_alert_age": "1h",
                       "targets": {"node_selector": {"nvidia.com/gpu.present": "true"}}, "rules": rules},
            "safety": {
                "fleet_cap": {"max_nodes": self.fleet_cap[0], "max_percent": self.fleet_cap[1]},
                "rate_limits": {a: {"max": n, "per": per} for a, n, per in self.rate},
                "per_node": {"cooldown": self.cooldown, "max_attempts": 3, "attempts_window": "24h"},
                "breaker": {"window": window, "max_nodes": 100000, "max_percent": percent, "min_nodes": min_nodes,
                            "trip_on_truncated": True, "trip_on_alerts": ["GPURemediationStorm"]},
            },
            "executor": {"namespace": EXECUTOR_NAMESPACE, "image": "nvcr.io/nvidia/cuda:12.4.1-base-ubuntu22.04",
                         "poll_interval": self.poll, "job_timeout": self.step_timeouts},
            "engine": {"tick": "250ms", "pool_refresh": self.pool_refresh},
            "actions": {"drain": {"timeout": self.step_timeouts, "poll_interval": self.poll,
                                  "retry_interval": self.poll, "max_retry_interval": "2s"},
                        "reset_gpu": {"verify_timeout": self.step_timeouts, "verify_interval": self.poll},
                        "reboot": {"using": "executor", "verify_timeout": self.step_timeouts,
                                   "verify_interval": self.poll}},
        }

    def limits(self) -> Limits:
        cap_nodes, cap_percent = self.fleet_cap
        cap = min(cap_nodes, -(-self.nodes * cap_percent // 100))
        return Limits(int(cap), {a: (n, seconds(per)) for a, n, per in self.rate})

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["timings"] = {k: str(v) for k, v in out["timings"].items()}
        return out


@dataclass
class Report:
    config: SoakConfig
    events: list[Event]
    verdict: Verdict
    injected: list[Fault]
    skipped: list[str]  # faults not injected (the node was off), people who found nothing to uncordon
    rule_eval_ms: dict[str, list[float]]  # rule group -> evaluation times sampled during the run
    accept_p99_s: dict[str, float]  # "run", "storm 0", ... -> webhook accept latency p99 (seconds)
    failover: list[str]  # what the Alertmanager peer's death did to the latencies
    started: float
    ended: float
    notes: list[str] = field(default_factory=list)
    resets: list[ResetRun] = field(default_factory=list)  # the reset Jobs played, and what held the GPU then

    @property
    def violations(self) -> list[str]:
        return [v.line() for v in self.verdict.violations]

    def fault_to_cordon(self, q: float) -> float:
        return percentile(list(self.verdict.fault_to_cordon.values()), q)

    def rule_eval_p99_ms(self) -> tuple[str, float]:
        """The largest rule group (by its p99) and that p99."""
        if not self.rule_eval_ms:
            return "", 0.0
        group = max(self.rule_eval_ms, key=lambda g: percentile(self.rule_eval_ms[g], 99))
        return group, percentile(self.rule_eval_ms[group], 99)

    def as_json(self) -> dict[str, Any]:
        group, p99 = self.rule_eval_p99_ms()
        return {
            "seed": self.config.seed, "config": self.config.as_json(), "started": self.started, "ended": self.ended,
            "faults_injected": faults(self.events), "violations": self.violations,
            "fault_to_cordon_s": self.verdict.fault_to_cordon, "fault_to_cordon_p50_s": self.fault_to_cordon(50),
            "fault_to_cordon_p99_s": self.fault_to_cordon(99), "delayed": self.verdict.delayed,
            "counts": self.verdict.counts, "rule_eval_p99_ms": {g: percentile(v, 99)
                                                               for g, v in sorted(self.rule_eval_ms.items())},
            "largest_rule_group": group, "largest_rule_group_p99_ms": p99, "accept_p99_s": self.accept_p99_s,
            "failover": self.failover, "skipped": self.skipped, "notes": self.notes,
            "resets": [asdict(r) for r in self.resets],
            "injected": [asdict(f) for f in self.injected], "events": [e.as_json() for e in self.events],
        }


class SimClient:
    """The fleet simulator's control API (gpu_health_stack.fleetsim_http)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def post(self, path: str, body: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        return http_json(f"{self.url}/api/nodes{path}", body or {}, "POST", timeout=timeout)

    def nodes(self) -> dict[str, dict[str, Any]]:
        return {n["name"]: n for n in http_json(f"{self.url}/api/nodes", timeout=30)}


class Soak:
    def __init__(self, config: SoakConfig, *, progress: Callable[[str], None] | None = None,
                 keep_dir: bool = False) -> None:
        self.config = config
        self.say = progress or (lambda _msg: None)
        self.keep_dir = keep_dir
        self.events = schedule(config.seed, config.node_names(), config.seconds, config.chaos)
        self.injected: list[Fault] = []
        self.skipped: list[str] = []
        self.uncordons: list[PersonUncordon] = []
        self.down: set[str] = set()  # simulated nodes powered off or rebooting
        self.notes: list[str] = []
        self.rule_eval: dict[str, list[float]] = {}
        self.peer_down: list[tuple[float, float]] = []  # (killed, back) of an Alertmanager peer
        self.accept_samples: list[tuple[float, dict[float, float]]] = []  # (time, cumulative buckets)
        self.gaps: dict[str, list[tuple[float, float]]] = {}  # node -> (from, to) of its scrape gaps
        self.boots: dict[str, list[float]] = {}  # node -> its new boots by chaos (power loss, reboots)
        self.outages: list[tuple[float, float, str]] = []  # (from, to, what) of the components restarted
        self.holders: dict[str, str] = {}  # node -> a process of the chaos holding its GPU (a reboot ends it)
        self.resets: list[ResetRun] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._jobs_seen: set[str] = set()
        self._restarts: list[Future[None]] = []
        self._timers: list[tuple[float, int, Callable[[], None], str]] = []
        self._seq = 0
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="soak")
        self.started = time.time()  # again when the chaos starts

    # --- the world ------------------------------------------------------------------------------------

    def _build(self, stack: Stack) -> None:
        c = self.config
        names = c.node_names()
        self.say(f"soak: seed={c.seed} nodes={c.nodes} seconds={c.seconds:g} interval={c.timings.scrape_interval} "
                 f"faults={faults(self.events)} events={len(self.events)}")
        self.kube = KubeFake(keep_requests=32)  # the oracle reads the front's log
        stack.closers.append(self.kube)
        self.front = KubeFront(self.kube.url)
        stack.closers.append(self.front)
        for name in names:
            # Every node runs the GPU Operator's operands: a reset must pause them (and put them back).
            self.kube.add_node(name, provider_id=f"aws:///us-east-1a/i-{abs(hash(name)) % 16**12:012x}",
                               labels={**GPU_LABELS, **OPERATOR_LABELS})
            self.kube.add_pod(NAMESPACE, f"train-{name}", name)
        # The simulator: its own process, as benchmarks/fleet_sim.py runs it.
        sim_dir = stack.dir / "fleetsim"
        port = free_port()
        t = c.timings
        nice = ["nice", "-n", str(c.sim_nice)] if c.sim_nice else []
        self.sim_proc = Proc("fleetsim", [
            *nice, sys.executable, "-m", "gpu_health_stack.fleetsim", "--nodes", str(c.nodes), "--listen",
            f"127.0.0.1:{port}", "--dir", str(sim_dir), "--collect-interval", t.collect_interval,
            "--collect-interval.slow", t.slow_interval, "--collect-timeout", "500ms", "--xid-poll", str(c.xid_poll),
        ], stack.dir, cwd=ROOT)
        stack.extra.append(self.sim_proc)
        self.sim = SimClient(f"http://127.0.0.1:{port}")
        wait_until(lambda: len(self.sim.nodes()) == c.nodes, 120 + c.nodes * 0.2, "the simulator's nodes",
                   interval=0.5)
        boots = {n: d["boot_id"] for n, d in self.sim.nodes().items()}
        for name in names:
            self._boot(name, boots[name])
        stack.exporter_job_extra = {"file_sd_configs": [{"files": [str(sim_dir / "targets.json")],
                                                         "refresh_interval": "5s"}],
                                    "relabel_configs": FleetSim.relabel_configs()}
        stack.exporter_job_targets = lambda: c.nodes
        # The webhook, against the API front and every Alertmanager peer; the peers deliver to it.
        am_ports = [free_port() for _ in range(3)]
        config = base_webhook_config(stack, self.kube)
        config["kubernetes"]["host"] = self.front.url
        config["alertmanager"] = {"urls": [f"http://127.0.0.1:{p}" for p in am_ports]}
        config.update(c.webhook_config())
        env = {**os.environ, TEST_ONLY_ENV: "1"} if c.no_already_remediated_check else None
        self.webhook = Webhook(stack.dir / "webhook", config, env=env)
        stack.closers.append(self.webhook)
        am_config = stack.alertmanager_config(self.webhook.alerts_url, self.webhook.am_token_file)
        self.am = AlertmanagerCluster(stack.dir / "alertmanager", am_config, peers=3, timings=c.am, ports=am_ports)
        stack.closers.append(self.am)
        self.am.wait_settled()
        stack.alertmanager_targets = self.am.prometheus_targets()
        if c.backfill_days > 0:
            self._backfill(stack, names)
        self.say("soak: starting Prometheus")
        stack.start_prometheus([self.webhook.scrape_config()])

    def _backfill(self, stack: Stack, names: list[str]) -> None:
        from . import backfill

        fn = getattr(backfill, "backfill_rule_history", None)
        if fn is None:
            self.notes.append("no backfill: gpu_health_stack.backfill.backfill_rule_history is missing")
            return
        template = _http_text(f"{self.sim.url}/node/{names[0]}/metrics")
        t0 = time.monotonic()
        done = fn(stack.dir / "prom-data", template, names, days=self.config.backfill_days)
        self.notes.append(f"backfilled {self.config.backfill_days:g} days in {time.monotonic() - t0:.0f}s: {done}")
        self.say(self.notes[-1])

    def _boot(self, node: str, boot_id: str) -> None:
        """The kubelet's part after a boot: the Node reports the machine's boot id, Ready."""
        self.kube._patch(f"/api/v1/nodes/{node}", {"status": {"nodeInfo": {"bootID": boot_id},
                                                              "conditions": [{"type": "Ready", "status": "True"}]}})

    # --- applying the schedule -----------------------------------------------------------------------

    def _later(self, delay: float, fn: Callable[[], None], what: str) -> None:
        with self._lock:
            self._seq += 1
            heapq.heappush(self._timers, (time.monotonic() + delay, self._seq, fn, what))

    def _apply(self, e: Event, stack: Stack) -> None:
        p = e.params
        if e.kind in ("fatal_xid", "storm", "driver_rollout", "nvswitch_fatal"):
            for node in e.nodes:
                self._inject(e, node)
        elif e.kind in ("rack_power_loss", "reboot"):
            for node in e.nodes:
                self._power_off(node)
            for node in e.nodes:
                self._later(p["down_for"], lambda n=node: self._power_on(n), f"{node} back")
        elif e.kind == "scrape_gap":
            for node in e.nodes:
                self.sim.post(f"/{node}/gap", {"seconds": p["for"]})
                self.gaps.setdefault(node, []).append((time.time(), time.time() + p["for"]))
        elif e.kind == "kube_api":
            self.front.outage(p["mode"], p["for"])
            self.outages.append((time.time(), time.time() + p["for"] + 5, f"Kubernetes API {p['mode']}"))
        elif e.kind == "human_uncordon":
            node = e.nodes[0]
            if (self.kube.node(node).get("spec") or {}).get("unschedulable"):
                self.kube.uncordon(node)
                self.uncordons.append(PersonUncordon(time.time(), node))
            else:
                self.skipped.append(f"human_uncordon {node} at {e.at}: not cordoned")
        elif e.kind == "restart":
            self._restarts.append(self._pool.submit(self._restart, e, stack))
        elif e.kind == "stuck_holder":
            with self._lock:
                self.holders[e.nodes[0]] = str(e.params["process"])

    def _inject(self, e: Event, node: str) -> None:
        code = int(e.params.get("sxid") or e.params["xid"])
        if node in self.down:
            self.skipped.append(f"{e.kind} {code} on {node} at {e.at}: the node was off")
            return
        line = sxid_line(code) if e.kind == "nvswitch_fatal" else xid_line(code, int(e.params["gpu"]))
        at = time.time()
        self.sim.post(f"/{node}/kernel-log", {"lines": [line]})
        self.injected.append(Fault(at, node, e.kind, code, RUNG.get(code, "") if e.kind != "driver_rollout" else "",
                                   e.params.get("storm"), str(e.params.get("reset", ""))))

    def _power_off(self, node: str) -> None:
        with self._lock:
            if node in self.down:
                return
            self.down.add(node)
            self.holders.pop(node, None)  # its processes end with it
        self.sim.post(f"/{node}/stop")

    def _power_on(self, node: str, ours: bool = False) -> None:
        described = self.sim.post(f"/{node}/start", {"new_boot": True})
        boot = next(n["boot_id"] for n in described if n["name"] == node)
        self._boot(node, boot)
        if not ours:
            self.boots.setdefault(node, []).append(time.time())
        with self._lock:
            self.down.discard(node)

    def _restart(self, e: Event, stack: Stack) -> None:
        component, down_for = e.params["component"], float(e.params.get("down_for", 2.0))
        began = time.time()
        try:
            if component == "webhook":
                self.webhook.proc.kill()
                time.sleep(down_for)
                self.webhook.start()
            elif component == "alertmanager":
                peer = int(e.params.get("peer", 0))
                killed = time.time()
                self.am.kill(peer)
                time.sleep(down_for)
                self.am.start(peer)
                self.peer_down.append((killed, time.time()))
            elif component == "prometheus":
                assert stack.prometheus is not None
                stack.prometheus.stop()
                time.sleep(down_for)
                stack.prometheus.start()
                stack.prometheus.wait_http(f"{stack.prom_url}/-/ready", timeout=600)
            elif component == "cold_start":
                self._cold_start(stack, down_for)
            elif component == "exporter":
                node = e.nodes[0]
                if node not in self.down:
                    self.sim.post(f"/{node}/restart")
            if component in ("webhook", "prometheus", "cold_start"):
                # Until Prometheus has evaluated its rules again and the webhook answers, every fault waits.
                settle = 3 * seconds(self.config.timings.scrape_interval)
                self.outages.append((began, time.time() + settle, f"{component} restart"))
            self.say(f"soak: restarted {component}")
        except Exception as exc:  # noqa: BLE001 - a failed restart is a finding, not the end of the run
            self.notes.append(f"restart of {component} failed: {exc!r}")

    def _cold_start(self, stack: Stack, down_for: float) -> None:
        """Prometheus without a volume, down long enough for Alertmanager to resolve what it sent and to tell the
        webhook; then started from nothing while the webhook is away, so that fixed faults whose Xid is still in
        the log fire again as new alerts before the webhook's history is scraped. Each step waits for what it
        needs to have happened, not for a time: under a loaded CI machine a computed sleep left the resolved
        notices undelivered, or brought the webhook back before the alerts had fired (both seen: the second
        remediation then never came)."""
        assert stack.prometheus is not None
        c = self.config
        patience = 120 + c.nodes * 0.2
        killed = time.monotonic()
        stack.prometheus.stop()
        shutil.rmtree(stack.dir / "prom-data", ignore_errors=True)
        # Alertmanager sends an alert again only if the last notification it delivered differs (its notification
        # log holds fingerprints, not startsAt): a resolved notice lost to a dead webhook would keep the new
        # alert from it until the repeat interval.
        self._noting(lambda: wait_until(lambda: self._remediated_still_firing() == 0, patience,
                                        "the webhook told of every remediated alert's resolution", interval=0.2))
        self.webhook.proc.kill()
        stack.prometheus.start()
        stack.prometheus.wait_http(f"{stack.prom_url}/-/ready", timeout=600)
        self._noting(lambda: wait_until(
            lambda: (stack.query('count(up{job="gpu-health-exporter"})') or [0.0])[0] >= c.nodes, patience,
            "a first scrape of every node", interval=0.2))
        # Two rounds, so that one whole evaluation of every group came after those first scrapes.
        self._noting(lambda: stack.wait_rule_evaluations(time.time(), rounds=2, timeout=patience))
        time.sleep(max(0.0, down_for - (time.monotonic() - killed)))
        self.webhook.start()

    def _noting(self, step: Callable[[], object]) -> None:
        """A cold-start step that timed out is a finding in the report's notes, not the end of the run."""
        try:
            step()
        except TimeoutError as exc:
            self.notes.append(f"cold start: {exc}")

    def _remediated_still_firing(self) -> int:
        """Alerts that started a remediation whose latest occurrence the webhook's journal still has as firing."""
        journal = sqlite3.connect(f"file:{self.webhook.home / 'journal.db'}?mode=ro", uri=True)
        try:
            return int(journal.execute(
                "SELECT count(*) FROM occurrence o WHERE o.status = 'firing' AND o.fingerprint IN "
                "(SELECT fingerprint FROM occurrence WHERE remediation_id IS NOT NULL) AND o.first_seen = "
                "(SELECT max(first_seen) FROM occurrence WHERE fingerprint = o.fingerprint)").fetchone()[0])
        finally:
            journal.close()

    # --- what kmock has no controller for ----------------------------------------------------------------

    def _controller(self, stack: Stack) -> None:
        storms = sorted({(int(e.params["storm"]), str(e.params["reset"])) for e in self.events if e.kind == "storm"})
        last_storm_fault = {i: max(e.at for e in self.events if e.kind == "storm" and e.params["storm"] == i)
                            for i, _ in storms}
        step = seconds(self.config.timings.evaluation_interval)
        next_rules = 0.0
        while not self._stop.wait(0.5):
            try:
                self._play_jobs()
            except Exception as exc:  # noqa: BLE001
                self.notes.append(f"job controller: {exc!r}")
            try:
                self._operator(storms, last_storm_fault)
            except Exception:  # noqa: BLE001 - the webhook may be down (SIGKILL); ask again
                pass
            if time.monotonic() >= next_rules:
                next_rules = time.monotonic() + max(step, 2.0)
                self._sample_rules(stack)
                self._sample_accept()

    def _play_jobs(self) -> None:
        for job in self.kube.jobs(EXECUTOR_NAMESPACE):
            meta = job.get("metadata") or {}
            name = str(meta.get("name"))
            if name in self._jobs_seen:
                continue
            self._jobs_seen.add(name)
            node = str((meta.get("annotations") or {}).get("gpu-health.io/node", ""))
            action = str((meta.get("labels") or {}).get("gpu-health.io/action", ""))
            self._pool.submit(self._run_job, name, node, action)

    def _run_job(self, name: str, node: str, action: str) -> None:
        try:
            if action == "reboot":
                time.sleep(self.config.reboot_seconds / 2)
                self._power_off(node)
                time.sleep(self.config.reboot_seconds / 2)
                self._power_on(node, ours=True)
            else:
                # What the Job's script meets on the node (remediation_webhook/reset_gpu.sh): the operands' device
                # files unless the webhook paused them, and the chaos's holder; either makes it refuse, exit 10.
                labels = (self.kube.node(node).get("metadata") or {}).get("labels") or {}
                unpaused = tuple(k for k in OPERATOR_LABELS if labels.get(k) == "true" and not k.endswith("driver"))
                with self._lock:
                    holder = self.holders.get(node, "")
                self.resets.append(ResetRun(time.time(), node, unpaused, holder))
                held = [*(k.rsplit(".", 1)[1] for k in unpaused), *([holder] if holder else [])]
                if held:
                    self.kube.finish_job(EXECUTOR_NAMESPACE, name, succeeded=False, exit_code=10,
                                         report=f"processes that nobody paused hold the GPU (pid:name): "
                                                f"{' '.join(f'{4000 + i}:{h}' for i, h in enumerate(held))}")
                    return
                time.sleep(self.config.reset_seconds)
            self.kube.finish_job(EXECUTOR_NAMESPACE, name)
        except Exception as exc:  # noqa: BLE001
            self.notes.append(f"job {name} on {node}: {exc!r}")

    def _operator(self, storms: list[tuple[int, str]], last_fault: dict[int, float]) -> None:
        """An operator who, once the storm that tripped the breaker is over, resets it the way the schedule says
        for that storm (the last one begun before the trip; resume for a trip no storm explains)."""
        b = self.webhook.breaker()
        if not b.get("open"):
            return
        since = float(b.get("since") or time.time())
        first = {i: min(e.at for e in self.events if e.kind == "storm" and e.params["storm"] == i) for i, _ in storms}
        slack = self.config.operator_delay + 10 * seconds(self.config.timings.evaluation_interval)
        begun = [(i, mode) for i, mode in storms
                 if self.started + first[i] <= since <= self.started + last_fault[i] + slack]
        i, mode = begun[-1] if begun else (-1, "resume")
        storm_over = self.started + (last_fault[i] if i >= 0 else 0) + self.config.operator_delay
        if time.time() < max(since + self.config.operator_delay, storm_over):
            return
        self.webhook.admin("/v1/breaker:reset", {"mode": mode, "reason": f"soak operator after storm {i}"}, "POST")
        self.say(f"soak: breaker reset ({mode}) after it tripped at {since - self.started:.1f}s: {b.get('reason')}")

    def _sample_accept(self) -> None:
        """The webhook's accept-latency histogram, read from its own /metrics (Prometheus may lose it in the cold
        start); a SIGKILL starts the counts over, which _accept_latency rides over."""
        try:
            text = self.webhook.metrics()
        except Exception:  # noqa: BLE001 - the webhook is down: no sample
            return
        buckets: dict[float, float] = {}
        for line in text.splitlines():
            if line.startswith("gpu_remediation_webhook_accept_duration_seconds_bucket{"):
                le = line.split('le="', 1)[1].split('"', 1)[0]
                buckets[float("inf") if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
        if buckets:
            self.accept_samples.append((time.time(), buckets))

    def _sample_rules(self, stack: Stack) -> None:
        try:
            groups = http_json(f"{stack.prom_url}/api/v1/rules", timeout=5)["data"]["groups"]
        except Exception:  # noqa: BLE001 - Prometheus restarting
            return
        for g in groups:
            if g.get("lastEvaluation", "").startswith("0001"):
                continue
            self.rule_eval.setdefault(g["name"], []).append(float(g.get("evaluationTime") or 0) * 1000)

    # --- the run -----------------------------------------------------------------------------------------

    def run(self) -> Report:
        c = self.config
        with Stack(timings=c.timings, keep_dir=self.keep_dir) as stack:
            self._build(stack)
            self.started = time.time()
            t0 = time.monotonic()
            self.say(f"soak: running {c.seconds:g}s of chaos")
            controller = threading.Thread(target=self._controller, args=(stack,), name="soak-controller",
                                          daemon=True)
            controller.start()
            try:
                pending = list(self.events)
                end = t0 + c.seconds
                last_say = t0
                while time.monotonic() < end or self._timers:
                    now = time.monotonic()
                    while pending and t0 + pending[0].at <= now:
                        self._apply(pending.pop(0), stack)
                    while self._timers and self._timers[0][0] <= now:
                        with self._lock:
                            _, _, fn, _ = heapq.heappop(self._timers)
                        fn()
                    if now - last_say >= 30:
                        last_say = now
                        self.say(f"soak: {now - t0:.0f}s, {len(self.injected)} faults injected, "
                                 f"{len(self.events) - len(pending)} of {len(self.events)} events")
                    time.sleep(0.05)
                # The settle counts from the last restart's end: the cold start at 15 s settings takes minutes
                # (Alertmanager resolving, then Prometheus empty before the webhook is back), and a run that ended
                # as the webhook came back judged its first decisions as stuck (seen at 1,000 nodes).
                wait(self._restarts)
                self.say(f"soak: schedule done; settling {c.settle:g}s")
                time.sleep(c.settle)
            finally:
                self._stop.set()
                controller.join(10)
                self._pool.shutdown(wait=True)
            ended = time.time()
            verdict = judge(self._evidence(ended))
            accept = self._accept_latency(ended)
            failover = self._failover(verdict)
        return Report(c, self.events, verdict, self.injected, self.skipped, self.rule_eval, accept, failover,
                      self.started, ended, self.notes, self.resets)

    # --- evidence ------------------------------------------------------------------------------------------

    def _evidence(self, ended: float) -> Evidence:
        c = self.config
        journal = sqlite3.connect(f"file:{self.webhook.home / 'journal.db'}?mode=ro", uri=True)
        journal.row_factory = sqlite3.Row
        try:
            rems = [Rem(r["id"], r["node"], r["state"], r["reason"], r["created_at"], r["finished_at"],
                        r["state_since"])
                    for r in journal.execute("SELECT * FROM remediation")]
            node_of = {r.id: r.node for r in rems}
            steps = [Step(s["remediation_id"], node_of.get(s["remediation_id"], ""), s["action"], s["started_at"],
                          s["finished_at"], s["outcome"])
                     for s in journal.execute("SELECT * FROM step ORDER BY started_at")]
            occs = [Occ(o["node"] or "", o["alertname"], o["starts_ts"], o["fault_ts"], o["first_seen"],
                        o["decision"], o["reason"], o["remediation_id"])
                    for o in journal.execute("SELECT * FROM occurrence")]
            audit = [(a["ts"], a["event"], json.loads(a["detail_json"] or "{}")) for a in journal.execute(
                "SELECT * FROM audit WHERE event IN ('breaker_tripped','breaker_reset') ORDER BY ts")]
        finally:
            journal.close()
        spans: list[BreakerSpan] = []
        for ts, event, detail in audit:
            if event == "breaker_tripped":
                spans.append(BreakerSpan(ts, None, "", str(detail.get("reason", ""))))
            elif spans and spans[-1].reset is None:
                spans[-1] = replace(spans[-1], reset=ts, mode=str(detail.get("mode", "")))
        calls = [_call(entry) for entry in list(self.front.log)]
        return Evidence(self.injected, calls, steps, rems, occs, spans, self.uncordons, c.limits(), ended,
                        c.deadline, storm_slack=c.operator_delay + 10 * seconds(c.timings.evaluation_interval),
                        gaps=self.gaps, boots=self.boots, outages=self.outages, resets=self.resets,
                        operands=self._operands_changed())

    def _operands_changed(self) -> dict[str, dict[str, str]]:
        out = {}
        for node in self.kube.nodes():
            labels = (node.get("metadata") or {}).get("labels") or {}
            changed = {k: str(labels.get(k, "")) for k in OPERATOR_LABELS if labels.get(k) != "true"}
            changed.update({k: v for k, v in labels.items() if k == "gpu-health.io/operands-paused"})
            if changed:
                out[str(node["metadata"]["name"])] = changed
        return out

    def _accept_latency(self, ended: float) -> dict[str, float]:
        """The webhook's accept latency p99 (seconds; the histogram's bucket bound) over the run and around each
        storm, from the sampled histograms: increases between samples, a counter reset (SIGKILL) skipped."""
        out: dict[str, float] = {}
        windows = {"run": (self.started, ended)}
        for i in sorted({int(e.params["storm"]) for e in self.events if e.kind == "storm"}):
            ats = [self.started + e.at for e in self.events if e.kind == "storm" and e.params["storm"] == i]
            windows[f"storm {i}"] = (min(ats), max(ats) + 30)
        samples = self.accept_samples
        for label, (lo, hi) in windows.items():
            total: dict[float, float] = {}
            for (t0, a), (t1, b) in zip(samples, samples[1:]):
                if t1 < lo or t0 > hi or any(b.get(le, 0) < n for le, n in a.items()):
                    continue
                for le, n in b.items():
                    total[le] = total.get(le, 0.0) + n - a.get(le, 0.0)
            count = total.get(float("inf"), 0.0)
            out[label] = (next((le for le in sorted(total) if total[le] >= 0.99 * count), float("nan"))
                          if count else float("nan"))
        return out

    def _failover(self, verdict: Verdict) -> list[str]:
        lines = []
        for killed, back in self.peer_down:
            during = {k: v for k, v in verdict.fault_to_cordon.items()
                      if killed <= float(k.rsplit(" at ", 1)[1].split()[0]) <= back + 5}
            lines.append(f"Alertmanager peer down {back - killed:.1f}s from {killed - self.started:.1f}s "
                         f"(peer timeout {self.config.am.peer_timeout}): fault-to-cordon of faults in that window "
                         f"{sorted(round(v, 2) for v in during.values()) or 'none'}")
        return lines


def _run(config: SoakConfig, queue: Any) -> None:
    try:
        queue.put(Soak(config).run())
    except BaseException as exc:  # noqa: BLE001 - handed to the parent
        queue.put(exc)


def run_in_process(config: SoakConfig, timeout: float = 1800.0) -> Report:
    """The soak in a process of its own (spawned), so that two soaks at once do not share one interpreter."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run, args=(config, queue), name="soak", daemon=False)
    proc.start()
    try:
        out = queue.get(timeout=timeout)
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.terminate()
    if isinstance(out, BaseException):
        raise out
    return out


def _call(entry: tuple[float, str, str, int, bytes]) -> Call:
    """A request from the front's log as the oracle reads it: which node, and what it does to it."""
    at, method, path, status, body = entry
    path = urllib.parse.urlsplit(path).path
    parts = path.strip("/").split("/")
    action, node = "", ""
    try:
        data = json.loads(body) if body else {}
    except ValueError:
        data = {}
    if method == "PATCH" and len(parts) == 4 and parts[:3] == ["api", "v1", "nodes"]:
        node = parts[3]
        spec = (data or {}).get("spec") or {}
        if spec.get("unschedulable") is True:
            action = "cordon"
        elif spec.get("unschedulable") is False:
            action = "uncordon"
    elif method == "POST" and path.endswith("/eviction") and len(parts) >= 6:
        action, node = "evict", parts[5].removeprefix("train-")
    elif method == "POST" and parts[:3] == ["apis", "batch", "v1"] and parts[-1] == "jobs":
        meta = (data or {}).get("metadata") or {}
        node = str((meta.get("annotations") or {}).get("gpu-health.io/node", ""))
        action = f"job:{(meta.get('labels') or {}).get('gpu-health.io/action', '')}"
    return Call(at, method, path, status, action, node)


def _http_text(url: str) -> str:
    return http_get(url, timeout=30).decode()
