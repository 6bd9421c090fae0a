"""Serving HTTP to clients that may be hostile, for both services (aiohttp).

aiohttp by itself waits for ever on a connection that sends half a request, accepts every connection until the
process runs out of file descriptors, and then logs a traceback per failed accept. So, here, once for both:

- **read timeout** (`read_timeout`): a request's headers must arrive within it of the connection opening (or of
  the previous response, keep-alive): aiohttp's keep-alive timer, which also runs before the first request,
  closes a connection that is idle or still sending headers. A body is read under the same deadline
  (`read_body`, 408 past it). A TLS handshake gets the same time.
- **connection caps** (`max_connections`, and `max_connections_per_client` per source address): past either a
  new connection is closed at accept, before anything is read, so one client cannot take every slot.
- **write deadline**: a client that stops reading its response (its send buffer stays full for a read timeout,
  checked once per read timeout) is disconnected; otherwise its connection and the unsent response stay for ever.
- **file descriptors**: the soft RLIMIT_NOFILE is raised to the hard limit at start (a pod spec has no rlimit
  field; the systemd units set LimitNOFILE), and "out of system resource" on accept is logged once a minute, with
  a count, instead of a traceback per attempt.
- **bytes in flight** (`ByteBudget`, the webhook's `max_bytes_in_flight`): the request bodies being read or
  handled at once are bounded; past it a request waits, then gets 503 with Retry-After.

aiohttp has no separate deadline for the headers of a request on a kept-alive connection after the first: the
read timeout covers the whole wait, from the previous response to the end of the headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

log = logging.getLogger("gpu_health_common.serving")

# The most file descriptors asked for when the hard limit is unlimited (Linux's default fs.nr_open).
_NOFILE_CEILING = 1 << 20


@dataclass(frozen=True)
class Limits:
    """What one listener allows a client. The defaults suit a scrape target or a webhook receiver."""

    read_timeout: float = 10.0
    # An idle connection costs about 5 KB of RSS: 4096 is about 20 MB, and well under the soft open-file limit
    # once it is raised (systemd units set 65536).
    max_connections: int = 4096
    max_connections_per_client: int = 256

    def __post_init__(self) -> None:
        if self.read_timeout <= 0:
            raise ValueError("read_timeout must be positive")
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if self.max_connections_per_client < 1:
            raise ValueError("max_connections_per_client must be at least 1")


@dataclass
class Counters:
    """What the limits turned away (for tests and a service's metrics); refusals are logged once a minute."""

    refused_connections: int = 0
    refused_per_client: int = 0
    stalled_writes: int = 0
    timed_out_bodies: int = 0
    _logged_at: dict[str, float] = field(default_factory=dict)
    _logged_count: dict[str, int] = field(default_factory=dict)

    def refused(self, cap: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.refused_connections += 1
        self._log("cap", clock, self.refused_connections, "connection cap reached: new connections are closed at once",
                  max_connections=cap)

    def refused_client(self, cap: int, client: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.refused_per_client += 1
        self._log("client", clock, self.refused_per_client,
                  "a client reached the per-client connection cap: its new connections are closed at once",
                  max_connections_per_client=cap, client=client)

    def stalled(self, client: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.stalled_writes += 1
        self._log("stalled", clock, self.stalled_writes,
                  "a client stopped reading its response: connection dropped", client=client)

    def _log(self, what: str, clock: Callable[[], float], total: int, message: str, **extra: object) -> None:
        now = clock()
        if now - self._logged_at.get(what, float("-inf")) >= 60.0:
            log.warning(message, extra={**extra, "times": total - self._logged_count.get(what, 0)})
            self._logged_at[what], self._logged_count[what] = now, total


class _Refused(asyncio.Protocol):
    """The protocol of a connection over the cap: closed as soon as it is made, nothing read, nothing written."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()  # type: ignore[attr-defined]


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, behind what aiohttp lacks: the per-client cap, decided once the peer
    is known, and a write deadline. Everything else is passed through."""

    def __init__(self, site: _Site) -> None:
        self._site = site
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._client = ""
        self._timer: asyncio.TimerHandle | None = None
        self._pending = 0  # unsent response bytes at the last check

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        site = self._site
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        held = site.clients.get(client, 0)
        if held >= site.limits.max_connections_per_client:
            site.counters.refused_client(site.limits.max_connections_per_client, client)
            transport.abort()  # type: ignore[attr-defined]
            return
        site.clients[client] = held + 1
        self._client = client
        self._transport = transport  # type: ignore[assignment]
        server = site.server()
        self._inner = server
        server.connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self._site.limits.read_timeout, self._check)

    def _check(self) -> None:
        # Stalled: unsent bytes at two checks in a row and none of them sent meanwhile. A response is written in
        # one go, so a reader that keeps up never leaves the buffer at the same size or larger.
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        pending = transport.get_write_buffer_size()
        if pending and self._pending and pending >= self._pending:
            self._site.counters.stalled(self._client)
            transport.abort()
            return
        self._pending = pending
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        clients = self._site.clients
        clients[self._client] -= 1
        if not clients[self._client]:
            del clients[self._client]
        self._transport = None
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


class _Site(web.TCPSite):
    """TCPSite whose server refuses connections over the caps at accept, drops clients that stop reading, and
    bounds the TLS handshake."""

    def __init__(self, runner: web.AppRunner, host: str | None, port: int, *, ssl_context: ssl.SSLContext | None,
                 limits: Limits, counters: Counters, backlog: int = 128) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context, backlog=backlog)
        self.limits = limits
        self.counters = counters
        self.clients: dict[str, int] = {}  # open connections per source address

    def server(self) -> asyncio.Protocol:
        server = self._runner.server
        assert server is not None
        return server()

    def _protocol(self) -> asyncio.BaseProtocol:
        server = self._runner.server
        assert server is not None
        if len(server.connections) >= self.limits.max_connections:
            self.counters.refused(self.limits.max_connections)
            return _Refused()
        return _Guarded(self)

    async def start(self) -> None:
        # TCPSite.start, with our protocol factory and a handshake deadline (it has neither).
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port,
            ssl_handshake_timeout=self.limits.read_timeout if self._ssl_context else None)
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port


async def serve(app: web.Application, host: str | None, port: int, *, limits: Limits, counters: Counters,
                ssl_context: ssl.SSLContext | None = None, backlog: int = 128) -> web.AppRunner:
    """Start `app` on host:port under `limits`; the caller cleans the returned runner up."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=limits.read_timeout)
    await runner.setup()
    site = _Site(runner, host, port, ssl_context=ssl_context, limits=limits, counters=counters, backlog=backlog)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


async def run_forever(app: web.Application, host: str | None, port: int, *, limits: Limits, counters: Counters,
                      ssl_context: ssl.SSLContext | None = None,
                      on_listening: Callable[[int], None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT (the exporter's main loop); `on_listening` gets the bound port once the
    socket is bound, so "listening" is never said of a port that could not be had."""
    import signal

    loop = asyncio.get_running_loop()
    quiet_accept_errors(loop)
    runner = await serve(app, host, port, limits=limits, counters=counters, ssl_context=ssl_context)
    if on_listening is not None:
        on_listening(bound_port(runner))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def bound_port(runner: web.AppRunner) -> int:
    """The port the runner's site listens on (port 0 asked for any free one)."""
    site = next(iter(runner.sites))
    assert isinstance(site, web.TCPSite)
    return site.port


async def read_body(request: web.Request, limits: Limits, counters: Counters | None = None) -> bytes:
    """The request's body, read within the read timeout (a client that sends it a byte at a time gets 408)."""
    try:
        async with asyncio.timeout(limits.read_timeout):
            return await request.read()
    except TimeoutError:
        if counters is not None:
            counters.timed_out_bodies += 1
        raise web.HTTPRequestTimeout(text=f"request body not received within {limits.read_timeout:g}s\n",
                                     headers={"Connection": "close"}) from None


class Overloaded(Exception):
    """The byte budget stayed full for the whole wait: answer 503 with Retry-After."""


class ByteBudget:
    """Request bytes in flight across all concurrent requests, bounded: what a flood of large bodies can make the
    process hold (the body, and what parsing it builds) stops at a figure the operator chose. A request that does
    not fit waits for others to finish, up to `wait` seconds, then is refused (Overloaded)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.used = 0
        self.refused = 0
        self._freed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, n: int, wait: float) -> AsyncIterator[None]:
        n = max(1, min(n, self.limit))  # one larger than the budget runs alone
        try:
            async with asyncio.timeout(wait), self._freed:
                await self._freed.wait_for(lambda: self.used + n <= self.limit)
                self.used += n
        except TimeoutError:
            self.refused += 1
            raise Overloaded(f"{self.used} of {self.limit} request bytes in flight") from None
        try:
            yield
        finally:
            async with self._freed:
                self.used -= n
                self._freed.notify_all()


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard limit; (soft before, soft now)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = _NOFILE_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit", extra={"soft": soft, "hard": hard, "error": str(exc)})
            return soft, soft
    now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    log.info("open-file limit", extra={"soft_before": soft, "soft": now, "hard": hard})
    return soft, now


def quiet_accept_errors(loop: asyncio.AbstractEventLoop, *, every: float = 60.0,
                        clock: Callable[[], float] = time.monotonic) -> None:
    """Log "out of system resource" on accept (EMFILE: too many open files) at most once per `every` seconds, with
    how many times it happened meanwhile; everything else goes to the loop's previous handler."""
    previous = loop.get_exception_handler()
    state = {"last": float("-inf"), "count": 0}

    def handler(lp: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if "out of system resource" not in str(context.get("message", "")):
            if previous is not None:
                previous(lp, context)
            else:
                lp.default_exception_handler(context)
            return
        state["count"] += 1
        now = clock()
        if now - state["last"] >= every:
            log.error("cannot accept connections: out of file descriptors (or memory); raise LimitNOFILE, lower the "
                      "connection cap, or find the client holding connections open",
                      extra={"error": str(context.get("exception")), "times": state["count"]})
            state["last"], state["count"] = now, 0

    loop.set_exception_handler(handler)
