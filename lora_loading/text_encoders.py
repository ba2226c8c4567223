"""Text-encoder LoRAs: FLUX's CLIP-L and T5-XXL, which dev and schnell share.

diffusers 0.42's Flux loader falls short here in three ways:
- it drops T5 tensors (kohya `lora_te3_`, OneTrainer `lora_te2_`, ComfyUI `t5xxl`), some of them
  without a message;
- it names CLIP's modules as older transformers did (`text_model.` first);
- it loads CLIP adapters into the pipeline's text encoder beside the transformer's, and
  `unload_lora_weights` removes them with the transformer's, so dev's and schnell's states
  would mix in the encoders they share.

So the encoders' LoRAs are read here, in every layout trainers write, and applied by
`adapters.TextEncoderLoras`: one state for the shared encoders, set from each request's LoRAs
whatever model it asks for.

Layouts, per encoder (kohya names are flattened module paths, the others dotted):
- CLIP-L: kohya `lora_te1_` / `lora_te_`, diffusers `text_encoder.`, ComfyUI `text_encoders.clip_l.transformer.`,
  OneTrainer's OMI layout `clip_l.`;
- T5-XXL: kohya `lora_te3_`, OneTrainer `lora_te2_`, diffusers `text_encoder_2.`, ComfyUI
  `text_encoders.t5xxl.transformer.`, OneTrainer's OMI layout `t5.`.
Tensors `.lora_down.weight`/`.lora_A.weight` (A), `.lora_up.weight`/`.lora_B.weight` (B), `.alpha`,
`.diff_b` and `.diff` (bias and weight deltas: ComfyUI's extract writes the norms' weights so), LyCORIS
LoKr factors and DoRA magnitudes (`.dora_scale`, `.lora_magnitude_vector`). A LoRA pair on a layer that is
not Linear (ComfyUI extracts the token and position embeddings so) becomes a weight delta, and a DoRA
is recomposed into the weight (deltas.Recomposed). Anything else under an encoder's prefix refuses the file,
naming the keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from errors import LoraFormatError
from lora_loading.deltas import Change, Delta, Recomposed
from lora_loading.lycoris import LOKR_PARTS, lokr_factors


@dataclass(frozen=True)
class Encoder:
    attribute: str  # the pipelines' component name
    label: str  # for messages
    kohya_prefixes: tuple[str, ...]  # flattened module names follow
    dotted_prefixes: tuple[str, ...]  # dotted module names follow
    legacy_prefix: str = ""  # a module-name prefix LoRA files carry and transformers 5's modules lack
    # Layers other models' encoders have and FLUX.1's pipelines never run, with why: skipped, and logged.
    unused: tuple[tuple[str, str], ...] = ()


CLIP = Encoder(
    "text_encoder",
    "CLIP-L text encoder",
    ("lora_te1_", "lora_te_"),
    ("text_encoder.", "text_encoders.clip_l.transformer.", "clip_l."),
    legacy_prefix="text_model.",
    # ComfyUI's CLIP-L has it, and its extract writes a LoRA for it; FLUX.1 takes CLIP's pooled output
    # before any projection (transformers' CLIPTextModel, as ComfyUI's FLUX.1 text encoder also does).
    unused=(("text_projection", "FLUX.1 takes CLIP-L's pooled output before that projection"),),
)
T5 = Encoder(
    "text_encoder_2",
    "T5-XXL text encoder",
    ("lora_te3_", "lora_te2_"),
    ("text_encoder_2.", "text_encoders.t5xxl.transformer.", "t5."),
)
ENCODERS = (CLIP, T5)
PARTS = {
    ".lora_down.weight": "A",
    ".lora_A.weight": "A",
    ".lora_up.weight": "B",
    ".lora_B.weight": "B",
    ".alpha": "alpha",
    ".diff_b": "bias",  # ComfyUI's bias delta: bias += scale x delta
    ".diff": "weight",  # ComfyUI's weight delta: weight += scale x delta
    ".dora_scale": "dora",  # kohya/LyCORIS DoRA magnitudes, per output row or input column
    ".lora_magnitude_vector": "dora",  # peft's, per output row
    **{suffix: suffix for suffix in LOKR_PARTS},
}


@dataclass
class EncoderLora:
    """One file's LoRA for one encoder: per Linear module peft wraps, (A with alpha/rank folded in, B); and
    what is changed in the parameters in place (deltas.py)."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    deltas: dict[tuple[str, ...], Change] = field(default_factory=dict)  # by the parameter names each takes
    skipped: list[str] = field(default_factory=list)  # layers FLUX.1 never runs, each with why


