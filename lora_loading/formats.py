"""LoRA file formats: read a safetensors file, convert it to diffusers' layout, and check
it against the FLUX transformer before anything is applied.

diffusers' `FluxPipeline.lora_state_dict` converts kohya/sd-scripts (with alphas),
ComfyUI's `diffusion_model.` files in kohya naming, the CivitAI "mixture" layout and
XLabs; diffusers/PEFT files (ai-toolkit) need no conversion. What we add:
- ComfyUI files that use PEFT's `lora_A`/`lora_B` names with BFL's module names, which
  no diffusers converter recognises, are renamed to the kohya names its converter takes;
- every LoRA pair is matched against the transformer's layers, so a LoRA for another
  model is an error instead of a silent no-op, and shapes are checked before loading,
  because diffusers would otherwise *expand* the base weights to fit (its Flux Control path).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from diffusers import FluxPipeline

from errors import LoraFormatError
from lora_loading.text_encoders import split_text_encoder_keys, text_encoder_loras

log = logging.getLogger(__name__)

LORA_WEIGHT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


@dataclass(frozen=True)
class LoraFile:
    input_name: str  # the request input or setting it came from, for error messages
    key: str  # identifies the source: the same key means the same weights
    path: Path
    scale: float


def read_lora(lora: LoraFile) -> dict[str, torch.Tensor]:
    """Only safetensors are ever deserialised: a pickle can run code on load."""
    try:
        return safetensors.torch.load_file(str(lora.path))
    except Exception as error:
        raise LoraFormatError(
            f"Invalid {lora.input_name}: the file is not a readable .safetensors file ({error})."
        ) from error


def comfyui_peft_to_kohya(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight` (ComfyUI saves of PEFT
    LoRAs) -> `...lora_down.weight`, which diffusers' kohya converter handles. Only for
    files in BFL's naming; diffusers-named files keep their keys."""
    if not any(key.startswith("diffusion_model.") for key in state_dict) or any(
        ".lora_down." in key for key in state_dict
    ):
        return dict(state_dict)
    renamed = {}
    for key, tensor in state_dict.items():
        if key.startswith("diffusion_model."):
            key = key.replace(".lora_A.weight", ".lora_down.weight").replace(".lora_B.weight", ".lora_up.weight")
        renamed[key] = tensor
    return renamed


# Tensor kinds outside plain LoRA pairs and alphas, which no converter here applies yet: a file holding
# them is refused rather than applied in part.
UNSUPPORTED_KINDS = {
    ".diff_b": "bias deltas (.diff_b)",
    ".diff": "full weight deltas (.diff)",
    ".dora_scale": "DoRA magnitudes (.dora_scale)",
    ".lora_magnitude_vector": "DoRA magnitudes (.lora_magnitude_vector)",
    ".hada_": "LyCORIS LoHa (hada_*)",
    ".lokr_": "LyCORIS LoKr (lokr_*)",
    ".lora_mid.": "LoCon convolution weights (lora_mid)",
}
PLAIN_SUFFIXES = (*LORA_WEIGHT_SUFFIXES, ".lora_down.weight", ".lora_up.weight", ".alpha", ".down.weight", ".up.weight")


def refuse_unsupported_kinds(state_dict: dict[str, torch.Tensor], input_name: str) -> None:
    strange = [key for key in state_dict if not key.endswith(PLAIN_SUFFIXES)]
    if strange:
        kinds = sorted({kind for marker, kind in UNSUPPORTED_KINDS.items() for key in strange if marker in key})
        raise LoraFormatError(
            f"Invalid {input_name}: it holds tensors of kinds this predictor cannot apply yet "
            f"({', '.join(kinds) or 'unknown'}), and applying the rest would be another LoRA; "
            f"first: {', '.join(strange[:3])}."
        )


def mixture_to_peft(
    state_dict: dict[str, torch.Tensor], transformer: torch.nn.Module, input_name: str
) -> dict[str, torch.Tensor]:
    """CivitAI's "mixture" layout (`lora_transformer_<diffusers module, dots as underscores>` with kohya
    suffixes) in PEFT names, alpha/rank folded into A. diffusers' own converter maps the attention and
    embedder layers only and names an MLP or norm layer by its block, so those never applied."""
    prefix = "lora_transformer_"
    if not any(key.startswith(prefix) for key in state_dict):
        return state_dict
    layers = {
        name.replace(".", "_"): name
        for name, module in transformer.named_modules()
        if isinstance(getattr(module, "base_layer", module), torch.nn.Linear) and ".lora_" not in f".{name}"
    }
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    converted = {key: tensor for key, tensor in state_dict.items() if not key.startswith(prefix)}
    for key, tensor in state_dict.items():
        if key.startswith(prefix):
            flat, _, part = key[len(prefix) :].partition(".")
            grouped.setdefault(flat, {})[part] = tensor
    unmatched = [f"{prefix}{flat}" for flat in grouped if flat not in layers]
    if unmatched:
        raise LoraFormatError(
            f"Invalid {input_name}: {len(unmatched)} of its {len(grouped)} layers (CivitAI mixture layout) name no "
            f"FLUX.1 layer, so it was trained for another model; first: {', '.join(unmatched[:3])}."
        )
    for flat, parts in grouped.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise LoraFormatError(f"Invalid {input_name}: the layer {prefix}{flat} has only half of a LoRA pair.")
        down = parts["lora_down.weight"]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(down.shape[0])
        converted[f"transformer.{layers[flat]}.lora_A.weight"] = down.float() * (alpha / down.shape[0])
        converted[f"transformer.{layers[flat]}.lora_B.weight"] = parts["lora_up.weight"].float()
    return converted


