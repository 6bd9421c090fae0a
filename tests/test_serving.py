"""Both services against slow and flooding clients, as real processes on loopback (gpu_health_common/serving.py,
gpu_health_common/webconfig.py): idle and half-sent requests are closed at the read timeout, connections over the
cap (or one client's share of it) are closed at accept, a client that stops reading its response is dropped, a body sent a byte at a time gets 408, running out of file descriptors is one log line a
minute and the service recovers, the open-file limit is raised at start, and a flood of wrong passwords from one
client neither delays nor locks out the right password from another."""

from __future__ import annotations

import ast
import asyncio
import base64
import http.client
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bcrypt
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Service:
    """A service process on 127.0.0.1:port; stderr (its log) is kept."""

    def __init__(self, argv: list[str], port: int, tmp: Path, *, nofile: tuple[int, int] | None = None) -> None:
        self.port = port
        self.log = tmp / f"service-{port}.log"
        self._log = open(self.log, "wb")  # noqa: SIM115 - closed in stop()

        def limits() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, nofile)

        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=limits,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if self.get("/healthz", timeout=1)[0] in (200, 401):  # up (behind basic auth, for the exporter)
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, "service did not start:\n" + self.log.read_text()
            time.sleep(0.1)

    def get(self, path: str, *, headers: dict[str, str] | None = None, source: str = "127.0.0.1",
            timeout: float = 5) -> tuple[int, float]:
        """(status, seconds taken)."""
        t0 = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout, source_address=(source, 0))
        try:
            conn.request("GET", path, headers=headers or {})
            resp = conn.getresponse()
            resp.read()
            return resp.status, time.monotonic() - t0
        finally:
            conn.close()

    def sockets(self, n: int, first: bytes = b"") -> list[socket.socket]:
        out = []
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            if first:
                s.sendall(first)
            out.append(s)
        return out

    def stop(self) -> str:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()
        return self.log.read_text(errors="replace")


def _closed_by_server(s: socket.socket, within: float) -> bool:
    s.settimeout(within)
    try:
        return s.recv(1) == b""
    except (TimeoutError, socket.timeout):
        return False
    except ConnectionResetError:
        return True


def exporter(tmp: Path, *extra: str, **kw: object) -> Service:
    port = _port()
    return Service([sys.executable, "-m", "exporter", "--backend", "sim", "--web.listen-address", f"127.0.0.1:{port}",
                    "--state-dir", "", "--xid.source", "none", "--xid.nvml-events", "off", "--log.level", "info",
                    *extra], port, tmp, **kw)  # type: ignore[arg-type]


def webhook(tmp: Path, *, read_timeout: str = "10s", max_connections: int = 1024,
            max_connections_per_client: int = 256, **kw: object) -> Service:
    port, admin = _port(), _port()
    cfg = {"web": {"listen_address": f"127.0.0.1:{port}", "read_timeout": read_timeout,
                   "max_connections": max_connections, "max_connections_per_client": max_connections_per_client},
           "admin": {"listen_address": f"127.0.0.1:{admin}"}, "journal": {"path": str(tmp / "journal.db")},
           "inventory": {"kind": "kubernetes"}, "kubernetes": {"host": "http://127.0.0.1:9"}}
    (tmp / "webhook.yaml").write_text(yaml.safe_dump(cfg))
    return Service([sys.executable, "-m", "remediation_webhook", "--config", str(tmp / "webhook.yaml")], port, tmp,
                   **kw)  # type: ignore[arg-type]


SERVICES: dict[str, Callable[..., Service]] = {
    "exporter": lambda tmp, rt, cap, **kw: exporter(tmp, "--web.read-timeout", rt, "--web.max-connections", str(cap),
                                                   **kw),
    "webhook": lambda tmp, rt, cap, **kw: webhook(tmp, read_timeout=rt, max_connections=cap, **kw),
}


@pytest.fixture(params=sorted(SERVICES))
def service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Service]]:
    started: list[Service] = []

    def make(read_timeout: str = "1s", max_connections: int = 40, **kw: object) -> Service:
        svc = SERVICES[request.param](tmp_path, read_timeout, max_connections, **kw)
        started.append(svc)
        return svc

    yield make
    for svc in started:
        svc.stop()