def encoder_of(key: str) -> tuple[Encoder, str, bool] | None:
    """(encoder, the key without its prefix, whether the name is kohya-flattened), or None."""
    for encoder in ENCODERS:
        for prefix in encoder.dotted_prefixes:
            if key.startswith(prefix):
                return encoder, key[len(prefix) :], False
        for prefix in encoder.kohya_prefixes:
            if key.startswith(prefix):
                return encoder, key[len(prefix) :], True
    return None


def split_text_encoder_keys(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the rest, the text encoders' tensors), before diffusers' converters see the file."""
    rest, encoders = {}, {}
    for key, tensor in state_dict.items():
        (encoders if encoder_of(key) else rest)[key] = tensor
    return rest, encoders


def text_encoder_loras(
    state_dict: dict[str, torch.Tensor], models: dict[str, torch.nn.Module], input_name: str
) -> dict[str, EncoderLora]:
    """Each encoder's part of a file, matched and shape-checked against `models` (by attribute)."""
    grouped: dict[tuple[Encoder, str, bool], dict[str, torch.Tensor]] = {}
    unsupported = []
    for key, tensor in state_dict.items():
        found = encoder_of(key)
        if found is None:
            continue
        encoder, rest, flattened = found
        suffix = max((suffix for suffix in PARTS if rest.endswith(suffix)), key=len, default=None)
        if suffix is None:
            unsupported.append(key)
            continue
        grouped.setdefault((encoder, rest[: -len(suffix)], flattened), {})[PARTS[suffix]] = tensor
    if unsupported:
        raise LoraFormatError(
            f"Invalid {input_name}: these text-encoder tensors are of a kind this predictor cannot apply "
            f"(LoRA pairs, alphas, .diff/.diff_b deltas, LoKr and DoRA magnitudes only): {_first(unsupported)}."
        )
    loras: dict[str, EncoderLora] = {}
    unmatched = []
    names = {encoder.attribute: _names(encoder, models[encoder.attribute]) for encoder in ENCODERS}
    weighted = {attribute: weighted_modules(model) for attribute, model in models.items()}
    for (encoder, name, flattened), parts in grouped.items():
        module_name = names[encoder.attribute][flattened].get(name)
        unused = next((why for layer, why in encoder.unused if name.endswith(_spelled(layer, flattened))), None)
        if module_name is None and unused:
            skipped = f"{name} ({encoder.label}: {unused})"
            loras.setdefault(encoder.attribute, EncoderLora()).skipped.append(skipped)
            continue
        if module_name is None:
            unmatched.append(f"{name} ({encoder.label})")
            continue
        lora = loras.setdefault(encoder.attribute, EncoderLora())
        _encoder_layer(lora, weighted[encoder.attribute][module_name], module_name, parts, encoder, input_name)
    if unmatched:
        raise LoraFormatError(
            f"Invalid {input_name}: {len(unmatched)} text-encoder LoRA layers name no layer of FLUX.1's text "
            f"encoders; first: {_first(unmatched)}."
        )
    return loras


def _encoder_layer(
    lora: EncoderLora,
    module: torch.nn.Module,
    module_name: str,
    parts: dict[str, torch.Tensor],
    encoder: Encoder,
    input_name: str,
) -> None:
    """One layer's tensors into `lora`, each checked against the layer's own shapes."""
    where = f"the {encoder.label} layer {module_name}"
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    if "bias" in parts:
        if bias is None or parts["bias"].shape != bias.shape:
            raise LoraFormatError(
                f"Invalid {input_name}: the bias delta for {where} does not fit its bias; it was trained for "
                "another text encoder."
            )
        lora.deltas[(f"{module_name}.bias",)] = Delta(tensor=parts["bias"])
    kinds = [kind for kind in ("weight", "A", ".lokr_w1", ".lokr_w1_a") if kind in parts]
    if len(kinds) > 1:
        raise LoraFormatError(f"Invalid {input_name}: {where} holds more than one kind of update ({kinds}).")
    if "weight" in parts:
        delta = Delta(tensor=parts["weight"])
    elif any(part.startswith(".lokr_") for part in parts):
        delta = Delta(factors=lokr_factors(parts, parts.get("alpha"), module_name, input_name))
    elif "A" in parts or "B" in parts:
        if "A" not in parts or "B" not in parts:
            raise LoraFormatError(f"Invalid {input_name}: {where} has only half of a LoRA pair.")
        down, up = parts["A"].float(), parts["B"].float()
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1] or down.shape[0] == 0:
            raise LoraFormatError(f"Invalid {input_name}: {where} has a malformed pair.")
        rank = down.shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)  # no alpha: alpha = rank, as peft
        if isinstance(module, torch.nn.Linear) and "dora" not in parts:
            if (down.shape[1], up.shape[0]) != (module.in_features, module.out_features):
                raise LoraFormatError(
                    f"Invalid {input_name}: {where} is {module.in_features}->{module.out_features} in FLUX.1, and "
                    f"the LoRA's is {down.shape[1]}->{up.shape[0]}; it was trained for another text encoder."
                )
            lora.modules[module_name] = (down * (alpha / rank), up)
            return
        # An embedding (weight += B @ A), or a DoRA, which is recomposed into the weight.
        delta = Delta(factors=(up, down * (alpha / rank)), op="mm")
    elif "dora" in parts:
        raise LoraFormatError(f"Invalid {input_name}: {where} has DoRA magnitudes but no update to recompose.")
    else:
        return
    if weight is None or delta.shape != tuple(weight.shape):
        raise LoraFormatError(
            f"Invalid {input_name}: the update for {where} is {delta.shape} where its weight is "
            f"{tuple(weight.shape) if weight is not None else 'absent'}; it was trained for another text encoder."
        )
    if "dora" not in parts:
        lora.deltas[(f"{module_name}.weight",)] = delta
        return
    recomposed = Recomposed.of(delta, parts["dora"], tuple(weight.shape))
    if recomposed is None:
        raise LoraFormatError(f"Invalid {input_name}: the DoRA magnitudes of {where} fit neither its rows nor columns.")
    lora.deltas[(f"{module_name}.weight",)] = recomposed


