"""LoRA sources (weights.py) against a local server that plays Replicate, Hugging Face, CivitAI and plain
hosts: every accepted reference form, the cache (hits, eviction, atomicity, one download per source),
safe archives, errors in the user's terms, and secrets kept out of messages and logs. No model needed."""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import tarfile
import threading
import time
import traceback
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

import downloads
import weights
from errors import LoraSourceError
from lora_loading import archives
from lora_loading.archives import peft_config_beside
from tests.conftest import data_uri
from tests.fake_hosts import FakeHost, start_fake_host
from weights import LoraCache, Reference, fetch_lora, parse_source

HEX = "5f1cbe5ea1b9f8a7b8ab35c50ab6eb14e1a8b9e27e8e1b70e8f6e8a3b3c2d1e0"
SECRET = "s3cr3t"


def lora(seed: int, values: int = 16) -> bytes:
    """A small safetensors file, different for every seed."""
    return safetensors.torch.save({"transformer.x.lora_A.weight": torch.full((values,), float(seed))})


def tar(files: dict[str, bytes], mode: str = "w", links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            archive.addfile(info)
    return buffer.getvalue()


def zipped(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHost]:
    """One server playing all three hubs, configured the way a deployment points at mirrors."""
    fake = start_fake_host()
    for name in ("FLUX_REPLICATE_URL", "FLUX_CIVITAI_URL", "HF_ENDPOINT"):
        monkeypatch.setenv(name, fake.url)
    for name in ("REPLICATE_API_TOKEN", "CIVITAI_API_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    yield fake
    fake.close()


@pytest.fixture
def storage() -> Iterator[FakeHost]:
    """Another host, as replicate.delivery and CivitAI's storage are: tokens must not follow redirects here."""
    fake = start_fake_host()
    yield fake
    fake.close()


@pytest.fixture
def cache(tmp_path: Path) -> LoraCache:
    return LoraCache(tmp_path / "cache", max_file_bytes=100_000, max_total_bytes=10_000_000)


def fetch(cache: LoraCache, source: str, input_name: str = "extra_lora") -> bytes:
    return fetch_lora(input_name, source, cache).read_bytes()


def failure(cache: LoraCache, source: str, input_name: str = "extra_lora") -> str:
    with pytest.raises(LoraSourceError) as caught:
        fetch_lora(input_name, source, cache)
    message = str(caught.value)
    assert message.startswith(f"Invalid {input_name} '") and message.endswith(".")
    return message


def cached_files(cache: LoraCache) -> list[str]:
    return sorted(path.name for path in cache.folder.iterdir() if path.name != ".locks")


# Parsing: every accepted form, and what it asks for.


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("owner/model", Reference("replicate", "owner/model")),
        (f"owner/model/{HEX}", Reference("replicate", "owner/model", HEX)),
        (f"owner/model/versions/{HEX}", Reference("replicate", "owner/model", HEX)),
        ("https://replicate.com/owner/my.model_1", Reference("replicate", "owner/my.model_1")),
        (f"replicate.com/owner/model/{HEX}", Reference("replicate", "owner/model", HEX)),
        (f"https://www.replicate.com/owner/model/versions/{HEX}/", Reference("replicate", "owner/model", HEX)),
        ("huggingface.co/owner/repo", Reference("huggingface", "owner/repo")),
        ("https://huggingface.co/owner/repo", Reference("huggingface", "owner/repo")),
        ("hf.co/owner/repo/lora.safetensors", Reference("huggingface", "owner/repo", None, "lora.safetensors")),
        (
            "huggingface.co/o/r/sub/x.safetensors?download=true",
            Reference("huggingface", "o/r", None, "sub/x.safetensors"),
        ),
        (
            "https://huggingface.co/o/r/blob/v1.0/a/b.safetensors",
            Reference("huggingface", "o/r", "v1.0", "a/b.safetensors"),
        ),
        (
            "huggingface.co/o/r/resolve/refs%2Fpr%2F3/x.safetensors",
            Reference("huggingface", "o/r", "refs/pr/3", "x.safetensors"),
        ),
        ("https://civitai.com/models/123", Reference("civitai", "123")),
        ("civitai.com/models/123/some-slug", Reference("civitai", "123")),
        ("https://civitai.com/models/123/slug?modelVersionId=456", Reference("civitai", "123", "456")),
        ("civitai.com/api/download/models/456", Reference("civitai", "", "456")),
        (
            "https://civitai.com/api/download/models/456?type=Model&format=SafeTensor",
            Reference("civitai", "", "456", query="type=Model&format=SafeTensor"),
        ),
        (
            "https://example.com/a.safetensors?sig=1&x=2",
            Reference("url", "https://example.com/a.safetensors?sig=1&x=2"),
        ),
        (
            "https://replicate.delivery/pbxt/abc/trained_model.tar",
            Reference("url", "https://replicate.delivery/pbxt/abc/trained_model.tar"),
        ),
        ("data:application/octet-stream;base64,AAAA", Reference("data", "data:application/octet-stream;base64,AAAA")),
    ],
)
def test_each_reference_form_parses_to_its_request(source: str, expected: Reference) -> None:
    assert parse_source("extra_lora", source) == expected


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("/srv/loras/style.safetensors", Reference("local", "/srv/loras/style.safetensors")),
        ("file:///srv/loras/style.safetensors", Reference("local", "/srv/loras/style.safetensors")),
        ("loras/style.safetensors", Reference("local", "loras/style.safetensors")),
        ("owner/model", Reference("replicate", "owner/model")),
    ],
)
def test_flux_main_lora_also_takes_local_paths(source: str, expected: Reference) -> None:
    assert parse_source("FLUX_MAIN_LORA", source) == expected


