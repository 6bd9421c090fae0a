"""History for Prometheus before a run starts: the series the long-window rules read, as TSDB blocks.

A rule that reads `max_over_time(x[1d])` costs what a day of `x` costs; a ten-minute run holds ten minutes of it and
understates the cost (issue 16). `backfill_rule_history` finds the series the rules read an hour or more into the
past (gpu_health_stack.rule_windows parses the rule files, so a new rule is covered without a list to update),
writes them for every node of a fleet over a past window as OpenMetrics text, and turns the text into blocks with
Prometheus' own `promtool tsdb create-blocks-from openmetrics`, for a Prometheus to start on
(`--storage.tsdb.path`). Prometheus only loads blocks that end before its head, so the window ends some minutes
before the run starts.

    written = backfill_rule_history(stack.dir / "prom-data", lambda node: fleet_exposition(node), nodes)
    stack.start_prometheus()

The window is written at a coarse step, and within the reach of the rules that read a series as densely as a
running Prometheus would hold it (a day of a 5-minute record: 288 samples), since that is what the rules' cost
depends on. Values are held at each node's exposition (the cost depends on how many samples the rules read, not
on their values). `up` is not in any exposition: Prometheus writes it per target, so it is written as 1 with the
target's labels. A recorded series that a rule reads over a long window is computed by Debian's Prometheus itself
from the backfilled inputs (gpu_health_stack.backfill_records) and written into the same blocks.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from . import rule_windows
from .backfill_records import om_number, record_history, series_key

PROMTOOL = "promtool"
PROMETHEUS = "/usr/bin/prometheus"
JOB = "gpu-health-exporter"
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
# Series Prometheus writes for every target itself (not in the exposition), with their value on a healthy target.
SCRAPE_SERIES = {"up": 1.0}


@dataclass(frozen=True)
class Series:
    name: str
    labels: Mapping[str, str]
    value: Callable[[float], float]  # the value at a unix time
    fine: tuple[tuple[float, float], ...] = ()  # (span, step): over the window's last span seconds, every step
    since: float | None = None  # no sample before (None: the window's start)


def sample_times(start: float, end: float, step: float, fine: Iterable[tuple[float, float]] = (),
                 since: float | None = None) -> list[float]:
    """Every `step` seconds from `start` (or `since`) to `end` and, for each (span, step) of `fine`, every such
    step over the last span seconds; all counted back from `end`, so that the grids share their times."""
    start = start if since is None else max(start, since)
    times = {round(end - k * step, 3) for k in range(int((end - start) // step) + 1)}
    for span, every in fine:
        times |= {round(end - k * every, 3) for k in range(int(min(span, end - start) // every) + 1)}
    return sorted(times)


def _samples(exposition: str, wanted: set[str]) -> list[tuple[str, dict[str, str], float]]:
    # Only the wanted lines are parsed: a node's exposition holds ~500 samples and 1,000 nodes are parsed.
    lines = [ln for ln in exposition.splitlines() if (m := _NAME.match(ln)) is not None and m.group() in wanted]
    return [(s.name, dict(s.labels), float(s.value))
            for family in text_string_to_metric_families("\n".join(lines) + "\n") for s in family.samples
            if s.name in wanted]


def fleet_series(template: str, nodes: Sequence[str], names: Iterable[str], *, node_label: str = "node",
                 extra: Mapping[str, str] | None = None) -> list[Series]:
    """The samples named `names` in one node's exposition `template`, once per node of `nodes` (its `node` label
    replaced, `extra` labels added: the scrape's `job` and `instance`, say)."""
    wanted = set(names)
    found = _samples(template, wanted)
    missing = wanted - {name for name, _, _ in found}
    if missing:
        raise ValueError(f"not in the template: {', '.join(sorted(missing))}")
    out = []
    for node in nodes:
        for name, labels, value in found:
            out.append(Series(name, {**labels, **(extra or {}), node_label: node},
                              lambda _t, v=value: v))
    return out


def openmetrics(series: Sequence[Series], start: float, end: float, step: float, *,
                eof: bool = True) -> Iterator[str]:
    """OpenMetrics text, time-major (every series due at one time, then the next time), ending with `# EOF`; one
    string per time. Times are counted back from `end` (sample_times)."""
    if step <= 0 or end < start:
        raise ValueError("need step > 0 and end >= start")
    by_grid: dict[tuple[tuple[tuple[float, float], ...], float | None], list[tuple[str, Series]]] = {}
    for s in series:
        by_grid.setdefault((s.fine, s.since), []).append((series_key(s.name, s.labels), s))
    due = {grid: set(sample_times(start, end, step, *grid)) for grid in by_grid}
    for t in sorted(set().union(*due.values()) if due else sample_times(start, end, step)):
        ts = f" {t:.3f}\n"
        yield "".join(f"{key} {om_number(s.value(t))}{ts}"
                      for grid, keyed in by_grid.items() if t in due[grid] for key, s in keyed)
    if eof:
        yield "# EOF\n"


