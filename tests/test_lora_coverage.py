"""Full-size key sets, at FLUX.1's real widths, converted and matched without the memory.

The tiny demo model cannot show what only real widths do: diffusers' kohya converter splits
`single_blocks.*.linear1` by FLUX's own sizes (3 x 3072 + 12288), and a layer missing from a
full file shows only when every layer is there. So FLUX.1 dev's transformer (19 double and 38
single blocks), CLIP-L (12 layers) and T5-XXL (24 layers) are built on the meta device, and each
trainer layout's complete file, written with meta tensors and real alphas, must convert and match
every layer it names: every Linear of the transformer, and of each text encoder it trains.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import pytest
import torch

from errors import LoraFormatError
from lora_loading.formats import check_lora_matches, spelled_as_read
from lora_loading.text_encoders import text_encoder_loras

# Not a multiple of 3 or 4: for those, diffusers' converter reads the values of a qkv or linear1 pair
# (to spot kohya's split_qkv layout), which meta tensors do not have.
RANK = 10
HIDDEN = 3072
# sd-scripts' networks/lora_flux.py: the BFL modules a default FLUX LoRA trains (304), with in/out widths.
DOUBLE = {
    "img_attn_qkv": (HIDDEN, 3 * HIDDEN),
    "img_attn_proj": (HIDDEN, HIDDEN),
    "img_mlp_0": (HIDDEN, 4 * HIDDEN),
    "img_mlp_2": (4 * HIDDEN, HIDDEN),
    "img_mod_lin": (HIDDEN, 6 * HIDDEN),
    "txt_attn_qkv": (HIDDEN, 3 * HIDDEN),
    "txt_attn_proj": (HIDDEN, HIDDEN),
    "txt_mlp_0": (HIDDEN, 4 * HIDDEN),
    "txt_mlp_2": (4 * HIDDEN, HIDDEN),
    "txt_mod_lin": (HIDDEN, 6 * HIDDEN),
}
SINGLE = {
    "linear1": (HIDDEN, 3 * HIDDEN + 4 * HIDDEN),
    "linear2": (HIDDEN + 4 * HIDDEN, HIDDEN),
    "modulation_lin": (HIDDEN, 3 * HIDDEN),
}
# train_blocks=all with in_dims: the embedders and the final layer too.
IN_DIMS = {
    "img_in": (64, HIDDEN),
    "txt_in": (4096, HIDDEN),
    "time_in_in_layer": (256, HIDDEN),
    "time_in_out_layer": (HIDDEN, HIDDEN),
    "vector_in_in_layer": (768, HIDDEN),
    "vector_in_out_layer": (HIDDEN, HIDDEN),
    "guidance_in_in_layer": (256, HIDDEN),
    "guidance_in_out_layer": (HIDDEN, HIDDEN),
    "final_layer_linear": (HIDDEN, 64),
    "final_layer_adaLN_modulation_1": (HIDDEN, 2 * HIDDEN),
}


@pytest.fixture(scope="module")
def flux() -> Any:
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(guidance_embeds=True)  # FLUX.1 dev's configuration
        clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12))
        t5 = T5EncoderModel(
            T5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu")
        )
    return types.SimpleNamespace(transformer=transformer, text_encoder=clip, text_encoder_2=t5)


def linear_names(model: torch.nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def pair(width_in: int, width_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty(RANK, width_in, device="meta"), torch.empty(width_out, RANK, device="meta")


def kohya_bfl(prefix: str, sep: str, down: str, up: str, in_dims: bool = True) -> dict[str, torch.Tensor]:
    """BFL module names: kohya (`lora_unet_` and underscores) or ComfyUI (`diffusion_model.` and dots)."""
    names = {}
    for index in range(19):
        names.update({f"double_blocks{sep}{index}{sep}{name}": widths for name, widths in DOUBLE.items()})
    for index in range(38):
        names.update({f"single_blocks{sep}{index}{sep}{name}": widths for name, widths in SINGLE.items()})
    if in_dims:
        names.update(IN_DIMS)
    state_dict = {}
    for name, (width_in, width_out) in names.items():
        if sep == ".":  # ComfyUI keeps BFL's own dots: img_attn.qkv, img_mod.lin, final_layer.adaLN_modulation.1
            name = (
                name.replace("_attn_", "_attn.")
                .replace("_mlp_", "_mlp.")
                .replace("_mod_lin", "_mod.lin")
                .replace("modulation_lin", "modulation.lin")
                .replace("time_in_", "time_in.")
                .replace("vector_in_", "vector_in.")
                .replace("guidance_in_", "guidance_in.")
                .replace("final_layer_adaLN_modulation_1", "final_layer.adaLN_modulation.1")
                .replace("final_layer_linear", "final_layer.linear")
            )
        state_dict[f"{prefix}{name}.{down}"], state_dict[f"{prefix}{name}.{up}"] = pair(width_in, width_out)
        state_dict[f"{prefix}{name}.alpha"] = torch.tensor(float(RANK) / 2)
    return state_dict


def text_encoders(clip_prefix: str, t5_prefix: str, flatten: bool, flux: Any, down: str, up: str) -> dict:
    state_dict = {}
    for model, prefix, legacy in (
        (flux.text_encoder, clip_prefix, "text_model."),
        (flux.text_encoder_2, t5_prefix, ""),
    ):
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                spelled = (legacy + name).replace(".", "_") if flatten else legacy + name
                pieces = pair(module.in_features, module.out_features)
                state_dict[f"{prefix}{spelled}.{down}"], state_dict[f"{prefix}{spelled}.{up}"] = pieces
                state_dict[f"{prefix}{spelled}.alpha"] = torch.tensor(8.0)
    return state_dict


def peft(flux: Any, prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    """diffusers/PEFT names for every Linear of the transformer, as ai-toolkit and the dreambooth script save."""
    state_dict = {}
    for name, module in flux.transformer.named_modules():
        if isinstance(module, torch.nn.Linear):
            state_dict[f"{prefix}{name}.lora_A.weight"], state_dict[f"{prefix}{name}.lora_B.weight"] = pair(
                module.in_features, module.out_features
            )
    return state_dict


def mixture(flux: Any) -> dict[str, torch.Tensor]:
    state_dict = {}
    for name, module in flux.transformer.named_modules():
        if isinstance(module, torch.nn.Linear):
            flat = "lora_transformer_" + name.replace(".", "_")
            state_dict[f"{flat}.lora_down.weight"], state_dict[f"{flat}.lora_up.weight"] = pair(
                module.in_features, module.out_features
            )
            state_dict[f"{flat}.alpha"] = torch.tensor(4.0)
    return state_dict


ATTENTION_PROJECTIONS = (".attn.to_q", ".attn.to_k", ".attn.to_v", ".attn.to_out.0")


def simpletuner(flux: Any, prefix: str, comfyui: bool) -> dict[str, torch.Tensor]:
    """SimpleTuner's saves: the attention projections' pairs as `.lora.down`/`.lora.up` in its checkpoints,
    lora_A/lora_B with a float32 `.alpha` in its ComfyUI export; every other pair lora_A/lora_B, no alpha."""
    state_dict = {}
    for key, tensor in peft(flux, prefix=prefix).items():
        module = key.rsplit(".lora_", 1)[0]
        if module.endswith(ATTENTION_PROJECTIONS):
            if comfyui:
                state_dict[f"{module}.alpha"] = torch.tensor(float(RANK), dtype=torch.float32)
            else:
                key = key.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up.")
        state_dict[key] = tensor
    return state_dict


# OneTrainer's OMI layout: `transformer.` + BFL names, each fused layer's parts trained apart and numbered
# (modules/util/convert/lora/convert_flux_lora.py, 2025-04 to 2026-07; InvokeAI vendors the same key sets):
# OMI name -> the diffusers module it trains, per block and outside them. Written out here rather than
# taken from lora_loading, so the mapping under test is not also the expectation.
OMI_DOUBLE = {
    "img_attn.qkv.0": "attn.to_q",
    "img_attn.qkv.1": "attn.to_k",
    "img_attn.qkv.2": "attn.to_v",
    "txt_attn.qkv.0": "attn.add_q_proj",
    "txt_attn.qkv.1": "attn.add_k_proj",
    "txt_attn.qkv.2": "attn.add_v_proj",
    "img_attn.proj": "attn.to_out.0",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "img_mod.lin": "norm1.linear",
    "txt_attn.proj": "attn.to_add_out",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
    "txt_mod.lin": "norm1_context.linear",
}
OMI_SINGLE = {
    "linear1.0": "attn.to_q",
    "linear1.1": "attn.to_k",
    "linear1.2": "attn.to_v",
    "linear1.3": "proj_mlp",
    "linear2": "proj_out",
    "modulation.lin": "norm.linear",
}
OMI_OTHER = {
    "txt_in": "context_embedder",
    "final_layer.adaLN_modulation.1": "norm_out.linear",  # its lora_up in BFL's (shift, scale) order
    "final_layer.linear": "proj_out",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "img_in.proj": "x_embedder",
}


def omi_names(double_blocks: int, single_blocks: int) -> dict[str, str]:
    """OMI name -> the module it trains, for a transformer of so many blocks."""
    names = dict(OMI_OTHER)
    for index in range(double_blocks):
        names |= {f"double_blocks.{index}.{omi}": f"transformer_blocks.{index}.{t}" for omi, t in OMI_DOUBLE.items()}
    for index in range(single_blocks):
        names |= {
            f"single_blocks.{index}.{omi}": f"single_transformer_blocks.{index}.{t}" for omi, t in OMI_SINGLE.items()
        }
    return names


def omi(flux: Any) -> dict[str, torch.Tensor]:
    """Every Linear, its text encoders under `clip_l.`/`t5.`. Each pair has its module's widths: a name that
    reached another module would fail the shape check."""
    modules = dict(flux.transformer.named_modules())
    state_dict = {}
    for name, target in omi_names(19, 38).items():
        down, up = pair(modules[target].in_features, modules[target].out_features)
        state_dict |= {f"transformer.{name}.lora_down.weight": down, f"transformer.{name}.lora_up.weight": up}
        state_dict[f"transformer.{name}.alpha"] = torch.tensor(1.0)
    return state_dict | text_encoders("clip_l.", "t5.", False, flux, "lora_down.weight", "lora_up.weight")


def onetrainer_internal(flux: Any) -> dict[str, torch.Tensor]:
    state_dict = {}
    for key, tensor in peft(flux).items():
        state_dict[key.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up.")] = tensor
        state_dict[f"{key.rsplit('.lora_', 1)[0]}.alpha"] = torch.tensor(1.0)
    return state_dict


LAYOUTS: dict[str, tuple[Callable[[Any], dict], bool]] = {  # the file, and whether it trains the text encoders
    "diffusers/PEFT (ai-toolkit)": (peft, False),
    "kohya, in_dims": (lambda flux: kohya_bfl("lora_unet_", "_", "lora_down.weight", "lora_up.weight"), False),
    "kohya, in_dims, CLIP and T5 (lora_te1_, lora_te3_)": (
        lambda flux: {
            **kohya_bfl("lora_unet_", "_", "lora_down.weight", "lora_up.weight"),
            **text_encoders("lora_te1_", "lora_te3_", True, flux, "lora_down.weight", "lora_up.weight"),
        },
        True,
    ),
    "ComfyUI, kohya names, CLIP and T5": (
        lambda flux: {
            **kohya_bfl("diffusion_model.", ".", "lora_down.weight", "lora_up.weight"),
            **text_encoders(
                "text_encoders.clip_l.transformer.",
                "text_encoders.t5xxl.transformer.",
                False,
                flux,
                "lora_down.weight",
                "lora_up.weight",
            ),
        },
        True,
    ),
    "ComfyUI, PEFT names": (lambda flux: kohya_bfl("diffusion_model.", ".", "lora_A.weight", "lora_B.weight"), False),
    "CivitAI mixture": (mixture, False),
    "SimpleTuner checkpoint, two spellings": (lambda flux: simpletuner(flux, "transformer.", comfyui=False), False),
    "SimpleTuner ComfyUI export v3.1.6-v3.2.3": (
        lambda flux: simpletuner(flux, "diffusion_model.", comfyui=True),
        False,
    ),
    "OneTrainer OMI, CLIP and T5": (omi, True),
    "OneTrainer INTERNAL since 2026-07": (onetrainer_internal, False),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_complete_file_converts_and_matches_every_layer(flux: Any, layout: str) -> None:
    make, trains_text_encoders = LAYOUTS[layout]
    state_dict = spelled_as_read(make(flux), {}, "replicate_weights")
    to_load = check_lora_matches(flux, state_dict, "replicate_weights")
    adapted = {key.removeprefix("transformer.").rsplit(".lora_", 1)[0] for key in to_load if ".lora_" in key}
    assert adapted == linear_names(flux.transformer)  # all 504: blocks, modulations, embedders, final layer
    encoders = {"text_encoder": flux.text_encoder, "text_encoder_2": flux.text_encoder_2}
    parts = text_encoder_loras(state_dict, encoders, "replicate_weights")
    if trains_text_encoders:
        assert set(parts["text_encoder"].modules) == linear_names(flux.text_encoder)  # 72
        assert set(parts["text_encoder_2"].modules) == linear_names(flux.text_encoder_2)  # 168
    else:
        assert parts == {}


def test_the_counts_are_flux_s_own(flux: Any) -> None:
    """The numbers trainers document: 504 Linear layers in the transformer (494 in its blocks, which
    ai-toolkit trains), 304 modules in a default kohya LoRA, 240 in CLIP-L and T5-XXL together."""
    blocks = {name for name in linear_names(flux.transformer) if "transformer_blocks." in name}
    assert (len(linear_names(flux.transformer)), len(blocks)) == (504, 494)
    kohya = kohya_bfl("lora_unet_", "_", "lora_down.weight", "lora_up.weight", in_dims=False)
    assert len([key for key in kohya if key.endswith(".lora_down.weight")]) == 304
    assert len(linear_names(flux.text_encoder)) + len(linear_names(flux.text_encoder_2)) == 240


def test_a_bfl_control_lora_is_refused_as_what_it_is(flux: Any) -> None:
    """BFL's Canny/Depth LoRAs widen x_embedder from 64 to 128 input channels for the control image."""
    control = peft(flux)
    control["transformer.x_embedder.lora_A.weight"] = torch.empty(RANK, 128, device="meta")
    with pytest.raises(LoraFormatError, match="this is a FLUX.1 Canny or Depth control LoRA"):
        check_lora_matches(flux, control, "replicate_weights")


