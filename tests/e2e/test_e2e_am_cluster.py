"""Alertmanager in HA on Debian's binary (gpu_health_stack/am_cluster.py): three peers in one gossip cluster send one
notification per group, share silences, and fail over to the next peer when the first dies, one peer timeout later.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from gpu_health_stack.am_cluster import AlertmanagerCluster, ClusterTimings
from gpu_health_stack.procs import wait_until
from gpu_health_stack.stack import missing_binaries

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif("prometheus-alertmanager" in " ".join(missing_binaries()),
                       reason="needs Debian's prometheus-alertmanager (.ci/run installs it)"),
]
PEER_TIMEOUT = 2.0


class Receiver:
    """A webhook receiver on loopback that records each notification: (arrival time, alertnames in it)."""

    def __init__(self) -> None:
        self.received: list[tuple[float, list[str]]] = []
        lock = threading.Lock()
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    received.append((time.monotonic(), [a["labels"]["alertname"] for a in body["alerts"]]))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def of(self, alertname: str) -> list[float]:
        return [t for t, names in list(self.received) if alertname in names]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[AlertmanagerCluster, Receiver]]:
    receiver = Receiver()
    config = {
        "route": {"receiver": "hook", "group_by": ["alertname"], "group_wait": "0s", "group_interval": "1s",
                  "repeat_interval": "1h"},
        "receivers": [{"name": "hook", "webhook_configs": [{"url": receiver.url, "send_resolved": False}]}],
    }
    am = AlertmanagerCluster(tmp_path, config, peers=3, timings=ClusterTimings(peer_timeout=f"{PEER_TIMEOUT:g}s"))
    try:
        am.wait_settled()
        yield am, receiver
    finally:
        am.close()
        receiver.close()


def _alert(name: str) -> dict[str, Any]:
    return {"labels": {"alertname": name, "node": "n1", "severity": "critical"},
            "startsAt": datetime.now(UTC).isoformat(), "endsAt": (datetime.now(UTC) + timedelta(hours=1)).isoformat()}


def _notified(receiver: Receiver, name: str, posted: float, timeout: float = 20.0) -> float:
    """Seconds from the post to the first notification of `name`."""
    first: Callable[[], list[float]] = lambda: receiver.of(name)  # noqa: E731
    return wait_until(first, timeout, f"a notification of {name}")[0] - posted


def test_three_peers_notify_once_share_silences_and_fail_over(cluster: tuple[AlertmanagerCluster, Receiver],
                                                             report: Callable[[str], None]) -> None:
    am, receiver = cluster
    assert all(len(am.members(i)) == 3 for i in range(3))

    # Every peer gets the alert, as from Prometheus; the notification log makes it one notification.
    posted = time.monotonic()
    am.post_alerts([_alert("GPUHealthy")])
    healthy = _notified(receiver, "GPUHealthy", posted)
    time.sleep(2 * PEER_TIMEOUT + 1)  # the last peer waits two peer timeouts: it would have sent by now
    assert len(receiver.of("GPUHealthy")) == 1

    # A silence made on one peer reaches the others by gossip.
    now = datetime.now(UTC)
    silence = am.add_silence(1, {"matchers": [{"name": "alertname", "value": "GPUSilenced", "isRegex": False}],
                                 "startsAt": now.isoformat(), "endsAt": (now + timedelta(hours=1)).isoformat(),
                                 "createdBy": "test", "comment": "maintenance"})
    wait_until(lambda: all(any(s["id"] == silence for s in am.silences(i)) for i in (0, 2)), 10, "the silence gossiped")
    am.post_alerts([_alert("GPUSilenced")])

    # The peer that notifies first dies: the next one sends, about one peer timeout later.
    first = am.first()
    am.kill(first)
    posted = time.monotonic()
    am.post_alerts([_alert("GPUFailover")])
    failover = _notified(receiver, "GPUFailover", posted)
    time.sleep(2 * PEER_TIMEOUT + 1)
    assert len(receiver.of("GPUFailover")) == 1
    assert PEER_TIMEOUT - 0.5 < failover < 2 * PEER_TIMEOUT + 3, failover
    assert receiver.of("GPUSilenced") == []  # silenced on every peer

    # It comes back with its storage and rejoins; still one notification per group.
    am.start(first)
    am.wait_settled()
    posted = time.monotonic()
    am.post_alerts([_alert("GPUAfterRejoin")])
    _notified(receiver, "GPUAfterRejoin", posted)
    time.sleep(2 * PEER_TIMEOUT + 1)
    assert len(receiver.of("GPUAfterRejoin")) == 1
    report(f"alertmanager HA (3 peers, peer timeout {PEER_TIMEOUT:g}s): notified in {healthy:.2f}s; "
           f"with the first peer killed, in {failover:.2f}s")
