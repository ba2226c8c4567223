"""Where LoRA files come from: Replicate, Hugging Face, CivitAI, any http(s) URL or data: URI, and local
paths for the deployment's own FLUX_MAIN_LORA only; fetched once into a bounded local cache.

Only safetensors files are accepted, directly or as the one .safetensors member of a .tar or .zip.
Secrets never reach a message or a log: sources are shown without their query string or userinfo, a
token goes only to the host it belongs to, and errors are raised `from None` so that no chained
exception carries a URL.
"""

from __future__ import annotations

import base64
import fcntl
import gzip
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import stat
import struct
import tarfile
import tempfile
import threading
import time
import urllib.parse
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx2
import requests
from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError

from engine.inputs import InputError

log = logging.getLogger(__name__)
# Their request lines carry whole URLs, signatures included, at INFO (httpx2) and DEBUG (urllib3).
for _library in ("httpx2", "urllib3"):
    logging.getLogger(_library).setLevel(max(logging.getLogger(_library).level, logging.WARNING))

SETTINGS_INPUT = "FLUX_MAIN_LORA"
DEFAULT_MAX_LORA_BYTES = 2 * 1024**3
DEFAULT_CACHE_BYTES = 20 * 1024**3
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60
CHUNK_BYTES = 1024 * 1024
ATTEMPTS = 3
RETRY_BACKOFF_S = 0.5  # doubles after each failed attempt
MAX_ARCHIVE_MEMBERS = 10_000
STALE_PART_S = 3600
EVICTION_GRACE_S = 60  # a request may have fetched a file this recently and not have loaded it yet
PREFERRED_MEMBER = "lora.safetensors"
NOT_SAFETENSORS = "the file is not a .safetensors file"
ACCEPTED_FORMS = (
    "owner/model[/version] or replicate.com/owner/model[/versions/<id>] (Replicate); "
    "huggingface.co/owner/repo[/<file>.safetensors | /blob/<rev>/<path> | /resolve/<rev>/<path>]; "
    "civitai.com/models/<id>[?modelVersionId=<id>] or civitai.com/api/download/models/<id>; "
    "or an http(s) URL or base64 data: URI of a .safetensors, .tar or .zip file"
)
_HUBS = {"replicate.com": "replicate", "civitai.com": "civitai"} | dict.fromkeys(
    ("huggingface.co", "hf.co"), "huggingface"
)
_NAME = re.compile(r"[A-Za-z0-9][\w.-]*")
_T = TypeVar("_T")


class LoraSourceError(InputError):
    """A LoRA reference that cannot be fetched; the message names the input."""


@dataclass(frozen=True)
class Reference:
    """A parsed source. `target` is the URL, data: URI or path; Replicate's "owner/model"; Hugging Face's
    "owner/repo"; or a CivitAI model id ("" when the source names only a version)."""

    kind: str  # "url", "data", "local", "replicate", "huggingface" or "civitai"
    target: str
    version: str | None = None  # Replicate version, Hugging Face revision or CivitAI model version id
    filename: str | None = None  # the file in a Hugging Face repository
    query: str = ""  # a CivitAI download URL's choice of file (type=, format=)

    def cache_key(self) -> str:
        # The host is part of it, as a mirror may differ; plain URLs keep their query, as differently
        # signed URLs may name different files.
        return json.dumps([self.kind, _service_base(self.kind), self.target, self.version, self.filename, self.query])


@dataclass(frozen=True)
class LoraCache:
    """Fetched LoRAs on local disk, named by the sha256 of their source's cache key. A file's mtime is its
    last use, and the least recently used go first once the folder holds more than max_total_bytes."""

    folder: Path
    max_file_bytes: int
    max_total_bytes: int = DEFAULT_CACHE_BYTES

    @classmethod
    def from_env(cls) -> LoraCache:
        folder = os.environ.get("FLUX_LORA_CACHE_DIR") or str(Path(tempfile.gettempdir()) / "flux-lora-cache")
        max_bytes = int(os.environ.get("FLUX_LORA_MAX_BYTES") or DEFAULT_MAX_LORA_BYTES)
        return cls(Path(folder), max_bytes, int(os.environ.get("FLUX_LORA_CACHE_BYTES") or DEFAULT_CACHE_BYTES))

    def path_for(self, key: str) -> Path:
        return self.folder / (hashlib.sha256(key.encode()).hexdigest() + ".safetensors")

    def evict(self, keep: Path) -> None:
        """`keep`, just fetched, stays even when it alone is over the bound."""
        entries = []
        for path in self.folder.glob("*.safetensors"):
            with suppress(FileNotFoundError):
                info = path.stat()
                entries.append((info.st_mtime, info.st_size, path))
        total = sum(size for _, size, _ in entries)
        for mtime, size, path in sorted(entries):
            if total <= self.max_total_bytes:
                break
            if path != keep and time.time() - mtime >= EVICTION_GRACE_S:
                path.unlink(missing_ok=True)
                total -= size
                log.info("LoRA cache: evicted %s (%d bytes), the least recently used.", path.name, size)

    def clean_stale_parts(self) -> None:
        """A fetch killed mid-way leaves its .part behind; one untouched for an hour is abandoned."""
        for part in self.folder.glob("*.part"):
            with suppress(OSError):  # another process may be cleaning up too
                if time.time() - part.stat().st_mtime > STALE_PART_S:
                    if part.is_dir():
                        shutil.rmtree(part)
                    else:
                        part.unlink()


