"""Tests for tooling.openapi: the schema the coglet server needs.

The fixture predictors are written into tmp_path.  To check the real
predictor later, point the helpers at it, e.g.::

    schema = build_schema(REPO / "predict.py", "Predictor")
    with cog_server(REPO, "predict.py:Predictor") as base_url: ...

(``cog_server`` writes ``.cog/openapi_schema.json`` inside the project dir.)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_scripts import free_port, http
from tooling.openapi import (
    openapi_schema,
    schema_json,
    title_case,
    write_openapi_schema,
)

REPO = Path(__file__).resolve().parents[1]

# Inputs shaped like the FLUX predictor's; returns files, so the server's
# data-URI output path is exercised too.
FLUX_LIKE = """
import tempfile
from typing import Optional

from cog import BasePredictor, Input, Path


class Predictor(BasePredictor):
    def setup(self) -> None:
        self.ready = True

    def predict(
        self,
        prompt: str = Input(description="Prompt for generated image"),
        image: Optional[Path] = Input(description="Input image", default=None),
        aspect_ratio: str = Input(
            description="Aspect ratio", default="1:1", choices=["1:1", "16:9", "custom"]
        ),
        width: Optional[int] = Input(description="Width", default=None, ge=256, le=1440),
        guidance_scale: float = Input(description="Guidance", default=3.0, ge=0, le=10),
        seed: Optional[int] = Input(description="Random seed", default=None),
        go_fast: bool = Input(description="Go fast", default=False),
    ) -> list[Path]:
        out = Path(tempfile.mkdtemp()) / "out.txt"
        out.write_text(f"{prompt}|{aspect_ratio}|{width}|{guidance_scale}|{seed}")
        return [out]
"""

# Corner cases of the Go generator's rules.
EDGE = """
from typing import Optional

from cog import BaseModel, BaseRunner, Input, Path, Secret, streaming


class Output(BaseModel):
    image_2x: Path
    score: Optional[float]


class Predictor(BaseRunner):
    @streaming
    def run(
        self,
        count: int = Input(default=None),
        note: Optional[str] = Input(description="no explicit default"),
        raw_none: Optional[str] = None,
        raw_int: int = 7,
        api_key: Secret = Input(default=None),
        size: int = Input(default=512, choices=[512, 1024]),
        name: str = Input(
            default="ab", min_length=1, max_length=8, regex="^[a-z]+$", deprecated=True
        ),
        lora: Optional[Path] = Input(default=None, accept=".safetensors"),
        files: list[Path] = Input(description="some files"),
        strength: float = Input(default=1, ge=-1.5, le=2),
    ) -> Output:
        raise NotImplementedError
