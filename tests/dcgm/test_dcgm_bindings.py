"""Loading DCGM's Python bindings, and what the fake of them mirrors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.backends.dcgm import DEFAULT_PATHS, DcgmNvml, load_bindings
from exporter.errors import BackendUnavailable

ROOT = Path(__file__).resolve().parents[2]
FAKE = ROOT / "tests" / "fakes" / "dcgm_bindings"


def test_missing_bindings_path_names_the_path_and_the_package():
    with pytest.raises(BackendUnavailable) as exc:
        load_bindings("/nonexistent/dcgm/bindings")
    message = str(exc.value)
    assert "/nonexistent/dcgm/bindings" in message
    assert "--dcgm.bindings-path" in message
    assert "datacenter-gpu-manager-4-core" in message and "datacenter-gpu-manager " in message
    assert "pydcgm.py" in message


@pytest.mark.skipif(any(os.path.isdir(p) for p in DEFAULT_PATHS), reason="DCGM is installed on this host")
def test_default_search_names_every_default_path():
    with pytest.raises(BackendUnavailable) as exc:
        load_bindings(None)
    for path in DEFAULT_PATHS:
        assert path in str(exc.value)


def test_incomplete_directory_names_the_missing_modules(tmp_path: Path):
    (tmp_path / "pydcgm.py").write_text("")
    (tmp_path / "dcgm_structs.py").write_text("")
    with pytest.raises(BackendUnavailable) as exc:
        load_bindings(str(tmp_path))
    assert "dcgm_fields.py" in str(exc.value) and "dcgm_agent.py" in str(exc.value)
    assert str(tmp_path) in str(exc.value)


def test_backend_from_settings_raises_backend_unavailable():
    with pytest.raises(BackendUnavailable, match="/nonexistent"):
        DcgmNvml.from_settings({"dcgm_bindings_path": "/nonexistent"})


def test_bindings_without_libdcgm_are_unavailable(engine):
    engine.library_missing = True
    with pytest.raises(BackendUnavailable, match="libdcgm"):
        load_bindings(str(FAKE))


def test_a_second_copy_of_the_bindings_is_refused(engine, tmp_path: Path):
    for name in ("pydcgm", "dcgm_structs", "dcgm_fields", "dcgm_agent", "dcgmvalue"):
        (tmp_path / f"{name}.py").write_text("")
    with pytest.raises(BackendUnavailable, match="imported from"):
        load_bindings(str(tmp_path))


def test_fake_mirrors_dcgm_exceptions_and_constants(engine):
    import dcgm_errors
    import dcgm_structs
    import dcgmvalue

    err = dcgm_structs.DCGMError(dcgm_structs.DCGM_ST_CONNECTION_NOT_VALID)
    assert type(err) is dcgm_structs.DCGMError_ConnectionNotValid
    assert dcgm_structs.dcgmExceptionClass(-21) is dcgm_structs.DCGMError_ConnectionNotValid
    assert isinstance(dcgm_structs.DCGMError_GpuIsLost(), dcgm_structs.DCGMError)
    assert (dcgm_structs.DCGM_HEALTH_RESULT_PASS, dcgm_structs.DCGM_HEALTH_RESULT_WARN,
            dcgm_structs.DCGM_HEALTH_RESULT_FAIL) == (0, 10, 20)
    assert dcgm_structs.DCGM_HEALTH_WATCH_ALL == 0xFFFFFFFF
    assert dcgmvalue.DCGM_INT64_BLANK == 0x7FFFFFFFFFFFFFF0
    assert dcgmvalue.DCGM_INT64_NOT_SUPPORTED == 9223372036854775794  # what dcgm-exporter's README shows leaking
    assert dcgmvalue.DCGM_FP64_BLANK == 2.0**47
    assert dcgm_errors.DCGM_FR_VOLATILE_DBE_DETECTED == 4 and dcgm_errors.DCGM_FR_FALLEN_OFF_BUS == 120


def test_fake_docstrings_name_the_dcgm_version():
    for module in ("pydcgm", "DcgmHandle", "dcgm_structs", "dcgm_fields", "dcgm_agent", "dcgmvalue", "dcgm_errors"):
        assert "DCGM 4.6.0" in (FAKE / f"{module}.py").read_text().split('"""')[1], module


def test_deprecated_field_names_warn_like_dcgm_4_6(engine):
    import dcgm_fields

    with pytest.warns(DeprecationWarning, match="DCGM_FI_DEV_BOARD_POWER_WATTS"):
        assert dcgm_fields.DCGM_FI_DEV_POWER_USAGE == 155


@pytest.mark.slow
def test_cli_exits_non_zero_naming_the_missing_bindings_path(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k != "NODE_NAME"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-m", "exporter", "--backend", "dcgm", "--dcgm.bindings-path", "/nonexistent",
         "--web.listen-address", "127.0.0.1:0", "--state-dir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "/nonexistent" in result.stderr
    assert "datacenter-gpu-manager-4-core" in result.stderr
    assert "Traceback" not in result.stderr
