"""Lock the Python dependencies of each container image, with hashes.

    pip install uv                              # once; uv resolves, pip installs
    python tools/lock_requirements.py           # rewrite deploy/docker/<image>.lock for every image
    python tools/lock_requirements.py --check   # offline: exit 1 naming each lock older than pyproject.toml

An image installs its lock in pip's hash-checking mode (`pip install --require-hashes -r <image>.lock`), then the
project itself with `--no-deps --no-build-isolation`: every third-party file in the image is one whose hash was
recorded here, and setuptools, which builds the project, is locked too (build isolation would fetch it unchecked).

A lock is universal (x86_64 and arm64 hosts alike, uv's `--universal`) for the Python minor version of the image's
FROM line. Its header records a digest of what it was made from (the requirements and that Python version):
`--check` and tests/deploy/test_deploy_docker.py recompute it, so a dependency changed in pyproject.toml without
a new lock fails the tests. Run this after any such change and at release time (to take fixed versions), and
commit the locks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "deploy" / "docker"
# lock -> the pyproject extras it holds. A lock is named after its image's Dockerfile, and a variant of it after a
# dash: the webhook image's build argument PROVIDERS picks webhook.lock (none) or webhook-<aws|gcp|azure|all>.lock,
# each a whole resolution of its own (pip installs exactly one lock).
IMAGES: dict[str, tuple[str, ...]] = {"exporter": (), "webhook": (), "webhook-aws": ("aws",),
                                      "webhook-gcp": ("gcp",), "webhook-azure": ("azure",),
                                      "webhook-all": ("aws", "gcp", "azure")}
_DIGEST = re.compile(r"^# input-sha256: ([0-9a-f]{64})$", re.M)


def lock_path(image: str) -> Path:
    return DOCKER / f"{image}.lock"


def dockerfile(image: str) -> Path:
    """The Dockerfile that installs the lock `image` (a variant `webhook-aws` is the webhook image's)."""
    return DOCKER / f"{image.split('-')[0]}.Dockerfile"


def image_python(image: str) -> str:
    """The Python minor version of the image's base (`FROM python:3.13.x-...`)."""
    text = dockerfile(image).read_text(encoding="utf-8")
    found = {m[1] for m in re.finditer(r"^FROM\s+(?:--\S+\s+)*python:(\d+\.\d+)\.", text, re.M)}
    if len(found) != 1:
        raise SystemExit(f"{dockerfile(image).name}: expected FROM python:X.Y.Z in every stage, found {sorted(found)}")
    return found.pop()


def requirements(image: str, pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """What the image needs: the project's dependencies, its extras, and the build backend."""
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    project = data["project"]
    reqs = list(project["dependencies"])
    for extra in IMAGES[image]:
        reqs += project["optional-dependencies"][extra]
    reqs += data["build-system"]["requires"]
    return sorted(set(reqs))


def input_digest(image: str, pyproject: Path = ROOT / "pyproject.toml") -> str:
    made_from = {"python": image_python(image), "requirements": requirements(image, pyproject)}
    return hashlib.sha256(json.dumps(made_from, sort_keys=True).encode()).hexdigest()


def recorded_digest(text: str) -> str | None:
    m = _DIGEST.search(text)
    return m[1] if m else None


def _uv() -> list[str]:
    uv = shutil.which("uv") or shutil.which("uv", path=str(Path(sys.executable).parent))
    if uv is None:
        raise SystemExit("uv not found: `pip install uv` first")
    return [uv]


def compile_lock(image: str) -> str:
    python = image_python(image)
    with tempfile.TemporaryDirectory() as tmp:
        # A fixed relative name, so the "via" comments do not change with the temporary directory.
        (Path(tmp) / "gpu-health.in").write_text("\n".join(requirements(image)) + "\n", encoding="utf-8")
        result = subprocess.run(
            [*_uv(), "pip", "compile", "gpu-health.in", "--universal", "--python-version", python,
             "--generate-hashes", "--no-header", "--quiet"],
            cwd=tmp, capture_output=True, text=True, check=False, timeout=600)
    if result.returncode != 0:
        raise SystemExit(f"uv pip compile failed for {image}:\n{result.stderr}")
    version = subprocess.run([*_uv(), "--version"], capture_output=True, text=True, check=False).stdout.split()
    header = (f"# deploy/docker/{image}.lock: the {image} image's Python dependencies, pinned with hashes.\n"
              f"# Made by `python tools/lock_requirements.py` ({' '.join(version[:2]) or 'uv'}, universal, "
              f"Python {python}); do not edit by hand.\n"
              f"# input-sha256: {input_digest(image)}\n")
    return header + result.stdout


def stale(images: Sequence[str]) -> list[str]:
    """The images whose lock is missing or was made from other requirements than pyproject.toml's now."""
    out = []
    for image in images:
        path = lock_path(image)
        if not path.is_file() or recorded_digest(path.read_text(encoding="utf-8")) != input_digest(image):
            out.append(image)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that every lock is current (offline)")
    parser.add_argument("images", nargs="*", metavar="IMAGE", help=f"{', '.join(IMAGES)} (default: every image)")
    args = parser.parse_args(argv)
    images = args.images or list(IMAGES)
    unknown = sorted(set(images) - set(IMAGES))
    if unknown:
        parser.error(f"unknown image {', '.join(unknown)}; known: {', '.join(IMAGES)}")
    if args.check:
        old = stale(images)
        for image in old:
            print(f"{lock_path(image).relative_to(ROOT)}: older than pyproject.toml or {image}.Dockerfile's "
                  f"Python; run `python tools/lock_requirements.py`", file=sys.stderr)
        return 1 if old else 0
    for image in images:
        lock_path(image).write_text(compile_lock(image), encoding="utf-8")
        print(f"wrote {lock_path(image).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
