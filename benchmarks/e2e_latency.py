"""Fatal Xid to cordon, end to end on the real servers: the XID 79 scenario of tests/e2e, measured.

Each run starts the e2e stack afresh (four simulated-GPU exporters, Debian's Prometheus with rules/, Debian's
Alertmanager with the shipped route, the webhook live against kmock, moto's auto scaling group), writes an Xid 79
line to node-a's kernel log and measures, on the one host clock, from that write to the end of the webhook's
cordon step (its journal) and to the end of the replace (the instance terminated in its group, a replacement in
service).

    python benchmarks/e2e_latency.py               # 5 runs: 1 s scrape and evaluation, group_wait 0s (the test
                                                   # configuration); last line fault_to_cordon_p50_s=<value>
    python benchmarks/e2e_latency.py --fast-path   # 1 run with deploy/prometheus/prometheus.fast-path.yml and
                                                   # deploy/alertmanager/alertmanager.fast-path.yml exactly;
                                                   # last line fast_path_fault_to_cordon_s=<value>

Needs Debian's prometheus and prometheus-alertmanager, and the test extras (kmock, moto).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_health_stack.fleet import Fleet
from gpu_health_stack.procs import wait_until
from gpu_health_stack.scenarios import policy_config, wait_step, xid79
from gpu_health_stack.stack import Timings, missing_binaries, seconds


def one_run(timings: Timings) -> tuple[float, float, str]:
    fleet = Fleet.start({"node-a": None, "node-b": None, "node-c": None, "node-d": None},
                        webhook_config=policy_config, cloud="moto", timings=timings)
    try:
        # The fault lands at a random phase of the scrape and evaluation cycles, as a real one would.
        cycle = max(seconds(timings.scrape_interval), seconds(timings.evaluation_interval))
        time.sleep(random.uniform(0, cycle))
        injected = time.time()
        fleet.stack.inject_xid("node-a", xid79(3))
        timeout = 60 + 4 * cycle
        cordon = wait_step(fleet.webhook, "node-a", "cordon", timeout, since=injected)
        replace = wait_step(fleet.webhook, "node-a", "replace", timeout, since=injected)
        assert fleet.aws is not None
        wait_until(lambda: fleet.instances["node-a"] not in fleet.aws.instance_ids(), 10, "the instance to go")
        return cordon["finished_at"] - injected, replace["finished_at"] - injected, cordon["remediation"]["alertname"]
    finally:
        fleet.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--fast-path", action="store_true",
                        help="one run with the shipped fast-path Prometheus and Alertmanager configuration")
    args = parser.parse_args()
    if missing_binaries():
        print(f"needs {missing_binaries()}: sudo apt-get install prometheus prometheus-alertmanager", file=sys.stderr)
        return 2
    timings = Timings.fast_path() if args.fast_path else Timings()
    runs = 1 if args.fast_path else args.runs
    print(f"scrape {timings.scrape_interval}, evaluation {timings.evaluation_interval}, exporter collection "
          f"{timings.collect_interval}, Alertmanager {timings.alertmanager_file.name}"
          + (f" with group_wait {timings.group_wait}, group_interval {timings.group_interval}"
             if timings.group_wait is not None else ""), flush=True)
    cordons, replaces = [], []
    for i in range(runs):
        cordon, replace, alert = one_run(timings)
        cordons.append(cordon)
        replaces.append(replace)
        print(f"run {i + 1}: fault -> cordon {cordon:.2f}s, fault -> replace {replace:.2f}s (acted on {alert})",
              flush=True)
    if args.fast_path:
        print(f"fast_path_fault_to_replace_s={replaces[0]:.2f}")
        print(f"fast_path_fault_to_cordon_s={cordons[0]:.2f}")
        return 0
    print(f"fault_to_cordon_min_s={min(cordons):.2f} fault_to_cordon_max_s={max(cordons):.2f}")
    print(f"fault_to_replace_p50_s={statistics.median(replaces):.2f}")
    print(f"fault_to_cordon_p50_s={statistics.median(cordons):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
