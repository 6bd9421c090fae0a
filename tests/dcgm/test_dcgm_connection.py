"""A lost or stalled host engine: metrics keep coming from the last snapshot, reconnects are counted,
collection never waits past the deadline, and no GPU is reported lost for it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pynvml
import pytest

from exporter.backends.dcgm import DcgmConnection, DcgmUnavailable, acquire, load_bindings, release

FAKE = Path(__file__).resolve().parents[1] / "fakes" / "dcgm_bindings"


def _readings(text: str) -> dict[str, float]:
    """Per-GPU NVML-collector samples (not the DCGM or exporter-internal ones), by series."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or line.startswith(("gpu_dcgm_", "gpu_exporter_", "gpu_collection_", "gpu_nvml_")):
            continue
        series, _, val = line.rpartition(" ")
        out[series] = float(val)
    return out


def test_disconnect_mid_run_keeps_last_snapshot_and_counts_the_reconnect(make_node, engine, h):
    node = make_node({"gpus": 2}, address="localhost:5555")
    node.cycle()
    before = node.cycle(advance=30)
    assert h.value(before, "gpu_dcgm_connected") == 1
    updated = h.value(before, "gpu_dcgm_last_update_timestamp_seconds", gpu="0")

    engine.disconnect()
    during = node.cycle(advance=30)
    # Every NVML family is still there, with the values DCGM last gave.
    assert _readings(during) == _readings(before)
    assert h.value(during, "gpu_dcgm_connected") == 0
    assert h.value(during, "gpu_dcgm_connection_failures_total") >= 1
    assert h.value(during, "gpu_dcgm_last_update_timestamp_seconds", gpu="0") == updated
    assert {s.value for s in h.samples(during, "gpu_lost")} == {0}  # a host engine is not a GPU
    assert {s.value for s in h.samples(during, "gpu_exporter_collector_success")} == {1}
    assert h.value(during, "gpu_dcgm_reconnects_total") == 0

    later = node.cycle(advance=30)  # still down: reconnects are tried (with backoff), values still served
    assert _readings(later) == _readings(before)
    assert h.value(later, "gpu_dcgm_connected") == 0

    engine.restore()
    after = node.cycle(advance=60)
    assert h.value(after, "gpu_dcgm_connected") == 1
    assert h.value(after, "gpu_dcgm_reconnects_total") == 1
    assert h.value(after, "gpu_dcgm_last_update_timestamp_seconds", gpu="0") == node.wall()
    # The new session's health watches are armed by this cycle's check: status is back on the next.
    assert h.families(after) == h.families(before) - {"gpu_dcgm_health_status"}
    assert h.families(node.cycle(advance=30)) == h.families(before)


def test_values_older_than_max_staleness_are_dropped(make_node, engine, h):
    node = make_node({"gpus": 1}, address="localhost:5555")
    node.cycle()
    engine.disconnect()
    node.nvml.max_staleness = 100
    text = node.cycle(advance=60)
    assert len(h.samples(text, "gpu_temperature_celsius")) == 1
    text = node.cycle(advance=60)  # 120 s without DCGM: absent rather than stale forever
    assert h.samples(text, "gpu_temperature_celsius") == []
    assert h.value(text, "gpu_exporter_collector_success", collector="thermal") == 0
    assert {s.value for s in h.samples(text, "gpu_lost")} == {0}


