"""The dashboards type-check against Grafana's own schema: `@grafana/schema` with TypeScript, both pinned in
tools/dashboard_check (package.json + package-lock.json). Each dashboard becomes an object literal typed
`Lit<Dashboard>` and each panel an object literal typed with its plugin's options and field config
(tools/dashboard_check/generate_ts.py, lib.ts), so a misspelt key, a wrong type or an invalid enum value anywhere
fails `tsc --noEmit`. Needs Node.js and npm (skipped with a message without npm); `npm ci` runs once, only when
node_modules does not hold the locked versions.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
CHECK = ROOT / "tools" / "dashboard_check"
DASHBOARDS = ROOT / "dashboards"


def _load(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


gen = _load("dashboard_check_generate_ts", CHECK / "generate_ts.py")


def _locked_versions() -> dict[str, str]:
    lock = json.loads((CHECK / "package-lock.json").read_text(encoding="utf-8"))
    wanted = lock["packages"][""]["devDependencies"]
    return {name: lock["packages"][f"node_modules/{name}"]["version"] for name in wanted}


def _installed(versions: dict[str, str]) -> bool:
    for name, version in versions.items():
        manifest = CHECK / "node_modules" / name / "package.json"
        if not manifest.is_file() or json.loads(manifest.read_text(encoding="utf-8"))["version"] != version:
            return False
    return (CHECK / "node_modules" / ".bin" / "tsc").exists()


@pytest.fixture(scope="module")
def tsc() -> list[str]:
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm not found: install Node.js 18+ with npm to check the dashboards against @grafana/schema")
    versions = _locked_versions()
    if not _installed(versions):
        result = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--prefer-offline"], cwd=CHECK,
                                capture_output=True, check=False, text=True, timeout=600)
        assert result.returncode == 0, f"npm ci failed in {CHECK}:\n{result.stdout}\n{result.stderr}"
        assert _installed(versions)
    return [str(CHECK / "node_modules" / ".bin" / "tsc")]


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A scratch project next to lib.ts and node_modules (module resolution walks up to them)."""
    path = CHECK / f".pytest-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    (path / "tsconfig.json").write_text(json.dumps({"extends": "../tsconfig.json", "include": ["../lib.ts", "*.ts"]}),
                                        encoding="utf-8")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_tsc(tsc: list[str], project: Path) -> dict[str, list[str]]:
    """file name -> its error lines."""
    result = subprocess.run([*tsc, "--noEmit", "-p", str(project / "tsconfig.json")], capture_output=True, check=False,
                            text=True, timeout=300, cwd=CHECK)
    errors: dict[str, list[str]] = {}
    for line in (result.stdout + result.stderr).splitlines():
        m = re.match(r"(?:.*/)?([\w.-]+\.ts)\(\d+,\d+\): error", line)
        if m:
            errors.setdefault(m[1], []).append(line)
        elif line.strip() and not line.startswith(" "):
            errors.setdefault("<tsc>", []).append(line)
    if result.returncode != 0 and not errors:
        errors["<tsc>"] = [result.stdout + result.stderr]
    return errors


def _first(d: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(p for p in d["panels"] if p["type"] == kind)


def _mutations(d: dict[str, Any]) -> dict[str, tuple[dict[str, Any], str]]:
    """name -> (a broken copy of the dashboard, the text tsc's error must contain)."""
    out = {}

    def mutate(name: str, needle: str, change: Any) -> None:
        broken = copy.deepcopy(d)
        change(broken)
        out[name] = (broken, needle)

    mutate("gridpos_key", "hh", lambda x: _first(x, "stat")["gridPos"].update(hh=3))
    mutate("custom_key", "lineWidthh",
           lambda x: _first(x, "timeseries")["fieldConfig"]["defaults"]["custom"].update(lineWidthh=2))
    mutate("enum_value", '"lines"',
           lambda x: _first(x, "timeseries")["fieldConfig"]["defaults"]["custom"].update(drawStyle="lines"))
    mutate("stat_option", "colourMode", lambda x: _first(x, "stat")["options"].update(colourMode="value"))
    mutate("target_key", "legendFormatt", lambda x: _first(x, "timeseries")["targets"][0].update(legendFormatt="x"))
    mutate("table_cell", '"autoo"',
           lambda x: _first(x, "table")["fieldConfig"]["defaults"]["custom"].update(cellOptions={"type": "autoo"}))
    mutate("dashboard_type", "DashboardCursorSync", lambda x: x.update(graphTooltip="shared"))
    mutate("variable_key", "definitionn", lambda x: x["templating"]["list"][1].update(definitionn="x"))
    mutate("missing_required", "reduceOptions", lambda x: _first(x, "stat")["options"].pop("reduceOptions"))
    return out


def test_generator_refuses_deprecated_panels() -> None:
    with pytest.raises(gen.UnsupportedPanel, match="graph"):
        gen.to_typescript({"panels": [{"type": "graph", "title": "old"}]}, "x")


def test_dashboards_match_grafanas_schema_and_the_check_catches_mistakes(tsc: list[str], workdir: Path) -> None:
    sources = sorted(DASHBOARDS.glob("*.json"))
    assert len(sources) == 3
    gen.generate(sources, workdir)
    node = json.loads((DASHBOARDS / "gpu-health-node.json").read_text(encoding="utf-8"))
    mutations = _mutations(node)
    for name, (broken, _) in mutations.items():
        (workdir / f"bad_{name}.ts").write_text(gen.to_typescript(broken, f"bad_{name}"), encoding="utf-8")

    errors = run_tsc(tsc, workdir)

    good = {f"{p.stem}.ts" for p in sources}
    assert not {k: v for k, v in errors.items() if k in good or k in {"<tsc>", "lib.ts"}}, errors
    for name, (_, needle) in mutations.items():
        found = errors.get(f"bad_{name}.ts", [])
        assert any(needle in line for line in found), f"tsc missed the {name} mistake: {found}"
