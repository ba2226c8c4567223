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
    try:
        converted, alphas = FluxPipeline.lora_state_dict(comfyui_peft_to_kohya(rest), return_alphas=True)
    except Exception as error:
        raise LoraFormatError(
            f"Invalid {input_name}: this file is not a FLUX LoRA in any supported format "
            f"(diffusers/PEFT, kohya, ComfyUI, CivitAI mixture, XLabs); first keys: {_first_keys(state_dict)}."
        ) from error
    transformer_part = {k: v for k, v in converted.items() if k.startswith("transformer.")}

    modules = dict(pipeline.transformer.named_modules())
    if "time_text_embed.guidance_embedder.linear_1" not in modules and any(
        ".guidance_embedder." in key for key in transformer_part
    ):
        raise LoraFormatError(
            f"Invalid {input_name}: this LoRA adapts the guidance embedder, which FLUX.1 schnell does not have; "
            "it was trained for FLUX.1 dev, so use model=dev."
        )
    to_load: dict[str, torch.Tensor] = {}
    unmatched = 0
    for key, tensor in transformer_part.items():
        suffix = next((s for s in LORA_WEIGHT_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            continue
        module = modules.get(key[len("transformer.") : -len(suffix)])
        # A layer that already carries an adapter is a peft wrapper around the original.
        module = getattr(module, "base_layer", module)
        if not isinstance(module, torch.nn.Linear):
            unmatched += 1
            continue
        expected = module.in_features if suffix == ".lora_A.weight" else module.out_features
        got = tensor.shape[1] if suffix == ".lora_A.weight" else tensor.shape[0]
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
        # Loaded as they are, peft would reject the whole file for keys it cannot place.
        log.warning(
            "%s: %d of %d LoRA tensors match no FLUX.1 layer and are ignored.",
            input_name,
            unmatched,
            len(to_load) + unmatched,
        )
    # Alphas go back in under their own keys: load_lora_weights reads them from there.
    layers = {key.rsplit(".lora_", 1)[0] for key in to_load}
    to_load.update({k: v for k, v in (alphas or {}).items() if k.rsplit(".alpha", 1)[0] in layers})
    return to_load


def _first_keys(state_dict: dict[str, torch.Tensor], count: int = 3) -> str:
    return ", ".join(list(state_dict)[:count]) or "(the file holds no tensors)"
