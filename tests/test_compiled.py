"""The standard path compiled (FLUX_COMPILE=1; on by default on CUDA), here on CPU with aot_eager.

The standard transformer carries a LoRA slot of a fixed rank (FLUX_LORA_SLOT_RANK) and its blocks
are compiled as the go_fast copy's are (engine/fast.py `with_slot_compiled`): a LoRA switch writes
tensors, so it never recompiles. What the slot cannot hold (in-place deltas, DoRA, LoKr, ranks over
it) runs eager through peft adapters beside it, and says so. Every exactness promise of the
standard path holds here too."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import FluxTransformer2DModel
from PIL import Image
from torch._dynamo.utils import counters

from engine.sizes import ASPECT_RATIO_SIZES
from errors import InputError
from lora_loading.slots import SLOT, slot_rank
from tests.compare import assert_images_close, assert_same_image
from tests.conftest import data_uri, fast, make_predictor, predictor_env
from tests.lora_factory import another_models_lora, make_peft_lora

SLOT_RANK = 96
COMPILED_ENV = {
    "FLUX_COMPILE": "1",
    "FLUX_COMPILE_BACKEND": "aot_eager",
    "FLUX_LORA_SLOT_RANK": str(SLOT_RANK),
    # The go_fast copy too, with room for every request below, so the sequence crosses both paths.
    "FLUX_FAST_QUANTIZATION": "int8-weight-only",
    "FLUX_FAST_LORA_RANK": "128",
}


@pytest.fixture(scope="module")
def compiled(demo_models: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return make_predictor(predictor_env(demo_models, tmp_path_factory.mktemp("lora-cache"), **COMPILED_ENV))


@pytest.fixture(scope="module")
def loras(demo_models: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    transformer = FluxTransformer2DModel.from_pretrained(demo_models.dev, subfolder="transformer")
    folder = tmp_path_factory.mktemp("compiled-loras")
    sources = {
        f"r{rank}": data_uri(make_peft_lora(transformer, folder / f"r{rank}.safetensors", rank=rank, seed=rank))
        for rank in (4, 16, 64, 100)
    }
    import safetensors.torch

    biases = {  # ComfyUI's bias deltas: changed in place, which the slot does not hold
        f"transformer.{name}.diff_b": torch.full_like(module.bias, 2.0)
        for name, module in transformer.named_modules()
        if name.endswith("attn.to_q") and module.bias is not None
    }
    safetensors.torch.save_file(biases, str(folder / "biases.safetensors"))
    sources["biases"] = data_uri(folder / "biases.safetensors")
    return sources


def png(predictor: Any, **inputs: Any) -> bytes:
    return fast(predictor, prompt="a cat", output_format="png", **inputs)[0]


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_the_standard_transformer_carries_a_slot_and_compiled_blocks(compiled: Any) -> None:
    for model in compiled.engine.models.values():
        transformer = model.text_to_image.transformer
        assert slot_rank(transformer) == SLOT_RANK
        assert list(transformer.peft_config) == [SLOT]
        blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
        assert all(block._compiled_call_impl is not None for block in blocks)


def test_exactness_holds_on_the_compiled_path(compiled: Any, predictor: Any, loras: dict) -> None:
    """Scale 0 is the base, the base comes back bit for bit, the same request gives the same bytes, and the
    LoRA has the effect it has on the eager path (within the route tolerance: other kernels)."""
    base = png(compiled)
    styled = png(compiled, replicate_weights=loras["r16"])
    assert_same_image(png(compiled, replicate_weights=loras["r16"], lora_scale=0), base, "scale 0")
    assert_same_image(png(compiled), base, "the base after a LoRA")
    assert_same_image(png(compiled, replicate_weights=loras["r16"]), styled, "the same request")
    eager_base, eager_styled = png(predictor), png(predictor, replicate_weights=loras["r16"])
    assert_images_close(base, eager_base)
    assert_images_close(styled, eager_styled, base=eager_base)


def test_a_failed_request_leaves_nothing_applied(compiled: Any, loras: dict, tmp_path: Path) -> None:
    styled = png(compiled, replicate_weights=loras["r4"])
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 16)
    with pytest.raises(InputError):
        png(compiled, replicate_weights=loras["r16"], extra_lora=data_uri(broken))
    assert_same_image(png(compiled, replicate_weights=loras["r4"]), styled, "after a failed request")


@pytest.mark.parametrize(
    ("lora", "reason", "adapters"),
    [
        ("biases", "replicate_weights has bias deltas (.diff_b)", [SLOT]),  # changed in place: no adapter
        (
            "r100",
            f"the LoRAs' ranks add up to 100, more than the LoRA slot's {SLOT_RANK} (FLUX_LORA_SLOT_RANK)",
            [SLOT, "lora_0"],
        ),
    ],
)
def test_what_the_slot_cannot_hold_runs_eager_and_leaves_no_trace(
    compiled: Any,
    predictor: Any,
    loras: dict,
    lora: str,
    reason: str,
    adapters: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    transformer = compiled.engine.models["dev"].text_to_image.transformer
    base, styled = png(compiled), png(compiled, replicate_weights=loras["r4"])
    before = graphs()
    with caplog.at_level(logging.INFO):
        eager = png(compiled, replicate_weights=loras[lora])
    assert f"Compiled blocks: {reason}, which their LoRA slot cannot hold; this request runs eager." in caplog.text
    assert list(transformer.peft_config) == adapters
    assert graphs() == before
    assert_images_close(eager, png(predictor, replicate_weights=loras[lora]), base=png(predictor))
    assert_same_image(png(compiled, replicate_weights=loras["r4"]), styled, "the slot's LoRA after")
    assert_same_image(png(compiled), base, "the base after")
    assert list(transformer.peft_config) == [SLOT]


def test_a_failed_eager_request_leaves_the_slot_and_the_base_as_they_were(
    compiled: Any, loras: dict, tmp_path: Path
) -> None:
    """A request for the eager route (bias deltas, applied first) whose second file fails in loading (a LoRA for
    a wider model): the deltas are put back and its adapters deleted, and the slot's LoRA and the base come back
    byte for byte, compiled."""
    transformer = compiled.engine.models["dev"].text_to_image.transformer
    base, styled = png(compiled), png(compiled, replicate_weights=loras["r4"])
    other_model = data_uri(another_models_lora(tmp_path / "wide.safetensors"))
    with pytest.raises(InputError, match=r"^Invalid extra_lora: tensor transformer\..* features where this FLUX.1"):
        png(compiled, replicate_weights=loras["biases"], extra_lora=other_model)
    assert list(transformer.peft_config) == [SLOT]
    before = graphs()
    assert_same_image(png(compiled, replicate_weights=loras["r4"]), styled, "the slot's LoRA after")
    assert_same_image(png(compiled), base, "the base after")
    assert graphs() == before


def test_no_recompiles_and_no_graph_breaks_after_warm_up(compiled: Any, loras: dict, tmp_path: Path) -> None:
    """Standard and go_fast requests switching LoRAs (none, ranks 4, 16 and 64, two at once, and ones that run
    eager beside the slot), every aspect ratio at both megapixels, custom sizes, batches 1 to 4, img2img and
    inpainting: the warm-up's graphs serve them all, and a graph break (which fullgraph would raise on) never
    happens."""
    Image.new("RGB", (400, 240), (10, 20, 30)).save(tmp_path / "in.png")
    Image.new("L", (400, 240), 255).save(tmp_path / "mask.png")
    for go_fast in (False, True):
        png(compiled, go_fast=go_fast, replicate_weights=loras["r4"])  # fills the LoRA cache: not a compile
    before, breaks = graphs(), dict(counters["graph_break"])
    requests: list[dict[str, Any]] = [
        {},
        {"replicate_weights": loras["r4"]},
        {"replicate_weights": loras["r16"], "lora_scale": 0.5},
        {"replicate_weights": loras["r64"], "num_outputs": 3},
        {"replicate_weights": loras["r16"], "extra_lora": loras["r64"], "num_outputs": 2},
        {"replicate_weights": loras["r4"], "image": tmp_path / "in.png", "num_outputs": 4},
        {"image": tmp_path / "in.png", "mask": tmp_path / "mask.png", "replicate_weights": loras["r16"]},
        {"model": "schnell", "replicate_weights": loras["r64"], "width": 336, "height": 272},
        {"replicate_weights": loras["r100"]},  # eager beside the slot (standard); go_fast's slot is wider
        {"replicate_weights": loras["biases"], "num_outputs": 2},  # eager on the standard path; in place on go_fast
        {"replicate_weights": loras["r4"], "num_outputs": 2},  # the slot again, after adapters beside it
        {"width": 512, "height": 384},
    ]
    requests += [
        {"aspect_ratio": ratio, "megapixels": megapixels, "num_inference_steps": 1}
        for ratio in ASPECT_RATIO_SIZES
        for megapixels in ("1", "0.25")
    ]
    for go_fast in (False, True):
        for request in requests:
            png(compiled, go_fast=go_fast, **request)
    assert graphs() == before
    assert dict(counters["graph_break"]) == breaks


def test_an_fp8_copy_leaves_room_for_the_lora_slots_still_to_come(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU the fp8 copies are built first; the memory check counts their slot and, when the standard
    path will be compiled, both standard slots (1.3 GiB each at rank 128 in bf16), so setup never runs out
    of memory after deciding to build a copy."""
    import engine.pipelines
    from engine.fast import FastSettings, slot_bytes

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(guidance_embeds=True).to(torch.bfloat16)
    assert slot_bytes(transformer, 128) == 5_421_440 * 128 * 2
    monkeypatch.setattr(FluxTransformer2DModel, "device", property(lambda self: torch.device("cuda")))
    linear_weights = sum(m.weight.numel() for m in transformer.modules() if isinstance(m, torch.nn.Linear))
    settings = FastSettings("auto", True, "inductor", 64, None, gpu_reserve_bytes=8 * 2**30, standard_compile=True)
    needed = linear_weights + slot_bytes(transformer, 64) + 2 * slot_bytes(transformer, 128) + 8 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (needed, 80 * 2**30))
    assert engine.pipelines.gpu_shortfall(transformer, settings) is None
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (needed - 1, 80 * 2**30))
    # 11.1 GiB of fp8 weights, 0.6 for its slot, 2 x 1.3 for the standard slots, 8 of reserve.
    assert engine.pipelines.gpu_shortfall(transformer, settings) == (
        "it needs 22.3 GiB with the LoRA slots and the activation reserve and 22.3 GiB are free"
    )
