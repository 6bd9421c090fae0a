"""Generate the recording rules at the head of ``rules/xid.alerts.yaml`` from the XID policy table
``rules/xid-policy.yaml`` and the Xid catalog.

The policy table is the reviewed decision of what to do about each Xid; the rules must say exactly what it says.
Writing them by hand would let the two drift, so the classification rules are generated: one regex of codes per
class on the ``xid`` label, never the exporter's ``action`` label, so the reviewed table decides. ``--check`` fails
(exit 1) when the file on disk is not what the table gives, and the test suite runs it.

The records go between the BEGIN and END GENERATED lines of the alerts' own group, not into a group of their own:
rules of one group run in order at one evaluation time, so an alert reads the record made the same moment.
From a group of their own they reached the alerts up to one evaluation interval later, wherever the two
groups' offsets fell (the 1,000-node soak: Xid 48 to cordon took 17 to 34 s against 8 to 26 s for Xid 79).

Usage: python tools/gen_xid_rules.py [--check]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exporter.xid.catalog import XID_CATALOG  # noqa: E402  (needs ROOT on sys.path)

POLICY_PATH = ROOT / "rules" / "xid-policy.yaml"
OUT_PATH = ROOT / "rules" / "xid.alerts.yaml"
BEGIN = "      # BEGIN GENERATED"
END = "      # END GENERATED"
COMMAND = "python tools/gen_xid_rules.py"

XID_CLASSES = ("none", "reset_gpu", "reboot", "human", "recovery")
RECOVERY_CLASSES = ("none", "reset_gpu", "reboot", "drain", "human")
# Classes whose fault a reset of the GPU fixes; a reboot (or replace) of the node fixes every class.
NOT_FIXED_BY_GPU_RESET = ("reboot",)
# How long the last-success records keep a value the webhook no longer exports: longer than any scrape gap or
# webhook outage, and than the contract's 8 days of export.
LATCH_DAYS = 30


def load_policy(path: Path = POLICY_PATH) -> dict[str, Any]:
    """Read the policy table and check its shape; a malformed table stops the generator with the reason."""
    policy = yaml.safe_load(path.read_text(encoding="utf-8"))
    for key in ("classes", "buckets", "unused", "unknown", "codes", "recovery_actions"):
        if key not in policy:
            raise ValueError(f"{path.name}: missing top-level key {key!r}")
    for name, row in policy["buckets"].items():
        _check_row(f"buckets.{name}", row, XID_CLASSES)
    for key in ("unused", "unknown"):
        _check_row(key, policy[key], XID_CLASSES)
    for code, row in policy["codes"].items():
        if not isinstance(code, int):
            raise ValueError(f"codes: key {code!r} is not an Xid number")
        if not row.get("reason"):
            raise ValueError(f"codes.{code}: no reason")
        if ("class" in row) == ("bucket" in row):
            raise ValueError(f"codes.{code}: give exactly one of class or bucket")
        if "bucket" in row and row["bucket"] not in policy["buckets"]:
            raise ValueError(f"codes.{code}: bucket {row['bucket']} has no row in buckets")
        if "class" in row and row["class"] not in XID_CLASSES:
            raise ValueError(f"codes.{code}: unknown class {row['class']!r}")
    for value, row in policy["recovery_actions"].items():
        if not isinstance(value, int):
            raise ValueError(f"recovery_actions: key {value!r} is not a number")
        _check_row(f"recovery_actions.{value}", row, RECOVERY_CLASSES)
    return policy


def _check_row(where: str, row: Mapping[str, Any], classes: tuple[str, ...]) -> None:
    if row.get("class") not in classes:
        raise ValueError(f"{where}: class {row.get('class')!r} is not one of {', '.join(classes)}")
    if not row.get("reason"):
        raise ValueError(f"{where}: no reason")


def classify(policy: Mapping[str, Any], code: int) -> str:
    """The class of Xid ``code``: a per-code row, else unused, else the catalog bucket's row, else unknown."""
    row = policy["codes"].get(code)
    if row is not None:
        return row["class"] if "class" in row else policy["buckets"][row["bucket"]]["class"]
    info = XID_CATALOG.get(code)
    if info is None:
        return policy["unknown"]["class"]
    if info.unused:
        return policy["unused"]["class"]
    bucket = policy["buckets"].get(info.action)
    if bucket is None:
        raise ValueError(f"Xid {code}: catalog bucket {info.action} has no row in {POLICY_PATH.name}")
    return bucket["class"]


