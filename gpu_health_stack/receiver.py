"""A webhook receiver that only records what Alertmanager posts: for tests of the alerting chain itself."""

from __future__ import annotations

import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class LoopbackServer:
    """A ThreadingHTTPServer on 127.0.0.1 serving `handler` from a daemon thread; HTTPS with `tls` (certificate
    file, key file). What the harness's and the tests' fake HTTP services share."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], *, tls: tuple[str, str] | None = None,
                 poll_interval: float = 0.5, name: str | None = None) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": poll_interval},
                                        daemon=True, name=name)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class RecordingReceiver:
    def __init__(self) -> None:
        self.notifications: list[tuple[float, dict[str, Any]]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    receiver.notifications.append((time.time(), json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._http = LoopbackServer(Handler)
        self.url = f"{self._http.url}/v1/alerts"

    def alerts(self, status: str | None = None) -> list[tuple[float, dict[str, Any]]]:
        """Every alert of every notification, with the time its notification arrived."""
        with self._lock:
            return [(t, a) for t, n in self.notifications for a in n["alerts"] if status in (None, a["status"])]

    def close(self) -> None:
        self._http.close()
