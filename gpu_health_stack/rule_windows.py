"""How far back each rule reads: every series selector of a rule's PromQL, with the time it reaches into the past.

A rule's cost and the history it needs both follow from its selectors: `max_over_time(x[1d])` reads a day of `x`,
`x offset 1h` reads `x` an hour ago, `max_over_time(rate(x[5m])[1d:1h])` reads a day and five minutes of `x`. The
backfill (gpu_health_stack.backfill) writes history for the series the long-window rules read, found here instead
of listed by hand, so a new rule is covered the day it is written.

    for read in long_window_reads(rule_files()):
        print(read.name, read.reach, read.rule)          # e.g. gpu_nvlink_links_up 86400.0 node_gpu:...:count

A small tokenizer, not a full PromQL parser: it knows strings, label matchers, ranges and subqueries, offsets, `@`,
function calls and the label lists of by/without/on/ignoring/group_left/group_right, which is what the selectors
need. An instant selector reaches back 0 s here (Prometheus' 5 minute lookback is left out of every reach).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
_TOKEN = re.compile(r"""
    (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<matchers>\{(?:[^}"'`]|"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)*\})
  | (?P<range>\[[^\]]*\])
  | (?P<dur>(?:\d+(?:ms|[smhdwy]))+)(?![\w.])
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<num>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<lp>\() | (?P<rp>\)) | (?P<space>\s+) | (?P<comment>\#[^\n]*) | (?P<op>.)
""", re.X)
_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_NAME_MATCHER = re.compile(r"""__name__\s*=\s*(?:"((?:[^"\\]|\\.)*)"|'((?:[^'\\]|\\.)*)')""")
_MATCHER = re.compile(r"""([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*(?:"((?:[^"\\]|\\.)*)"|'((?:[^'\\]|\\.)*)'|`([^`]*)`)""")
# Reads this far back are history (written over the whole backfilled window); shorter ones only over themselves.
LONG = 3600.0


def duration(text: str) -> float:
    """A PromQL duration (`1h30m`, `5m`, `100ms`) in seconds."""
    parts = re.findall(r"(\d+)(ms|[smhdwy])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a PromQL duration: {text!r}")
    return sum(int(n) * _UNITS[u] for n, u in parts)


@dataclass
class Selector:
    name: str | None  # None: a selector without a metric name (`{job="x"}`)
    matchers: str  # the `{...}` as written, or ""
    reach: float = 0.0  # seconds into the past: its range, offsets and enclosing subqueries' ranges


def selectors(expr: str) -> list[Selector]:
    """Every series selector of `expr`, with how far back it reads."""
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(expr) if m.lastgroup not in ("space", "comment")]
    out: list[Selector] = []
    opened: list[int] = []  # len(out) at each open parenthesis
    last: tuple[int, int] = (0, 0)  # out[a:b]: the operand an offset or a subquery range applies to
    i = 0

    def at(k: int) -> tuple[str | None, str]:
        return tokens[k] if k < len(tokens) else (None, "")

    while i < len(tokens):
        kind, text = tokens[i]
        if kind == "ident" and text.lower() in _LABEL_LISTS:
            if at(i + 1)[0] == "lp":  # a list of label names, not selectors
                i += 2
                while i < len(tokens) and tokens[i][0] != "rp":
                    i += 1
        elif kind == "ident" and text.lower() == "offset":
            sign = -1 if at(i + 1) == ("op", "-") else 1
            i += 1 if sign > 0 else 2
            for s in out[last[0]:last[1]]:
                s.reach += sign * duration(tokens[i][1])
        elif kind == "op" and text == "@":
            i += 2 + (at(i + 2)[0] == "lp") * 2  # `@ 1700000000` or `@ start()`
            continue
        elif kind == "ident" and (at(i + 1)[0] == "lp" or at(i + 1)[1].lower() in ("by", "without")):
            i += 1  # a function or aggregation; its parenthesis is opened below
            continue
        elif kind == "ident" and text.lower() in ("and", "or", "unless", "bool", "inf", "nan"):
            pass
        elif kind in ("ident", "matchers"):
            name, matchers = (text, "") if kind == "ident" else (None, text)
            if kind == "ident" and at(i + 1)[0] == "matchers":
                i += 1
                matchers = tokens[i][1]
            if name is None:
                found = _NAME_MATCHER.search(matchers)
                name = next((g for g in found.groups() if g is not None), None) if found else None
            out.append(Selector(name, matchers))
            last = (len(out) - 1, len(out))
        elif kind == "lp":
            opened.append(len(out))
        elif kind == "rp":
            last = (opened.pop() if opened else 0, len(out))
        if at(i + 1)[0] == "range":  # a range or a subquery, of the operand just closed
            i += 1
            window = tokens[i][1][1:-1].split(":")[0].strip()
            for s in out[last[0]:last[1]]:
                s.reach += duration(window)
        i += 1
    return out