@dataclass
class _Job:
    """One fetch: where its bytes go before they are trusted, and how its errors read."""

    input_name: str
    shown: str
    cache: LoraCache
    part: Path

    @property
    def member(self) -> Path:
        return self.part.with_suffix(".member.part")

    def error(self, problem: str) -> LoraSourceError:
        return LoraSourceError(f"Invalid {self.input_name} {self.shown!r}: {problem}.")

    def too_large(self) -> LoraSourceError:
        return self.error(
            f"the file is larger than the {self.cache.max_file_bytes:,} bytes accepted (FLUX_LORA_MAX_BYTES)"
        )


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


def parse_source(input_name: str, source: str) -> Reference:
    """What `source` names, or a LoraSourceError that lists the accepted forms."""
    text = source.strip()
    if "://" not in text and text.split("/")[0].lower().removeprefix("www.") in _HUBS:
        text = "https://" + text
    parts = urllib.parse.urlsplit(text)
    scheme, host = parts.scheme.lower(), (parts.hostname or "").removeprefix("www.")
    path = [urllib.parse.unquote(segment) for segment in parts.path.split("/") if segment]
    hub = _HUBS.get(host) if scheme in ("http", "https") else None
    if hub == "replicate":
        reference = _replicate(path)
    elif hub == "huggingface":
        reference = _hugging_face(path)
    elif hub == "civitai":
        reference = _civitai(path, parts.query)
    elif scheme in ("http", "https", "data"):
        return Reference("url" if scheme != "data" else "data", text)
    elif input_name == SETTINGS_INPUT and (scheme == "file" or (not scheme and _looks_local(text))):
        return Reference("local", urllib.parse.unquote(parts.path) if scheme == "file" else text)
    else:
        reference = None if scheme else _replicate(text.rstrip("/").split("/"))
    if reference is None:
        refused = " (local paths and other schemes are not accepted in requests)"
        where = ", or a local path" if input_name == SETTINGS_INPUT else refused
        raise LoraSourceError(
            f"Invalid {input_name} {redact(source)!r}: not a LoRA source this predictor understands; "
            f"expected {ACCEPTED_FORMS}{where}."
        )
    return reference


def _replicate(path: list[str]) -> Reference | None:
    if len(path) == 4 and path[2] == "versions":
        path = path[:2] + path[3:]
    if len(path) not in (2, 3) or not all(_NAME.fullmatch(name) for name in path[:2]):
        return None
    if len(path) == 3 and not re.fullmatch(r"[0-9a-fA-F]+", path[2]):
        return None
    return Reference("replicate", "/".join(path[:2]), path[2] if len(path) == 3 else None)


def _hugging_face(path: list[str]) -> Reference | None:
    if len(path) < 2 or not all(_NAME.fullmatch(name) for name in path[:2]) or ".." in path:
        return None
    repo, rest = "/".join(path[:2]), path[2:]
    if not rest:
        return Reference("huggingface", repo)
    if rest[0] in ("blob", "resolve") and len(rest) >= 3:
        return Reference("huggingface", repo, rest[1], "/".join(rest[2:]))
    if rest[-1].lower().endswith(".safetensors"):
        return Reference("huggingface", repo, None, "/".join(rest))
    return None


def _civitai(path: list[str], query: str) -> Reference | None:
    if len(path) in (2, 3) and path[0] == "models" and path[1].isdigit():
        version = urllib.parse.parse_qs(query).get("modelVersionId", [None])[0]
        return Reference("civitai", path[1], version) if version is None or version.isdigit() else None
    if len(path) == 4 and path[:3] == ["api", "download", "models"] and path[3].isdigit():
        return Reference("civitai", "", path[3], query=query)
    return None


