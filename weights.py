"""Where LoRA files come from: Replicate, Hugging Face, CivitAI, any http(s) URL or data: URI, and local
paths for the deployment's own FLUX_MAIN_LORA only; fetched once into a bounded local cache.

Only safetensors files are accepted, directly or as the one .safetensors member of a .tar or .zip.
Every download goes through downloads.py's bounded transport (timeouts, an overall deadline, a minimum
rate, bounded redirects and retries; no secret in any message or log), with a size limit checked against
Content-Length and again while streaming (and while unpacking an archive). A file is trusted, and cached,
only once its whole safetensors structure checks out. Whatever fails, the request gets one sentence
naming the input, and the cache holds nothing of it. Unpacking archives and checking a safetensors
header are format concerns: lora_loading/archives.py and lora_loading/safetensors_check.py.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import stat
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, TypeVar

import requests
from huggingface_hub import constants

from downloads import CHUNK_BYTES, Transfer, body, describe, fetch, redact, seconds, start_watchdog
from errors import LoraSourceError
from lora_loading.archives import (
    PEFT_CONFIG,
    ArchiveProblem,
    extract_member,
    peft_config_beside,
    short_listing,
    write_bounded,
)
from lora_loading.safetensors_check import NOT_A_SAFETENSORS_FILE, safetensors_problem

log = logging.getLogger(__name__)

SETTINGS_INPUT = "FLUX_MAIN_LORA"
DEFAULT_MAX_LORA_BYTES = 2 * 1024**3
DEFAULT_CACHE_BYTES = 20 * 1024**3
READ_TIMEOUT_S = 60  # the longest silence from a server; FLUX_LORA_READ_TIMEOUT_S overrides it
DOWNLOAD_TIMEOUT_S = 900  # one fetch in all (API calls, redirects, retries); FLUX_LORA_DOWNLOAD_TIMEOUT_S
MAX_API_BYTES = 16 * 1024**2  # a JSON answer from CivitAI's API
STALE_PART_S = 3600
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
_NOT_VERSIONS = {".", "..", "versions", "readme", "api", "examples", "playground", "train", "trainings"}
_T = TypeVar("_T")


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

    def evict(self, keep: Collection[Path]) -> None:
        """Least recently used first, down to the bound. `keep`, the request's own files, stays even when
        it alone is over the bound; a file another process holds `in_use` is skipped."""
        entries = []
        for path in self.folder.glob("*.safetensors"):
            with suppress(FileNotFoundError):
                info = path.stat()
                entries.append((info.st_mtime, info.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_total_bytes:
                break
            if path in keep:
                continue
            with suppress(FileNotFoundError), path.open("rb") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a request in another process is loading it
                path.unlink(missing_ok=True)
                peft_config_beside(path).unlink(missing_ok=True)
                total -= size
                log.info("LoRA cache: evicted %s (%d bytes), the least recently used.", path.name, size)

    @contextmanager
    def in_use(self, paths: Collection[Path]) -> Iterator[None]:
        """Shared locks on a request's files while it loads them, so that no other process evicts them
        (one server runs one prediction at a time; several may share the folder). FileNotFoundError: a
        file went before it was locked."""
        with ExitStack() as stack:
            for path in paths:
                fcntl.flock(stack.enter_context(path.open("rb")), fcntl.LOCK_SH)
            yield

    def clean_stale_parts(self) -> None:
        """A fetch killed mid-way leaves its .part behind; one untouched for an hour is abandoned."""
        for part in self.folder.glob("*.part"):
            with suppress(OSError):  # another process may be cleaning up too
                info = part.lstat()  # a link is judged, and removed, as itself
                if time.time() - info.st_mtime > STALE_PART_S:
                    if stat.S_ISDIR(info.st_mode):
                        shutil.rmtree(part)
                    else:
                        part.unlink()


@dataclass
class _Job(Transfer):
    """One LoRA fetch: its transfer, and where its bytes go before they are trusted."""

    cache: LoraCache = None  # type: ignore[assignment]
    part: Path = None  # type: ignore[assignment]
    peft_config: bytes | None = None  # the adapter_config.json that came with it (PEFT's save_pretrained)

    @property
    def member(self) -> Path:
        return self.part.with_suffix(".member.part")

    def too_large(self) -> LoraSourceError:
        return LoraSourceError(
            f"Invalid {self.input_name} {self.shown!r}: the file is larger than the "
            f"{self.cache.max_file_bytes:,} bytes accepted (FLUX_LORA_MAX_BYTES)."
        )


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
    # Version ids are usually 64 hex digits, but the peers' own tests use names such as "version123":
    # any such name is taken, and quoted in the URL, except the names of a model's own pages.
    if len(path) == 3 and (not re.fullmatch(r"[A-Za-z0-9._-]+", path[2]) or path[2] in _NOT_VERSIONS):
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
        try:
            problem = safetensors_problem(path)
        except OSError as error:
            raise LoraSourceError(f"Invalid {input_name} {shown!r}: it cannot be read ({error.strerror}).") from None
        if problem is None:
            return path
        if problem is not NOT_A_SAFETENSORS_FILE:
            raise LoraSourceError(f"Invalid {input_name} {shown!r}: the .safetensors file is damaged: {problem}.")
        # An archive: unpacked into the cache, keyed by its state on disk so that a replaced file counts as new.
        reference = replace(reference, version=f"{path.stat().st_mtime_ns}:{path.stat().st_size}")
    target = cache.path_for(reference.cache_key())
    try:
        with _locked(target):
            if target.exists() and safetensors_problem(target) is None:  # a file damaged on disk is fetched again
                with suppress(OSError):  # a read-only cache still serves what it holds
                    os.utime(target)  # most recently used, for eviction
                log.info("LoRA for %s: %s, from the cache.", input_name, shown)
                return target
            cache.clean_stale_parts()
            watchdog = start_watchdog("FLUX_LORA_DOWNLOAD_TIMEOUT_S", DOWNLOAD_TIMEOUT_S)
            job = _Job(
                input_name,
                shown,
                watchdog,
                LoraSourceError,
                "FLUX_LORA_DOWNLOAD_TIMEOUT_S",
                "FLUX_LORA_READ_TIMEOUT_S",
                seconds("FLUX_LORA_READ_TIMEOUT_S", READ_TIMEOUT_S),
                cache=cache,
                part=target.with_suffix(".part"),
            )
            log.info("LoRA for %s: fetching %s.", input_name, shown)
            try:
                _FETCHERS[reference.kind](job, reference)
                _install(job, target)
            finally:
                watchdog.stop()
                for leftover in (job.part, job.member):
                    with suppress(OSError):
                        leftover.unlink(missing_ok=True)
    except OSError as error:
        # Each fetcher turns network errors into sentences, so what gets here is the cache's disk.
        problem = (
            f"the download failed: {describe(error, 'FLUX_LORA_READ_TIMEOUT_S')}"
            if isinstance(error, requests.RequestException)
            else None
        )
        raise LoraSourceError(f"Invalid {input_name} {shown!r}: {problem or _cache_problem(cache, error)}.") from None
    return target


def _cache_problem(cache: LoraCache, error: OSError) -> str:
    return f"the LoRA cache folder {cache.folder} cannot be written ({error.strerror or type(error).__name__})"


_THREAD_LOCKS: dict[str, tuple[threading.Lock, list[int]]] = {}  # each with the number of threads using it
_THREAD_LOCKS_GUARD = threading.Lock()


@contextmanager
def _locked(target: Path) -> Iterator[None]:
    """One fetch of a source at a time: flock across processes, and a thread lock as well because on network
    filesystems flock may be emulated with per-process locks that do not exclude threads.

    The lock file is removed by its holder before it lets go, so failed and one-off sources leave nothing
    behind; a process that was waiting on the removed file sees that the path no longer names the file it
    locked, and starts again on a new one. Only the empty .locks folder stays."""
    lock_path = target.parent / ".locks" / (target.stem + ".lock")
    key = str(lock_path)
    with _THREAD_LOCKS_GUARD:
        thread_lock, users = _THREAD_LOCKS.setdefault(key, (threading.Lock(), [0]))
        users[0] += 1
    try:
        with thread_lock:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            while True:
                handle = lock_path.open("a")
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX)
                    if _same_file(handle, lock_path):
                        break
                except BaseException:
                    handle.close()
                    raise
                handle.close()  # its holder removed it while this process waited
            try:
                yield
            finally:
                with suppress(OSError):
                    lock_path.unlink()
                handle.close()
    finally:
        with _THREAD_LOCKS_GUARD:
            users[0] -= 1
            if not users[0]:
                del _THREAD_LOCKS[key]


def _same_file(handle: IO[str], path: Path) -> bool:
    try:
        on_disk = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(handle.fileno())
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _install(job: _Job, target: Path) -> None:
    """Rename into place only once complete and checked, so an interrupted fetch is never trusted later."""
    lora = job.part
    problem = safetensors_problem(lora)
    if problem is NOT_A_SAFETENSORS_FILE:
        try:
            job.peft_config = extract_member(job.part, job.member, job.cache.max_file_bytes) or job.peft_config
        except ArchiveProblem as archive_problem:
            raise job.error(str(archive_problem)) from None
        _check_member(job)
        lora = job.member
    elif problem is not None:
        raise job.error(f"the .safetensors file is damaged: {problem}")
    # The config goes in first, so that whoever finds the LoRA in the cache finds its config too.
    config = peft_config_beside(target)
    if job.peft_config is None:
        config.unlink(missing_ok=True)
    else:
        staged = job.part.with_suffix(".config.part")
        staged.write_bytes(job.peft_config)
        os.replace(staged, config)
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
    version = f"/versions/{urllib.parse.quote(reference.version, safe='')}" if reference.version else ""
    _download(job, f"{_service_base('replicate')}/{reference.target}{version}/_weights", "REPLICATE_API_TOKEN")


def _from_civitai(job: _Job, reference: Reference) -> None:
    base, token = _service_base("civitai"), "CIVITAI_API_TOKEN"
    if not reference.target:
        query = f"?{reference.query}" if reference.query else ""
        url = f"{base}/api/download/models/{reference.version}{query}"
        return _download(job, url, token)
    # A model id is not a version id: the model's newest version is the first that the API lists.
    if reference.version:
        version = fetch(job, f"{base}/api/v1/model-versions/{reference.version}", token, _json_of(job))
    else:
        model = fetch(job, f"{base}/api/v1/models/{reference.target}", token, _json_of(job))
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


def _json_of(job: _Job) -> Callable[[requests.Response], Any]:
    def read(response: requests.Response) -> Any:
        answer = bytearray()
        for chunk in body(job, response):
            answer += chunk
            if len(answer) > MAX_API_BYTES:
                raise job.error(f"the API's answer is larger than the {MAX_API_BYTES:,} bytes accepted")
        try:
            return json.loads(answer)
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            raise job.error("the download failed: the API's answer is not JSON") from None

    return read


def _civitai_safetensors(file: dict[str, Any]) -> bool:
    metadata = file.get("metadata") or {}
    return metadata.get("format") == "SafeTensor" or str(file.get("name", "")).lower().endswith(".safetensors")


def _from_hugging_face(job: _Job, reference: Reference) -> None:
    """The Hub's API and files through the same bounded requests as every other source (huggingface_hub's own
    have no overall deadline, nor a size limit while streaming): the repository's listing at the revision,
    then the file at the commit it names, as huggingface_hub's model_info and hf_hub_download ask for them."""
    endpoint = _service_base("huggingface")
    revision = f"/revision/{urllib.parse.quote(reference.version, safe='')}" if reference.version else ""
    info = fetch(job, f"{endpoint}/api/models/{reference.target}{revision}?blobs=true", "HF_TOKEN", _json_of(job))
    siblings = info.get("siblings") if isinstance(info, dict) else None
    if not isinstance(siblings, list):
        raise job.error("the Hugging Face API's answer lists no files")
    sizes = {
        str(sibling["rfilename"]): sibling.get("size")
        for sibling in siblings
        if isinstance(sibling, dict) and "rfilename" in sibling
    }
    filename = reference.filename or _only_safetensors(job, reference, sorted(sizes))
    if filename not in sizes:
        raise job.error(f"not found: the repository has no file {filename!r}")
    size = sizes[filename]
    if isinstance(size, int) and size > job.cache.max_file_bytes:
        raise job.too_large()
    sha = info.get("sha") if isinstance(info.get("sha"), str) else None
    commit = urllib.parse.quote(sha or reference.version or "main", safe="")
    # PEFT's save_pretrained keeps the alpha beside the weights, in adapter_config.json.
    config = posixpath.join(posixpath.dirname(filename), PEFT_CONFIG)
    if config in sizes:
        url = f"{endpoint}/{reference.target}/resolve/{commit}/{urllib.parse.quote(config)}"
        job.peft_config = json.dumps(fetch(job, url, "HF_TOKEN", _json_of(job))).encode()
    _download(job, f"{endpoint}/{reference.target}/resolve/{commit}/{urllib.parse.quote(filename)}", "HF_TOKEN")


