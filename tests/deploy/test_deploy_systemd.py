"""deploy/systemd: the units pass `systemd-analyze verify` (no warning either), score well in `systemd-analyze
security`, and keep the hardening without the two settings that would blind the exporter (ProtectKernelLogs= takes
/dev/kmsg and CAP_SYSLOG away, PrivateDevices= hides /dev/nvidia*).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from exporter.config import parse as parse_exporter_flags
from exporter.registry import discover as exporter_collectors
from remediation_webhook.cli import build_parser as webhook_parser

ROOT = Path(__file__).resolve().parent.parent.parent
SYSTEMD = ROOT / "deploy" / "systemd"
EXPORTER = SYSTEMD / "gpu-health-exporter.service"
WEBHOOK = SYSTEMD / "gpu-health-webhook.service"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not found (package systemd)")


def directives(path: Path) -> dict[str, list[str]]:
    """`Section.Key` -> every value the unit gives it (a unit may repeat a key)."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key}", []).append(value)
    return out


def one(d: dict[str, list[str]], key: str) -> str:
    values = d.get(f"Service.{key}") or d.get(key)
    assert values and len(values) == 1, f"{key}: {values}"
    return values[0]


def _stubbed(tmp_path: Path, unit: Path) -> Path:
    """The unit with its binaries replaced by a stub (verify checks that ExecStart= is executable)."""
    stub = tmp_path / "stub"
    stub.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    stub.chmod(0o755)
    text = unit.read_text(encoding="utf-8")
    for binary in ("/usr/local/bin/gpu-health-exporter", "/usr/local/bin/gpu-health-webhook"):
        text = text.replace(binary, str(stub))
    out = tmp_path / unit.name
    out.write_text(text, encoding="utf-8")
    return out


@needs_analyze
@pytest.mark.parametrize("unit", [EXPORTER, WEBHOOK], ids=lambda p: p.name)
def test_systemd_analyze_verify_is_clean(unit: Path, tmp_path: Path) -> None:
    assert ANALYZE is not None
    result = subprocess.run([ANALYZE, "verify", "--man=no", str(_stubbed(tmp_path, unit))],
                            capture_output=True, check=False, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # An unknown or misspelt directive is only a warning (exit 0): fail on any.
    assert result.stderr.strip() == "", result.stderr


@needs_analyze
@pytest.mark.parametrize(("unit", "threshold"), [(EXPORTER, 30), (WEBHOOK, 20)], ids=lambda v: getattr(v, "name", v))
def test_systemd_analyze_security_exposure(unit: Path, threshold: int, tmp_path: Path) -> None:
    """Exposure (0 safest .. 10): at most 3.0 for the exporter (it needs CAP_SYSLOG and devices), 2.0 otherwise."""
    assert ANALYZE is not None
    probe = subprocess.run([ANALYZE, "security", "--help"], capture_output=True, check=False, text=True, timeout=30)
    if "--offline" not in probe.stdout:
        pytest.skip("systemd-analyze security has no --offline (systemd < 250)")
    result = subprocess.run([ANALYZE, "security", "--offline=yes", f"--threshold={threshold}",
                             str(_stubbed(tmp_path, unit))],
                            capture_output=True, check=False, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr


def test_exporter_unit_reads_the_kernel_log_and_nvidia_devices_with_least_privilege() -> None:
    d = directives(EXPORTER)
    assert one(d, "User") == "gpu-health-exporter" and one(d, "Group") == "gpu-health-exporter"
    assert one(d, "AmbientCapabilities") == "CAP_SYSLOG"
    assert one(d, "CapabilityBoundingSet") == "CAP_SYSLOG"
    assert one(d, "NoNewPrivileges") == "yes" and one(d, "ProtectSystem") == "strict"
    # The two settings that would break it are absent (not merely "no"): nobody should add them back.
    assert "Service.ProtectKernelLogs" not in d and "Service.PrivateDevices" not in d
    assert "Service.PrivateUsers" not in d  # capabilities in a user namespace do not open /dev/kmsg
    assert one(d, "DevicePolicy") == "closed"
    assert sorted(d["Service.DeviceAllow"]) == ["/dev/kmsg r", "char-nvidia* rw"]
    for key in ("ProtectHome", "PrivateTmp", "ProtectKernelTunables", "ProtectKernelModules",
                "ProtectControlGroups", "RestrictNamespaces", "RestrictSUIDSGID", "LockPersonality"):
        assert one(d, key) == "yes", key
    assert "systemd-journal" in one(d, "SupplementaryGroups")  # the journal fallback
    assert "modprobe@nvidia.service" in " ".join(d["Unit.Wants"])  # device groups exist when DeviceAllow resolves


def test_exporter_unit_flags_parse_and_use_the_state_directory() -> None:
    d = directives(EXPORTER)
    exec_start = shlex.split(one(d, "ExecStart"))
    assert exec_start[0] == "/usr/local/bin/gpu-health-exporter"
    assert exec_start[1:] == ["$GPU_HEALTH_EXPORTER_ARGS"]
    assert one(d, "EnvironmentFile") == "-/etc/default/gpu-health-exporter"
    default = (SYSTEMD / "gpu-health-exporter.default").read_text(encoding="utf-8")
    (line,) = [x for x in default.splitlines() if x.startswith("GPU_HEALTH_EXPORTER_ARGS=")]
    # EnvironmentFile= unquotes the value; an unbraced $VAR in ExecStart= is then split at whitespace.
    (value,) = shlex.split(line.partition("=")[2])
    args = value.split()
    config = parse_exporter_flags(args, exporter_collectors(), env={"NODE_NAME": "gpu-001"})
    assert config.state_dir == Path("/var/lib") / one(d, "StateDirectory")
    assert "--xid.source=kmsg" in args  # what CAP_SYSLOG is for


def test_webhook_unit_is_locked_down() -> None:
    d = directives(WEBHOOK)
    assert one(d, "User") == "gpu-health-webhook"
    assert one(d, "CapabilityBoundingSet") == "" and one(d, "AmbientCapabilities") == ""
    for key in ("NoNewPrivileges", "PrivateDevices", "PrivateTmp", "PrivateUsers", "ProtectKernelLogs",
                "ProtectKernelTunables", "ProtectKernelModules", "ProtectControlGroups", "ProtectHome",
                "RestrictNamespaces", "RestrictSUIDSGID", "LockPersonality"):
        assert one(d, key) == "yes", key
    assert one(d, "ProtectSystem") == "strict"
    start = shlex.split(one(d, "ExecStart"))
    args = webhook_parser().parse_args(start[1:])
    assert Path(args.config).parent == Path("/etc") / one(d, "ConfigurationDirectory")
    assert shlex.split(one(d, "ExecStartPre"))[1:] == ["check-config", args.config]
    assert one(d, "StateDirectory") == "gpu-health-webhook"


def test_sysusers_defines_the_units_users() -> None:
    lines = [x.split() for x in (SYSTEMD / "gpu-health.sysusers.conf").read_text(encoding="utf-8").splitlines()
             if x.strip() and not x.startswith("#")]
    users = {fields[1] for fields in lines if fields[0] == "u"}
    assert users == {one(directives(EXPORTER), "User"), one(directives(WEBHOOK), "User")}


@pytest.mark.parametrize("unit", [EXPORTER, WEBHOOK], ids=lambda p: p.name)
def test_units_leave_room_for_many_connections(unit: Path) -> None:
    """The default soft limit (1024 files) lets idle connections exhaust a service; the process raises its soft limit
    to the hard one at start, which the unit sets."""
    assert int(one(directives(unit), "LimitNOFILE")) >= 65536
