"""``--web.config.file``: TLS, basic auth and extra headers, in Prometheus exporter-toolkit's format.

The file format is the one documented in exporter-toolkit's ``docs/web-configuration.md`` so that a
node_exporter ``web.yml`` works here unchanged (for the keys below). Faithful to it:

* keys ``tls_server_config`` (cert_file, key_file, client_auth_type, client_ca_file,
  client_allowed_sans, min_version, max_version, cipher_suites, curve_preferences,
  prefer_server_cipher_suites), ``http_server_config`` (http2, headers) and ``basic_auth_users``;
  unknown keys are rejected (exporter-toolkit unmarshals strictly);
* defaults: NoClientCert, TLS12..TLS13, prefer_server_cipher_suites true, http2 true;
* relative file paths are resolved against the config file's directory;
* only Go's names are accepted for versions, cipher suites (``tls.CipherSuites()``) and curves;
* ``headers`` may only set the five headers exporter-toolkit allows, and X-Frame-Options /
  X-Content-Type-Options only to its allowed values (so Authorization, Set-Cookie etc. are refused);
* client CAs without a client auth policy, and client_allowed_sans without a policy that requires a
  certificate, are errors;
* basic auth: bcrypt hashes, unknown users still cost one bcrypt check, successful checks are cached.

Differs in how a flood of wrong passwords is borne: exporter-toolkit runs one bcrypt check at a time behind an
unbounded queue, so 200 wrong attempts keep the right one waiting for seconds. Here checks run on a small pool
(BCRYPT_WORKERS), each client address may have BCRYPT_PER_CLIENT of them waiting or running, and at most
BCRYPT_QUEUE wait in all; past either, the request is refused at once (429, Retry-After) without a check. A
client whose credentials were verified before is let in from the cache, without a check.

Differs (mostly because Python's ``ssl`` module, not Go's ``crypto/tls``, does the handshake):

* The file is read once, at startup, and every error is a ConfigError naming the file and key;
  exporter-toolkit re-reads it per request/connection, so cert rotation needs a restart here.
* A non-empty ``tls_server_config`` must name cert_file and key_file; exporter-toolkit silently falls
  back to plain HTTP when only e.g. min_version is set.
* Inline ``cert``/``key``/``client_ca`` and ``rate_limit`` (newer exporter-toolkit keys) are refused
  with "not supported" rather than ignored. Encrypted private keys are refused (Go refuses them too).
* Python cannot ask for a client certificate without verifying it against a CA:
  RequestClientCert does not ask at all (nothing here reads an unverified certificate, so the
  outcome is the same), RequireAnyClientCert (and its old alias RequireClientCert) needs
  client_ca_file and then requires a certificate that chains to it, and VerifyClientCertIfGiven /
  RequireAndVerifyClientCert need client_ca_file (Go would fall back to the system roots).
* client_allowed_sans is checked per request after the handshake (``ssl`` has no verify callback):
  a mismatch gets 403 and the connection is closed, where Go aborts the handshake.
* cipher_suites map to OpenSSL names and only restrict TLS 1.2 and older; the TLS 1.3 suite names
  are accepted and, as in Go, have no effect.
* curve_preferences: ``SSLContext.set_ecdh_curve`` takes one curve, so only the first listed curve
  is offered (Go offers all listed ones); the rest are validated and otherwise ignored.
* TLS10/TLS11 are accepted, but OpenSSL 3's default security level may still refuse them.
* http2 is accepted and ignored: aiohttp serves HTTP/1.1 only.
* Extra headers are added to every response the handlers return or raise as HTTPException, but
  not to responses already streamed (prepared) or to aiohttp's own 500 page.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import ssl
import threading
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import bcrypt
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from . import validate
from .errors import ConfigError

log = logging.getLogger(__name__)

REALM = "gpu-health-exporter"
CACHE_SIZE = 100
BCRYPT_WORKERS = 2
BCRYPT_PER_CLIENT = 2
BCRYPT_QUEUE = 16

_CLIENT_AUTH = ("NoClientCert", "RequestClientCert", "RequireAnyClientCert", "VerifyClientCertIfGiven",
                "RequireAndVerifyClientCert")
_LEGACY_CLIENT_AUTH = {"RequireClientCert": "RequireAnyClientCert"}  # still accepted by exporter-toolkit
_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
             "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
# Go's tls.CipherSuites() names -> OpenSSL names; None: a TLS 1.3 suite, which neither Go nor
# OpenSSL's cipher string lets you restrict.
_CIPHERS: dict[str, str | None] = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_AES_128_GCM_SHA256": None,
    "TLS_AES_256_GCM_SHA384": None,
    "TLS_CHACHA20_POLY1305_SHA256": None,
}
_CURVES = {"CurveP256": "prime256v1", "CurveP384": "secp384r1", "CurveP521": "secp521r1", "X25519": "X25519"}
# exporter-toolkit's allow-list; a tuple restricts the value too.
_HEADERS: dict[str, tuple[str, ...] | None] = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}
_BCRYPT = re.compile(r"\$2[aby]\$(0[4-9]|[12]\d|3[01])\$[./A-Za-z0-9]{53}")
_TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "client_allowed_sans", "min_version",
             "max_version", "cipher_suites", "curve_preferences", "prefer_server_cipher_suites"}
_UNSUPPORTED = {"tls_server_config.cert": "inline certificates are not supported; use cert_file",
                "tls_server_config.key": "inline keys are not supported; use key_file",
                "tls_server_config.client_ca": "inline CAs are not supported; use client_ca_file",
                "rate_limit": "not supported by gpu-health-exporter"}


@dataclass(frozen=True, eq=False)
class WebConfig:
    """The parsed file; built once by load_web_config and shared by the server and the middleware.

    Frozen so nothing can change security settings after validation; the auth cache is the only
    mutable state and it is guarded by its own lock.
    """

    path: str = ""
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    users: Mapping[str, bytes] = field(default_factory=lambda: MappingProxyType({}), repr=False)
    client_allowed_sans: frozenset[str] = frozenset()
    http2: bool = True
    tls_context: ssl.SSLContext | None = field(default=None, repr=False)
    _cache: OrderedDict[str, bytes] = field(default_factory=OrderedDict, repr=False)
    _cache_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # Per-instance key, so the cache holds no plain hash of a password that could be brute-forced
    # faster than the bcrypt hash it stands in for.
    _cache_key: bytes = field(default_factory=lambda: os.urandom(32), repr=False)
    # A small pool of its own, so a flood of bad credentials costs at most BCRYPT_WORKERS cores and never ties
    # up the loop's default executor; admission (BcryptGate) keeps one client from filling it.
    _bcrypt_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(BCRYPT_WORKERS, thread_name_prefix="webconfig-bcrypt"),
        repr=False)
    _gate: BcryptGate = field(default_factory=lambda: BcryptGate(), repr=False)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server context to hand to aiohttp's TCPSite, or None to serve plain HTTP."""
        return self.tls_context

    @property
    def basic_auth_enabled(self) -> bool:
        return bool(self.users)

    def _digest(self, password: bytes) -> bytes:
        return hmac.new(self._cache_key, password, hashlib.sha256).digest()

    def _cached(self, user: str, password: bytes) -> bool:
        with self._cache_lock:
            digest = self._cache.get(user)
            if digest is None or not hmac.compare_digest(digest, self._digest(password)):
                return False
            self._cache.move_to_end(user)
            return True

    async def verify_basic_auth(self, authorization_header: str | None, client: str) -> bool | None:
        """True or False; None: refused without a check (this client, or all, already has too many waiting)."""
        if self.check_basic_auth_cached(authorization_header):
            return True
        if not self._gate.admit(client):
            return None
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._bcrypt_pool, self.check_basic_auth, authorization_header)
        finally:
            self._gate.release(client)

    def check_basic_auth_cached(self, authorization_header: str | None) -> bool:
        """True only on a cache hit; lets the async caller skip the executor for repeat scrapes."""
        creds = parse_basic(authorization_header)
        return creds is not None and creds[0] in self.users and self._cached(*creds)

    def check_basic_auth(self, authorization_header: str | None) -> bool:
        """Whether the header carries valid credentials; blocks for one bcrypt check on a cache miss."""
        creds = parse_basic(authorization_header)
        if creds is None or not self.users:
            return False
        user, password = creds
        known = user in self.users
        if known and self._cached(user, password):
            return True
        # An unknown user is checked against a real hash too, so timing does not reveal who exists.
        hashed = self.users[user] if known else _dummy_hash(self.users)
        try:
            ok = bcrypt.checkpw(password, hashed) and known
        except ValueError:  # password over 72 bytes; Go's bcrypt refuses those as well
            ok = False
        if ok:
            with self._cache_lock:
                self._cache[user] = self._digest(password)
                self._cache.move_to_end(user)
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        else:
            log.debug("basic auth failed for user %r", user)
        return ok

    def client_san_allowed(self, peercert: Mapping[str, Any] | None) -> bool:
        """Whether a verified client certificate carries one of client_allowed_sans (True if unset)."""
        if not self.client_allowed_sans:
            return True
        for kind, value in (peercert or {}).get("subjectAltName", ()):
            if kind == "IP Address":
                value = _canonical_ip(value)
            if kind in ("DNS", "email", "URI", "IP Address") and value in self.client_allowed_sans:
                return True
        return False


