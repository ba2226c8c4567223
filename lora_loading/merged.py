"""go_fast's LoRAs: LoRA pairs in the fp8 copy's slot, everything else merged into its quantized weights.

Every LoRA is one thing here: per-module updates of the transformer's parameters (lora_loading/deltas.py),
from the same conversion the standard path uses (`match_lora`). What the go_fast copy does with them:
- LoRA pairs go into its LoRA slot (lora_loading/slots.py), unmerged, in bf16 (FLUX_FAST_LORA=slot, the
  default); with FLUX_FAST_LORA=merged they are merged like the rest, and the copy has no slot;
- everything else (DoRAs recomposed, LoKr, `.diff`) is merged: each Linear weight's update goes into the
  quantized copy as quantize(W + Σ sᵢ·ΔWᵢ), from the bf16 weight W the copy was built from; what the copy
  shares with the bf16 model (biases, so `.diff_b`; norms; layers torchao left alone) changes in place, as
  on the standard path. Layers the previous request changed and this one does not go back to quantize(W),
  the copy's own bytes. Same shapes and dtypes: nothing recompiles.

Why pairs stay in the slot by default, measured (README, "go_fast and LoRAs"; bench/fp8_lora_fidelity.py):
merged images sit as close to bf16-with-LoRA as the fp8 base sits to the bf16 base, but at scale 1 the
LoRA's own effect came out with a cosine of 0.87-0.89 against bf16's (the slot: 0.95-0.97), under the 0.9
this project set; at scale 2 both pass. Merging is the faster mechanism (no extra work per step), and
the setting to take once a GPU run on real weights shows the effect holds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import FluxPipeline

from lora_loading.adapters import placed
from lora_loading.deltas import Change, Delta, ParameterDeltas, Placed, QuantizedCopies, Recomposed
from lora_loading.formats import DORA_MAGNITUDE, LoraFile, match_lora, read_lora
from lora_loading.slots import Factors, LoraSlots, lora_factors


def dense_updates(to_load: dict[str, torch.Tensor]) -> dict[tuple[str, ...], Change]:
    """What peft would hold for a LoRA (diffusers-layout pairs, alphas, DoRA magnitudes) as per-layer
    changes: B·A·alpha/rank at scale 1, or with a magnitude, that update recomposed per output row as
    peft's DoRA layer computes it (its norm over each row of W + s·B·A)."""
    updates: dict[tuple[str, ...], Change] = {}
    for layer, (down, up) in lora_factors(to_load).items():  # alpha/rank folded into `up`
        update = Delta(factors=(up, down), op="mm")
        magnitude = to_load.get(f"transformer.{layer}{DORA_MAGNITUDE}")
        updates[(f"{layer}.weight",)] = (
            update if magnitude is None else Recomposed(update, magnitude.float().reshape(-1, 1), per_column=False)
        )
    return updates


class FastLoras:
    """The LoRA state of a model's go_fast copy; the same `apply` as the standard path's states.

    `pipeline` is the standard pipeline: LoRAs are matched and placed against its bf16 transformer, whose
    weights the copy quantizes. `in_place` is that model's shared state for tensors both transformers hold
    (biases, norms); `quantized` writes the copy's quantized weights; `slot`, where the copy has one, holds
    the LoRA pairs (None: they are merged too)."""

    def __init__(
        self, pipeline: FluxPipeline, in_place: ParameterDeltas, quantized: QuantizedCopies, slot: LoraSlots | None
    ):
        self.pipeline = pipeline
        self.in_place = in_place
        self.quantized = quantized
        self.merged = ParameterDeltas(quantized)
        self.slot = slot
        self.loaded_keys: tuple[str, ...] = ()
        self.into_copy: list[Placed] = []  # merged into the quantized weights, each following its LoRA's scale
        self.shared: list[Placed] = []  # changed in place on the tensors the copy shares with the bf16 model
        self.pairs: list[Factors] = []  # by LoRA: what goes into the slot

    def apply(self, loras: Sequence[LoraFile]) -> str | None:
        """Applies `loras`; None: the compiled blocks take any slot content and weights (every LoRA state
        says why a request must run eager)."""
        keys = tuple(lora.key for lora in loras)
        if keys != self.loaded_keys:
            self._convert(loras)
        scales = [lora.scale for lora in loras]
        try:
            # In place first: it puts back whatever the standard path changed in the bf16 weights, which the
            # merged weights are computed from.
            self.in_place.set_scaled(self.shared, scales)
            self.merged.set_scaled(self.into_copy, scales)
            if self.slot is not None:
                self.slot.hold([(lora.key, pairs, lora.scale) for lora, pairs in zip(loras, self.pairs, strict=True)])
        except BaseException:
            # Nothing of a failed request stays applied: `merged` restored itself, the slot marked what it holds
            # unknown.
            self.in_place.restore()
            self.merged.restore()
            raise
        return None

    def _convert(self, loras: Sequence[LoraFile]) -> None:
        """Read and matched once per set of files: a scale change reads nothing."""
        self.loaded_keys, self.into_copy, self.shared, self.pairs = (), [], [], []
        changes: list[Placed] = []
        pairs: list[Factors] = []
        transformer = self.pipeline.transformer
        for index, lora in enumerate(loras):
            to_load, in_place = match_lora(self.pipeline, read_lora(lora), lora.input_name)
            # Pairs go into the slot, where there is one, except a DoRA's, which are recomposed and merged.
            dora = {key.removesuffix(DORA_MAGNITUDE) for key in to_load if key.endswith(DORA_MAGNITUDE)}
            in_slot = {} if self.slot is None else {k: v for k, v in to_load.items() if _layer(k) not in dora}
            merged = {key: tensor for key, tensor in to_load.items() if key not in in_slot}
            # In-place changes first, as on the standard path, where peft's layers apply over them.
            changes += placed(transformer, in_place, index) + placed(transformer, dense_updates(merged), index)
            pairs.append(lora_factors(in_slot))
        into_copy = [change for change in changes if all(map(self.quantized.holds, change[0]))]
        self.shared = [change for change in changes if not all(map(self.quantized.holds, change[0]))]
        self.loaded_keys, self.into_copy, self.pairs = tuple(lora.key for lora in loras), into_copy, pairs


def _layer(key: str) -> str:
    """`transformer.<module>` from any of its LoRA keys: `.lora_A.weight`, `.lora_magnitude_vector`, `.alpha`."""
    return key.rsplit(".lora_", 1)[0].removesuffix(".alpha")
