"""Every supported LoRA layout applies as the same LoRA in diffusers/PEFT layout: each file below is
written from one set of PEFT tensors, so every layer must load the same weights (within a few ulps: a
converter may fold a scale into another factor) and the images agree within the route tolerance of
tests/compare.py."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from errors import InputError
from tests.compare import assert_images_close, assert_images_differ, assert_same_image, assert_same_weights
from tests.compare import predictor_weights as loaded
from tests.conftest import data_uri, fast

RANK = 4
DOUBLE = "transformer.transformer_blocks.0"
SINGLE = "transformer.single_transformer_blocks.0"


def data_uri_of(state_dict: dict[str, torch.Tensor], folder: Path, name: str) -> str:
    path = folder / f"{name}.safetensors"
    safetensors.torch.save_file({k: v.clone().contiguous() for k, v in state_dict.items()}, str(path))
    return data_uri(path)


@pytest.fixture(scope="module")
def tensors() -> dict[str, torch.Tensor]:
    """One LoRA, as raw factors: a shared down for q/k/v (as kohya and XLabs store qkv)."""
    generator = torch.Generator().manual_seed(11)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.5

    return {
        "qkv_down": randn(RANK, 32),
        "qkv_up": randn(96, RANK),
        "proj_down": randn(RANK, 32),
        "proj_up": randn(32, RANK),
        "txt_proj_down": randn(RANK, 32),
        "txt_proj_up": randn(32, RANK),
        "mlp_down": randn(RANK, 128),
        "mlp_up": randn(32, RANK),
        "single_down": randn(RANK, 160),
        "single_up": randn(32, RANK),
    }


def peft_layout(t: dict[str, torch.Tensor], scale_down: float = 1.0) -> dict[str, torch.Tensor]:
    q_up, k_up, v_up = t["qkv_up"].split(32)
    pairs = {
        f"{DOUBLE}.attn.to_q": (t["qkv_down"], q_up),
        f"{DOUBLE}.attn.to_k": (t["qkv_down"], k_up),
        f"{DOUBLE}.attn.to_v": (t["qkv_down"], v_up),
        f"{DOUBLE}.attn.to_out.0": (t["proj_down"], t["proj_up"]),
        f"{DOUBLE}.attn.to_add_out": (t["txt_proj_down"], t["txt_proj_up"]),
        f"{DOUBLE}.ff.net.2": (t["mlp_down"], t["mlp_up"]),
        f"{SINGLE}.proj_out": (t["single_down"], t["single_up"]),
    }
    state_dict = {}
    for layer, (down, up) in pairs.items():
        state_dict[f"{layer}.lora_A.weight"] = down * scale_down
        state_dict[f"{layer}.lora_B.weight"] = up
    return state_dict


# BFL module names, as kohya, ComfyUI and XLabs files use them.
BFL_NAMES = {
    "qkv": "double_blocks.0.img_attn.qkv",
    "proj": "double_blocks.0.img_attn.proj",
    "txt_proj": "double_blocks.0.txt_attn.proj",
    "mlp": "double_blocks.0.img_mlp.2",
    "single": "single_blocks.0.linear2",
}


def kohya_layout(t: dict[str, torch.Tensor], alpha: float = RANK) -> dict[str, torch.Tensor]:
    state_dict = {}
    for short, name in BFL_NAMES.items():
        prefix = "lora_unet_" + name.replace(".", "_")
        state_dict[f"{prefix}.lora_down.weight"] = t[f"{short}_down"]
        state_dict[f"{prefix}.lora_up.weight"] = t[f"{short}_up"]
        state_dict[f"{prefix}.alpha"] = torch.tensor(float(alpha))
    return state_dict


def comfyui_layout(t: dict[str, torch.Tensor], peft_names: bool) -> dict[str, torch.Tensor]:
    down, up = ("lora_A", "lora_B") if peft_names else ("lora_down", "lora_up")
    state_dict = {}
    for short, name in BFL_NAMES.items():
        state_dict[f"diffusion_model.{name}.{down}.weight"] = t[f"{short}_down"]
        state_dict[f"diffusion_model.{name}.{up}.weight"] = t[f"{short}_up"]
    return state_dict


def mixture_layout(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CivitAI's "mixture": diffusers module names flattened with underscores, kohya suffixes. diffusers'
    converter maps its attention layers only; ours maps every layer, the MLP and single blocks here."""
    q_up, k_up, v_up = t["qkv_up"].split(32)
    pairs = {
        "transformer_blocks_0_attn_to_q": (t["qkv_down"], q_up),
        "transformer_blocks_0_attn_to_k": (t["qkv_down"], k_up),
        "transformer_blocks_0_attn_to_v": (t["qkv_down"], v_up),
        "transformer_blocks_0_attn_to_out_0": (t["proj_down"], t["proj_up"]),
        "transformer_blocks_0_attn_to_add_out": (t["txt_proj_down"], t["txt_proj_up"]),
        "transformer_blocks_0_ff_net_2": (t["mlp_down"], t["mlp_up"]),
        "single_transformer_blocks_0_proj_out": (t["single_down"], t["single_up"]),
    }
    state_dict = {}
    for layer, (down, up) in pairs.items():
        prefix = f"lora_transformer_{layer}"
        state_dict[f"{prefix}.lora_down.weight"] = down
        state_dict[f"{prefix}.lora_up.weight"] = up
        state_dict[f"{prefix}.alpha"] = torch.tensor(float(RANK))
    return state_dict


