"""A fake `nvidia-smi` for a simulated node: the invocations remediation_webhook/reset_gpu.sh makes, no more.

Run as `python -m gpu_health_stack.nvidia_smi --sim-config PATH ARGS...`, or through the shell shim that
`install_nvidia_smi` writes as `<bin_dir>/nvidia-smi`. It builds a SimulatedNvml from the same sim config as
the exporter (same seed: same UUIDs and bus ids) and does its own nvmlInit, so while it runs it holds the
device files like the real tool does. With the config's `driver_dir` (exporter/backends/sim_node.py) it shares
the node with the exporter: `-r` and `-pm` change what every process on the node sees.

Faithful to (from NVIDIA's nvidia-smi documentation and its output on HGX H100 nodes, as remembered, not
checked against a driver here):
- exit codes of the man page's RETURN VALUE: 0 success, 2 invalid argument, 6 "a query to find an object was
  unsuccessful" (no GPU matches -i), 15 "GPU has fallen off the bus or has otherwise become inaccessible",
  255 "other error or internal driver error";
- `--query-gpu=F,...  --format=csv[,noheader][,nounits]` for index, name, uuid, pci.bus_id, compute_cap,
  mig.mode.current, persistence_mode; `[N/A]` for a value the GPU does not support;
- `--query-compute-apps=pid` (empty: the simulator runs no CUDA applications);
- `-q`: the layout reset_gpu.sh parses (`GPU <bus id>` at column 0, keys padded so that ":" is at column 42,
  sections at 4 spaces with their keys at 8), with the keys it reads;
- `nvlink -s`: "GPU 0: NAME (UUID: ...)" then "\t Link N: 26.562 GB/s" or "\t Link N: <inactive>";
- `-r`: refused while another process has the GPU's device file open, found as the driver effectively finds
  it (an open file on that device, scanned through /proc/*/fd by device and inode), nvidia-persistenced
  counting only while persistence mode is on for the GPU (`-pm 0` makes the daemon let go); a lost GPU
  cannot be reset;
- `-pm 0|1`: per GPU, with the real messages.

Not faithful, or not known for sure: the exact refusal wording and its exit code (255 here), whether errors go
to stdout or stderr (stderr here), output for GPUs without NVLink (the header line only), the A100 link speed,
"GPU Recovery Action" (always None: the simulator has no recovery-action fault), "Pending Page Blacklist" (N/A:
every simulated model is Ampere or later, which remap rows instead of retiring pages), root privileges (never
asked for), processes of other users (invisible in /proc without privileges, so never holders here), `-r`
without `-i` (all GPUs at once: refused as unsupported), and every option not listed above (exit 2).
"""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pynvml

from exporter.backends.sim import SimHandle, SimulatedNvml, load_sim_config
from exporter.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
OK, INVALID_ARGUMENT, NOT_FOUND, GPU_LOST, OTHER_ERROR = 0, 2, 6, 15, 255
PERSISTENCED = "nvidia-persiste"  # nvidia-persistenced as /proc/<pid>/comm shows it (15 characters)
IN_USE = (
    "GPU {bus} is currently in use by another process.\n\n"
    "1 device is currently being used by one or more other processes (e.g., Fabric Manager, CUDA application, "
    "graphics application such as an X server, or a monitoring application such as another instance of "
    "nvidia-smi). Please first kill all processes using this device and all compute applications running in the "
    "system."
)
_LINK_SPEED = {"NVIDIA A100-SXM4-80GB": "25 GB/s"}  # per NVLink; NVLink 4 (H100, H200) otherwise
_FABRIC_STATES = {
    pynvml.NVML_GPU_FABRIC_STATE_NOT_SUPPORTED: "Not Supported",
    pynvml.NVML_GPU_FABRIC_STATE_NOT_STARTED: "Not Started",
    pynvml.NVML_GPU_FABRIC_STATE_IN_PROGRESS: "In Progress",
    pynvml.NVML_GPU_FABRIC_STATE_COMPLETED: "Completed",
}
_COMPUTE_APP_FIELDS = frozenset({"pid", "process_name", "gpu_uuid", "gpu_bus_id", "used_memory", "used_gpu_memory"})


