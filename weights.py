"""Where LoRA files come from: request inputs and FLUX_MAIN_LORA, fetched into a local cache.

Request inputs may fetch only http(s) URLs and data: URIs; a local path is accepted only
from the deployment's own FLUX_MAIN_LORA setting. Only safetensors files are accepted.
Secrets never reach a message: URLs are shown without their query string or userinfo.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import struct
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import requests

from engine.inputs import InputError

SETTINGS_INPUT = "FLUX_MAIN_LORA"
DEFAULT_MAX_LORA_BYTES = 2 * 1024**3
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60
CHUNK_BYTES = 1024 * 1024


class LoraSourceError(InputError):
    """A LoRA reference that cannot be fetched; the message names the input."""


@dataclass(frozen=True)
class LoraCache:
    folder: Path
    max_file_bytes: int

    @classmethod
    def from_env(cls) -> LoraCache:
        folder = os.environ.get("FLUX_LORA_CACHE_DIR") or str(Path(tempfile.gettempdir()) / "flux-lora-cache")
        max_bytes = int(os.environ.get("FLUX_LORA_MAX_BYTES") or DEFAULT_MAX_LORA_BYTES)
        return cls(Path(folder), max_bytes)

    def path_for(self, source: str) -> Path:
        return self.folder / (hashlib.sha256(source.encode()).hexdigest() + ".safetensors")


def redact(source: str) -> str:
    """The source as it may be shown: no query string (signatures), no user:password."""
    parsed = urllib.parse.urlsplit(source)
    if parsed.scheme in ("http", "https"):
        host = parsed.hostname or ""
        if parsed.port:
            host += f":{parsed.port}"
        return urllib.parse.urlunsplit((parsed.scheme, host, parsed.path, "", ""))
    if parsed.scheme == "data":
        return source[: source.find(",") + 1] + "..." if "," in source else "data:..."
    return source


def fetch_lora(input_name: str, source: str, cache: LoraCache) -> Path:
    """A local safetensors file holding the LoRA that `source` names."""
    scheme = urllib.parse.urlsplit(source).scheme.lower()
    if scheme in ("http", "https"):
        return _download(input_name, source, cache)
    if scheme == "data":
        return _from_data_uri(input_name, source, cache)
    if input_name == SETTINGS_INPUT and scheme in ("", "file"):
        path = Path(urllib.parse.urlsplit(source).path if scheme == "file" else source).expanduser()
        if not path.is_file():
            raise LoraSourceError(f"Invalid {input_name} {source!r}: no such file.")
        _check_safetensors_header(input_name, source, path)
        return path
    raise LoraSourceError(
        f"Invalid {input_name} {redact(source)!r}: expected an http(s) URL of a .safetensors file "
        "or a data: URI; local paths and other schemes are not accepted in requests."
    )


def _download(input_name: str, url: str, cache: LoraCache) -> Path:
    target = cache.path_for(url)
    if target.exists():
        os.utime(target)  # most-recently-used, for eviction
        return target
    shown = redact(url)
    try:
        response = requests.get(url, stream=True, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S))
    except requests.RequestException as error:
        raise LoraSourceError(
            f"Invalid {input_name} {shown!r}: the download failed ({type(error).__name__})."
        ) from None
    with response:
        if response.status_code == 404:
            raise LoraSourceError(f"Invalid {input_name} {shown!r}: not found (HTTP 404).")
        if response.status_code in (401, 403):
            raise LoraSourceError(
                f"Invalid {input_name} {shown!r}: access denied (HTTP {response.status_code}); "
                "the file needs a token or a signed URL."
            )
        if response.status_code >= 400:
            raise LoraSourceError(f"Invalid {input_name} {shown!r}: the server answered HTTP {response.status_code}.")
        return _store(input_name, shown, response.iter_content(CHUNK_BYTES), target, cache)


def _from_data_uri(input_name: str, uri: str, cache: LoraCache) -> Path:
    target = cache.path_for(uri)
    if target.exists():
        return target
    header, _, payload = uri.partition(",")
    try:
        data = base64.b64decode(payload, validate=True) if header.endswith(";base64") else None
    except (binascii.Error, ValueError):
        data = None
    if data is None:
        raise LoraSourceError(
            f"Invalid {input_name} {redact(uri)!r}: expected a base64 data: URI of a .safetensors file."
        )
    return _store(input_name, redact(uri), iter([data]), target, cache)


def _store(input_name: str, shown: str, chunks, target: Path, cache: LoraCache) -> Path:  # type: ignore[no-untyped-def]
    """Write to a temporary file beside the target and rename it into place only once it is
    complete and checked, so an interrupted download is never trusted later."""
    cache.folder.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=cache.folder, suffix=".part")
    try:
        written = 0
        with os.fdopen(handle, "wb") as file:
            for chunk in chunks:
                written += len(chunk)
                if written > cache.max_file_bytes:
                    raise LoraSourceError(
                        f"Invalid {input_name} {shown!r}: the file is larger than the "
                        f"{cache.max_file_bytes} bytes accepted (FLUX_LORA_MAX_BYTES)."
                    )
                file.write(chunk)
        _check_safetensors_header(input_name, shown, Path(temporary))
        os.replace(temporary, target)
        return target
    except requests.RequestException as error:
        raise LoraSourceError(
            f"Invalid {input_name} {shown!r}: the download broke off ({type(error).__name__})."
        ) from None
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _check_safetensors_header(input_name: str, shown: str, path: Path) -> None:
    """A safetensors file starts with an 8-byte length and a JSON header of that length."""
    size = path.stat().st_size
    with path.open("rb") as file:
        prefix = file.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
        valid = 2 <= length <= size - 8
        if valid:
            try:
                header = json.loads(file.read(length))
                valid = isinstance(header, dict)
            except (UnicodeDecodeError, json.JSONDecodeError):
                valid = False
    if not valid:
        raise LoraSourceError(f"Invalid {input_name} {shown!r}: the file is not a .safetensors file.")
