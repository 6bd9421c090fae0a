"""`python -m exporter` flags: bad ones are refused with a message naming the problem; good ones take effect."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import requests

import exporter
from exporter import cli
from gpu_health_common import logs
from exporter.config import parse
from exporter.errors import ConfigError
from exporter.registry import Tier, discover

# name -> (argv built from the tmp dir, texts the error message must contain)
BAD = {
    "unknown_flag": (lambda d: ["--backend", "sim", "--no-such-flag"], ["unrecognized arguments", "--no-such-flag"]),
    "interval_not_a_duration": (lambda d: ["--backend", "sim", "--collect-interval", "abc"],
                                ["--collect-interval", "'abc'"]),
    "listen_address": (lambda d: ["--backend", "sim", "--web.listen-address", "nope"],
                       ["--web.listen-address", "'nope'"]),
    "negative_expected_gpus": (lambda d: ["--backend", "sim", "--expected-gpus", "-1"],
                               ["--expected-gpus", "-1"]),
    "sim_config_without_sim_backend": (lambda d: ["--sim-config", str(d / "good.yaml")],
                                       ["--sim-config", "--backend sim"]),
    "missing_web_config": (lambda d: ["--backend", "sim", "--web.config.file", str(d / "missing.yml")],
                           ["--web.config.file", "missing.yml"]),
    "sim_config_unknown_fault_key": (lambda d: ["--backend", "sim", "--sim-config", str(d / "bad-fault.yaml")],
                                     ["bad-fault.yaml", "faults[0]", "speed"]),
    "web_config_unknown_key": (lambda d: ["--backend", "sim", "--web.config.file", str(d / "web.yml")],
                               ["web.yml", "unknown key", "tls_server_config.cert_fiel"]),
}

# More bad command lines, checked in-process through exporter.cli.main (cheaper than an interpreter each).
BAD_IN_PROCESS = {
    "sim_config_unknown_top_key": (lambda d: ["--backend", "sim", "--sim-config", str(d / "bad-top.yaml")],
                                   ["bad-top.yaml", "unknown key", "gpu_count"]),
    "sim_config_missing_file": (lambda d: ["--backend", "sim", "--sim-config", str(d / "nowhere.yaml")],
                                ["--sim-config", "nowhere.yaml"]),
    "sim_config_bad_gpu_index": (lambda d: ["--backend", "sim", "--sim-config", str(d / "bad-gpu.yaml")],
                                 ["faults[0].gpu", "below 2"]),
    "bad_backend": (lambda d: ["--backend", "nope"], ["--backend", "nope"]),
    "timeout_longer_than_interval": (lambda d: ["--backend", "sim", "--collect-interval", "1s",
                                                "--collect-timeout", "2s"], ["--collect-timeout"]),
    "slow_shorter_than_interval": (lambda d: ["--backend", "sim", "--collect-interval", "10s",
                                              "--collect-interval.slow", "5s"], ["--collect-interval.slow"]),
    "zero_interval": (lambda d: ["--backend", "sim", "--collect-interval", "0s"], ["--collect-interval"]),
    "port_out_of_range": (lambda d: ["--backend", "sim", "--web.listen-address", ":70000"],
                          ["--web.listen-address", "70000"]),
    "telemetry_path_healthz": (lambda d: ["--backend", "sim", "--web.telemetry-path", "/healthz"],
                               ["--web.telemetry-path"]),
    "expected_gpus_not_int": (lambda d: ["--backend", "sim", "--expected-gpus", "eight"],
                              ["--expected-gpus", "eight"]),
    "both_enable_and_disable": (lambda d: ["--backend", "sim", "--collector.nvlink", "--no-collector.nvlink"],
                                ["--no-collector.nvlink", "not allowed with", "--collector.nvlink"]),
    # Files that are not UTF-8, and values of the wrong type that would otherwise fail on every cycle.
    "web_config_not_utf8": (lambda d: ["--backend", "sim", "--web.config.file", str(d / "latin1.yml")],
                            ["latin1.yml", "not UTF-8"]),
    "sim_config_not_utf8": (lambda d: ["--backend", "sim", "--sim-config", str(d / "latin1.yml")],
                            ["--sim-config", "latin1.yml", "not UTF-8"]),
    "sim_ramp_to_hot": (lambda d: ["--backend", "sim", "--sim-config", str(d / "to-hot.yaml")],
                        ["to-hot.yaml", "faults[0].to", "a number", "'hot'"]),
    "sim_cuda_version_twelve": (lambda d: ["--backend", "sim", "--sim-config", str(d / "cuda.yaml")],
                                ["cuda.yaml", "cuda_version", "'twelve'"]),
    "sim_driver_version_number": (lambda d: ["--backend", "sim", "--sim-config", str(d / "driver.yaml")],
                                  ["driver.yaml", "driver_version", "a string"]),
    "sim_count_lots": (lambda d: ["--backend", "sim", "--sim-config", str(d / "count.yaml")],
                       ["count.yaml", "faults[0].count", "an integer", "'lots'"]),
    "sim_code_abc": (lambda d: ["--backend", "sim", "--sim-config", str(d / "code.yaml")],
                     ["code.yaml", "faults[0].code", "an integer", "'abc'"]),
    "sim_width_wide": (lambda d: ["--backend", "sim", "--sim-config", str(d / "width.yaml")],
                       ["width.yaml", "faults[0].width", "one of 1, 2, 4, 8, 16, 32", "'wide'"]),
    "sim_remove_yes_please": (lambda d: ["--backend", "sim", "--sim-config", str(d / "remove.yaml")],
                              ["remove.yaml", "faults[0].remove", "true or false"]),
}


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory) -> Path:
    d: Path = tmp_path_factory.mktemp("cli")
    (d / "good.yaml").write_text("gpus: 2\n")
    (d / "bad-fault.yaml").write_text("gpus: 2\nfaults:\n  - kind: temperature_ramp\n    gpu: 0\n    speed: 3\n")
    (d / "bad-top.yaml").write_text("gpu_count: 2\n")
    (d / "bad-gpu.yaml").write_text("gpus: 2\nfaults:\n  - kind: throttle\n    gpu: 2\n")
    (d / "web.yml").write_text("tls_server_config:\n  cert_fiel: x.pem\n")
    (d / "latin1.yml").write_bytes("basic_auth_users:\n  r\u00e9mi: x\n".encode("latin-1"))
    (d / "to-hot.yaml").write_text("gpus: 1\nfaults:\n  - {kind: temperature_ramp, to: hot}\n")
    (d / "cuda.yaml").write_text("gpus: 1\ncuda_version: twelve\n")
    (d / "driver.yaml").write_text("gpus: 1\ndriver_version: 550.9\n")
    (d / "count.yaml").write_text("gpus: 1\nfaults:\n  - {kind: ecc_corrected, count: lots}\n")
    (d / "code.yaml").write_text("gpus: 1\nfaults:\n  - {kind: nvml_error, call: nvmlDeviceGetPowerUsage, code: abc}\n")
    (d / "width.yaml").write_text("gpus: 1\nfaults:\n  - {kind: pcie_downgrade, width: wide}\n")
    (d / "remove.yaml").write_text("gpus: 1\nfaults:\n  - {kind: gpu_lost, remove: yes please}\n")
    return d


@pytest.fixture(scope="module")
def bad_runs(config_dir, helpers):
    """Run every bad command line at once (each is a fresh interpreter) and collect the results."""
    d = config_dir
    procs = {}
    for name, (argv, _) in BAD.items():
        # Were a bad flag accepted, the exporter would serve on a port nobody uses; the timeout below ends it.
        args = [*argv(d), "--state-dir", str(d / "state")]
        if "--web.listen-address" not in args:
            args += ["--web.listen-address", f"127.0.0.1:{helpers.free_port()}"]
        procs[name] = subprocess.Popen(
            helpers.exporter_cmd(*args), cwd=helpers.ROOT, env=helpers.subprocess_env(),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
    results = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err = "TIMED OUT (the exporter started): " + err
        results[name] = (proc.returncode, out, err)
    return results


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_flags_exit_non_zero_naming_the_problem(bad_runs, case):
    code, out, err = bad_runs[case]
    assert code == 2, (code, err)
    assert err.startswith("gpu-health-exporter: error: "), err
    for needle in BAD[case][1]:
        assert needle in err, (needle, err)
    assert "Traceback" not in err
    # One line, not a usage dump or a log.
    assert err.count("\n") == 1, err


@pytest.mark.parametrize("case", sorted(BAD_IN_PROCESS))
def test_more_bad_flags_in_process(config_dir, capsys, monkeypatch, case):
    def started(*args, **kwargs):
        raise AssertionError(f"the exporter started despite {case}")

    # Were the command line accepted, fail instead of serving (and keep the test's logging as it is).
    monkeypatch.setattr(cli, "Poller", started)
    monkeypatch.setattr(logs, "setup", lambda *a: None)
    argv, needles = BAD_IN_PROCESS[case]
    code = cli.main([*argv(config_dir), "--state-dir", str(config_dir / "state")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("gpu-health-exporter: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    assert err.count("\n") == 1, err


def test_version(helpers):
    proc = subprocess.run(
        helpers.exporter_cmd("--version"), cwd=helpers.ROOT, env=helpers.subprocess_env(),
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"gpu-health-exporter {exporter.__version__}"


# --- flags that take effect, against running exporters ---------------------------------------


RUNS = {
    "no_nvlink": (["--no-collector.nvlink"], {"NODE_NAME": "node-from-env"}),
    "thermal_only": (["--collector.disable-defaults", "--collector.thermal", "--node-name", "node-from-flag"], {}),
}


@pytest.fixture(scope="module")
def scraped(tmp_path_factory, helpers):
    """Start one exporter per entry of RUNS, side by side, and scrape each once."""
    procs = {
        name: helpers.start_exporter(tmp_path_factory.mktemp(name), *args, sim={"gpus": 2},
                                     env=helpers.subprocess_env(**env))
        for name, (args, env) in RUNS.items()
    }
    try:
        texts = {}
        for name, proc in procs.items():
            proc.wait_ready()
            texts[name] = requests.get(proc.url + "/metrics", timeout=5).text
        yield texts
    finally:
        for proc in procs.values():
            proc.stop()


def test_no_collector_nvlink_removes_nvlink_families(scraped, helpers):
    names = helpers.sample_names(scraped["no_nvlink"])
    assert not {n for n in names if n.startswith("gpu_nvlink_")}
    # Everything else is still there.
    assert {"gpu_temperature_celsius", "gpu_power_usage_watts", "gpu_fabric_state", "gpu_info"} <= names
    collectors = {s.labels["collector"] for s in helpers.select(scraped["no_nvlink"], "gpu_exporter_collector_success")}
    assert collectors == helpers.default_collectors() - {"nvlink"}


def test_disable_defaults_leaves_only_the_enabled_collector(scraped, helpers):
    text = scraped["thermal_only"]
    names = helpers.sample_names(text)
    assert names - helpers.CORE_FAMILIES == {
        "gpu_temperature_celsius", "gpu_memory_temperature_celsius", "gpu_temperature_threshold_celsius",
    }
    assert {s.labels["collector"] for s in helpers.select(text, "gpu_exporter_collector_success")} == {"thermal"}
    # The core series are all there.
    assert {"gpu_nvml_up", "gpu_devices_visible", "gpu_devices_expected", "gpu_exporter_build_info",
            "gpu_collection_stale", "gpu_lost"} <= names


def test_node_label_from_flag_and_from_env(scraped, helpers):
    for run, node in (("thermal_only", "node-from-flag"), ("no_nvlink", "node-from-env")):
        samples = helpers.parse_samples(scraped[run])
        assert samples
        assert {s.labels.get("node") for s in samples} == {node}, run


def test_node_name_flag_wins_over_env_and_env_over_hostname():
    available = discover()
    assert parse(["--node-name", "a"], available, env={"NODE_NAME": "b"}).node == "a"
    assert parse([], available, env={"NODE_NAME": "b"}).node == "b"
    assert parse([], available, env={}).node  # the hostname
    with pytest.raises(ConfigError, match="--node-name"):
        parse(["--node-name", " "], available, env={})


def test_collector_selection_in_config():
    available = discover()
    defaults = parse([], available, env={}).collectors
    assert set(defaults) == {n for n, c in available.items() if c.default_enabled}
    assert "nvlink" not in parse(["--no-collector.nvlink"], available, env={}).collectors
    assert parse(["--collector.disable-defaults", "--collector.thermal"], available, env={}).collectors == ("thermal",)
    assert parse(["--collector.disable-defaults"], available, env={}).collectors == ()


class _FlaggedCollector:
    """A collector whose name has an underscore and which has a flag of its own, as xid has."""

    name = "remapped_rows"
    description = "test double"
    tier = Tier.SLOW
    default_enabled = True

    @classmethod
    def add_flags(cls, parser):
        parser.add_argument("--remapped_rows.threshold", dest="remapped_rows_threshold", default="1")


class _PlainFlaggedCollector(_FlaggedCollector):
    name = "fake"

    @classmethod
    def add_flags(cls, parser):
        parser.add_argument("--fake.threshold", dest="fake_threshold", default="1")


def test_collector_flags_reach_settings():
    available = {"fake": _PlainFlaggedCollector}
    assert parse(["--fake.threshold", "5"], available, env={}).settings == {"fake_threshold": "5"}
    assert parse([], available, env={}).settings == {"fake_threshold": "1"}


def test_flags_of_collectors_with_underscores_reach_settings():
    config = parse(["--remapped_rows.threshold", "5"], {"remapped_rows": _FlaggedCollector}, env={})
    assert config.settings.get("remapped_rows_threshold") == "5"
