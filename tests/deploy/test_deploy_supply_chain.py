"""The images' supply chain: Python dependencies from lock files with hashes (tools/lock_requirements.py) that are
current with pyproject.toml, installed in pip's hash-checking mode; base images pinned by digest with
tools/pin_base_images.py, here against a registry on loopback that speaks the distribution API and its bearer
token challenge, as Docker Hub does."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tools import lock_requirements, pin_base_images

ROOT = Path(__file__).resolve().parent.parent.parent
DOCKER = ROOT / "deploy" / "docker"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def parse_lock(text: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes), from pip's requirements format as uv writes it."""
    out: dict[str, tuple[str, list[str]]] = {}
    joined = re.sub(r"\\\n\s*", " ", text)
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        spec, *options = line.split(" --")
        req = Requirement(spec.split(";")[0].strip())
        pins = [s for s in req.specifier if s.operator == "=="]
        assert len(pins) == 1, f"not pinned with ==: {line[:80]}"
        hashes = [o.strip().removeprefix("hash=") for o in options if o.startswith("hash=")]
        out[canonicalize_name(req.name)] = (pins[0].version, hashes)
    return out


@pytest.mark.parametrize("image", lock_requirements.IMAGES)
def test_lock_is_current_with_pyproject(image: str) -> None:
    assert lock_requirements.stale([image]) == [], \
        f"deploy/docker/{image}.lock is older than pyproject.toml: run `python tools/lock_requirements.py`"


def test_a_changed_dependency_makes_the_lock_stale(tmp_path: Path) -> None:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    changed = tmp_path / "pyproject.toml"
    changed.write_text(text.replace('"pyyaml>=6.0",', '"pyyaml>=6.0.1",'), encoding="utf-8")
    assert changed.read_text(encoding="utf-8") != text
    recorded = lock_requirements.recorded_digest((DOCKER / "webhook.lock").read_text(encoding="utf-8"))
    assert lock_requirements.input_digest("webhook", changed) != recorded


@pytest.mark.parametrize("image", lock_requirements.IMAGES)
def test_lock_pins_every_dependency_with_hashes(image: str) -> None:
    locked = parse_lock((DOCKER / f"{image}.lock").read_text(encoding="utf-8"))
    wanted = [Requirement(r) for r in PYPROJECT["project"]["dependencies"] + PYPROJECT["build-system"]["requires"]]
    for extra in lock_requirements.IMAGES[image]:
        wanted += [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"][extra]]
    for req in wanted:
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} is not in {image}.lock"
        assert req.specifier.contains(locked[name][0], prereleases=True), (req, locked[name][0])
    for name, (_, hashes) in locked.items():
        assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), name


@pytest.mark.parametrize("image", lock_requirements.IMAGES)
def test_image_installs_only_the_lock_in_hash_checking_mode(image: str) -> None:
    text = lock_requirements.dockerfile(image).read_text(encoding="utf-8")
    installs = re.findall(r"pip install ([^\\\n&]*)", text)
    assert installs, "no pip install"
    if image.startswith("webhook"):  # one lock of the webhook's, chosen by the build argument PROVIDERS
        assert '--require-hashes --only-binary=:all: -r "$lock"' in installs[0]
        variant = image.removeprefix("webhook").removeprefix("-") or "none"
        assert re.search(rf"\b{variant}\b[^)]*\) lock=", text) or f"lock=webhook-$PROVIDERS.lock" in text
        assert "COPY deploy/docker/webhook*.lock " in text
    else:
        assert f"--require-hashes --only-binary=:all: -r {image}.lock" in installs[0]
        assert f"COPY deploy/docker/{image}.lock " in text
    for rest in installs[1:]:  # the project itself: nothing more may come in with it
        assert "--no-deps" in rest and "--no-build-isolation" in rest, rest
    header = (DOCKER / f"{image}.lock").read_text(encoding="utf-8").splitlines()[1]
    assert f"Python {lock_requirements.image_python(image)}" in header  # locked for the image's Python


# --- base images ---------------------------------------------------------------------------------------------

DIGESTS = {"3.13.13-slim-trixie": "sha256:" + hashlib.sha256(b"index one").hexdigest()}
TOKEN = "anonymous-pull-token"


