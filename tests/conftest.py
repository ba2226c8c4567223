"""Shared fixtures: tiny FLUX dev/schnell and safety models built offline, loaded through
the real loaders, and a helper that calls predict() the way Cog does (every default filled)."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.report_guard import (  # noqa: F401 (hooks, registered by their names here)
    pytest_assertrepr_compare,
    pytest_configure,
    pytest_runtest_makereport,
)
from tooling.cli import default_inputs
from tooling.demo_model import DemoModelPaths, build_demo_models, demo_model_env

# Small and quick on 2 CPU cores; tests that are about sizes override these.
FAST = {"aspect_ratio": "custom", "width": 256, "height": 256, "num_inference_steps": 2, "seed": 7}


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> DemoModelPaths:
    return build_demo_models(tmp_path_factory.mktemp("demo-models"))


@pytest.fixture(scope="session")
def unsafe_demo_models(tmp_path_factory: pytest.TempPathFactory) -> DemoModelPaths:
    return build_demo_models(tmp_path_factory.mktemp("unsafe-demo-models"), flag_everything_unsafe=True)


def predictor_env(models: DemoModelPaths, lora_cache: Path, **extra: str) -> dict[str, str]:
    """A test predictor's settings: the demo model on CPU, and its caches (LoRAs; the compile cache, which
    would otherwise go to flux-weights/) in the test's own folders."""
    return {
        **demo_model_env(models),
        "FLUX_DEVICE": "cpu",
        "FLUX_LORA_CACHE_DIR": str(lora_cache),
        "FLUX_COMPILE_CACHE_DIR": str(lora_cache.with_name(f"{lora_cache.name}-compile-cache")),
        # Compiling at toy sizes: production warms up at 1024², batch 1 and 4 (engine/fast.py).
        "FLUX_WARM_UP_SIZE": "256",
        "FLUX_WARM_UP_BATCH": "2",
        **extra,
    }


def make_predictor(env: dict[str, str], class_name: str = "Predictor") -> Any:
    import predict

    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        predictor = getattr(predict, class_name)()
        predictor.setup()
    return predictor


@pytest.fixture(scope="session")
def predictor(demo_models: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return make_predictor(predictor_env(demo_models, tmp_path_factory.mktemp("lora-cache")))


def run(predictor: Any, **inputs: Any) -> list[bytes]:
    """predict() with Cog's defaults for everything not given; the files' bytes, read
    before the next prediction replaces them."""
    outputs = predictor.predict(**{**default_inputs(predictor.predict), **inputs})
    return [Path(path).read_bytes() for path in outputs]


def fast(predictor: Any, **inputs: Any) -> list[bytes]:
    return run(predictor, **{**FAST, **inputs})


def data_uri(data: bytes | Path) -> str:
    """A base64 data: URI of the bytes, or of the file at a path."""
    raw = Path(data).read_bytes() if isinstance(data, Path) else data
    return "data:application/octet-stream;base64," + base64.b64encode(raw).decode()


def lora_effect_mismatch(
    pixels: Callable[..., np.ndarray], lora: str, multipliers: Iterable[float], scale: float = 0.5
) -> dict[float, float]:
    """For each multiplier of go_fast's lora_scale: how far go_fast's LoRA effect (image with the LoRA - image
    without) is from the standard path's at `scale`, as mean |difference| / mean |standard effect|."""
    standard_effect = pixels(replicate_weights=lora, lora_scale=scale) - pixels()
    base = pixels(go_fast=True)
    mismatch = {}
    for multiplier in multipliers:
        fast_effect = pixels(go_fast=True, replicate_weights=lora, lora_scale=scale * multiplier) - base
        mismatch[multiplier] = float(np.abs(fast_effect - standard_effect).mean() / np.abs(standard_effect).mean())
    return mismatch


def image_of(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


@pytest.fixture(autouse=True)
def no_retry_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries still happen; the suite just does not sleep between them."""
    import downloads

    monkeypatch.setattr(downloads, "RETRY_BACKOFF_S", 0)