def _promtool_blocks(text: Path, out: Path, window: float, promtool: str) -> None:
    """promtool's backfill, with blocks long enough that the window spans at most two: it reads the whole input
    once per block, so the default 2 h blocks would read a week's text 84 times. (promtool rounds the flag down to
    2 h times a power of 3, hence three times the window.)"""
    hours = max(2, math.ceil(3 * window / 3600))
    try:
        subprocess.run([promtool, "tsdb", "create-blocks-from", "openmetrics", "--quiet",
                        f"--max-block-duration={hours}h", str(text), str(out)],
                       check=True, capture_output=True, text=True, timeout=3600)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"promtool could not create blocks: {exc.stderr.strip()}") from exc


def _need_promtool(promtool: str) -> None:
    if shutil.which(promtool) is None:
        raise FileNotFoundError(f"{promtool}: install Debian's prometheus (it ships promtool)")


def backfill(series: Sequence[Series], *, start: float, end: float, step: float, out: Path,
             promtool: str = PROMTOOL) -> Path:
    """Write the blocks for `series` into `out` (a Prometheus data directory); returns `out`."""
    _need_promtool(promtool)
    out.mkdir(parents=True, exist_ok=True)
    text = out.parent / f"{out.name}.backfill.om"
    with open(text, "w", encoding="utf-8") as fh:
        fh.writelines(openmetrics(series, start, end, step))
    try:
        _promtool_blocks(text, out, end - start, promtool)
    finally:
        text.unlink(missing_ok=True)
    return out


# --- the rules' history ------------------------------------------------------------------------------------------


def backfill_rule_history(data_dir: Path, template: str | Callable[[str], str], nodes: Sequence[str], *,
                          days: float = 7.0, step: float = 900.0, end: float | None = None,
                          extra: Mapping[str, str] | None = None, files: Sequence[Path] | None = None,
                          scrape_interval: float = 15.0, evaluation_interval: float = 15.0,
                          min_reach: float = rule_windows.LONG, job: str = JOB, promtool: str = PROMTOOL,
                          prometheus: str = PROMETHEUS) -> dict[str, Any]:
    """Write `days` of history up to `end` (default: 5 minutes ago) of the series the rules in `files` (default
    rules/) read `min_reach` (an hour) or more into the past, for every node of `nodes`, as blocks in `data_dir` (a Prometheus
    data directory, before Prometheus starts on it).

    One sample every `step` seconds over the window; within the reach of the rules that read a series, as
    densely as Prometheus would hold it (rule_windows.plan_history: a scraped series every `scrape_interval`, a
    recorded one every interval of its group), since that is what a rule's cost depends on.

    Only the series the reading selectors select are written. `min_reach` lower than an hour (300: every window of
    5 minutes or more) also fills the shorter windows, a [15m] average or a [5m] rate, over themselves only: then
    the first evaluations of a run read full windows (benchmarks/rule_eval.py).

    `template` is a node's exposition (its node label replaced by each node's; every other label, such as a GPU's
    uuid, stays the template's), or a function giving each node's own exposition, so that the backfilled series
    are exactly the ones the live scrape continues. Labels are the exporter job's with `honor_labels: true`:
    job `job`, instance and node the node's name, `extra` added (the exposition's own labels win).
    Returns what was written: series, samples, names, recorded, fine (name: (span, step)), skipped (name: why),
    blocks, bytes, seconds (and per phase)."""
    _need_promtool(promtool)
    t0 = time.monotonic()
    plan = rule_windows.plan_history(list(files) if files is not None else rule_windows.rule_files(),
                                     min_reach=min_reach, scrape_interval=scrape_interval,
                                     evaluation_interval=evaluation_interval)
    end = time.time() - 300 if end is None else end
    start = end - math.floor(days * 86400 / step) * step
    series, skipped = _node_series(template, nodes, plan.raw, end, step, job, extra)
    took = {"expositions": time.monotonic() - t0}
    data_dir.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in data_dir.iterdir()}
    with tempfile.TemporaryDirectory(prefix="backfill-", dir=data_dir.parent) as tmp:
        scratch = Path(tmp)
        # One text file a name: the temporary Prometheus of a level of records gets only what that level reads.
        texts: dict[str, Path] = {}
        for name in sorted({s.name for s in series}):
            texts[name] = scratch / f"{name}.om"
            with open(texts[name], "w", encoding="utf-8") as fh:
                fh.writelines(openmetrics([s for s in series if s.name == name], start, end, step, eof=False))
        took["text"] = time.monotonic() - t0 - sum(took.values())
        recorded = 0

        def to_blocks(sources: Sequence[Path], out: Path) -> None:
            joined = scratch / "joined.om"
            with open(joined, "wb") as fh:
                for source in sources:
                    with open(source, "rb") as part:
                        shutil.copyfileobj(part, fh, 1 << 20)
                fh.write(b"# EOF\n")
            try:
                _promtool_blocks(joined, out, end - start, promtool)
            finally:
                joined.unlink()

        for level in plan.levels:
            inputs = {s.name for rule in level for s in rule_windows.selectors(str(rule["expr"]))} & texts.keys()
            windows = {str(r["record"]): _window(plan.recorded[str(r["record"])], step) for r in level}
            made = record_history(level, windows, [texts[n] for n in sorted(inputs)], scratch, start, end, step,
                                  to_blocks, prometheus)
            texts.update({name: path for name, (path, _) in made.items()})
            recorded += sum(count for _, count in made.values())
        took["recorded"] = time.monotonic() - t0 - sum(took.values())
        to_blocks([texts[n] for n in sorted(texts)], data_dir)
        took["promtool"] = time.monotonic() - t0 - sum(took.values())
    blocks = [p for p in data_dir.iterdir() if p.name not in before and (p / "meta.json").exists()]
    stats = [json.loads((b / "meta.json").read_text())["stats"] for b in blocks]
    return {
        "series": len(series) + recorded, "samples": sum(s.get("numSamples", 0) for s in stats),
        "names": sorted({s.name for s in series}), "recorded": sorted(plan.recorded),
        "fine": {n: _fine(need, step) for n, need in {**plan.raw, **plan.recorded}.items()
                 if _fine(need, step) and n not in skipped},
        "skipped": skipped, "nodes": len(nodes), "start": start, "end": end, "step": step, "blocks": len(blocks),
        "bytes": sum(f.stat().st_size for b in blocks for f in b.rglob("*") if f.is_file()),
        "seconds": time.monotonic() - t0, "phases": {k: round(v, 1) for k, v in took.items()},
    }


