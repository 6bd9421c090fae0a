"""A Kubernetes API outage for the fleet soak: a real HTTP hop between the webhook and kmock that, for a while,
answers every request with a 500 or answers it slowly.

kmock's reactions are matched before its emulator and cannot delay a request and then let the emulator answer it,
so the outage lives in front of it instead: everything is forwarded unchanged (method, path, query, headers with
the official client's User-Agent, body), so KubeFake.calls() still sees exactly what the webhook sent, except the
requests the outage answered itself, which never reached the API (as with a real API server that is down).

    front = KubeFront(kube.url)          # the webhook's kubernetes.host is front.url
    front.outage("500", seconds=30)      # or "slow": each request waits `slow_delay` before it is forwarded
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from gpu_health_common.serving import bound_port

from .kube import OFFICIAL_CLIENT

# Hop-by-hop headers, and what aiohttp computes again for the forwarded body.
_DROP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


@dataclass
class Outage:
    mode: str = ""  # "", "500" or "slow"
    until: float = 0.0  # time.monotonic()
    answered: dict[str, int] = field(default_factory=lambda: {"500": 0, "slow": 0})

    def now(self) -> str:
        return self.mode if self.mode and time.monotonic() < self.until else ""


class KubeFront:
    def __init__(self, target: str, *, slow_delay: float = 4.0) -> None:
        self.target = target.rstrip("/")
        self.slow_delay = slow_delay
        self.state = Outage()
        # (unix time, method, path with query, status, body) of every request the webhook's client sent
        # (official client User-Agent), answered by the outage or forwarded.
        self.log: list[tuple[float, str, str, int, bytes]] = []
        self.url = ""
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), name="kube-front", daemon=True)
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError("the Kubernetes API front did not start within 15 s")
        if self._error is not None:
            raise RuntimeError(f"the Kubernetes API front did not start: {self._error!r}")

    def outage(self, mode: str, seconds: float) -> None:
        if mode not in ("500", "slow"):
            raise ValueError(f"mode: expected '500' or 'slow', got {mode!r}")
        self.state.mode, self.state.until = mode, time.monotonic() + seconds

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        at = time.time()
        body = await request.read()
        response = await self._answer(request, body)
        if str(request.headers.get("User-Agent", "")).startswith(OFFICIAL_CLIENT):
            self.log.append((at, request.method, str(request.rel_url), response.status, body))
        return response

    async def _answer(self, request: web.Request, body: bytes) -> web.Response:
        mode = self.state.now()
        if mode == "500":
            self.state.answered["500"] += 1
            return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                      "reason": "InternalError", "code": 500,
                                      "message": "etcdserver: request timed out"}, status=500)
        if mode == "slow":
            self.state.answered["slow"] += 1
            await asyncio.sleep(self.slow_delay)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP}
        async with self._session.request(request.method, f"{self.target}{request.rel_url}", headers=headers,
                                          data=body or None) as upstream:
            data = await upstream.read()
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in _DROP}
            return web.Response(status=upstream.status, body=data, headers=out)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
            app = web.Application(client_max_size=64 * 1024 * 1024)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.url = f"http://127.0.0.1:{bound_port(runner)}"
        except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()
            await self._session.close()

    def close(self) -> None:
        if self.url:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