def _looks_local(text: str) -> bool:
    suffixes = (".safetensors", ".tar", ".tar.gz", ".tgz", ".zip")
    return text.startswith(("/", ".", "~")) or text.lower().endswith(suffixes) or Path(text).expanduser().exists()


def _service_base(kind: str) -> str:
    bases = {
        "replicate": os.environ.get("FLUX_REPLICATE_URL") or "https://replicate.com",
        "civitai": os.environ.get("FLUX_CIVITAI_URL") or "https://civitai.com",
        # huggingface_hub reads HF_ENDPOINT at import; read it per call so that a change takes effect.
        "huggingface": os.environ.get("HF_ENDPOINT") or constants.ENDPOINT,
    }
    return bases.get(kind, "").rstrip("/")


def fetch_lora(input_name: str, source: str, cache: LoraCache) -> Path:
    """A local safetensors file holding the LoRA that `source` names; from the cache when it is there."""
    reference = parse_source(input_name, source)
    shown = redact(source)
    if reference.kind == "local":
        path = Path(reference.target).expanduser()
        if not path.is_file():
            raise LoraSourceError(f"Invalid {input_name} {shown!r}: no such file.")
        if _is_safetensors(path):
            return path
        # An archive: unpacked into the cache, keyed by its state on disk so that a replaced file counts as new.
        reference = replace(reference, version=f"{path.stat().st_mtime_ns}:{path.stat().st_size}")
    target = cache.path_for(reference.cache_key())
    with _locked(target):
        if target.exists() and _is_safetensors(target):  # a file damaged on disk is fetched again
            os.utime(target)  # most recently used, for eviction
            log.info("LoRA for %s: %s, from the cache.", input_name, shown)
            return target
        cache.clean_stale_parts()
        job = _Job(input_name, shown, cache, target.with_suffix(".part"))
        log.info("LoRA for %s: fetching %s.", input_name, shown)
        try:
            _FETCHERS[reference.kind](job, reference)
            _install(job, target)
        finally:
            job.part.unlink(missing_ok=True)
            job.member.unlink(missing_ok=True)
    cache.evict(keep=target)
    return target


_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


