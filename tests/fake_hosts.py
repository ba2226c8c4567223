"""A local HTTP server that plays the hosts LoRAs are downloaded from.

Routes are registered per test as (status, headers, body) or a callable; every request is
recorded, so tests can assert what did (or did not) touch the network. A body given as a list
(or any iterable) of chunks is sent without Content-Length, ended by closing the connection;
a RESET among the chunks aborts the connection there with a TCP reset instead. A Content-Length
given in the headers wins over the body's own, so a route can lie about it.

Faulty servers, for tests/test_download_faults.py: `host.trickle(...)`, `host.endless(...)` and
`host.stall(...)` are bodies that never end on their own, `host.slow(seconds, response)` a route
that answers late, and `host.raw(chunks)` one that writes whatever it is given, headers and all;
all of them give up when the host closes, so no thread outlives a test.

Beyond plain files it plays the three LoRA hubs, each on the paths the real one uses:

    host.serve_replicate("owner/model", tar_bytes)        # /owner/model/_weights -> 302 -> tar
    host.serve_hf_repo("owner/repo", {"a.safetensors": b"..."})
    host.serve_civitai(7, {70: {"lora.safetensors": b"..."}})
"""

from __future__ import annotations

import hashlib
import itertools
import json
import socket
import struct
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Reset:
    """Among a body's chunks: abort the connection at that point with a TCP reset (RST), as a crashed
    server or proxy does, rather than closing it cleanly."""


RESET = Reset()
Body = bytes | Iterable[bytes | Reset]
Response = tuple[int, dict[str, str], Body]
Route = Response | Callable[[BaseHTTPRequestHandler], Response | None]  # None: the route wrote its own answer
UNAUTHORIZED: Response = (401, {"Content-Type": "application/json"}, b'{"error": "Invalid credentials"}')


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case


