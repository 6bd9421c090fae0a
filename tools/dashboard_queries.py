"""Every PromQL query of the Grafana dashboards in dashboards/, with the dashboard variables substituted.

For the tests (tests/dashboards/: every query parses with promtool and reads only metrics that the exporter, the
rules or the webhook produce) and for the end-to-end suite (every query returns data from a real Prometheus):

    import importlib.util, pathlib
    spec = importlib.util.spec_from_file_location("dashboard_queries", ROOT / "tools" / "dashboard_queries.py")
    dq = importlib.util.module_from_spec(spec); spec.loader.exec_module(dq)
    for dashboard, title, expr in dq.panel_queries(node="node-a"):
        ...                                         # e.g. GET /api/v1/query?query=expr, expect a non-empty result

or from a shell: `python tools/dashboard_queries.py --node node-a` (one JSON object per line).

Values are inserted verbatim: `cluster` and `gpu` default to `.*` (the dashboards' "All"), `node` has no default.
Grafana's interval variables get fixed values that suit a 15 s scrape interval (`$__rate_interval` 1m,
`$__interval` 15s, `$__range` 1h); pass others for other setups.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "dashboards"

# Grafana's built-in variables the dashboards may use, and the dashboards' own.
BUILTINS = ("__rate_interval", "__interval", "__range", "__range_s", "__interval_ms")
_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\$(\w+)|\[\[(\w+)\]\]")


@dataclass(frozen=True)
class Query:
    dashboard: str  # the dashboard's uid
    panel: str  # the panel's title
    ref_id: str
    expr: str  # as written in the dashboard, variables unsubstituted


def load_dashboards(directory: Path = DASHBOARDS) -> dict[str, dict[str, Any]]:
    """uid -> dashboard JSON, for every dashboards/*.json."""
    out = {}
    for path in sorted(directory.glob("*.json")):
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        out[dashboard["uid"]] = dashboard
    return out


def iter_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows and the panels inside collapsed rows included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def queries(directory: Path = DASHBOARDS) -> list[Query]:
    """Every panel target's expression, unsubstituted, in dashboard order."""
    out = []
    for uid, dashboard in load_dashboards(directory).items():
        for panel in iter_panels(dashboard):
            for target in panel.get("targets", []):
                if target.get("expr"):
                    out.append(Query(uid, panel.get("title", ""), target.get("refId", ""), target["expr"]))
    return out


def variable_queries(directory: Path = DASHBOARDS) -> list[tuple[str, str, str]]:
    """(dashboard uid, variable name, query) for every query variable (`label_values(...)`: not PromQL)."""
    out = []
    for uid, dashboard in load_dashboards(directory).items():
        for var in dashboard.get("templating", {}).get("list", []):
            if var.get("type") == "query":
                q = var["query"]
                out.append((uid, var["name"], q["query"] if isinstance(q, dict) else q))
    return out


def variables_used(expr: str) -> set[str]:
    return {a or b or c for a, b, c in _VARIABLE.findall(expr)}


def substitute(expr: str, values: dict[str, str]) -> str:
    """`$name`, `${name}`, `${name:format}` and `[[name]]` replaced by values[name]; KeyError if one is missing."""
    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        return values[name]
    return _VARIABLE.sub(repl, expr)


def default_values(node: str, cluster: str = ".*", gpu: str = ".*", rate_interval: str = "1m",
                   interval: str = "15s", range_: str = "1h") -> dict[str, str]:
    seconds = _seconds(range_)
    return {"node": node, "cluster": cluster, "gpu": gpu, "datasource": "prometheus",
            "__rate_interval": rate_interval, "__interval": interval, "__range": range_,
            "__range_s": str(seconds), "__interval_ms": str(_seconds(interval) * 1000)}


def panel_queries(node: str, cluster: str = ".*", gpu: str = ".*", *, rate_interval: str = "1m",
                  interval: str = "15s", range_: str = "1h",
                  directory: Path = DASHBOARDS) -> list[tuple[str, str, str]]:
    """(dashboard uid, panel title, expr with every variable substituted) for every panel query."""
    values = default_values(node, cluster, gpu, rate_interval, interval, range_)
    return [(q.dashboard, q.panel, substitute(q.expr, values)) for q in queries(directory)]


# --- metric names -------------------------------------------------------------------------------------------

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
             "unless", "inf", "nan", "atan2"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_OFFSET = re.compile(r"\boffset\s+-?[$\w]+")
_IDENT = re.compile(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions, keywords or labels."""
    expr = _STRING.sub('""', expr)
    expr = _MATCHERS.sub(" ", expr)
    expr = _RANGE.sub(" ", expr)
    expr = _LABEL_LIST.sub(" ", expr)
    expr = _OFFSET.sub(" ", expr)
    return {name for name, call in _IDENT.findall(expr) if not call and name.lower() not in _KEYWORDS}


def _seconds(duration: str) -> int:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    total = 0.0
    for number, unit in re.findall(r"(\d+)(ms|s|m|h|d|w|y)", duration):
        total += int(number) * units[unit]
    return int(total)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print every dashboard query with its variables substituted.")
    parser.add_argument("--node", required=True)
    parser.add_argument("--cluster", default=".*")
    parser.add_argument("--gpu", default=".*")
    parser.add_argument("--rate-interval", default="1m")
    parser.add_argument("--interval", default="15s")
    parser.add_argument("--range", dest="range_", default="1h")
    args = parser.parse_args(argv)
    for dashboard, panel, expr in panel_queries(args.node, args.cluster, args.gpu, rate_interval=args.rate_interval,
                                                interval=args.interval, range_=args.range_):
        print(json.dumps({"dashboard": dashboard, "panel": panel, "expr": expr}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