def fal_kontext() -> dict[str, torch.Tensor]:
    """fal's FLUX Kontext trainer: peft's `base_model.model.` over BFL names, every block's layers and the final
    layer's linear (what diffusers' `_convert_fal_kontext_lora_to_diffusers` reads, and nothing else), no alpha.
    Rank 1 with values, not meta tensors: without alphas diffusers' converters call `.item()` on their default."""
    shapes = kohya_bfl("base_model.model.", ".", "lora_A.weight", "lora_B.weight", in_dims=False)
    shapes |= dict(
        zip(
            ("base_model.model.final_layer.linear.lora_A.weight", "base_model.model.final_layer.linear.lora_B.weight"),
            pair(HIDDEN, 64),
            strict=True,
        )
    )
    generator = torch.Generator().manual_seed(0)
    return {
        key: torch.randn((1, t.shape[1]) if key.endswith(".lora_A.weight") else (t.shape[0], 1), generator=generator)
        for key, t in shapes.items()
        if not key.endswith(".alpha")
    }


def test_a_complete_fal_kontext_file_loads_as_diffusers_own_reader_loads_it(flux: Any) -> None:
    """diffusers reads this layout (FluxPipeline.lora_state_dict, for keys with "base_model") only when all 57
    blocks are there; then each layer must get the very same pair from both."""
    from diffusers import FluxPipeline

    state_dict = fal_kontext()
    ours = check_lora_matches(flux, spelled_as_read(state_dict, {}, "replicate_weights"), "replicate_weights")
    theirs = FluxPipeline.lora_state_dict(dict(state_dict))
    assert ours.keys() == theirs.keys()
    assert len({key.rsplit(".lora_", 1)[0] for key in ours}) == 19 * 14 + 38 * 6 + 1
    # Exact on any machine: without alphas both routes only copy, slice and multiply by exactly 1.0, no sums.
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)


def test_a_fal_kontext_file_with_blocks_missing_maps_what_is_there(flux: Any) -> None:
    """diffusers' reader needs every block (a KeyError otherwise); a file without some maps the rest."""
    from diffusers import FluxPipeline

    state_dict = {
        key: value
        for key, value in fal_kontext().items()
        if not key.startswith(("base_model.model.double_blocks.5.", "base_model.model.single_blocks.20."))
    }
    with pytest.raises(KeyError):
        FluxPipeline.lora_state_dict(dict(state_dict))
    to_load = check_lora_matches(flux, spelled_as_read(state_dict, {}, "replicate_weights"), "replicate_weights")
    adapted = {key.removeprefix("transformer.").rsplit(".lora_", 1)[0] for key in to_load}
    assert not any(name.startswith(("transformer_blocks.5.", "single_transformer_blocks.20.")) for name in adapted)
    assert len(adapted) == 18 * 14 + 37 * 6 + 1
