"""Hostile and broken input that used to get a 5xx, and configurations that used to be accepted though unsafe:
strings no UTF-8 store takes, a leap second, a full disk on the admin API, a journal file that is not a journal,
one credential for both listeners, an open admin listener, credentials in URLs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from remediation_webhook.config import build_config
from remediation_webhook.errors import ConfigError, JournalError
from remediation_webhook.journal import Journal
from tests.webhook.webhook_support import alert, base_config, notification

SAFETY = {"breaker": {"max_nodes": 50, "max_percent": 100, "min_nodes": 50},
          "fleet_cap": {"max_nodes": 10, "max_percent": 100}}


def _raw(body: dict) -> bytes:
    """JSON as Alertmanager would send it, escapes kept (json.dumps writes a lone surrogate as \\ud800)."""
    return json.dumps(body).encode()


async def test_a_lone_surrogate_refuses_that_alert_alone_and_never_a_5xx(harness, kube):
    kube.add_node("n1")
    h = await harness(safety=SAFETY)
    bad = alert("n2", alertname="GPUXidFatal\ud800")
    bad_label = alert("n3", extra="\udfff")
    good = alert("n1")
    body = notification(bad, bad_label, good)
    body["groupKey"] = "{}:{node=\"\ud800\"}"
    r = await h.client.post("/v1/alerts", data=_raw(body), headers={"Content-Type": "application/json"})
    assert r.status == 200
    out = await r.json()
    assert (out["accepted"], out["rejected"]) == (1, 2)
    reasons = {n: why for n, why in h.sql("SELECT node, reason FROM occurrence WHERE decision='rejected'")}
    assert set(reasons.values()) == {"a label or annotation is not valid Unicode (a lone surrogate)"}
    assert h.sql("SELECT DISTINCT group_key FROM occurrence") == [('{}:{node="?"}',)]
    await h.until_state("n1", "SUCCEEDED")


async def test_labels_beyond_any_real_alert_are_refused_not_journaled(harness, kube):
    h = await harness(safety=SAFETY)
    big = alert("n1", huge="x" * 20_000)
    out = await (await h.post(notification(big))).json()
    assert out["rejected"] == 1
    stored = h.sql("SELECT labels_json FROM occurrence")[0][0]
    assert len(stored) < 2_000  # bounded and printable


async def test_a_leap_second_parses(harness, kube):
    kube.add_node("n1")
    h = await harness(safety=SAFETY)
    a = alert("n1")
    a["startsAt"] = "2016-12-31T23:59:60Z"
    r = await h.post(notification(a))  # parsed (and refused: older than policy.max_alert_age)
    assert r.status == 200 and (await r.json())["refused"] == 1
    assert h.sql("SELECT starts_at FROM occurrence") == [("2017-01-01T00:00:00Z",)]


async def test_a_full_disk_on_the_admin_api_is_a_503_and_one_log_line(harness, caplog):
    h = await harness()
    h.journal.close()  # what a full disk looks like from here: the journal cannot commit
    with caplog.at_level(logging.ERROR):
        r = await h.admin.post("/v1/pause", json={"reason": "disk full"})
    assert r.status == 503 and r.headers["Retry-After"] == "10"
    assert (await r.json()) == {"error": "journal unavailable"}
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert [rec.name for rec in errors].count("remediation_webhook.admin") == 1  # this request: one line
    assert [rec for rec in errors if rec.exc_info] == []  # and no traceback anywhere (the engine says it once)


@pytest.mark.parametrize(("content", "what"), [(b"", "is empty (0 bytes)"),
                                               (b"not a database at all\n" * 10, "is not an SQLite database")])
def test_a_journal_file_that_is_not_a_journal_stops_startup(tmp_path: Path, content: bytes, what: str):
    path = tmp_path / "journal.db"
    path.write_bytes(content)
    with pytest.raises(JournalError) as err:
        Journal(str(path))
    assert what in str(err.value) and f"mv {path} {path}.broken" in str(err.value)
    assert path.read_bytes() == content  # left exactly as it was


def _listeners(tmp_path: Path, web: dict, admin: dict) -> dict:
    return base_config(tmp_path, "http://127.0.0.1:1", web={"listen_address": "127.0.0.1:0", **web},
                       admin={"listen_address": "127.0.0.1:0", **admin})


def test_one_token_for_the_receiver_and_the_admin_api_is_refused(tmp_path: Path):
    (tmp_path / "tokens").write_text("alertmanager-token-0123\n")
    (tmp_path / "admin").write_text("admin-token-0123456789\nalertmanager-token-0123\n")
    raw = _listeners(tmp_path, {"bearer_token_file": "tokens"}, {"bearer_token_file": "admin"})
    with pytest.raises(ConfigError, match="admin.bearer_token_file: a token of the admin API is also a token of the "
                                          "receiver"):
        build_config(raw, base=tmp_path)


def test_one_basic_auth_password_for_both_listeners_is_refused(tmp_path: Path):
    import bcrypt

    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    (tmp_path / "web.yml").write_text(f"basic_auth_users:\n  ops: '{hashed}'\n")
    raw = _listeners(tmp_path, {"config_file": "web.yml"}, {"config_file": "web.yml"})
    with pytest.raises(ConfigError, match="admin.config_file: basic-auth user 'ops' has the same password hash"):
        build_config(raw, base=tmp_path)


def test_an_admin_listener_without_credentials_must_stay_on_loopback(tmp_path: Path):
    raw = _listeners(tmp_path, {}, {"listen_address": "0.0.0.0:9097"})
    with pytest.raises(ConfigError, match="admin.listen_address: 0.0.0.0:9097 is not loopback and the admin API has "
                                          "no credentials"):
        build_config(raw, base=tmp_path)
    build_config(_listeners(tmp_path, {}, {"listen_address": "[::1]:9097"}), base=tmp_path)


async def test_credentials_in_an_alertmanager_url_are_never_shown(harness, kube):
    h = await harness(alertmanager={"url": "http://am:s3cret@127.0.0.1:9"})
    policy = await (await h.admin.get("/v1/policy")).json()
    assert policy["alertmanager"] == ["http://am:***@127.0.0.1:9"]
    from remediation_webhook.alertmanager import AlertmanagerClient
    from remediation_webhook.errors import AlertmanagerUnavailable

    client = AlertmanagerClient(h.services.config.alertmanager)  # type: ignore[arg-type]
    try:
        with pytest.raises(AlertmanagerUnavailable) as err:
            await client.state("00", "GPUXidFatal", "n1")
    finally:
        await client.close()
    assert "s3cret" not in str(err.value) and "am:***@" in str(err.value)
