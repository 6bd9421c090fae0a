"""The documentation site builds with `mkdocs build --strict` (mkdocs-material) without the network, and its pages
keep up with the code: the metrics reference lists every metric, and the paths the pages name exist.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from remediation_webhook.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent.parent
DOCS = ROOT / "docs"
# The pages of the deployment issue (other pages belong to their own issues).
PAGES = ["index.md", "install/kubernetes.md", "install/systemd.md", "install/slurm.md", "install/containers.md",
         "dashboards.md", "upgrading.md", "metrics.md"]


def _mkdocs_config() -> dict[str, object]:
    class Loader(yaml.SafeLoader):
        pass

    # mkdocs.yml may use !ENV and python tags; none is needed here, but do not choke on them.
    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    return yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=Loader)


def test_site_builds_strict_and_offline(tmp_path: Path) -> None:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1",
               # Any attempt to fetch (fonts, social cards, a privacy plugin) goes to a dead proxy and fails.
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", NO_PROXY="")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                             str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                            capture_output=True, check=False, text=True, timeout=120, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    for page in PAGES + ["runbooks.md"]:
        html = tmp_path / "site" / page.removesuffix(".md").removesuffix("index") / "index.html"
        assert html.is_file(), page


def test_site_needs_no_network_plugin() -> None:
    config = _mkdocs_config()
    theme = config["theme"]
    assert isinstance(theme, dict) and theme["name"] == "material"
    assert theme["font"] is False, "web fonts are fetched by the reader's browser from Google: keep them off"
    entries = config.get("plugins", [])
    assert isinstance(entries, list)
    plugins = {p if isinstance(p, str) else next(iter(p)) for p in entries}
    assert plugins <= {"search"}, plugins


def test_every_deployment_page_is_in_the_nav() -> None:
    nav = yaml.safe_dump(_mkdocs_config()["nav"])
    for page in PAGES + ["runbooks.md", "webhook-metrics-contract.md"]:
        assert page in nav, page


def _documented(section: str) -> set[str]:
    text = (DOCS / "metrics.md").read_text(encoding="utf-8")
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 1)
    return set(re.findall(r"^\| `([a-zA-Z0-9_:]+)`", text[start:end if end > 0 else None], re.MULTILINE))


def test_metrics_reference_lists_every_metric() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    readme_table = readme[readme.index("### Metrics"):readme.index("### XID and SXID errors")]
    exporter = set(re.findall(r"^\| `(gpu_[a-z0-9_]+)`", readme_table, re.MULTILINE))
    golden = set()
    for path in [*(ROOT / "tests" / "golden").glob("*.prom"), ROOT / "tests" / "dcgm" / "golden-dcgm.prom"]:
        golden |= set(re.findall(r"^# TYPE (\S+)", path.read_text(encoding="utf-8"), re.MULTILINE))
    assert golden <= exporter
    assert _documented("Exporter") == exporter
    records = {r["record"] for pattern in ("*.rules.yaml", "*.alerts.yaml") for p in (ROOT / "rules").glob(pattern)
               for g in yaml.safe_load(p.read_text(encoding="utf-8"))["groups"] for r in g["rules"] if "record" in r}
    assert _documented("Recording rules") == records
    webhook = {f.name + ("_total" if f.type == "counter" else "") for f in Metrics().registry.collect()}
    assert _documented("Remediation webhook") == webhook


def test_paths_the_pages_name_exist() -> None:
    path = re.compile(r"`((?:deploy|rules|dashboards|tools|docs|benchmarks|tests)/[\w./*-]*)`")
    for page in PAGES:
        for name in path.findall((DOCS / page).read_text(encoding="utf-8")):
            name = name.split("*")[0].rstrip("/")
            assert (ROOT / name).exists(), f"docs/{page} names {name}, which does not exist"
