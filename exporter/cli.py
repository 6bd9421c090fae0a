"""gpu-health-exporter: parse flags, pick the backend, start the collection loop, serve HTTP."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence


from . import __version__
from .backends import Nvml
from .config import ExporterConfig, parse
from .device import CallTrace
from .errors import BackendUnavailable, ConfigError
from .poller import Poller, PollerConfig, Worker
from .registry import Collector, CollectorOptions, create, discover
from .server import create_app
from .state import BOOT_ID_PATH, ExpectedGpus, WriteErrors, read_boot_id

log = logging.getLogger("gpu_health_exporter")


def make_backend(config: ExporterConfig) -> Nvml:
    if config.backend == "sim":
        from .backends.sim import SimulatedNvml, SimConfig, load_sim_config

        return SimulatedNvml(load_sim_config(config.sim_config) if config.sim_config else SimConfig())
    if config.backend == "dcgm":
        from .backends.dcgm import make_dcgm_backend

        # Raises BackendUnavailable (bindings or libdcgm missing), naming the paths and the package.
        return make_dcgm_backend(config.settings, config.collect_interval)  # type: ignore[return-value]
    # auto means NVML. If libnvidia-ml is missing, nvmlInit fails, gpu_nvml_up says 0 and we keep retrying:
    # a silent fallback to simulated GPUs would report a healthy fleet that does not exist.
    import pynvml

    return pynvml  # type: ignore[return-value]


def build_poller(
    config: ExporterConfig,
    nvml: Nvml,
    available: Mapping[str, type[Collector]],
    *,
    boot_id: str | None = None,
    wall: Callable[[], float] = time.time,
    trace: CallTrace | None = None,
    worker: Callable[[str, Callable[[], None]], Worker] = Worker,
) -> Poller:
    """The collection side, exactly as the exporter runs it; tests and tools build it the same way."""
    # The poller owns the PCI map the XID collector reads; collectors are built before it, so hand over a call.
    holder: list[Poller] = []
    errors = WriteErrors()
    # One boot id for everything kept per boot (XID counts, the expected GPU count): --xid.boot-id-file's.
    if boot_id is None:
        boot_id = read_boot_id(str(config.settings.get("xid_boot_id_file") or BOOT_ID_PATH))
    options = CollectorOptions(
        node=config.node,
        state_dir=config.state_dir,
        nvml=nvml,
        pci_map=lambda: holder[0].pci_map() if holder else {},
        settings=config.settings,
        state_errors=errors,
        boot_id=boot_id,
    )
    poller = Poller(
        nvml,
        [create(available[name], options) for name in config.collectors],
        PollerConfig(
            node=config.node,
            interval=config.collect_interval,
            slow_interval=config.slow_interval,
            deadline=config.collect_timeout,
            version=__version__,
            release_dir=config.state_dir,
        ),
        ExpectedGpus(config.expected_gpus, config.state_dir, boot_id, errors),
        wall=wall,
        trace=trace,
        worker=worker,
    )
    holder.append(poller)
    return poller


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["scan-log"]:
        from .xid.scan import main as scan_main

        return scan_main(args[1:])
    available = discover()
    try:
        config = parse(args, available)
        web_config = None
        if config.web_config_file:
            from gpu_health_common.webconfig import load_web_config

            web_config = load_web_config(config.web_config_file, error=ConfigError)
        nvml = make_backend(config)
    except ConfigError as exc:
        print(f"gpu-health-exporter: error: {exc}", file=sys.stderr)
        return 2
    except BackendUnavailable as exc:
        print(f"gpu-health-exporter: error: {exc}", file=sys.stderr)
        return 1

    from gpu_health_common import logs

    logs.setup(config.log_level, config.log_format)
    try:
        # dcgm_health beside NVML loads DCGM's bindings here.
        poller = build_poller(config, nvml, available)
    except BackendUnavailable as exc:
        print(f"gpu-health-exporter: error: {exc}", file=sys.stderr)
        return 1
    # One cycle before listening, so the first scrape already has data.
    poller.run_cycle()
    poller.start()

    middlewares = []
    ssl_context = None
    if web_config is not None:
        from gpu_health_common.webconfig import middleware

        middlewares.append(middleware(web_config))
        ssl_context = web_config.ssl_context()
    app = create_app(
        poller,
        telemetry_path=config.telemetry_path,
        interval=config.collect_interval,
        timeout=config.collect_timeout,
        middlewares=middlewares,
    )

    def listening(port: int) -> None:
        log.info(
            "listening",
            extra={
                "address": f"{config.listen.host or '0.0.0.0'}:{port}",
                "tls": ssl_context is not None,
                "backend": config.backend,
                "node": config.node,
                "collectors": ",".join(config.collectors),
            },
        )

    try:
        from gpu_health_common.serving import Counters, raise_nofile_limit, run_forever

        raise_nofile_limit()
        asyncio.run(run_forever(app, config.listen.host or None, config.listen.port, limits=config.web_limits,
                                counters=Counters(), ssl_context=ssl_context, on_listening=listening))
    except OSError as exc:
        log.error("cannot listen", extra={"address": f"{config.listen.host or '0.0.0.0'}:{config.listen.port}",
                                          "error": str(exc)})
        return 1
    finally:
        poller.stop()
        shutdown = getattr(nvml, "nvmlShutdown", None) if config.backend == "dcgm" else None
        if shutdown is not None:
            shutdown()  # disconnect from nv-hostengine, or stop the embedded one
    return 0


if __name__ == "__main__":
    sys.exit(main())
