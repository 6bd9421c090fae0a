#!/usr/bin/env python3
"""What rules/ costs Debian's Prometheus at N simulated 8-GPU nodes, with the history the long-window rules read.

Run from the repository's venv (the 1,000-node run takes about 8 minutes on 2 cores; take the shared lock):

    flock /tmp/gpu-health-bench.lock .venv/bin/python benchmarks/rule_eval.py --nodes 1000 --days 7

It starts the fleet simulator (`python -m gpu_health_stack.fleetsim`, collection every 15 s, slow tier 60 s, as
benchmarks/fleet_sim.py does), writes --days of history of every series a rule reads an hour or more into the past
for every node (gpu_health_stack.backfill.backfill_rule_history: one sample every --step seconds, and within the
reach of the rules that read a series as densely as Prometheus would hold it; each node's own labels taken from its
exposition; with --min-reach 300, the default, the [15m] and [5m] windows are filled too, so that the first
evaluations read full windows) into Prometheus' data directory, starts Prometheus with rules/ (or --rules DIR) at a
15 s scrape and evaluation interval (gpu_health_stack.stack.Stack, the configuration the end-to-end tests use),
waits until every node is `up` and every rule group at the evaluation interval has been evaluated twice, then for
--window seconds (long enough for the groups with an interval of 5 minutes to be evaluated once) records every
evaluation of every group (`evaluationTime` of /api/v1/rules, the value Prometheus also exports as
`prometheus_rule_group_last_duration_seconds`) and prints:

* per group: evaluations seen, p50, p99 and max in ms; the costliest rules of the largest groups;
* series per node and per GPU (Prometheus' head series over the nodes) and samples per node scrape;
* Prometheus' RSS (now and its peak) and CPU over the window, each also per 1,000 nodes;
* the simulator's CPU and every other process's, since on 2 cores they make an evaluation wait;
* with --profile N, each rule of the N costliest groups run alone as a query: its time and the samples it read.

--sim-nice 10 lets the simulator yield the cores to Prometheus. The last line is exactly
`rule_eval_p99_ms=<p99 of the group with the largest p99>`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.fleet_sim import CLK_TCK, close_all, cpu_seconds, pct, start_fleet, status  # noqa: E402
from gpu_health_stack.backfill import backfill_rule_history  # noqa: E402
from gpu_health_stack.fleetsim import FleetSim  # noqa: E402
from gpu_health_stack.procs import http_get, http_json, wait_until  # noqa: E402
from gpu_health_stack.rule_windows import rule_files  # noqa: E402
from gpu_health_stack.stack import Stack, Timings, _unix, missing_binaries, seconds  # noqa: E402


class RulesStack(Stack):
    """The stack with the rule files of another directory (a rule set before and after a change, side by side)."""

    def __init__(self, rules: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rules = rules

    def prometheus_config(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        config = super().prometheus_config(*args, **kwargs)
        config["rule_files"] = [str(p) for p in rule_files(self.rules)]
        return config


def rules_state(stack: Stack) -> list[dict[str, Any]]:
    return list(http_json(f"{stack.prom_url}/api/v1/rules", timeout=60)["data"]["groups"])


def own_metric(stack: Stack, name: str) -> float:
    """One unlabelled sample of Prometheus' own /metrics."""
    for line in http_get(f"{stack.prom_url}/metrics", timeout=30).decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def sample_groups(stack: Stack, window: float) -> tuple[dict[str, list[float]], dict[str, float],
                                                       dict[str, tuple[float, float]]]:
    """Every evaluation of every group during `window` seconds (seconds each), each rule's longest one, and when
    each group's slowest evaluation began (seconds, unix time). /api/v1/rules is polled more often than the groups
    are evaluated; an evaluation is its lastEvaluation."""
    seen: dict[str, set[str]] = defaultdict(set)
    took: dict[str, list[float]] = defaultdict(list)
    rule_max: dict[str, float] = defaultdict(float)
    slowest: dict[str, tuple[float, float]] = {}
    interval = seconds(stack.timings.evaluation_interval)
    until = time.monotonic() + window
    while time.monotonic() < until:
        for group in rules_state(stack):
            # Never evaluated yet (the hourly group early on): Prometheus reports a zero time, not an evaluation.
            if group["lastEvaluation"].startswith("0001") or group["lastEvaluation"] in seen[group["name"]]:
                continue
            seen[group["name"]].add(group["lastEvaluation"])
            took[group["name"]].append(float(group["evaluationTime"]))
            if float(group["evaluationTime"]) > slowest.get(group["name"], (-1.0, 0.0))[0]:
                slowest[group["name"]] = (float(group["evaluationTime"]), _unix(group["lastEvaluation"]))
            for rule in group["rules"]:
                key = f"{group['name']} / {rule['name']}"
                rule_max[key] = max(rule_max[key], float(rule["evaluationTime"]))
        time.sleep(min(3.0, interval / 4))
    return took, rule_max, slowest


