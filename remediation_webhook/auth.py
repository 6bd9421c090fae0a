"""Listener authentication: bearer tokens (from a file) and/or basic auth, TLS client certificates.

Basic auth users, TLS and client certificates come from an exporter-toolkit web config file and reuse
gpu_health_common.webconfig, as the exporter does (bcrypt checks are cached and run off the event loop). Either a valid bearer token or
valid basic credentials let a request in; with a client certificate required by TLS, the handshake itself
already refused everyone else.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gpu_health_common.webconfig import parse_basic, too_many_checks

from .config import ListenerConfig, split_address

log = logging.getLogger(__name__)
# Request key: who authenticated (web.RequestKey since aiohttp 3.13; a plain key before).
ACTOR: Any = web.RequestKey("gpu_health_actor", str) if hasattr(web, "RequestKey") else "gpu_health_actor"


def _subject(peercert: dict[str, object] | None) -> str:
    for rdn in (peercert or {}).get("subject", ()):  # type: ignore[union-attr]
        for k, v in rdn:
            if k == "commonName":
                return str(v)
    return "client-certificate"


def middleware(listener: ListenerConfig, *, open_paths: frozenset[str], realm: str) -> Middleware:
    tokens = [t.encode() for t in listener.bearer_tokens]
    web_config = listener.web

    def deny(text: str = "Unauthorized\n") -> web.Response:
        challenge = f'Bearer realm="{realm}"' if tokens else f'Basic realm="{realm}"'
        return web.Response(status=401, text=text, headers={"WWW-Authenticate": challenge})

    @web.middleware
    async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        peercert = request.transport.get_extra_info("peercert") if request.transport is not None else None
        if web_config is not None and web_config.client_allowed_sans and not web_config.client_san_allowed(peercert):
            denied = web.Response(status=403, text="client certificate SAN not allowed\n")
            denied.force_close()
            return denied
        actor = "anonymous"
        if request.path not in open_paths and listener.auth_enabled:
            header = request.headers.get("Authorization", "")
            scheme, _, value = header.partition(" ")
            ok = False
            if tokens and scheme.lower() == "bearer":
                given = value.strip().encode()
                ok = any(hmac.compare_digest(given, t) for t in tokens)  # every token, so timing says nothing
                actor = "bearer-token"
            elif web_config is not None and web_config.basic_auth_enabled and scheme.lower() == "basic":
                verified = await web_config.verify_basic_auth(header, request.remote or "")
                if verified is None:
                    return too_many_checks(realm)
                ok = verified
                creds = parse_basic(header)
                actor = f"user:{creds[0]}" if creds else "basic"
            elif not tokens and not (web_config and web_config.basic_auth_enabled):
                ok = peercert is not None  # TLS required a verified client certificate
                actor = f"cert:{_subject(peercert)}"
            if not ok:
                return deny()
            if peercert is not None and actor in ("bearer-token", "basic"):
                actor = f"{actor}+cert:{_subject(peercert)}"
        request[ACTOR] = actor
        return await handler(request)

    return auth_middleware


def effective_address(listener: ListenerConfig, name: str, override: str = "") -> tuple[str, int]:
    """Where to listen: without authentication only loopback is allowed (with a warning)."""
    host, port = split_address(override or listener.listen_address)
    if listener.auth_enabled:
        return host or "0.0.0.0", port
    loopback = False
    try:
        loopback = bool(host) and ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        log.warning("%s listener has no authentication configured: listening on 127.0.0.1 only", name,
                    extra={"requested": f"{host}:{port}"})
        return "127.0.0.1", port
    log.warning("%s listener has no authentication configured (loopback only)", name)
    return host, port