@pytest.mark.parametrize(
    "source",
    [
        "hello world",
        "owner",
        "owner/model/not a version",
        "owner/model/..",
        "owner/model/versions/v@1",
        "owner/model/versions/",
        "../model",
        "huggingface.co/owner",
        "huggingface.co/owner/repo/tree/main",
        "huggingface.co/o/r/blob/main",
        "civitai.com/user/someone",
        "civitai.com/models/abc",
        "civitai.com/models/1?modelVersionId=latest",
        "https://replicate.com/owner/model/readme",
        "ftp://example.com/a.safetensors",
        "/etc/passwd",
        "file:///etc/passwd",
        "~/loras/x.safetensors",
    ],
)
def test_an_unparseable_reference_lists_the_accepted_forms(cache: LoraCache, source: str) -> None:
    message = failure(cache, source)
    assert "not a LoRA source this predictor understands; expected owner/model[/version]" in message
    assert "huggingface.co/owner/repo" in message and "civitai.com/models/<id>" in message
    assert "local paths and other schemes are not accepted in requests" in message


def test_cache_keys_follow_what_is_fetched(monkeypatch: pytest.MonkeyPatch) -> None:
    def key(source: str) -> str:
        return parse_source("extra_lora", source).cache_key()

    assert key("owner/model") == key("https://replicate.com/owner/model")
    assert key(f"owner/model/{HEX}") == key(f"replicate.com/owner/model/versions/{HEX}")
    assert key("owner/model") != key(f"owner/model/{HEX}")
    # Differently signed URLs may be different files.
    assert key("https://x.io/a.safetensors?sig=1") != key("https://x.io/a.safetensors?sig=2")
    before = key("owner/model")
    monkeypatch.setenv("FLUX_REPLICATE_URL", "https://mirror.example")
    assert key("owner/model") != before


# Replicate.