def test_idle_and_half_sent_requests_are_closed_at_the_read_timeout(service: Callable[..., Service]) -> None:
    svc = service(read_timeout="1s", max_connections=100)
    idle = svc.sockets(20)
    half = svc.sockets(20, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    assert svc.get("/healthz")[0] == 200  # served meanwhile
    t0 = time.monotonic()
    assert all(_closed_by_server(s, 5) for s in idle + half)
    assert time.monotonic() - t0 < 4  # about the read timeout, not the 5 s the test would wait
    for s in idle + half:
        s.close()


def test_connections_over_the_cap_are_closed_at_once_and_the_service_keeps_serving(
        service: Callable[..., Service]) -> None:
    svc = service(read_timeout="3s", max_connections=20)
    held = svc.sockets(20)
    time.sleep(0.3)  # accepted and registered
    over = svc.sockets(10)
    assert all(_closed_by_server(s, 1) for s in over)  # closed at accept, long before the read timeout
    for s in held:
        s.close()
    time.sleep(0.3)
    assert svc.get("/healthz")[0] == 200
    for s in over:
        s.close()


def test_a_body_sent_a_byte_at_a_time_gets_408(tmp_path: Path) -> None:
    svc = webhook(tmp_path, read_timeout="1s")
    try:
        s = socket.create_connection(("127.0.0.1", svc.port), timeout=5)
        s.sendall(b"POST /v1/alerts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"version\"")
        t0 = time.monotonic()
        answer = s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 3
        s.close()
    finally:
        log = svc.stop()
    assert "Traceback" not in log


@pytest.mark.parametrize("which", sorted(SERVICES))
def test_out_of_file_descriptors_is_one_log_line_and_the_service_recovers(tmp_path: Path, which: str) -> None:
    svc = SERVICES[which](tmp_path, "1s", 1024, nofile=(128, 128))
    try:
        held = []
        for _ in range(200):  # more than the process may open: accepts fail with EMFILE
            try:
                held.append(socket.create_connection(("127.0.0.1", svc.port), timeout=2))
            except OSError:
                break
        time.sleep(3)  # accept retries about once a second meanwhile
        for s in held:
            s.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                if svc.get("/healthz", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the service did not recover"
            time.sleep(0.2)
    finally:
        log = svc.stop()
    assert log.count("out of file descriptors") == 1, log[-3000:]
    assert "Traceback" not in log and "socket.accept() out of system resource" not in log


def test_the_open_file_limit_is_raised_to_the_hard_limit_at_start(tmp_path: Path) -> None:
    svc = exporter(tmp_path, nofile=(256, 4096))
    try:
        limits = Path(f"/proc/{svc.proc.pid}/limits").read_text()
    finally:
        log = svc.stop()
    line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
    assert line.split()[3:5] == ["4096", "4096"]
    assert "open-file limit" in log and "soft_before=256" in log


@pytest.mark.parametrize("which", sorted(SERVICES))
def test_a_flood_of_wrong_passwords_does_not_lock_out_the_right_one(tmp_path: Path, which: str) -> None:
    """200 wrong passwords at once from 127.0.0.1 (bcrypt cost 10); meanwhile the right password from 127.0.0.2,
    uncached (a fresh start), gets in within a second; most of the flood is refused at once (429)."""
    hashed = bcrypt.hashpw(b"right", bcrypt.gensalt(rounds=10)).decode()
    (tmp_path / "web.yml").write_text(f"basic_auth_users:\n  prom: '{hashed}'\n")
    if which == "exporter":
        svc = exporter(tmp_path, "--web.config.file", str(tmp_path / "web.yml"))
        path = "/metrics"
    else:
        svc = webhook(tmp_path)
        cfg = yaml.safe_load((tmp_path / "webhook.yaml").read_text())
        cfg["web"]["config_file"] = str(tmp_path / "web.yml")
        (tmp_path / "webhook.yaml").write_text(yaml.safe_dump(cfg))
        svc.stop()
        svc = Service([sys.executable, "-m", "remediation_webhook", "--config", str(tmp_path / "webhook.yaml")],
                      svc.port, tmp_path)
        path = "/metrics"

    def auth(password: bytes) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(b"prom:" + password).decode()}

    try:
        with ThreadPoolExecutor(64) as pool:
            flood = [pool.submit(svc.get, path, headers=auth(b"wrong-%d" % i), timeout=30) for i in range(200)]
            time.sleep(0.3)  # the flood is in
            status, took = svc.get(path, headers=auth(b"right"), source="127.0.0.2", timeout=10)
            answers = [f.result()[0] for f in flood]
    finally:
        svc.stop()
    assert status == 200 and took < 1.0, took
    assert set(answers) <= {401, 429} and answers.count(429) > 150


@pytest.mark.parametrize("which", sorted(SERVICES))
def test_one_client_cannot_take_every_connection(tmp_path: Path, which: str) -> None:
    """Past the per-client cap, 127.0.0.1's new connections are closed at accept; 127.0.0.2 is still served."""
    if which == "exporter":
        svc = exporter(tmp_path, "--web.max-connections-per-client", "10")
    else:
        svc = webhook(tmp_path, max_connections_per_client=10)
    try:
        held = svc.sockets(10)
        time.sleep(0.3)
        over = svc.sockets(5)
        assert all(_closed_by_server(s, 1) for s in over)
        assert svc.get("/healthz", source="127.0.0.2")[0] == 200
        for s in held[:3]:
            s.close()
        time.sleep(0.3)
        assert svc.get("/healthz")[0] == 200  # room again for 127.0.0.1
        for s in held[3:] + over:
            s.close()
    finally:
        log = svc.stop()
    assert "per-client connection cap" in log and "client=127.0.0.1" in log


async def test_a_client_that_stops_reading_its_response_is_disconnected() -> None:
    """A response larger than the kernel's socket buffers (up to 4 MiB each way here) to a client that reads
    none of it: the rest waits in the process; past a read timeout without progress the connection is dropped."""
    from aiohttp import web

    from gpu_health_common.serving import Counters, Limits, bound_port, serve

    size = 24 << 20

    async def big(_: web.Request) -> web.Response:
        return web.Response(body=b"x" * size)

    app = web.Application()
    app.router.add_get("/big", big)
    counters = Counters()
    runner = await serve(app, "127.0.0.1", 0, limits=Limits(read_timeout=0.5), counters=counters)
    stuck = socket.socket()
    try:
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await asyncio.to_thread(stuck.connect, ("127.0.0.1", bound_port(runner)))
        stuck.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        for _ in range(50):  # two checks, half a second apart, after the buffer filled
            await asyncio.sleep(0.1)
            if counters.stalled_writes:
                break
        assert counters.stalled_writes == 1

        def drain() -> int:
            got = 0
            stuck.settimeout(5)
            try:
                while chunk := stuck.recv(1 << 20):
                    got += len(chunk)
            except ConnectionResetError:
                pass
            return got

        assert await asyncio.to_thread(drain) < size  # dropped: a live connection would deliver it all
    finally:
        stuck.close()
        await runner.cleanup()


def test_hostile_load_benchmark_runs_short() -> None:
    """benchmarks/hostile_load.py, small: both services keep answering the legitimate client during the idle
    connections and the flood, and the 1 MiB deliveries are all answered (200, or 503 past the budget)."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hostile_load.py"), "--idle", "100",
                             "--seconds", "3", "--flood-threads", "2", "--big", "12"],
                            cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1].startswith("hostile_legit_p99_ms=") and float(lines[-1].split("=")[1]) > 0
    for name in ("exporter", "webhook"):
        legit = next(x for x in lines if x.startswith(f"{name}: legit"))
        assert ", 0 errors;" in legit, legit
        held = next(x for x in lines if x.startswith(f"{name}: idle"))
        assert int(held.split()[2]) >= 95, held  # the idle connections were in place meanwhile
    big = next(x for x in lines if "concurrent deliveries" in x)
    answers = ast.literal_eval(big.split("answers ")[1].split("}")[0] + "}")
    assert sum(answers.values()) == 12 and set(answers) <= {200, 503}, big


def test_the_exporter_says_listening_only_once_the_port_is_its_own(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "exporter", "--backend", "sim", "--web.listen-address",
                                 f"127.0.0.1:{port}", "--state-dir", "", "--xid.source", "none",
                                 "--xid.nvml-events", "off", "--log.level", "info"],
                                cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 1, result.stderr
    assert "cannot listen" in result.stderr and f"127.0.0.1:{port}" in result.stderr
    assert "msg=listening" not in result.stderr
    svc = exporter(tmp_path)  # and on a free port it does, with the port it got
    log = svc.stop()
    assert f"msg=listening address=127.0.0.1:{svc.port}" in log
