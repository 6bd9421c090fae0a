"""The simulated node's driver directory (sim-config `driver_dir`): what several processes share about the node.

A real node's driver state is shared by every process on it: the device files they open, the time the node
booted, the GPU resets done and the persistence mode set by `nvidia-smi`. The simulator keeps the same in one
directory, so that the exporter, a fake `nvidia-smi` (gpu_health_stack/nvidia_smi.py) and the reset script see
one node:

- `dev/nvidiactl`, `dev/nvidia<minor>` (minor = GPU index) and, on NVSwitch models, `dev/nvidia-nvswitch0..3`:
  plain files standing for the device nodes. NVML keeps `nvidiactl` and every GPU's file open while it is
  initialised, which is what makes a process a holder in `/proc/<pid>/fd` (`nvidia-smi -r` refuses then).
- `boot`: the node's boot time (wall clock), written once by whoever comes first. Fault times count from it.
- `resets/<uuid>`: the wall time of each successful reset of that GPU, one a line (a history, so that a fault
  that began before an earlier reset still ends at that one).
- `persistence/<uuid>`: `1` or `0`, as `nvidia-smi -pm` set it; no file is persistence mode on.

Not modelled: device files as character devices (they are plain files: nothing reads them), permissions, the
driver reloading (the boot time never changes), and two resets of one GPU racing each other.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

NVSWITCHES = 4  # HGX H100/H200 baseboards carry four third-generation NVSwitches
# A directory's mtime is coarse (a kernel tick): one changed this recently is read again at the next check,
# so that a write landing in the same tick as a read is not missed.
_SETTLE_NS = 1_000_000_000


class SimNode:
    """One driver directory. Writes are atomic (write a temporary file, rename it), reads are cached."""

    def __init__(self, root: str | Path, gpus: int, *, nvswitch: bool, check_every: float = 1.0) -> None:
        # /proc/<pid>/fd shows the resolved path of an open file; resolving here keeps the two the same.
        self.root = Path(root).resolve()
        self.dev = self.root / "dev"
        self.gpus = gpus
        self.check_every = check_every
        self._lock = threading.Lock()
        self._fds: list[int] = []
        self._checked = -float("inf")
        self._seen: dict[str, int | None] = {"resets": None, "persistence": None}
        self._resets: dict[str, tuple[float, ...]] = {}
        self._persistence: dict[str, bool] = {}
        for sub in ("dev", "resets", "persistence"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        names = ["nvidiactl", *(f"nvidia{i}" for i in range(gpus))]
        names += [f"nvidia-nvswitch{i}" for i in range(NVSWITCHES)] if nvswitch else []
        for name in names:
            (self.dev / name).touch(exist_ok=True)
        self.boot = self._boot_time()

    def device(self, minor: int) -> Path:
        return self.dev / f"nvidia{minor}"

    # --- device files: what NVML holds while initialised ---------------------------------------

    def open_devices(self) -> None:
        with self._lock:
            if not self._fds:
                paths = [self.dev / "nvidiactl", *(self.device(i) for i in range(self.gpus))]
                self._fds = [os.open(p, os.O_RDONLY | os.O_CLOEXEC) for p in paths]

    def close_devices(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    # --- boot time, resets, persistence ------------------------------------------------------

    def _boot_time(self) -> float:
        path = self.root / "boot"
        if not path.exists():
            # link() refuses an existing name: of two processes starting at once, the first one's time wins.
            tmp = self.root / f".boot.{os.getpid()}.{threading.get_ident()}"
            tmp.write_text(f"{time.time():.6f}\n", encoding="ascii")
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        return float(path.read_text(encoding="ascii"))

    def resets(self, uuid: str) -> tuple[float, ...]:
        """The GPU's reset times, in seconds since boot, oldest first; at most `check_every` seconds old."""
        self._refresh()
        return self._resets.get(uuid, ())

    def persistence(self, uuid: str) -> bool:
        self._refresh()
        return self._persistence.get(uuid, True)

    def record_reset(self, uuid: str, when: float) -> None:
        """Add a reset at wall time `when` to the GPU's history (what a successful `nvidia-smi -r` does)."""
        path = self.root / "resets" / uuid
        old = path.read_text(encoding="ascii") if path.exists() else ""
        self._write(path, f"{old}{when:.6f}\n")

    def set_persistence(self, uuid: str, enabled: bool) -> None:
        self._write(self.root / "persistence" / uuid, "1\n" if enabled else "0\n")

    def _write(self, path: Path, text: str) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(text, encoding="ascii")
        os.replace(tmp, path)
        self._checked = -float("inf")  # this process sees its own write at once

    def _refresh(self) -> None:
        """Re-read resets/ and persistence/ when their mtime moved; stat them at most every `check_every` s."""
        now = time.monotonic()
        if now - self._checked < self.check_every:
            return
        with self._lock:
            self._checked = now
            for sub in ("resets", "persistence"):
                mtime = os.stat(self.root / sub).st_mtime_ns
                if mtime == self._seen[sub]:
                    continue
                files = _read_dir(self.root / sub)
                if sub == "resets":
                    self._resets = {u: tuple(sorted(float(x) - self.boot for x in t.split())) for u, t in files.items()}
                else:
                    self._persistence = {u: t.strip() != "0" for u, t in files.items()}
                self._seen[sub] = mtime if time.time_ns() - mtime > _SETTLE_NS else None


def _read_dir(directory: Path) -> Mapping[str, str]:
    out = {}
    for entry in os.scandir(directory):
        if not entry.name.startswith("."):
            try:
                out[entry.name] = Path(entry.path).read_text(encoding="ascii")
            except FileNotFoundError:  # replaced between the listing and the read: the next check sees it
                continue
    return out


def first_at_or_after(times: Sequence[float], t: float) -> float | None:
    return next((r for r in times if r >= t), None)


def last_at_or_before(times: Sequence[float], t: float) -> float | None:
    return next((r for r in reversed(times) if r <= t), None)