def test_stalled_host_engine_does_not_stall_collection(make_node, engine, h):
    node = make_node({"gpus": 4}, timeout=0.2, real_clock_for_deadlines=True)
    node.cycle()
    before = node.cycle(advance=30)

    engine.stall()  # every DCGM call now hangs, as nv-hostengine did for 45 s in NVSentinel #1748
    started = time.monotonic()
    during = node.cycle(advance=30)
    elapsed = time.monotonic() - started
    assert elapsed < 1.5, elapsed  # one deadline, not one per call or per GPU
    assert _readings(during) == _readings(before)
    assert h.value(during, "gpu_dcgm_connected") == 0
    assert h.value(during, "gpu_dcgm_call_timeouts_total") >= 1
    # Values 30 s old (two update intervals are 10 s) are served, and said to be stale, as an NVML GPU whose
    # call is stuck; their time stops moving.
    assert {s.value for s in h.samples(during, "gpu_collection_stale")} == {1}
    assert {s.value for s in h.samples(during, "gpu_collection_last_success_timestamp_seconds")} == \
        {s.value for s in h.samples(before, "gpu_collection_last_success_timestamp_seconds")}
    assert {s.value for s in h.samples(during, "gpu_lost")} == {0}
    # No pile-up: while one call hangs, nothing else is queued behind it.
    assert engine.stalled_calls == 1
    started = time.monotonic()
    node.cycle(advance=30)
    assert time.monotonic() - started < 0.5
    assert engine.stalled_calls == 1

    engine.unstall()
    deadline = time.monotonic() + 5
    while node.conn.state().connected is False and time.monotonic() < deadline:
        time.sleep(0.01)
    after = node.cycle(advance=30)
    assert h.value(after, "gpu_dcgm_connected") == 1
    assert h.value(after, "gpu_dcgm_last_update_timestamp_seconds", gpu="0") == node.wall()
    assert {s.value for s in h.samples(after, "gpu_collection_stale")} == {0}


def test_a_host_engine_that_stops_sampling_makes_its_gpus_stale(make_node, engine, h):
    """It answers every call, with the same old samples: the data's time is its newest sample's."""
    node = make_node({"gpus": 2}, interval=5.0)
    node.cycle()
    fresh = node.cycle(advance=5)
    assert {s.value for s in h.samples(fresh, "gpu_collection_stale")} == {0}
    sampled = node.wall()
    assert {s.value for s in h.samples(fresh, "gpu_collection_last_success_timestamp_seconds")} == {sampled}

    engine.stop_sampling()
    within = node.cycle(advance=5)  # one interval old: not yet stale
    assert {s.value for s in h.samples(within, "gpu_collection_stale")} == {0}
    late = node.cycle(advance=10)  # three intervals
    assert {s.value for s in h.samples(late, "gpu_collection_stale")} == {1}
    assert {s.value for s in h.samples(late, "gpu_collection_last_success_timestamp_seconds")} == {sampled}
    assert h.value(late, "gpu_dcgm_last_update_timestamp_seconds", gpu="0") == sampled
    assert h.value(late, "gpu_dcgm_connected") == 1  # the connection is fine; the data is not

    engine.resume_sampling()
    again = node.cycle(advance=5)
    assert {s.value for s in h.samples(again, "gpu_collection_stale")} == {0}
    assert {s.value for s in h.samples(again, "gpu_collection_last_success_timestamp_seconds")} == {node.wall()}


def test_reconnect_backs_off_exponentially_up_to_30s(engine, h):
    clock = h.Clock(0.0)
    conn = DcgmConnection(load_bindings(str(FAKE)), address="localhost:5555", timeout=1.0, clock=clock)

    def attempted() -> bool:
        """One caller's try: did it make a connect attempt (rather than being refused during backoff)?"""
        before = engine.calls["dcgmConnect_v3"]
        with pytest.raises(DcgmUnavailable):
            conn.run("ping", lambda s: None)
        return engine.calls["dcgmConnect_v3"] > before

    try:
        engine.disconnect()
        assert attempted()
        waits = []
        for _ in range(7):
            waited = 0.0
            while not attempted():
                clock.advance(0.25)
                waited += 0.25
            waits.append(waited)
        assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
        assert conn.state().failures == 8
        engine.restore()
        clock.advance(30)
        assert conn.run("ping", lambda s: "pong") == "pong"
        assert conn.state().connected
        assert conn.state().reconnects == 0  # the first successful connect is not a reconnect
    finally:
        conn.close()


