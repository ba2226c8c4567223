"""LoRAs on the compiled fast transformer: weights written into a fixed LoRA slot.

Loading and unloading peft adapters changes the module graph, and peft's `set_adapters`
writes Python floats over the scalings: both make torch.compile recompile (seen with
diffusers' own hotswap, which also pads ranks, but still scales through set_adapters or a
single global attention "scale" that cannot give main and extra LoRA different scales).
So the fast transformer carries one peft adapter, the slot, on every Linear layer, set up
before compiling, and a request only writes tensors into it:
- the LoRAs' ranks are stacked along the slot's rank: A = [A1; A2], B = [s1*B1, s2*B2],
  which is exactly base + s1*dW1 + s2*dW2 with the scale applied once;
- unused rank rows and layers hold zeros, and with no LoRA the slot is switched off, so
  the base weights are never touched and come back exactly;
- everything is computed before the first copy, so a failure leaves the slot as it was,
  and a write cut short (a cancel) marks the slot unknown, so the next request rewrites it;
- a request that wants what the slot already holds writes nothing;
- a request with no LoRA pair for the transformer switches the slot off, so it costs nothing.
On the go_fast copy (lora_loading/merged.py `FastLoras`) a LoRA whose rank does not fit grows the
slot to the next power of two, which costs one recompile (logged), and what is not a LoRA pair
is merged into the quantized weights. The compiled standard transformer carries a slot too, of
a fixed rank (`SlotOrAdapters`): what it cannot hold runs eager through peft adapters beside it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from diffusers import FluxPipeline
from peft import LoraConfig

from lora_loading.adapters import LoraAdapters
from lora_loading.deltas import ParameterDeltas
from lora_loading.formats import DORA_MAGNITUDE, LoraFile, match_lora, read_lora, standard_path_reason

log = logging.getLogger(__name__)
SLOT = "slot"

# A LoRA as factors per layer: (A, B) with B already multiplied by its alpha/rank.
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def add_lora_slot(transformer: torch.nn.Module, rank: int) -> None:
    targets = [name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)]
    # init_lora_weights=True makes B zero: until a LoRA is written the slot adds nothing.
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), adapter_name=SLOT)
    transformer.disable_adapters()


def slot_layers(transformer: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: module for name, module in transformer.named_modules() if SLOT in getattr(module, "lora_A", {})}


def slot_rank(transformer: torch.nn.Module) -> int:
    return next(iter(slot_layers(transformer).values())).r[SLOT]


def lora_factors(to_load: dict[str, torch.Tensor]) -> Factors:
    """diffusers-layout LoRA tensors (with optional `.alpha` keys) -> per-layer factors."""
    factors: Factors = {}
    for key, down in to_load.items():
        if not key.endswith(".lora_A.weight"):
            continue
        layer = key[len("transformer.") : -len(".lora_A.weight")]
        up = to_load[key.replace(".lora_A.weight", ".lora_B.weight")]
        alpha = to_load.get(f"transformer.{layer}.alpha")
        scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
        factors[layer] = (down.float(), up.float() * scale)
    return factors


class LoraSlots:
    """The LoRA state of one pipeline whose transformer carries a slot; the same `apply` as LoraAdapters.
    `grow`: a request wider than the slot grows it (go_fast), or is refused here (`cannot_hold`)."""

    def __init__(self, pipeline: FluxPipeline, in_place: ParameterDeltas | None = None, grow: bool = True):
        self.pipeline = pipeline
        self.grow = grow
        # Shared with the model's standard path (the fast copy shares its biases): a go_fast request
        # wants the original biases, so it puts back whatever a standard-path request added.
        self.in_place = in_place or ParameterDeltas()
        self.factors: dict[str, Factors] = {}  # by source key: a scale change reads no file
        self.written: tuple[tuple[str, float], ...] | None = None  # what the slot holds

    def cannot_hold(self, loras: Sequence[LoraFile]) -> str | None:
        """Why these LoRAs cannot go into the slot, or None: kinds other than LoRA pairs (read from the
        files' headers), or, for a slot that does not grow, ranks that add up to more than it has."""
        for lora in loras:
            reason = standard_path_reason(lora.path)
            if reason:
                return f"{lora.input_name} has {reason}"
        if not self.grow:
            rank, room = sum(_rank(self._factors(lora)) for lora in loras), slot_rank(self.pipeline.transformer)
            if rank > room:
                return f"the LoRAs' ranks add up to {rank}, more than the LoRA slot's {room} (FLUX_LORA_SLOT_RANK)"
        return None

    def switch_off(self) -> None:
        """The slot out of the computation, its content kept: peft adapters beside it take over."""
        self.pipeline.transformer.disable_adapters()

    def apply(self, loras: Sequence[LoraFile]) -> str | None:
        """Writes `loras` into the slot; None: the compiled graphs take any slot content (see SlotOrAdapters)."""
        self.in_place.restore()
        self.hold([(lora.key, self._factors(lora), lora.scale) for lora in loras])
        # Keep only what this request uses, so memory does not grow with every LoRA seen.
        self.factors = {lora.key: self.factors[lora.key] for lora in loras}
        return None

    def hold(self, entries: Sequence[tuple[str, Factors, float]]) -> None:
        """Writes LoRA pairs, (key, factors, scale) each, into the slot. With none, or none that touches a
        transformer layer (a text-encoder LoRA, or one merged elsewhere), the slot is off: it costs nothing."""
        transformer = self.pipeline.transformer
        if not any(factors for _, factors, _ in entries):
            transformer.disable_adapters()
            return
        wanted = tuple((key, scale) for key, _, scale in entries)
        stacked = [(factors, scale) for _, factors, scale in entries]
        widths = [_rank(factors) for factors, _ in stacked]
        if sum(widths) > slot_rank(transformer) and self.grow:
            # Powers of two: a server sees only a few slot ranks, so a few compiled graphs.
            grown = 1 << (sum(widths) - 1).bit_length()
            log.warning(
                "go_fast: LoRA rank %d exceeds the slot's %d; growing it to %d (one recompile).",
                sum(widths),
                slot_rank(transformer),
                grown,
            )
            transformer.unload_lora()  # back to the plain (quantized) Linear layers
            add_lora_slot(transformer, grown)
            self.written = None
        # The slot already holds these LoRAs at these scales: a repeat request writes nothing.
        if wanted != self.written:
            self.written = None  # until the write completes, the slot's content is unknown
            self._write(stacked, widths)
            self.written = wanted
        transformer.enable_adapters()

    def _factors(self, lora: LoraFile) -> Factors:
        if lora.key not in self.factors:
            to_load, changes = match_lora(self.pipeline, read_lora(lora), lora.input_name)
            if changes or any(key.endswith(DORA_MAGNITUDE) for key in to_load):
                # cannot_hold sends these to peft's adapters (standard_path_reason): the slot holds pairs only.
                raise RuntimeError(f"{lora.input_name}: in-place deltas or DoRA reached the LoRA slot")
            self.factors[lora.key] = lora_factors(to_load)
        return self.factors[lora.key]

    @torch.no_grad()
    def _write(self, stacked: list[tuple[Factors, float]], widths: list[int]) -> None:
        layers = slot_layers(self.pipeline.transformer)
        writes = []
        for name, module in layers.items():
            slot_down = module.lora_A[SLOT].weight
            slot_up = module.lora_B[SLOT].weight
            down = torch.zeros(slot_down.shape, dtype=torch.float32, device=slot_down.device)
            up = torch.zeros(slot_up.shape, dtype=torch.float32, device=slot_up.device)
            offset = 0
            for (factors, scale), width in zip(stacked, widths, strict=True):
                if name in factors:
                    lora_down, lora_up = factors[name]
                    rank = lora_down.shape[0]
                    down[offset : offset + rank] = lora_down.to(down.device)
                    up[:, offset : offset + rank] = lora_up.to(up.device) * scale
                offset += width
            writes.append((slot_down, down.to(slot_down.dtype)))
            writes.append((slot_up, up.to(slot_up.dtype)))
        for target, value in writes:
            target.copy_(value)


def _rank(factors: Factors) -> int:
    """The rows a LoRA takes in the slot: its widest layer's rank."""
    return max((down.shape[0] for down, _ in factors.values()), default=0)  # 0: the file adapts only text encoders


class SlotOrAdapters:
    """The LoRA state of a compiled standard pipeline: the slot (a fixed rank, FLUX_LORA_SLOT_RANK) for LoRA
    pairs that fit, so LoRA switches never recompile; anything else (in-place deltas, LoKr, DoRA, a wider
    rank) through peft adapters beside it (LoraAdapters), which changes the modules, so the engine runs
    that request eager (`apply` says why). Both put the base back exactly: the slot is zero or switched off,
    the adapters are deleted and the in-place changes restored."""

    def __init__(self, pipeline: FluxPipeline, in_place: ParameterDeltas | None = None):
        in_place = in_place or ParameterDeltas()
        self.slots = LoraSlots(pipeline, in_place, grow=False)
        self.adapters = LoraAdapters(pipeline, in_place)

    def apply(self, loras: Sequence[LoraFile]) -> str | None:
        """Applies `loras`; returns why this request cannot run the compiled blocks, or None."""
        reason = self.slots.cannot_hold(loras)
        if reason is None:
            self.adapters.unload()
            # The slot active again after any peft adapters beside it. diffusers' set_adapter gives every layer
            # one shared list, which dynamo's guards check by identity across layers; peft's delete_adapter,
            # after a fallback, gives each layer its own (measured: a recompile per block without this).
            self.slots.pipeline.transformer.set_adapter(SLOT)
            self.slots.apply(loras)
            return None
        self.slots.switch_off()
        self.adapters.apply(loras)
        return reason

    def unload(self) -> None:
        self.adapters.unload()
        self.slots.apply([])