def weighted_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every layer with a weight a file may change (Linear, embeddings, norms), by name; Linear layers as
    `linear_layers` gives them."""
    modules = {
        name: module
        for name, module in model.named_modules()
        if isinstance(getattr(module, "weight", None), torch.nn.Parameter)
        and ".lora_" not in f".{name}"
        and not name.endswith(".base_layer")
    }
    return {**modules, **linear_layers(model)}


def linear_layers(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The Linear layers a LoRA may target, by name; under a LoRA already applied, the layer it wraps."""
    layers = {}
    for name, module in model.named_modules():
        base = getattr(module, "base_layer", module)
        if isinstance(base, torch.nn.Linear) and ".lora_" not in f".{name}" and not name.endswith(".base_layer"):
            layers[name] = base
    return layers


def _names(encoder: Encoder, model: torch.nn.Module) -> dict[bool, dict[str, str]]:
    """How LoRA files may spell each layer, to its module name: dotted ({False: ...}) or kohya-flattened
    ({True: ...}), each with and without the legacy prefix."""
    spellings: dict[bool, dict[str, str]] = {False: {}, True: {}}
    for module_name in weighted_modules(model):
        for spelled in {module_name, encoder.legacy_prefix + module_name}:
            spellings[False][spelled] = module_name
            spellings[True][spelled.replace(".", "_")] = module_name
    return spellings


def _spelled(name: str, flattened: bool) -> str:
    return name.replace(".", "_") if flattened else name


def _first(items: list[str], count: int = 3) -> str:
    return ", ".join(items[:count]) + (f" (and {len(items) - count} more)" if len(items) > count else "")