def _gpus(session):
    return session.b.dcgm_agent.dcgmGetAllSupportedDevices(session.handle)


def test_first_failure_retries_at_once_then_one_second(engine, h):
    clock = h.Clock(0.0)
    conn = DcgmConnection(load_bindings(str(FAKE)), address="localhost:5555", timeout=1.0, clock=clock)
    try:
        assert conn.run("ping", _gpus) == list(range(8))
        engine.disconnect()
        with pytest.raises(DcgmUnavailable, match="not valid"):
            conn.run("ping", _gpus)  # the call finds the connection gone
        with pytest.raises(DcgmUnavailable, match="connect: "):
            conn.run("ping", _gpus)  # tried at once, refused by the host engine
        with pytest.raises(DcgmUnavailable, match="next attempt in 1.0s"):
            conn.run("ping", _gpus)
        engine.restore()
        clock.advance(1.0)
        assert conn.run("ping", _gpus) == list(range(8))
        assert conn.state().reconnects == 1
        assert conn.state().failures == 2
    finally:
        conn.close()


def test_dcgm_errors_become_nvml_errors(engine):
    conn = DcgmConnection(load_bindings(str(FAKE)), timeout=1.0)
    import dcgm_structs

    def fail(code):
        def fn(session):
            raise dcgm_structs.DCGMError(code)
        return fn

    try:
        for code, nvml in ((dcgm_structs.DCGM_ST_GPU_IS_LOST, pynvml.NVML_ERROR_GPU_IS_LOST),
                           (dcgm_structs.DCGM_ST_NOT_SUPPORTED, pynvml.NVML_ERROR_NOT_SUPPORTED),
                           (dcgm_structs.DCGM_ST_NO_PERMISSION, pynvml.NVML_ERROR_NO_PERMISSION),
                           (dcgm_structs.DCGM_ST_NOT_WATCHED, pynvml.NVML_ERROR_NO_DATA),
                           (dcgm_structs.DCGM_ST_GENERIC_ERROR, pynvml.NVML_ERROR_UNKNOWN)):
            with pytest.raises(pynvml.NVMLError) as exc:
                conn.run("x", fail(code))
            assert exc.value.value == nvml
        assert conn.state().connected  # none of those is a connection problem
        with pytest.raises(DcgmUnavailable):
            conn.run("x", fail(dcgm_structs.DCGM_ST_CONNECTION_NOT_VALID))
        assert not conn.state().connected
    finally:
        conn.close()


def test_late_result_of_a_timed_out_call_still_lands(engine):
    conn = DcgmConnection(load_bindings(str(FAKE)), timeout=0.1)
    got = []
    release_call = threading.Event()
    try:
        conn.run("warm-up", lambda s: None)
        with pytest.raises(DcgmUnavailable, match="timed out"):
            conn.run("slow", lambda s: release_call.wait(5) and "late", on_done=got.append)
        assert not conn.state().connected
        release_call.set()
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        assert got == ["late"]
        assert conn.run("ping", lambda s: "ok") == "ok"
        assert conn.state().connected and conn.state().timeouts == 1
    finally:
        conn.close()


def test_collectors_and_backend_share_one_connection(engine):
    settings = {"dcgm_bindings_path": str(FAKE), "dcgm_address": "localhost:5555"}
    a = acquire(settings)
    b = acquire(settings)
    try:
        assert a is b
        a.run("ping", lambda s: None)
        assert len(engine.sessions) == 1
    finally:
        release(a)
        assert not a._closed
        release(b)
    assert a._closed


def test_unix_socket_address(engine):
    conn = DcgmConnection(load_bindings(str(FAKE)), address="unix:///run/nvidia-dcgm.sock", timeout=1.0)
    try:
        conn.run("ping", lambda s: None)
        assert [s.address for s in engine.sessions.values()] == ["unix:///run/nvidia-dcgm.sock"]
    finally:
        conn.close()
    assert engine.sessions == {}  # disconnected on close
