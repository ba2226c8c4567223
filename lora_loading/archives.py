"""LoRAs that come packed: Replicate's trained weights are a .tar, and people share .zip files
and compressed tars. The archive's one .safetensors member is streamed out, and the
`adapter_config.json` beside it read (PEFT's save_pretrained keeps the alpha there); nothing else
is written anywhere.

Every read is bounded, so that a small archive cannot expand without limit on disk or in
memory: entries are checked as they are listed (count, paths, kinds, total size) before the
next is looked for, a compressed tar is read through _Bounded, and the member is written with
the same size limit as a download. Problems are raised as ArchiveProblem, a clause for the
caller's sentence; errors of the disk being written pass through as the OSError they are.
"""

from __future__ import annotations

import bz2
import errno
import gzip
import lzma
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

MAX_ARCHIVE_MEMBERS = 10_000
# Unpacking reads at most the size limit plus this much (tar headers and padding), and no single header
# over MAX_ARCHIVE_HEADER_BYTES.
ARCHIVE_OVERHEAD_BYTES = 32 * 1024**2
MAX_ARCHIVE_HEADER_BYTES = 16 * 1024**2
PREFERRED_MEMBER = "lora.safetensors"
PEFT_CONFIG = "adapter_config.json"  # PEFT's save_pretrained writes it beside adapter_model.safetensors
MAX_PEFT_CONFIG_BYTES = 1024**2
CHUNK_BYTES = 1024 * 1024
NOT_SAFETENSORS = "the file is not a .safetensors file"
# Errors of the filesystem being written rather than of the archive being read.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EIO}


class ArchiveProblem(Exception):
    """What is wrong with the archive, as a clause: "the archive holds no .safetensors file"."""


def too_large(max_bytes: int) -> ArchiveProblem:
    return ArchiveProblem(f"the file is larger than the {max_bytes:,} bytes accepted (FLUX_LORA_MAX_BYTES)")


def extract_member(archive: Path, member: Path, max_bytes: int) -> bytes | None:
    """Stream the one .safetensors member of `archive` (zip, or tar, plain or gzip/bzip2/xz) to `member`.
    Returns the PEFT adapter_config.json in the same folder, if there is one."""
    unreadable = ArchiveProblem("the archive cannot be read (damaged, encrypted or compressed in an unknown way)")
    configs: dict[str, bytes] = {}  # adapter_config.json by folder
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as opened:
                infos = opened.infolist()
                listing = ((info.filename, info.file_size, _zip_kind(info)) for info in infos)
                index = _choose_member(listing, max_bytes)
                for info in infos:
                    if _is_peft_config(info.filename, info.file_size, _zip_kind(info)):
                        configs[_folder(info.filename)] = opened.read(info)
                _write_member(opened.open(infos[index]), member, max_bytes)
            return configs.get(_folder(infos[index].filename))
        with _decompressed(archive) as (stream, compressed):
            bounded = _Bounded(stream, max_bytes + ARCHIVE_OVERHEAD_BYTES)
            try:
                tar = tarfile.open(fileobj=bounded, mode="r:")  # type: ignore[call-overload]
            except tarfile.ReadError:
                if compressed:
                    raise
                raise ArchiveProblem(
                    f"{NOT_SAFETENSORS} (nor a .tar or .zip archive holding one){_html_hint(archive)}"
                ) from None
            with tar:
                members: list[tarfile.TarInfo] = []

                def listed() -> Iterator[tuple[str, int, str]]:
                    for entry in tar:  # lazily: an entry too large is refused before reading past it
                        members.append(entry)
                        yield entry.name, entry.size, _tar_kind(entry)
                        if _is_peft_config(entry.name, entry.size, _tar_kind(entry)):
                            config = tar.extractfile(entry)  # small: read as it is listed
                            configs[_folder(entry.name)] = config.read() if config else b""

                index = _choose_member(listed(), max_bytes)
                _write_member(tar.extractfile(members[index]), member, max_bytes)
            return configs.get(_folder(members[index].name))
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, RuntimeError):
        raise unreadable from None
    except OSError as error:  # gzip.BadGzipFile, or bz2's "Invalid data stream"; the disk's pass through
        if error.errno in DISK_ERRNOS:
            raise
        raise unreadable from None


def peft_config_beside(lora: Path) -> Path:
    """Where the adapter_config.json that came with a fetched LoRA is kept: beside it in the cache."""
    return lora.with_suffix(".adapter_config.json")


def _is_peft_config(name: str, size: int, kind: str) -> bool:
    return kind == "file" and name.replace("\\", "/").split("/")[-1] == PEFT_CONFIG and size <= MAX_PEFT_CONFIG_BYTES


def _folder(name: str) -> str:
    return name.replace("\\", "/").rpartition("/")[0].removeprefix("./")


def short_listing(names: list[str], shown: int = 10) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