# What Prometheus' storage does besides the rules: each of these holds queries up, or takes a core, for a while.
TSDB_COUNTERS = ("prometheus_tsdb_compactions_total", "prometheus_tsdb_reloads_total",
                 "prometheus_tsdb_head_truncations_total", "prometheus_tsdb_checkpoint_creations_total")
TSDB_LOG = re.compile(r"compact|write block|head gc|checkpoint|reload|deleting obsolete", re.I)


def tsdb_events(log: Path, since: float, until: float) -> list[tuple[float, str]]:
    """Prometheus' log lines about compaction, head GC, checkpoints and block reloads in [since, until]."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        m = re.search(r"ts=(\S+)", line)
        if m and TSDB_LOG.search(line):
            try:
                at = _unix(m.group(1))
            except ValueError:
                continue
            if since <= at <= until:
                msg = re.search(r'msg="?([^"]*)"?', line)
                out.append((at, msg.group(1) if msg else line[:120]))
    return out


def busy_seconds() -> float:
    """CPU seconds this machine has spent busy (all cores, all processes), from /proc/stat."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK  # all but idle and iowait


def profile(stack: Stack, groups: list[str]) -> None:
    """Each rule of `groups` as one instant query on its own (stats=all): Prometheus' own evaluation time and the
    samples it read. Alone, a rule does not wait on the other groups' evaluations for a core."""
    wanted = [(g["name"], r) for g in rules_state(stack) if g["name"] in groups for r in g["rules"]]
    for group, rule in wanted:
        # count() so that the answer is one number, not thousands of series to encode.
        query = urllib.parse.urlencode({"query": f"count({rule['query']})", "stats": "all"})
        stats = http_json(f"{stack.prom_url}/api/v1/query?{query}", timeout=120)["data"]["stats"]
        print(f"  {group} / {rule['name']}: {1000 * stats['timings']['evalTotalTime']:.1f} ms alone, "
              f"{stats['samples']['totalQueryableSamples']} samples read")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--days", type=float, default=7.0, help="history written before Prometheus starts (default 7)")
    p.add_argument("--step", type=float, default=900.0, help="seconds between backfilled samples (default 900)")
    p.add_argument("--min-reach", type=float, default=300.0,
                   help="backfill what rules read this many seconds back or more (default 300: the [15m] and [5m] "
                        "windows too, over themselves, so that the window measures full windows from its start)")
    p.add_argument("--interval", default="15s", help="scrape and evaluation interval, and collection (default 15s)")
    p.add_argument("--slow-interval", default="60s", help="the nodes' slow collection tier (default 60s)")
    p.add_argument("--window", type=float, default=300.0,
                   help="seconds of evaluations recorded (default 300: every group, the 5-minute one included)")
    p.add_argument("--exporter-flag", action="append", default=[], metavar="FLAG",
                   help="an exporter flag every node gets, e.g. --exporter-flag=--collector.nvlink.per-link")
    p.add_argument("--rules", type=Path, default=REPO / "rules", metavar="DIR",
                   help="the rule files (*.rules.yaml, *.alerts.yaml) of this directory (default rules/)")
    p.add_argument("--sim-nice", type=int, default=0, metavar="N",
                   help="run the simulator at this nice value (default 0; 10: it yields to Prometheus, which in "
                        "production has its machine without the 1,000 nodes' exporters on it)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="afterwards, run each rule of the N costliest groups alone and print its time and samples")
    args = p.parse_args()
    if missing_binaries():
        raise SystemExit(f"needs {missing_binaries()}")
    print(f"settings: {args.nodes} nodes of 8 simulated H100s, collection {args.interval} (slow tier "
          f"{args.slow_interval}), Prometheus {Path('/usr/bin/prometheus').resolve()} with {args.rules} at scrape and "
          f"evaluation interval {args.interval}, {args.days:g} days backfilled at a {args.step:g} s step (every "
          f"window of {args.min_reach:g} s or more), "
          f"window {args.window:g} s, exporter flags {args.exporter_flag or 'none'}, simulator at nice "
          f"{args.sim_nice}, {os.cpu_count()} cores",
          flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="rule-eval-bench-"))
    proc = None
    stack = None
    try:
        t0 = time.monotonic()
        proc, port, started_in = start_fleet(args, scratch / "fleet")
        print(f"fleetsim: {args.nodes} nodes started in {started_in} s", flush=True)
        for task in os.listdir(f"/proc/{proc.pid}/task"):  # every thread: nice is per thread on Linux
            os.setpriority(os.PRIO_PROCESS, int(task), args.sim_nice)
        nodes = [g["labels"]["node"] for g in http_json(f"http://127.0.0.1:{port}/sd", timeout=30)]
        stack = RulesStack(args.rules.resolve(), timings=Timings(
            scrape_interval=args.interval, evaluation_interval=args.interval, collect_interval=args.interval,
            slow_interval=args.slow_interval))
        stack.exporter_job_extra = {"file_sd_configs": [{"files": [str(scratch / "fleet" / "targets.json")]}],
                                    "relabel_configs": FleetSim.relabel_configs()}
        stack.exporter_job_targets = lambda: args.nodes

        def exposition(node: str) -> str:
            return http_get(f"http://127.0.0.1:{port}/node/{node}/metrics", timeout=30).decode()

        written = backfill_rule_history(stack.dir / "prom-data", exposition, nodes, days=args.days, step=args.step,
                                        min_reach=args.min_reach, files=rule_files(args.rules))
        print(f"backfill: {written['series']} series ({', '.join(written['names'])}; recorded: "
              f"{', '.join(written['recorded']) or 'none'}), {written['samples']} samples, {written['blocks']} "
              f"block(s) of {written['bytes'] / 2**20:.1f} MiB, in {written['seconds']:.1f} s "
              f"{written['phases']}", flush=True)
        for name, grids in written["fine"].items():
            print(f"backfill: {name} " + ", ".join(f"every {every:g} s over the last {span / 3600:.3g} h"
                                                   for span, every in grids) + " (what the rules read)")
        for name, why in written["skipped"].items():
            print(f"backfill: skipped {name}: {why}")
        stack.start_prometheus()
        assert stack.prometheus is not None and stack.prometheus.popen is not None
        prom_pid = stack.prometheus.popen.pid
        up_at = time.time()
        print(f"prometheus: every node up {time.monotonic() - t0:.0f} s after the start", flush=True)
        # Two evaluations of every group at the evaluation interval; a group with an interval of its own (the 5-minute
        # NVLink history) is seen in the window when it comes.
        wait_until(lambda: all(_unix(g["lastEvaluation"]) > up_at + seconds(args.interval)
                               for g in rules_state(stack) if g["interval"] <= seconds(args.interval)),
                   10 * seconds(args.interval) + 120, "two evaluations of every group", interval=1.0)
        c0, p0, b0, w0 = cpu_seconds(proc.pid), cpu_seconds(prom_pid), busy_seconds(), time.monotonic()
        tsdb0, began = {k: own_metric(stack, k) for k in TSDB_COUNTERS}, time.time()
        took, rule_max, slowest = sample_groups(stack, args.window)
        window = time.monotonic() - w0
        tsdb = {k: own_metric(stack, k) - v for k, v in tsdb0.items()}
        events = tsdb_events(stack.prometheus.log_path, began - 30, time.time())
        prom_cores = (cpu_seconds(prom_pid) - p0) / window
        sim_cores = (cpu_seconds(proc.pid) - c0) / window
        # Everything else on the machine (this script included), so that a busy neighbour shows in the numbers.
        other_cores = (busy_seconds() - b0) / window - prom_cores - sim_cores
        head = own_metric(stack, "prometheus_tsdb_head_series")
        samples = stack.query(f'sum(scrape_samples_scraped{{job="gpu-health-exporter"}})')
        rss, hwm = status(prom_pid, "VmRSS") / 1024, status(prom_pid, "VmHWM") / 1024
        per_k = 1000 / args.nodes

        print(f"{'group':<40} {'evals':>5} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}")
        ranked = sorted(took, key=lambda g: pct(took[g], 0.99), reverse=True)
        for group in ranked:
            values = took[group]
            print(f"{group:<40} {len(values):>5} {1000 * pct(values, 0.5):>9.1f} {1000 * pct(values, 0.99):>9.1f} "
                  f"{1000 * max(values):>9.1f}")
        for group in ranked[:3]:
            worst, at = slowest[group]
            near = [f"{what} at {t - at:+.1f} s" for t, what in events if at - 30 <= t <= at + worst + 5]
            print(f"  slowest {group}: {1000 * worst:.0f} ms from {at - began:.0f} s into the window; storage work "
                  f"around it: {'; '.join(near) or 'none logged'}")
            costly = sorted((k for k in rule_max if k.startswith(group + " / ")), key=rule_max.__getitem__,
                            reverse=True)[:3]
            print("  costliest rules: " + "; ".join(f"{k.split(' / ', 1)[1]} {1000 * rule_max[k]:.1f} ms"
                                                    for k in costly))
        print(f"series: {head:.0f} head series, {head / args.nodes:.0f} per node, {head / args.nodes / 8:.1f} per "
              f"GPU; {samples[0] / args.nodes if samples else 0:.0f} samples per node scrape")
        print(f"prometheus: RSS {rss:.0f} MiB (peak {hwm:.0f} MiB), {rss * per_k:.0f} MiB per 1,000 nodes "
              f"(peak {hwm * per_k:.0f}); CPU {prom_cores:.3f} cores, {prom_cores * per_k:.3f} per 1,000 nodes; "
              f"fleetsim {sim_cores:.3f} cores; every other process {other_cores:.3f} cores; measured over "
              f"{window:.0f} s")
        print("prometheus storage during the window: " + ", ".join(f"{k.removeprefix('prometheus_tsdb_')} "
                                                                  f"+{v:.0f}" for k, v in tsdb.items()))
        if args.profile:
            print(f"each rule alone (the {args.profile} costliest groups):")
            profile(stack, ranked[: args.profile])
        largest = ranked[0]
        print(f"rule_eval_p99_ms={1000 * pct(took[largest], 0.99):.1f}")
    finally:
        close_all(stack, proc, scratch)
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "rule-eval-bench"
    sys.exit(main())
