"""The real exporter over HTTP, as a subprocess on the simulator, with one GPU's NVML call hanging."""

from __future__ import annotations

import gzip
import time
from dataclasses import dataclass, field

import pytest
import requests

from exporter.render import CONTENT_TYPE, Snapshot
from exporter.server import create_app

HUNG_GPU = "5"
HANG = {
    "gpus": 8,
    "faults": [{"kind": "hang", "gpu": int(HUNG_GPU), "call": "nvmlDeviceGetPowerUsage", "at": "2s"}],
}


@pytest.fixture(scope="module")
def exporter(tmp_path_factory, helpers):
    proc = helpers.start_exporter(
        tmp_path_factory.mktemp("http"), "--collect-interval", "500ms", "--collect-timeout", "200ms", sim=HANG
    )
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def session():
    with requests.Session() as s:
        yield s


def timed_get(session, url, **kwargs):
    started = time.perf_counter()
    resp = session.get(url, timeout=5, **kwargs)
    return resp, time.perf_counter() - started


def test_metrics_serves_all_gpus(exporter, helpers, session):
    resp = session.get(exporter.url + "/metrics", headers={"Accept-Encoding": "identity"}, timeout=5)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == CONTENT_TYPE
    assert "Content-Encoding" not in resp.headers
    text = resp.text
    assert helpers.value(text, "gpu_devices_visible") == 8
    assert helpers.value(text, "gpu_nvml_up") == 1
    assert set(helpers.per_gpu(text, "gpu_info")) == {str(i) for i in range(8)}
    assert set(helpers.per_gpu(text, "gpu_temperature_celsius")) == {str(i) for i in range(8)}
    assert helpers.per_gpu(text, "gpu_nvlink_links_up") == {str(i): 18 for i in range(8)}
    success = {s.labels["collector"]: s.value for s in helpers.select(text, "gpu_exporter_collector_success")}
    assert set(success) == helpers.default_collectors()
    assert set(success.values()) == {1}


def test_gzip_when_asked(exporter, helpers, session):
    resp = session.get(exporter.url + "/metrics", headers={"Accept-Encoding": "gzip"}, timeout=5, stream=True)
    assert resp.status_code == 200
    assert resp.headers["Content-Encoding"] == "gzip"
    raw = resp.raw.read(decode_content=False)
    assert raw[:2] == b"\x1f\x8b"
    text = gzip.decompress(raw).decode()
    plain = session.get(exporter.url + "/metrics", headers={"Accept-Encoding": "identity"}, timeout=5).text
    assert len(raw) < len(text) / 4
    assert {s.name for s in helpers.parse_samples(text)} == {s.name for s in helpers.parse_samples(plain)}
    series = lambda t: {(s.name, tuple(sorted(s.labels.items()))) for s in helpers.parse_samples(t)}  # noqa: E731
    assert series(text) == series(plain)


def test_scrapes_stay_fast_while_a_gpu_hangs(exporter, helpers, session):
    url = exporter.url + "/metrics"
    latencies: list[float] = []

    def hung_gpu_stale():
        resp, took = timed_get(session, url)
        assert resp.status_code == 200
        latencies.append(took)
        stale = helpers.value(resp.text, "gpu_collection_stale", gpu=HUNG_GPU) == 1
        # The stuck call is counted a cycle after the one that missed the deadline (see test_exp_failures).
        stuck = helpers.value(resp.text, "gpu_nvml_stuck_calls_total", gpu=HUNG_GPU) >= 1
        return resp.text if stale and stuck else None

    text = helpers.wait_for(hung_gpu_stale, 15, f"GPU {HUNG_GPU} to be reported stale and stuck", interval=0.05)
    stale = helpers.per_gpu(text, "gpu_collection_stale")
    assert {g for g, v in stale.items() if v} == {HUNG_GPU}

    # While the call stays hung, every scrape answers quickly and the other GPUs keep being collected.
    stamps = helpers.per_gpu(text, "gpu_collection_last_success_timestamp_seconds")

    def others_advanced():
        resp, took = timed_get(session, url)
        latencies.append(took)
        now = helpers.per_gpu(resp.text, "gpu_collection_last_success_timestamp_seconds")
        others = all(now[g] > stamps[g] for g in now if g != HUNG_GPU)
        return resp.text if others else None

    later = helpers.wait_for(others_advanced, 10, "the other GPUs to be collected again", interval=0.05)
    assert helpers.value(later, "gpu_collection_stale", gpu=HUNG_GPU) == 1
    assert helpers.per_gpu(later, "gpu_collection_last_success_timestamp_seconds")[HUNG_GPU] == stamps[HUNG_GPU]
    for _ in range(10):
        resp, took = timed_get(session, url)
        assert resp.status_code == 200
        latencies.append(took)
    assert len(latencies) >= 12
    assert max(latencies) < 0.1, sorted(latencies)[-5:]

    # The exporter itself is fine: a hung GPU is reported in metrics, not by failing the liveness probe.
    health = session.get(exporter.url + "/healthz", timeout=5)
    assert health.status_code == 200