def codes_by_class(policy: Mapping[str, Any]) -> dict[str, list[int]]:
    """Every catalog code, grouped by class (classes without codes are left out)."""
    out: dict[str, list[int]] = {}
    for code in sorted(XID_CATALOG):
        out.setdefault(classify(policy, code), []).append(code)
    return out


def _regex(codes: list[int]) -> str:
    return "|".join(str(c) for c in codes)


def _xid_branch(cls: str, selector: str) -> str:
    return (
        f'label_replace(max by (node, gpu, uuid, xid) (gpu_xid_last_timestamp_seconds{{{selector}}}), '
        f'"policy", "{cls}", "", "")'
    )


def _count_value(value: float) -> str:
    """A number as count_values spells it in its label (Go's strconv 'f', -1): 1, not 1.0."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _recovery_expr(actions: Mapping[Any, Mapping[str, str]], unknown_class: str) -> str:
    """The announced recovery action labelled with its class and name, in one pass over the GPUs: count_values
    turns NVML's value into a label, which joins a table of the policy's rows (one vector(1) per row; a value
    without a row has no `listed` label and joins the unknown row). Nine label_replace branches, one per value,
    each re-reading both records, cost a second per evaluation at 1,000 nodes (benchmarks/rule_eval.py)."""
    action = "node_gpu:gpu_recovery_action:max"
    announced = "node_gpu:gpu_xid_154_last_timestamp_seconds:max"
    values = sorted(actions)
    listed = "|".join(re.escape(_count_value(v)) for v in values)

    def row(labels: Mapping[str, str]) -> str:
        text = "vector(1)"
        for key, value in labels.items():
            text = f'label_replace({text}, "{key}", "{value}", "", "")'
        return text

    table = [row({"listed": _count_value(v), "policy": actions[v]["class"], "recovery_action": actions[v]["name"]})
             for v in values]
    table.append(row({"policy": unknown_class, "recovery_action": "UNKNOWN"}))
    rows = "\n  or\n".join(f"  {r}" for r in table)
    return f"""\
