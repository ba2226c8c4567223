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
- CLIP-L: kohya `lora_te1_` / `lora_te_`, diffusers `text_encoder.`, ComfyUI `text_encoders.clip_l.transformer.`;
- T5-XXL: kohya `lora_te3_`, OneTrainer `lora_te2_`, diffusers `text_encoder_2.`, ComfyUI
  `text_encoders.t5xxl.transformer.`.
Tensors `.lora_down.weight`/`.lora_A.weight` (A), `.lora_up.weight`/`.lora_B.weight` (B),
`.alpha` and `.diff_b` (bias deltas). Anything else under an encoder's prefix refuses the file,
naming the keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from errors import LoraFormatError


@dataclass(frozen=True)
class Encoder:
    attribute: str  # the pipelines' component name
    label: str  # for messages
    kohya_prefixes: tuple[str, ...]  # flattened module names follow
    dotted_prefixes: tuple[str, ...]  # dotted module names follow
    legacy_prefix: str = ""  # a module-name prefix LoRA files carry and transformers 5's modules lack


CLIP = Encoder(
    "text_encoder",
    "CLIP-L text encoder",
    ("lora_te1_", "lora_te_"),
    ("text_encoder.", "text_encoders.clip_l.transformer."),
    legacy_prefix="text_model.",
)
T5 = Encoder(
    "text_encoder_2",
    "T5-XXL text encoder",
    ("lora_te3_", "lora_te2_"),
    ("text_encoder_2.", "text_encoders.t5xxl.transformer."),
)
ENCODERS = (CLIP, T5)
PARTS = {
    ".lora_down.weight": "A",
    ".lora_A.weight": "A",
    ".lora_up.weight": "B",
    ".lora_B.weight": "B",
    ".alpha": "alpha",
    ".diff_b": "bias",  # ComfyUI's bias delta: bias += scale x delta
}


@dataclass
class EncoderLora:
    """One file's LoRA for one encoder: per module, (A with alpha/rank folded in, B); and bias deltas."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    biases: dict[str, torch.Tensor] = field(default_factory=dict)


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
        suffix = next((suffix for suffix in PARTS if rest.endswith(suffix)), None)
        if suffix is None:
            unsupported.append(key)
            continue
        grouped.setdefault((encoder, rest[: -len(suffix)], flattened), {})[PARTS[suffix]] = tensor
    if unsupported:
        raise LoraFormatError(
            f"Invalid {input_name}: these text-encoder tensors are of a kind this predictor cannot apply "
            f"(plain LoRA pairs and alphas only): {_first(unsupported)}."
        )
    loras: dict[str, EncoderLora] = {}
    unmatched = []
    names = {encoder.attribute: _names(encoder, models[encoder.attribute]) for encoder in ENCODERS}
    layers = {attribute: linear_layers(model) for attribute, model in models.items()}
    for (encoder, name, flattened), parts in grouped.items():
        module_name = names[encoder.attribute][flattened].get(name)
        if module_name is None:
            unmatched.append(f"{name} ({encoder.label})")
            continue
        module = layers[encoder.attribute][module_name]
        if "bias" in parts:
            if module.bias is None or parts["bias"].shape != module.bias.shape:
                raise LoraFormatError(
                    f"Invalid {input_name}: the bias delta for the {encoder.label} layer {module_name} does not fit "
                    "its bias; it was trained for another text encoder."
                )
            loras.setdefault(encoder.attribute, EncoderLora()).biases[module_name] = parts["bias"].float()
            if not parts.keys() - {"bias"}:
                continue
        if "A" not in parts or "B" not in parts:
            raise LoraFormatError(
                f"Invalid {input_name}: the {encoder.label} layer {module_name} has only half of a LoRA pair."
            )
        down, up = parts["A"].float(), parts["B"].float()
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1] or down.shape[0] == 0:
            raise LoraFormatError(
                f"Invalid {input_name}: the {encoder.label} layer {module_name} has a malformed pair."
            )
        if (down.shape[1], up.shape[0]) != (module.in_features, module.out_features):
            raise LoraFormatError(
                f"Invalid {input_name}: the {encoder.label} layer {module_name} is {module.in_features}->"
                f"{module.out_features} in FLUX.1, and the LoRA's is {down.shape[1]}->{up.shape[0]}; "
                "it was trained for another text encoder."
            )
        rank = down.shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)  # no alpha: alpha = rank, as peft
        loras.setdefault(encoder.attribute, EncoderLora()).modules[module_name] = (down * (alpha / rank), up)
    if unmatched:
        raise LoraFormatError(
            f"Invalid {input_name}: {len(unmatched)} text-encoder LoRA layers name no layer of FLUX.1's text "
            f"encoders; first: {_first(unmatched)}."
        )
    return loras


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
    for module_name in linear_layers(model):
        for spelled in {module_name, encoder.legacy_prefix + module_name}:
            spellings[False][spelled] = module_name
            spellings[True][spelled.replace(".", "_")] = module_name
    return spellings


def _first(items: list[str], count: int = 3) -> str:
    return ", ".join(items[:count]) + (f" (and {len(items) - count} more)" if len(items) > count else "")