@contextmanager
def _locked(target: Path) -> Iterator[None]:
    """One fetch of a source at a time: flock across processes, and a thread lock as well because on network
    filesystems flock may be emulated with per-process locks that do not exclude threads."""
    lock_path = target.parent / ".locks" / (target.stem + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with _THREAD_LOCKS_GUARD:
        thread_lock = _THREAD_LOCKS.setdefault(str(lock_path), threading.Lock())
    with thread_lock, lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _install(job: _Job, target: Path) -> None:
    """Rename into place only once complete and checked, so an interrupted fetch is never trusted later."""
    lora = job.part
    if not _is_safetensors(lora):
        _extract_member(job)
        lora = job.member
    os.replace(lora, target)


def _from_data_uri(job: _Job, reference: Reference) -> None:
    header, _, payload = reference.target.partition(",")
    if len(payload) * 3 // 4 > job.cache.max_file_bytes:
        raise job.too_large()
    try:
        data = base64.b64decode(payload, validate=True) if header.lower().endswith(";base64") else None
    except ValueError:  # binascii.Error, or characters outside ASCII
        data = None
    if data is None:
        raise job.error("expected a base64 data: URI of a .safetensors file")
    _write(job, [data], job.part)


def _from_replicate(job: _Job, reference: Reference) -> None:
    version = f"/versions/{reference.version}" if reference.version else ""
    _download(job, f"{_service_base('replicate')}/{reference.target}{version}/_weights", "REPLICATE_API_TOKEN")


def _from_civitai(job: _Job, reference: Reference) -> None:
    base, token = _service_base("civitai"), "CIVITAI_API_TOKEN"
    if not reference.target:
        query = f"?{reference.query}" if reference.query else ""
        url = f"{base}/api/download/models/{reference.version}{query}"
        return _download(job, url, token)
    # A model id is not a version id: the model's newest version is the first that the API lists.
    if reference.version:
        version = _fetch(job, f"{base}/api/v1/model-versions/{reference.version}", token, requests.Response.json)
    else:
        model = _fetch(job, f"{base}/api/v1/models/{reference.target}", token, requests.Response.json)
        version = next(iter(model.get("modelVersions") or []), None) if isinstance(model, dict) else None
    listed = version.get("files") if isinstance(version, dict) else None
    files = [file for file in listed or [] if isinstance(file, dict) and _civitai_safetensors(file)]
    if not files:
        raise job.error("the CivitAI model version has no .safetensors file")
    chosen = sorted(files, key=lambda file: not file.get("primary"))[0]
    download = urllib.parse.urlsplit(str(chosen.get("downloadUrl", "")))
    if not download.path.startswith("/api/download/"):
        raise job.error("the CivitAI API gave no download URL for the file")
    # Rebased onto the configured host, so that a mirror (or a test) serves the file as well as the API.
    _download(job, f"{base}{download.path}" + (f"?{download.query}" if download.query else ""), token)


def _civitai_safetensors(file: dict[str, Any]) -> bool:
    metadata = file.get("metadata") or {}
    return metadata.get("format") == "SafeTensor" or str(file.get("name", "")).lower().endswith(".safetensors")


def _from_hugging_face(job: _Job, reference: Reference) -> None:
    endpoint = _service_base("huggingface")
    with _hub_errors(job):
        info = HfApi(endpoint=endpoint).model_info(reference.target, revision=reference.version, files_metadata=True)
    sizes = {sibling.rfilename: sibling.size for sibling in info.siblings or []}
    filename = reference.filename or _only_safetensors(job, reference, sorted(sizes))
    if filename not in sizes:
        raise job.error(f"not found: the repository has no file {filename!r}")
    if (sizes[filename] or 0) > job.cache.max_file_bytes:
        raise job.too_large()
    # Downloaded beside the cache (same filesystem, so the rename is atomic), then moved into it: the
    # cache stays the one copy on disk, under the one bound.
    scratch = job.part.with_suffix(".hub.part")
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        with _hub_errors(job):
            downloaded = hf_hub_download(
                reference.target,
                filename,
                revision=info.sha or reference.version,
                local_dir=scratch,
                cache_dir=scratch / "cache",
                endpoint=endpoint,
            )
        os.replace(downloaded, job.part)
        if job.part.stat().st_size > job.cache.max_file_bytes:  # where the hub listed no size
            raise job.too_large()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _only_safetensors(job: _Job, reference: Reference, names: list[str]) -> str:
    candidates = [name for name in names if name.lower().endswith(".safetensors")]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise job.error("the repository has no .safetensors file")
    raise job.error(
        f"the repository has several .safetensors files; name one, as huggingface.co/{reference.target}/<file>: "
        + _listing(candidates)
    )


@contextmanager
def _hub_errors(job: _Job) -> Iterator[None]:
    try:
        yield
    except HfHubHTTPError as error:
        raise job.error(_status_problem(error.response.status_code, "HF_TOKEN")) from None
    except (OSError, httpx2.HTTPError) as error:
        raise job.error(f"the download from Hugging Face failed ({type(error).__name__})") from None


_FETCHERS: dict[str, Callable[[_Job, Reference], object]] = {
    "url": lambda job, reference: _download(job, reference.target),
    "data": _from_data_uri,
    "local": lambda job, reference: shutil.copyfile(Path(reference.target).expanduser(), job.part),
    "replicate": _from_replicate,
    "civitai": _from_civitai,
    "huggingface": _from_hugging_face,
}


def _fetch(job: _Job, url: str, token_var: str | None, use: Callable[[requests.Response], _T]) -> _T:
    """GET `url` and hand the response to `use`, retrying connection errors, 429 and 5xx with backoff.
    The token goes to `url`'s host only: requests drops Authorization on a redirect to another host."""
    token = os.environ.get(token_var) if token_var else None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    problem = ""
    for attempt in range(ATTEMPTS):
        if attempt:
            time.sleep(RETRY_BACKOFF_S * 2 ** (attempt - 1))
        try:
            with requests.get(url, headers=headers, stream=True, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S)) as answer:
                if answer.status_code == 429 or answer.status_code >= 500:
                    problem = f"the server answered HTTP {answer.status_code}"
                    continue
                if answer.status_code >= 400:
                    raise job.error(_status_problem(answer.status_code, token_var))
                return use(answer)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as error:
            problem = f"the download failed: {_describe(error)}"
        except requests.RequestException as error:
            raise job.error(f"the download failed: {_describe(error)}") from None
    raise job.error(problem)


def _status_problem(status: int, token_var: str | None) -> str:
    if status == 404:
        return "not found (HTTP 404)"
    if status in (401, 403):
        fix = f"set {token_var} to a token that may read it" if token_var else "the file needs a token or a signed URL"
        return f"access denied (HTTP {status}); {fix}"
    return f"the server answered HTTP {status}"