class Exit(Exception):
    """Stop with `code` after printing `message` to stderr."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Invocation:
    sim_config: str | None = None
    action: str | None = None  # query-gpu, query-compute-apps, q, r, pm, nvlink-status
    ids: list[str] = field(default_factory=list)
    fields: list[str] = field(default_factory=list)
    format: set[str] = field(default_factory=set)
    pm: bool | None = None
    nvlink: bool = False


def parse(argv: Sequence[str]) -> Invocation:
    inv = Invocation()
    args = list(argv)

    def value(name: str, inline: str | None) -> str:
        if inline is not None:
            return inline
        if not args:
            raise Exit(INVALID_ARGUMENT, f"Option {name} needs a value.")
        return args.pop(0)

    def act(action: str) -> None:
        if inv.action not in (None, action):
            raise Exit(INVALID_ARGUMENT, "Invalid combination of input arguments. Please run 'nvidia-smi -h' for help.")
        inv.action = action

    while args:
        arg = args.pop(0)
        name, eq, inline = arg.partition("=")
        given = inline if eq else None
        if name == "--sim-config":
            inv.sim_config = value(name, given)
        elif name in ("-i", "--id"):
            inv.ids += [i for i in value(name, given).split(",") if i]
        elif name == "--query-gpu":
            act("query-gpu")
            inv.fields = value(name, given).split(",")
        elif name == "--query-compute-apps":
            act("query-compute-apps")
            inv.fields = value(name, given).split(",")
        elif name == "--format":
            inv.format = set(value(name, given).split(","))
        elif arg in ("-q", "--query"):
            act("q")
        elif arg in ("-r", "--gpu-reset"):
            act("r")
        elif name in ("-pm", "--persistence-mode"):
            act("pm")
            mode = value(name, given).upper()
            if mode not in ("0", "1", "DISABLED", "ENABLED"):
                raise Exit(INVALID_ARGUMENT, f'Invalid persistence mode "{mode}": expected 0 or 1.')
            inv.pm = mode in ("1", "ENABLED")
        elif arg == "nvlink" and inv.action is None and not inv.nvlink:
            inv.nvlink = True
        elif arg in ("-s", "--status") and inv.nvlink:
            act("nvlink-status")
        else:
            raise Exit(INVALID_ARGUMENT, f"nvidia-smi (simulated): unsupported argument {arg!r}")
    if inv.action is None or inv.nvlink != (inv.action == "nvlink-status"):
        raise Exit(INVALID_ARGUMENT, "nvidia-smi (simulated): no supported action given (the GPU table, the "
                                     "nvlink options besides -s and option combinations are not faked)")
    if inv.action in ("query-gpu", "query-compute-apps") and "csv" not in inv.format:
        raise Exit(INVALID_ARGUMENT, "--format=csv is required with " + inv.action)
    return inv


# --- the GPUs asked for ----------------------------------------------------------------------------------


def _handle(sim: SimulatedNvml, ident: str) -> SimHandle:
    try:
        if ident.isdigit():
            return sim.nvmlDeviceGetHandleByIndex(int(ident))
        if ident.startswith(("GPU-", "MIG-")):
            return sim.nvmlDeviceGetHandleByUUID(ident)
        return sim.nvmlDeviceGetHandleByPciBusId_v2(ident)
    except pynvml.NVMLError as exc:
        if exc.value == pynvml.NVML_ERROR_GPU_IS_LOST:
            raise Exit(GPU_LOST, f"Unable to determine the device handle for GPU {ident}: GPU is lost.  "
                                 "Reboot the system to recover this GPU") from None
        if exc.value in (pynvml.NVML_ERROR_NOT_FOUND, pynvml.NVML_ERROR_INVALID_ARGUMENT):
            raise Exit(NOT_FOUND, "No devices were found") from None
        raise


def _handles(sim: SimulatedNvml, ids: Sequence[str]) -> Iterator[SimHandle]:
    for ident in ids or [str(i) for i in range(sim.nvmlDeviceGetCount())]:
        yield _handle(sim, ident)


def _bus(sim: SimulatedNvml, h: SimHandle) -> str:
    busid = sim.nvmlDeviceGetPciInfo_v3(h).busId
    return busid.decode() if isinstance(busid, bytes) else str(busid)


def _enabled(value: int) -> str:
    return "Enabled" if value == pynvml.NVML_FEATURE_ENABLED else "Disabled"


def _or_na(read: Callable[[], str], na: str = "N/A") -> str:
    """A value, or `na` when the GPU does not support it; a lost GPU and other errors still stop the command."""
    try:
        return read()
    except pynvml.NVMLError as exc:
        if exc.value == pynvml.NVML_ERROR_NOT_SUPPORTED:
            return na
        raise


# --- queries -----------------------------------------------------------------------------------------------

QUERY_GPU: dict[str, Callable[[SimulatedNvml, SimHandle], str]] = {
    "index": lambda sim, h: str(sim.nvmlDeviceGetIndex(h)),
    "name": lambda sim, h: str(sim.nvmlDeviceGetName(h)),
    "uuid": lambda sim, h: str(sim.nvmlDeviceGetUUID(h)),
    "pci.bus_id": _bus,
    "compute_cap": lambda sim, h: "%d.%d" % sim.nvmlDeviceGetCudaComputeCapability(h),
    "mig.mode.current": lambda sim, h: _enabled(sim.nvmlDeviceGetMigMode(h)[0]),
    "persistence_mode": lambda sim, h: _enabled(sim.nvmlDeviceGetPersistenceMode(h)),
}


def query_gpu(sim: SimulatedNvml, inv: Invocation) -> None:
    bad = next((f for f in inv.fields if f not in QUERY_GPU), None)
    if bad is not None:
        raise Exit(INVALID_ARGUMENT, f'Field "{bad}" is not a valid field to query.')
    rows = [", ".join(_or_na(lambda f=f: QUERY_GPU[f](sim, h), "[N/A]") for f in inv.fields)
            for h in _handles(sim, inv.ids)]
    if "noheader" not in inv.format:
        print(", ".join(inv.fields))
    for row in rows:
        print(row)


def query_compute_apps(sim: SimulatedNvml, inv: Invocation) -> None:
    bad = next((f for f in inv.fields if f not in _COMPUTE_APP_FIELDS), None)
    if bad is not None:
        raise Exit(INVALID_ARGUMENT, f'Field "{bad}" is not a valid field to query.')
    list(_handles(sim, inv.ids))  # an unknown or lost GPU still fails
    if "noheader" not in inv.format:
        print(", ".join(inv.fields))


def _kv(indent: int, key: str, value: object) -> str:
    return f"{' ' * indent}{key:<{42 - indent}}: {value}"


def query(sim: SimulatedNvml, inv: Invocation) -> None:
    handles = list(_handles(sim, inv.ids))
    cuda = sim.nvmlSystemGetCudaDriverVersion()
    lines = ["", "==============NVSMI LOG==============", "",
             _kv(0, "Timestamp", time.ctime()),
             _kv(0, "Driver Version", sim.nvmlSystemGetDriverVersion()),
             _kv(0, "CUDA Version", f"{cuda // 1000}.{cuda % 1000 // 10}"), "",
             _kv(0, "Attached GPUs", sim.nvmlDeviceGetCount())]
    for h in handles:
        lines += _gpu_section(sim, h)
    print("\n".join(lines))


def _gpu_section(sim: SimulatedNvml, h: SimHandle) -> list[str]:
    try:
        correctable, uncorrectable, pending, failed = map(str, sim.nvmlDeviceGetRemappedRows(h))
    except pynvml.NVMLError as exc:
        if exc.value != pynvml.NVML_ERROR_NOT_SUPPORTED:  # MIG on: the rows cannot be queried
            raise
        correctable = uncorrectable = pending = failed = "N/A"
    yes = {"0": "No", "1": "Yes", "N/A": "N/A"}
    info = pynvml.c_nvmlGpuFabricInfo_v2_t()
    info.version = pynvml.nvmlGpuFabricInfo_v2
    state, status = "Not Supported", "N/A"
    try:
        sim.nvmlDeviceGetGpuFabricInfoV(h, ctypes.byref(info))
        state = _FABRIC_STATES.get(info.state, "Unknown")
        if info.state == pynvml.NVML_GPU_FABRIC_STATE_COMPLETED:
            status = "Success" if info.status == pynvml.NVML_SUCCESS else f"Failure ({info.status})"
    except pynvml.NVMLError as exc:
        if exc.value != pynvml.NVML_ERROR_NOT_SUPPORTED:
            raise
    return [
        f"GPU {_bus(sim, h)}",
        _kv(4, "Product Name", sim.nvmlDeviceGetName(h)),
        _kv(4, "Persistence Mode", _enabled(sim.nvmlDeviceGetPersistenceMode(h))),
        _kv(4, "Serial Number", sim.nvmlDeviceGetSerial(h)),
        _kv(4, "GPU UUID", sim.nvmlDeviceGetUUID(h)),
        _kv(4, "Minor Number", sim.nvmlDeviceGetMinorNumber(h)),
        _kv(4, "VBIOS Version", sim.nvmlDeviceGetVbiosVersion(h)),
        _kv(4, "GPU Recovery Action", "None"),
        "    Retired Pages",
        _kv(8, "Single Bit ECC", "N/A"),
        _kv(8, "Double Bit ECC", "N/A"),
        _kv(8, "Pending Page Blacklist", "N/A"),
        "    Remapped Rows",
        _kv(8, "Correctable Error", correctable),
        _kv(8, "Uncorrectable Error", uncorrectable),
        _kv(8, "Pending", yes[pending]),
        _kv(8, "Remapping Failure Occurred", yes[failed]),
        "    Fabric",
        _kv(8, "State", state),
        _kv(8, "Status", status),
    ]


def nvlink_status(sim: SimulatedNvml, inv: Invocation) -> None:
    speed = _LINK_SPEED.get(sim.model.name, "26.562 GB/s")
    for h in _handles(sim, inv.ids):
        print(f"GPU {sim.nvmlDeviceGetIndex(h)}: {sim.nvmlDeviceGetName(h)} (UUID: {sim.nvmlDeviceGetUUID(h)})")
        for link in range(sim.model.nvlinks):
            up = sim.nvmlDeviceGetNvLinkState(h, link) == pynvml.NVML_FEATURE_ENABLED
            print(f"\t Link {link}: {speed if up else '<inactive>'}")


# --- changes: reset and persistence mode ---------------------------------------------------------------------


def _node(sim: SimulatedNvml, what: str) -> Any:
    if sim.node is None:
        raise Exit(INVALID_ARGUMENT, f"nvidia-smi (simulated): {what} needs driver_dir in the sim config")
    return sim.node


def holders(device: Path, *, persistence: bool) -> list[int]:
    """Pids of the other processes with `device` open (the same file, by device and inode, as the driver sees it).

    nvidia-persistenced holds every GPU on purpose; it lets go of one when its persistence mode is turned off,
    which here means that it stops counting."""
    target = os.stat(device)
    me, found = os.getpid(), []
    for proc in os.scandir("/proc"):
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            fds = list(os.scandir(f"{proc.path}/fd"))
        except OSError:  # gone, or another user's
            continue
        if not any(_same_file(fd.path, target) for fd in fds):
            continue
        try:
            comm = Path(f"{proc.path}/comm").read_text().rstrip("\n")
        except OSError:
            continue
        if comm != PERSISTENCED or persistence:
            found.append(int(proc.name))
    return found


def _same_file(path: str, target: os.stat_result) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino)


def reset(sim: SimulatedNvml, inv: Invocation) -> None:
    node = _node(sim, "-r")
    if len(inv.ids) != 1:
        raise Exit(INVALID_ARGUMENT, "nvidia-smi (simulated): -r needs exactly one GPU given with -i")
    h = _handle(sim, inv.ids[0])
    bus, uuid = _bus(sim, h), sim.nvmlDeviceGetUUID(h)
    persistence = sim.nvmlDeviceGetPersistenceMode(h) == pynvml.NVML_FEATURE_ENABLED
    if holders(node.device(sim.nvmlDeviceGetMinorNumber(h)), persistence=persistence):
        raise Exit(OTHER_ERROR, IN_USE.format(bus=bus))
    node.record_reset(uuid, time.time())
    print(f"GPU {bus} was successfully reset.")
    print("All done.")


def persistence_mode(sim: SimulatedNvml, inv: Invocation) -> None:
    node = _node(sim, "-pm")
    word = "Enabled" if inv.pm else "Disabled"
    for h in _handles(sim, inv.ids):
        bus, uuid = _bus(sim, h), sim.nvmlDeviceGetUUID(h)
        if (sim.nvmlDeviceGetPersistenceMode(h) == pynvml.NVML_FEATURE_ENABLED) == inv.pm:
            print(f"Persistence mode is already {word} for GPU {bus}.")
        else:
            node.set_persistence(uuid, bool(inv.pm))
            print(f"{word} persistence mode for GPU {bus}.")
    print("All done.")


ACTIONS: dict[str, Callable[[SimulatedNvml, Invocation], None]] = {
    "query-gpu": query_gpu,
    "query-compute-apps": query_compute_apps,
    "q": query,
    "nvlink-status": nvlink_status,
    "r": reset,
    "pm": persistence_mode,
}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        inv = parse(sys.argv[1:] if argv is None else argv)
        if inv.sim_config is None:
            raise Exit(INVALID_ARGUMENT, "nvidia-smi (simulated): --sim-config PATH is required")
        try:
            sim = SimulatedNvml(load_sim_config(inv.sim_config))
        except ConfigError as exc:
            raise Exit(OTHER_ERROR, str(exc)) from None
        try:
            sim.nvmlInit()
        except pynvml.NVMLError:
            raise Exit(NOT_FOUND, "No devices were found") from None
        try:
            ACTIONS[inv.action or ""](sim, inv)
        except pynvml.NVMLError as exc:
            if exc.value == pynvml.NVML_ERROR_GPU_IS_LOST:
                raise Exit(GPU_LOST, "Unable to determine the device handle for GPU: GPU is lost.  "
                                     "Reboot the system to recover this GPU") from None
            raise Exit(OTHER_ERROR, f"Unknown Error (NVML error {exc.value})") from None
        finally:
            sim.nvmlShutdown()
    except Exit as stop:
        print(str(stop), file=sys.stderr)
        return stop.code
    return OK


def install_nvidia_smi(bin_dir: str | Path, sim_config_path: str | Path, python: str = sys.executable) -> Path:
    """Write an executable `bin_dir/nvidia-smi` that runs this fake on `sim_config_path`; returns its path.

    It needs only /bin/sh, so it works with PATH=bin_dir:/usr/bin:/bin; PYTHONPATH gets the repository root,
    where gpu_health_stack lives (it is not installed)."""
    path = Path(bin_dir) / "nvidia-smi"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "#!/bin/sh\n"
        "# The simulated node's nvidia-smi: gpu_health_stack/nvidia_smi.py (written by install_nvidia_smi).\n"
        f"PYTHONPATH={shlex.quote(str(ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}\n"
        "export PYTHONPATH\n"
        f"exec {shlex.quote(python)} -m gpu_health_stack.nvidia_smi "
        f"--sim-config {shlex.quote(str(Path(sim_config_path).resolve()))} \"$@\"\n",
        encoding="utf-8",
    )
    path.chmod(0o755)
    return path


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `nvidia-smi ... | head` ends quietly, as the C tool does
    sys.exit(main())