def _only_safetensors(job: _Job, reference: Reference, names: list[str]) -> str:
    candidates = [name for name in names if name.lower().endswith(".safetensors")]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise job.error("the repository has no .safetensors file")
    raise job.error(
        f"the repository has several .safetensors files; name one, as huggingface.co/{reference.target}/<file>: "
        + short_listing(candidates)
    )


_FETCHERS: dict[str, Callable[[_Job, Reference], object]] = {
    "url": lambda job, reference: _download(job, reference.target),
    "data": _from_data_uri,
    "local": lambda job, reference: _write(job, _read_local(job, Path(reference.target).expanduser()), job.part),
    "replicate": _from_replicate,
    "civitai": _from_civitai,
    "huggingface": _from_hugging_face,
}


def _read_local(job: _Job, path: Path) -> Iterator[bytes]:
    """A local archive's bytes; an error reading it is its own, not the cache's."""
    try:
        with path.open("rb") as file:
            yield from iter(lambda: file.read(CHUNK_BYTES), b"")
    except OSError as error:
        raise job.error(f"it cannot be read ({error.strerror})") from None


def _download(job: _Job, url: str, token_var: str | None = None) -> None:
    def save(response: requests.Response) -> None:
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > job.cache.max_file_bytes:
            raise job.too_large()
        _write(job, body(job, response), job.part)

    fetch(job, url, token_var, save)


def _write(job: _Job, chunks: Iterable[bytes], path: Path) -> None:
    write_bounded(chunks, path, job.cache.max_file_bytes, job.too_large)


def _check_member(job: _Job) -> None:
    problem = safetensors_problem(job.member)
    if problem is NOT_A_SAFETENSORS_FILE:
        raise job.error("the .safetensors file in the archive is not a safetensors file")
    if problem is not None:
        raise job.error(f"the .safetensors file in the archive is damaged: {problem}")