class BcryptGate:
    """Admission to the bcrypt pool, on the event loop: per client address and in all (no lock needed there)."""

    def __init__(self, per_client: int = BCRYPT_PER_CLIENT, total: int = BCRYPT_QUEUE) -> None:
        self.per_client = per_client
        self.total = total
        self.pending: dict[str, int] = {}
        self.refused = 0

    def admit(self, client: str) -> bool:
        if self.pending.get(client, 0) >= self.per_client or sum(self.pending.values()) >= self.total:
            self.refused += 1
            return False
        self.pending[client] = self.pending.get(client, 0) + 1
        return True

    def release(self, client: str) -> None:
        left = self.pending.get(client, 1) - 1
        if left:
            self.pending[client] = left
        else:
            self.pending.pop(client, None)


def too_many_checks(realm: str) -> web.Response:
    """The answer to a request refused before its credentials were checked: come back in a second."""
    return web.Response(status=429, text="Too many authentication attempts in progress\n",
                        headers={"Retry-After": "1", "WWW-Authenticate": f'Basic realm="{realm}"'})


def _dummy_hash(users: Mapping[str, bytes]) -> bytes:
    # The costliest configured hash, so an unknown user takes at least as long as any known one.
    return max(users.values(), key=lambda h: int(h[4:6]))


