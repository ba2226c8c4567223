"""Model weights a deployment setting names as an http(s) URL of a .tar of a diffusers-format folder.

A pushed model version gets no environment from its callers, so it cannot hold an HF_TOKEN for the
gated FLUX.1-dev repository; Replicate's own FLUX predictors fetch tarballs at setup with pget
instead. This does the same: the tar is fetched with parallel ranged requests, through downloads.py's
bounded transport (deadline, minimum rate, retries, no secret in any message), into a cache folder.
Finished parts are recorded as they land, so a start cut off mid-way resumes where it stopped. The
file's size is checked against the server's, the tar is unpacked member by member with Python's `data`
filter (no absolute paths, no `..`, no links out, no devices), and the folder must hold
model_index.json or config.json. Only then is it marked complete, and a later start with the same
URL uses it without a request. A signed URL may be signed anew: the cache key leaves the query out.

huggingface_hub does parallel downloads only for its own hub; a plain URL has no client in the
field's libraries that does ranged, resumable, bounded transfers, hence this module.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager, suppress
from pathlib import Path

import requests

from downloads import Transfer, body, fetch, redact, seconds, session, start_watchdog
from errors import WeightsError

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 4 * 3600  # FLUX_WEIGHTS_DOWNLOAD_TIMEOUT_S: ~58 GB at 4 MB/s
READ_TIMEOUT_S = 60  # FLUX_WEIGHTS_READ_TIMEOUT_S
CONNECTIONS = 8  # FLUX_WEIGHTS_DOWNLOAD_CONNECTIONS
PART_BYTES = 64 * 1024**2  # FLUX_WEIGHTS_PART_BYTES: the unit of parallelism and of resumption
CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
MARKER = "complete.json"


def is_weights_url(value: str) -> bool:
    return value.lower().startswith(("http://", "https://"))


def cache_folder() -> Path:
    return Path(os.environ.get("FLUX_WEIGHTS_CACHE_DIR") or Path(tempfile.gettempdir()) / "flux-weights-cache")


def fetch_weights(setting: str, url: str, cache: Path | None = None) -> Path:
    """The local diffusers folder the tar at `url` unpacks to; downloaded once, then from the cache."""
    shown = redact(url)
    folder = (cache or cache_folder()) / hashlib.sha256(shown.encode()).hexdigest()[:24]
    unpacked = folder / "weights"
    if (folder / MARKER).is_file() and unpacked.is_dir():
        log.info("%s: %s, from the cache (%s).", setting, shown, unpacked)
        return unpacked
    watchdog = start_watchdog("FLUX_WEIGHTS_DOWNLOAD_TIMEOUT_S", DOWNLOAD_TIMEOUT_S)
    transfer = Transfer(
        setting,
        shown,
        watchdog,
        WeightsError,
        "FLUX_WEIGHTS_DOWNLOAD_TIMEOUT_S",
        "FLUX_WEIGHTS_READ_TIMEOUT_S",
        seconds("FLUX_WEIGHTS_READ_TIMEOUT_S", READ_TIMEOUT_S),
    )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _locked(folder):  # another server sharing the cache may be fetching it
            if (folder / MARKER).is_file() and unpacked.is_dir():
                return unpacked
            archive = folder / "download.tar"
            size = _download(transfer, url, archive, folder / "download.json")
            _unpack(transfer, archive, folder, size)
            archive.unlink()
            (folder / "download.json").unlink(missing_ok=True)
            (folder / MARKER).write_text(json.dumps({"source": shown, "bytes": size}))
            log.info("%s: %s unpacked into %s.", setting, shown, unpacked)
            return unpacked
    except OSError as error:
        raise transfer.error(_disk_problem(folder, error)) from None
    finally:
        watchdog.stop()


def _disk_problem(folder: Path, error: OSError) -> str:
    if error.errno == errno.ENOSPC:
        return f"the disk holding {folder.parent} is full (FLUX_WEIGHTS_CACHE_DIR names another folder)"
    return f"the weights cache {folder.parent} cannot be written ({error.strerror or type(error).__name__})"


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    with (folder / ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


# --- the download ------------------------------------------------------------------------------


def _download(transfer: Transfer, url: str, archive: Path, journal: Path) -> int:
    """The whole file in `archive`; returns its size. Parts already recorded in `journal` are kept."""
    probe = fetch(transfer, url, None, lambda answer: _probe(transfer, answer), headers={"Range": "bytes=0-0"})
    if probe is None:  # the server ignores ranges: one stream
        log.info("%s: the server does not take ranged requests; downloading in one stream.", transfer.input_name)
        return fetch(transfer, url, None, lambda answer: _whole(transfer, answer, archive))
    size, validator = probe
    part_bytes = int(seconds("FLUX_WEIGHTS_PART_BYTES", PART_BYTES))
    parts = [(start, min(start + part_bytes, size) - 1) for start in range(0, size, part_bytes)]
    state = {"source": transfer.shown, "size": size, "validator": validator, "part_bytes": part_bytes}
    done = _resumable_parts(journal, archive, state)
    missing = [index for index in range(len(parts)) if index not in done]
    needed = sum(parts[i][1] - parts[i][0] + 1 for i in missing) + size  # what is left, then the unpacked copy
    free = shutil.disk_usage(archive.parent).free
    if free < needed:
        raise transfer.error(
            f"it needs {needed:,} bytes of disk in {archive.parent.parent} to download and unpack, and "
            f"{free:,} are free (FLUX_WEIGHTS_CACHE_DIR names another folder)"
        )
    if done:
        log.info("%s: resuming, %d of %d parts already here.", transfer.input_name, len(done), len(parts))
    mode = "r+b" if archive.exists() else "w+b"
    with archive.open(mode) as file:
        file.truncate(size)
        connections = max(1, int(seconds("FLUX_WEIGHTS_DOWNLOAD_CONNECTIONS", CONNECTIONS)))
        guard, failed = threading.Lock(), threading.Event()

        def get(index: int) -> None:
            if failed.is_set():
                return
            start, end = parts[index]
            with session(transfer.watchdog) as opened:
                complete = fetch(
                    transfer,
                    url,
                    None,
                    lambda answer: _write_part(transfer, answer, file.fileno(), start, end, failed),
                    headers={"Range": f"bytes={start}-{end}"},
                    opened=opened,
                )
            if not complete:  # stopped because another part failed: not recorded, fetched on resume
                return
            with guard:
                done.add(index)
                _record(journal, {**state, "done": sorted(done)})

        with ThreadPoolExecutor(connections, thread_name_prefix="weights") as pool:
            futures = [pool.submit(get, index) for index in missing]
            finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
            errors = [future.exception() for future in finished if future.exception()]
            if errors:
                failed.set()  # the others stop at their next piece
                for future in futures:
                    future.cancel()
                raise errors[0]  # type: ignore[misc]
        os.fsync(file.fileno())
    if archive.stat().st_size != size:
        raise transfer.error(f"the file came out at {archive.stat().st_size:,} bytes, not the {size:,} announced")
    return size


def _probe(transfer: Transfer, answer: requests.Response) -> tuple[int, str] | None:
    """(size, validator) when the server answers ranges; None when it sends the whole file instead."""
    if answer.status_code != 206:
        return None
    found = CONTENT_RANGE.fullmatch(answer.headers.get("Content-Range", "").strip())
    if not found:
        raise transfer.error("the server's answer to a ranged request has no usable Content-Range")
    validator = answer.headers.get("ETag") or answer.headers.get("Last-Modified") or ""
    return int(found[3]), validator


def _whole(transfer: Transfer, answer: requests.Response, archive: Path) -> int:
    written = 0
    with archive.open("wb") as file:
        for piece in body(transfer, answer):
            file.write(piece)
            written += len(piece)
    length = answer.headers.get("Content-Length", "")
    if length.isdigit() and int(length) != written:
        raise transfer.error(f"the server sent {written:,} of the {int(length):,} bytes it announced")
    return written


def _write_part(
    transfer: Transfer, answer: requests.Response, fd: int, start: int, end: int, failed: threading.Event
) -> bool:
    """Bytes start..end written at their offset; False if another part's failure stopped it first."""
    found = CONTENT_RANGE.fullmatch(answer.headers.get("Content-Range", "").strip())
    if answer.status_code != 206 or not found or (int(found[1]), int(found[2])) != (start, end):
        raise transfer.error(f"the server did not answer the ranged request for bytes {start}-{end} as asked")
    offset = start
    for piece in body(transfer, answer):
        if failed.is_set():
            return False
        if offset + len(piece) > end + 1:
            raise transfer.error(f"the server sent more than bytes {start}-{end}")
        os.pwrite(fd, piece, offset)
        offset += len(piece)
    if offset != end + 1:
        raise transfer.error(f"the server sent {offset - start:,} of the {end - start + 1:,} bytes of a part")
    return True