def test_replicate_model_fetches_the_lora_from_its_tar_with_the_token_kept_home(
    host: FakeHost, storage: FakeHost, cache: LoraCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REPLICATE_API_TOKEN", "r8_" + SECRET)
    host.serve_replicate("me/style", tar({"config.yaml": b"rank: 4", "lora.safetensors": lora(1)}), delivery=storage)
    assert fetch(cache, "me/style") == lora(1)
    assert [(c.path, c.headers.get("authorization")) for c in host.calls] == [
        ("/me/style/_weights", f"Bearer r8_{SECRET}")
    ]
    assert len(storage.calls) == 1 and "authorization" not in storage.calls[0].headers
    # The same model as a URL is the same source: served from the cache.
    assert fetch(cache, "https://replicate.com/me/style") == lora(1)
    assert len(host.calls) == 1 and len(storage.calls) == 1


@pytest.mark.parametrize(
    ("form", "version"),
    [
        (f"me/style/{HEX}", HEX),
        (f"me/style/versions/{HEX}", HEX),
        (f"https://replicate.com/me/style/versions/{HEX}", HEX),
        ("me/style/version123", "version123"),
        ("me/style/versions/v1.2_final-b", "v1.2_final-b"),
    ],
)
def test_replicate_version_fetches_that_version(host: FakeHost, cache: LoraCache, form: str, version: str) -> None:
    host.serve_replicate("me/style", tar({"lora.safetensors": lora(2)}), version=version)
    host.serve_replicate("me/style", tar({"lora.safetensors": lora(3)}))
    assert fetch(cache, form) == lora(2)
    assert host.requests[0] == f"/me/style/versions/{version}/_weights"


def test_replicate_tar_prefers_lora_safetensors(host: FakeHost, cache: LoraCache) -> None:
    files = {"output/a.safetensors": lora(1), "output/lora.safetensors": lora(2), "z.safetensors": lora(3)}
    host.serve_replicate("me/style", tar(files))
    assert fetch(cache, "me/style") == lora(2)


def test_replicate_errors_name_the_token(host: FakeHost, cache: LoraCache) -> None:
    assert "not found (HTTP 404)" in failure(cache, "me/missing")
    host.serve("/me/private/_weights", b"{}", status=401)
    assert "access denied (HTTP 401); set REPLICATE_API_TOKEN" in failure(cache, "me/private")


# Hugging Face, through huggingface_hub against HF_ENDPOINT.


def test_hugging_face_repo_with_one_lora(host: FakeHost, cache: LoraCache) -> None:
    host.serve_hf_repo("me/repo", {"README.md": b"# hi", "config.json": b"{}", "style.safetensors": lora(4)})
    assert fetch(cache, "huggingface.co/me/repo") == lora(4)
    assert any(path.startswith("/me/repo/resolve/") for path in host.requests)
    calls = len(host.requests)
    assert fetch(cache, "https://huggingface.co/me/repo") == lora(4)
    assert len(host.requests) == calls  # the cache answered, the hub was not asked
    assert cached_files(cache) == [cache.path_for(parse_source("x", "hf.co/me/repo").cache_key()).name]


def test_a_peft_config_comes_with_its_lora_and_goes_with_it(host: FakeHost, tmp_path: Path) -> None:
    """peft's save_pretrained keeps the alpha in adapter_config.json: fetched with the file from a repository
    (the one in the file's folder) or an archive, kept beside it in the cache, and evicted with it."""
    cache = LoraCache(tmp_path / "cache", max_file_bytes=100_000, max_total_bytes=1)
    config = b'{"r": 4, "lora_alpha": 8}'
    host.serve_hf_repo("me/peft", {"sub/adapter_model.safetensors": lora(5), "sub/adapter_config.json": config})
    from_hub = fetch_lora("extra_lora", "huggingface.co/me/peft/sub/adapter_model.safetensors", cache)
    assert json.loads(peft_config_beside(from_hub).read_bytes()) == json.loads(config)
    packed = zipped(
        {"x/adapter_model.safetensors": lora(6), "x/adapter_config.json": config, "adapter_config.json": b"[]"}
    )
    from_zip = fetch_lora("extra_lora", data_uri(packed), cache)
    assert peft_config_beside(from_zip).read_bytes() == config  # the one in the member's folder
    plain = fetch_lora("extra_lora", data_uri(lora(7)), cache)
    assert not peft_config_beside(plain).exists()
    cache.evict(keep=[plain])
    assert cached_files(cache) == [plain.name]


def test_hugging_face_repo_with_several_loras_needs_a_file_name(host: FakeHost, cache: LoraCache) -> None:
    host.serve_hf_repo("me/repo", {"a.safetensors": lora(5), "sub/b.safetensors": lora(6)})
    message = failure(cache, "huggingface.co/me/repo")
    assert (
        "several .safetensors files; name one, as huggingface.co/me/repo/<file>: a.safetensors, sub/b.safetensors"
        in message
    )
    assert fetch(cache, "huggingface.co/me/repo/sub/b.safetensors") == lora(6)
    assert fetch(cache, "https://huggingface.co/me/repo/resolve/main/a.safetensors?download=true") == lora(5)


def test_hugging_face_revision(host: FakeHost, cache: LoraCache) -> None:
    host.serve_hf_repo("me/repo", {"a.safetensors": lora(7)}, revision="v1.0")
    host.serve_hf_repo("me/repo", {"a.safetensors": lora(8)})
    assert fetch(cache, "https://huggingface.co/me/repo/blob/v1.0/a.safetensors") == lora(7)
    assert "/api/models/me/repo/revision/v1.0?blobs=true" in host.requests
    assert fetch(cache, "huggingface.co/me/repo/a.safetensors") == lora(8)


def test_hugging_face_errors(host: FakeHost, cache: LoraCache) -> None:
    host.serve_hf_repo("me/repo", {"a.safetensors": lora(1), "notes.txt": b"x"})
    assert "not found: the repository has no file 'b.safetensors'" in failure(cache, "hf.co/me/repo/b.safetensors")
    assert "not found (HTTP 404)" in failure(cache, "huggingface.co/me/nothing")
    host.serve_hf_repo("me/empty", {"notes.txt": b"x"})
    assert "the repository has no .safetensors file" in failure(cache, "huggingface.co/me/empty")
    host.serve_hf_repo("me/big", {"big.safetensors": lora(1, values=50_000)})
    assert "larger than the 100,000 bytes accepted (FLUX_LORA_MAX_BYTES)" in failure(cache, "huggingface.co/me/big")
    assert not any("/resolve/" in path for path in host.requests)  # refused before downloading anything


def test_hugging_face_private_repo_needs_hf_token(
    host: FakeHost, cache: LoraCache, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    host.serve_hf_repo("me/private", {"a.safetensors": lora(9)}, token="hf_" + SECRET)
    caplog.set_level(logging.DEBUG)
    assert "access denied (HTTP 401); set HF_TOKEN to a token that may read it" in failure(
        cache, "huggingface.co/me/private"
    )
    monkeypatch.setenv("HF_TOKEN", "hf_" + SECRET)
    assert fetch(cache, "huggingface.co/me/private") == lora(9)
    assert SECRET not in caplog.text


# CivitAI.


def test_civitai_model_id_resolves_to_its_newest_versions_safetensors(host: FakeHost, cache: LoraCache) -> None:
    # The newest version's primary file is a pickle: the safetensors file is taken instead.
    host.serve_civitai(
        7, {70: {"model.pt": b"pickle", "lora.safetensors": lora(10)}, 60: {"old.safetensors": lora(11)}}
    )
    assert fetch(cache, "https://civitai.com/models/7/some-slug") == lora(10)
    assert host.requests[:2] == ["/api/v1/models/7", "/api/download/models/70?type=Model&format=SafeTensor"]
    assert fetch(cache, "civitai.com/models/7") == lora(10)
    assert len(host.requests) == 3  # API, download redirect, storage; then the cache


def test_civitai_prefers_the_primary_safetensors(host: FakeHost, cache: LoraCache) -> None:
    host.serve_civitai(8, {80: {"b.safetensors": lora(12), "a.safetensors": lora(13)}}, primary="a.safetensors")
    assert fetch(cache, "civitai.com/models/8") == lora(13)


def test_civitai_model_version_id_wins(host: FakeHost, cache: LoraCache) -> None:
    host.serve_civitai(7, {70: {"new.safetensors": lora(10)}, 60: {"old.safetensors": lora(11)}})
    assert fetch(cache, "https://civitai.com/models/7/slug?modelVersionId=60") == lora(11)
    assert host.requests[0] == "/api/v1/model-versions/60"


def test_civitai_download_url_sends_the_token_to_civitai_only(
    host: FakeHost,
    storage: FakeHost,
    cache: LoraCache,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    host.serve_civitai(7, {70: {"lora.safetensors": lora(14)}}, token="civ_" + SECRET, storage=storage)
    caplog.set_level(logging.DEBUG)
    message = failure(cache, "civitai.com/api/download/models/70")
    assert "access denied (HTTP 401); set CIVITAI_API_TOKEN to a token that may read it" in message
    monkeypatch.setenv("CIVITAI_API_TOKEN", "civ_" + SECRET)
    assert fetch(cache, "https://civitai.com/api/download/models/70") == lora(14)
    assert host.calls[-1].headers["authorization"] == f"Bearer civ_{SECRET}"
    assert storage.calls[-1].path.endswith("?X-Amz-Signature=s3cr3tsig")  # the signed storage URL...
    assert "authorization" not in storage.calls[-1].headers  # ...without the token
    assert fetch(cache, "civitai.com/models/7") == lora(14)  # the API call carries the token as well
    assert SECRET not in caplog.text and "s3cr3tsig" not in caplog.text


def test_civitai_errors(host: FakeHost, cache: LoraCache) -> None:
    assert "not found (HTTP 404)" in failure(cache, "civitai.com/models/404")
    host.serve_civitai(9, {90: {"model.pt": b"pickle", "data.zip": b"PK"}})
    assert "the CivitAI model version has no .safetensors file" in failure(cache, "civitai.com/models/9")
    host.serve("/api/v1/models/5", b"<html>", headers={"Content-Type": "text/html"})
    assert "the API's answer is not JSON" in failure(cache, "civitai.com/models/5")


# Plain URLs and data: URIs.


def test_a_signed_url_keeps_its_query(host: FakeHost, cache: LoraCache) -> None:
    def signed(handler: Any) -> tuple[int, dict[str, str], bytes]:
        return (200, {}, lora(15)) if handler.path.endswith(f"?sig={SECRET}&exp=1") else (403, {}, b"denied")

    host.routes["/files/style.safetensors"] = signed
    assert fetch(cache, host.url + f"/files/style.safetensors?sig={SECRET}&exp=1") == lora(15)
    message = failure(cache, host.url + "/files/style.safetensors?sig=expired")
    assert "access denied (HTTP 403); the file needs a token or a signed URL" in message and "expired" not in message


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/weights.tar", tar({"weights/lora.safetensors": lora(16)})),
        ("/weights.tar.gz", tar({"lora.safetensors": lora(16), "samples/a.png": b"png"}, mode="w:gz")),
        ("/weights.zip", zipped({"notes.txt": b"hi", "x/lora.safetensors": lora(16)})),
        ("/download?id=3", zipped({"style.safetensors": lora(16)})),  # no extension: the content decides
        ("/lora.safetensors", tar({"lora.safetensors": lora(16)})),  # a misleading one, too
    ],
)
def test_archives_at_plain_urls_and_in_data_uris(host: FakeHost, cache: LoraCache, path: str, body: bytes) -> None:
    assert fetch(cache, host.serve(path, body)) == lora(16)
    assert fetch(cache, data_uri(body)) == lora(16)
    assert len(cached_files(cache)) == 2  # the LoRA itself, once per source, and nothing else from the archive


def test_not_a_safetensors_file(host: FakeHost, cache: LoraCache) -> None:
    url = host.serve("/page.safetensors", b"<html>Sign in</html>", headers={"Content-Type": "text/html"})
    assert "the file is not a .safetensors file (nor a .tar or .zip archive holding one)" in failure(cache, url)
    assert "expected a base64 data: URI" in failure(cache, "data:text/plain,hello")
    url = host.serve("/fake.tar", tar({"lora.safetensors": b"\x10" + bytes(40)}))
    assert "the .safetensors file in the archive is not a safetensors file" in failure(cache, url)
    url = host.serve("/cut.tar.gz", tar({"lora.safetensors": lora(1, values=5000)}, mode="w:gz")[:-200])
    assert failure(cache, url)  # a damaged archive is refused like any other bad file
    assert cached_files(cache) == []


def test_size_limits(host: FakeHost, cache: LoraCache) -> None:
    limit = "larger than the 100,000 bytes accepted (FLUX_LORA_MAX_BYTES)"
    # Content-Length is honoured up front: the body is never read.
    assert limit in failure(cache, host.serve("/huge.safetensors", b"x", headers={"Content-Length": "10000000000"}))
    # Without one, the download stops at the limit.
    assert limit in failure(cache, host.serve("/stream.safetensors", [bytes(30_000)] * 5))
    assert limit in failure(cache, data_uri(bytes(150_000)))
    bomb = tar({"lora.safetensors": bytes(150_000)}, mode="w:gz")
    assert len(bomb) < 100_000
    assert "the archive unpacks to over 100,000 bytes" in failure(cache, host.serve("/bomb.tar.gz", bomb))
    assert cached_files(cache) == []


# Retries, timeouts and broken downloads.


def flaky(failures: list[int], body: bytes) -> Any:
    """A route that answers each status in `failures` once, then the body."""

    def answer(handler: Any) -> tuple[int, dict[str, str], bytes]:
        return (failures.pop(0), {}, b"busy") if failures else (200, {}, body)

    return answer


@pytest.mark.parametrize("statuses", [[503, 500], [429], []])
def test_transient_errors_are_retried(host: FakeHost, cache: LoraCache, statuses: list[int]) -> None:
    host.routes["/x.safetensors"] = flaky(list(statuses), lora(17))
    assert fetch(cache, host.url + "/x.safetensors") == lora(17)
    assert len(host.requests) == len(statuses) + 1


def test_retries_are_bounded(host: FakeHost, cache: LoraCache) -> None:
    host.routes["/x.safetensors"] = flaky([500] * 10, lora(17))
    assert "the server answered HTTP 500" in failure(cache, host.url + "/x.safetensors")
    assert len(host.requests) == downloads.ATTEMPTS


def test_a_download_broken_mid_file_leaves_nothing_and_the_next_attempt_works(host: FakeHost, cache: LoraCache) -> None:
    body = lora(18, values=5000)
    host.serve("/x.safetensors", body[: len(body) // 2], headers={"Content-Length": str(len(body))})
    url = host.url + "/x.safetensors"
    assert "the connection broke off before the end of the file" in failure(cache, url)
    assert cached_files(cache) == []
    assert len(host.requests) == downloads.ATTEMPTS
    host.serve("/x.safetensors", body)
    assert fetch(cache, url) == body


def test_a_broken_connection_is_retried(host: FakeHost, cache: LoraCache) -> None:
    body = lora(18, values=5000)
    answers = [(200, {"Content-Length": str(len(body))}, body[:100]), (200, {}, body)]
    host.routes["/x.safetensors"] = lambda handler: answers.pop(0)
    assert fetch(cache, host.url + "/x.safetensors") == body


def test_timeouts_and_unreachable_hosts(host: FakeHost, cache: LoraCache, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights, "READ_TIMEOUT_S", 0.2)

    def slow(handler: Any) -> tuple[int, dict[str, str], bytes]:
        time.sleep(0.5)
        return 200, {}, lora(1)

    host.routes["/slow.safetensors"] = slow
    assert "the server did not answer in time" in failure(cache, host.url + "/slow.safetensors")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    message = failure(cache, f"http://127.0.0.1:{port}/x.safetensors?token={SECRET}")
    assert "the download failed: the connection failed" in message and SECRET not in message


# The cache.


def test_a_killed_download_is_never_trusted_and_stale_parts_are_cleaned(host: FakeHost, cache: LoraCache) -> None:
    url = host.serve("/x.safetensors", lora(19))
    target = cache.path_for(parse_source("extra_lora", url).cache_key())
    cache.folder.mkdir(parents=True)
    target.with_suffix(".part").write_bytes(lora(19)[:20])  # what a killed download of this source left
    stale, fresh = cache.folder / "other.part", cache.folder / "another.hub.part"
    stale.write_bytes(b"x")
    fresh.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert fetch(cache, url) == lora(19)
    assert cached_files(cache) == sorted([target.name, fresh.name])


def test_least_recently_used_files_are_evicted_first(host: FakeHost, tmp_path: Path) -> None:
    size = len(lora(0))
    cache = LoraCache(tmp_path / "cache", max_file_bytes=100_000, max_total_bytes=3 * size)
    sources = {name: data_uri(lora(seed)) for seed, name in enumerate("abcd")}
    paths = {name: fetch_lora("extra_lora", sources[name], cache) for name in "abc"}
    for age, name in ((300, "a"), (200, "b"), (100, "c")):
        os.utime(paths[name], (time.time() - age, time.time() - age))
    fetch_lora("extra_lora", sources["a"], cache)  # a use makes "a" the most recent
    paths["d"] = fetch_lora("extra_lora", sources["d"], cache)
    assert all(path.exists() for path in paths.values())  # fetching alone never evicts
    cache.evict(keep=[paths["d"]])
    assert {name for name, path in paths.items() if path.exists()} == {"a", "c", "d"}


def test_a_burst_of_new_loras_never_leaves_more_than_the_bound_and_the_request_in_flight(tmp_path: Path) -> None:
    """Each request fetches its files, keeps them, and evicts the rest down to the bound: however fast new
    LoRAs come, the folder holds at most the bound plus the files of the request being served."""
    size = len(lora(0))
    cache = LoraCache(tmp_path / "cache", max_file_bytes=100_000, max_total_bytes=2 * size)
    for request in range(6):
        wanted = [fetch_lora(name, data_uri(lora(10 * request + i)), cache) for i, name in enumerate(NAMES)]
        with cache.in_use(wanted):
            cache.evict(keep=wanted)
            assert all(path.exists() for path in wanted)
            total = sum(path.stat().st_size for path in cache.folder.glob("*.safetensors"))
            assert total <= cache.max_total_bytes + sum(path.stat().st_size for path in wanted)
    assert sum(path.stat().st_size for path in cache.folder.glob("*.safetensors")) <= 2 * size


def test_a_file_another_process_is_loading_is_not_evicted(tmp_path: Path) -> None:
    size = len(lora(0))
    cache = LoraCache(tmp_path / "cache", max_file_bytes=100_000, max_total_bytes=size)
    busy = fetch_lora("extra_lora", data_uri(lora(1)), cache)
    os.utime(busy, (time.time() - 300, time.time() - 300))  # the least recently used
    newest = fetch_lora("extra_lora", data_uri(lora(2)), cache)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_SHARED_LOCK, str(busy)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        cache.evict(keep=[newest])
        assert busy.exists()  # over the bound, but in use elsewhere
    finally:
        holder.kill()
        holder.wait()
    cache.evict(keep=[newest])
    assert not busy.exists() and newest.exists()


NAMES = ("replicate_weights", "extra_lora")
# What LoraCache.in_use does in the other process: a shared flock while its request loads the file.
HOLD_SHARED_LOCK = """
import fcntl, sys, time
handle = open(sys.argv[1], "rb")
fcntl.flock(handle, fcntl.LOCK_SH)
print("held", flush=True)
time.sleep(60)
"""


def test_cache_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FLUX_LORA_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FLUX_LORA_MAX_BYTES", "1234")
    monkeypatch.setenv("FLUX_LORA_CACHE_BYTES", "5678")
    assert LoraCache.from_env() == LoraCache(tmp_path, 1234, 5678)


def test_concurrent_requests_for_one_source_download_once(host: FakeHost, cache: LoraCache) -> None:
    def slow(handler: Any) -> tuple[int, dict[str, str], bytes]:
        time.sleep(0.3)
        return 200, {}, lora(20)

    host.routes["/slow.safetensors"] = slow
    results: list[bytes] = []
    threads = [
        threading.Thread(target=lambda: results.append(fetch(cache, host.url + "/slow.safetensors"))) for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [lora(20)] * 3 and host.requests == ["/slow.safetensors"]


def test_another_process_holding_the_lock_is_waited_for(host: FakeHost, cache: LoraCache) -> None:
    url = host.serve("/x.safetensors", lora(21))
    target = cache.path_for(parse_source("extra_lora", url).cache_key())
    lock_path = cache.folder / ".locks" / (target.stem + ".lock")
    lock_path.parent.mkdir(parents=True)
    done = threading.Event()
    with lock_path.open("a") as held:  # another open file description: flock treats it as another process
        fcntl.flock(held, fcntl.LOCK_EX)
        worker = threading.Thread(target=lambda: (fetch(cache, url), done.set()))
        worker.start()
        time.sleep(0.2)
        assert not done.is_set() and host.requests == []
        target.write_bytes(lora(22))  # what the other process fetched
    worker.join()
    assert done.is_set() and host.requests == [] and target.read_bytes() == lora(22)


# Archive safety.


def symlinked_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        info = zipfile.ZipInfo("lora.safetensors")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (tar({"../lora.safetensors": lora(1)}), "the archive entry '../lora.safetensors' points outside the archive"),
        (tar({"a/../../x.safetensors": lora(1)}), "points outside the archive"),
        (tar({"/tmp/lora.safetensors": lora(1)}), "the archive entry '/tmp/lora.safetensors' points outside"),
        (zipped({"../../lora.safetensors": lora(1)}), "points outside the archive"),
        (tar({}, links={"lora.safetensors": "/etc/passwd"}), "'lora.safetensors' is a link or special file"),
        (tar({"lora.safetensors": lora(1)}, links={"x": "/etc/passwd"}), "'x' is a link or special file"),
        (symlinked_zip(), "'lora.safetensors' is a link or special file; only regular files are accepted"),
        (tar({"config.yaml": b"x"}), "the archive holds no .safetensors file"),
        (tar({"a/lora.safetensors": lora(1), "b/lora.safetensors": lora(2)}), "a/lora.safetensors, b/lora.safetensors"),
        (
            tar({"a.safetensors": lora(1), "b/c.safetensors": lora(2)}),
            "several .safetensors files, not one lora.safetensors: a.safetensors, b/c.safetensors",
        ),
    ],
)
def test_unsafe_or_ambiguous_archives_are_refused(
    host: FakeHost, cache: LoraCache, tmp_path: Path, body: bytes, problem: str
) -> None:
    assert problem in failure(cache, host.serve("/weights.tar", body))
    assert cached_files(cache) == [] and not (tmp_path / "lora.safetensors").exists()


def test_archives_with_too_many_members(host: FakeHost, cache: LoraCache, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(archives, "MAX_ARCHIVE_MEMBERS", 5)
    files = {f"{index}.txt": b"x" for index in range(8)} | {"lora.safetensors": lora(1)}
    assert "the archive has more than 5 entries" in failure(cache, host.serve("/many.tar", tar(files)))
    assert "the archive has more than 5 entries" in failure(cache, host.serve("/many.zip", zipped(files)))


# Local files and schemes.


def test_local_paths_are_for_flux_main_lora_only(tmp_path: Path, cache: LoraCache) -> None:
    path = tmp_path / "style.safetensors"
    path.write_bytes(lora(23))
    assert fetch_lora("FLUX_MAIN_LORA", str(path), cache) == path  # used in place, not copied
    assert fetch_lora("FLUX_MAIN_LORA", path.as_uri(), cache) == path
    assert "no such file" in failure(cache, str(tmp_path / "missing.safetensors"), "FLUX_MAIN_LORA")
    archive = tmp_path / "trained_model.tar"
    archive.write_bytes(tar({"lora.safetensors": lora(24)}))
    assert fetch(cache, str(archive), "FLUX_MAIN_LORA") == lora(24)
    for source in (str(path), path.as_uri()):
        assert "local paths and other schemes are not accepted in requests" in failure(cache, source)
        assert "local paths and other schemes are not accepted" in failure(cache, source, "replicate_weights")


# Secrets.


@pytest.mark.parametrize("status", [401, 403, 404, 500])
def test_secrets_never_reach_messages_tracebacks_or_logs(
    host: FakeHost, cache: LoraCache, caplog: pytest.LogCaptureFixture, status: int
) -> None:
    caplog.set_level(logging.DEBUG)
    host.serve("/x.safetensors", b"no", status=status)
    url = host.url.replace("http://", f"http://user:{SECRET}pw@") + f"/x.safetensors?X-Amz-Signature={SECRET}"
    with pytest.raises(LoraSourceError) as caught:
        fetch_lora("extra_lora", url, cache)
    shown = "".join(traceback.format_exception(caught.value))
    assert SECRET not in shown and caught.value.__cause__ is None
    assert f"Invalid extra_lora '{host.url}/x.safetensors'" in shown
    assert SECRET not in caplog.text and "/x.safetensors" in caplog.text
