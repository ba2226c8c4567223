"""The bounded HTTP transport every download goes through: LoRAs (weights.py) and model weights
(model_weights.py).

requests and huggingface_hub bound each wait for a server, not a whole download, and not a server
that trickles bytes just often enough. So every transfer here has:
- a connect and a read timeout (the longest silence);
- an overall deadline, after which every socket the transfer opened is shut down, so a blocked
  read returns at once;
- a minimum transfer rate, as curl's --speed-limit/--speed-time: a transfer that receives fewer
  than FLUX_DOWNLOAD_MIN_BYTES_PER_S bytes a second over any FLUX_DOWNLOAD_MIN_RATE_WINDOW_S
  seconds is cut the same way;
- a bounded number of redirects and of retries, with backoff, for transient failures.

Secrets never reach a message or a log: sources are shown without their query string or
userinfo, a token goes only to the host it belongs to, errors are raised `from None` so that no
chained exception carries a URL, and the HTTP libraries' request lines lose their query strings.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, TypeVar

import requests
from urllib3.exceptions import DecodeError, ProtocolError, ReadTimeoutError, SSLError

log = logging.getLogger(__name__)
# Their request lines carry whole URLs, signatures included, at INFO (httpx2) and DEBUG (urllib3): raised to
# WARNING, and, should a deployment turn them back down, stripped of query strings by a filter (see the end).
for _library in ("httpx2", "urllib3"):
    logging.getLogger(_library).setLevel(max(logging.getLogger(_library).level, logging.WARNING))

CONNECT_TIMEOUT_S = 10
MAX_REDIRECTS = 10
CHUNK_BYTES = 1024 * 1024
ATTEMPTS = 3
RETRY_BACKOFF_S = 0.5  # doubles after each failed attempt
MIN_BYTES_PER_S = 32 * 1024  # FLUX_DOWNLOAD_MIN_BYTES_PER_S; 0 turns the check off
MIN_RATE_WINDOW_S = 30  # FLUX_DOWNLOAD_MIN_RATE_WINDOW_S
_T = TypeVar("_T")


def seconds(name: str, default: float, *, allow_zero: bool = False) -> float:
    """A positive number from the environment, else `default` (read per transfer, so tests and deployments
    may change it)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0 <= value if allow_zero else 0 < value) or not value < math.inf:
        log.warning("%s=%r is not a positive number; using %g.", name, text, default)
        return default
    return value


def redact(source: str) -> str:
    """The source as it may be shown: no query string (signatures), no user:password."""
    source = source.strip()
    parsed = urllib.parse.urlsplit(source)
    if parsed.scheme.lower() in ("http", "https"):
        host = parsed.hostname or ""
        if parsed.port:
            host += f":{parsed.port}"
        return urllib.parse.urlunsplit((parsed.scheme, host, parsed.path, "", ""))
    if parsed.scheme.lower() == "data":
        return source[: source.find(",") + 1] + "..." if "," in source else "data:..."
    return source.split("?")[0].split("#")[0]


class Watchdog:
    """A transfer's overall deadline and minimum rate. Either one, once broken, shuts down every socket the
    transfer opened: a blocked read returns at once, and the transfer sees `expired` and `reason`."""

    def __init__(self, deadline_s: float, min_bytes_per_s: float = 0, window_s: float = MIN_RATE_WINDOW_S):
        self.seconds = deadline_s
        self.min_bytes_per_s = min_bytes_per_s
        self.window_s = window_s
        self.expired = False
        self.reason = ""  # "deadline" or "rate"
        self.received = 0
        self._start = time.monotonic()
        self._deadline = self._start + deadline_s
        self._sockets: list[socket.socket] = []
        self._guard = threading.Lock()
        self._stopped = threading.Event()
        self._samples: collections.deque[tuple[float, int]] = collections.deque([(self._start, 0)])
        threading.Thread(target=self._watch, name="download-watchdog", daemon=True).start()

    def remaining(self) -> float:
        return max(0.0, self._deadline - time.monotonic())

    def progress(self, count: int) -> None:
        with self._guard:
            self.received += count

    def watch(self, sock: socket.socket) -> None:
        with self._guard:
            self._sockets.append(sock)
            if self.expired:
                _shut(sock)

    def _watch(self) -> None:
        tick = min(1.0, self.window_s / 4) if self.min_bytes_per_s else 1.0
        while not self._stopped.wait(min(tick, max(self.remaining(), 0.01))):
            now = time.monotonic()
            with self._guard:
                received = self.received
            self._samples.append((now, received))
            while len(self._samples) > 1 and self._samples[1][0] <= now - self.window_s:
                self._samples.popleft()
            if now >= self._deadline:
                return self._expire("deadline")
            oldest_time, oldest_count = self._samples[0]
            if (
                self.min_bytes_per_s
                and now - oldest_time >= self.window_s
                and received - oldest_count < self.min_bytes_per_s * self.window_s
            ):
                return self._expire("rate")

    def _expire(self, reason: str) -> None:
        with self._guard:
            self.expired, self.reason = True, reason
            for sock in self._sockets:
                _shut(sock)

    def stop(self) -> None:
        self._stopped.set()
        with self._guard:
            self._sockets.clear()


