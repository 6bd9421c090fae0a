"""--web.config.file against a real HTTPS server and a real client, with certificates made per test."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ipaddress
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import requests
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gpu_health_common import webconfig
from gpu_health_common.errors import ConfigError
from gpu_health_common.webconfig import WebConfig, load_web_config, middleware


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca: Path
    client_cert: Path
    client_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(subject: str, key: ec.EllipticCurvePrivateKey, issuer_key: ec.EllipticCurvePrivateKey,
           issuer: str, *, ca: bool = False, san: list[x509.GeneralName] | None = None,
           usage: x509.ObjectIdentifier | None = None) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                              critical=False)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=ca, crl_sign=ca,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    _write(d / "ca.pem", _issue("test CA", ca_key, ca_key, "test CA", ca=True))
    _write(d / "server.pem", _issue("127.0.0.1", server_key, ca_key, "test CA",
                                    san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
                                    usage=ExtendedKeyUsageOID.SERVER_AUTH), server_key)
    _write(d / "client.pem", _issue("scraper", client_key, ca_key, "test CA",
                                    san=[x509.DNSName("prometheus.example")],
                                    usage=ExtendedKeyUsageOID.CLIENT_AUTH), client_key)
    return Pki(d, d / "ca.pem", d / "client.pem", d / "client.key")


def _config(pki: Pki, text: str, name: str = "web.yml") -> WebConfig:
    # Written next to the certificates and naming them relatively: that checks path resolution too.
    path = pki.dir / name
    path.write_text(text)
    return load_web_config(path)


TLS = "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n"
MTLS = TLS + "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.pem\n"


@asynccontextmanager
async def serve(cfg: WebConfig) -> AsyncIterator[str]:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(middlewares=[middleware(cfg)])
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=cfg.ssl_context())
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"https://{host}:{port}"
    finally:
        await runner.cleanup()


async def get(url: str, pki: Pki, **kw: Any) -> requests.Response:
    """requests blocks, so it runs in a thread while the server keeps serving on this loop."""
    return await asyncio.to_thread(requests.get, url, verify=str(pki.ca), timeout=10, **kw)


@pytest.fixture
def bcrypt_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real: Callable[[bytes, bytes], bool] = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        calls.append(1)
        return real(password, hashed)

    monkeypatch.setattr(webconfig.bcrypt, "checkpw", counting)
    return calls


async def test_tls_server_cert_verifies_against_ca(pki: Pki) -> None:
    cfg = _config(pki, TLS + "  min_version: TLS12\n  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256]\n"
                             "  curve_preferences: [CurveP256]\nhttp_server_config:\n  http2: false\n")
    assert isinstance(cfg.ssl_context(), ssl.SSLContext)
    async with serve(cfg) as url:
        resp = await get(url + "/metrics", pki)
    assert (resp.status_code, resp.text) == (200, "ok")


async def test_require_and_verify_client_cert(pki: Pki) -> None:
    cfg = _config(pki, MTLS)
    async with serve(cfg) as url:
        with pytest.raises(requests.exceptions.ConnectionError):  # SSLError is a subclass
            await get(url + "/metrics", pki)
        resp = await get(url + "/metrics", pki, cert=(str(pki.client_cert), str(pki.client_key)))
    assert resp.status_code == 200


@pytest.mark.parametrize(("sans", "status"), [("[prometheus.example]", 200), ("[other.example]", 403)])
async def test_client_allowed_sans(pki: Pki, sans: str, status: int) -> None:
    cfg = _config(pki, MTLS + f"  client_allowed_sans: {sans}\n")
    async with serve(cfg) as url:
        resp = await get(url + "/metrics", pki, cert=(str(pki.client_cert), str(pki.client_key)))
    assert resp.status_code == status


async def test_basic_auth_and_cache(pki: Pki, bcrypt_calls: list[int]) -> None:
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    cfg = _config(pki, TLS + f"basic_auth_users:\n  alice: '{hashed}'\n")
    assert cfg.basic_auth_enabled
    async with serve(cfg) as url:
        resp = await get(url + "/metrics", pki)
        assert resp.status_code == 401
        assert resp.headers["WWW-Authenticate"] == 'Basic realm="gpu-health-exporter"'
        assert bcrypt_calls == []  # no credentials: nothing to hash

        assert (await get(url + "/metrics", pki, auth=("alice", "wrong"))).status_code == 401
        assert len(bcrypt_calls) == 1

        # An unknown user still costs a bcrypt check, so timing does not tell who exists.
        assert (await get(url + "/metrics", pki, auth=("mallory", "s3cret"))).status_code == 401
        assert len(bcrypt_calls) == 2

        resp = await get(url + "/metrics", pki, auth=("alice", "s3cret"))
        assert (resp.status_code, resp.text) == (200, "ok")
        assert len(bcrypt_calls) == 3

        assert (await get(url + "/metrics", pki, auth=("alice", "s3cret"))).status_code == 200
        assert len(bcrypt_calls) == 3  # served from the cache

        # A wrong password for a cached user is not a cache hit.
        assert (await get(url + "/metrics", pki, auth=("alice", "s3cre"))).status_code == 401
        assert len(bcrypt_calls) == 4


def test_cache_is_bounded_and_per_instance(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webconfig, "CACHE_SIZE", 3)
    users = "".join(f"  u{i}: '{bcrypt.hashpw(b'pw', bcrypt.gensalt(rounds=4)).decode()}'\n" for i in range(5))
    cfg, other = (_config(pki, f"basic_auth_users:\n{users}", name=f"auth{n}.yml") for n in range(2))
    for i in range(5):
        header = "Basic " + base64.b64encode(f"u{i}:pw".encode()).decode()
        assert cfg.check_basic_auth(header)
        assert cfg.check_basic_auth_cached(header)
        assert not other.check_basic_auth_cached(header)
    assert list(cfg._cache) == ["u2", "u3", "u4"]
    for bad in (None, "", "Basic !!!", "Bearer x", "Basic " + base64.b64encode(b"no-colon").decode()):
        assert not cfg.check_basic_auth(bad)
    header = "Basic " + base64.b64encode(b"u0:pw").decode()
    assert not _config(pki, "{}\n").check_basic_auth(header)  # no users: nothing is valid


async def test_extra_headers_on_every_response(pki: Pki) -> None:
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    cfg = _config(pki, TLS + "http_server_config:\n  headers:\n    X-Frame-Options: deny\n"
                             "    Content-Security-Policy: \"default-src 'none'\"\n"
                             f"basic_auth_users:\n  bob: '{hashed}'\n")
    async with serve(cfg) as url:
        responses = [await get(url + "/metrics", pki, auth=("bob", "pw")),
                     await get(url + "/metrics", pki),
                     await get(url + "/missing", pki, auth=("bob", "pw"))]
    assert [r.status_code for r in responses] == [200, 401, 404]
    for r in responses:
        assert r.headers["X-Frame-Options"] == "deny"
        assert r.headers["Content-Security-Policy"] == "default-src 'none'"


@pytest.mark.parametrize(("auth", "mode"), [
    ("NoClientCert", ssl.CERT_NONE),
    ("RequestClientCert", ssl.CERT_NONE),
    ("RequireAnyClientCert", ssl.CERT_REQUIRED),
    ("RequireClientCert", ssl.CERT_REQUIRED),
    ("VerifyClientCertIfGiven", ssl.CERT_OPTIONAL),
    ("RequireAndVerifyClientCert", ssl.CERT_REQUIRED),
])
def test_client_auth_type_maps_to_verify_mode(pki: Pki, auth: str, mode: ssl.VerifyMode) -> None:
    ca = "" if auth == "NoClientCert" else "  client_ca_file: ca.pem\n"
    ctx = _config(pki, TLS + f"  client_auth_type: {auth}\n" + ca).ssl_context()
    assert ctx is not None and ctx.verify_mode == mode


def test_options_reach_the_context(pki: Pki) -> None:
    ctx = _config(pki, TLS + "  min_version: TLS10\n  prefer_server_cipher_suites: false\n").ssl_context()
    assert ctx is not None and ctx.minimum_version == ssl.TLSVersion.TLSv1  # and no DeprecationWarning
    assert not ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE


def test_encrypted_key_is_refused_without_prompting(pki: Pki) -> None:
    key = serialization.load_pem_private_key((pki.dir / "server.key").read_bytes(), None)
    (pki.dir / "locked.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase")))
    with pytest.raises(ConfigError, match="tls_server_config.key_file: encrypted"):
        _config(pki, TLS.replace("server.key", "locked.key"))


@pytest.mark.parametrize("text", ["", "{}\n", "# nothing\n"])
def test_empty_config_means_plain_http_without_auth(pki: Pki, text: str) -> None:
    cfg = _config(pki, text)
    assert cfg.ssl_context() is None and not cfg.basic_auth_enabled and dict(cfg.headers) == {}


@pytest.mark.parametrize(("text", "needle"), [
    ("tls_srever_config: {}\n", "unknown key tls_srever_config"),
    ("tls_server_config:\n  cert_fil: server.pem\n", "unknown key tls_server_config.cert_fil"),
    (TLS + "  client_auth_type: Sometimes\n", "tls_server_config.client_auth_type: must be one of"),
    ("tls_server_config:\n  cert_file: missing.pem\n  key_file: server.key\n",
     "tls_server_config.cert_file: no such file"),
    (TLS.replace("server.key", "nope.key"), "tls_server_config.key_file: no such file"),
    (TLS.replace("server.key", "client.key"), "tls_server_config.key_file: cannot load"),
    (TLS + "  client_auth_type: RequireAndVerifyClientCert\n", "tls_server_config.client_ca_file: required"),
    (TLS + "  client_ca_file: ca.pem\n", "tls_server_config.client_ca_file: set without"),
    (TLS + "  client_auth_type: RequireAnyClientCert\n", "tls_server_config.client_ca_file: required"),
    (TLS + "  client_ca_file: server.key\n  client_auth_type: RequireAndVerifyClientCert\n",
     "tls_server_config.client_ca_file: no usable CA"),
    (TLS + "  client_allowed_sans: [x]\n", "tls_server_config.client_allowed_sans: needs"),
    (TLS + "  min_version: TLS13\n  max_version: TLS12\n", "tls_server_config.min_version: TLS13 is above"),
    (TLS + "  max_version: SSL3\n", "tls_server_config.max_version: must be one of"),
    (TLS + "  cipher_suites: [TLS_RSA_WITH_RC4_128_SHA]\n", "tls_server_config.cipher_suites: must be one of"),
    (TLS + "  curve_preferences: [P256]\n", "tls_server_config.curve_preferences: must be one of"),
    (TLS + "  cert: inline\n", "tls_server_config.cert: inline certificates are not supported"),
    ("tls_server_config:\n  min_version: TLS12\n", "tls_server_config.cert_file: required"),
    ("basic_auth_users:\n  alice: hunter2\n", "basic_auth_users.alice: not a bcrypt hash"),
    ("http_server_config:\n  headers:\n    Authorization: x\n", "http_server_config.headers.Authorization"),
    ("http_server_config:\n  headers:\n    X-Frame-Options: allow\n", "http_server_config.headers.X-Frame-Options"),
    ("http_server_config:\n  http2: maybe\n", "http_server_config.http2: expected true or false"),
    ("rate_limit:\n  burst: 1\n", "rate_limit: not supported"),
    ("tls_server_config: [\n", "not valid YAML"),
    ("- a list\n", "expected a mapping"),
])
def test_errors_name_file_and_key(pki: Pki, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        _config(pki, text, name="bad.yml")
    assert str(info.value).startswith(f"web.config.file {pki.dir / 'bad.yml'}: ")
    assert needle in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"web\.config\.file .*absent\.yml"):
        load_web_config(tmp_path / "absent.yml")