"""


def write_predictor(directory: Path, source: str, filename: str = "predict.py") -> Path:
    path = directory / filename
    path.write_text(textwrap.dedent(source))
    return path


def build_schema(path: Path, class_name: str = "Predictor") -> dict[str, Any]:
    return openapi_schema(f"{path}:{class_name}")


@pytest.fixture(scope="module")
def flux_like(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return build_schema(write_predictor(tmp_path_factory.mktemp("flux"), FLUX_LIKE))


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return build_schema(write_predictor(tmp_path_factory.mktemp("edge"), EDGE))


def props(schema: dict[str, Any]) -> dict[str, Any]:
    return schema["components"]["schemas"]["Input"]["properties"]


# ---------------------------------------------------------------------------
# Schema content
# ---------------------------------------------------------------------------


def test_document_skeleton(flux_like: dict[str, Any]) -> None:
    assert flux_like["openapi"] == "3.0.2"
    assert flux_like["info"]["title"] == "Cog"
    assert list(flux_like["paths"]) == [
        "/",
        "/health-check",
        "/predictions",
        "/predictions/{prediction_id}/cancel",
    ]
    post = flux_like["paths"]["/predictions"]["post"]
    assert post["operationId"] == "predict_predictions_post"
    assert "x-cog-streaming" not in post
    assert post["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/PredictionRequest"
    }
    assert set(post["responses"]) == {"200", "422"}
    schemas = flux_like["components"]["schemas"]
    assert list(schemas) == [
        "Input",
        "Output",
        "aspect_ratio",
        "PredictionRequest",
        "PredictionResponse",
        "Status",
        "HTTPValidationError",
        "ValidationError",
    ]
    assert schemas["PredictionRequest"]["properties"]["input"] == {"$ref": "#/components/schemas/Input"}
    assert schemas["PredictionResponse"]["properties"]["output"] == {"$ref": "#/components/schemas/Output"}
    assert schemas["Status"]["enum"] == [
        "starting",
        "processing",
        "succeeded",
        "canceled",
        "failed",
    ]


def test_input_required_and_order(flux_like: dict[str, Any]) -> None:
    inp = flux_like["components"]["schemas"]["Input"]
    assert inp["title"] == "Input"
    assert inp["type"] == "object"
    assert inp["required"] == ["prompt"]
    p = props(flux_like)
    assert list(p) == [
        "prompt",
        "image",
        "aspect_ratio",
        "width",
        "guidance_scale",
        "seed",
        "go_fast",
    ]
    assert [v["x-order"] for v in p.values()] == list(range(7))
    assert p["prompt"] == {
        "description": "Prompt for generated image",
        "title": "Prompt",
        "type": "string",
        "x-order": 0,
    }
    assert p["go_fast"]["title"] == "Go Fast"
    assert p["go_fast"]["type"] == "boolean"
    assert p["go_fast"]["default"] is False


def test_optional_inputs_are_nullable_with_null_default(
    flux_like: dict[str, Any],
) -> None:
    p = props(flux_like)
    assert p["image"] == {
        "default": None,
        "description": "Input image",
        "format": "uri",
        "nullable": True,
        "title": "Image",
        "type": "string",
        "x-order": 1,
    }
    assert p["seed"]["type"] == "integer"
    assert p["seed"]["nullable"] is True
    assert "default" in p["seed"] and p["seed"]["default"] is None


def test_choices_become_enum_refs(flux_like: dict[str, Any]) -> None:
    p = props(flux_like)["aspect_ratio"]
    assert p == {
        "allOf": [{"$ref": "#/components/schemas/aspect_ratio"}],
        "default": "1:1",
        "description": "Aspect ratio",
        "x-order": 2,
    }
    assert flux_like["components"]["schemas"]["aspect_ratio"] == {
        "description": "An enumeration.",
        "enum": ["1:1", "16:9", "custom"],
        "title": "aspect_ratio",
        "type": "string",
    }


def test_numeric_bounds(flux_like: dict[str, Any]) -> None:
    p = props(flux_like)
    assert (p["width"]["minimum"], p["width"]["maximum"]) == (256, 1440)
    assert p["width"]["type"] == "integer"
    assert (p["guidance_scale"]["minimum"], p["guidance_scale"]["maximum"]) == (0, 10)
    assert p["guidance_scale"]["type"] == "number"
    assert p["guidance_scale"]["default"] == 3


def test_output_list_of_paths(flux_like: dict[str, Any]) -> None:
    assert flux_like["components"]["schemas"]["Output"] == {
        "items": {"format": "uri", "type": "string"},
        "title": "Output",
        "type": "array",
    }


def test_go_rules_for_defaults(edge: dict[str, Any]) -> None:
    inp = edge["components"]["schemas"]["Input"]
    # non-Optional with default=None is required and has no default;
    # a list without a default is required too.
    assert inp["required"] == ["count", "files"]
    p = inp["properties"]
    assert "default" not in p["count"] and "nullable" not in p["count"]
    # Optional without an explicit default: optional, nullable, no default key.
    assert "default" not in p["note"] and p["note"]["nullable"] is True
    # bare literals count as defaults
    assert p["raw_none"]["default"] is None and p["raw_none"]["nullable"] is True
    assert p["raw_int"]["default"] == 7
    # Secret = Input(default=None) is Go's special case: optional and nullable.
    assert p["api_key"]["nullable"] is True and p["api_key"]["default"] is None
    assert p["api_key"]["format"] == "password" and p["api_key"]["x-cog-secret"] is True
    assert p["files"]["type"] == "array"
    assert p["files"]["items"] == {"format": "uri", "type": "string"}


def test_other_constraints(edge: dict[str, Any]) -> None:
    schemas = edge["components"]["schemas"]
    p = schemas["Input"]["properties"]
    assert schemas["size"]["type"] == "integer"
    assert schemas["size"]["enum"] == [512, 1024]
    assert p["size"]["default"] == 512
    assert p["name"]["minLength"] == 1
    assert p["name"]["maxLength"] == 8
    assert p["name"]["pattern"] == "^[a-z]+$"
    assert p["name"]["deprecated"] is True
    assert p["lora"]["x-cog-accept"] == ".safetensors"
    assert (p["strength"]["minimum"], p["strength"]["maximum"]) == (-1.5, 2)
    assert p["strength"]["default"] == 1


def test_streaming_and_object_output(edge: dict[str, Any]) -> None:
    assert edge["paths"]["/predictions"]["post"]["x-cog-streaming"] is True
    out = edge["components"]["schemas"]["Output"]
    assert out["title"] == "Output"
    assert out["type"] == "object"
    assert out["required"] == ["image_2x"]
    assert out["properties"]["image_2x"] == {
        "format": "uri",
        "title": "Image 2x",
        "type": "string",
    }
    assert out["properties"]["score"]["nullable"] is True


def test_title_case_matches_go() -> None:
    assert title_case("hello_world") == "Hello World"
    assert title_case("lora_scale_2x") == "Lora Scale 2x"
    assert title_case("prediction_id") == "Prediction Id"


def test_written_file_is_compact_go_style_json(tmp_path: Path) -> None:
    src = write_predictor(tmp_path, FLUX_LIKE)
    out = write_openapi_schema(f"{src}:Predictor", tmp_path / ".cog" / "s.json")
    text = out.read_text()
    assert text == schema_json(json.loads(text))
    assert "\n" not in text and ": " not in text
    assert json.loads(text) == build_schema(src)
    assert schema_json({"a": "<&>"}) == '{"a":"\\u003c\\u0026\\u003e"}'


def test_relative_ref_resolves_against_root(tmp_path: Path) -> None:
    write_predictor(tmp_path, FLUX_LIKE)
    schema = openapi_schema("predict.py:Predictor", root=tmp_path)
    assert next(iter(props(schema))) == "prompt"
    written = write_openapi_schema("predict.py:Predictor", root=tmp_path)
    assert written == tmp_path / ".cog" / "openapi_schema.json"
    assert json.loads(written.read_text()) == schema


def test_cli_writes_default_path(tmp_path: Path) -> None:
    write_predictor(tmp_path, FLUX_LIKE)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run(
        [sys.executable, "-m", "tooling.openapi", "predict.py:Predictor"],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )
    written = json.loads((tmp_path / ".cog" / "openapi_schema.json").read_text())
    assert written["components"]["schemas"]["Input"]["required"] == ["prompt"]


# ---------------------------------------------------------------------------
# The real coglet server
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def cog_server(project_dir: Path, predictor_ref: str, ready_timeout: float = 60) -> Iterator[str]:
    """Write the schema into ``project_dir/.cog`` and run the coglet server there.

    Yields the base URL once /health-check says READY; the server's own
    (JSON-lines) log goes to ``project_dir/.cog/server.log``.
    """
    write_openapi_schema(predictor_ref, root=project_dir)
    port = free_port()
    env = dict(
        os.environ,
        PORT=str(port),
        COG_PREDICT_TYPE_STUB=predictor_ref,
        # the worker runs the `python` found on PATH
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    log_path = project_dir / ".cog" / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
            cwd=project_dir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: worker dies with it
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{log_path.read_text()[-4000:]}")
            with contextlib.suppress(OSError):
                status, body = http("GET", f"{base}/health-check", timeout=2)
                if status == 200 and body.get("status") == "READY":
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not ready:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.05)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def post_prediction(base: str, payload: dict[str, Any]) -> tuple[int, Any]:
    """POST /predictions, retrying the brief 409 the one-slot server can give."""
    for _ in range(50):
        status, body = http("POST", f"{base}/predictions", payload, timeout=30)
        if status != 409:
            return status, body
        time.sleep(0.1)
    return status, body


def test_coglet_server_validates_with_generated_schema(tmp_path: Path) -> None:
    write_predictor(tmp_path, FLUX_LIKE)
    with cog_server(tmp_path, "predict.py:Predictor") as base:
        status, doc = http("GET", f"{base}/openapi.json")
        assert status == 200
        # the server re-serialises (sorted keys) but serves our document
        assert doc == build_schema(tmp_path / "predict.py")

        status, body = post_prediction(base, {"input": {"guidance_scale": 11, "aspect_ratio": "2:1"}})
        assert status == 422
        locs = sorted(tuple(d["loc"]) for d in body["detail"])
        assert locs == [
            ("body", "input", "aspect_ratio"),
            ("body", "input", "guidance_scale"),
            ("body", "input", "prompt"),
        ]
        assert all({"loc", "msg", "type"} <= set(d) for d in body["detail"])

        status, body = post_prediction(base, {"input": {"prompt": "a cat", "aspect_ratio": "16:9", "width": 512}})
        assert status == 200, body
        assert body["status"] == "succeeded"
        assert len(body["output"]) == 1
        assert body["output"][0].startswith("data:")
