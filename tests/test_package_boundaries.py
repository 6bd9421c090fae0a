"""Neither service imports the other: what both need lives in gpu_health_common, which imports neither."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"exporter": {"remediation_webhook"}, "remediation_webhook": {"exporter"},
             "gpu_health_common": {"exporter", "remediation_webhook"}}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_the_other_service(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    offending = {str(p.relative_to(ROOT)): sorted(_imports(p) & FORBIDDEN[package]) for p in files
                 if _imports(p) & FORBIDDEN[package]}
    assert offending == {}