def xlabs_layout(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    layers = {
        "double_blocks.0.processor.qkv_lora1": "qkv",
        "double_blocks.0.processor.proj_lora1": "proj",
        "double_blocks.0.processor.proj_lora2": "txt_proj",
        "single_blocks.0.processor.proj_lora": "single",
    }
    state_dict = {}
    for name, short in layers.items():
        state_dict[f"{name}.down.weight"] = t[f"{short}_down"]
        state_dict[f"{name}.up.weight"] = t[f"{short}_up"]
    return state_dict


def without(state_dict: dict[str, torch.Tensor], *fragments: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state_dict.items() if not any(f in k for f in fragments)}


def image(predictor: Any, source: str, model: str = "dev") -> bytes:
    return fast(predictor, prompt="a cat", output_format="png", replicate_weights=source, model=model)[0]


def assert_applies_alike(predictor: Any, source: str, twin: str, model: str = "dev") -> None:
    """Two spellings of one LoRA: each layer loads the same weights, and the images agree within the route
    tolerance while the LoRA moves the image far more. A spelling that left anything of an earlier request
    applied would load other weights."""
    base = fast(predictor, prompt="a cat", output_format="png", model=model)[0]
    expected = image(predictor, twin, model)
    expected_weights = loaded(predictor, model)
    actual = image(predictor, source, model)
    assert_same_weights(loaded(predictor, model), expected_weights)
    assert_images_close(actual, expected, base=base)


@pytest.fixture(scope="module")
def reference(predictor: Any, tensors: dict, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return image(predictor, data_uri_of(peft_layout(tensors), tmp_path_factory.mktemp("ref"), "peft"))


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param(kohya_layout, id="kohya"),
        pytest.param(lambda t: comfyui_layout(t, peft_names=False), id="comfyui-kohya-names"),
        pytest.param(lambda t: comfyui_layout(t, peft_names=True), id="comfyui-peft-names"),
        pytest.param(xlabs_layout, id="xlabs"),
    ],
)
def test_layout_applies_as_peft(predictor: Any, tensors: dict, tmp_path: Path, layout: Any) -> None:
    twin = peft_layout(tensors)
    if layout is xlabs_layout:  # XLabs has no LoRA on the MLP: compare with a PEFT file without it
        twin = without(twin, "ff.net.2")
    assert_applies_alike(predictor, data_uri_of(layout(tensors), tmp_path, "lora"), data_uri_of(twin, tmp_path, "peft"))


def test_mixture_layout_applies_as_peft(predictor: Any, tensors: dict, tmp_path: Path) -> None:
    assert_applies_alike(
        predictor,
        data_uri_of(mixture_layout(tensors), tmp_path, "mixture"),
        data_uri_of(peft_layout(tensors), tmp_path, "peft"),
    )
    with_alpha = {k: (torch.tensor(2.0) if k.endswith(".alpha") else v) for k, v in mixture_layout(tensors).items()}
    halved = peft_layout(tensors, scale_down=0.5)
    assert_applies_alike(predictor, data_uri_of(with_alpha, tmp_path, "alpha"), data_uri_of(halved, tmp_path, "halved"))