Matcher = tuple[str, str, str]  # label, operator (=, !=, =~, !~), value


def matchers(text: str) -> tuple[Matcher, ...]:
    """The label matchers of a selector's `{...}`, __name__ left out."""
    out = []
    for label, op, *quoted in _MATCHER.findall(text):
        value = next((q for q in quoted if q), "")
        if label != "__name__":
            out.append((label, op, re.sub(r"\\(.)", r"\1", value)))
    return tuple(out)


def selects(wanted: tuple[Matcher, ...], labels: dict[str, str]) -> bool:
    """Whether a series with `labels` matches every matcher (regexes anchored, as in PromQL; a missing label is
    the empty string)."""
    for label, op, value in wanted:
        have = labels.get(label, "")
        if op in ("=~", "!~"):
            if (re.fullmatch(value, have) is not None) != (op == "=~"):
                return False
        elif (have == value) != (op == "="):
            return False
    return True


@dataclass(frozen=True)
class Read:
    name: str
    reach: float
    matchers: str
    rule: str  # the recording rule's record or the alert's name
    group: str


def rule_files(directory: Path = ROOT / "rules") -> list[Path]:
    """The rule files Prometheus loads (gpu_health_stack.stack.Stack.prometheus_config: recording, then alerts)."""
    return sorted(directory.glob("*.rules.yaml")) + sorted(directory.glob("*.alerts.yaml"))


