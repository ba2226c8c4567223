"""The offline demo models load through the real loaders and behave as promised."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from PIL import Image

from tooling.demo_model import (
    MARKER_NAME,
    DemoModelPaths,
    build_demo_models,
    demo_model_env,
    ensure_demo_models,
)

if TYPE_CHECKING:
    from diffusers import FluxPipeline

SHARED_COMPONENTS = (
    "vae",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
)


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoModelPaths:
    return ensure_demo_models(tmp_path_factory.mktemp("demo") / "models")


@pytest.fixture(scope="session")
def unsafe_demo(tmp_path_factory: pytest.TempPathFactory) -> DemoModelPaths:
    root = tmp_path_factory.mktemp("unsafe") / "models"
    return build_demo_models(root, flag_everything_unsafe=True)


@pytest.fixture(scope="session")
def dev_pipe(demo: DemoModelPaths) -> FluxPipeline:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(demo.dev, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe: FluxPipeline, prompt: str, seed: int) -> np.ndarray:
    result = pipe(
        prompt,
        height=64,
        width=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(seed),
    )
    image = result.images[0]
    assert isinstance(image, Image.Image)
    assert image.size == (64, 64)
    return np.asarray(image, dtype=np.float32)


def _random_images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)) for _ in range(count)]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_dev_pipeline_generates_images_that_depend_on_prompt_and_seed(
    dev_pipe: FluxPipeline,
) -> None:
    base = _generate(dev_pipe, "a cat on a mat", seed=0)
    other_prompt = _generate(dev_pipe, "a dog in the fog", seed=0)
    other_seed = _generate(dev_pipe, "a cat on a mat", seed=1)
    again = _generate(dev_pipe, "a cat on a mat", seed=0)

    np.testing.assert_array_equal(base, again)
    assert base.std() > 10, "image should not be flat"
    assert np.abs(base - other_prompt).mean() > 5
    assert np.abs(base - other_seed).mean() > 5


def test_dev_and_schnell_configs(demo: DemoModelPaths) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    dev = FluxTransformer2DModel.from_pretrained(demo.dev, subfolder="transformer")
    schnell = FluxTransformer2DModel.from_pretrained(demo.schnell, subfolder="transformer")
    assert dev.config.guidance_embeds is True
    assert schnell.config.guidance_embeds is False

    dev_sched = FlowMatchEulerDiscreteScheduler.from_pretrained(demo.dev, subfolder="scheduler")
    schnell_sched = FlowMatchEulerDiscreteScheduler.from_pretrained(demo.schnell, subfolder="scheduler")
    assert dev_sched.config.use_dynamic_shifting is True
    assert dev_sched.config.shift == 3.0
    assert schnell_sched.config.use_dynamic_shifting is False
    assert schnell_sched.config.shift == 1.0


def test_shared_components_are_byte_identical(demo: DemoModelPaths) -> None:
    for component in SHARED_COMPONENTS:
        dev_files = _files(demo.dev / component)
        assert dev_files, component
        assert dev_files == _files(demo.schnell / component), component
    assert any(name.endswith(".safetensors") for name in _files(demo.dev / "vae"))
    dev_transformer = _files(demo.dev / "transformer")
    schnell_transformer = _files(demo.schnell / "transformer")
    assert dev_transformer != schnell_transformer


def test_env_points_at_the_folders(demo: DemoModelPaths) -> None:
    env = demo_model_env(demo)
    assert env == {
        "FLUX_DEV_WEIGHTS": str(demo.dev),
        "FLUX_SCHNELL_WEIGHTS": str(demo.schnell),
        "FLUX_SAFETY_CHECKER_WEIGHTS": str(demo.safety_checker),
        "FLUX_NSFW_CLASSIFIER_WEIGHTS": str(demo.nsfw_classifier),
    }
    assert all(Path(value).is_dir() for value in env.values())


def test_ensure_reuses_a_complete_build(demo: DemoModelPaths) -> None:
    root = demo.dev.parent
    watched = [root / MARKER_NAME, *sorted(demo.dev.rglob("*.safetensors"))]
    before = [os.stat(path).st_mtime_ns for path in watched]

    assert ensure_demo_models(root) == demo

    assert [os.stat(path).st_mtime_ns for path in watched] == before


def test_ensure_rebuilds_when_marker_is_missing(demo: DemoModelPaths, tmp_path: Path) -> None:
    root = tmp_path / "models"
    shutil.copytree(demo.dev.parent, root)
    (root / MARKER_NAME).unlink()
    sentinel = root / "left-over-from-a-killed-build"
    sentinel.write_text("x")

    paths = ensure_demo_models(root)

    assert (root / MARKER_NAME).is_file()
    assert not sentinel.exists(), "the untrusted folder should have been replaced"
    # Deterministic seeds: the rebuild writes exactly the same files.
    assert _files(root) == _files(demo.dev.parent)
    assert paths.dev == root / "dev"
    assert not list(tmp_path.glob(".models.building-*")), "staging folder left behind"


def _safety_verdicts(folder: Path) -> list[bool]:
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
    )
    from transformers import CLIPImageProcessor

    checker = StableDiffusionSafetyChecker.from_pretrained(folder, torch_dtype=torch.float32)
    processor = CLIPImageProcessor.from_pretrained(folder)
    images = _random_images(3)
    clip_input = processor(images, return_tensors="pt").pixel_values
    _, has_nsfw = checker(images=[np.asarray(image) for image in images], clip_input=clip_input)
    return [bool(flag) for flag in has_nsfw]


def _vit_labels(folder: Path) -> list[str]:
    from transformers import AutoImageProcessor, ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(folder)
    processor = AutoImageProcessor.from_pretrained(folder)
    labels = []
    for image in _random_images(3):
        with torch.no_grad():
            logits = model(**processor(images=image, return_tensors="pt")).logits
        labels.append(model.config.id2label[int(logits.argmax(-1).item())])
    return labels


def test_default_build_flags_nothing(demo: DemoModelPaths) -> None:
    assert _safety_verdicts(demo.safety_checker) == [False, False, False]
    assert _vit_labels(demo.nsfw_classifier) == ["normal", "normal", "normal"]


def test_unsafe_build_flags_everything(unsafe_demo: DemoModelPaths) -> None:
    assert _safety_verdicts(unsafe_demo.safety_checker) == [True, True, True]
    assert _vit_labels(unsafe_demo.nsfw_classifier) == ["nsfw", "nsfw", "nsfw"]