def test_a_file_mixing_diffusers_names_with_kohya_names_applies_both(
    predictor: Any, tensors: dict, tmp_path: Path
) -> None:
    """diffusers' kohya converter keeps only the `transformer.` part of such a file; each part is applied, and a
    layer named in both spellings is refused."""
    peft = without(peft_layout(tensors), "attn.to_out.0", "attn.to_add_out")  # those two in kohya's names
    kohya = without(kohya_layout(tensors), "img_attn_qkv", "img_mlp", "linear2")
    assert_applies_alike(
        predictor, data_uri_of(peft | kohya, tmp_path, "mixed"), data_uri_of(peft_layout(tensors), tmp_path, "peft")
    )
    twice = peft_layout(tensors) | kohya
    with pytest.raises(InputError, match=r"names 4 LoRA tensors twice, in diffusers' names and in another spelling"):
        image(predictor, data_uri_of(twice, tmp_path, "twice"))


def test_kohya_alpha_scales_the_lora(predictor: Any, tensors: dict, tmp_path: Path) -> None:
    assert_applies_alike(
        predictor,
        data_uri_of(kohya_layout(tensors, alpha=RANK / 2), tmp_path, "kohya-half"),
        data_uri_of(peft_layout(tensors, scale_down=0.5), tmp_path, "peft-half"),
    )