def _fine(need: rule_windows.Need, step: float) -> tuple[tuple[float, float], ...]:
    """The grids finer than the coarse step: where the readers need more than one sample every `step`."""
    return tuple(sorted((span, every) for span, every in need.grids if every < step and span > 0))


def _window(need: rule_windows.Need, step: float) -> tuple[float, float]:
    """A recorded series exists to be read: written over the span its readers reach, at its own interval where
    that is finer than the coarse step."""
    return need.span, need.fine if need.fine is not None and need.fine < step else step


def _node_series(template: str | Callable[[str], str], nodes: Sequence[str], names: Mapping[str, rule_windows.Need],
                 end: float, step: float, job: str,
                 extra: Mapping[str, str] | None) -> tuple[list[Series], dict[str, str]]:
    wanted = set(names) - set(SCRAPE_SERIES)

    def grid(name: str) -> tuple[tuple[tuple[float, float], ...], float | None]:
        # What only a recording rule reads is only needed over what that rule's readers reach.
        return _fine(names[name], step), None if names[name].whole else end - names[name].span

    shared = _samples(template, wanted) if isinstance(template, str) else None
    series: list[Series] = []
    for node in nodes:
        target = {"job": job, "instance": node, **(extra or {}), "node": node}
        found = shared if shared is not None else _samples(template(node), wanted)  # type: ignore[operator]
        for name, labels, value in found:
            own = {k: v for k, v in labels.items() if k != "node"} if shared is not None else labels
            if names[name].selects(full := {**target, **own}):  # only what the rules' selectors read
                series.append(Series(name, full, lambda _t, v=value: v, *grid(name)))
        for name in names.keys() & SCRAPE_SERIES.keys():
            if names[name].selects(target):
                series.append(Series(name, target, lambda _t, v=SCRAPE_SERIES[name]: v, *grid(name)))
    seen = {s.name for s in series}
    why = "no series of it in the nodes' exposition that the rules select (another job's, or not published here)"
    skipped = {name: why for name in sorted(names.keys() - seen)}
    return series, skipped