class FakeRegistry(BaseHTTPRequestHandler):
    """The two endpoints a pull by tag needs, as registry-1.docker.io and auth.docker.io answer them: a manifest
    HEAD without a token gets 401 and a Bearer challenge; the token endpoint gives a token for the scope asked; a
    HEAD with it gets 200 and Docker-Content-Digest (the index's digest, as the Accept header allows)."""

    seen: list[dict[str, Any]] = []

    def log_message(self, *args: object) -> None:
        pass

    def _reply(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.startswith("/token?"):
            query = dict(p.split("=", 1) for p in self.path.split("?", 1)[1].split("&"))
            self.seen.append({"token": query})
            self._reply(200, {"Content-Type": "application/json"}, json.dumps({"token": TOKEN}).encode())
            return
        self.do_HEAD()

    def do_HEAD(self) -> None:  # noqa: N802
        m = re.fullmatch(r"/v2/(.+)/manifests/([^/]+)", self.path)
        self.seen.append({"manifest": self.path, "accept": self.headers.get("Accept", ""),
                          "auth": self.headers.get("Authorization", "")})
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            host = f"http://127.0.0.1:{self.server.server_address[1]}"
            self._reply(401, {"WWW-Authenticate": f'Bearer realm="{host}/token",service="registry.test",'
                                                  f'scope="repository:{m[1] if m else ""}:pull"'})
            return
        if not m or m[1] != "library/python" or m[2] not in DIGESTS:
            self._reply(404, {})
            return
        self._reply(200, {"Docker-Content-Digest": DIGESTS[m[2]],
                          "Content-Type": "application/vnd.oci.image.index.v1+json"})


@pytest.fixture
def registry() -> Iterator[str]:
    FakeRegistry.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeRegistry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"docker.io=http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _copies(tmp_path: Path) -> list[Path]:
    out = []
    for src in sorted(DOCKER.glob("*.Dockerfile")):
        dst = tmp_path / src.name
        dst.write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
        out.append(dst)
    return out


def test_pinning_adds_the_digest_the_tag_points_at_and_changes_nothing_else(
        tmp_path: Path, registry: str, capsys: pytest.CaptureFixture[str]) -> None:
    files = _copies(tmp_path)
    before = {f: f.read_text(encoding="utf-8") for f in files}
    assert pin_base_images.main(["--check", *map(str, files)]) == 1  # the repository pins no digest yet

    assert pin_base_images.main(["--dry-run", "--registry", registry, *map(str, files)]) == 0
    assert {f: f.read_text(encoding="utf-8") for f in files} == before
    assert "python:3.13.13-slim-trixie -> python:3.13.13-slim-trixie@sha256:" in capsys.readouterr().out

    assert pin_base_images.main(["--registry", registry, *map(str, files)]) == 0
    digest = DIGESTS["3.13.13-slim-trixie"]
    for f in files:
        after = f.read_text(encoding="utf-8")
        assert after == before[f].replace("FROM python:3.13.13-slim-trixie", f"FROM python:3.13.13-slim-trixie@{digest}")
        assert after.count(f"@{digest}") == 2  # both stages
    assert pin_base_images.main(["--check", *map(str, files)]) == 0
    # Anonymous token for the repository's pull scope, then the manifest with it, asking for the index.
    assert {"scope": "repository%3Alibrary%2Fpython%3Apull", "service": "registry.test"}.items() <= \
        next(s["token"] for s in FakeRegistry.seen if "token" in s).items()
    assert any(s.get("auth") == f"Bearer {TOKEN}" and "image.index.v1+json" in s["accept"]
               for s in FakeRegistry.seen if "manifest" in s)

    # The tag moves: a second run re-pins to the new digest.
    DIGESTS["3.13.13-slim-trixie"] = "sha256:" + hashlib.sha256(b"index two").hexdigest()
    try:
        assert pin_base_images.main(["--registry", registry, str(files[0])]) == 0
        assert f"@{DIGESTS['3.13.13-slim-trixie']}" in files[0].read_text(encoding="utf-8")
        assert f"@{digest}" not in files[0].read_text(encoding="utf-8")
    finally:
        DIGESTS["3.13.13-slim-trixie"] = digest


def test_a_tag_the_registry_does_not_have_leaves_the_file_alone(
        tmp_path: Path, registry: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "x.Dockerfile"
    text = "FROM python:9.9.9-slim AS build\nRUN true\nFROM build\n"
    path.write_text(text, encoding="utf-8")
    assert pin_base_images.main(["--registry", registry, str(path)]) == 1
    assert path.read_text(encoding="utf-8") == text
    assert "library/python:9.9.9-slim: HTTP 404" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "registry", "repository", "tag"), [
    ("python:3.13.13-slim-trixie", "docker.io", "library/python", "3.13.13-slim-trixie"),
    ("nvcr.io/nvidia/cuda:12.4.1-base-ubuntu22.04", "nvcr.io", "nvidia/cuda", "12.4.1-base-ubuntu22.04"),
    ("localhost:5000/team/img:1.0@sha256:" + "a" * 64, "localhost:5000", "team/img", "1.0"),
    ("grafana/grafana:11.0.0", "docker.io", "grafana/grafana", "11.0.0"),
])
def test_image_references_parse_as_docker_does(text: str, registry: str, repository: str, tag: str) -> None:
    ref = pin_base_images.Ref.parse(text)
    assert (ref.registry, ref.repository, ref.tag) == (registry, repository, tag)


def test_a_reference_without_a_tag_is_refused() -> None:
    with pytest.raises(pin_base_images.PinError, match="no tag"):
        pin_base_images.Ref.parse("python")