def test_text_encoder_keys_in_a_kohya_file_now_apply(predictor: Any, tensors: dict, tmp_path: Path) -> None:
    """They were dropped with a warning before; tests/test_text_encoder_loras.py has the details."""
    state_dict = kohya_layout(tensors)
    state_dict["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.ones(RANK, 32)
    state_dict["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.ones(32, RANK)
    with_text_encoder = image(predictor, data_uri_of(state_dict, tmp_path, "with-te"))
    assert_images_differ(with_text_encoder, image(predictor, data_uri_of(kohya_layout(tensors), tmp_path, "kohya")))
    assert_applies_alike(
        predictor,
        data_uri_of(kohya_layout(tensors), tmp_path, "without-te"),
        data_uri_of(peft_layout(tensors), tmp_path, "peft"),
    )


def test_a_partly_matching_lora_is_refused_and_changes_nothing(
    predictor: Any, tensors: dict, reference: bytes, tmp_path: Path
) -> None:
    """It used to apply what matched with a log line; part of a LoRA is another LoRA."""
    state_dict = peft_layout(tensors)
    state_dict["transformer.transformer_blocks.7.attn.to_q.lora_A.weight"] = torch.ones(RANK, 32)
    state_dict["transformer.transformer_blocks.7.attn.to_q.lora_B.weight"] = torch.ones(32, RANK)
    with pytest.raises(InputError) as caught:
        image(predictor, data_uri_of(state_dict, tmp_path, "partial"))
    assert str(caught.value).startswith(
        "Invalid replicate_weights: 2 of its 16 LoRA tensors match no FLUX.1 layer, so it was trained for another "
        "model; first: transformer.transformer_blocks.7.attn.to_q.lora_A.weight"
    )
    assert_same_image(image(predictor, data_uri_of(peft_layout(tensors), tmp_path, "whole")), reference)


@pytest.mark.parametrize(
    ("extra", "kind"),
    [
        ({"lora_unet_double_blocks_0_img_attn_proj.lora_mid.weight": torch.ones(4, 4, 3, 3)}, "LoCon convolution"),
        ({"lora_unet_double_blocks_0_img_attn_proj.oft_blocks": torch.ones(4, 8, 8)}, "unknown"),
    ],
    ids=["LoCon-mid", "OFT"],
)
def test_a_file_with_tensor_kinds_we_cannot_apply_is_refused_by_kind(
    predictor: Any, tensors: dict, tmp_path: Path, extra: dict, kind: str
) -> None:
    """Applying the rest would be another model. The plain file right after the refusal gives the bytes
    it gave before: nothing of the refused one stays applied."""
    plain = data_uri_of(kohya_layout(tensors), tmp_path, "plain")
    before = image(predictor, plain)
    with pytest.raises(InputError) as caught:
        image(predictor, data_uri_of({**kohya_layout(tensors), **extra}, tmp_path, "strange"))
    message = str(caught.value)
    assert message.startswith("Invalid replicate_weights: it holds tensors of kinds this predictor cannot apply yet")
    assert kind in message and next(iter(extra)) in message
    assert_same_image(image(predictor, plain), before)


def test_dev_lora_with_guidance_layers_is_refused_on_schnell(predictor: Any, tensors: dict, tmp_path: Path) -> None:
    state_dict = peft_layout(tensors)
    state_dict["transformer.time_text_embed.guidance_embedder.linear_1.lora_A.weight"] = torch.ones(RANK, 256)
    state_dict["transformer.time_text_embed.guidance_embedder.linear_1.lora_B.weight"] = torch.ones(32, RANK)
    source = data_uri_of(state_dict, tmp_path, "dev-only")
    schnell_base = fast(predictor, prompt="a cat", output_format="png", model="schnell")[0]
    with pytest.raises(InputError, match="adapts the guidance embedder, which FLUX.1 schnell does not have"):
        image(predictor, source, model="schnell")
    assert fast(predictor, prompt="a cat", output_format="png", model="schnell")[0] == schnell_base
    assert image(predictor, source) != fast(predictor, prompt="a cat", output_format="png")[0]  # fine on dev


def test_unknown_layout_is_refused_with_its_first_keys(predictor: Any, tmp_path: Path) -> None:
    state_dict = {"lora_unet_down_blocks_0_attentions_0.lora_down.weight": torch.ones(RANK, 8)}
    with pytest.raises(InputError, match=r"^Invalid replicate_weights: this file is not a FLUX LoRA in any supported"):
        image(predictor, data_uri_of(state_dict, tmp_path, "sdxl"))


# kohya names (BFL's modules) of the layers diffusers' converter maps outside the attention and
# MLP blocks, with the diffusers module each becomes: embedders, final layer and modulations.
EMBEDDERS_AND_FINAL_LAYER = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer_adaLN_modulation_1": "norm_out.linear",
    "final_layer_linear": "proj_out",
    "double_blocks_0_img_mod_lin": "transformer_blocks.0.norm1.linear",
    "double_blocks_0_txt_mod_lin": "transformer_blocks.0.norm1_context.linear",
    "single_blocks_0_modulation_lin": "single_transformer_blocks.0.norm.linear",
}


@pytest.mark.parametrize("bfl_name", EMBEDDERS_AND_FINAL_LAYER)
def test_embedder_final_layer_and_modulation_loras_apply_as_their_peft_equivalent(
    predictor: Any, tmp_path: Path, bfl_name: str
) -> None:
    """Alone in a kohya file (in_dims, "train all layers", ComfyUI extracts), each family changes the image,
    exactly as the same pair on the diffusers module does. diffusers 0.42 used to drop the embedders and the
    final layer. BFL's final layer gives (shift, scale) where diffusers' norm_out wants (scale, shift)."""
    module_name = EMBEDDERS_AND_FINAL_LAYER[bfl_name]
    layer = dict(predictor.engine.models["dev"].text_to_image.transformer.named_modules())[module_name]
    layer = getattr(layer, "base_layer", layer)
    generator = torch.Generator().manual_seed(5)
    down = torch.randn(RANK, layer.in_features, generator=generator) * 0.5
    up = torch.randn(layer.out_features, RANK, generator=generator) * 0.5
    kohya = {
        f"lora_unet_{bfl_name}.lora_down.weight": down,
        f"lora_unet_{bfl_name}.lora_up.weight": up,
        f"lora_unet_{bfl_name}.alpha": torch.tensor(float(RANK)),
    }
    if bfl_name == "final_layer_adaLN_modulation_1":
        shift, scale = up.chunk(2)
        up = torch.cat([scale, shift])
    peft = {f"transformer.{module_name}.lora_A.weight": down, f"transformer.{module_name}.lora_B.weight": up}
    assert_applies_alike(predictor, data_uri_of(kohya, tmp_path, "kohya"), data_uri_of(peft, tmp_path, "peft"))


def test_a_dev_lora_with_guidance_embedder_layers_in_kohya_names_is_refused_on_schnell(
    predictor: Any, tmp_path: Path
) -> None:
    """Before, diffusers' converter dropped these silently and schnell ran the rest."""
    state_dict = {
        "lora_unet_guidance_in_in_layer.lora_down.weight": torch.ones(RANK, 256),
        "lora_unet_guidance_in_in_layer.lora_up.weight": torch.ones(32, RANK),
    }
    with pytest.raises(InputError, match="FLUX.1 schnell does not have"):
        image(predictor, data_uri_of(state_dict, tmp_path, "guidance"), model="schnell")


# ComfyUI's bias deltas, in BFL names: fused layers are split in the order of their parts.
BIAS_DELTAS = {
    "double_blocks.0.img_attn.qkv": [
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.to_k",
        "transformer_blocks.0.attn.to_v",
    ],
    "single_blocks.0.linear1": [
        "single_transformer_blocks.0.attn.to_q",
        "single_transformer_blocks.0.attn.to_k",
        "single_transformer_blocks.0.attn.to_v",
        "single_transformer_blocks.0.proj_mlp",
    ],
    "final_layer.adaLN_modulation.1": ["norm_out.linear"],
    "img_in": ["x_embedder"],
}


def biases(predictor: Any) -> dict[str, torch.Tensor]:
    transformer = predictor.engine.models["dev"].text_to_image.transformer
    return {
        name.removesuffix(".base_layer"): module.bias.detach().clone()  # under a LoRA, peft wraps the layer
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and module.bias is not None and ".lora_" not in name
    }


def bias_delta_file(predictor: Any, prefix: str, flatten: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    """A .diff_b per BFL layer above, and the delta each diffusers bias should get at scale 1."""
    transformer = predictor.engine.models["dev"].text_to_image.transformer
    generator = torch.Generator().manual_seed(9)
    state_dict, expected = {}, {}
    for bfl, targets in BIAS_DELTAS.items():
        widths = [
            getattr(transformer.get_submodule(t), "base_layer", transformer.get_submodule(t)).out_features
            for t in targets
        ]
        delta = torch.randn(sum(widths), generator=generator)
        name = bfl.replace(".", "_") if flatten else bfl
        state_dict[f"{prefix}{name}.diff_b"] = delta
        if bfl.startswith("final_layer"):
            shift, scale = delta.chunk(2)
            delta = torch.cat([scale, shift])
        expected.update(zip(targets, delta.split(widths), strict=True))
    return state_dict, expected


def test_bias_deltas_add_scale_times_delta_and_come_back_exactly(predictor: Any, tensors: dict, tmp_path: Path) -> None:
    base = fast(predictor, prompt="a cat", output_format="png")[0]
    originals = biases(predictor)
    deltas, expected = bias_delta_file(predictor, "diffusion_model.", flatten=False)
    source = data_uri_of({**comfyui_layout(tensors, peft_names=False), **deltas}, tmp_path, "comfy")
    first = fast(predictor, prompt="a cat", output_format="png", replicate_weights=source, lora_scale=0.7)[0]
    changed = biases(predictor)
    for name, original in originals.items():
        want = original + 0.7 * expected[name] if name in expected else original
        torch.testing.assert_close(changed[name], want, rtol=0, atol=1e-6, msg=name)
    kohya_deltas, _ = bias_delta_file(predictor, "lora_unet_", flatten=True)
    kohya = data_uri_of({**kohya_layout(tensors), **kohya_deltas}, tmp_path, "kohya")
    assert fast(predictor, prompt="a cat", output_format="png", replicate_weights=kohya, lora_scale=0.7)[0] == first
    assert fast(predictor, prompt="a cat", output_format="png")[0] == base
    assert all(torch.equal(biases(predictor)[name], original) for name, original in originals.items())


def test_a_file_of_bias_deltas_alone_applies(predictor: Any, tmp_path: Path) -> None:
    base = fast(predictor, prompt="a cat", output_format="png")[0]
    deltas, _ = bias_delta_file(predictor, "diffusion_model.", flatten=False)
    assert image(predictor, data_uri_of(deltas, tmp_path, "deltas")) != base
    assert (
        image(predictor, data_uri_of(deltas, tmp_path, "deltas"), model="schnell")
        != fast(predictor, prompt="a cat", output_format="png", model="schnell")[0]
    )


def test_a_bias_delta_for_no_flux_layer_is_refused(predictor: Any, tensors: dict, tmp_path: Path) -> None:
    state_dict = {**kohya_layout(tensors), "diffusion_model.double_blocks.7.img_attn.qkv.diff_b": torch.ones(96)}
    with pytest.raises(InputError, match=re.escape("bias deltas (.diff_b) match no FLUX.1 layer with a bias")):
        image(predictor, data_uri_of(state_dict, tmp_path, "bad"))


def test_alpha_kept_only_in_diffusers_metadata_scales_the_lora(predictor: Any, tensors: dict, tmp_path: Path) -> None:
    """Written by diffusers' own save_lora_weights, as its trainers and SimpleTuner save: lora_alpha and an
    alpha_pattern in the header, no .alpha tensor. diffusers reads them only when it opens the file itself."""
    from diffusers import FluxPipeline

    layers = {key.removeprefix("transformer."): value for key, value in peft_layout(tensors).items()}
    metadata = {"r": RANK, "lora_alpha": RANK / 2, "alpha_pattern": {"ff.net.2": RANK}}
    FluxPipeline.save_lora_weights(
        tmp_path / "saved", transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata
    )
    saved = data_uri(tmp_path / "saved" / "pytorch_lora_weights.safetensors")
    expected = peft_layout(tensors, scale_down=0.5)
    key = f"{DOUBLE}.ff.net.2.lora_A.weight"
    expected[key] = peft_layout(tensors)[key]  # its own alpha: RANK, a scale of 1
    assert_applies_alike(predictor, saved, data_uri_of(expected, tmp_path, "expected"))
    unscaled = image(predictor, data_uri_of(peft_layout(tensors), tmp_path, "unscaled"))
    assert_images_differ(image(predictor, saved), unscaled)


def peft_dora(predictor: Any) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A DoRA made by peft itself on a copy of the demo transformer, and its file as peft saves it."""
    import copy

    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    transformer = copy.deepcopy(predictor.engine.models["dev"].text_to_image.transformer)
    transformer.unload_lora()  # the copy of whatever an earlier test left loaded
    config = LoraConfig(
        r=RANK, lora_alpha=RANK, use_dora=True, init_lora_weights=False, target_modules=["attn.to_q", "ff.net.2"]
    )
    torch.manual_seed(13)
    inject_adapter_in_model(config, transformer, adapter_name="default")
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(1.3)  # a magnitude that is not the weight's own norm
    return transformer, {f"transformer.{k}": v.contiguous() for k, v in get_peft_model_state_dict(transformer).items()}


def test_a_peft_dora_applies_exactly_as_peft_computes_it(predictor: Any, tmp_path: Path) -> None:
    reference, state_dict = peft_dora(predictor)
    assert any(key.endswith(".lora_magnitude_vector") for key in state_dict)
    base = fast(predictor, prompt="a cat", output_format="png")[0]
    source = data_uri_of(state_dict, tmp_path, "dora")
    adapted = image(predictor, source)
    assert adapted != base
    transformer = predictor.engine.models["dev"].text_to_image.transformer
    for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.2"):
        ours, theirs = transformer.get_submodule(name), reference.get_submodule(name)
        x = torch.randn(3, theirs.base_layer.in_features)
        assert torch.equal(ours(x), theirs(x)), name
    # Scale 0 leaves it out: a DoRA scaled by 0 in peft would still renormalise the weights.
    zero = fast(predictor, prompt="a cat", output_format="png", replicate_weights=source, lora_scale=0.0)[0]
    assert zero == base
    assert fast(predictor, prompt="a cat", output_format="png")[0] == base


def test_a_dreambooth_script_save_applies_to_the_transformer_and_clip_as_peft_computes(
    predictor: Any, tmp_path: Path
) -> None:
    """As diffusers' train_dreambooth_lora_flux.py saves: peft adapters on the attention projections of the
    transformer and of CLIP (alpha in the metadata, not as tensors), written by FluxPipeline.save_lora_weights.
    Trained under transformers 5, CLIP's keys lack "text_model."; both spellings must load."""
    import copy

    from diffusers import FluxPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    pipeline = predictor.engine.models["dev"].text_to_image
    fast(predictor, prompt="a cat")  # no LoRA: plain modules to copy
    transformer, clip = copy.deepcopy(pipeline.transformer), copy.deepcopy(pipeline.text_encoder)
    torch.manual_seed(17)
    transformer_config = LoraConfig(
        r=RANK, lora_alpha=2 * RANK, init_lora_weights=False, target_modules=["to_k", "to_q", "to_v", "to_out.0"]
    )
    clip_config = LoraConfig(
        r=RANK, lora_alpha=RANK, init_lora_weights=False, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]
    )
    inject_adapter_in_model(transformer_config, transformer, adapter_name="default")
    inject_adapter_in_model(clip_config, clip, adapter_name="default")
    FluxPipeline.save_lora_weights(
        tmp_path / "dreambooth",
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        text_encoder_lora_layers=get_peft_model_state_dict(clip),
        transformer_lora_adapter_metadata=transformer_config.to_dict(),
        text_encoder_lora_adapter_metadata=clip_config.to_dict(),
    )
    saved = tmp_path / "dreambooth" / "pytorch_lora_weights.safetensors"
    assert any(key.startswith("text_encoder.") for key in safetensors.torch.load_file(str(saved)))
    image(predictor, data_uri(saved))
    for ours, theirs, name in (
        (pipeline.transformer, transformer, "transformer_blocks.0.attn.to_q"),
        (pipeline.transformer, transformer, "single_transformer_blocks.0.attn.to_k"),
        (pipeline.text_encoder, clip, "encoder.layers.0.self_attn.q_proj"),
    ):
        x = torch.randn(2, theirs.get_submodule(name).base_layer.in_features)
        torch.testing.assert_close(ours.get_submodule(name)(x), theirs.get_submodule(name)(x), rtol=1e-5, atol=1e-5)


def test_kohya_alphas_of_any_dtype_scale_alike(predictor: Any, tensors: dict, tmp_path: Path) -> None:
    """Extracted LoRAs carry int64 alphas; trainers also write fp32, fp16 and bf16 ones."""
    images = set()
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int64):
        state_dict = kohya_layout(tensors, alpha=2)
        state_dict.update({k: v.to(dtype) for k, v in state_dict.items() if k.endswith(".alpha")})
        images.add(image(predictor, data_uri_of(state_dict, tmp_path, f"alpha-{dtype}".replace("torch.", ""))))
    assert len(images) == 1


