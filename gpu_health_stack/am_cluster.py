"""Alertmanager in HA, as production runs it: Debian's Alertmanager peers in one gossip cluster.

Each peer has its own web port, cluster port and storage; each is given every other peer with `--cluster.peer`,
and the cluster timings are set explicitly (the defaults, 15 s peer timeout and 1 m settle, suit a datacenter, not a
test). What the cluster shares by gossip is the notification log and the silences, never the alerts: Prometheus
must send every alert to every peer (`prometheus_targets`). Each peer then waits its position in the cluster times
`peer_timeout` before it notifies, and notifies only what the log says no earlier peer has sent. So one notification
goes out while the first peer lives, and when it dies the next one sends, one peer timeout later.

    cluster = AlertmanagerCluster(directory, config, peers=3)
    cluster.wait_settled()
    cluster.post_alerts(alerts)          # to every peer, as Prometheus does
    cluster.kill(0); cluster.start(0)    # a peer crashes and comes back with its storage

Used by the fleet soak (issue 16); tests/stack/test_am_cluster.py shows its behaviour on the real binary.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .procs import Proc, free_port, http_json, wait_until
from .stack import ALERTMANAGER


@dataclass(frozen=True)
class ClusterTimings:
    """The cluster flags the soak sets; production keeps Alertmanager's defaults (15s, 1m0s, 200ms)."""

    peer_timeout: str = "2s"
    settle_timeout: str = "5s"
    gossip_interval: str = "200ms"
    pushpull_interval: str = "5s"


@dataclass
class Peer:
    name: str
    web_port: int
    cluster_port: int
    proc: Proc

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"


class AlertmanagerCluster:
    def __init__(self, directory: Path, config: Mapping[str, Any], *, peers: int = 3,
                 timings: ClusterTimings | None = None, binary: str = ALERTMANAGER,
                 ports: Sequence[int] | None = None) -> None:
        """`ports`: the peers' web ports, when their URLs must be known before they start (a receiver that
        verifies against them); free ones otherwise."""
        if peers < 1:
            raise ValueError("peers must be at least 1")
        if shutil.which(binary) is None:
            raise FileNotFoundError(f"{binary}: install Debian's prometheus-alertmanager")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.timings = timings or ClusterTimings()
        self.config_path = self.dir / "alertmanager.yml"
        self.config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
        if ports is not None and len(ports) != peers:
            raise ValueError(f"ports: {peers} expected, got {len(ports)}")
        webs = list(ports) if ports is not None else [free_port() for _ in range(peers)]
        pairs = [(web, free_port()) for web in webs]
        self.peers: list[Peer] = []
        try:
            for i, (web, cluster) in enumerate(pairs):
                others = [f"127.0.0.1:{c}" for j, (_, c) in enumerate(pairs) if j != i]
                proc = Proc(f"alertmanager-{i}", self._argv(i, web, cluster, others), self.dir)
                self.peers.append(Peer(f"alertmanager-{i}", web, cluster, proc))
            for peer in self.peers:
                peer.proc.wait_http(f"{peer.url}/-/ready")
        except BaseException:
            self.close()
            raise

    def _argv(self, i: int, web: int, cluster: int, others: Sequence[str]) -> list[str]:
        t = self.timings
        return [
            ALERTMANAGER, f"--config.file={self.config_path}", f"--storage.path={self.dir / f'data-{i}'}",
            f"--web.listen-address=127.0.0.1:{web}", f"--web.external-url=http://127.0.0.1:{web}",
            f"--cluster.listen-address=127.0.0.1:{cluster}", f"--cluster.advertise-address=127.0.0.1:{cluster}",
            *(f"--cluster.peer={o}" for o in others),
            f"--cluster.peer-timeout={t.peer_timeout}", f"--cluster.settle-timeout={t.settle_timeout}",
            f"--cluster.gossip-interval={t.gossip_interval}", f"--cluster.pushpull-interval={t.pushpull_interval}",
            "--cluster.reconnect-interval=1s", "--log.level=warn",
        ]

    @property
    def urls(self) -> list[str]:
        return [p.url for p in self.peers]

    def prometheus_targets(self) -> list[str]:
        """`alerting.alertmanagers[].static_configs[].targets` for Prometheus: every peer."""
        return [f"127.0.0.1:{p.web_port}" for p in self.peers]

    def status(self, i: int) -> dict[str, Any]:
        return dict(http_json(f"{self.peers[i].url}/api/v2/status"))

    def members(self, i: int) -> set[str]:
        """The cluster members peer `i` sees as up (their cluster addresses)."""
        cluster = self.status(i).get("cluster") or {}
        return {str(p.get("address")) for p in cluster.get("peers") or []}

    def first(self) -> int:
        """The peer that notifies first: Alertmanager orders peers by their cluster name (a random id, not by
        index), and each waits its position times the peer timeout."""
        live = [i for i, p in enumerate(self.peers) if p.proc.alive]
        return min(live, key=lambda i: str((self.status(i).get("cluster") or {}).get("name")))

    def wait_settled(self, timeout: float = 60.0) -> None:
        """Every live peer sees every live peer and says its cluster is ready."""
        live = [i for i, p in enumerate(self.peers) if p.proc.alive]
        want = {f"127.0.0.1:{self.peers[i].cluster_port}" for i in live}

        def settled() -> bool:
            return all(self.members(i) == want and (self.status(i).get("cluster") or {}).get("status") == "ready"
                       for i in live)

        wait_until(settled, timeout, f"Alertmanager peers {live} to see each other", interval=0.2)

    def post_alerts(self, alerts: list[dict[str, Any]], peers: Sequence[int] | None = None) -> None:
        """POST /api/v2/alerts to each live peer (all by default), as Prometheus sends to every peer."""
        for i in peers if peers is not None else range(len(self.peers)):
            if self.peers[i].proc.alive:
                http_json(f"{self.peers[i].url}/api/v2/alerts", alerts, "POST")

    def alerts(self, i: int) -> list[dict[str, Any]]:
        return list(http_json(f"{self.peers[i].url}/api/v2/alerts"))

    def silences(self, i: int) -> list[dict[str, Any]]:
        return list(http_json(f"{self.peers[i].url}/api/v2/silences"))

    def add_silence(self, i: int, silence: Mapping[str, Any]) -> str:
        return str(http_json(f"{self.peers[i].url}/api/v2/silences", dict(silence), "POST")["silenceID"])

    def kill(self, i: int) -> None:
        """SIGKILL peer `i` (a crash: it saves nothing)."""
        self.peers[i].proc.kill()

    def start(self, i: int) -> None:
        """Start peer `i` again on its ports and storage; it rejoins through the others."""
        peer = self.peers[i]
        peer.proc.start()
        peer.proc.wait_http(f"{peer.url}/-/ready")

    def close(self) -> None:
        for peer in self.peers:
            peer.proc.stop()
