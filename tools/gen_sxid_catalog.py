"""Generate ``exporter/xid/sxid_catalog.py`` from ``exporter/xid/sxid-catalog.csv``.

The SXid catalog's sources, as the CSV's header states them in full:

- names: NVIDIA's nvidia-nvswitch driver, ``enum nvswitch_err_type`` in NVIDIA/open-gpu-kernel-modules
  ``src/common/nvswitch/interface/ctrl_dev_nvswitch.h`` (tag 595.45.04);
- fatal or not, and the recommended recovery: NVIDIA "Fabric Manager for NVIDIA NVSwitch Systems" user guide,
  DU-09883-001 v1.3, appendix "NVSwitch Errors" (https://docs.nvidia.com/datacenter/tesla/pdf/fabric-manager-user-guide.pdf),
  its non-fatal, fatal, always-fatal and other-notable SXid tables.

Like tools/gen_xid_catalog.py: the data stays a reviewable CSV, the exporter imports plain Python and needs no data
file at run time, and ``--check`` fails CI when the CSV was edited but the module not regenerated. Standard library
only, so it runs before any dependency is installed.

Usage: python tools/gen_sxid_catalog.py [--check]
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
CSV_PATH = ROOT / "exporter" / "xid" / "sxid-catalog.csv"
OUT_PATH = ROOT / "exporter" / "xid" / "sxid_catalog.py"
COMMAND = "python tools/gen_sxid_catalog.py"

_COLUMNS = ["sxid", "name", "description", "fatal", "action", "recovery"]
FATAL_CLASSES = ("non_fatal", "fatal", "always_fatal", "not_given")
ACTIONS = (
    "IGNORE", "RESTART_VM", "RESET_GPUS_AND_NVSWITCHES", "RESTART_BM", "CHECK_MECHANICALS", "CHECK_COOLING",
    "NONE_GIVEN",
)
# e.g. NPORT_INGRESS_ACLFAIL, MINION_NONFATAL
_NAME_RE = re.compile(r"[A-Z][A-Z0-9_]*")

Row = tuple[int, str, str, str, str, str]


def read_catalog(csv_text: str) -> tuple[list[str], list[Row]]:
    """Return the CSV's '#' header lines and its rows as SxidInfo argument tuples, sorted by code.

    Every value is checked, because a mangled row would put a wrong action on a series someone acts on: the code
    is a 5-digit SXid (10000 and up), the name a driver mnemonic, fatal and action from the fixed sets above,
    and a row whose code the guide does not list (fatal not_given) carries no action but NONE_GIVEN.
    """
    lines = csv_text.splitlines(keepends=True)
    comments = [line.rstrip("\r\n") for line in lines if line.startswith("#")]
    reader = csv.DictReader(io.StringIO("".join(line for line in lines if not line.startswith("#"))))
    if reader.fieldnames != _COLUMNS:
        raise ValueError(f"expected columns {_COLUMNS}, got {reader.fieldnames}")
    rows: dict[int, Row] = {}
    for record in reader:
        where = f"line {reader.line_num} (SXid {record['sxid']!r})"
        try:
            code = int(record["sxid"])
        except ValueError:
            raise ValueError(f"{where}: sxid is not a number") from None
        if not 10000 <= code <= 99999:
            raise ValueError(f"{where}: SXids are 5-digit codes from 10000")
        if code in rows:
            raise ValueError(f"{where}: SXid {code} appears twice")
        if not _NAME_RE.fullmatch(record["name"]):
            raise ValueError(f"{where}: name {record['name']!r} is not a driver mnemonic (A-Z, 0-9, _)")
        if record["fatal"] not in FATAL_CLASSES:
            raise ValueError(f"{where}: fatal {record['fatal']!r} is not one of {', '.join(FATAL_CLASSES)}")
        if record["action"] not in ACTIONS:
            raise ValueError(f"{where}: action {record['action']!r} is not one of {', '.join(ACTIONS)}")
        if record["fatal"] == "not_given" and record["action"] != "NONE_GIVEN":
            raise ValueError(f"{where}: a code the guide does not list has no action but NONE_GIVEN")
        rows[code] = (code, record["name"], record["description"], record["fatal"], record["action"], record["recovery"])
    return comments, [rows[code] for code in sorted(rows)]


_PREAMBLE = '''\
"""NVIDIA's SXid (NVSwitch error) catalog as Python data: the driver's name, and the Fabric Manager guide's verdict."""

import types
from collections.abc import Mapping
from dataclasses import dataclass

NONE_GIVEN = "NONE_GIVEN"
"""``action`` of codes the guide gives no recovery for, or does not list."""
UNKNOWN = "UNKNOWN"
"""``name`` and ``action`` of codes newer than this catalog."""


@dataclass(frozen=True, slots=True)
class SxidInfo:
    """One catalog row.

    ``fatal`` is the guide's table: non_fatal, fatal (to the port and the partition using it), always_fatal (to
    the whole fabric) or not_given. ``action`` is the guide's recovery as a bucket (IGNORE, RESTART_VM,
    RESET_GPUS_AND_NVSWITCHES, RESTART_BM, CHECK_MECHANICALS, CHECK_COOLING, NONE_GIVEN); ``recovery`` its text.
    """

    code: int
    name: str
    description: str
    fatal: str
    action: str
    recovery: str


'''

_POSTAMBLE = '''

SXID_CATALOG: Mapping[int, SxidInfo] = types.MappingProxyType({info.code: info for info in _ROWS})
"""Every cataloged SXid by code; read-only so no caller can change another's view of the catalog."""


def lookup(code: int) -> SxidInfo:
    """Return the catalog row for ``code``; for a code newer than this catalog, an UNKNOWN row instead of None.

    A driver can emit codes this catalog predates; the incident must still be counted, so callers get a row they
    can use without a None check.
    """
    info = SXID_CATALOG.get(code)
    if info is None:
        return SxidInfo(code, UNKNOWN, "not in this SXid catalog", "not_given", UNKNOWN, "")
    return info
'''


def render(csv_text: str, csv_name: str = "exporter/xid/sxid-catalog.csv") -> str:
    """Return the text of the generated module for ``csv_text``."""
    comments, rows = read_catalog(csv_text)
    return render_module(command=COMMAND, csv_name=csv_name, comments=comments, row_class="SxidInfo", rows=rows,
                         preamble=_PREAMBLE, postamble=_POSTAMBLE)


def main(argv: list[str]) -> int:
    """Write the module, or with ``--check`` exit 1 when the committed one differs from what would be written."""
    return run(argv, name="gen_sxid_catalog", description=__doc__.splitlines()[0], csv_path=CSV_PATH, out_path=OUT_PATH,
               command=COMMAND, render=render)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
