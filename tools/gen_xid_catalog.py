"""Generate ``exporter/xid/catalog.py`` from ``exporter/xid/xid-catalog.csv``.

The catalog is data that NVIDIA revises; keeping it as a CSV (with its sources in the header) makes a revision a
reviewable one-line diff, and generating plain Python from it means the exporter needs no data file at run time.
``--check`` lets CI fail when someone edits the CSV but forgets to regenerate. Standard library only, so it runs
before any dependency is installed.

Usage: python tools/gen_xid_catalog.py [--check]
"""

from __future__ import annotations

import csv
import io
import re
import sys
from pathlib import Path

try:
    from tools.catalog_gen import render_module, run
except ModuleNotFoundError:  # run as a script: tools/ is on sys.path, the repository root is not
    from catalog_gen import render_module, run  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
CSV_PATH = ROOT / "exporter" / "xid" / "xid-catalog.csv"
OUT_PATH = ROOT / "exporter" / "xid" / "catalog.py"
COMMAND = "python tools/gen_xid_catalog.py"

NONE_GIVEN = "NONE_GIVEN"
_INVESTIGATORY = "; investigatory:"
# e.g. "RESTART_APP", "WORKFLOW_XID_45", "XID_154"
_BUCKET_RE = re.compile(r"[A-Z][A-Z0-9_]*")
_COLUMNS = ["xid", "name", "description", "origin", "action"]


def split_action(code: int, action: str) -> tuple[str, str | None]:
    """Split the action column into (immediate bucket, investigatory text or None).

    Rows the catalog left without a resolution ("not given", "not specified in catalog (new entry)", empty) become
    NONE_GIVEN, so consumers can tell "NVIDIA says nothing" from a real bucket; anything else that is not a bucket
    name stops the generator, because a silently mangled action would mislead whoever acts on it.
    """
    immediate, sep, investigatory = action.partition(_INVESTIGATORY)
    immediate = immediate.strip()
    if _BUCKET_RE.fullmatch(immediate):
        bucket = immediate
    elif not immediate or immediate.lower().startswith("not "):
        bucket = NONE_GIVEN
    else:
        raise ValueError(f"Xid {code}: action {action!r} starts with neither a bucket name nor 'not given'")
    return bucket, (investigatory.strip() or None) if sep else None


def read_catalog(csv_text: str) -> tuple[list[str], list[tuple[int, str, str, str, str, str | None, bool]]]:
    """Return the CSV's '#' header lines (its sources) and its rows as XidInfo argument tuples, sorted by code."""
    lines = csv_text.splitlines(keepends=True)
    comments = [line.rstrip("\r\n") for line in lines if line.startswith("#")]
    reader = csv.DictReader(io.StringIO("".join(line for line in lines if not line.startswith("#"))))
    if reader.fieldnames != _COLUMNS:
        raise ValueError(f"expected columns {_COLUMNS}, got {reader.fieldnames}")
    rows: dict[int, tuple[int, str, str, str, str, str | None, bool]] = {}
    for record in reader:
        code = int(record["xid"])
        if code in rows:
            raise ValueError(f"Xid {code} appears twice")
        action, investigatory = split_action(code, record["action"])
        description = record["description"]
        rows[code] = (
            code,
            record["name"],
            description,
            record["origin"],
            action,
            investigatory,
            description.startswith("Unused"),
        )
    return comments, [rows[code] for code in sorted(rows)]


_PREAMBLE = '''\
"""NVIDIA's Xid catalog as Python data: what each Xid means and the catalog's advice on what to do about it."""

import types
from collections.abc import Mapping
from dataclasses import dataclass

NONE_GIVEN = "NONE_GIVEN"
"""``action`` of rows the catalog lists without a resolution (162-172 at the time of writing)."""
UNKNOWN = "UNKNOWN"
"""``name`` and ``action`` of codes newer than this catalog."""


@dataclass(frozen=True, slots=True)
class XidInfo:
    """One catalog row.

    ``action`` is the catalog's immediate resolution bucket (e.g. RESTART_APP, RESET_GPU, RESTART_BM, or NONE_GIVEN);
    ``investigatory`` is the follow-up the catalog suggests, verbatim; ``unused`` marks codes the catalog says
    Ampere-and-newer GPUs do not emit.
    """

    code: int
    name: str
    description: str
    origin: str
    action: str
    investigatory: str | None
    unused: bool


'''

_POSTAMBLE = '''

XID_CATALOG: Mapping[int, XidInfo] = types.MappingProxyType({info.code: info for info in _ROWS})
"""Every cataloged Xid by code; read-only so no caller can change another's view of the catalog."""


def lookup(code: int) -> XidInfo:
    """Return the catalog row for ``code``; for a code newer than this catalog, an UNKNOWN row instead of None.

    A driver can emit codes this catalog predates; the event must still be counted, so callers get a row they can
    use without a None check.
    """
    info = XID_CATALOG.get(code)
    if info is None:
        return XidInfo(code, UNKNOWN, "not in this Xid catalog", "unknown", UNKNOWN, None, False)
    return info
'''


def render(csv_text: str, csv_name: str = "exporter/xid/xid-catalog.csv") -> str:
    """Return the text of the generated module for ``csv_text``."""
    comments, rows = read_catalog(csv_text)
    return render_module(command=COMMAND, csv_name=csv_name, comments=comments, row_class="XidInfo", rows=rows,
                         preamble=_PREAMBLE, postamble=_POSTAMBLE)


def main(argv: list[str]) -> int:
    """Write the module, or with ``--check`` exit 1 when the committed one differs from what would be written."""
    return run(argv, name="gen_xid_catalog", description=__doc__.splitlines()[0], csv_path=CSV_PATH, out_path=OUT_PATH,
               command=COMMAND, render=render)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