def check_lora_matches(
    pipeline: FluxPipeline, state_dict: dict[str, torch.Tensor], input_name: str
) -> dict[str, torch.Tensor]:
    """Convert to diffusers' layout and check every LoRA pair against the transformer.

    Returns what to load into the transformer: its part of the converted state dict, with its
    alphas. The text encoders' tensors are matched and checked too (lora_loading/text_encoders.py),
    but applied apart, as dev and schnell share the encoders; a file may hold only those.
    """
    rest, text_encoder_part = split_text_encoder_keys(state_dict)
    encoders = {"text_encoder": pipeline.text_encoder, "text_encoder_2": pipeline.text_encoder_2}
    text_encoder_loras(text_encoder_part, encoders, input_name)
    if not rest and text_encoder_part:
        return {}
    refuse_unsupported_kinds(rest, input_name)
    rest = mixture_to_peft(rest, pipeline.transformer, input_name)
    try:
        converted, alphas = FluxPipeline.lora_state_dict(comfyui_peft_to_kohya(rest), return_alphas=True)
    except Exception as error:
        raise LoraFormatError(
            f"Invalid {input_name}: this file is not a FLUX LoRA in any supported format "
            f"(diffusers/PEFT, kohya, ComfyUI, CivitAI mixture, XLabs); first keys: {_first_keys(state_dict)}."
        ) from error
    # diffusers' kohya converter names the embedders and the final layer (kohya's in_dims, "train all
    # layers", every ComfyUI extract) without the "transformer." its own loader then filters on, so
    # they were dropped without a word. They are transformer modules: prefixed here, they apply.
    transformer_part = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in converted.items()}

    modules = dict(pipeline.transformer.named_modules())
    if "time_text_embed.guidance_embedder.linear_1" not in modules and any(
        ".guidance_embedder." in key for key in transformer_part
    ):
        raise LoraFormatError(
            f"Invalid {input_name}: this LoRA adapts the guidance embedder, which FLUX.1 schnell does not have; "
            "it was trained for FLUX.1 dev, so use model=dev."
        )
    to_load: dict[str, torch.Tensor] = {}
    unmatched = []
    for key, tensor in transformer_part.items():
        suffix = next((s for s in LORA_WEIGHT_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            continue
        module = modules.get(key[len("transformer.") : -len(suffix)])
        # A layer that already carries an adapter is a peft wrapper around the original.
        module = getattr(module, "base_layer", module)
        if not isinstance(module, torch.nn.Linear):
            unmatched.append(key)
            continue
        expected = module.in_features if suffix == ".lora_A.weight" else module.out_features
        got = tensor.shape[1] if suffix == ".lora_A.weight" else tensor.shape[0]
        if got != expected and key.startswith("transformer.x_embedder.") and got == 2 * expected:
            raise LoraFormatError(
                f"Invalid {input_name}: this is a FLUX.1 Canny or Depth control LoRA: it widens the image input "
                f"to {got} channels to take a control image, which this predictor does not take; use a style "
                "or subject LoRA."
            )
        if got != expected:
            raise LoraFormatError(
                f"Invalid {input_name}: tensor {key} has {got} features where this FLUX.1 model's layer has "
                f"{expected}; the LoRA was trained for a different model."
            )
        to_load[key] = tensor
    if not to_load:
        raise LoraFormatError(
            f"Invalid {input_name}: this LoRA matches no FLUX.1 layer; first keys: {_first_keys(state_dict)}."
        )
    if unmatched:
        # Applying the rest would be a different LoRA from the one asked for, and nobody reads the log.
        raise LoraFormatError(
            f"Invalid {input_name}: {len(unmatched)} of its {len(to_load) + len(unmatched)} LoRA tensors match no "
            f"FLUX.1 layer, so it was trained for another model; first: {', '.join(unmatched[:3])}."
        )
    # Alphas go back in under their own keys: load_lora_weights reads them from there.
    layers = {key.rsplit(".lora_", 1)[0] for key in to_load}
    to_load.update({k: v for k, v in (alphas or {}).items() if k.rsplit(".alpha", 1)[0] in layers})
    return to_load


def _first_keys(state_dict: dict[str, torch.Tensor], count: int = 3) -> str:
    return ", ".join(list(state_dict)[:count]) or "(the file holds no tensors)"