@dataclass
class FakeHost:
    server: ThreadingHTTPServer
    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)  # the path (with query) of every request, in order
    calls: list[Call] = field(default_factory=list)  # the same requests, with method and headers
    closed: threading.Event = field(default_factory=threading.Event)  # set by close(): endless bodies stop

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def serve(self, path: str, body: Body, status: int = 200, headers: dict[str, str] | None = None) -> str:
        self.routes[path] = (status, headers or {}, body)
        return self.url + path

    def serve_replicate(
        self, model: str, archive: bytes, version: str | None = None, delivery: FakeHost | None = None
    ) -> str:
        """Replicate: `/<owner>/<model>[/versions/<v>]/_weights` redirects to the tar on a delivery path,
        on `delivery` when given (another host, as replicate.delivery is)."""
        weights = f"/{model}" + (f"/versions/{version}" if version else "") + "/_weights"
        tar_path = f"/delivery/{hashlib.sha256(weights.encode()).hexdigest()[:12]}/trained_model.tar"
        location = (delivery or self).serve(tar_path, archive, headers={"Content-Type": "application/x-tar"})
        self.serve(weights, b"", status=302, headers={"Location": location})
        return weights

    def serve_hf_repo(
        self, repo: str, files: dict[str, bytes], revision: str = "main", token: str | None = None
    ) -> str:
        """The Hugging Face Hub, as much as weights.py (and huggingface_hub's model_info and hf_hub_download)
        uses: the repo's info with its files (siblings), its file tree (snapshot_download), and HEAD/GET
        `/<repo>/resolve/<revision or commit>/<file>` with the commit and ETag headers. With `token`, every
        route wants `Authorization: Bearer <token>`."""
        sha = hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()
        siblings = [{"rfilename": name, "size": len(data)} for name, data in files.items()]
        info = json.dumps({"id": repo, "modelId": repo, "sha": sha, "private": bool(token), "siblings": siblings})
        for path in (f"/api/models/{repo}", f"/api/models/{repo}/revision/{urllib.parse.quote(revision, safe='')}"):
            self.routes[path] = _guarded(token, (200, {"Content-Type": "application/json"}, info.encode()))
        # The file tree snapshot_download lists (one page, files only: it wants no folder entries).
        tree = [
            {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            for name, data in files.items()
        ]
        for rev in (sha, revision):
            path = f"/api/models/{repo}/tree/{urllib.parse.quote(rev, safe='')}"
            self.routes[path] = _guarded(token, (200, {"Content-Type": "application/json"}, json.dumps(tree).encode()))
        for name, data in files.items():
            headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
            for rev in (sha, revision):
                path = f"/{repo}/resolve/{urllib.parse.quote(rev, safe='')}/{urllib.parse.quote(name)}"
                self.routes[path] = _guarded(token, (200, headers, data))
        return sha

    def serve_civitai(
        self,
        model_id: int,
        versions: dict[int, dict[str, bytes]],
        primary: str | None = None,
        token: str | None = None,
        storage: FakeHost | None = None,
    ) -> None:
        """CivitAI: `/api/v1/models/<id>` (versions newest first, as given), `/api/v1/model-versions/<v>`,
        and `/api/download/models/<v>[?type=&format=]` redirecting to a signed storage URL (on `storage`
        when given) that answers with Content-Disposition. `primary` names each version's primary file
        (default: its first). With `token`, the API and download routes want `Authorization: Bearer`."""
        listed = []
        for version_id, files in versions.items():
            entries = []
            for index, (name, data) in enumerate(files.items()):
                is_primary = name == primary if primary else index == 0
                fmt = {".safetensors": "SafeTensor", ".pt": "PickleTensor"}.get(name[name.rfind(".") :], "Other")
                query = "" if is_primary else f"?type=Model&format={fmt}"
                download = f"/api/download/models/{version_id}{query}"
                stored = (storage or self).serve(
                    f"/storage/{version_id}/{index}",
                    data,
                    headers={"Content-Disposition": f'attachment; filename="{name}"'},
                )
                self.routes[download] = _guarded(token, (307, {"Location": stored + "?X-Amz-Signature=s3cr3tsig"}, b""))
                entries.append(
                    {
                        "id": version_id * 100 + index,
                        "name": name,
                        "sizeKB": len(data) / 1024,
                        "type": "Model",
                        "primary": is_primary,
                        "metadata": {"format": fmt},
                        "downloadUrl": "https://civitai.com" + download,
                    }
                )
            version = {"id": version_id, "modelId": model_id, "files": entries}
            self.routes[f"/api/v1/model-versions/{version_id}"] = _guarded(token, _json(version))
            listed.append(version)
        self.routes[f"/api/v1/models/{model_id}"] = _guarded(token, _json({"id": model_id, "modelVersions": listed}))

    def trickle(self, data: bytes = b"x", every_s: float = 0.1) -> Iterator[bytes]:
        """A body that sends one byte of `data` (repeated) every `every_s` seconds, forever."""
        for byte in itertools.cycle(data):
            if self.closed.wait(every_s):
                return
            yield bytes([byte])

    def endless(self, chunk: bytes = bytes(64 * 1024)) -> Iterator[bytes]:
        """A body that sends `chunk` again and again, as fast as the client reads, forever."""
        while not self.closed.is_set():
            yield chunk

    def stall(self, first: bytes = b"") -> Iterator[bytes]:
        """A body that sends `first`, then nothing more, with the connection left open."""
        yield first
        self.closed.wait()

    def slow(self, seconds: float, response: Response) -> Callable[[BaseHTTPRequestHandler], Response]:
        """A route that answers with `response` only after `seconds` (headers included)."""

        def answer(handler: BaseHTTPRequestHandler) -> Response:
            self.closed.wait(seconds)
            return response

        return answer

    def raw(self, chunks: Iterable[bytes]) -> Callable[[BaseHTTPRequestHandler], None]:
        """A route that writes `chunks` to the connection as they come, HTTP status line and headers included:
        with `trickle`, a server that sends its headers a byte at a time."""

        def answer(handler: BaseHTTPRequestHandler) -> None:
            with suppress(BrokenPipeError, ConnectionResetError):
                for chunk in chunks:
                    handler.wfile.write(chunk)
                    handler.wfile.flush()
            handler.close_connection = True

        return answer

    def count(self, path: str) -> int:
        """How many requests asked for `path` (with or without a query)."""
        return sum(1 for requested in self.requests if requested.split("?")[0] == path)

    def close(self) -> None:
        self.closed.set()
        self.server.shutdown()
        self.server.server_close()


def start_fake_host() -> FakeHost:
    host: FakeHost

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
            self._answer(send_body=True)

        def do_HEAD(self) -> None:  # noqa: N802 - the name http.server calls
            self._answer(send_body=False)

        def _answer(self, send_body: bool) -> None:
            host.requests.append(self.path)
            host.calls.append(Call(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
            route = host.routes.get(self.path) or host.routes.get(self.path.split("?")[0])
            response = (404, {}, b"not found") if route is None else _resolve(route, self)
            if response is None:
                return
            status, headers, body = response
            self.send_response(status)
            sized = {"Content-Length": str(len(body))} if isinstance(body, bytes) else {}
            for name, value in {**sized, **headers}.items():
                self.send_header(name, value)
            self.end_headers()
            if send_body:
                try:
                    for chunk in [body] if isinstance(body, bytes) else body:
                        if isinstance(chunk, Reset):
                            return self._reset()
                        self.wfile.write(chunk)
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):  # the client hung up, as it may
                    self.close_connection = True

        def _reset(self) -> None:
            # SO_LINGER with a zero timeout makes close() send RST rather than FIN.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    host = FakeHost(server)
    # A short poll keeps close() (which waits for the next poll) from adding half a second to every test.
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return host


def _resolve(route: Route, handler: BaseHTTPRequestHandler) -> Response | None:
    return route(handler) if callable(route) else route


def _json(value: Any) -> Response:
    return (200, {"Content-Type": "application/json"}, json.dumps(value).encode())


def _guarded(token: str | None, response: Response) -> Route:
    if token is None:
        return response

    def answer(handler: BaseHTTPRequestHandler) -> Response:
        return response if handler.headers.get("Authorization") == f"Bearer {token}" else UNAUTHORIZED

    return answer
