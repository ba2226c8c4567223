"""Applying LoRAs to one FLUX pipeline: all-or-nothing, scaled exactly once.

diffusers + peft do the loading (`load_lora_weights`) and the scaling (`set_adapters`).
Around them we add what a server needs:
- a failure part-way unloads everything, so the base model is exactly as before;
- the scale goes through `set_adapters` only, never also through the attention kwargs,
  so the weight is base + s*dW (not s^2*dW);
- removing all LoRAs unloads them (peft restores the original modules), which gives the
  base model's exact bytes, where fuse/unfuse would drift.
"""

from __future__ import annotations

from collections.abc import Sequence

from diffusers import FluxPipeline

from lora_loading.formats import LoraFile, check_lora_matches, read_lora


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
