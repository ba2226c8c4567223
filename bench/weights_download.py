"""Weights download throughput: parallel ranged requests (model_weights.py) against one stream.

A local HTTP server with Range support serves one large file from memory. Object stores and CDNs
cap each connection's rate, which is why pget and model_weights.py open several; --per-connection
emulates such a cap (MB/s, 0 for none). Each figure is the median of --runs downloads into a fresh
folder, through the same bounded transport as production (watchdog, minimum rate, retries).

    PYTHONPATH=. .venv/bin/python bench/weights_download.py --size-mib 512 --per-connection 50

On loopback with no cap, both sides share this machine's cores, so the figures say more about
Python's overhead than about a network.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import model_weights
from downloads import Transfer, start_watchdog
from errors import WeightsError

RANGE = re.compile(r"bytes=(\d+)-(\d+)")
WRITE_BYTES = 256 * 1024


def serve(data: bytes, per_connection_bytes_s: float) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
            asked = RANGE.fullmatch(self.headers.get("Range", ""))
            start, end = (int(asked[1]), min(int(asked[2]), len(data) - 1)) if asked else (0, len(data) - 1)
            self.send_response(206 if asked else 200)
            if asked:
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header("ETag", '"bench"')
            self.end_headers()
            began, sent = time.monotonic(), 0
            view = memoryview(data)[start : end + 1]
            for offset in range(0, len(view), WRITE_BYTES):
                piece = view[offset : offset + WRITE_BYTES]
                self.wfile.write(piece)
                sent += len(piece)
                if per_connection_bytes_s:
                    ahead = sent / per_connection_bytes_s - (time.monotonic() - began)
                    if ahead > 0:
                        time.sleep(ahead)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def one_download(url: str, connections: int, part_bytes: int, size: int) -> float:
    os.environ["FLUX_WEIGHTS_DOWNLOAD_CONNECTIONS"] = str(connections)
    os.environ["FLUX_WEIGHTS_PART_BYTES"] = str(part_bytes)
    with tempfile.TemporaryDirectory(prefix="bench-download-") as folder:
        transfer = Transfer(
            "bench", url, start_watchdog("FLUX_WEIGHTS_DOWNLOAD_TIMEOUT_S", 3600), WeightsError, "x", "y", 60
        )
        start = time.perf_counter()
        try:
            got = model_weights._download(transfer, url, Path(folder) / "file", Path(folder) / "journal.json")
        finally:
            transfer.watchdog.stop()
        elapsed = time.perf_counter() - start
    assert got == size
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--per-connection", type=float, default=50.0, help="MB/s each connection may carry; 0: none")
    parser.add_argument("--connections", type=int, default=model_weights.CONNECTIONS)
    parser.add_argument("--part-mib", type=int, default=model_weights.PART_BYTES // 1024**2)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    size = args.size_mib * 1024**2
    data = os.urandom(size)
    server = serve(data, args.per_connection * 1e6)
    url = f"http://127.0.0.1:{server.server_address[1]}/weights.tar"
    cap = f"{args.per_connection:g} MB/s per connection" if args.per_connection else "no per-connection cap"
    print(f"{args.size_mib} MiB from a local server, {cap}, median of {args.runs}:")
    medians = {}
    for label, connections, part in (
        ("one stream", 1, size),
        (f"{args.connections} connections, {args.part_mib} MiB parts", args.connections, args.part_mib * 1024**2),
    ):
        times = [one_download(url, connections, part, size) for _ in range(args.runs)]
        medians[label] = statistics.median(times)
        print(f"  {label:<32} {medians[label]:7.2f} s  {size / medians[label] / 1e6:8.1f} MB/s")
    single, parallel = medians.values()
    print(f"  parallel / one stream throughput ratio: {single / parallel:.2f}")
    server.shutdown()


if __name__ == "__main__":
    main()