def loha_layer(out_features: int, in_features: int, rank: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "hada_w1_a": torch.randn(out_features, rank, generator=generator) * 0.5,
        "hada_w1_b": torch.randn(rank, in_features, generator=generator) * 0.5,
        "hada_w2_a": torch.randn(out_features, rank, generator=generator) * 0.5,
        "hada_w2_b": torch.randn(rank, in_features, generator=generator) * 0.5,
    }


@pytest.mark.parametrize(
    ("bfl_name", "targets"),
    [
        (
            "double_blocks_0_img_attn_qkv",
            ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v"],
        ),
        ("single_blocks_0_linear2", ["single_transformer_blocks.0.proj_out"]),
        ("img_in", ["x_embedder"]),
    ],
)
def test_a_lycoris_loha_applies_its_exact_update(
    predictor: Any, tmp_path: Path, bfl_name: str, targets: list[str]
) -> None:
    """LyCORIS writes kohya names; each layer's update must be ((w1_a w1_b) * (w2_a w2_b)) * alpha / rank,
    split by rows over the diffusers modules of a fused BFL layer."""
    transformer = predictor.engine.models["dev"].text_to_image.transformer
    fast(predictor, prompt="a cat")  # no LoRA: plain modules
    layers = [transformer.get_submodule(name) for name in targets]
    out_features, in_features = sum(layer.out_features for layer in layers), layers[0].in_features
    parts = loha_layer(out_features, in_features, rank=4, seed=3)
    state_dict = {f"lora_unet_{bfl_name}.{name}": value for name, value in parts.items()}
    state_dict[f"lora_unet_{bfl_name}.alpha"] = torch.tensor(2.0)
    update = (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"]) * (2.0 / 4)
    base = fast(predictor, prompt="a cat", output_format="png")[0]
    assert image(predictor, data_uri_of(state_dict, tmp_path, "loha")) != base
    x = torch.randn(2, in_features)
    for name, rows in zip(targets, update.split([layer.out_features for layer in layers]), strict=True):
        module = transformer.get_submodule(name)
        torch.testing.assert_close(module(x) - module.base_layer(x), x @ rows.T, rtol=1e-4, atol=1e-4)
    assert fast(predictor, prompt="a cat", output_format="png")[0] == base


def test_an_incomplete_loha_is_refused(predictor: Any, tmp_path: Path) -> None:
    state_dict = {"lora_unet_img_in.hada_w1_a": torch.ones(32, 2), "lora_unet_img_in.hada_t1": torch.ones(2, 2)}
    with pytest.raises(InputError, match="is not a plain Linear LoHa"):
        image(predictor, data_uri_of(state_dict, tmp_path, "partial-loha"))


def test_a_loha_too_wide_for_its_exact_lora_form_is_refused(predictor: Any, tmp_path: Path) -> None:
    parts = loha_layer(32, 32, rank=17, seed=4)
    state_dict = {f"lora_unet_img_in.{name}": value for name, value in parts.items()}
    with pytest.raises(InputError, match="of rank 17 x 17, past the 256 this predictor takes"):
        image(predictor, data_uri_of(state_dict, tmp_path, "wide"))


def test_a_kohya_dora_with_dora_scale_applies_as_peft_computes_it(predictor: Any, tmp_path: Path) -> None:
    """LyCORIS/kohya DoRA in BFL names: one magnitude per output row (`.dora_scale`, shape (out, 1)), over
    the fused qkv too. The reference is peft's own DoRA on the diffusers modules with the same factors."""
    import copy

    from peft import LoraConfig, inject_adapter_in_model

    fast(predictor, prompt="a cat")  # no LoRA: plain modules to copy
    reference = copy.deepcopy(predictor.engine.models["dev"].text_to_image.transformer)
    config = LoraConfig(
        r=RANK,
        lora_alpha=RANK,
        use_dora=True,
        init_lora_weights=False,
        target_modules=[
            "transformer_blocks.0.attn.to_q",
            "transformer_blocks.0.attn.to_k",
            "transformer_blocks.0.attn.to_v",
            "transformer_blocks.0.attn.to_out.0",
        ],
    )
    torch.manual_seed(19)
    inject_adapter_in_model(config, reference, adapter_name="default")
    qkv = [reference.get_submodule(f"transformer_blocks.0.attn.to_{p}") for p in "qkv"]
    proj = reference.get_submodule("transformer_blocks.0.attn.to_out.0")
    with torch.no_grad():
        for layer in qkv[1:]:  # kohya's fused qkv has one down for the three
            layer.lora_A["default"].weight.copy_(qkv[0].lora_A["default"].weight)
        for layer in [*qkv, proj]:
            layer.lora_magnitude_vector["default"].weight.mul_(1.2)

    def pair(layers: list[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        down = layers[0].lora_A["default"].weight.detach()
        up = torch.cat([layer.lora_B["default"].weight.detach() for layer in layers])
        magnitude = torch.cat([layer.lora_magnitude_vector["default"].weight.detach() for layer in layers])
        return down, up, magnitude[:, None]

    state_dict = {}
    for bfl, layers in (("double_blocks_0_img_attn_qkv", qkv), ("double_blocks_0_img_attn_proj", [proj])):
        down, up, magnitude = pair(layers)
        state_dict[f"lora_unet_{bfl}.lora_down.weight"] = down
        state_dict[f"lora_unet_{bfl}.lora_up.weight"] = up
        state_dict[f"lora_unet_{bfl}.alpha"] = torch.tensor(float(RANK))
        state_dict[f"lora_unet_{bfl}.dora_scale"] = magnitude
    base = fast(predictor, prompt="a cat", output_format="png")[0]
    assert image(predictor, data_uri_of(state_dict, tmp_path, "kohya-dora")) != base
    transformer = predictor.engine.models["dev"].text_to_image.transformer
    x = torch.randn(2, 32)
    for name in ("to_q", "to_k", "to_v", "to_out.0"):
        module = f"transformer_blocks.0.attn.{name}"
        torch.testing.assert_close(
            transformer.get_submodule(module)(x), reference.get_submodule(module)(x), rtol=1e-5, atol=1e-5
        )


def test_dora_magnitudes_that_fit_neither_axis_are_refused(predictor: Any, tensors: dict, tmp_path: Path) -> None:
    state_dict = {**kohya_layout(tensors), "lora_unet_double_blocks_0_img_attn_proj.dora_scale": torch.ones(1, 7)}
    with pytest.raises(InputError, match="neither one per output"):
        image(predictor, data_uri_of(state_dict, tmp_path, "columns"))
