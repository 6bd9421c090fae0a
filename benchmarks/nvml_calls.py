#!/usr/bin/env python3
"""NVML calls per GPU per collection cycle, for each tier, on simulated GPUs of a given model.

Run from the repository's venv:  .venv/bin/python benchmarks/nvml_calls.py [--model H100-SXM-80GB] [--gpus 8]

The exporter's own poller and default GPU collectors run in-process on the simulator with call tracing,
as tools/real_gpu_check.py does on a driver. A cycle's calls are counted after the first (which also opens
each GPU's handle): a fast-tier cycle, and a cycle that also runs the slow tier. Each traced call is one
NVML call (one nvmlDeviceGetFieldValues batch counts once, however many values it reads).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The slow tier of an 18-link H100 must stay within this many calls per GPU (issue 15).
TARGET_SLOW_CALLS = 20


@dataclass(frozen=True)
class TierCalls:
    fast: dict[str, float]  # NVML function -> calls per GPU in a fast-only cycle
    both: dict[str, float]  # the same for a cycle that also runs the slow tier

    @property
    def fast_total(self) -> float:
        return sum(self.fast.values())

    @property
    def both_total(self) -> float:
        return sum(self.both.values())

    @property
    def slow_total(self) -> float:
        """The slow tier's own calls: a cycle with it less a cycle without."""
        return self.both_total - self.fast_total


def _second_cycle(gpus: int, model: str, slow: bool) -> dict[str, float]:
    from exporter.backends.sim import SimConfig, SimulatedNvml
    from exporter.cli import build_poller
    from exporter.config import parse
    from exporter.device import CallTrace
    from exporter.registry import discover

    available = discover()
    # --collect-interval.slow equal to the interval makes every cycle run the slow tier (once half an
    # interval has passed: the poller's slack for a late tick).
    config = parse(["--backend", "sim", "--node-name", "bench", "--state-dir", "", "--xid.source", "none",
                    "--xid.nvml-events", "off", "--collect-interval", "1s", "--collect-timeout", "1s",
                    "--collect-interval.slow", "1s" if slow else "30s"], available)
    trace = CallTrace()
    poller = build_poller(config, SimulatedNvml(SimConfig(gpus=gpus, model=model)), available, boot_id="bench",
                          trace=trace)
    try:
        poller.run_cycle()  # opens every GPU and runs both tiers
        time.sleep(0.6)
        trace.latencies.clear()
        poller.run_cycle()
    finally:
        poller.stop()
    counts = Counter({name: len(samples) for name, samples in trace.latencies.items()})
    return {name: n / gpus for name, n in sorted(counts.items())}


def measure(gpus: int = 8, model: str = "H100-SXM-80GB") -> TierCalls:
    return TierCalls(fast=_second_cycle(gpus, model, slow=False), both=_second_cycle(gpus, model, slow=True))


def report(calls: TierCalls, model: str, *, detail: bool = True) -> list[str]:
    lines = [f"NVML calls per GPU per cycle ({model}): fast tier {calls.fast_total:g}, slow tier "
             f"{calls.slow_total:g} (a cycle that runs both: {calls.both_total:g})"]
    if detail:
        lines.append(f"  {'NVML function':46} {'fast':>5} {'slow':>5}")
        for name in sorted(set(calls.fast) | set(calls.both)):
            fast = calls.fast.get(name, 0)
            lines.append(f"  {name:46} {fast:>5g} {calls.both.get(name, 0) - fast:>5g}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--model", default="H100-SXM-80GB")
    args = p.parse_args(argv)
    calls = measure(args.gpus, args.model)
    print("\n".join(report(calls, args.model)))
    ok = calls.slow_total <= TARGET_SLOW_CALLS
    print(f"slow-tier calls per GPU {calls.slow_total:g}   target <= {TARGET_SLOW_CALLS}   "
          f"{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
