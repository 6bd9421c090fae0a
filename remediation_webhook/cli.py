"""gpu-health-webhook: run the receiver (`--config FILE`) or validate a config (`check-config FILE`)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence

from gpu_health_common import logs, serving
from gpu_health_common.serving import quiet_accept_errors, raise_nofile_limit

from . import __version__
from .admin import create_admin_app
from .alertmanager import Alertmanagers
from .app import Services, create_app
from .auth import effective_address
from .config import Config, load_config
from .config import warnings as config_warnings
from .engine import Engine
from .errors import ConfigError, InventoryError, JournalError
from .inventory import build_inventory
from .journal import Journal
from .kube import KubeApi, KubernetesApi
from .metrics import Metrics

log = logging.getLogger("gpu_health_webhook")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu-health-webhook", description=__doc__)
    p.add_argument("--config", required=True, help="The webhook's YAML config file.")
    p.add_argument("--web.listen-address", dest="web_listen", default="",
                   help="Receiver listener, overrides web.listen_address ([host]:port).")
    p.add_argument("--admin.listen-address", dest="admin_listen", default="",
                   help="Admin API listener, overrides admin.listen_address ([host]:port).")
    p.add_argument("--log.level", dest="log_level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log.format", dest="log_format", default="logfmt", choices=["logfmt", "json"])
    p.add_argument("--version", action="version", version=f"gpu-health-webhook {__version__}")
    return p


def check_config(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="gpu-health-webhook check-config",
                                description="Validate a config file; errors name the key.")
    p.add_argument("file")
    args = p.parse_args(argv)
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for warning in config_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    rules = ", ".join(f"{r.name} ({' -> '.join(r.ladder)})" for r in config.policy.rules) or "none (deny all)"
    mode = "dry-run" if config.policy.dry_run else "LIVE"
    print(f"ok: {args.file}: {mode}; policy {config.policy_hash}; rules: {rules}")
    return 0


async def build_services(config: Config, *, kube: KubeApi | None = None) -> Services:
    """Everything the two listeners share, exactly as the CLI builds it (tests use this too)."""
    if kube is None and config.kubernetes is not None:
        kube = KubernetesApi(config.kubernetes)
    inventory = build_inventory(config.inventory_kind, kube, config.inventory_raw)
    journal = Journal(config.journal_path)
    alertmanager = Alertmanagers(config.alertmanager) if config.alertmanager else None
    metrics = Metrics()
    engine = Engine(config, journal, inventory, kube, alertmanager, metrics)
    return Services(config=config, journal=journal, engine=engine, metrics=metrics)


async def serve(config: Config, web_listen: str = "", admin_listen: str = "", *, kube: KubeApi | None = None) -> None:
    """Both listeners until cancelled (`kube` replaces the Kubernetes client: benchmarks serve a stand-in)."""
    services = await build_services(config, kube=kube)
    await services.engine.start()
    quiet_accept_errors(asyncio.get_running_loop())
    runners = []
    try:
        for name, app, listener, override in (
                ("web", create_app(services), config.web, web_listen),
                ("admin", create_admin_app(services), config.admin, admin_listen)):
            host, port = effective_address(listener, name, override)
            ssl_context = listener.web.ssl_context() if listener.web else None
            runners.append(await serving.serve(app, host, port, limits=listener.limits, counters=services.http,
                                               ssl_context=ssl_context))
            log.info("listening", extra={"listener": name, "address": f"{host}:{port}", "tls": ssl_context is not None,
                                         "read_timeout": listener.limits.read_timeout,
                                         "max_connections": listener.limits.max_connections,
                                         "max_connections_per_client": listener.limits.max_connections_per_client})
        for warning in config_warnings(config):
            log.warning("configuration", extra={"warning": warning})
        log.info("gpu-health-webhook started", extra={"dry_run": config.policy.dry_run,
                                                      "policy_hash": config.policy_hash,
                                                      "journal": config.journal_path})
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down")
    finally:
        for runner in runners:
            await runner.cleanup()
        await services.engine.stop()
        services.journal.close()
        if services.engine.kube is not None:
            services.engine.kube.close()


TEST_ONLY_NO_ALREADY_REMEDIATED = "GPU_HEALTH_WEBHOOK_TEST_ONLY_NO_ALREADY_REMEDIATED"


def apply_test_only_switches(config: Config, env: Mapping[str, str]) -> Config:
    """Switches that exist only to show a test can fail; no configuration file can set them."""
    if env.get(TEST_ONLY_NO_ALREADY_REMEDIATED) != "1":
        return config
    log.warning("TEST ONLY: the journal's already-remediated check is off; a fixed fault may be acted on again",
                extra={"variable": TEST_ONLY_NO_ALREADY_REMEDIATED})
    return dataclasses.replace(config, safety=dataclasses.replace(config.safety, already_remediated_check=False))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "check-config":
        return check_config(argv[1:])
    args = build_parser().parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    raise_nofile_limit()
    try:
        config = apply_test_only_switches(load_config(args.config), os.environ)
        asyncio.run(serve(config, args.web_listen, args.admin_listen))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (JournalError, InventoryError, OSError) as exc:
        log.error("cannot start", extra={"error": str(exc)})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