_DESCRIPTIONS: tuple[tuple[type[Exception], str], ...] = (
    (requests.Timeout, "the server did not answer in time"),
    (requests.exceptions.ChunkedEncodingError, "the connection broke off before the end of the file"),
    (requests.ConnectionError, "the connection failed"),
    (requests.JSONDecodeError, "the API's answer is not JSON"),
)


def _describe(error: Exception) -> str:
    # Only the kind of error: its own text carries the URL, signature and all.
    return next((text for kind, text in _DESCRIPTIONS if isinstance(error, kind)), type(error).__name__)


def _download(job: _Job, url: str, token_var: str | None = None) -> None:
    def save(response: requests.Response) -> None:
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > job.cache.max_file_bytes:
            raise job.too_large()
        _write(job, response.iter_content(CHUNK_BYTES), job.part)

    _fetch(job, url, token_var, save)


def _write(job: _Job, chunks: Iterable[bytes], path: Path) -> None:
    written = 0
    with path.open("wb") as file:
        for chunk in chunks:
            written += len(chunk)
            if written > job.cache.max_file_bytes:
                raise job.too_large()
            file.write(chunk)


def _extract_member(job: _Job) -> None:
    """Stream the archive's one .safetensors member to job.member; nothing else is written anywhere."""
    try:
        if zipfile.is_zipfile(job.part):
            with zipfile.ZipFile(job.part) as archive:
                infos = archive.infolist()
                index = _choose_member(job, [(info.filename, info.file_size, _zip_kind(info)) for info in infos])
                _write_member(job, archive.open(infos[index]))
        elif tarfile.is_tarfile(job.part):
            with tarfile.open(job.part) as tar:
                members = list(itertools.islice(tar, MAX_ARCHIVE_MEMBERS + 1))  # a flood stops at the limit
                index = _choose_member(job, [(member.name, member.size, _tar_kind(member)) for member in members])
                _write_member(job, tar.extractfile(members[index]))
        else:
            raise job.error(f"{NOT_SAFETENSORS} (nor a .tar or .zip archive holding one)")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, gzip.BadGzipFile, RuntimeError):
        raise job.error("the archive cannot be read (damaged, encrypted or compressed in an unknown way)") from None
    if not _is_safetensors(job.member):
        raise job.error("the .safetensors file in the archive is not a safetensors file")


def _write_member(job: _Job, stream: IO[bytes] | None) -> None:
    assert stream is not None  # only regular files are chosen, and they always have a stream
    with stream:
        _write(job, iter(lambda: stream.read(CHUNK_BYTES), b""), job.member)


def _zip_kind(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16  # Unix file type and permissions, where the archiver recorded them
    return "dir" if info.is_dir() else "file" if stat.S_IFMT(mode) in (0, stat.S_IFREG) else "link or special file"


def _tar_kind(member: tarfile.TarInfo) -> str:
    return "file" if member.isreg() else "dir" if member.isdir() else "link or special file"


def _choose_member(job: _Job, entries: list[tuple[str, int, str]]) -> int:
    """The index of the LoRA among (name, size, kind) entries, after checking every entry is safe."""
    if len(entries) > MAX_ARCHIVE_MEMBERS:
        raise job.error(f"the archive has more than {MAX_ARCHIVE_MEMBERS} entries")
    total = 0
    for name, size, kind in entries:
        segments = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or ".." in segments or re.match(r"[A-Za-z]:", name):
            raise job.error(f"the archive entry {name!r} points outside the archive")
        if kind not in ("file", "dir"):
            raise job.error(f"the archive entry {name!r} is a {kind}; only regular files are accepted")
        total += size
        if total > job.cache.max_file_bytes:
            raise job.error(f"the archive unpacks to over {job.cache.max_file_bytes:,} bytes (FLUX_LORA_MAX_BYTES)")
    candidates = [
        index
        for index, (name, _, kind) in enumerate(entries)
        if kind == "file" and name.lower().endswith(".safetensors") and not name.startswith("__MACOSX/")
    ]
    preferred = [index for index in candidates if entries[index][0].split("/")[-1] == PREFERRED_MEMBER]
    if len(candidates) == 1 or len(preferred) == 1:
        return (preferred or candidates)[0]
    if not candidates:
        raise job.error("the archive holds no .safetensors file")
    names = [entries[index][0] for index in candidates]
    raise job.error(f"the archive holds several .safetensors files, not one {PREFERRED_MEMBER}: {_listing(names)}")


def _listing(names: list[str], shown: int = 10) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte length and a JSON object of that length."""
    size = path.stat().st_size
    with path.open("rb") as file:
        prefix = file.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
        if not 2 <= length <= size - 8:
            return False
        try:
            return isinstance(json.loads(file.read(length)), dict)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return False