def _shut(sock: socket.socket) -> None:
    # socket.socket's own shutdown, also for an SSLSocket: it acts on the descriptor, whatever TLS is doing.
    with suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _WatchedAdapter(requests.adapters.HTTPAdapter):
    """Hands every socket its connections open to the watchdog."""

    def __init__(self, watchdog: Watchdog):
        self._watchdog = watchdog
        super().__init__()

    def get_connection_with_tls_context(self, *args: Any, **kwargs: Any) -> Any:
        pool = super().get_connection_with_tls_context(*args, **kwargs)
        if not getattr(pool.ConnectionCls, "_watchdog", None):
            watchdog, base = self._watchdog, pool.ConnectionCls

            class Watched(base):  # type: ignore[misc, valid-type]
                _watchdog = watchdog

                def _new_conn(self) -> socket.socket:
                    sock = super()._new_conn()
                    watchdog.watch(sock)
                    return sock

            pool.ConnectionCls = Watched
        return pool


def session(watchdog: Watchdog) -> requests.Session:
    opened = requests.Session()
    opened.max_redirects = MAX_REDIRECTS
    adapter = _WatchedAdapter(watchdog)
    opened.mount("http://", adapter)
    opened.mount("https://", adapter)
    return opened


@dataclass
class Transfer:
    """One download's bounds, and how its errors read: "Invalid <input_name> '<shown>': <problem>."."""

    input_name: str  # the request input or deployment setting that named the source
    shown: str  # the source, redacted
    watchdog: Watchdog
    error_type: type[Exception]
    deadline_setting: str  # the setting that holds the overall deadline, named in its message
    read_timeout_setting: str
    read_timeout_s: float

    def error(self, problem: str) -> Exception:
        return self.error_type(f"Invalid {self.input_name} {self.shown!r}: {problem}.")

    def cut_off(self) -> Exception:
        if self.watchdog.reason == "rate":
            return self.error(
                f"the download ran slower than {self.watchdog.min_bytes_per_s:g} bytes a second for "
                f"{self.watchdog.window_s:g} s (FLUX_DOWNLOAD_MIN_BYTES_PER_S, FLUX_DOWNLOAD_MIN_RATE_WINDOW_S)"
            )
        return self.error(
            f"the download took longer than the {self.watchdog.seconds:g} s allowed ({self.deadline_setting})"
        )


def start_watchdog(deadline_setting: str, deadline_s: float) -> Watchdog:
    return Watchdog(
        seconds(deadline_setting, deadline_s),
        seconds("FLUX_DOWNLOAD_MIN_BYTES_PER_S", MIN_BYTES_PER_S, allow_zero=True),
        seconds("FLUX_DOWNLOAD_MIN_RATE_WINDOW_S", MIN_RATE_WINDOW_S),
    )


