"""Pin the base images of deploy/docker/*.Dockerfile by digest, at release time.

    python tools/pin_base_images.py             # FROM python:3.13.13-slim-trixie -> ...-slim-trixie@sha256:<digest>
    python tools/pin_base_images.py --dry-run   # print what would change, write nothing
    python tools/pin_base_images.py --check     # offline: exit 1 naming each FROM without a digest

A tag can be moved to other content at any time; a digest cannot. Each FROM keeps its tag (for people and for
update bots) and gains the digest that the tag points at now, asked of the image's registry with the
distribution API: HEAD /v2/<repository>/manifests/<tag>, answered with Docker-Content-Digest; an anonymous
bearer token is fetched first where the registry asks for one (WWW-Authenticate, as Docker Hub does). The digest
is the multi-platform index's, so one pin serves x86_64 and arm64 builds. An already pinned FROM is re-pinned to
the tag's current digest. The rest of each Dockerfile is left byte for byte as it was.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "deploy" / "docker"
REGISTRIES = {"docker.io": "https://registry-1.docker.io"}
ACCEPT = ", ".join((
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
))
_FROM = re.compile(r"^(?P<head>FROM\s+(?:--\S+\s+)*)(?P<ref>\S+)(?P<tail>.*)$", re.M)
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')


class PinError(Exception):
    """A registry that did not give a digest, or a reference this tool cannot pin."""


@dataclass(frozen=True)
class Ref:
    registry: str   # docker.io, ghcr.io, nvcr.io, localhost:5000
    repository: str  # library/python
    tag: str
    digest: str = ""

    @classmethod
    def parse(cls, text: str) -> Ref:
        name, _, digest = text.partition("@")
        first, _, rest = name.partition("/")
        if rest and ("." in first or ":" in first or first == "localhost"):
            registry, path = first, rest
        else:
            registry, path = "docker.io", name
        path, _, tag = path.rpartition(":") if ":" in path else (path, "", "")
        if not tag:
            raise PinError(f"{text}: no tag; name the version to pin (a digest alone cannot be refreshed)")
        if registry == "docker.io" and "/" not in path:
            path = f"library/{path}"
        if digest and not _DIGEST.fullmatch(digest):
            raise PinError(f"{text}: not a sha256 digest")
        return cls(registry, path, tag, digest)

    def pinned(self, original: str, digest: str) -> str:
        return f"{original.partition('@')[0]}@{digest}"


def _open(request: urllib.request.Request, timeout: float) -> tuple[int, Mapping[str, str], bytes]:
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310 - https or a given test URL
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def _token(challenge: str, repository: str, timeout: float) -> str:
    params = dict(_CHALLENGE.findall(challenge))
    realm = params.pop("realm", "")
    if not challenge.lower().startswith("bearer") or not realm:
        raise PinError(f"the registry asks for credentials this tool does not have: {challenge}")
    params.setdefault("scope", f"repository:{repository}:pull")
    status, _, body = _open(urllib.request.Request(f"{realm}?{urllib.parse.urlencode(params)}"), timeout)
    if status != 200:
        raise PinError(f"token endpoint {realm}: HTTP {status}")
    data = json.loads(body)
    token = data.get("token") or data.get("access_token")
    if not isinstance(token, str) or not token:
        raise PinError(f"token endpoint {realm}: no token in the answer")
    return token


def current_digest(ref: Ref, registries: Mapping[str, str], timeout: float = 30.0) -> str:
    base = registries.get(ref.registry, f"https://{ref.registry}")
    url = f"{base}/v2/{ref.repository}/manifests/{urllib.parse.quote(ref.tag)}"
    headers = {"Accept": ACCEPT}
    for method in ("HEAD", "GET"):  # GET only where HEAD gave no digest header: hash the manifest itself
        status, answer, body = _open(urllib.request.Request(url, headers=headers, method=method), timeout)
        if status == 401 and "Authorization" not in headers:
            headers["Authorization"] = f"Bearer {_token(answer.get('WWW-Authenticate', ''), ref.repository, timeout)}"
            status, answer, body = _open(urllib.request.Request(url, headers=headers, method=method), timeout)
        if status != 200:
            raise PinError(f"{ref.registry}/{ref.repository}:{ref.tag}: HTTP {status} from {url}")
        digest = answer.get("Docker-Content-Digest", "")
        if digest:
            break
        if method == "GET":
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
    if not _DIGEST.fullmatch(digest):
        raise PinError(f"{ref.registry}/{ref.repository}:{ref.tag}: the registry gave no sha256 digest ({digest!r})")
    return digest


def stage_aliases(text: str) -> set[str]:
    return {m[1].lower() for m in re.finditer(r"^FROM\s.*\s+AS\s+(\S+)\s*$", text, re.M | re.I)}


def pin_text(text: str, registries: Mapping[str, str]) -> tuple[str, list[tuple[str, str]]]:
    """The Dockerfile with every base image pinned, and (before, after) for each FROM that changed."""
    aliases = stage_aliases(text)
    digests: dict[str, str] = {}
    changes: list[tuple[str, str]] = []

    def one(m: re.Match[str]) -> str:
        original = m["ref"]
        if original.lower() in aliases or original == "scratch":
            return m[0]
        ref = Ref.parse(original)
        key = f"{ref.registry}/{ref.repository}:{ref.tag}"
        if key not in digests:
            digests[key] = current_digest(ref, registries)
        pinned = ref.pinned(original, digests[key])
        if pinned != original:
            changes.append((original, pinned))
        return f"{m['head']}{pinned}{m['tail']}"

    return _FROM.sub(one, text), changes


def unpinned(text: str) -> list[str]:
    aliases = stage_aliases(text)
    return [m["ref"] for m in _FROM.finditer(text)
            if m["ref"].lower() not in aliases and m["ref"] != "scratch" and "@sha256:" not in m["ref"]]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if a base image is not pinned by digest")
    mode.add_argument("--dry-run", action="store_true", help="print the changes, write nothing")
    parser.add_argument("--registry", action="append", default=[], metavar="HOST=URL",
                        help="where to reach a registry (default docker.io=https://registry-1.docker.io, "
                             "others https://HOST)")
    parser.add_argument("dockerfiles", nargs="*", type=Path, help="default: deploy/docker/*.Dockerfile")
    args = parser.parse_args(argv)
    registries = dict(REGISTRIES)
    for item in args.registry:
        host, sep, url = item.partition("=")
        if not sep or not host or not url.startswith(("http://", "https://")):
            parser.error(f"--registry: expected HOST=URL, got {item!r}")
        registries[host] = url.rstrip("/")
    files = args.dockerfiles or sorted(DOCKER.glob("*.Dockerfile"))
    failed = False
    for path in files:
        text = path.read_text(encoding="utf-8")
        if args.check:
            for ref in unpinned(text):
                print(f"{path}: FROM {ref} has no digest; run `python tools/pin_base_images.py`", file=sys.stderr)
                failed = True
            continue
        try:
            new, changes = pin_text(text, registries)
        except (PinError, OSError) as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            failed = True
            continue
        for before, after in changes:
            print(f"{path}: {before} -> {after}")
        if not changes:
            print(f"{path}: already pinned to the current digests")
        if changes and not args.dry_run:
            path.write_text(new, encoding="utf-8")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
