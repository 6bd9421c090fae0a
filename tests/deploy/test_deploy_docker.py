"""deploy/docker: the images' Dockerfiles, checked statically (no Docker engine here): pinned bases, a non-root
user, nothing fetched by ADD, a health check on the port the service listens on, a build context that holds
exactly what the build copies.
"""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
DOCKER = ROOT / "deploy" / "docker"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
# image -> (its console script, the port it listens on)
IMAGES = {"exporter": ("gpu-health-exporter", 9835), "webhook": ("gpu-health-webhook", 9096)}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def instructions(path: Path) -> list[Instruction]:
    """Dockerfile instructions, continuation lines joined, comments dropped."""
    out: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        keyword, _, args = text.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
    assert not pending, f"{path}: dangling line continuation"
    return out


def stages(ins: list[Instruction]) -> list[list[Instruction]]:
    out: list[list[Instruction]] = []
    for i in ins:
        if i.keyword == "FROM":
            out.append([])
        assert out, "an instruction before the first FROM"
        out[-1].append(i)
    return out


def dockerfile(name: str) -> Path:
    return DOCKER / f"{name}.Dockerfile"


@pytest.mark.parametrize("name", IMAGES)
def test_base_images_are_pinned(name: str) -> None:
    aliases = set()
    for stage in stages(instructions(dockerfile(name))):
        words = stage[0].args.split()
        image = next(w for w in words if not w.startswith("--"))
        if image in aliases:
            continue
        if len(words) >= 3 and words[-2].upper() == "AS":
            aliases.add(words[-1])
        assert "@sha256:" in image or re.search(r":\d+\.\d+\.\d+(-[\w.-]+)?$", image), \
            f"{image}: pin a full version (x.y.z) or a digest, never a moving tag"
        assert not image.endswith(":latest")


@pytest.mark.parametrize("name", IMAGES)
def test_python_of_the_base_satisfies_the_project(name: str) -> None:
    minimum = tuple(int(x) for x in re.findall(r"\d+", PROJECT["requires-python"]))
    for stage in stages(instructions(dockerfile(name))):
        m = re.match(r"python:(\d+)\.(\d+)\.\d+", stage[0].args)
        if m:
            assert (int(m[1]), int(m[2])) >= minimum[:2]


@pytest.mark.parametrize("name", IMAGES)
def test_final_stage_runs_as_a_numeric_non_root_user(name: str) -> None:
    final = stages(instructions(dockerfile(name)))[-1]
    users = [i for i in final if i.keyword == "USER"]
    assert users, "the final stage sets no USER: it would run as root"
    user = users[-1].args
    uid, _, gid = user.partition(":")
    # Numeric, so that Kubernetes' runAsNonRoot can verify it without /etc/passwd.
    assert uid.isdigit() and int(uid) != 0, user
    assert not gid or (gid.isdigit() and int(gid) != 0), user
    after = final[final.index(users[-1]) + 1:]
    assert not [i for i in after if i.keyword == "RUN"], "RUN after USER runs as the user, a sign of a fix-up"


@pytest.mark.parametrize("name", IMAGES)
def test_nothing_is_fetched_by_add_or_piped_into_a_shell(name: str) -> None:
    for i in instructions(dockerfile(name)):
        if i.keyword == "ADD":
            assert not re.search(r"https?://|git@", i.args), \
                f"line {i.line}: ADD of a URL: fetch it in a RUN that checks a checksum"
        if i.keyword == "RUN":
            assert not re.search(r"(curl|wget)[^|]*\|\s*(ba)?sh", i.args), f"line {i.line}: pipe into a shell"
            if "apt-get install" in i.args:
                assert "--no-install-recommends" in i.args and "rm -rf /var/lib/apt/lists" in i.args
            if "pip install" in i.args:
                assert "--no-cache-dir" in i.args or "PIP_NO_CACHE_DIR" in dockerfile(name).read_text(encoding="utf-8")


@pytest.mark.parametrize("name", IMAGES)
def test_entrypoint_healthcheck_and_port(name: str) -> None:
    script, port = IMAGES[name]
    assert script in PROJECT["scripts"]
    final = stages(instructions(dockerfile(name)))[-1]
    by = {i.keyword: i.args for i in final}
    assert json.loads(by["ENTRYPOINT"]) == [script]  # exec form: signals reach the service, no shell
    assert str(port) in by["EXPOSE"].split()
    health = by["HEALTHCHECK"]
    assert f"127.0.0.1:{port}/healthz" in health
    command = json.loads(health[health.index("CMD") + 3:].strip())
    assert command[0] == "python"  # present in the image (no curl in a slim image)


@pytest.mark.parametrize("name", IMAGES)
def test_build_context_holds_what_the_build_copies(name: str) -> None:
    """BuildKit reads <name>.Dockerfile.dockerignore; every COPY source must survive it and exist."""
    ignore = (DOCKER / f"{name}.Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = [p.strip() for p in ignore if p.strip() and not p.startswith("#")]

    def included(path: str) -> bool:
        keep = True
        for pattern in patterns:
            negate = pattern.startswith("!")
            pat = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pat) or path.startswith(pat + "/"):
                keep = negate
        return keep

    for i in instructions(dockerfile(name)):
        if i.keyword != "COPY" or "--from=" in i.args:
            continue
        *sources, _dest = i.args.split()
        for src in sources:
            # A wildcard source (the webhook's locks) copies what it matches; it must match something.
            matched = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(src)) if "*" in src else [src]
            assert matched and all((ROOT / m).exists() for m in matched), f"line {i.line}: {src} does not exist"
            for m in matched:
                assert included(m.rstrip("/")), f"line {i.line}: {m} is excluded by the .dockerignore"
    assert not included(".git") and not included(".venv") and not included("tests")
    # What `pip install .` needs: the project file, its readme, its packages.
    for needed in ("pyproject.toml", PROJECT["readme"], "exporter", "remediation_webhook"):
        assert included(needed), needed


def test_exporter_image_has_journalctl_for_the_journal_source() -> None:
    final = stages(instructions(dockerfile("exporter")))[-1]
    installs = " ".join(i.args for i in final if i.keyword == "RUN" and "apt-get install" in i.args)
    assert re.search(r"\bsystemd\b", installs), "journalctl (package systemd) is what --xid.source=journal runs"
