"""Bad input: malformed bodies, wrong types, missing fields, oversize bodies, wrong credentials on either
listener, TLS client certificates, hostile label values; and a property-based test over payloads."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path

import bcrypt
import pytest
import requests
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.webhook.webhook_support import alert, base_config, free_port, notification
from remediation_webhook.app import create_app

TOKEN = "receiver-token-0123456789"
ADMIN_TOKEN = "admin-token-0123456789ab"
HOSTILE = ["-oProxyCommand=x", "../", "../../etc/passwd", "gpu[000-999]", "n1;reboot", "x" * 10_000,
           "n1\n\x00\x1b[31m", "NODE-UPPER", "n1 ", "$(id)", "node\u202eevil", ""]


async def _secured(harness, tmp_path, kube, **sections):
    hashed = bcrypt.hashpw(b"am-password", bcrypt.gensalt(rounds=4)).decode()
    (tmp_path / "web.yml").write_text(f"basic_auth_users:\n  alertmanager: '{hashed}'\n")
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "admin-token").write_text(ADMIN_TOKEN + "\n")
    raw = base_config(tmp_path, kube.url, web={"listen_address": "127.0.0.1:0", "bearer_token_file": "token",
                                               "config_file": "web.yml", "max_body_bytes": 65536},
                      admin={"listen_address": "127.0.0.1:0", "bearer_token_file": "admin-token"}, **sections)
    return await harness(raw)


BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.mark.parametrize(("body", "status", "names"), [
    (b"{not json", 400, "not valid JSON"),
    (b"\xff\xfe", 400, "not valid JSON"),
    (b"[" * 100_00 + b"]" * 100_00, 400, ""),
    (b"[]", 400, "body: expected a JSON object"),
    (json.dumps({"alerts": []}).encode(), 400, "version: missing"),
    (json.dumps({"version": "3", "alerts": []}).encode(), 400, "version"),
    (json.dumps({"version": "4"}).encode(), 400, "alerts: missing"),
    (json.dumps({"version": "4", "alerts": {}}).encode(), 400, "alerts: expected a list"),
    (json.dumps({"version": "4", "alerts": [1]}).encode(), 400, "alerts[0]: expected an object"),
    (json.dumps({"version": "4", "truncatedAlerts": "1", "alerts": []}).encode(), 400, "truncatedAlerts"),
])
async def test_malformed_bodies_are_400(harness, tmp_path, kube, body, status, names):
    h = await _secured(harness, tmp_path, kube)
    r = await h.client.post("/v1/alerts", data=body, headers=BEARER)
    assert r.status == status
    assert names in (await r.text())


@pytest.mark.parametrize(("mutate", "key"), [
    (lambda a: a.pop("startsAt"), "alerts[0].startsAt: missing"),
    (lambda a: a.pop("fingerprint"), "alerts[0].fingerprint: missing"),
    (lambda a: a.pop("labels"), "alerts[0].labels: missing"),
    (lambda a: a.update(startsAt=12), "alerts[0].startsAt: expected an RFC 3339"),
    (lambda a: a.update(startsAt="yesterday"), "alerts[0].startsAt: not an RFC 3339"),
    (lambda a: a.update(status="exploded"), "alerts[0].status"),
    (lambda a: a.update(fingerprint="zz-not-hex"), "alerts[0].fingerprint"),
    (lambda a: a["labels"].update(node=3), "alerts[0].labels: value of 'node' is int"),
    (lambda a: a.update(annotations=[]), "alerts[0].annotations: expected an object"),
])
async def test_wrong_types_and_missing_fields_are_400_naming_the_field(harness, tmp_path, kube, mutate, key):
    kube.add_node("n1")
    h = await _secured(harness, tmp_path, kube)
    a = alert("n1")
    mutate(a)
    r = await h.client.post("/v1/alerts", json=notification(a), headers=BEARER)
    assert r.status == 400
    assert key in (await r.json())["error"]
    assert h.sql("SELECT COUNT(*) FROM occurrence") == [(0,)]


async def test_unknown_fields_are_ignored_and_the_real_sample_is_accepted(harness, tmp_path, kube):
    kube.add_node("node-a")
    h = await _secured(harness, tmp_path, kube)
    sample = json.loads(Path("/work/shared/reference/alertmanager-webhook-firing.json").read_text()) \
        if Path("/work/shared/reference/alertmanager-webhook-firing.json").exists() else notification(alert("node-a"))
    sample["notification_reason"] = "new alerts added"
    sample["routeLabels"] = {"x": "y"}
    sample["alerts"][0]["somethingNew"] = {"nested": True}
    r = await h.client.post("/v1/alerts", json=sample, headers=BEARER)
    assert r.status == 200, await r.text()


async def test_oversize_body_is_413(harness, tmp_path, kube):
    h = await _secured(harness, tmp_path, kube)
    big = notification(alert("n1", summary="x" * 70_000))
    r = await h.client.post("/v1/alerts", json=big, headers=BEARER)
    assert r.status == 413
    assert h.sql("SELECT COUNT(*) FROM occurrence") == [(0,)]


async def test_credentials_on_the_receiver(harness, tmp_path, kube):
    kube.add_node("n1")
    h = await _secured(harness, tmp_path, kube)
    body = notification(alert("n1"))
    assert (await h.client.post("/v1/alerts", json=body)).status == 401
    assert (await h.client.post("/v1/alerts", json=body, headers={"Authorization": "Bearer wrong"})).status == 401
    assert (await h.client.post("/v1/alerts", json=body, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})).status == 401
    import base64

    def basic(user: str, pw: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()}
    assert (await h.client.post("/v1/alerts", json=body, headers=basic("alertmanager", "nope"))).status == 401
    assert (await h.client.post("/v1/alerts", json=body, headers=basic("nobody", "am-password"))).status == 401
    assert (await h.client.get("/metrics")).status == 401
    assert (await h.client.get("/healthz")).status == 200  # probes need no credentials
    assert h.sql("SELECT COUNT(*) FROM occurrence") == [(0,)]
    assert (await h.client.post("/v1/alerts", json=body, headers=basic("alertmanager", "am-password"))).status == 200
    assert (await h.client.post("/v1/alerts", json=body, headers=BEARER)).status == 200


async def test_credentials_on_the_admin_listener_are_its_own(harness, tmp_path, kube):
    h = await _secured(harness, tmp_path, kube)
    assert (await h.admin.get("/v1/remediations")).status == 401
    assert (await h.admin.get("/v1/remediations", headers=BEARER)).status == 401  # the receiver's token
    assert (await h.admin.post("/v1/pause", headers=BEARER)).status == 401
    assert h.sql("SELECT COUNT(*) FROM meta WHERE key='pause'") == [(0,)]
    good = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert (await h.admin.get("/v1/remediations", headers=good)).status == 200
    r = await h.admin.post("/v1/pause", headers=good, json={"reason": "test"})
    assert r.status == 200
    assert h.sql("SELECT actor FROM audit WHERE event='paused'") == [("bearer-token",)]


@pytest.mark.parametrize("value", HOSTILE)
async def test_hostile_node_labels_are_rejected_and_nothing_runs(harness, tmp_path, kube, value):
    kube.add_node("n1")
    h = await _secured(harness, tmp_path, kube)
    r = await h.client.post("/v1/alerts", json=notification(alert(value)), headers=BEARER)
    assert r.status == 200
    assert (await r.json())["rejected"] == 1
    await h.settle()
    assert kube.calls(mutating=True) == [] and kube.calls() == [c for c in kube.calls() if c[0] == "GET"]
    assert h.sql("SELECT COUNT(*) FROM remediation") == [(0,)]
    (labels,) = h.sql("SELECT labels_json FROM occurrence")[0]
    assert len(labels) < 2000 and all(c.isprintable() for c in json.loads(labels)["node"])


@pytest.mark.parametrize(("labels", "why"), [({"gpu": "0; rm -rf /"}, "gpu label"),
                                             ({"uuid": "../GPU-1"}, "uuid label"),
                                             ({"remediation": "reboot --force"}, "no known action")])
async def test_hostile_gpu_uuid_and_remediation_labels(harness, tmp_path, kube, labels, why):
    kube.add_node("n1")
    h = await _secured(harness, tmp_path, kube)
    a = alert("n1")
    a["labels"].update(labels)
    out = await (await h.client.post("/v1/alerts", json=notification(a), headers=BEARER)).json()
    assert out["rejected"] == 1
    assert why in h.sql("SELECT reason FROM occurrence")[0][0]
    assert kube.calls(mutating=True) == []


def _pki(tmp: Path) -> dict[str, Path]:
    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def issue(cn, key, ca_key, ca_cn, ca=False, san=None):
        now = dt.datetime.now(dt.timezone.utc)
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(ca_cn))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(ca_key, hashes.SHA256())

    out = {}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("test-ca", ca_key, ca_key, "test-ca", ca=True)
    for who, san in (("server", [x509.DNSName("localhost"), x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]),
                     ("alertmanager", None)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issue(who, key, ca_key, "test-ca", san=san)
        (tmp / f"{who}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (tmp / f"{who}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
        out[who] = tmp / f"{who}.crt"
        out[who + "_key"] = tmp / f"{who}.key"
    (tmp / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out["ca"] = tmp / "ca.crt"
    return out


async def test_tls_with_required_client_certificates(harness, tmp_path, kube):
    kube.add_node("n1")
    pki = _pki(tmp_path)
    (tmp_path / "web.yml").write_text(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n")
    raw = base_config(tmp_path, kube.url, web={"listen_address": "127.0.0.1:0", "config_file": "web.yml"})
    h = await harness(raw)
    assert h.services.config.web.auth_enabled  # a required client certificate is authentication
    runner = web.AppRunner(create_app(h.services), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=h.services.config.web.web.ssl_context()).start()
    url = f"https://127.0.0.1:{port}/v1/alerts"
    body = notification(alert("n1"))
    try:
        with pytest.raises(requests.exceptions.ConnectionError):  # SSLError, or a reset under TLS 1.3
            await asyncio.to_thread(requests.post, url, json=body, verify=str(pki["ca"]), timeout=5)
        r = await asyncio.to_thread(requests.post, url, json=body, verify=str(pki["ca"]), timeout=5,
                                    cert=(str(pki["alertmanager"]), str(pki["alertmanager_key"])))
        assert r.status_code == 200 and r.json()["accepted"] == 1
    finally:
        await runner.cleanup()


# ------------------------------------------------------------------------------------ property-based

_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), _text)
_node = st.one_of(st.sampled_from(["n1", "gpu-001", "a.b-c"] + HOSTILE[:-2]), _text)
_labels = st.one_of(
    st.fixed_dictionaries({"alertname": st.sampled_from(["GPUXidFatal", "GPUX", "Other"]), "node": _node,
                           "remediation": st.sampled_from(["cordon", "drain", "reboot", "none", "", "rm -rf"])},
                          optional={"gpu": st.one_of(st.just("0"), _text), "uuid": st.one_of(st.just("GPU-ab"), _text)}),
    st.dictionaries(_text, st.one_of(_text, _scalar), max_size=4))
_alert = st.fixed_dictionaries(
    {"status": st.one_of(st.sampled_from(["firing", "resolved"]), _scalar),
     "labels": _labels,
     "startsAt": st.one_of(st.just("2026-11-29T09:03:30.88Z"), st.just("0001-01-01T00:00:00Z"), _scalar),
     "fingerprint": st.one_of(st.text(alphabet="0123456789abcdef", min_size=1, max_size=16), _scalar)},
    optional={"endsAt": st.one_of(st.just("0001-01-01T00:00:00Z"), _scalar), "annotations": st.one_of(
        st.dictionaries(_text, _text, max_size=3), _scalar), "extra": _scalar})
_payload = st.one_of(
    st.fixed_dictionaries({"version": st.one_of(st.just("4"), _scalar), "alerts": st.lists(_alert, max_size=4)},
                          optional={"truncatedAlerts": st.one_of(st.integers(0, 3), _scalar),
                                    "status": st.one_of(st.just("firing"), _scalar), "groupKey": _scalar,
                                    "commonLabels": st.one_of(st.dictionaries(_text, _text, max_size=2), _scalar)}),
    st.recursive(_scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
                 max_leaves=8))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(payload=_payload)
async def test_any_payload_gets_200_or_400_and_never_runs_a_hostile_target(harness, tmp_path, kube, payload):
    h = getattr(test_any_payload_gets_200_or_400_and_never_runs_a_hostile_target, "h", None)
    if h is None or h.journal._closed:
        kube.add_node("n1")
        h = await harness(policy={"dry_run": True, "rules": [{"name": "gpu", "match_re": {"alertname": "GPU.*"},
                                                               "ladder": ["cordon", "drain"]}]}, start=False)
        test_any_payload_gets_200_or_400_and_never_runs_a_hostile_target.h = h
    r = await h.client.post("/v1/alerts", data=json.dumps(payload))
    assert r.status in (200, 400), await r.text()
    body = await r.json()
    if r.status == 200:
        assert set(body) >= {"accepted", "duplicates", "ignored", "refused", "rejected", "merged"}
    nodes = {n for (n,) in h.sql("SELECT node FROM remediation")}
    from remediation_webhook.models import valid_node_name
    assert all(valid_node_name(n) for n in nodes)
    assert kube.calls(mutating=True) == []
