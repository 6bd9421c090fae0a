#!/usr/bin/env python3
"""The fleet soak (issue 16): a simulated fleet under seeded chaos, every real component in the loop, judged by
the oracle (gpu_health_stack.soak, gpu_health_stack.oracle).

Run from the repository's venv:

    .venv/bin/python benchmarks/fleet_soak.py --nodes 1000 --minutes 10         # 15 s settings, 7 days backfilled
    .venv/bin/python benchmarks/fleet_soak.py --nodes 50 --interval 1s --minutes 3
    .venv/bin/python benchmarks/fleet_soak.py --seed 1234 ...                   # replay a run

The seed is random unless given, and printed first. Progress goes to stderr. The full report (seed, settings,
schedule, every injected fault, every violation with its evidence, latencies) goes to --report (default
fleet-soak-<seed>.json in the current directory). The last lines on stdout are exactly:

    fleet_violations=<count>                (target 0)
    fleet_fault_to_cordon_p99_s=<seconds>   (target: scrape + evaluation interval + group_wait + 5 s)
    fleet_rule_eval_p99_ms=<milliseconds>   (the largest rule group's p99; target 1,000 ms)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gpu_health_stack.soak import Soak, SoakConfig  # noqa: E402
from gpu_health_stack.stack import missing_binaries  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--minutes", type=float, default=10.0, help="length of the chaos schedule (default 10)")
    p.add_argument("--interval", default="15s", help="scrape and evaluation interval (default 15s; 1s for the "
                                                     "50-node run)")
    p.add_argument("--seed", type=int, default=None, help="default: random, printed")
    p.add_argument("--backfill-days", type=float, default=None,
                   help="history backfilled before Prometheus starts (default 7 at 15 s settings, 0 at 1 s)")
    p.add_argument("--sim-nice", type=int, default=None, metavar="N",
                   help="the simulator's nice value (default 10 at 15 s settings: it stands in for a fleet of "
                        "machines and yields the cores to Prometheus; 0 at 1 s)")
    p.add_argument("--report", type=Path, default=None, help="where the JSON report goes")
    p.add_argument("--keep-dir", action="store_true", help="keep the run's folder (logs, journal, TSDB)")
    p.add_argument("--test-only-no-already-remediated-check", action="store_true",
                   help="turn the webhook's already-remediated check off (test only): a fixed fault that fires "
                        "again is then acted on again, which the oracle reports; the run in make test that "
                        "shows it is gpu_health_stack.soak.SoakConfig.unchecked")
    args = p.parse_args(argv)
    if missing_binaries():
        print(f"needs {missing_binaries()}: apt-get install prometheus prometheus-alertmanager", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 2**31)
    print(f"seed={seed}", flush=True)
    changes = {"no_already_remediated_check": args.test_only_no_already_remediated_check}
    if args.backfill_days is not None:
        changes["backfill_days"] = args.backfill_days
    if args.sim_nice is not None:
        changes["sim_nice"] = args.sim_nice
    config = SoakConfig.at_scale(args.nodes, args.minutes, seed, args.interval, **changes)
    report = Soak(config, progress=lambda m: print(m, file=sys.stderr, flush=True), keep_dir=args.keep_dir).run()
    path = args.report or Path(f"fleet-soak-{seed}.json")
    path.write_text(json.dumps(report.as_json(), indent=1, default=str))
    group, p99 = report.rule_eval_p99_ms()
    print(f"report={path}")
    print(f"faults_injected={len(report.injected)} skipped={len(report.skipped)} "
          f"delayed_by_caps={len(report.verdict.delayed)} counts={report.verdict.counts}")
    print(f"fault_to_cordon_p50_s={report.fault_to_cordon(50):.2f} "
          f"faults_timed={len(report.verdict.fault_to_cordon)}")
    print(f"webhook_accept_p99_s={json.dumps(report.accept_p99_s)}")
    for line in report.failover:
        print(f"failover: {line}")
    for note in report.notes:
        print(f"note: {note}")
    print(f"largest_rule_group={group}")
    for v in report.violations:
        print(f"violation: {v}")
    print(f"fleet_violations={len(report.violations)}")
    print(f"fleet_fault_to_cordon_p99_s={report.fault_to_cordon(99):.2f}")
    print(f"fleet_rule_eval_p99_ms={p99:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
