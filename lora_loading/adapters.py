"""Applying LoRAs: all-or-nothing, scaled exactly once, and exactly undone.

- `LoraAdapters`: one model's transformer (dev and schnell each have their own);
- `TextEncoderLoras`: the text encoders the two models share, set from every request;
- bias and weight deltas (`.diff_b`, `.diff`, LoKr) and the DoRAs peft cannot hold go through
  lora_loading/deltas.py: changed in place and put back bit for bit.

diffusers + peft do the loading (`load_lora_weights`) and the scaling (`set_adapters`).
Around them we add what a server needs:
- a failure part-way unloads everything, so the base model is exactly as before;
- the scale goes through `set_adapters` only, never also through the attention kwargs,
  so the weight is base + s*dW (not s^2*dW);
- removing all LoRAs unloads them (peft restores the original modules), which gives the
  base model's exact bytes, where fuse/unfuse would drift.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence

import torch
from diffusers import FluxPipeline
from diffusers.utils.peft_utils import recurse_remove_peft_layers
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer

from errors import LoraFormatError
from lora_loading.deltas import Change, ParameterDeltas, Placed
from lora_loading.formats import LoraFile, match_lora, read_lora
from lora_loading.text_encoders import EncoderLora, linear_layers, text_encoder_loras

log = logging.getLogger(__name__)
ADAPTER_PREFIX = "lora_"  # the transformer adapters LoraAdapters names and removes; others are not its own


def placed(model: torch.nn.Module, changes: dict[tuple[str, ...], Change], index: int) -> list[Placed]:
    """Each change with the parameters it names (`<module>.weight`/`.bias`): the base layer's own under a
    peft wrapper, which loading and unloading adapters leave in place. Resolved once per load, not per
    request."""
    layers = linear_layers(model)

    def parameter(name: str) -> torch.nn.Parameter:
        module, attribute = name.rsplit(".", 1)
        return getattr(layers.get(module) or model.get_submodule(module), attribute)

    return [(tuple(map(parameter, names)), change, index) for names, change in changes.items()]


class LoraAdapters:
    """The LoRA state of one pipeline's transformer (dev and schnell each have their own).

    Transformer-level calls only: the pipeline-level ones (`set_adapters`, `unload_lora_weights`)
    also act on the text encoders, which both models share and TextEncoderLoras keeps."""

    def __init__(self, pipeline: FluxPipeline, in_place: ParameterDeltas | None = None):
        self.pipeline = pipeline
        self.in_place = in_place or ParameterDeltas()
        self.loaded_keys: tuple[str, ...] = ()
        self.adapters: list[tuple[str, int]] = []  # (adapter name, index of its LoRA) for files with a transformer part
        self.changes: list[Placed] = []  # made in place (deltas.py), each following its LoRA's scale

    def apply(self, loras: Sequence[LoraFile]) -> str | None:
        """Applies `loras`; None, as every LoRA state's `apply` says why a request must run eager (SlotOrAdapters):
        these adapters are on a transformer that is not compiled."""
        keys = tuple(lora.key for lora in loras)
        if keys != self.loaded_keys:
            self._reload(loras)
        transformer = self.pipeline.transformer
        # A LoRA at scale 0 is left out rather than scaled by 0: for a DoRA, peft's scale multiplies only
        # the low-rank update inside its normalisation, so 0 would still change the weights.
        active = [(name, index) for name, index in self.adapters if loras[index].scale != 0]
        if active:
            transformer.enable_adapters()
            # The only place a scale is applied; the pipeline call gets no attention "scale".
            transformer.set_adapters([name for name, _ in active], [loras[index].scale for _, index in active])
        elif self.adapters:
            transformer.disable_adapters()
        self.in_place.set_scaled(self.changes, [lora.scale for lora in loras])
        return None

    def _reload(self, loras: Sequence[LoraFile]) -> None:
        self.unload()
        try:
            for index, lora in enumerate(loras):
                transformer_part, changes = match_lora(self.pipeline, read_lora(lora), lora.input_name)
                if transformer_part:  # empty for a file that adapts only the text encoders or biases
                    name = f"{ADAPTER_PREFIX}{index}"
                    self.pipeline.load_lora_weights(transformer_part, adapter_name=name)
                    self.adapters.append((name, index))
                self.changes += placed(self.pipeline.transformer, changes, index)
        except BaseException:
            # All-or-nothing: peft removes its layers and restores the original modules,
            # so the transformer is bit-for-bit the base model again.
            self.unload()
            raise
        self.loaded_keys = tuple(lora.key for lora in loras)

    def unload(self) -> None:
        transformer = self.pipeline.transformer
        configs = getattr(transformer, "peft_config", None) or {}
        own = [name for name in configs if name.startswith(ADAPTER_PREFIX)]
        if len(own) < len(configs):  # beside a LoRA slot (lora_loading/slots.py), which stays
            if own:
                transformer.delete_adapters(own)
        elif self.loaded_keys or own:
            transformer.unload_lora()
        self.in_place.restore()
        self.adapters = []
        self.changes = []
        self.loaded_keys = ()


class TextEncoderLoras:
    """The LoRA state of the shared text encoders, set from each request's LoRAs, whichever model it runs."""

    def __init__(self, models: dict[str, torch.nn.Module]):
        self.models = models  # by attribute: text_encoder, text_encoder_2
        self.loaded_keys: tuple[str, ...] = ()
        self.adapters: dict[str, list[tuple[str, int]]] = {}  # by encoder: (adapter name, index of its LoRA)
        self.changes: list[Placed] = []  # made in place (deltas.py), each following its LoRA's scale
        self.in_place = ParameterDeltas()

    def apply(self, loras: Sequence[LoraFile]) -> None:
        keys = tuple(lora.key for lora in loras)
        if keys != self.loaded_keys:
            self._reload(loras)
        for attribute, adapters in self.adapters.items():
            for module in self.models[attribute].modules():
                if isinstance(module, LoraLayer):
                    for name, index in adapters:
                        if name in module.scaling:
                            module.set_scale(name, loras[index].scale)
        self.in_place.set_scaled(self.changes, [lora.scale for lora in loras])

    def _reload(self, loras: Sequence[LoraFile]) -> None:
        self.unload()
        try:
            for index, lora in enumerate(loras):
                for attribute, part in text_encoder_loras(read_lora(lora), self.models, lora.input_name).items():
                    for skipped in part.skipped:
                        log.warning("%s: skipped the LoRA layer %s.", lora.input_name, skipped)
                    if part.modules:
                        name = f"text_lora_{index}"
                        self._inject(attribute, name, part)
                        self.adapters.setdefault(attribute, []).append((name, index))
                    self.changes += placed(self.models[attribute], part.deltas, index)
            for attribute, adapters in self.adapters.items():
                names = [name for name, _ in adapters]
                for module in self.models[attribute].modules():
                    if isinstance(module, LoraLayer):
                        module.set_adapter([name for name in names if name in module.lora_A])
        except BaseException:
            self.unload()
            raise
        self.loaded_keys = tuple(lora.key for lora in loras)
        for attribute, adapters in self.adapters.items():
            log.info("LoRA on the %s: %d adapter(s).", attribute, len(adapters))

    def _inject(self, attribute: str, name: str, part: EncoderLora) -> None:
        model = self.models[attribute]
        ranks = {module: down.shape[0] for module, (down, _) in part.modules.items()}
        config = LoraConfig(
            r=max(ranks.values()),
            lora_alpha=max(ranks.values()),
            target_modules=sorted(ranks),
            # Full module names (peft matches them as suffixes); alpha = rank, as alpha/rank is folded into A.
            rank_pattern={re.escape(module): rank for module, rank in ranks.items()},
            alpha_pattern={re.escape(module): rank for module, rank in ranks.items()},
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft's note that the model already holds another adapter
            inject_adapter_in_model(config, model, adapter_name=name)
        weights = {}
        for module, (down, up) in part.modules.items():
            weights[f"{module}.lora_A.weight"] = down
            weights[f"{module}.lora_B.weight"] = up
        result = set_peft_model_state_dict(model, weights, adapter_name=name)
        missing = [key for key in getattr(result, "missing_keys", []) if f".{name}." in key and "lora_" in key]
        if missing:
            raise LoraFormatError(f"the {attribute} adapter could not be placed: {', '.join(missing[:3])}")

    def unload(self) -> None:
        """peft's layers out, the original modules back: the base encoders' exact outputs."""
        for model in self.models.values():
            if getattr(model, "peft_config", None) is not None or any(
                isinstance(module, LoraLayer) for module in model.modules()
            ):
                recurse_remove_peft_layers(model)
                if getattr(model, "peft_config", None) is not None:
                    del model.peft_config
                model._hf_peft_config_loaded = None
        self.in_place.restore()
        self.adapters = {}
        self.changes = []
        self.loaded_keys = ()
