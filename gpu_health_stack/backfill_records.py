"""Recorded series for the backfill (gpu_health_stack.backfill), computed by Prometheus itself.

A rule that reads a recorded series over a long window needs that series' history too, and only the recording
rule's own expression says what it holds. So a temporary Debian Prometheus is started on blocks of what the rule
reads (backfilled already), the expression is queried over the span the readers reach (`query_range`, at the
record's own interval where that is finer than the coarse step), and the results are written as OpenMetrics text
under the record's name and labels. The caller turns all text into blocks at once, so the Prometheus that starts
on them finds no overlapping blocks to compact first (`promtool tsdb create-blocks-from rules` would write blocks
of its own beside the others).
"""

from __future__ import annotations

import math
import re
import shutil
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .procs import Proc, free_port, http_json

_LABEL_VALUE = re.compile(r'[\\"\n]')
_MAX_POINTS = 10_000  # Prometheus refuses a range query of more than 11,000 points a series


def _escape(value: str) -> str:
    return _LABEL_VALUE.sub(lambda m: {"\\": "\\\\", '"': '\\"', "\n": "\\n"}[m.group(0)], value)


def series_key(name: str, labels: Mapping[str, str]) -> str:
    """A series as OpenMetrics spells it: name{label="value",...}, labels sorted."""
    return f"{name}{{{','.join(f'{k}={chr(34)}{_escape(v)}{chr(34)}' for k, v in sorted(labels.items()))}}}"


def om_number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def record_history(rules: Sequence[Mapping[str, Any]], windows: Mapping[str, tuple[float, float]],
                   inputs: Sequence[Path], scratch: Path, start: float, end: float, step: float,
                   to_blocks: Callable[[Sequence[Path], Path], None], prometheus: str) -> dict[str, tuple[Path, int]]:
    """Evaluate one level of recording rules with a temporary Prometheus on blocks of `inputs` (OpenMetrics text
    without `# EOF`: what the rules read), each record over its window (span, step) ending at `end` (no earlier
    than `start`), into a text file of its own in `scratch`. Returns record -> (its file, series written)."""
    blocks = scratch / "eval-data"
    shutil.rmtree(blocks, ignore_errors=True)
    to_blocks(inputs, blocks)
    port = free_port()
    config = scratch / "prometheus.yml"
    config.write_text("global: {}\n")
    prom = Proc("backfill-prometheus", [
        prometheus, f"--config.file={config}", f"--storage.tsdb.path={blocks}",
        f"--web.listen-address=127.0.0.1:{port}",
        f"--storage.tsdb.retention.time={math.ceil((end - start) / 86400) + 2}d",
        # Between two samples of the coarse step an instant selector still sees the last one.
        f"--query.lookback-delta={max(300, math.ceil(step))}s",
    ], scratch)
    made: dict[str, tuple[Path, int]] = {}
    try:
        prom.wait_http(f"http://127.0.0.1:{port}/-/ready", timeout=300)
        for rule in rules:
            record = str(rule["record"])
            span, every = windows[record]
            first = end - math.floor(min(span, end - start) / every) * every
            own = {str(k): str(v) for k, v in dict(rule.get("labels") or {}).items()}
            path, count = made.get(record, (scratch / f"{record}.om", 0))
            with open(path, "a", encoding="utf-8") as fh:
                for labels, points in _query_range(port, str(rule["expr"]), first, end, every).items():
                    key = series_key(record, {**dict(labels), **own})
                    fh.write("".join(f"{key} {om_number(v)} {t:.3f}\n" for t, v in points))
                    count += 1
            made[record] = (path, count)
    finally:
        prom.stop()
    return made


def _query_range(port: int, expr: str, start: float, end: float,
                 step: float) -> dict[tuple[tuple[str, str], ...], list[tuple[float, float]]]:
    """`expr` at every step from `start` to `end`, a day at a time (a week of 8,000 series at once is a response
    of hundreds of megabytes): labels -> [(time, value)]."""
    out: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
    per_query = max(1, min(_MAX_POINTS, int(86400 // step)))
    t = start
    while t <= end + 1e-6:
        until = min(end, t + (per_query - 1) * step)
        query = urllib.parse.urlencode({"query": expr, "start": f"{t:.3f}", "end": f"{until:.3f}",
                                        "step": f"{step:g}"})
        data = http_json(f"http://127.0.0.1:{port}/api/v1/query_range?{query}", timeout=600)
        for result in data["data"]["result"]:
            labels = tuple(sorted((k, v) for k, v in result["metric"].items() if k != "__name__"))
            out.setdefault(labels, []).extend((float(ts), float(v)) for ts, v in result["values"])
        t = until + step
    return out