def _resumable_parts(journal: Path, archive: Path, state: dict[str, object]) -> set[int]:
    """The parts a previous start finished, if it was fetching the same file in the same parts."""
    with suppress(OSError, ValueError):
        recorded = json.loads(journal.read_text())
        if archive.exists() and all(recorded.get(key) == value for key, value in state.items()) and state["validator"]:
            return {int(index) for index in recorded.get("done", [])}
    archive.unlink(missing_ok=True)
    journal.unlink(missing_ok=True)
    return set()


def _record(journal: Path, state: dict[str, object]) -> None:
    temporary = journal.with_suffix(".tmp")
    temporary.write_text(json.dumps(state))
    os.replace(temporary, journal)


# --- unpacking ----------------------------------------------------------------------------------


def _unpack(transfer: Transfer, archive: Path, folder: Path, size: int) -> None:
    target = folder / "weights"
    staging = folder / "unpacking"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            prefix = _single_top_folder(members)
            staging.mkdir()

            def strip(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
                name = os.path.normpath(member.name)
                if name in (".", prefix):
                    return None
                renamed = member.replace(name=name[len(prefix) + 1 :] if prefix else name, deep=False)
                return tarfile.data_filter(renamed, path)

            tar.extractall(staging, filter=strip)
    except tarfile.FilterError as error:
        raise transfer.error(f"the archive has an unsafe member ({type(error).__name__}: {error})") from None
    except (tarfile.TarError, EOFError, zlib.error) as error:
        raise transfer.error(f"the file is not a readable .tar archive ({type(error).__name__})") from None
    except OSError as error:
        if error.errno is not None:  # the disk's, not the archive's
            raise
        raise transfer.error(f"the file is not a readable .tar archive ({type(error).__name__})") from None
    if not any((staging / name).is_file() for name in ("model_index.json", "config.json")):
        raise transfer.error(
            "the archive holds no diffusers-format folder: no model_index.json or config.json at its root "
            "or under its one top folder"
        )
    os.replace(staging, target)


def _single_top_folder(members: list[tarfile.TarInfo]) -> str:
    """The one folder every member sits under, when the tar was made of a folder rather than its contents."""
    names = [name for name in (os.path.normpath(member.name) for member in members) if name != "."]
    tops = {name.split("/", 1)[0] for name in names}
    if len(tops) != 1:
        return ""
    top = tops.pop()
    return top if any(name.startswith(top + "/") for name in names) else ""
