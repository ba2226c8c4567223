"""go_fast on a CUDA GPU in production's configuration: torchao fp8 (dynamic activations,
per-row weight scales) compiled by inductor. These run only where a GPU of compute
capability 8.9 or higher is present (`bash bench/run_gpu.sh --tests` on the GPU machine;
no cog needed), and are skipped elsewhere: tests/test_fast.py runs the same configuration
on CPU. The model is the tiny demo model, whose Linear sizes are multiples of 16 as fp8
matmuls need."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import FAST, data_uri, image_of, lora_effect_mismatch, predictor_env
from tests.lora_factory import make_peft_lora

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a CUDA GPU of compute capability 8.9 or higher",
)


@pytest.fixture(scope="module")
def engine(demo_models: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from engine.config import Settings
    from engine.generate import Engine

    env = predictor_env(demo_models, tmp_path_factory.mktemp("lora-cache"), FLUX_DEVICE="cuda", FLUX_FAST_LORA_RANK="8")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        return Engine(Settings.from_env())


def png(engine: Any, **inputs: Any) -> list[bytes]:
    from engine.inputs import input_contract, parse_request
    from predict import Inputs, Predictor

    request = parse_request(
        input_contract(Predictor.predict, Inputs), **{"prompt": "a cat", **FAST, "output_format": "png", **inputs}
    )
    return [path.read_bytes() for path in engine.predict(request)]


@pytest.fixture(scope="module")
def loras(engine: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    transformer = engine.models["dev"].text_to_image.transformer
    folder = tmp_path_factory.mktemp("gpu-loras")
    return {
        name: data_uri(make_peft_lora(transformer, folder / f"{name}.safetensors", rank=4, seed=seed))
        for name, seed in (("style", 1), ("other", 2))
    }


def test_both_models_get_an_fp8_copy(engine: Any) -> None:
    from torchao.quantization import Float8Tensor

    assert engine.fast_unavailable is None
    for model in engine.models.values():
        layer = model.fast_pipelines["txt2img"].transformer.transformer_blocks[0].attn.to_q.base_layer
        assert type(layer.weight) is Float8Tensor
        assert model.text_to_image.transformer.dtype == torch.bfloat16


def test_every_mode_size_and_lora_runs_without_a_recompile(engine: Any, loras: dict, tmp_path: Path) -> None:
    Image.new("RGB", (320, 200), (40, 90, 200)).save(tmp_path / "in.png")
    Image.new("L", (320, 200), 255).save(tmp_path / "mask.png")
    png(engine, go_fast=True, replicate_weights=loras["style"])  # fills the LoRA cache; not a compile
    png(engine, go_fast=True, model="schnell", replicate_weights=loras["style"])
    with torch._dynamo.config.patch(error_on_recompile=True):
        outputs = {
            "16:9": png(engine, go_fast=True, aspect_ratio="16:9", megapixels="0.25"),
            "custom": png(engine, go_fast=True, width=320, height=272, replicate_weights=loras["other"]),
            "batch": png(engine, go_fast=True, num_outputs=4, replicate_weights=loras["style"], lora_scale=0.3),
            "img2img": png(engine, go_fast=True, image=tmp_path / "in.png", extra_lora=loras["other"]),
            "inpainting": png(engine, go_fast=True, image=tmp_path / "in.png", mask=tmp_path / "mask.png"),
            "schnell": png(engine, go_fast=True, model="schnell", aspect_ratio="21:9", megapixels="0.25"),
        }
    assert {name: [image_of(data).size for data in images] for name, images in outputs.items()} == {
        "16:9": [(672, 384)],
        "custom": [(320, 272)],
        "batch": [(256, 256)] * 4,
        "img2img": [(320, 208)],
        "inpainting": [(320, 208)],
        "schnell": [(768, 320)],
    }


def test_fp8_gives_the_same_bytes_for_the_same_seed(engine: Any, loras: dict) -> None:
    assert png(engine, go_fast=True, num_outputs=2) == png(engine, go_fast=True, num_outputs=2)
    styled = png(engine, go_fast=True, replicate_weights=loras["style"])
    png(engine, go_fast=True, replicate_weights=loras["other"], lora_scale=-1)
    assert png(engine, go_fast=True, replicate_weights=loras["style"]) == styled


def test_fp8_is_close_to_bf16_and_takes_the_lora_at_the_same_scale(engine: Any, loras: dict) -> None:
    def pixels(**inputs: Any) -> np.ndarray:
        return np.asarray(image_of(png(engine, **inputs)[0]), dtype=np.float32)

    standard, quick = pixels(), pixels(go_fast=True)
    assert np.abs(quick - standard).mean() < 0.25 * np.abs(pixels(seed=8) - standard).mean()
    off_by = lora_effect_mismatch(pixels, loras["style"], (0.9, 1.0, 1.1, 1.5))
    print("fp8 LoRA effect against bf16, by multiplier:", {m: f"{v:.1%}" for m, v in off_by.items()})
    assert min(off_by, key=off_by.__getitem__) == 1.0


def test_fp8_merges_a_lokr_without_a_recompile_and_takes_it_back(engine: Any, tmp_path: Path) -> None:
    """What the slot does not hold is merged into the Float8Tensor weights in place, under inductor."""
    import safetensors.torch

    layer = engine.models["dev"].text_to_image.transformer.transformer_blocks[0].attn.to_out[0]
    generator = torch.Generator().manual_seed(5)
    lokr = {
        "lora_unet_double_blocks_0_img_attn_proj.lokr_w1": torch.randn(2, 2, generator=generator),
        "lora_unet_double_blocks_0_img_attn_proj.lokr_w2": torch.randn(
            layer.out_features // 2, layer.in_features // 2, generator=generator
        ),
    }
    safetensors.torch.save_file(lokr, str(tmp_path / "lokr.safetensors"))
    source = data_uri(tmp_path / "lokr.safetensors")
    base = png(engine, go_fast=True)
    png(engine, go_fast=True, replicate_weights=source)  # fills the LoRA cache
    with torch._dynamo.config.patch(error_on_recompile=True):
        merged = png(engine, go_fast=True, replicate_weights=source)
        assert merged != base
        assert png(engine, go_fast=True) == base


def test_the_attention_kernel_is_set_on_every_transformer(engine: Any) -> None:
    for model in engine.models.values():
        transformers = [model.text_to_image.transformer]
        transformers += [model.fast_pipelines["txt2img"].transformer] if model.fast_pipelines else []
        for transformer in transformers:
            chosen = transformer.transformer_blocks[0].attn.processor._attention_backend
            assert (chosen.value if chosen is not None else None) == engine.attention