@contextmanager
def _decompressed(path: Path) -> Iterator[tuple[IO[bytes], bool]]:
    """The file, decompressed as it is read when it is gzip, bzip2 or xz; and whether it was."""
    with path.open("rb") as file:
        magic = file.read(6)
    opener: Callable[[Path], IO[bytes]] | None = (
        gzip.open
        if magic.startswith(b"\x1f\x8b")
        else bz2.open
        if magic.startswith(b"BZh")
        else lzma.open
        if magic.startswith(b"\xfd7zXZ\x00")
        else None
    )
    with (opener or (lambda name: open(name, "rb")))(path) as stream:
        yield stream, opener is not None


class _Bounded:
    """A read-only view of a stream that goes no further than `limit` bytes and reads no more than
    MAX_ARCHIVE_HEADER_BYTES at once (tarfile reads a pax or GNU long-name header whole), so that a small
    compressed archive cannot make tarfile unpack, or hold in memory, more than that."""

    def __init__(self, stream: IO[bytes], limit: int):
        self._stream, self._limit = stream, limit

    def tell(self) -> int:
        return self._stream.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 2:
            raise OSError("seeking from the end is not supported")
        target = offset + (self.tell() if whence == 1 else 0)
        if target > self._limit:
            raise self._too_large()
        return self._stream.seek(target)

    def read(self, size: int | None = -1) -> bytes:
        allowed = self._limit - self.tell()
        wanted = allowed + 1 if size is None or size < 0 else size
        if wanted > MAX_ARCHIVE_HEADER_BYTES:
            raise ArchiveProblem(f"the archive has an entry header over {MAX_ARCHIVE_HEADER_BYTES:,} bytes")
        data = self._stream.read(min(wanted, allowed + 1))
        if len(data) > allowed:
            raise self._too_large()
        return data

    def _too_large(self) -> ArchiveProblem:
        return ArchiveProblem(f"the archive unpacks to over {self._limit:,} bytes (FLUX_LORA_MAX_BYTES)")


def write_bounded(chunks: Iterable[bytes], path: Path, max_bytes: int, too_large: Callable[[], Exception]) -> None:
    """Stream `chunks` to `path`, raising `too_large()` past `max_bytes`. Only the file's own operations are
    the disk's: errors from `chunks` (the network, or an archive) pass through as they are."""
    written = 0
    file = path.open("wb")
    try:
        for chunk in chunks:
            written += len(chunk)
            if written > max_bytes:
                raise too_large()
            file.write(chunk)
    except BaseException:
        with suppress(OSError):
            file.close()
        raise
    file.close()  # the last write may fail only here, on a full disk


def _write_member(stream: IO[bytes] | None, member: Path, max_bytes: int) -> None:
    assert stream is not None  # only regular files are chosen, and they always have a stream
    with stream:
        write_bounded(iter(lambda: stream.read(CHUNK_BYTES), b""), member, max_bytes, lambda: too_large(max_bytes))


def _zip_kind(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16  # Unix file type and permissions, where the archiver recorded them
    return "dir" if info.is_dir() else "file" if stat.S_IFMT(mode) in (0, stat.S_IFREG) else "link or special file"


def _tar_kind(member: tarfile.TarInfo) -> str:
    return "file" if member.isreg() else "dir" if member.isdir() else "link or special file"


def _choose_member(listing: Iterable[tuple[str, int, str]], max_bytes: int) -> int:
    """The index of the LoRA among (name, size, kind) entries, after checking every entry is safe. Each entry
    is checked as it comes, so that a lazy listing stops at the first one over a limit."""
    entries: list[tuple[str, int, str]] = []
    total = 0
    for name, size, kind in listing:
        if len(entries) == MAX_ARCHIVE_MEMBERS:
            raise ArchiveProblem(f"the archive has more than {MAX_ARCHIVE_MEMBERS} entries")
        entries.append((name, size, kind))
        segments = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or ".." in segments or re.match(r"[A-Za-z]:", name):
            raise ArchiveProblem(f"the archive entry {name!r} points outside the archive")
        if kind not in ("file", "dir"):
            raise ArchiveProblem(f"the archive entry {name!r} is a {kind}; only regular files are accepted")
        total += size
        if total > max_bytes:
            raise ArchiveProblem(f"the archive unpacks to over {max_bytes:,} bytes (FLUX_LORA_MAX_BYTES)")
    candidates = [
        index
        for index, (name, _, kind) in enumerate(entries)
        if kind == "file" and name.lower().endswith(".safetensors") and not name.startswith("__MACOSX/")
    ]
    preferred = [index for index in candidates if entries[index][0].split("/")[-1] == PREFERRED_MEMBER]
    if len(candidates) == 1 or len(preferred) == 1:
        return (preferred or candidates)[0]
    if not candidates:
        raise ArchiveProblem("the archive holds no .safetensors file")
    names = [entries[index][0] for index in candidates]
    raise ArchiveProblem(
        f"the archive holds several .safetensors files, not one {PREFERRED_MEMBER}: {short_listing(names)}"
    )


def _html_hint(path: Path) -> str:
    with path.open("rb") as file:
        start = file.read(512).lstrip().lower()
    return "; it is a web page, perhaps a sign-in or error page" if start.startswith((b"<!doctype", b"<html")) else ""
