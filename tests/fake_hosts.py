"""A local HTTP server that plays the hosts LoRAs are downloaded from.

Routes are registered per test as (status, headers, body) or a callable; every request is
recorded, so tests can assert what did (or did not) touch the network.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Response = tuple[int, dict[str, str], bytes]


@dataclass
class FakeHost:
    server: ThreadingHTTPServer
    routes: dict[str, Response | Callable[[BaseHTTPRequestHandler], Response]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def serve(self, path: str, body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> str:
        self.routes[path] = (status, headers or {}, body)
        return self.url + path

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_fake_host() -> FakeHost:
    host: FakeHost

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
            host.requests.append(self.path)
            route = host.routes.get(self.path) or host.routes.get(self.path.split("?")[0])
            status, headers, body = (404, {}, b"not found") if route is None else _resolve(route, self)
            self.send_response(status)
            for name, value in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    host = FakeHost(server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return host


def _resolve(route: Any, handler: BaseHTTPRequestHandler) -> Response:
    return route(handler) if callable(route) else route