def test_status_page_lists_the_gpus(exporter, helpers, session):
    resp = session.get(exporter.url + "/", timeout=5)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/html")
    page = resp.text
    metrics = session.get(exporter.url + "/metrics", timeout=5).text
    for info in helpers.select(metrics, "gpu_info"):
        assert info.labels["uuid"] in page
        assert info.labels["pci_bus_id"] in page
    assert page.count("<tr class=") == 8
    assert "NVIDIA H100 80GB HBM3" in page
    assert "8 of 8 expected GPUs visible" in page
    assert 'href="/metrics"' in page


def test_unknown_path_is_404(exporter, session):
    assert session.get(exporter.url + "/nope", timeout=5).status_code == 404
    assert session.get(exporter.url + "/metrics/extra", timeout=5).status_code == 404


def test_sigterm_stops_the_exporter_despite_the_hung_call(exporter):
    # Last in this module: it ends the shared exporter.
    started = time.monotonic()
    code = exporter.stop()
    assert time.monotonic() - started < 5
    assert code == 0, exporter.stderr()


# --- the aiohttp app on its own ----------------------------------------------------------------


@dataclass
class FakeSource:
    snapshot: Snapshot = field(default_factory=Snapshot.empty)
    last_cycle_monotonic: float = 0.0


async def _client(source, **kwargs):
    from aiohttp.test_utils import TestClient, TestServer

    app = create_app(source, telemetry_path=kwargs.pop("telemetry_path", "/metrics"), interval=5.0, timeout=1.0)
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


async def test_healthz_503_when_the_loop_stopped_publishing():
    source = FakeSource(last_cycle_monotonic=time.monotonic() - 3600)
    client = await _client(source)
    try:
        resp = await client.get("/healthz")
        assert resp.status == 503
        assert "has not published" in await resp.text()
        # Fresh again: healthy.
        source.last_cycle_monotonic = time.monotonic()
        resp = await client.get("/healthz")
        assert resp.status == 200
    finally:
        await client.close()


async def test_healthz_503_before_the_first_cycle():
    client = await _client(FakeSource())
    try:
        assert (await client.get("/healthz")).status == 503
    finally:
        await client.close()


async def test_app_serves_the_snapshot_plain_and_gzipped():
    body = b"# HELP x X.\n# TYPE x gauge\nx 1.0\n" * 50
    source = FakeSource(Snapshot(body=body, created=1.0, gpus=(), fleet=None), time.monotonic())
    client = await _client(source, telemetry_path="/custom")
    try:
        resp = await client.get("/custom", headers={"Accept-Encoding": "identity"})
        assert resp.status == 200
        assert await resp.read() == body
        assert "Content-Encoding" not in resp.headers
        resp = await client.get("/custom", headers={"Accept-Encoding": "gzip, deflate"}, auto_decompress=False)
        assert resp.headers["Content-Encoding"] == "gzip"
        assert gzip.decompress(await resp.read()) == body
        assert (await client.get("/metrics")).status == 404
        page = await (await client.get("/")).text()
        assert "NVML not available" in page
        assert 'href="/custom"' in page
    finally:
        await client.close()


async def test_gzip_refused_with_q0_is_not_used():
    body = b"x 1.0\n" * 100
    client = await _client(FakeSource(Snapshot(body=body, created=1.0, gpus=(), fleet=None), time.monotonic()))
    try:
        resp = await client.get("/metrics", headers={"Accept-Encoding": "gzip;q=0, identity"}, auto_decompress=False)
        assert "Content-Encoding" not in resp.headers
        assert await resp.read() == body
        resp = await client.get("/metrics", headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
        assert "Accept-Encoding" in resp.headers.get("Vary", "")
    finally:
        await client.close()
