"""Weights settings as http(s) URLs of .tar files: parallel ranged download, resume, checks, safe
unpacking, the cache, and setup from tars served by a local server as a hosted container would get them."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import model_weights
from engine import config
from engine.config import Settings
from errors import WeightsError
from model_weights import fetch_weights
from tests.compare import assert_same_images, assert_same_weights, predictor_weights
from tests.conftest import FAST, make_predictor, predictor_env, run

SECRET = "s3cr3t-signature"
RANGE = re.compile(r"bytes=(\d+)-(\d+)")


@dataclass
class RangeServer:
    """Serves files with Range support, as object stores and CDNs do, and records every Range asked."""

    files: dict[str, bytes] = field(default_factory=dict)
    etags: dict[str, str] = field(default_factory=dict)  # by default, the sha1 of the whole file
    ranges: list[str] = field(default_factory=list)
    failing_starts: set[int] = field(default_factory=set)  # parts answered with HTTP 500
    ranged: bool = True
    byte_delay_s: float = 0.0  # > 0: trickle one byte at a time
    url: str = ""

    def start(self) -> RangeServer:
        served = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
                path = self.path.split("?")[0]
                if path not in served.files:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = served.files[path]
                etag = served.etags.get(path, '"' + hashlib.sha1(data).hexdigest() + '"')
                asked = RANGE.fullmatch(self.headers.get("Range", ""))
                served.ranges.append(self.headers.get("Range", ""))
                if asked and served.ranged:
                    start, end = int(asked[1]), min(int(asked[2]), len(data) - 1)
                    if start in served.failing_starts:
                        self.send_response(500)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                    data = data[start : end + 1]
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", etag)
                self.end_headers()
                if served.byte_delay_s:
                    for index in range(len(data)):
                        time.sleep(served.byte_delay_s)
                        self.wfile.write(data[index : index + 1])
                        self.wfile.flush()
                else:
                    self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server() -> Iterator[RangeServer]:
    served = RangeServer().start()
    yield served
    served.close()


@pytest.fixture(autouse=True)
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUX_WEIGHTS_PART_BYTES", str(64 * 1024))
    monkeypatch.setenv("FLUX_WEIGHTS_DOWNLOAD_CONNECTIONS", "4")


def tar_of(files: dict[str, bytes], *, prefix: str = "") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def tar_with_link(name: str, target: str) -> bytes:
    buffer = io.BytesIO(tar_of({"model_index.json": b"{}"}))
    with tarfile.open(fileobj=buffer, mode="a") as archive:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = tarfile.SYMTYPE, target
        archive.addfile(info)
    return buffer.getvalue()


def tar_of_folder(folder: Path, arcname: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        archive.add(folder, arcname=arcname)
    return buffer.getvalue()


MODEL = {
    "model_index.json": b'{"_class_name": "FluxPipeline"}',
    "transformer/config.json": b"{}",
    "transformer/diffusion_pytorch_model.safetensors": os.urandom(300_000),
}


def files_in(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def failure(url: str, cache: Path) -> str:
    with pytest.raises(WeightsError) as caught:
        fetch_weights("FLUX_DEV_WEIGHTS", url, cache)
    message = str(caught.value)
    assert message.startswith("Invalid FLUX_DEV_WEIGHTS 'http://127.0.0.1:") and message.endswith("."), message
    assert SECRET not in message and caught.value.__cause__ is None
    return message


def test_a_tar_arrives_in_parallel_ranges_and_a_second_start_asks_for_nothing(
    server: RangeServer, tmp_path: Path
) -> None:
    server.files["/dev.tar"] = tar_of(MODEL)
    folder = fetch_weights("FLUX_DEV_WEIGHTS", f"{server.url}/dev.tar?sig={SECRET}", tmp_path)
    assert files_in(folder) == {name: data for name, data in MODEL.items()}
    parts = [asked for asked in server.ranges if asked != "bytes=0-0"]
    assert len(parts) == -(-len(server.files["/dev.tar"]) // (64 * 1024)) > 4  # every part, once each
    assert len(set(parts)) == len(parts)
    assert not (folder.parent / "download.tar").exists()  # the tar is gone once unpacked

    server.ranges.clear()
    again = fetch_weights("FLUX_DEV_WEIGHTS", f"{server.url}/dev.tar?sig=signed-anew", tmp_path)
    assert again == folder and server.ranges == []


@pytest.mark.parametrize("prefix", ["FLUX.1-dev/", "./", "./FLUX.1-dev/"])
def test_one_top_folder_or_dot_prefix_is_unpacked_to_the_same_layout(
    server: RangeServer, tmp_path: Path, prefix: str
) -> None:
    server.files["/dev.tar"] = tar_of(MODEL, prefix=prefix)
    assert files_in(fetch_weights("FLUX_DEV_WEIGHTS", f"{server.url}/dev.tar", tmp_path)) == MODEL


def test_a_download_cut_off_resumes_with_only_the_missing_parts(server: RangeServer, tmp_path: Path) -> None:
    server.files["/dev.tar"] = tar_of(MODEL)
    part = 64 * 1024
    server.failing_starts = {3 * part}
    message = failure(f"{server.url}/dev.tar?sig={SECRET}", tmp_path)
    assert "the server answered HTTP 500" in message
    asked_first = {asked for asked in server.ranges if asked != "bytes=0-0"}

    server.failing_starts.clear()
    server.ranges.clear()
    folder = fetch_weights("FLUX_DEV_WEIGHTS", f"{server.url}/dev.tar", tmp_path)
    assert files_in(folder) == MODEL
    asked_again = [asked for asked in server.ranges if asked != "bytes=0-0"]
    assert f"bytes={3 * part}-{4 * part - 1}" in asked_again
    total_parts = -(-len(server.files["/dev.tar"]) // part)
    assert len(asked_again) < total_parts  # the parts that had landed were not asked for again
    assert len(asked_first) + len(asked_again) >= total_parts


def test_a_file_changed_on_the_server_starts_over(server: RangeServer, tmp_path: Path) -> None:
    server.files["/dev.tar"] = tar_of(MODEL)
    server.failing_starts = {2 * 64 * 1024}
    failure(f"{server.url}/dev.tar", tmp_path)
    changed = {**MODEL, "transformer/diffusion_pytorch_model.safetensors": os.urandom(300_000)}
    server.files["/dev.tar"], server.failing_starts = tar_of(changed), set()
    assert files_in(fetch_weights("FLUX_DEV_WEIGHTS", f"{server.url}/dev.tar", tmp_path)) == changed


def test_a_server_without_ranges_is_read_in_one_stream(server: RangeServer, tmp_path: Path) -> None:
    server.ranged = False
    server.files["/dev.tar"] = tar_of(MODEL)
    assert files_in(fetch_weights("FLUX_DEV_WEIGHTS", f"{server.url}/dev.tar", tmp_path)) == MODEL


def test_not_found(server: RangeServer, tmp_path: Path) -> None:
    message = failure(f"{server.url}/missing.tar?sig={SECRET}", tmp_path)
    assert message == f"Invalid FLUX_DEV_WEIGHTS '{server.url}/missing.tar': not found (HTTP 404)."


@pytest.mark.parametrize(
    ("archive", "problem"),
    [
        (os.urandom(200_000), "the file is not a readable .tar archive"),
        (tar_of(MODEL)[:150_000], "the file is not a readable .tar archive"),
        (tar_of({"../escape.json": b"{}", "model_index.json": b"{}"}), "the archive has an unsafe member"),
        (tar_with_link("transformer/weights.safetensors", "/etc/passwd"), "the archive has an unsafe member"),
        (tar_of({"weights/readme.txt": b"x", "notes.txt": b"y"}), "no model_index.json or config.json"),
    ],
    ids=["not a tar", "truncated", "dot-dot member", "link out of the folder", "no diffusers folder"],
)
def test_a_bad_archive_is_refused_and_leaves_nothing_usable(
    server: RangeServer, tmp_path: Path, archive: bytes, problem: str
) -> None:
    server.files["/dev.tar"] = archive
    assert problem in failure(f"{server.url}/dev.tar", tmp_path)
    assert not list(tmp_path.rglob(model_weights.MARKER))
    assert not (tmp_path.parent / "escape.json").exists()


def test_too_little_disk_is_said_before_downloading(
    server: RangeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.files["/dev.tar"] = tar_of(MODEL)
    monkeypatch.setattr(model_weights.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    message = failure(f"{server.url}/dev.tar", tmp_path)
    assert "bytes of disk" in message and "1,000 are free" in message
    assert [asked for asked in server.ranges if asked != "bytes=0-0"] == []


def test_a_disk_that_fills_up_gives_one_clear_error(
    server: RangeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.files["/dev.tar"] = tar_of(MODEL)

    def full(*args: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model_weights.os, "pwrite", full)
    assert "is full (FLUX_WEIGHTS_CACHE_DIR names another folder)" in failure(f"{server.url}/dev.tar", tmp_path)


def test_a_server_below_the_minimum_rate_fails_setup(
    server: RangeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.files["/dev.tar"] = tar_of(MODEL)
    server.byte_delay_s = 0.05
    monkeypatch.setenv("FLUX_DOWNLOAD_MIN_BYTES_PER_S", "1000")
    monkeypatch.setenv("FLUX_DOWNLOAD_MIN_RATE_WINDOW_S", "0.4")
    start = time.monotonic()
    assert "the download ran slower than 1000 bytes a second" in failure(f"{server.url}/dev.tar", tmp_path)
    assert time.monotonic() - start < 5


def test_settings_prefer_a_filled_weights_folder_and_fetch_urls(
    server: RangeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in config.WEIGHT_SETTINGS.values():
        monkeypatch.delenv(name[0], raising=False)
    monkeypatch.setattr(config, "WEIGHTS_FOLDER", tmp_path / "flux-weights")
    assert Settings.from_env().dev_weights == config.DEFAULT_DEV_WEIGHTS
    (tmp_path / "flux-weights" / "dev").mkdir(parents=True)
    (tmp_path / "flux-weights" / "dev" / "model_index.json").write_text("{}")
    assert Settings.from_env().dev_weights == str(tmp_path / "flux-weights" / "dev")
    assert Settings.from_env().schnell_weights == config.DEFAULT_SCHNELL_WEIGHTS  # not downloaded: the hub

    server.files["/schnell.tar"] = tar_of(MODEL)
    monkeypatch.setenv("FLUX_SCHNELL_WEIGHTS", f"{server.url}/schnell.tar")
    monkeypatch.setenv("FLUX_WEIGHTS_CACHE_DIR", str(tmp_path / "cache"))
    fetched = Settings.from_env().with_weights_fetched()
    assert fetched.dev_weights == str(tmp_path / "flux-weights" / "dev")  # a setting always wins, else the folder
    assert files_in(Path(fetched.schnell_weights)) == MODEL


def test_setup_from_tars_gives_the_same_images_as_from_folders(
    server: RangeServer, demo_models: Any, predictor: Any, tmp_path: Path
) -> None:
    """The hosted-container path end to end: every weights setting a .tar URL on a local server."""
    urls = {}
    for name, folder in vars(demo_models).items():
        server.files[f"/{name}.tar"] = tar_of_folder(folder, arcname=name)
        urls[name] = f"{server.url}/{name}.tar?sig={SECRET}"
    env = predictor_env(
        demo_models,
        tmp_path / "lora-cache",
        FLUX_DEV_WEIGHTS=urls["dev"],
        FLUX_SCHNELL_WEIGHTS=urls["schnell"],
        FLUX_SAFETY_CHECKER_WEIGHTS=urls["safety_checker"],
        FLUX_NSFW_CLASSIFIER_WEIGHTS=urls["nsfw_classifier"],
        FLUX_WEIGHTS_CACHE_DIR=str(tmp_path / "weights-cache"),
    )
    from_tars = make_predictor(env)
    inputs = {**FAST, "prompt": "a cat", "output_format": "png"}
    for model in ("dev", "schnell"):
        # Bit for bit the same weights, so the same arithmetic: the same bytes on any machine.
        images = run(from_tars, model=model, **inputs), run(predictor, model=model, **inputs)
        assert_same_weights(predictor_weights(from_tars, model), predictor_weights(predictor, model), ulps=0)
        assert_same_images(*images)

    server.ranges.clear()
    make_predictor(env)  # a second start: everything from the cache
    assert server.ranges == []


def test_download_weights_script_fills_the_folder_settings_use(tmp_path: Path) -> None:
    """script/download-weights against a local stand-in for the Hub (huggingface_hub's own client, via
    HF_ENDPOINT): the gated dev repo wants the token; only the files setup reads are fetched."""
    from tests.fake_hosts import start_fake_host
    from tooling.download_weights import MODELS

    assert {subfolder for _, subfolder in config.WEIGHT_SETTINGS.values()} == set(MODELS)
    hub = start_fake_host()
    token = "hf_" + SECRET
    repos = {
        "dev": {**MODEL, "flux1-dev.safetensors": b"single-file checkpoint", "vae/config.json": b"{}"},
        "schnell": {**MODEL, "text_encoder/config.json": b"{}"},
        "safety-checker": {"config.json": b"{}", "model.safetensors": b"s", "pytorch_model.bin": b"b"},
        "nsfw-classifier": {"config.json": b"{}", "pytorch_model.bin": b"b"},
    }
    for name, files in repos.items():
        hub.serve_hf_repo(MODELS[name][0], files, token=token if name == "dev" else None)
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf-home")}
    script = [str(Path(__file__).resolve().parents[1] / "script" / "download-weights"), "--dest", str(tmp_path)]
    try:
        refused = subprocess.run(script, env=env, capture_output=True, text=True, timeout=300)
        assert refused.returncode == 1
        assert "accept its license at https://huggingface.co/black-forest-labs/FLUX.1-dev" in refused.stderr
        done = subprocess.run(
            [*script, "--tar"], env={**env, "HF_TOKEN": token}, capture_output=True, text=True, timeout=300
        )
    finally:
        hub.close()
    assert done.returncode == 0, done.stderr[-3000:]
    assert SECRET not in refused.stderr + done.stderr
    fetched = {name: {n for n in files_in(tmp_path / name) if not n.startswith(".cache/")} for name in repos}
    assert fetched == {
        "dev": {*MODEL, "vae/config.json"},  # not the single-file checkpoint
        "schnell": set(MODEL),  # not the encoders schnell borrows from dev
        "safety-checker": {"config.json", "model.safetensors"},  # safetensors where there are some
        "nsfw-classifier": {"config.json", "pytorch_model.bin"},
    }
    with tarfile.open(tmp_path / "dev.tar") as archive:
        assert sorted(archive.getnames()) == sorted({*MODEL, "vae/config.json"})
