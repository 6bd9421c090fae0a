"""The config file and check-config: defaults are the safe ones, errors name the key, unbuilt executors are
refused up front, the shipped example works, and a listener without credentials stays on loopback."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.webhook.webhook_support import ROOT, base_config
from remediation_webhook.auth import effective_address
from remediation_webhook.cli import main
from remediation_webhook.config import ListenerConfig, build_config, load_config
from remediation_webhook.errors import ConfigError

EXAMPLE = ROOT / "deploy" / "webhook" / "example.yaml"


def test_example_is_a_valid_dry_run_configuration(capsys):
    assert main(["check-config", str(EXAMPLE)]) == 0
    assert "dry-run" in capsys.readouterr().out
    config = load_config(EXAMPLE)
    assert config.policy.dry_run is True
    assert config.safety.undo_enabled is False
    assert config.alertmanager is None


def test_defaults_are_the_safe_ones(tmp_path):
    cfg = build_config({"kubernetes": {"host": "http://127.0.0.1:1"}, "journal": {"path": "j.db"}}, base=tmp_path)
    assert cfg.policy.dry_run is True and cfg.policy.rules == ()  # dry-run, deny everything
    s = cfg.safety
    assert (s.fleet_cap_nodes, s.fleet_cap_percent, s.max_attempts, s.undo_enabled) == (4, 5.0, 3, False)
    assert s.fleet_cap(200) == 4 and s.fleet_cap(20) == 1
    assert s.breaker.threshold(200) == 10 and s.breaker.trip_on_truncated
    assert cfg.web.listen_address.startswith("127.0.0.1") and cfg.web.max_body_bytes == 1 << 20


@pytest.mark.parametrize(("patch", "message"), [
    ({"bogus": 1}, "bogus: unknown key"),
    ({"web": {"listen_adress": "x"}}, "web.listen_adress: unknown key"),
    ({"web": {"listen_address": "nope"}}, "web.listen_address"),
    ({"web": {"bearer_token_file": "missing"}}, "web.bearer_token_file: no such file"),
    ({"policy": {"dry_run": "yes"}}, "policy.dry_run: expected true or false"),
    ({"policy": {"rules": [{"name": "r", "match": {"alertname": "X"}, "ladder": ["cordon", "reboot"]}]}},
     "policy.rules[0].ladder[1]: reboot has no executor configured"),
    ({"policy": {"rules": [{"name": "r", "match": {"alertname": "X"}, "ladder": ["reset_gpu"]}]}},
     "policy.rules[0].ladder[0]: reset_gpu has no executor"),
    ({"policy": {"rules": [{"name": "r", "match": {"alertname": "X"}, "ladder": ["format-disk"]}]}},
     "policy.rules[0].ladder[0]: unknown action"),
    ({"policy": {"rules": [{"name": "r", "match": {"alertname": "X"}, "ladder": ["uncordon"]}]}},
     "policy.rules[0].ladder[0]: unknown action"),
    ({"policy": {"rules": [{"name": "r", "ladder": ["cordon"]}]}}, "policy.rules[0].match"),
    ({"policy": {"rules": [{"name": "r", "match_re": {"alertname": "("}, "ladder": ["cordon"]}]}},
     "policy.rules[0].match_re.alertname: not a regular expression"),
    ({"policy": {"rules": [{"name": "r", "match": {"alertname": "X"}, "ladder": ["cordon"],
                            "requires_approval": ["drain"]}]}}, "policy.rules[0].requires_approval[0]"),
    ({"policy": {"rules": [{"name": "r", "match": {"alertname": "X"}, "ladder": ["cordon"]}] * 2}},
     "policy.rules[1].name: r is used twice"),
    ({"policy": {"targets": {"control_plane_labels": []}}}, "policy.targets.control_plane_labels"),
    ({"policy": {"targets": {"node_selector": {"pool": "not valid!"}}}}, "policy.targets.node_selector.pool"),
    ({"safety": {"fleet_cap": {"max_percent": 150}}}, "safety.fleet_cap.max_percent"),
    ({"safety": {"rate_limits": {"cordon": {"max": -1}}}}, "safety.rate_limits.cordon.max"),
    ({"safety": {"per_node": {"cooldown": "soon"}}}, "safety.per_node.cooldown"),
    ({"safety": {"breaker": {"max_nodes": 0}}}, "safety.breaker.max_nodes"),
    ({"actions": {"reboot": {}}}, "actions.reboot: no executor for reboot yet"),
    ({"actions": {"drain": {"timeout": "0s"}}}, "actions.drain.timeout: must be positive"),
    ({"actions": {"drain": {"force": True}}}, "actions.drain.force: unknown key"),
    ({"actions": {"taint": {"effect": "NoExecute"}}}, "actions.taint.effect: NoExecute"),
    ({"inventory": {"kind": "openstack"}}, "inventory.kind: unknown inventory 'openstack'"),
    ({"kubernetes": None}, "kubernetes: required by inventory.kind kubernetes"),
    ({"alertmanager": None, "policy": {"dry_run": False}}, "alertmanager.url: required when policy.dry_run is false"),
    ({"alertmanager": {"url": "ftp://x"}}, "alertmanager.url"),
    ({"alertmanager": {"url": "http://a:9093", "urls": ["http://b:9093"]}}, "alertmanager.urls: set either url"),
    ({"alertmanager": {"url": None, "urls": []}}, "alertmanager.urls: at least one URL"),
    ({"alertmanager": {"url": None, "urls": ["http://a:9093", "nope"]}}, "alertmanager.urls[1]: expected http(s)://"),
    ({"alertmanager": {"url": None, "urls": ["http://a:9093", "http://a:9093/"]}},
     "alertmanager.urls[1]: http://a:9093 is listed twice"),
    ({"policy": {"resolved_hold": "a while"}}, "policy.resolved_hold"),
    ({"policy": {"settle_time": -1}}, "policy.settle_time"),
])
def test_errors_name_the_key(tmp_path, patch, message):
    raw = base_config(tmp_path, "http://127.0.0.1:1")
    for key, value in patch.items():
        if value is None:
            raw.pop(key, None)
        elif isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    with pytest.raises(ConfigError) as err:
        build_config(raw, base=tmp_path)
    assert message in str(err.value)


def test_alertmanager_peers_and_the_new_policy_durations(tmp_path):
    cfg = build_config(base_config(tmp_path, "http://127.0.0.1:1", alertmanager={
        "url": None, "urls": ["http://am-0:9093/", "http://am-1:9093"]}, policy={"dry_run": False, "resolved_hold": "30m",
                                                                  "settle_time": 0}), base=tmp_path)
    assert cfg.alertmanager is not None and cfg.alertmanager.urls == ("http://am-0:9093", "http://am-1:9093")
    assert (cfg.policy.resolved_hold, cfg.policy.settle_time) == (1800.0, 0.0)
    defaults = build_config(base_config(tmp_path, "http://127.0.0.1:1"), base=tmp_path).policy
    assert (defaults.resolved_hold, defaults.settle_time) == (900.0, 900.0)


def test_a_settle_time_shorter_than_the_alerts_keep_firing_is_warned_about(tmp_path, capsys):
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(base_config(tmp_path, "http://127.0.0.1:1", policy={"settle_time": "5m"})))
    assert main(["check-config", str(path)]) == 0
    assert "warning: policy.settle_time: 300s is shorter than the shipped alerts' keep_firing_for" in \
        capsys.readouterr().err
    path.write_text(yaml.safe_dump(base_config(tmp_path, "http://127.0.0.1:1")))
    assert main(["check-config", str(path)]) == 0 and "warning" not in capsys.readouterr().err


def test_check_config_cli_exit_code_and_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"kubernetes": {"host": "http://x:1"}, "policy": {"rules": [
        {"name": "r", "match": {"alertname": "X"}, "ladder": ["cordon", "replace"]}]}}))
    proc = subprocess.run([sys.executable, "-m", "remediation_webhook", "check-config", str(bad)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 1
    assert "policy.rules[0].ladder[1]: replace has no executor configured" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "remediation_webhook", "--config", str(bad)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 1 and "replace has no executor" in proc.stderr


# A site directory whose sitecustomize makes the named top-level packages not installed, as in an image built
# without that cloud's extra (an import of them fails the way a missing package does).
HIDE = """
import sys
HIDDEN = set(sys.argv and __import__("os").environ["GPU_HEALTH_TEST_HIDE"].split(","))
class Hide:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.split(".")[0] in HIDDEN or name in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Hide)
"""


@pytest.mark.parametrize(("provider", "settings", "hidden", "package"), [
    ("aws", {"region": "us-east-1"}, "boto3,botocore", "boto3, botocore"),
    ("gcp", {}, "google", "google-cloud-compute, google-api-core"),
    ("azure", {}, "azure", "azure-mgmt-compute, azure-identity"),
])
def test_check_config_fails_naming_the_provider_whose_sdk_is_not_installed(tmp_path, provider, settings, hidden,
                                                                           package):
    """Found by reading the image: it installed no cloud SDK, check-config said ok, and the first replace raised
    ModuleNotFoundError in the middle of a remediation."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HIDE)
    path = tmp_path / "w.yaml"
    raw = base_config(tmp_path, "http://127.0.0.1:1", providers={provider: settings},
                      actions={"replace": {"using": provider}},
                      policy={"rules": [{"name": "r", "match": {"alertname": "X"}, "ladder": ["cordon", "replace"]}]})
    path.write_text(yaml.safe_dump(raw))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{site}:{ROOT}", "GPU_HEALTH_TEST_HIDE": hidden}
    proc = subprocess.run([sys.executable, "-m", "remediation_webhook", "check-config", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"providers.{provider}: needs the Python package {package}, which is not installed (pip install " \
           f"'gpu-health[{provider}]'" in proc.stderr
    # With the SDK there, the same file is accepted.
    env["GPU_HEALTH_TEST_HIDE"] = "nothing-hidden"
    proc = subprocess.run([sys.executable, "-m", "remediation_webhook", "check-config", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_token_file_must_hold_a_real_token(tmp_path):
    (tmp_path / "t").write_text("short\n")
    raw = base_config(tmp_path, "http://127.0.0.1:1", web={"bearer_token_file": "t"})
    with pytest.raises(ConfigError, match="web.bearer_token_file: tokens must be at least 16"):
        build_config(raw, base=tmp_path)


def test_files_that_are_not_utf8_are_refused_naming_them(tmp_path):
    (tmp_path / "t").write_bytes("a-token-of-sixteen-or-more-\u00e9\n".encode("latin-1"))
    raw = base_config(tmp_path, "http://127.0.0.1:1", web={"bearer_token_file": "t"})
    with pytest.raises(ConfigError, match="web.bearer_token_file: .*not UTF-8"):
        build_config(raw, base=tmp_path)
    config = tmp_path / "config.yaml"
    config.write_bytes("# r\u00e9sum\u00e9\njournal: {path: j.db}\n".encode("latin-1"))
    proc = subprocess.run([sys.executable, "-m", "remediation_webhook", "check-config", str(config)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 1 and "not UTF-8" in proc.stderr and "config.yaml" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("address", "expected"), [("0.0.0.0:9911", ("127.0.0.1", 9911)),
                                                    (":9911", ("127.0.0.1", 9911)),
                                                    ("127.0.0.1:9911", ("127.0.0.1", 9911)),
                                                    ("[::1]:9911", ("::1", 9911))])
def test_without_credentials_only_loopback(address, expected, caplog):
    assert effective_address(ListenerConfig(listen_address=address), "web") == expected
    assert "no authentication" in caplog.text


def test_with_credentials_the_requested_address(tmp_path):
    listener = ListenerConfig(listen_address=":9911", bearer_tokens=("x" * 20,))
    assert effective_address(listener, "web") == ("0.0.0.0", 9911)
    assert effective_address(listener, "web", "10.0.0.1:1234") == ("10.0.0.1", 1234)


def test_policy_hash_changes_with_the_policy(tmp_path):
    a = build_config(base_config(tmp_path, "http://127.0.0.1:1"), base=tmp_path)
    b = build_config(base_config(tmp_path, "http://127.0.0.1:1", safety={"per_node": {"max_attempts": 1}}),
                     base=tmp_path)
    assert a.policy_hash != b.policy_hash


def test_the_example_runs_and_listener_flags_override(tmp_path, kube):
    """The shipped example, pointed at kmock and a temp journal, starts, accepts and records a dry run."""
    import os
    import signal

    import requests

    from tests.webhook.webhook_support import alert, free_port, notification, wait_for

    kube.add_node("gpu-001")
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["kubernetes"] = {"host": kube.url}
    raw["journal"] = {"path": str(tmp_path / "j.db")}
    cfg = tmp_path / "example.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    web, admin = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "remediation_webhook", "--config", str(cfg),
                             "--web.listen-address", f"0.0.0.0:{web}", "--admin.listen-address", f"127.0.0.1:{admin}"],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True)
    try:
        def up() -> bool:
            assert proc.poll() is None
            try:
                return requests.get(f"http://127.0.0.1:{web}/readyz", timeout=1).status_code == 200
            except requests.ConnectionError:
                return False
        wait_for(up, 20, 0.05, "example receiver ready")
        r = requests.post(f"http://127.0.0.1:{web}/v1/alerts", json=notification(alert("gpu-001")), timeout=5)
        assert r.status_code == 200 and r.json()["accepted"] == 1

        def recorded() -> bool:
            items = requests.get(f"http://127.0.0.1:{admin}/v1/remediations", timeout=5).json()["remediations"]
            return bool(items) and items[0]["state"] == "DRY_RUN_RECORDED"
        wait_for(recorded, 20, 0.05, "dry run recorded")
        assert kube.calls(mutating=True) == []
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        log = proc.stderr.read() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
    assert "no authentication configured" in log  # 0.0.0.0 was asked for; loopback it is
