"""Applying LoRAs to one FLUX pipeline: checked first, all-or-nothing, scaled exactly once.

diffusers + peft do the loading (`load_lora_weights`, with diffusers' converters for
kohya, XLabs and other layouts) and the scaling (`set_adapters`). Around them we add what
they lack for a server:
- a LoRA whose keys match no layer is an error, not a silent no-op;
- shapes are checked before the model is touched, because diffusers would otherwise
  *expand* the base weights to fit (its Flux Control path);
- a failure part-way unloads everything, so the base model is exactly as before;
- the scale goes through `set_adapters` only, never also through the attention kwargs,
  so the weight is base + s*dW (not s^2*dW).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from diffusers import FluxPipeline

from engine.inputs import InputError

log = logging.getLogger(__name__)

LORA_WEIGHT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


class LoraFormatError(InputError):
    """The file is not a LoRA this FLUX model can take; the message is meant for the caller."""


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


def check_lora_matches(
    pipeline: FluxPipeline, state_dict: dict[str, torch.Tensor], input_name: str
) -> dict[str, torch.Tensor]:
    """Convert to diffusers' layout and check every LoRA pair against the transformer.

    Returns what to load: the transformer part of the converted state dict, with its alphas. Text-encoder keys are
    dropped with a warning: the text encoders are shared between dev and schnell, so a
    LoRA on them would leak from one model's state into the other's.
    """
    try:
        converted, alphas = FluxPipeline.lora_state_dict(dict(state_dict), return_alphas=True)
    except Exception as error:
        raise LoraFormatError(
            f"Invalid {input_name}: this file is not a FLUX LoRA in any supported format "
            f"(diffusers/PEFT, kohya, XLabs); first keys: {_first_keys(state_dict)} ({error})."
        ) from error
    transformer_part = {k: v for k, v in converted.items() if k.startswith("transformer.")}
    dropped = len(converted) - len(transformer_part)
    if dropped:
        log.warning("%s: dropped %d text-encoder LoRA tensors; only the transformer is adapted.", input_name, dropped)

    modules = dict(pipeline.transformer.named_modules())
    matched, unmatched = 0, 0
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
        matched += 1
    if matched == 0:
        raise LoraFormatError(
            f"Invalid {input_name}: this LoRA matches no FLUX.1 layer; first keys: {_first_keys(state_dict)}."
        )
    if unmatched:
        log.warning(
            "%s: %d of %d LoRA tensors match no FLUX.1 layer and are ignored.",
            input_name,
            unmatched,
            matched + unmatched,
        )
    # Alphas go back in under their own keys: load_lora_weights reads them from there.
    transformer_alphas = {k: v for k, v in (alphas or {}).items() if k.startswith("transformer.")}
    return {**transformer_part, **transformer_alphas}


def _first_keys(state_dict: dict[str, torch.Tensor], count: int = 3) -> str:
    return ", ".join(list(state_dict)[:count]) or "(the file holds no tensors)"


class LoraAdapters:
    """The LoRA state of one pipeline (dev and schnell each have their own)."""

    def __init__(self, pipeline: FluxPipeline):
        self.pipeline = pipeline
        self.loaded_keys: tuple[str, ...] = ()

    def apply(self, loras: Sequence[LoraFile]) -> None:
        keys = tuple(lora.key for lora in loras)
        if keys != self.loaded_keys:
            self._reload(loras)
        if loras:
            # The only place a scale is applied; the pipeline call gets no attention "scale".
            self.pipeline.set_adapters(list(self._names(loras)), [lora.scale for lora in loras])

    def _reload(self, loras: Sequence[LoraFile]) -> None:
        self.unload()
        try:
            for name, lora in zip(self._names(loras), loras, strict=True):
                state_dict = read_lora(lora)
                transformer_part = check_lora_matches(self.pipeline, state_dict, lora.input_name)
                self.pipeline.load_lora_weights(transformer_part, adapter_name=name)
        except BaseException:
            # All-or-nothing: peft removes its layers and restores the original modules,
            # so the transformer is bit-for-bit the base model again.
            self.unload()
            raise
        self.loaded_keys = tuple(lora.key for lora in loras)

    def unload(self) -> None:
        if self.loaded_keys or self.pipeline.get_list_adapters():
            self.pipeline.unload_lora_weights()
        self.loaded_keys = ()

    @staticmethod
    def _names(loras: Sequence[LoraFile]) -> list[str]:
        return [f"lora_{index}" for index in range(len(loras))]
