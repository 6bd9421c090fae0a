"""HTTP side: serves the latest pre-rendered snapshot; nothing here waits on a GPU."""

from __future__ import annotations

import html
import time
from typing import Protocol

from aiohttp import web

from . import __version__
from .render import CONTENT_TYPE, Snapshot


class SnapshotSource(Protocol):
    snapshot: Snapshot
    last_cycle_monotonic: float


def create_app(
    source: SnapshotSource,
    *,
    telemetry_path: str,
    interval: float,
    timeout: float,
    middlewares: list[web.typedefs.Middleware] | None = None,
) -> web.Application:
    app = web.Application(middlewares=middlewares or [])
    # A loop that has not published for this long is dead or wedged: only then may a liveness probe restart us.
    stale_after = 3 * interval + 2 * timeout

    async def metrics(request: web.Request) -> web.Response:
        snap = source.snapshot
        headers = {"Content-Type": CONTENT_TYPE, "Vary": "Accept-Encoding"}
        if accepts_gzip(request.headers.get("Accept-Encoding", "")):
            return web.Response(body=snap.gzipped(), headers={**headers, "Content-Encoding": "gzip"})
        return web.Response(body=snap.body, headers=headers)

    async def healthz(request: web.Request) -> web.Response:
        # GPU and NVML trouble is reported as metrics, never here: restarting the exporter fixes neither.
        age = time.monotonic() - source.last_cycle_monotonic
        if source.last_cycle_monotonic and age <= stale_after:
            return web.Response(text="ok\n")
        return web.Response(status=503, text=f"collection loop has not published for {age:.0f}s\n")

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=_status_page(source.snapshot, telemetry_path), content_type="text/html")

    app.router.add_get(telemetry_path, metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/", index)
    return app


def accepts_gzip(header: str) -> bool:
    """RFC 9110 content negotiation, reduced to the one coding we offer: "gzip;q=0" means no."""
    for item in header.split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip().lower() not in ("gzip", "*"):
            continue
        q = params.strip()
        if q.startswith("q="):
            try:
                return float(q[2:]) > 0
            except ValueError:
                return False
        return True
    return False


def _status_page(snap: Snapshot, telemetry_path: str) -> str:
    fleet = snap.fleet
    rows = []
    for g in snap.gpus:
        state = "lost" if g["lost"] else "stale" if g["stale"] else "ok"
        unsupported = ", ".join(g["unsupported"]) or "-"
        rows.append(
            "<tr class='{0}'><td>{1}</td><td><code>{2}</code></td><td>{3}</td><td>{4}</td><td>{0}</td>"
            "<td>{5}</td><td>{6}</td></tr>".format(
                state, g["gpu"], html.escape(g["uuid"]), html.escape(g["pci_bus_id"]), html.escape(g["model"]),
                "-" if g["age_seconds"] is None else f"{g['age_seconds']}s", html.escape(unsupported),
            )
        )
    summary = "NVML not available" if fleet is None or not fleet.nvml_up else (
        f"{fleet.visible} of {'an unknown number of' if fleet.expected is None else fleet.expected} expected GPUs "
        f"visible, driver {html.escape(fleet.driver_version)}"
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>gpu-health-exporter</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:.2em .8em;text-align:left}}
.lost{{background:#fdd}}.stale{{background:#ffd}}</style></head>
<body><h1>gpu-health-exporter {__version__}</h1>
<p>{summary}. <a href="{html.escape(telemetry_path)}">Metrics</a> · <a href="/healthz">Health</a></p>
<table><tr><th>GPU</th><th>UUID</th><th>PCI bus id</th><th>Model</th><th>State</th><th>Data age</th>
<th>Not supported</th></tr>
{''.join(rows)}
</table></body></html>
"""
