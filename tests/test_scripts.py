"""script/server and script/predict end to end, as subprocesses, on the offline demo model.

One server per predictor class for the whole module; each script/predict run is a fresh
process (a few seconds each, mostly imports).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.cog_static import MISSING, static_inputs
from tests.fake_hosts import FakeHost, start_fake_host
from tests.lora_factory import make_peft_lora
from tooling.cli import DEMO_MODEL_FOLDER
from tooling.demo_model import ensure_demo_models

REPO = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 120
GOOD_INPUT = {
    "prompt": "a cat",
    "aspect_ratio": "custom",
    "width": 256,
    "height": 256,
    "num_inference_steps": 2,
    "seed": 1,
    "output_format": "png",
}
# Inherited settings that would change what the scripts do.
CLEARED_ENV = (
    "PREDICTOR",
    "FLUX_MAIN_LORA",
    "FLUX_DEV_WEIGHTS",
    "FLUX_SCHNELL_WEIGHTS",
    "FLUX_SAFETY_CHECKER_WEIGHTS",
    "FLUX_NSFW_CLASSIFIER_WEIGHTS",
    "PORT",
    "HOST",
)


def script_env(lora_cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED_ENV}
    return {**env, "FLUX_DEMO_MODEL": "1", "FLUX_DEVICE": "cpu", "FLUX_LORA_CACHE_DIR": str(lora_cache), **extra}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(method: str, url: str, body: Any = None, timeout: float = 60) -> tuple[int, Any]:
    """Status and JSON body; cog answers some errors in plain text, returned as text."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        raw = error.read()
        try:
            return error.code, json.loads(raw)
        except ValueError:
            return error.code, raw.decode(errors="replace")


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group (server and worker), SIGKILL if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@contextlib.contextmanager
def running_server(env: dict[str, str], log_path: Path, *arguments: str) -> Iterator[str]:
    port = free_port()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(REPO / "script" / "server"), *arguments],
            env={**env, "PORT": str(port)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so stop() reaches the worker too
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"script/server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            with contextlib.suppress(OSError, ValueError):
                status, body = http("GET", f"{base}/health-check", timeout=2)
                if status == 200 and body.get("status") == "READY":
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"script/server not READY after {READY_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.2)
        yield base
    finally:
        stop(process)


def predict(base: str, inputs: dict[str, Any]) -> tuple[int, Any]:
    return http("POST", f"{base}/predictions", {"input": inputs})


def predict_when_free(base: str, inputs: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
    """The prediction, retried while the server answers 409. Not only while another prediction
    runs: about one request in a hundred sent right after the previous answer gets 409 too, as
    cog frees the slot a moment after it answers."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = predict(base, inputs)
        if status != 409 or time.monotonic() > deadline:
            assert status == 200, body
            return body
        time.sleep(0.1)


def png_of(data_uri: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert data_uri.startswith(prefix), data_uri[:40]
    return base64.b64decode(data_uri[len(prefix) :])


def size_of(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


@pytest.fixture(scope="module")
def demo_weights() -> Path:
    """The folder both scripts use for FLUX_DEMO_MODEL=1 (built once, then reused)."""
    return ensure_demo_models(DEMO_MODEL_FOLDER).dev


@pytest.fixture(scope="module")
def lora_file(demo_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(demo_weights, subfolder="transformer")
    return make_peft_lora(transformer, tmp_path_factory.mktemp("lora") / "main.safetensors")


@pytest.fixture(scope="module")
def lora_host() -> Iterator[FakeHost]:
    host = start_fake_host()
    yield host
    host.close()


@pytest.fixture(scope="module")
def server(demo_weights: Path, lora_host: FakeHost, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("server")
    env = script_env(folder / "lora-cache", FLUX_REPLICATE_URL=lora_host.url)
    with running_server(env, folder / "server.log") as base:
        yield base


@pytest.fixture(scope="module")
def trained_server(server: str, lora_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # Started once `server` is READY, so the two setups do not share the 2 CPU cores.
    folder = tmp_path_factory.mktemp("trained-server")
    env = script_env(folder / "lora-cache", PREDICTOR="TrainedLoraPredictor", FLUX_MAIN_LORA=str(lora_file))
    with running_server(env, folder / "server.log") as base:
        yield base


# --- script/server ------------------------------------------------------------------------------


def test_server_openapi_is_the_schema_cog_build_writes(server: str, trained_server: str) -> None:
    """The schema script/server validates against holds, field for field, what cog's static
    generator reads from predict.py (tests/cog_static.py): order, required, defaults,
    bounds, choices and descriptions."""
    source = (REPO / "predict.py").read_text(encoding="utf-8")
    for base, class_name in ((server, "Predictor"), (trained_server, "TrainedLoraPredictor")):
        status, schema = http("GET", f"{base}/openapi.json")
        assert status == 200
        components = schema["components"]["schemas"]
        properties = components["Input"]["properties"]
        fields = static_inputs(source, class_name)
        # cog's server re-serialises the document with sorted keys: the order is x-order's.
        assert sorted(properties, key=lambda name: properties[name]["x-order"]) == [field.name for field in fields]
        assert components["Input"]["required"] == [field.name for field in fields if field.default is MISSING]
        for field in fields:
            served = properties[field.name]
            assert served["x-order"] == field.order, field.name
            assert served.get("description") == field.description, field.name
            assert (served.get("minimum"), served.get("maximum")) == (field.ge, field.le), field.name
            assert served.get("default", MISSING) == field.default, field.name
            if field.choices is not None:
                assert served["allOf"] == [{"$ref": f"#/components/schemas/{field.name}"}], field.name
                assert components[field.name]["enum"] == field.choices, field.name
        assert ("replicate_weights" in properties) == (class_name == "Predictor")


class UploadTarget:
    """A local stand-in for the storage `--upload-url` names: keeps each PUT body by path."""

    def __init__(self) -> None:
        received: dict[str, bytes] = {}

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:  # noqa: N802 - the name http.server calls
                received[self.path] = self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(201)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.received = received
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/uploads/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_server_forwards_its_arguments_uploads_outputs_and_reports_metrics(demo_weights: Path, tmp_path: Path) -> None:
    """`script/server --upload-url URL`: cog PUTs each output there and answers with its URL."""
    target = UploadTarget()
    try:
        env = script_env(tmp_path / "lora-cache")
        with running_server(env, tmp_path / "server.log", "--upload-url", target.url) as base:
            body = predict_when_free(base, {**GOOD_INPUT, "num_outputs": 2})
    finally:
        target.server.shutdown()
    assert body["status"] == "succeeded", body.get("error")
    assert len(body["output"]) == 2 and all(url.startswith(target.url) for url in body["output"]), body["output"]
    assert len(target.received) == 2
    for url in body["output"]:
        uploaded = target.received[urllib.parse.urlsplit(url).path]
        assert size_of(uploaded) == (256, 256) and uploaded.startswith(b"\x89PNG")
    metrics = body["metrics"]
    assert metrics["image_output_count"] == 2
    for phase in ("text_encoding_time", "denoising_time", "decoding_time", "safety_check_time", "file_encoding_time"):
        assert 0 < metrics[phase] < metrics["predict_time"], (phase, metrics)


def test_server_prediction_then_errors_leave_no_trace(server: str) -> None:
    first = predict_when_free(server, GOOD_INPUT)
    assert first["status"] == "succeeded", first.get("error")
    assert len(first["output"]) == 1
    image = png_of(first["output"][0])
    assert size_of(image) == (256, 256)
    for line in ("Denoising step 2/2", "seed 1", "Timing: denoising"):
        assert line in first["logs"], first["logs"]

    # Out of the schema's bounds: cog's own validation answers 422 before predict() runs.
    status, body = predict(server, {**GOOD_INPUT, "num_outputs": 9})
    assert status == 422, body
    assert [error["loc"] for error in body["detail"]] == [["body", "input", "num_outputs"]]

    # Valid for the schema, wrong for the predictor: a failed prediction naming the input.
    body = predict_when_free(server, {"prompt": "a cat", "aspect_ratio": "custom", "height": 256})
    assert body["status"] == "failed"
    assert "width" in body["error"]

    again = predict_when_free(server, GOOD_INPUT)
    assert again["status"] == "succeeded", again.get("error")
    assert png_of(again["output"][0]) == image


def test_server_loras_from_replicate_and_failed_downloads(server: str, lora_host: FakeHost, lora_file: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        archive.add(lora_file, arcname="output/lora.safetensors")
    lora_host.serve_replicate("owner/style", buffer.getvalue())
    base = predict_when_free(server, GOOD_INPUT)
    assert base["status"] == "succeeded", base.get("error")

    styled = predict_when_free(server, {**GOOD_INPUT, "replicate_weights": "owner/style", "lora_scale": 0.8})
    assert styled["status"] == "succeeded", styled.get("error")
    assert png_of(styled["output"][0]) != png_of(base["output"][0])
    assert "LoRA replicate_weights owner/style at scale 0.8" in styled["logs"]

    missing = f"{lora_host.url}/gone.safetensors?X-Amz-Signature=s3cr3t"
    failed = predict_when_free(server, {**GOOD_INPUT, "replicate_weights": "owner/style", "extra_lora": missing})
    assert failed["status"] == "failed"
    assert "Invalid extra_lora" in failed["error"] and "HTTP 404" in failed["error"]
    assert "s3cr3t" not in failed["error"] + failed["logs"]

    again = predict_when_free(server, GOOD_INPUT)
    assert again["status"] == "succeeded", again.get("error")
    assert png_of(again["output"][0]) == png_of(base["output"][0])


def test_trained_lora_server(server: str, trained_server: str, lora_file: Path) -> None:
    status, schema = http("GET", f"{trained_server}/openapi.json")
    assert status == 200
    properties = schema["components"]["schemas"]["Input"]["properties"]
    assert "replicate_weights" not in properties
    assert {"lora_scale", "extra_lora", "extra_lora_scale"} <= set(properties)

    # The deployment's LoRA is applied: the same request as on the base server differs.
    trained = predict_when_free(trained_server, GOOD_INPUT)
    assert trained["status"] == "succeeded", trained.get("error")
    assert "LoRA FLUX_MAIN_LORA" in trained["logs"], trained["logs"]
    base = predict_when_free(server, GOOD_INPUT)
    assert base["status"] == "succeeded", base.get("error")
    assert png_of(trained["output"][0]) != png_of(base["output"][0])
    # The input the deployment fixed cannot be overridden: cog drops inputs its schema does
    # not list, so the URL is never fetched and the deployment's LoRA still applies.
    body = predict_when_free(
        trained_server, {**GOOD_INPUT, "replicate_weights": "https://example.invalid/x.safetensors"}
    )
    assert "example.invalid" not in body["logs"]
    assert png_of(body["output"][0]) == png_of(trained["output"][0])


# --- script/predict -----------------------------------------------------------------------------

FAST_ARGS = ("-i", "num_inference_steps=2", "-i", "output_format=png")
PREDICT_RUNS: dict[str, tuple[str, ...]] = {
    "txt2img": (
        *("-i", "prompt=a photo of a cat", "-i", "aspect_ratio=custom", "-i", "width=256", "-i", "height=256"),
        *FAST_ARGS,
        *("-i", "seed=3"),
    ),
    "unknown_input": ("-i", "prompt=a cat", "-i", "colour=red"),
    "out_of_range": ("-i", "prompt=a cat", "-i", "num_outputs=9", *FAST_ARGS),
    # in.png is written first (320x200); a relative @path is read from the cwd.
    "img2img": ("-i", "prompt=a cat", "-i", "image=@in.png", "-i", "seed=5", *FAST_ARGS),
}


@dataclass
class PredictRun:
    cwd: Path
    result: subprocess.CompletedProcess[str]

    def output(self, name: str = "output.0.png") -> bytes:
        return (self.cwd / name).read_bytes()


def run_predict(cwd: Path, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(REPO / "script" / "predict"), *args],
        cwd=cwd,
        env=script_env(cwd / "lora-cache", **(extra_env or {})),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def predict_runs(demo_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, PredictRun]:
    """Every script/predict run of this module, two at a time: each is mostly imports."""
    folders = {name: tmp_path_factory.mktemp(f"predict-{name}") for name in PREDICT_RUNS}
    Image.new("RGB", (320, 200), (200, 80, 40)).save(folders["img2img"] / "in.png")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_predict, folders[name], *args) for name, args in PREDICT_RUNS.items()}
        return {name: PredictRun(folders[name], future.result()) for name, future in futures.items()}


def test_predict_writes_outputs_in_the_cwd(predict_runs: dict[str, PredictRun]) -> None:
    run = predict_runs["txt2img"]
    assert run.result.returncode == 0, run.result.stderr[-4000:]
    assert "Offline demo model" in run.result.stderr
    assert size_of(run.output()) == (256, 256)
    assert "Denoising step 2/2" in run.result.stdout


def test_predict_rejects_an_unknown_input(predict_runs: dict[str, PredictRun]) -> None:
    run = predict_runs["unknown_input"]
    assert run.result.returncode != 0
    assert "colour" in run.result.stderr
    assert "prompt, image, mask, aspect_ratio" in run.result.stderr, run.result.stderr[-2000:]
    assert not list(run.cwd.glob("output.*"))


def test_predict_rejects_out_of_range_values(predict_runs: dict[str, PredictRun]) -> None:
    run = predict_runs["out_of_range"]
    assert run.result.returncode == 1
    assert "num_outputs" in run.result.stderr.splitlines()[-1], run.result.stderr[-2000:]
    assert not list(run.cwd.glob("output.*"))


def test_predict_image_to_image(predict_runs: dict[str, PredictRun]) -> None:
    run = predict_runs["img2img"]
    assert run.result.returncode == 0, run.result.stderr[-4000:]
    assert "Mode img2img" in run.result.stdout
    # The output follows the image, each side a multiple of 16 (engine/sizes.py).
    assert size_of(run.output()) == (320, 208)
