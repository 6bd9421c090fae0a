"""The slurmrestd transport of the Slurm provider (a helper module: no PROVIDER, so discovery skips it).

  providers:
    slurm:
      rest:
        url: https://slurmrestd:6820         # http(s); a path prefix (reverse proxy) is kept
        token_file: /run/secrets/slurm-jwt   # a Slurm JWT (`scontrol token`), re-read on every call
        user: slurm                          # optional: sent as X-SLURM-USER-NAME
        api_version: v0.0.41                 # v0.0.40 .. v0.0.44 share the paths and bodies below
        ca_file: /etc/ssl/slurmrestd-ca.pem  # optional: verify an https url against this CA
        timeout: 30s

What slurmrestd offers, read from SchedMD/slurm (tags slurm-24-05-0-1 .. slurm-25-05-8-1, data_parser v0.0.41):
  GET  /slurm/{v}/node/{node_name}   src/slurmrestd/plugins/openapi/slurmctld/nodes.c `_dump_nodes`:
       {"nodes": [<node>], "last_update": ..., "meta": ..., "errors": [...], "warnings": [...]}; a node slurmctld
       does not know comes back as "nodes": [] plus an error "Failure to query node <n>".
  GET  /slurm/{v}/nodes              `op_handler_nodes` -> `_dump_nodes(ctxt, NULL)` (slurm_load_node, SHOW_ALL):
       the same response with every node, the same node objects as the single-node GET (the inventory's pool).
  GET  /slurm/{v}/ping               diag.c `op_handler_ping` -> ping_all_controllers() (src/api/reconfigure.c):
       always HTTP 200, {"pings": [{"hostname", "pinged": "UP"|"DOWN", "latency" (us), "mode": "primary"|
       "backup"...}], "meta", "errors", "warnings"}; v0.0.42 and later add "responding" (bool) and "primary" and
       deprecate "pinged" and "mode". A controller is up when "responding" is true or, without it, "pinged" is
       "UP" -- the rule of `scontrol ping`, which exits 1 when no controller is UP.
  POST /slurm/{v}/node/{node_name}   `_update_node`: body UPDATE_NODE_MSG (data_parser/v0.0.41/parsers.c:
       comment, extra, features, gres, name, state [NODE_STATES flags], reason, resume_after, weight...);
       drain = {"state": ["DRAIN"], "reason": "..."}, resume = {"state": ["RESUME"]}.
  Errors: a failed slurmctld call answers HTTP 500 with errors[].error_number (2017 ESLURM_INVALID_NODE_NAME
       "Invalid node name specified", 2010 ESLURM_USER_ID_MISSING for a non-operator, 2002 ESLURM_ACCESS_DENIED,
       2028 ESLURM_INVALID_NODE_STATE); slurmctld unreachable answers 502 and 504 (src/slurmrestd/operations.c);
       a missing or bad token answers 401 "Authentication failure"; an unknown path (or api version) 404.
  Auth: headers X-SLURM-USER-TOKEN and X-SLURM-USER-NAME (src/slurmrestd/rest_auth.h).

Reboot: slurmrestd has no reboot operation. `scontrol reboot` sends the REQUEST_REBOOT_NODES RPC
(slurm_reboot_nodes), which no slurmrestd handler calls (no "reboot" anywhere under src/slurmrestd, up to the
2026 master). The node update does parse "REBOOT_REQUESTED" as a state flag, but slurmctld refuses it:
src/slurmctld/node_mgr.c `_valid_node_state_change` accepts only DOWN, DRAIN, FAIL, NO_RESPOND, UNDRAIN,
POWER_*, RESUME, REBOOT_CANCEL, FUTURE, IDLE and ALLOCATED ("All others invalid" -> ESLURM_INVALID_NODE_STATE).
So a reboot over REST is ProviderError("unsupported"): configure the scontrol transport for reboots.

The token is never logged and never put in an error message (server text is scrubbed of it too).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp

from ..errors import ConfigError
from . import ProviderError, duration, only_keys, opt, with_backoff

log = logging.getLogger(__name__)

API_VERSIONS = ("v0.0.40", "v0.0.41", "v0.0.42", "v0.0.43", "v0.0.44")
SLURM_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,31}")
TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")  # a JWT is printable ASCII without spaces

# Slurm error numbers (slurm/slurm_errno.h) that say what to do.
NOT_FOUND_ERRNOS = {2017}  # ESLURM_INVALID_NODE_NAME
AUTH_ERRNOS = {2002, 2010, 1007}  # ESLURM_ACCESS_DENIED, ESLURM_USER_ID_MISSING, SLURM_PROTOCOL_AUTHENTICATION_ERROR
# SLURM_COMMUNICATIONS_{CONNECTION,SEND,RECEIVE,SHUTDOWN}_ERROR, SLURMCTLD_COMMUNICATIONS_* (1800..1805)
UNAVAILABLE_ERRNOS = {1001, 1002, 1003, 1004, 1800, 1801, 1802, 1803, 1804, 1805}
RETRY_CODES = ("429", "502", "503", "504", "connect")  # ProviderError.code values worth another try


def node_record(node: Mapping[str, Any]) -> dict[str, str]:
    """A data_parser node object as `scontrol show node -o` keys (NodeName, State, Partitions, BootTime, Reason):
    one conversion for the single-node GET and the node list."""
    boot = node.get("boot_time")
    if isinstance(boot, Mapping):  # a NO_VAL number: {"set", "infinite", "number"}
        boot = boot.get("number") if boot.get("set", True) else ""
    state = node.get("state") or []
    parts = node.get("partitions") or []
    return {"NodeName": str(node.get("name") or ""),
            "State": "+".join(map(str, state)) if isinstance(state, list) else str(state),
            "Partitions": ",".join(map(str, parts)) if isinstance(parts, list) else str(parts),
            "BootTime": str(boot or ""), "Reason": str(node.get("reason") or "")}


def controller_up(ping: Mapping[str, Any]) -> bool:
    """One entry of GET /ping: "responding" (v0.0.42+) when present, else "pinged" == "UP" (v0.0.40, v0.0.41)."""
    responding = ping.get("responding")
    if isinstance(responding, bool):
        return responding
    return str(ping.get("pinged") or "").upper() == "UP"


def _describe(error: Mapping[str, Any]) -> str:
    """One slurmrestd error entry: 'Failure to update node x: Invalid node name specified (2017)'."""
    number = error.get("error_number")
    short = str(error.get("error") or "") if number else ""
    text = ": ".join(filter(None, (str(error.get("description") or ""), short)))
    return f"{text} ({number})" if number and text else text


class TokenFile:
    """The JWT lives in a file that a sidecar may rotate: read it on every call, never keep it in a message."""

    def __init__(self, path: str) -> None:
        self.path = path

    def read(self) -> str:
        try:
            token = Path(self.path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise ProviderError("auth", f"cannot read the slurmrestd token file {self.path!r} ({why}); "
                                        f"mount a current Slurm JWT there") from None
        if not token or not TOKEN_CHARS.fullmatch(token):
            raise ProviderError("auth", f"the slurmrestd token file {self.path!r} is empty or holds spaces or "
                                        f"control characters; put one JWT (`scontrol token`) in it")
        return token


class SlurmRest:
    """A small slurmrestd client: GET and POST /slurm/{v}/node/{name}, GET /slurm/{v}/nodes and /slurm/{v}/ping."""

    def __init__(self, url: str, token_file: str, *, user: str = "", api_version: str = "v0.0.41",
                 ca_file: str = "", timeout: float = 30.0, key: str = "providers.slurm.rest") -> None:
        self.url = url.rstrip("/")
        self.token = TokenFile(token_file)
        self.user = user
        self.api_version = api_version
        self.ca_file = ca_file
        self.timeout = timeout
        self.key = key
        self.attempts = 4
        self.retry_base = 0.5
        self.retry_cap = 8.0
        self.sleep = asyncio.sleep

    @classmethod
    def from_config(cls, raw: object, key: str) -> SlurmRest:
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{key}: expected a mapping (url, token_file, user, api_version, ca_file, timeout)")
        only_keys(raw, key, {"url", "token_file", "user", "api_version", "ca_file", "timeout"})
        url = opt(raw, key, "url", str, "")
        if not url:
            raise ConfigError(f"{key}.url: required, e.g. https://slurmrestd:6820")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{key}.url: expected an http(s) URL such as https://slurmrestd:6820")
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ConfigError(f"{key}.url: no user:password@, query or fragment (the token comes from token_file)")
        if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "::1", "localhost"):
            raise ConfigError(f"{key}.url: https, since the JWT travels in a header (plain http only to a "
                              f"slurmrestd on this host: 127.0.0.1, ::1 or localhost)")
        token_file = opt(raw, key, "token_file", str, "")
        if not token_file:
            raise ConfigError(f"{key}.token_file: required (a file holding a Slurm JWT, e.g. /run/secrets/slurm-jwt)")
        try:
            TokenFile(token_file).read()
        except ProviderError as exc:
            raise ConfigError(f"{key}.token_file: {exc.detail}") from None
        user = opt(raw, key, "user", str, "")
        if user and not SLURM_USER.fullmatch(user):
            raise ConfigError(f"{key}.user: a user name (letters, digits, '.', '_' and '-', at most 32)")
        version = opt(raw, key, "api_version", str, "v0.0.41")
        if version not in API_VERSIONS:
            raise ConfigError(f"{key}.api_version: one of {', '.join(API_VERSIONS)}, got {version!r}")
        ca_file = opt(raw, key, "ca_file", str, "")
        if ca_file:
            if parts.scheme != "https":
                raise ConfigError(f"{key}.ca_file: only for an https url")
            try:
                ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"{key}.ca_file: cannot load {ca_file!r} as a CA bundle: {exc}") from None
        return cls(url, token_file, user=user, api_version=version, ca_file=ca_file,
                   timeout=duration(raw, key, "timeout", "30s"), key=key)

    # ------------------------------------------------------------------------------------------ plumbing

    def path(self, *parts: str) -> str:
        """/slurm/{v}/<parts>, each part percent-encoded: a node name can never add a path segment."""
        return f"/slurm/{self.api_version}/" + "/".join(urllib.parse.quote(p, safe="") for p in parts)

    def _headers(self, token: str) -> dict[str, str]:
        headers = {"X-SLURM-USER-TOKEN": token, "Accept": "application/json"}
        if self.user:
            headers["X-SLURM-USER-NAME"] = self.user
        return headers

    def _scrub(self, text: str, token: str) -> str:
        return text.replace(token, "<token>") if token else text

    async def request(self, method: str, path: str, body: Mapping[str, Any] | None = None, *, node: str = "",
                      answer: str = "") -> dict[str, Any]:
        """One call to `path` (from self.path) with retries on 429/502/503/504 and refused connections; a classified
        ProviderError else. `node`: the node the call is about (for the messages); `answer`: the key that holds the
        data of a GET, so that errors next to it are left to the caller (a GET of an unknown node says so there)."""

        async def once() -> dict[str, Any]:
            return await self._once(method, path, body, node, answer)

        def note(exc: Exception) -> None:
            log.warning("slurmrestd %s %s: %s (%s); retrying", method, path, getattr(exc, "kind", "?"),
                        getattr(exc, "code", ""))

        return await with_backoff(once, retryable=lambda e: isinstance(e, ProviderError) and e.code in RETRY_CODES,
                                  attempts=self.attempts, base=self.retry_base, cap=self.retry_cap,
                                  sleep=self.sleep, on_retry=note)

    async def _once(self, method: str, path: str, body: Mapping[str, Any] | None, node: str,
                    answer: str) -> dict[str, Any]:
        token = self.token.read()
        ssl_ctx: ssl.SSLContext | bool = ssl.create_default_context(cafile=self.ca_file) if self.ca_file else True
        what = f"slurmrestd {method} {path}"
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout)) as session, \
                    session.request(method, self.url + path, json=body, headers=self._headers(token),
                                    ssl=ssl_ctx, allow_redirects=False) as resp:
                status = resp.status
                text = self._scrub(await resp.text(errors="replace"), token)
        except aiohttp.ClientConnectorError as exc:
            raise ProviderError("unavailable", f"{what}: cannot connect to {self.url} "
                                               f"({self._scrub(str(exc.os_error), token)}); check "
                                               f"{self.key}.url and that slurmrestd runs", code="connect") from None
        except TimeoutError:
            if method == "GET" or not node:
                raise ProviderError("unavailable", f"{what}: no answer within {self.timeout:.0f}s") from None
            raise ProviderError("unavailable", f"{what}: no answer within {self.timeout:.0f}s; the outcome is "
                                               f"unknown, check the node with `scontrol show node {node}`") from None
        except aiohttp.ClientError as exc:
            raise ProviderError("unavailable", f"{what}: {type(exc).__name__}: "
                                               f"{self._scrub(str(exc), token)[:200]}") from None
        try:
            payload = json.loads(text) if text.strip() else {}
        except ValueError:
            payload = {}
        if not isinstance(payload, dict):
            payload = {}
        return self._classify(what, node, answer, status, payload, text)

    def _classify(self, what: str, node: str, answer: str, status: int, payload: dict[str, Any],
                  text: str) -> dict[str, Any]:
        errors = [e for e in payload.get("errors") or [] if isinstance(e, Mapping)]
        said = "; ".join(filter(None, (_describe(e) for e in errors)))[:300] or " ".join(text.split())[:200]
        numbers = {e.get("error_number") for e in errors}
        low = said.lower()
        if status in (401, 403):
            raise ProviderError("auth", f"{what}: slurmrestd refused the token ({status} {said}); put a current "
                                        f"Slurm JWT in {self.token.path} (slurmrestd needs auth/jwt) and check "
                                        f"{self.key}.user")
        if status == 429:
            raise ProviderError("throttled", f"{what}: slurmrestd is rate limiting (429) after "
                                             f"{self.attempts} attempts; try again later", code="429")
        if status in (502, 503, 504):
            raise ProviderError("unavailable", f"{what}: slurmrestd answered {status} ({said}); slurmctld or "
                                               f"slurmrestd is unreachable, the outcome of an update is unknown",
                                code=str(status))
        if numbers & NOT_FOUND_ERRNOS or "invalid node name" in low:
            raise ProviderError("not_found", f"{what}: Slurm does not know node {node or '?'} ({said})")
        if numbers & AUTH_ERRNOS or "access/permission denied" in low or "invalid user id" in low:
            raise ProviderError("auth", f"{what}: slurmctld refused ({said}); the token's user must be a Slurm "
                                        f"operator or administrator (sacctmgr modify user ... set adminlevel=operator)")
        if status == 404:
            # No Slurm error: slurmrestd (or a proxy in front of it) does not serve this path. That says nothing
            # about the node, so it must not read as "node gone" (which closes remediations).
            raise ProviderError("failed", f"{what}: 404 ({said}): slurmrestd does not serve this path; check "
                                          f"{self.key}.url and that slurmrestd serves {self.api_version} (check "
                                          f"{self.key}.api_version)", code="404")
        if numbers & UNAVAILABLE_ERRNOS:
            raise ProviderError("unavailable", f"{what}: slurmctld unreachable from slurmrestd ({said})")
        if status >= 300 or (errors and (not answer or answer not in payload)):
            raise ProviderError("failed", f"{what}: HTTP {status}: {said or 'no detail'}")
        return payload

    # ------------------------------------------------------------------------------------------ the calls

    async def show(self, node: str) -> dict[str, str]:
        """The node as `scontrol show node -o` keys (NodeName, State, Partitions, BootTime, Reason)."""
        path = self.path("node", node)
        payload = await self.request("GET", path, node=node, answer="nodes")
        nodes = [n for n in payload.get("nodes") or [] if isinstance(n, Mapping)]
        if len(nodes) != 1 or nodes[0].get("name") != node:
            errors = "; ".join(_describe(e) for e in payload.get("errors") or [] if isinstance(e, Mapping))[:200]
            raise ProviderError("not_found", f"slurm: slurmrestd GET {path} returned {len(nodes)} "
                                             f"nodes{': ' + errors if errors else ''}")
        return node_record(nodes[0])

    async def nodes(self) -> list[dict[str, str]]:
        """Every node slurmctld knows (GET /slurm/{v}/nodes), as `scontrol show node -o` records."""
        path = self.path("nodes")
        payload = await self.request("GET", path, answer="nodes")
        nodes = payload.get("nodes")
        errors = "; ".join(_describe(e) for e in payload.get("errors") or [] if isinstance(e, Mapping))[:200]
        if not isinstance(nodes, list) or (errors and not nodes):
            raise ProviderError("failed", f"slurm: slurmrestd GET {path} returned no node list"
                                          f"{': ' + errors if errors else ''}")
        return [node_record(n) for n in nodes if isinstance(n, Mapping) and n.get("name")]

    async def ping(self) -> list[dict[str, Any]]:
        """slurmrestd pings every slurmctld (GET /slurm/{v}/ping); ProviderError("unavailable") unless one is up."""
        path = self.path("ping")
        payload = await self.request("GET", path, answer="pings")
        pings = [dict(p) for p in payload.get("pings") or [] if isinstance(p, Mapping)]
        if not any(controller_up(p) for p in pings):
            seen = ", ".join(f"{str(p.get('hostname') or '?')[:64]} DOWN" for p in pings[:8])
            raise ProviderError("unavailable", f"slurm: slurmrestd GET {path}: no slurmctld answers the ping "
                                               f"({seen or 'no controller listed'})")
        return pings

    async def update(self, node: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self.request("POST", self.path("node", node), body, node=node)
