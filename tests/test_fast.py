"""The go_fast path on CPU: dispatch, the quantized + compiled copy, LoRAs in its slot,
exact restoration and recompiles. torchao's dynamic fp8 needs a GPU, so these run the same
code with its weight-only int8 config and dynamo's eager backend (guards, and so
recompiles, do not depend on the backend)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from torch._dynamo.utils import counters

from engine.fast import FastSettings, fast_path_unavailable
from engine.inputs import InputError
from lora_loading.slots import SLOT, slot_rank
from tests.conftest import data_uri, fast, image_of, make_predictor, predictor_env
from tests.lora_factory import make_peft_lora

FAST_ENV = {"FLUX_FAST_QUANTIZATION": "int8-weight-only", "FLUX_COMPILE_BACKEND": "eager", "FLUX_FAST_LORA_RANK": "8"}


def settings(**changes: Any) -> FastSettings:
    base = {"quantization": "auto", "compile": True, "compile_backend": "inductor", "lora_rank": 64}
    return FastSettings(**{**base, **changes, "compile_cache_dir": None})


def png(predictor: Any, **inputs: Any) -> bytes:
    return fast(predictor, prompt="a cat", output_format="png", **inputs)[0]


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


# Dispatch


def test_fp8_needs_a_cuda_gpu_of_capability_8_9(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "needs a CUDA GPU" in fast_path_unavailable(settings(), torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 0))
    assert "compute capability 8.9 or higher and this GPU has 8.0" in fast_path_unavailable(
        settings(), torch.device("cuda")
    )
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    assert fast_path_unavailable(settings(), torch.device("cuda")) is None


def test_switches_off_and_cpu_configs() -> None:
    assert fast_path_unavailable(settings(quantization="off"), torch.device("cuda")) == "FLUX_FAST_QUANTIZATION is off"
    assert fast_path_unavailable(settings(quantization="int8-weight-only"), torch.device("cpu")) is None
    assert "is not one of auto, off" in fast_path_unavailable(settings(quantization="fp4"), torch.device("cpu"))


def test_without_a_fast_path_go_fast_runs_the_standard_path_and_says_why_once(
    predictor: Any, caplog: pytest.LogCaptureFixture
) -> None:
    predictor.engine._explained_go_fast = False
    with caplog.at_level(logging.INFO):
        first = png(predictor, go_fast=True)
        png(predictor, go_fast=True)
    assert first == png(predictor, go_fast=False)
    assert caplog.text.count("go_fast: fp8 needs a CUDA GPU and this server runs on cpu; running the standard") == 1


# The fast copy


@pytest.fixture(scope="module")
def fast_predictor(demo_models: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return make_predictor(predictor_env(demo_models, tmp_path_factory.mktemp("lora-cache"), **FAST_ENV))


@pytest.fixture(scope="module")
def loras(demo_models: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    transformer = FluxTransformer2DModel.from_pretrained(demo_models.dev, subfolder="transformer")
    folder = tmp_path_factory.mktemp("fast-loras")
    return {
        "style": make_peft_lora(transformer, folder / "style.safetensors", rank=4, seed=1),
        "other": make_peft_lora(transformer, folder / "other.safetensors", rank=4, seed=2),
        "wide": make_peft_lora(transformer, folder / "wide.safetensors", rank=12, seed=3),
    }


def test_fast_copy_is_quantized_and_leaves_the_bf16_model_alone(fast_predictor: Any, predictor: Any) -> None:
    model = fast_predictor.engine.models["dev"]
    standard, quick = model.text_to_image.transformer, model.fast_pipelines["txt2img"].transformer
    assert standard is not quick
    assert type(quick.transformer_blocks[0].attn.to_q.base_layer.weight) is not torch.nn.Parameter
    assert type(standard.transformer_blocks[0].attn.to_q.weight) is torch.nn.Parameter
    # The standard path gives exactly what a server without a fast path gives.
    assert png(fast_predictor) == png(predictor)


def test_go_fast_output_is_close_to_standard_and_deterministic(fast_predictor: Any) -> None:
    def pixels(data: bytes) -> np.ndarray:
        return np.asarray(image_of(data), dtype=np.float32)

    quick = png(fast_predictor, go_fast=True)
    assert quick == png(fast_predictor, go_fast=True)
    standard = png(fast_predictor, go_fast=False)
    assert quick != standard
    # Quantization moves the image far less than another seed does.
    other_seed = png(fast_predictor, go_fast=False, seed=8)
    quantization_error = np.abs(pixels(quick) - pixels(standard)).mean()
    assert quantization_error < 0.25 * np.abs(pixels(other_seed) - pixels(standard)).mean()


def test_go_fast_runs_every_mode_and_size(fast_predictor: Any, tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (320, 200), (40, 90, 200)).save(tmp_path / "in.png")
    Image.new("L", (320, 200), 255).save(tmp_path / "mask.png")
    sizes = {
        "txt2img": png(fast_predictor, go_fast=True, width=320, height=272),
        "img2img": png(fast_predictor, go_fast=True, image=tmp_path / "in.png"),
        "inpainting": png(fast_predictor, go_fast=True, image=tmp_path / "in.png", mask=tmp_path / "mask.png"),
        "schnell": png(fast_predictor, go_fast=True, model="schnell", aspect_ratio="16:9", megapixels="0.25"),
    }
    assert {name: image_of(data).size for name, data in sizes.items()} == {
        "txt2img": (320, 272),
        "img2img": (320, 208),
        "inpainting": (320, 208),
        "schnell": (672, 384),
    }


def test_lora_in_the_slot_is_base_plus_scale_times_delta(fast_predictor: Any, loras: dict) -> None:
    png(fast_predictor, go_fast=True, replicate_weights=data_uri(loras["style"]), lora_scale=-0.75)
    transformer = fast_predictor.engine.models["dev"].fast_pipelines["txt2img"].transformer
    layer = transformer.transformer_blocks[0].attn.to_k
    from safetensors.torch import load_file

    lora = load_file(str(loras["style"]))
    down = lora["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"]
    up = lora["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"]
    x = torch.randn(5, down.shape[1])
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x) + (-0.75) * (x @ down.T @ up.T), rtol=1e-5, atol=1e-5)
    # A layer the LoRA does not touch carries zeros in the slot.
    untouched = transformer.transformer_blocks[0].ff.net[2]
    assert torch.count_nonzero(untouched.lora_B[SLOT].weight) == 0


def test_fast_lora_semantics_and_exact_restoration(
    fast_predictor: Any, loras: dict, demo_models: Any, tmp_path: Path
) -> None:
    base = png(fast_predictor, go_fast=True)
    style = data_uri(loras["style"])
    styled = png(fast_predictor, go_fast=True, replicate_weights=style)
    assert styled != base
    assert png(fast_predictor, go_fast=True, replicate_weights=style, lora_scale=0) == base
    both = png(fast_predictor, go_fast=True, replicate_weights=style, extra_lora=data_uri(loras["other"]))
    assert both not in (base, styled)
    assert png(fast_predictor, go_fast=True, replicate_weights=style) == styled
    assert png(fast_predictor, go_fast=True) == base
    fresh = make_predictor(predictor_env(demo_models, tmp_path / "cache", **FAST_ENV))
    assert png(fresh, go_fast=True) == base


def test_a_failed_fast_lora_changes_nothing(fast_predictor: Any, loras: dict, tmp_path: Path) -> None:
    styled = png(fast_predictor, go_fast=True, replicate_weights=data_uri(loras["style"]))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 16)
    with pytest.raises(InputError):
        png(fast_predictor, go_fast=True, replicate_weights=data_uri(loras["style"]), extra_lora=data_uri(broken))
    assert png(fast_predictor, go_fast=True, replicate_weights=data_uri(loras["style"])) == styled


def test_no_recompiles_after_warm_up(fast_predictor: Any, loras: dict, tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (400, 240), (10, 20, 30)).save(tmp_path / "in.png")
    style, other = data_uri(loras["style"]), data_uri(loras["other"])
    png(fast_predictor, go_fast=True, replicate_weights=style)  # fills the LoRA cache; not a compile
    before = graphs()
    png(fast_predictor, go_fast=True, replicate_weights=other, width=512, height=384)
    png(fast_predictor, go_fast=True, replicate_weights=other, lora_scale=0.3, num_outputs=3)
    png(fast_predictor, go_fast=True, replicate_weights=style, extra_lora=other, image=tmp_path / "in.png")
    png(fast_predictor, go_fast=True, model="schnell", aspect_ratio="21:9", megapixels="0.25")
    png(fast_predictor, go_fast=True)
    assert graphs() == before


def test_a_lora_wider_than_the_slot_grows_it(
    fast_predictor: Any, loras: dict, caplog: pytest.LogCaptureFixture
) -> None:
    transformer = fast_predictor.engine.models["dev"].fast_pipelines["txt2img"].transformer
    assert slot_rank(transformer) == 8
    with caplog.at_level(logging.WARNING):
        wide = png(fast_predictor, go_fast=True, replicate_weights=data_uri(loras["wide"]))
    assert "go_fast: LoRA rank 12 exceeds the slot's 8; growing it (one recompile)." in caplog.text
    assert slot_rank(transformer) == 12
    assert wide != png(fast_predictor, go_fast=True)


def test_the_lora_scale_needs_no_go_fast_multiplier(fast_predictor: Any, loras: dict) -> None:
    """Published predictors multiply lora_scale by 1.5 under go_fast. Measured here: the
    slot applies the LoRA in full precision, so the same scale gives the same effect as the
    standard path, and a 1.5x multiplier overshoots by about half."""

    def pixels(**inputs: Any) -> np.ndarray:
        return np.asarray(image_of(png(fast_predictor, **inputs)), dtype=np.float32)

    style = data_uri(loras["style"])
    standard_effect = pixels(replicate_weights=style, lora_scale=0.5) - pixels()
    base = pixels(go_fast=True)

    def mismatch(multiplier: float) -> float:
        fast_effect = pixels(go_fast=True, replicate_weights=style, lora_scale=0.5 * multiplier) - base
        return float(np.abs(fast_effect - standard_effect).mean() / np.abs(standard_effect).mean())

    same_scale, multiplied = mismatch(1.0), mismatch(1.5)
    assert same_scale < 0.1
    assert multiplied > 3 * same_scale
