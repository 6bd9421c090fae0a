"""History for Prometheus before a run starts: the series the long-window rules read, as TSDB blocks.

A rule that reads `max_over_time(x[1d])` costs what a day of `x` costs; a ten-minute run holds ten minutes of it and
understates the cost (issue 16). This writes the chosen series of a fleet, over a past window at a coarse step, as
OpenMetrics text, and turns it into blocks with Prometheus' own `promtool tsdb create-blocks-from openmetrics`,
for a Prometheus to start on (`--storage.tsdb.path`). Prometheus only loads blocks that end before its head, so the
window ends some minutes before the run starts.

    series = fleet_series(template_text, nodes=[f"node-{i:04d}" for i in range(1000)],
                          names={"gpu_nvlink_links_up", "up"})
    backfill(series, start=now - 7 * 86400, end=now - 600, step=3600, out=tsdb_dir)

Values are held constant at the template's (the rules' cost depends on how many samples they read, not on their
values); `value` lets a caller vary them over time.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

PROMTOOL = "promtool"
_LABEL_VALUE = re.compile(r'[\\"\n]')


@dataclass(frozen=True)
class Series:
    name: str
    labels: Mapping[str, str]
    value: Callable[[float], float]  # the value at a unix time


def fleet_series(template: str, nodes: Sequence[str], names: Iterable[str], *, node_label: str = "node",
                 extra: Mapping[str, str] | None = None) -> list[Series]:
    """The samples named `names` in one node's exposition `template`, once per node of `nodes` (its `node` label
    replaced, `extra` labels added: the scrape's `job` and `instance`, say)."""
    wanted = set(names)
    found: list[tuple[str, dict[str, str], float]] = []
    for family in text_string_to_metric_families(template):
        for sample in family.samples:
            if sample.name in wanted:
                found.append((sample.name, dict(sample.labels), float(sample.value)))
    missing = wanted - {name for name, _, _ in found}
    if missing:
        raise ValueError(f"not in the template: {', '.join(sorted(missing))}")
    out = []
    for node in nodes:
        for name, labels, value in found:
            out.append(Series(name, {**labels, **(extra or {}), node_label: node},
                              lambda _t, v=value: v))
    return out


def _escape(value: str) -> str:
    return _LABEL_VALUE.sub(lambda m: {"\\": "\\\\", '"': '\\"', "\n": "\\n"}[m.group(0)], value)


def openmetrics(series: Sequence[Series], start: float, end: float, step: float) -> Iterator[str]:
    """OpenMetrics text lines, time-major (every series at one time, then the next), ending with `# EOF`."""
    if step <= 0 or end < start:
        raise ValueError("need step > 0 and end >= start")
    keys = [f"{s.name}{{{','.join(f'{k}={chr(34)}{_escape(v)}{chr(34)}' for k, v in sorted(s.labels.items()))}}}"
            for s in series]
    t = start
    while t <= end:
        for key, s in zip(keys, series, strict=True):
            yield f"{key} {s.value(t)!r} {t:.3f}\n"
        t += step
    yield "# EOF\n"


def backfill(series: Sequence[Series], *, start: float, end: float, step: float, out: Path,
             promtool: str = PROMTOOL) -> Path:
    """Write the blocks for `series` into `out` (a Prometheus data directory); returns `out`."""
    if shutil.which(promtool) is None:
        raise FileNotFoundError(f"{promtool}: install Debian's prometheus (it ships promtool)")
    out.mkdir(parents=True, exist_ok=True)
    text = out.parent / f"{out.name}.backfill.om"
    with open(text, "w", encoding="utf-8") as fh:
        fh.writelines(openmetrics(series, start, end, step))
    try:
        subprocess.run([promtool, "tsdb", "create-blocks-from", "openmetrics", "--quiet", str(text), str(out)],
                       check=True, capture_output=True, text=True, timeout=3600)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"promtool could not create blocks: {exc.stderr.strip()}") from exc
    finally:
        text.unlink(missing_ok=True)
    return out
