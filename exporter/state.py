"""How many GPUs this node should have, remembered across exporter restarts within one boot.

Without --expected-gpus, the answer is the most GPUs NVML has shown since boot. It is kept in
--state-dir so that a GPU which fell off the bus (and out of PCI) before a restart of the exporter
still counts as missing afterwards. A new boot id starts over: hardware may really have changed.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)

BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


def read_boot_id(path: str = BOOT_ID_PATH) -> str:
    try:
        return Path(path).read_text(encoding="ascii").strip()
    except OSError:
        return "unknown"


class WriteErrors:
    """Failed writes to --state-dir, by what was being written. A failed write is not only a log line: what it
    would have kept (XID counts, the expected GPU count) can be lost at the next restart, so it is a metric
    (gpu_exporter_state_write_errors_total)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def failed(self, what: str) -> None:
        with self._lock:
            self._counts[what] = self._counts.get(what, 0) + 1

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class ExpectedGpus:
    """The expected GPU count: fixed by flag, or the high-water mark of this boot."""

    FILE = "expected-gpus.json"

    def __init__(self, fixed: int | None, state_dir: Path | None, boot_id: str,
                 errors: WriteErrors | None = None) -> None:
        self.errors = errors or WriteErrors()
        self._fixed = fixed
        self._path = state_dir / self.FILE if state_dir else None
        self._boot_id = boot_id
        self._lock = threading.Lock()
        self._max = self._load()

    @property
    def value(self) -> int | None:
        """None when unknown: no --expected-gpus and NVML has not answered this boot (down since the boot, say);
        a false 0 would read as a node that should have no GPU."""
        return self._fixed if self._fixed is not None else self._max

    def observe(self, visible: int) -> None:
        with self._lock:
            if self._max is not None and visible <= self._max:
                return
            self._max = visible
            self._save()

    def _load(self) -> int | None:
        if self._path is None:
            return None
        try:
            data = json.loads(self._path.read_text(encoding="utf-8"))
            saved = data.get("max_visible") if data.get("boot_id") == self._boot_id else None
            return int(saved) if saved is not None else None
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("ignoring unreadable state file", extra={"path": str(self._path), "error": str(exc)})
            return None

    def _save(self) -> None:
        if self._path is None:
            return
        tmp = self._path.with_suffix(".tmp")
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"boot_id": self._boot_id, "max_visible": self._max}), encoding="utf-8")
            os.replace(tmp, self._path)
        except OSError as exc:
            self.errors.failed("expected_gpus")
            log.warning("cannot persist expected GPU count", extra={"path": str(self._path), "error": str(exc)})