def groups(files: Iterable[Path]) -> Iterator[dict[str, Any]]:
    """Every rule group of the files, in file order."""
    for path in files:
        yield from (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("groups") or []


def rules(files: Iterable[Path]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(group name, rule) for every rule of the files, in file and group order."""
    for group in groups(files):
        for rule in group.get("rules") or []:
            yield group["name"], rule


def reads(files: Iterable[Path]) -> list[Read]:
    """Every named selector of every rule."""
    out = []
    for group, rule in rules(files):
        name = str(rule.get("record") or rule.get("alert"))
        for s in selectors(str(rule["expr"])):
            if s.name is not None:
                out.append(Read(s.name, s.reach, s.matchers, name, group))
    return out


def long_window_reads(files: Sequence[Path], min_reach: float = 3600.0) -> list[Read]:
    """The selectors that reach `min_reach` seconds (an hour) or more into the past."""
    return [r for r in reads(files) if r.reach >= min_reach]


# --- the history a set of rules needs ---------------------------------------------------------------------------


@dataclass
class Need:
    """The history one series name needs: back `span` seconds; `grids`, each (span, step): over its last span
    seconds one sample every step, for each reader that needs a density (a day every 5 minutes for a record's
    windows, 10 minutes every scrape for a rule's own look); `fine`, the finest of those steps (None: a coarse
    step will do); `whole`: a rule reads it far into the past itself, so over the whole backfilled window, not only
    over what a recording rule that reads it needs."""

    span: float = 0.0
    fine: float | None = None
    whole: bool = False
    grids: list[tuple[float, float]] = field(default_factory=list, compare=False)
    # The series any of these matcher sets select (None: all of them): what the reading selectors ask for.
    only: list[tuple[Matcher, ...]] | None = field(default_factory=list, compare=False)

    def add(self, span: float, fine: float | None, selector: str | None = None) -> None:
        self.span = max(self.span, span)
        if fine is not None:
            self.fine = fine if self.fine is None else min(self.fine, fine)
            # A grid as long and as dense as another makes that one redundant.
            if not any(s >= span and f <= fine for s, f in self.grids):
                self.grids = [(s, f) for s, f in self.grids if not (span >= s and fine <= f)] + [(span, fine)]
        if selector is not None and self.only is not None:
            wanted = matchers(selector)
            if not wanted:
                self.only = None
            elif wanted not in self.only:
                self.only.append(wanted)

    def selects(self, labels: dict[str, str]) -> bool:
        return self.only is None or any(selects(m, labels) for m in self.only)


@dataclass
class HistoryPlan:
    """What the rules read far into the past: series scraped from the nodes (`raw`), and recorded series, whose
    recording rules come in levels (a level only reads the levels before it), each name with its Need."""

    raw: dict[str, Need] = field(default_factory=dict)
    recorded: dict[str, Need] = field(default_factory=dict)
    levels: list[list[dict[str, Any]]] = field(default_factory=list)


def plan_history(files: Sequence[Path], *, min_reach: float = 3600.0, scrape_interval: float = 15.0,
                 evaluation_interval: float = 15.0) -> HistoryPlan:
    """The series to backfill for the rules in `files`: every name a selector reaching `min_reach` or more into
    the past reads, as densely as Prometheus would have it within that reach (a scraped series every
    `scrape_interval`, a recorded one every interval of its group, else `evaluation_interval`); and for a recorded
    one, recursively, what its recording rules read, densely enough for their ranges (half the range)."""
    interval = {g["name"]: duration(g["interval"]) if g.get("interval") else None for g in groups(files)}
    defined: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for group, rule in rules(files):
        if "record" in rule:
            defined.setdefault(str(rule["record"]), []).append((group, rule))
    plan = HistoryPlan()
    level: dict[str, int] = {}

    def every(name: str) -> float:
        if name not in defined:
            return scrape_interval
        return min(interval[g] or evaluation_interval for g, _ in defined[name])

    def need(name: str) -> Need:
        return (plan.recorded if name in defined else plan.raw).setdefault(name, Need())

    def visit(name: str, path: tuple[str, ...]) -> int:
        need(name)
        if name not in defined:
            return -1
        if name in path:
            raise ValueError(f"recording rules read each other in a cycle: {' -> '.join((*path, name))}")
        if name not in level:
            deps = {s.name for _, rule in defined[name] for s in selectors(str(rule["expr"]))
                    if s.name is not None and s.name != name}  # a rule that latches its own value reads itself
            level[name] = 1 + max((visit(d, (*path, name)) for d in deps), default=-1)
        return level[name]

    # A record of the long past made by a group slower than the rules (the NVLink day, every 5 minutes) is not
    # there until that group first runs after Prometheus starts, up to its interval later: read over any window,
    # it is backfilled too. (A slow record of the recent past, the thermal minutes, builds up again by itself.)
    def of_the_long_past(name: str) -> bool:
        return any(s.reach >= min_reach for _, rule in defined[name] for s in selectors(str(rule["expr"])))

    slow = [r for r in reads(files) if 0 < r.reach < min_reach and r.name in defined
            and every(r.name) > evaluation_interval and of_the_long_past(r.name)]
    for read in long_window_reads(files, min_reach) + slow:
        visit(read.name, ())
        need(read.name).add(read.reach, every(read.name), read.matchers)
        need(read.name).whole |= read.reach >= LONG
    top = max(level.values(), default=-1)
    plan.levels = [[rule for name in sorted(level) if level[name] == k for _, rule in defined[name]]
                   for k in range(top + 1)]
    for k in range(top, -1, -1):  # a record's need is complete before it passes it on to what it reads
        for rule in plan.levels[k]:
            mine = plan.recorded[str(rule["record"])]
            for s in selectors(str(rule["expr"])):
                if s.name is not None and s.name != rule["record"]:  # over the span its record is read
                    need(s.name).add(mine.span + s.reach, max(every(s.name), s.reach / 2) if s.reach > 0 else None,
                                     s.matchers)
    return plan