def _canonical_ip(value: str) -> str:
    # OpenSSL prints IPv6 SANs uncompressed and upper-case; Go (and the config) use the short form.
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        return value


def parse_basic(header: str | None) -> tuple[str, bytes] | None:
    """(user, password) as Go's Request.BasicAuth splits them; the password stays bytes, as bcrypt wants."""
    if not header:
        return None
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(encoded.strip(), validate=True).partition(b":")
        return (user.decode(), password) if sep else None
    except (binascii.Error, UnicodeDecodeError):
        return None


def middleware(config: WebConfig) -> Middleware:
    """aiohttp middleware enforcing basic auth and client_allowed_sans and adding the extra headers."""

    def decorate(response: web.StreamResponse) -> web.StreamResponse:
        if not response.prepared:
            response.headers.update(config.headers)
        return response

    @web.middleware
    async def webconfig_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if config.client_allowed_sans:
            transport = request.transport
            peercert = transport.get_extra_info("peercert") if transport is not None else None
            if not config.client_san_allowed(peercert):
                denied = web.Response(status=403, text="client certificate SAN not allowed\n")
                denied.force_close()
                return decorate(denied)
        if config.basic_auth_enabled:
            ok = await config.verify_basic_auth(request.headers.get("Authorization"), request.remote or "")
            if ok is None:
                return decorate(too_many_checks(REALM))
            if not ok:
                return decorate(web.Response(status=401, text="Unauthorized\n",
                                             headers={"WWW-Authenticate": f'Basic realm="{REALM}"'}))
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            exc.headers.update(config.headers)
            raise
        return decorate(response)

    return webconfig_middleware


