"""The receiver as a subprocess, SIGKILLed between accept and action and between intent and completion:
after a restart every accepted remediation completes, none twice."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

from tests.webhook.webhook_support import ROOT, FakeAlertmanagerServer, alert, free_port, notification, wait_for

TOKEN = "crash-test-token-0123456789"
ADMIN_TOKEN = "crash-test-admin-token-0123"


@pytest.fixture(name="fake_am")
def _fake_am():
    server = FakeAlertmanagerServer()
    yield server
    server.close()


def _config(tmp_path: Path, kube_url: str, am_url: str) -> tuple[Path, int, int]:
    web, admin = free_port(), free_port()
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "admin-token").write_text(ADMIN_TOKEN + "\n")
    cfg = {
        "web": {"listen_address": f"127.0.0.1:{web}", "bearer_token_file": "token"},
        "admin": {"listen_address": f"127.0.0.1:{admin}", "bearer_token_file": "admin-token"},
        "journal": {"path": "journal.db"},
        "alertmanager": {"url": am_url},
        "inventory": {"kind": "kubernetes"},
        "kubernetes": {"host": kube_url},
        "policy": {"dry_run": False, "rules": [{"name": "gpu", "match_re": {"alertname": "GPU.*"},
                                                "ladder": ["cordon"]}]},
        "safety": {"fleet_cap": {"max_nodes": 10, "max_percent": 100}, "breaker": {"max_percent": 100}},
        "engine": {"tick": "100ms"},
    }
    path = tmp_path / "webhook.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, web, admin


def _start(path: Path, web: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "remediation_webhook", "--config", str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def up() -> bool:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "exited"
        try:
            return requests.get(f"http://127.0.0.1:{web}/healthz", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False
    wait_for(up, 20, 0.05, "receiver to start")
    return proc


def _kill(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    if proc.stderr:
        proc.stderr.close()


def test_sigkill_between_accept_and_action_and_between_intent_and_completion(tmp_path, kube, fake_am):
    kube.add_node("gpu-a")
    kube.add_node("gpu-b")
    path, web, admin = _config(tmp_path, kube.url, fake_am.url)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    a, b = alert("gpu-a"), alert("gpu-b")
    fake_am.alerts = [a, b]
    resolving, release_a = kube.gate("get", "nodes", "gpu-a")  # accepted, not yet acted on
    patching, release_b = kube.gate("patch", "nodes", "gpu-b")  # intent written, side effect in flight

    proc = _start(path, web)
    try:
        for x in (a, b):
            r = requests.post(f"http://127.0.0.1:{web}/v1/alerts", json=notification(x), headers=auth, timeout=5)
            assert r.status_code == 200 and r.json()["accepted"] == 1
        assert resolving.wait(10) and patching.wait(10)
    finally:
        _kill(proc)
    release_a()
    release_b()

    db = sqlite3.connect(tmp_path / "journal.db")
    assert dict(db.execute("SELECT node, state FROM remediation")) == {"gpu-a": "PLANNED", "gpu-b": "RUNNING"}
    assert db.execute("SELECT state FROM step").fetchall() == [("INTENT",)]
    db.close()
    assert kube.node("gpu-b")["spec"]["unschedulable"] is True  # the PATCH landed before the kill

    proc = _start(path, web)
    try:
        def done() -> bool:
            r = requests.get(f"http://127.0.0.1:{admin}/v1/remediations",
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=5)
            return sorted(x["state"] for x in r.json()["remediations"]) == ["SUCCEEDED", "SUCCEEDED"]
        wait_for(done, 20, 0.05, "both remediations to complete")
        # a re-delivery after the restart is a duplicate, not new work
        r = requests.post(f"http://127.0.0.1:{web}/v1/alerts", json=notification(a, b), headers=auth, timeout=5)
        assert r.json()["duplicates"] == 2
        metrics = requests.get(f"http://127.0.0.1:{web}/metrics", headers=auth, timeout=5).text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        if proc.stderr:
            proc.stderr.close()

    assert kube.cordoned() == ["gpu-a", "gpu-b"]
    unschedulable_patches = [c for c in kube.calls(mutating=True)
                             if c[0] == "PATCH" and (c[2] or {}).get("spec", {}).get("unschedulable")]
    assert sorted(c[1] for c in unschedulable_patches) == ["/api/v1/nodes/gpu-a", "/api/v1/nodes/gpu-b"]
    db = sqlite3.connect(tmp_path / "journal.db")
    steps = db.execute("SELECT r.node, s.state, s.detail FROM step s JOIN remediation r ON r.id=s.remediation_id "
                       "ORDER BY r.node, s.seq").fetchall()
    db.close()
    assert steps == [("gpu-a", "SUCCEEDED", "cordoned"),
                     ("gpu-b", "SUCCEEDED", "reconciled after a restart: already done")]
    for node in ("gpu-a", "gpu-b"):
        line = f'gpu_remediation_actions_total{{action="cordon",gpu="",node="{node}",result="success",uuid=""}} 1.0'
        assert line in metrics
