"""The fleet simulator's one HTTP server: every node's scrape target, the simulator's own metrics, service discovery,
and the control API. Runs its own event loop on a thread, so that the Python API stays usable beside it.

Control API (JSON bodies; every call answers the node list or the node's description):

    GET    /api/nodes                                 the nodes: running, boot, boot_id, kernel_log, cycles
    POST   /api/nodes            {"name", "sim"?}     add a node (sim: a --sim-config mapping)
    DELETE /api/nodes/<name>                          remove it (gone from the targets)
    POST   /api/nodes/<name>/stop                     power loss: its target answers 503
    POST   /api/nodes/<name>/start   {"new_boot"?, "wipe_log"?, "sim"?}
    POST   /api/nodes/<name>/restart {"new_boot"?, "wipe_log"?, "sim"?}
    POST   /api/nodes/<name>/kernel-log {"lines": [...]}  append to its kernel log
    POST   /api/nodes/<name>/gap     {"seconds"}      a scrape gap: 503 for that long, collection goes on
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from exporter.errors import ConfigError
from exporter.render import CONTENT_TYPE
from gpu_health_common.serving import Counters, Limits, bound_port, quiet_accept_errors, read_body, serve

if TYPE_CHECKING:
    from .fleetsim import FleetSim

# Prometheus keeps one connection per target open, all from one address: a thousand nodes, a thousand connections.
LIMITS = Limits(read_timeout=60.0, max_connections=16384, max_connections_per_client=16384)


def create_app(fleet: FleetSim) -> web.Application:
    app = web.Application()
    nodes = fleet.nodes

    async def node_metrics(request: web.Request) -> web.Response:
        node = nodes.get(request.match_info["name"])
        if node is None:
            raise web.HTTPNotFound(text="no such node\n")
        poller = node.poller
        if node.unreachable_until and time.monotonic() < node.unreachable_until:
            raise web.HTTPServiceUnavailable(text="scrape gap\n")
        if poller is None:
            # Stopped: what a scrape of a powered-off node's exporter gives Prometheus (up 0), without the wait.
            raise web.HTTPServiceUnavailable(text="node stopped\n")
        return web.Response(body=poller.snapshot.body, headers={"Content-Type": CONTENT_TYPE})

    async def own_metrics(request: web.Request) -> web.Response:
        running = sum(1 for n in list(nodes.values()) if n.running)
        lines = [
            "# TYPE fleetsim_nodes gauge",
            f'fleetsim_nodes{{state="running"}} {running}',
            f'fleetsim_nodes{{state="stopped"}} {len(nodes) - running}',
            "# TYPE fleetsim_cycles_total counter",
            f"fleetsim_cycles_total {fleet.cycles}",
            "# TYPE fleetsim_cycle_seconds_total counter",
            f"fleetsim_cycle_seconds_total {fleet.cycle_seconds:.6f}",
            "# HELP fleetsim_schedule_lag_seconds How late the last cycle started (max: since start).",
            "# TYPE fleetsim_schedule_lag_seconds gauge",
            f'fleetsim_schedule_lag_seconds{{of="last"}} {fleet.last_lag:.6f}',
            f'fleetsim_schedule_lag_seconds{{of="max"}} {fleet.max_lag:.6f}',
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def sd(request: web.Request) -> web.Response:
        return web.json_response(fleet.target_groups())

    async def call(fn: Callable[[], Any]) -> web.Response:
        # Starting a node runs its first collection cycle: off the event loop, so scrapes go on meanwhile.
        try:
            await asyncio.get_running_loop().run_in_executor(None, fn)
        except KeyError as exc:
            raise web.HTTPNotFound(text=f"{exc.args[0]}\n") from None
        except ConfigError as exc:
            raise web.HTTPBadRequest(text=f"{exc}\n") from None
        return web.json_response(fleet.describe())

    async def body(request: web.Request) -> dict[str, Any]:
        raw = await read_body(request, LIMITS)
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            raise web.HTTPBadRequest(text="body: expected JSON\n") from None
        if not isinstance(data, dict):
            raise web.HTTPBadRequest(text="body: expected a JSON object\n")
        return data

    async def list_nodes(request: web.Request) -> web.Response:
        return web.json_response(fleet.describe())

    async def add(request: web.Request) -> web.Response:
        data = await body(request)
        name = data.get("name")
        if not isinstance(name, str):
            raise web.HTTPBadRequest(text="name: expected a string\n")
        return await call(lambda: fleet.add_node(name, data.get("sim")))

    async def remove(request: web.Request) -> web.Response:
        return await call(lambda: fleet.remove_node(request.match_info["name"]))

    async def stop(request: web.Request) -> web.Response:
        return await call(lambda: fleet.stop_node(request.match_info["name"]))

    async def start_or_restart(request: web.Request) -> web.Response:
        data = await body(request)
        name, what = request.match_info["name"], request.match_info["what"]
        fn = fleet.start_node if what == "start" else fleet.restart_node
        return await call(lambda: fn(name, new_boot=bool(data.get("new_boot", False)),
                                     wipe_log=data.get("wipe_log"), sim=data.get("sim")))

    async def kernel_log(request: web.Request) -> web.Response:
        data = await body(request)
        lines = data.get("lines")
        if not isinstance(lines, list) or not all(isinstance(x, str) for x in lines):
            raise web.HTTPBadRequest(text="lines: expected a list of strings\n")
        return await call(lambda: fleet.append_kernel_log(request.match_info["name"], *lines))

    async def gap(request: web.Request) -> web.Response:
        data = await body(request)
        seconds = data.get("seconds")
        if not isinstance(seconds, int | float) or isinstance(seconds, bool):
            raise web.HTTPBadRequest(text="seconds: expected a number\n")
        return await call(lambda: fleet.gap_node(request.match_info["name"], float(seconds)))

    app.router.add_get("/node/{name}/metrics", node_metrics)
    app.router.add_get("/metrics", own_metrics)
    app.router.add_get("/sd", sd)
    app.router.add_get("/api/nodes", list_nodes)
    app.router.add_post("/api/nodes", add)
    app.router.add_delete("/api/nodes/{name}", remove)
    app.router.add_post("/api/nodes/{name}/stop", stop)
    app.router.add_post("/api/nodes/{name}/{what:start|restart}", start_or_restart)
    app.router.add_post("/api/nodes/{name}/kernel-log", kernel_log)
    app.router.add_post("/api/nodes/{name}/gap", gap)
    return app


class Server:
    """The app on its own thread and event loop; start() returns once the port is bound."""

    def __init__(self, fleet: FleetSim) -> None:
        self.fleet = fleet
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._port = 0
        self._error: BaseException | None = None

    def start(self, host: str, port: int) -> int:
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(host, port),), name="fleetsim-http",
                                        daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self._port

    async def _main(self, host: str, port: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        quiet_accept_errors(self._loop)
        try:
            runner = await serve(create_app(self.fleet), host, port, limits=LIMITS, counters=Counters(), backlog=4096)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._port = bound_port(runner)
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:
                pass  # the loop already ended
        if self._thread is not None:
            self._thread.join(10)