def body(transfer: Transfer, response: requests.Response, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The response body as it arrives, each piece counted toward the minimum rate.

    requests' iter_content asks urllib3 for whole chunks and waits until each is full, so a slow but
    acceptable server would look idle between chunks; urllib3's read1 returns what one socket read gave.
    The error translation is iter_content's own."""
    raw = response.raw
    try:
        while True:
            piece = raw.read1(chunk_bytes, decode_content=True)
            if not piece:
                return
            transfer.watchdog.progress(len(piece))
            yield piece
    except ProtocolError as error:
        raise requests.exceptions.ChunkedEncodingError(error) from None
    except DecodeError as error:
        raise requests.exceptions.ContentDecodingError(error) from None
    except ReadTimeoutError as error:
        raise requests.ConnectionError(error) from None
    except SSLError as error:
        raise requests.exceptions.SSLError(error) from None


def fetch(
    transfer: Transfer,
    url: str,
    token_var: str | None,
    use: Callable[[requests.Response], _T],
    headers: dict[str, str] | None = None,
    opened: requests.Session | None = None,
) -> _T:
    """GET `url` and hand the response to `use`, retrying connection errors, timeouts, 429 and 5xx with
    backoff, within the transfer's deadline. The token goes to `url`'s host only: requests drops
    Authorization on a redirect to another host."""
    token = os.environ.get(token_var) if token_var else None
    headers = {**(headers or {}), **({"Authorization": f"Bearer {token}"} if token else {})}
    watchdog = transfer.watchdog
    problem = ""
    with opened or session(watchdog) as http:
        for attempt in range(ATTEMPTS):
            if attempt:
                time.sleep(min(RETRY_BACKOFF_S * 2 ** (attempt - 1), watchdog.remaining()))
            if watchdog.expired or not watchdog.remaining():
                raise transfer.cut_off()
            timeout = (min(CONNECT_TIMEOUT_S, watchdog.remaining()), min(transfer.read_timeout_s, watchdog.remaining()))
            try:
                with http.get(url, headers=headers, stream=True, timeout=timeout) as answer:
                    if answer.status_code == 429 or answer.status_code >= 500:
                        problem = f"the server answered HTTP {answer.status_code}"
                        log.info(
                            "Download for %s: HTTP %d, attempt %d of %d.",
                            transfer.input_name,
                            answer.status_code,
                            attempt + 1,
                            ATTEMPTS,
                        )
                        continue
                    if answer.status_code >= 400:
                        raise transfer.error(status_problem(answer.status_code, token_var))
                    try:
                        result = use(answer)
                    except transfer.error_type:
                        if watchdog.expired:  # what `use` made of a body that the watchdog cut short
                            raise transfer.cut_off() from None
                        raise
                if watchdog.expired:  # the watchdog cut the body short where no Content-Length showed it
                    raise transfer.cut_off()
                return result
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as error:
                if watchdog.expired:
                    raise transfer.cut_off() from None
                problem = f"the download failed: {describe(error, transfer.read_timeout_setting)}"
                log.info(
                    "Download for %s: %s, attempt %d of %d.",
                    transfer.input_name,
                    describe(error, transfer.read_timeout_setting),
                    attempt + 1,
                    ATTEMPTS,
                )
            except requests.RequestException as error:
                if watchdog.expired:
                    raise transfer.cut_off() from None
                raise transfer.error(f"the download failed: {describe(error, transfer.read_timeout_setting)}") from None
    raise transfer.error(problem)


def status_problem(status: int, token_var: str | None) -> str:
    if status == 404:
        return "not found (HTTP 404)"
    if status in (401, 403):
        fix = f"set {token_var} to a token that may read it" if token_var else "the file needs a token or a signed URL"
        return f"access denied (HTTP {status}); {fix}"
    return f"the server answered HTTP {status}"


_DESCRIPTIONS: tuple[tuple[type[Exception], str], ...] = (
    (requests.Timeout, "the server did not answer in time ({read_timeout_setting})"),
    (requests.exceptions.ChunkedEncodingError, "the connection broke off before the end of the file"),
    (requests.TooManyRedirects, f"the server redirected more than {MAX_REDIRECTS} times"),
    (requests.exceptions.ContentDecodingError, "the server's compressed answer cannot be decoded"),
    (requests.ConnectionError, "the connection failed"),
)


def describe(error: Exception, read_timeout_setting: str) -> str:
    # Only the kind of error: its own text carries the URL, signature and all.
    if isinstance(error, requests.ConnectionError) and error.args and isinstance(error.args[0], ReadTimeoutError):
        error = requests.Timeout()  # requests reports a read timeout while streaming the body as a ConnectionError
    text = next((text for kind, text in _DESCRIPTIONS if isinstance(error, kind)), type(error).__name__)
    return text.format(read_timeout_setting=read_timeout_setting)


class _RedactQueries(logging.Filter):
    """Strips query strings (signatures) from the HTTP libraries' own log records, should a deployment set
    them to DEBUG or INFO."""

    _QUERY = re.compile(r"\?[^\s\"'<>]*")

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: logging reports it as usual, after the filters
            return True
        if "?" in message:
            record.msg, record.args = self._QUERY.sub("?...", message), None
        return True


for _library in ("urllib3.connectionpool", "urllib3.connection", "urllib3.poolmanager", "urllib3.util.retry", "httpx2"):
    logging.getLogger(_library).addFilter(_RedactQueries())