label_replace(
  {announced}
  * on(node, gpu, uuid) group_left(listed)
  label_replace(
    count_values by (node, gpu, uuid) ("value", {action} and on(node, gpu, uuid) {announced}),
    "listed", "$1", "value", "({listed})"
  )
  * on(listed) group_left(policy, recovery_action)
  (
{_indent(rows, 2)}
  ),
  "listed", "", "", ""
)"""


def render(policy: Mapping[str, Any]) -> str:
    """The generated block of rules/xid.alerts.yaml, BEGIN and END lines included."""
    by_class = codes_by_class(policy)
    unknown_class = policy["unknown"]["class"]
    all_codes = _regex(sorted(XID_CATALOG))
    branches = [_xid_branch(cls, f'xid=~"{_regex(by_class[cls])}"') for cls in XID_CLASSES if cls in by_class]
    branches.append(_xid_branch(unknown_class, f'xid!~"{all_codes}"'))
    xid_expr = "\nor\n".join(branches)

    rec_expr = _recovery_expr(policy["recovery_actions"], unknown_class)

    not_by_reset = "|".join(NOT_FIXED_BY_GPU_RESET)
    table = "\n".join(
        f"      #   {cls:<10} {_short(codes)}"
        for cls, codes in ((c, by_class[c]) for c in XID_CLASSES if c in by_class)
    )
    return f"""\
{BEGIN} by `{COMMAND}` from rules/xid-policy.yaml and exporter/xid/catalog.py.
      # Edit the policy table and rerun the command, not the lines up to END GENERATED (`--check` fails when
      # they are stale).
      # Classes of the catalog's codes (codes newer than the catalog: {unknown_class}):
{table}
      # Newest successful reset of each GPU (by uuid: indexes can change across boots) and newest successful
      # reboot or replace of each node, from the webhook (docs/webhook-metrics-contract.md). A fault older than
      # the action that fixes it no longer stands.
      # Latched: while the webhook's series is absent (a scrape gap, a restart) each record falls back to its own
      # previous value, else a fixed fault would stand again and re-fire. The live value wins whenever present;
      # the latched one expires {LATCH_DAYS} days after the last success, so the series set stays bounded. A
      # Prometheus down for longer than its lookback (5m) loses it; the webhook refuses a fixed fault anyway.
      - record: node_uuid:gpu_remediation_last_success_timestamp_seconds:max
        expr: |
          max by (node, uuid) (gpu_remediation_last_success_timestamp_seconds{{action="reset_gpu"}})
          or
          (node_uuid:gpu_remediation_last_success_timestamp_seconds:max > time() - {LATCH_DAYS} * 86400)
      - record: node:gpu_remediation_last_success_timestamp_seconds:max
        expr: |
          max by (node) (gpu_remediation_last_success_timestamp_seconds{{action=~"reboot|replace"}})
          or
          (node:gpu_remediation_last_success_timestamp_seconds:max > time() - {LATCH_DAYS} * 86400)

      # Every Xid seen this boot, labelled with its policy class; value: when it last happened. The series
      # exists from the first occurrence on (whatever the count), so a counter that first appears above zero
      # is caught, and it keeps existing until the node reboots (counts are per boot).
      - record: node_gpu_xid:gpu_xid_last_timestamp_seconds:max
        expr: |
{_indent(xid_expr, 10)}

      # The recovery action the last Xid 154 announced (NVML's value), and when it was announced (0 if the
      # exporter lost that time): for the GPUs that announced one or have one pending, not for every GPU whose
      # action is NONE (at 1,000 nodes those zeros were 8,000 series read four times per evaluation).
      - record: node_gpu:gpu_recovery_action:max
        expr: max by (node, gpu, uuid) (gpu_recovery_action)
      - record: node_gpu:gpu_xid_154_last_timestamp_seconds:max
        expr: |
          max by (node, gpu, uuid) (gpu_xid_last_timestamp_seconds{{xid="154"}})
          or (node_gpu:gpu_recovery_action:max != 0) * 0
      # The same, labelled with the recovery action's policy class and NVML name; value: when it was announced.
      - record: node_gpu:gpu_recovery_action_announced_timestamp_seconds:max
        expr: |
{_indent(rec_expr, 10)}

      # The faults that still stand: newer than the last successful action that fixes them. A GPU reset fixes
      # every class but {not_by_reset}; a node reboot or replace fixes all. A missing action series means no action yet.
      - record: node_gpu_xid:gpu_xid_last_timestamp_seconds:uncleared
        expr: |
          node_gpu_xid:gpu_xid_last_timestamp_seconds:max
          unless on(node, gpu, uuid, xid)
            (node_gpu_xid:gpu_xid_last_timestamp_seconds:max{{policy!~"{not_by_reset}"}}
              <= on(node, uuid) group_left() node_uuid:gpu_remediation_last_success_timestamp_seconds:max)
          unless on(node, gpu, uuid, xid)
            (node_gpu_xid:gpu_xid_last_timestamp_seconds:max
              <= on(node) group_left() node:gpu_remediation_last_success_timestamp_seconds:max)
      - record: node_gpu:gpu_recovery_action_announced_timestamp_seconds:uncleared
        expr: |
          node_gpu:gpu_recovery_action_announced_timestamp_seconds:max
          unless on(node, gpu, uuid)
            (node_gpu:gpu_recovery_action_announced_timestamp_seconds:max{{policy!~"{not_by_reset}"}}
              <= on(node, uuid) group_left() node_uuid:gpu_remediation_last_success_timestamp_seconds:max)
          unless on(node, gpu, uuid)
            (node_gpu:gpu_recovery_action_announced_timestamp_seconds:max
              <= on(node) group_left() node:gpu_remediation_last_success_timestamp_seconds:max)
{END}
"""


def splice(current: str, block: str) -> str:
    """`current` with the lines from BEGIN to END GENERATED replaced by `block`."""
    lines = current.splitlines(keepends=True)
    begins = [i for i, line in enumerate(lines) if line.startswith(BEGIN)]
    ends = [i for i, line in enumerate(lines) if line.rstrip("\n") == END]
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        raise ValueError(f"{OUT_PATH.name}: needs exactly one {BEGIN.strip()!r} line and, after it, one "
                         f"{END.strip()!r} line")
    return "".join(lines[:begins[0]]) + block + "".join(lines[ends[0] + 1:])


def _short(codes: list[int]) -> str:
    """Codes as ranges (1-7, 9, ...) so the comment stays readable."""
    parts: list[str] = []
    start = prev = codes[0]
    for code in [*codes[1:], None]:
        if code is not None and code == prev + 1:
            prev = code
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if code is not None:
            start = prev = code
    return ", ".join(parts)


def _indent(text: str, spaces: int) -> str:
    pad = " " * spaces
    return "\n".join(pad + line if line else line for line in text.splitlines())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the rules file is stale; write nothing")
    args = parser.parse_args(argv)
    current = OUT_PATH.read_text(encoding="utf-8")
    text = splice(current, render(load_policy()))
    if args.check:
        if current != text:
            print(f"{OUT_PATH.relative_to(ROOT)} is stale: run `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    OUT_PATH.write_text(text, encoding="utf-8")
    print(f"wrote {OUT_PATH.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