def load_web_config(path: str | os.PathLike[str], *, error: type[Exception] = ConfigError) -> WebConfig:
    """Parse and fully validate the file (certificates included) so a bad file stops startup; raises `error`."""
    name = os.fspath(path)
    raw = validate.read_yaml(name, f"web.config.file {name}", error=error)
    try:
        return _build(name, raw)
    except ConfigError as exc:
        raise error(f"web.config.file {name}: {exc}") from exc


def _mapping(value: object, key: str, allowed: set[str] | None = None) -> dict[Any, Any]:
    value = validate.mapping(value, key)
    if allowed is not None:
        for k in value:
            full = f"{key}.{k}" if key else str(k)
            if full in _UNSUPPORTED:
                raise ConfigError(f"{full}: {_UNSUPPORTED[full]}")
            if k not in allowed:
                raise ConfigError(f"unknown key {full}")
    return value


def _choice(value: object, key: str, choices: Mapping[str, object] | tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{key}: must be one of {', '.join(choices)}, got {value!r}")
    return value


def _build(name: str, raw: object) -> WebConfig:
    top = _mapping(raw, "", {"tls_server_config", "http_server_config", "basic_auth_users"})
    base = Path(name).parent

    http = _mapping(top.get("http_server_config"), "http_server_config", {"http2", "headers"})
    http2 = validate.boolean(http.get("http2", True), "http_server_config.http2")
    headers: dict[str, str] = {}
    for header, value in _mapping(http.get("headers"), "http_server_config.headers").items():
        key = f"http_server_config.headers.{header}"
        if header not in _HEADERS:
            raise ConfigError(f"{key}: this header can not be configured; allowed: {', '.join(_HEADERS)}")
        value = validate.string(value, key)
        allowed_values = _HEADERS[header]
        if allowed_values is not None:
            _choice(value, key, allowed_values)
        if value:  # exporter-toolkit: "Unset if blank"
            headers[header] = value

    users: dict[str, bytes] = {}
    for user, hashed in _mapping(top.get("basic_auth_users"), "basic_auth_users").items():
        if not isinstance(user, str):
            raise ConfigError(f"basic_auth_users.{user}: user names must be strings (quote it)")
        if not isinstance(hashed, str) or not _BCRYPT.fullmatch(hashed):
            raise ConfigError(f"basic_auth_users.{user}: not a bcrypt hash")
        users[user] = hashed.encode()

    tls = _mapping(top.get("tls_server_config"), "tls_server_config", _TLS_KEYS)
    context, sans = _tls_context(tls, base) if tls else (None, frozenset[str]())
    return WebConfig(path=name, headers=MappingProxyType(headers), users=MappingProxyType(users),
                     client_allowed_sans=sans, http2=http2, tls_context=context)


def _file(tls: Mapping[str, object], key: str, base: Path) -> Path | None:
    value = tls.get(key)
    if value is None or value == "":
        return None
    return validate.existing_file(value, f"tls_server_config.{key}", base)


def _no_password() -> str:
    # Without this, OpenSSL would prompt on the terminal for an encrypted key's passphrase.
    raise ConfigError("tls_server_config.key_file: encrypted private keys are not supported")


def _tls_context(tls: Mapping[str, object], base: Path) -> tuple[ssl.SSLContext, frozenset[str]]:
    p = "tls_server_config"
    cert, key, ca = _file(tls, "cert_file", base), _file(tls, "key_file", base), _file(tls, "client_ca_file", base)
    if cert is None:
        raise ConfigError(f"{p}.cert_file: required when {p} is set")
    if key is None:
        raise ConfigError(f"{p}.key_file: required when {p} is set")
    auth = tls.get("client_auth_type", "NoClientCert")
    auth = _LEGACY_CLIENT_AUTH.get(str(auth), auth)
    auth = _choice(auth, f"{p}.client_auth_type", _CLIENT_AUTH)
    lo = _choice(tls.get("min_version", "TLS12"), f"{p}.min_version", _VERSIONS)
    hi = _choice(tls.get("max_version", "TLS13"), f"{p}.max_version", _VERSIONS)
    if _VERSIONS[lo] > _VERSIONS[hi]:
        raise ConfigError(f"{p}.min_version: {lo} is above max_version {hi}")
    ciphers = [_choice(c, f"{p}.cipher_suites", _CIPHERS)
               for c in validate.strings(tls.get("cipher_suites"), f"{p}.cipher_suites")]
    curves = [_choice(c, f"{p}.curve_preferences", _CURVES)
              for c in validate.strings(tls.get("curve_preferences"), f"{p}.curve_preferences")]
    prefer_server = validate.boolean(tls.get("prefer_server_cipher_suites", True),
                                     f"{p}.prefer_server_cipher_suites")
    sans = frozenset(_canonical_ip(s)
                     for s in validate.strings(tls.get("client_allowed_sans"), f"{p}.client_allowed_sans"))
    if "client_allowed_sans" in tls and auth not in ("RequireAnyClientCert", "RequireAndVerifyClientCert"):
        raise ConfigError(f"{p}.client_allowed_sans: needs client_auth_type RequireAnyClientCert or "
                          f"RequireAndVerifyClientCert")
    if ca is not None and auth == "NoClientCert":
        raise ConfigError(f"{p}.client_ca_file: set without a client_auth_type that asks for client certificates")
    if ca is None and auth not in ("NoClientCert", "RequestClientCert"):
        raise ConfigError(f"{p}.client_ca_file: required for client_auth_type {auth} (Python's ssl module "
                          f"can only ask for client certificates it verifies)")

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():  # TLS10/TLS11 are deprecated, but the operator asked for them
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version, ctx.maximum_version = _VERSIONS[lo], _VERSIONS[hi]
    try:
        ctx.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as exc:
        raise ConfigError(f"{p}.key_file: cannot load with cert_file {str(cert)!r}: {exc.reason or exc}") from exc
    if ca is not None:
        try:
            ctx.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise ConfigError(f"{p}.client_ca_file: no usable CA certificate in {str(ca)!r}: "
                              f"{exc.reason or exc}") from exc
    # Python cannot request a certificate without verifying it, so the unverified Go modes become
    # the nearest safe mode (see the module docstring).
    ctx.verify_mode = {"NoClientCert": ssl.CERT_NONE, "RequestClientCert": ssl.CERT_NONE,
                       "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL}.get(auth, ssl.CERT_REQUIRED)
    openssl_ciphers = [c for c in (_CIPHERS[name] for name in ciphers) if c]
    if openssl_ciphers:
        try:
            ctx.set_ciphers(":".join(openssl_ciphers))
        except ssl.SSLError as exc:
            raise ConfigError(f"{p}.cipher_suites: OpenSSL supports none of {ciphers}") from exc
    if curves:
        ctx.set_ecdh_curve(_CURVES[curves[0]])
        if len(curves) > 1:
            log.info("%s.curve_preferences: only %s is offered; Python's ssl takes a single curve", p, curves[0])
    if prefer_server:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx, sans
