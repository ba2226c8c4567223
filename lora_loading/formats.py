"""LoRA file formats: read a safetensors file, convert it to diffusers' layout, and check
it against the FLUX transformer before anything is applied.

diffusers' `FluxPipeline.lora_state_dict` converts kohya/sd-scripts (with alphas),
ComfyUI's `diffusion_model.` files in kohya naming, the CivitAI "mixture" layout and
XLabs; diffusers/PEFT files (ai-toolkit) need no conversion. What we add, each where it is
done below:
- spellings it does not read (`respelled`, `comfyui_peft_to_kohya`, `flattened_names_to_peft`):
  ComfyUI's and OneTrainer's PEFT names on BFL modules, bare BFL names, SimpleTuner's
  `lycoris_` names, its ComfyUI export's and its checkpoints' spellings, fal's Kontext layout,
  OneTrainer's OMI and INTERNAL layouts, and the mixture's MLP layers; a file mixing spellings
  has each part converted on its own (`match_lora`);
- alphas it does not apply (`metadata_alphas`, `peft_alphas_folded`, `bfl_alphas_fixed`):
  header-only alphas, `.alpha` on only some diffusers-named layers, the final layer's
  modulation, kohya split_qkv's per-part scale;
- tensors that are not LoRA pairs (`transformer_deltas`, `dora_magnitudes`): `.diff_b`,
  `.diff`, LyCORIS LoKr and DoRA magnitudes, by diffusers module;
- every LoRA pair is matched against the transformer's layers, so a LoRA for another
  model is an error instead of a silent no-op, and shapes are checked before loading,
  because diffusers would otherwise *expand* the base weights to fit (its Flux Control path).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from diffusers import FluxPipeline
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

from errors import LoraFormatError
from lora_loading.archives import PEFT_CONFIG, peft_config_beside
from lora_loading.deltas import Change, Delta, Recomposed
from lora_loading.lycoris import LOKR_PARTS, loha_to_lora, lokr_factors
from lora_loading.text_encoders import (
    encoder_of,
    linear_layers,
    split_text_encoder_keys,
    text_encoder_loras,
    weighted_modules,
)

log = logging.getLogger(__name__)

LORA_WEIGHT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
BIAS_DELTA = ".diff_b"  # ComfyUI's bias delta (its extract node's default): bias += scale x delta
WEIGHT_DELTA = ".diff"  # ComfyUI's full weight delta (its extract node's full_diff mode): weight += scale x delta
DORA_MAGNITUDE = ".lora_magnitude_vector"  # peft's DoRA magnitude, one per output feature
DORA_SCALE = ".dora_scale"  # kohya/LyCORIS's DoRA magnitude
# BFL's module names (kohya and ComfyUI files) for the diffusers modules that hold their biases. A fused
# BFL layer's bias is split in the order of its parts, by their widths; BFL's final layer gives
# (shift, scale) where diffusers' norm_out wants (scale, shift).
BFL_DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "txt_mod.lin": ("norm1_context.linear",),
}
BFL_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
BFL_OTHER = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}


@dataclass(frozen=True)
class LoraFile:
    input_name: str  # the request input or setting it came from, for error messages
    key: str  # identifies the source: the same key means the same weights
    path: Path
    scale: float


# Files already read in this request (`each_file_read_once`), by path.
_READS: ContextVar[dict[Path, dict[str, torch.Tensor]] | None] = ContextVar("lora_reads", default=None)


@contextmanager
def each_file_read_once() -> Iterator[None]:
    """Within it, read_lora reads each file once: the text encoders' state and the transformer's (or the
    go_fast slot's) each take their part of the same files. Nothing downstream changes a tensor it gets."""
    token = _READS.set({})
    try:
        yield
    finally:
        _READS.reset(token)


def read_lora(lora: LoraFile) -> dict[str, torch.Tensor]:
    """Only safetensors are ever deserialised: a pickle can run code on load. Spellings are made the ones
    the rest reads (`respelled`, `_peft_save`), the alpha of a pair in diffusers' names, whether a tensor, the
    file's metadata or a peft save's adapter_config.json holds it, is folded into its lora_A (`metadata_alphas`,
    `peft_alphas_folded`), and LyCORIS LoHa layers become exact LoRA pairs (lora_loading/lycoris.py)."""
    reads = _READS.get()
    if reads is not None and lora.path in reads:
        return reads[lora.path]
    try:
        with safetensors.safe_open(str(lora.path), framework="pt") as opened:
            metadata = opened.metadata() or {}
            state_dict = {key: opened.get_tensor(key) for key in opened.keys()}  # noqa: SIM118
    except Exception as error:
        raise LoraFormatError(
            f"Invalid {lora.input_name}: the file is not a readable .safetensors file ({error})."
        ) from error
    if any(key.startswith(PEFT_PREFIX) and not _is_bfl(key.removeprefix(PEFT_PREFIX)) for key in state_dict):
        state_dict, metadata = _peft_save(state_dict, metadata, lora)
    state_dict = loha_to_lora(spelled_as_read(state_dict, metadata, lora.input_name), lora.input_name)
    if reads is not None:
        reads[lora.path] = state_dict
    return state_dict


def spelled_as_read(
    state_dict: dict[str, torch.Tensor], metadata: dict[str, str], input_name: str
) -> dict[str, torch.Tensor]:
    """A file's tensors in the spellings the rest reads, the alphas of its pairs in diffusers' names folded in."""
    return peft_alphas_folded(metadata_alphas(respelled(state_dict), metadata, input_name))


PEFT_PREFIX = "base_model.model."  # peft's own save_pretrained of a PeftModel around the transformer


def _peft_save(
    state_dict: dict[str, torch.Tensor], metadata: dict[str, str], lora: LoraFile
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A file written by peft's save_pretrained, in diffusers' names, with its adapter_config.json (which
    holds the alpha, as diffusers' own saves hold it in the header) as header metadata. The config came with
    it from a Hugging Face repository or an archive (kept beside it in the cache), or sits beside a local
    file. Without it the scale is unknown, and guessing would apply another LoRA."""
    renamed = {
        (f"transformer.{key.removeprefix(PEFT_PREFIX)}" if key.startswith(PEFT_PREFIX) else key): tensor
        for key, tensor in state_dict.items()
    }
    for candidate in (peft_config_beside(lora.path), lora.path.with_name(PEFT_CONFIG)):
        if candidate.is_file():
            try:
                config = json.loads(candidate.read_text())
            except (OSError, ValueError) as error:
                raise LoraFormatError(f"Invalid {lora.input_name}: its adapter_config.json is not JSON.") from error
            if not isinstance(config, dict):
                raise LoraFormatError(f"Invalid {lora.input_name}: its adapter_config.json is not a JSON object.")
            metadata = {
                **metadata,
                LORA_ADAPTER_METADATA_KEY: json.dumps({f"transformer.{k}": v for k, v in config.items()}),
            }
            return renamed, metadata
    if metadata.get(LORA_ADAPTER_METADATA_KEY) or any(key.endswith(".alpha") for key in state_dict):
        return renamed, metadata
    # Loading it at scale 1 would be a guess: peft's default lora_alpha is 8, whatever the rank.
    raise LoraFormatError(
        f"Invalid {lora.input_name}: its keys are diffusers module names under base_model.model., as peft's "
        "save_pretrained writes them, and such a file's alpha is kept in the adapter_config.json beside it, which "
        "did not come with it; give the Hugging Face repository, or a .zip or .tar holding both files."
    )


# BFL's top-level module names: OneTrainer's ORIGINAL format writes them bare, ComfyUI under `diffusion_model.`.
BFL_TOP_LEVEL = ("double_blocks.", "single_blocks.", "img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.")
# diffusers' top-level module names in FluxTransformer2DModel; no BFL name starts with one of them.
DIFFUSERS_TOP_LEVEL = (
    "transformer_blocks.",
    "single_transformer_blocks.",
    "x_embedder.",
    "context_embedder.",
    "time_text_embed.",
    "norm_out.",
    "proj_out.",
)
# Peft's pair in the spellings of diffusers-named files that diffusers' Flux loader does not read whole:
# SimpleTuner's checkpoints (`convert_state_dict_to_diffusers` renames only to_q/to_k/to_v/to_out.0's pairs to
# `.lora.down`/`.lora.up`, so one file mixes both spellings, and diffusers converts it only when the first key
# happens to be one of those) and OneTrainer's INTERNAL format since its 2026-07 rework (kohya's suffixes on
# diffusers' names, which diffusers loads ignoring their `.alpha`).
PEFT_RESPELLED_SUFFIXES = {
    ".lora.down.weight": ".lora_A.weight",
    ".lora.up.weight": ".lora_B.weight",
    ".lora_down.weight": ".lora_A.weight",
    ".lora_up.weight": ".lora_B.weight",
}
# OneTrainer's OMI layout (its INTERNAL backups 2025-04 to 2026-07, and SAFETENSORS output with the OMI switch;
# InvokeAI reads it): `transformer.` + BFL names, where each fused layer is trained as its parts, numbered in
# the order of BFL_DOUBLE/BFL_SINGLE's targets (`img_attn.qkv.0` is to_q, `linear1.3` proj_mlp), and the
# image input is named `img_in.proj`. Read in OneTrainer's modules/util/convert/lora/convert_flux_lora.py,
# whose key sets InvokeAI vendors; its lora_up of `final_layer.adaLN_modulation.1` is in BFL's (shift, scale)
# order, and only that tensor (its `swap_chunks`).
OMI_PREFIX = "transformer."
OMI_OWN_NAMES = {"img_in.proj": "x_embedder"}
OMI_SWAPPED = "final_layer.adaLN_modulation.1"


def _is_bfl(name: str) -> bool:
    return name.startswith((*BFL_TOP_LEVEL, "final_layer."))


def respelled(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Spellings of layouts this predictor reads, in the ones the rest expects (`respelled_key`); and the one
    tensor the OMI layout keeps in BFL's order, put in diffusers'."""
    spelled = {}
    for key, tensor in state_dict.items():
        if key.startswith(f"{OMI_PREFIX}{OMI_SWAPPED}.") and key.endswith(".lora_up.weight"):
            tensor = torch.cat(tensor.chunk(2)[::-1])
        spelled[respelled_key(key)] = tensor
    return spelled


def respelled_key(key: str) -> str:
    """One key in the spelling the rest reads:
    - bare BFL names (OneTrainer's ORIGINAL format) get ComfyUI's `diffusion_model.`, and so do BFL names
      under peft's `base_model.model.` (fal's FLUX Kontext trainer, without alphas: diffusers' own reader of
      those needs all 57 blocks), for diffusers' kohya converter;
    - diffusers names under `diffusion_model.` (SimpleTuner's ComfyUI export, v3.1.6 to v3.2.3) get
      `transformer.`;
    - OMI names (above) become the diffusers modules they train;
    - peft's pair under diffusers names is spelled lora_A/lora_B (`PEFT_RESPELLED_SUFFIXES`);
    - `.lora_magnitude_vector.weight` (OneTrainer's DIFFUSERS format) is peft's `.lora_magnitude_vector`."""
    if _is_bfl(key) and ".processor." not in key:  # XLabs' keep theirs
        key = f"diffusion_model.{key}"
    elif key.startswith(PEFT_PREFIX) and _is_bfl(key.removeprefix(PEFT_PREFIX)):
        key = f"diffusion_model.{key.removeprefix(PEFT_PREFIX)}"
    elif key.startswith("diffusion_model.") and key.removeprefix("diffusion_model.").startswith(DIFFUSERS_TOP_LEVEL):
        key = f"transformer.{key.removeprefix('diffusion_model.')}"
    elif key.startswith(OMI_PREFIX) and _is_bfl(key.removeprefix(OMI_PREFIX)):
        key = _omi_to_diffusers(key.removeprefix(OMI_PREFIX))
    if key.startswith("transformer."):
        suffix = next((s for s in PEFT_RESPELLED_SUFFIXES if key.endswith(s)), None)
        if suffix:
            key = key.removesuffix(suffix) + PEFT_RESPELLED_SUFFIXES[suffix]
    return key.removesuffix(".weight") if key.endswith(f"{DORA_MAGNITUDE}.weight") else key


def _omi_to_diffusers(key: str) -> str:
    """An OMI key (without `transformer.`) under the diffusers module it trains; a name that is no FLUX.1
    layer keeps its own, so the error names it."""
    name, suffix = _split_suffix(key)
    part = None
    whole, _, last = name.rpartition(".")
    if last.isdigit() and whole.endswith((".img_attn.qkv", ".txt_attn.qkv", ".linear1")):
        name, part = whole, int(last)
    targets = (OMI_OWN_NAMES[name],) if name in OMI_OWN_NAMES else _bfl_targets(name)
    if not targets or (part is None) != (len(targets) == 1) or (part is not None and part >= len(targets)):
        return f"{OMI_PREFIX}{key}"
    return f"transformer.{targets[part or 0]}{suffix}"


def _split_suffix(key: str) -> tuple[str, str]:
    """(module name, tensor suffix) of a key ending in one of the tensor kinds files hold."""
    suffix = max((s for s in PLAIN_SUFFIXES if key.endswith(s)), key=len, default="")
    return key[: len(key) - len(suffix)], suffix


def metadata_alphas(
    state_dict: dict[str, torch.Tensor], metadata: dict[str, str], input_name: str
) -> dict[str, torch.Tensor]:
    """diffusers' own saves (0.34 on, and SimpleTuner through them) keep each component's peft config in the
    header (`lora_adapter_metadata`: `transformer.lora_alpha`, `.alpha_pattern`, `.use_rslora`, ...), not as
    `.alpha` tensors; diffusers reads it only when it opens the file itself. So its scale, lora_alpha / r
    (or / sqrt(r) with rsLoRA), is folded into each lora_A here."""
    raw = metadata.get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return state_dict
    try:
        config = json.loads(raw)
    except ValueError:
        raise LoraFormatError(f"Invalid {input_name}: its lora_adapter_metadata is not JSON.") from None
    if not isinstance(config, dict):
        raise LoraFormatError(f"Invalid {input_name}: its lora_adapter_metadata is not a JSON object.")
    if "lora_alpha" in config:
        # SimpleTuner's ComfyUI export writes the transformer's peft config as it is, without the component
        # prefix diffusers' saves give each key (its `comfyui_save_function`, when the config is JSON-able).
        config = {f"transformer.{key}": value for key, value in config.items()}
    scaled = dict(state_dict)
    for component in ("transformer", "text_encoder", "text_encoder_2", "unet"):
        alpha = config.get(f"{component}.lora_alpha")
        if alpha is None:
            continue
        if config.get(f"{component}.use_dora") and not any(
            key.startswith(f"{component}.") and key.endswith(DORA_MAGNITUDE) for key in state_dict
        ):
            raise LoraFormatError(f"Invalid {input_name}: its header says DoRA, and it holds no DoRA magnitudes.")
        patterns = config.get(f"{component}.alpha_pattern") or {}
        rslora = bool(config.get(f"{component}.use_rslora"))
        for key, tensor in state_dict.items():
            if not (key.startswith(f"{component}.") and key.endswith(".lora_A.weight")):
                continue
            module = key[len(component) + 1 : -len(".lora_A.weight")]
            if f"{component}.{module}.alpha" in state_dict:
                continue  # an explicit alpha tensor wins, as in diffusers' loader
            # peft's own matching of alpha_pattern keys: the pattern at the end of the module's name.
            found = next(
                (value for pattern, value in patterns.items() if re.match(rf"(.*\.)?({pattern})$", module)), alpha
            )
            rank = tensor.shape[0]
            scaled[key] = tensor.float() * (float(found) / (math.sqrt(rank) if rslora else rank))
    return scaled


def peft_alphas_folded(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The `.alpha` tensor of a pair in diffusers' names folded into its lora_A (A x alpha / rank), as
    `metadata_alphas` folds the header's. diffusers would hand these to peft as network alphas, and where only
    some layers have one (SimpleTuner's ComfyUI export gives only the pairs it respelled from `.lora.down` an
    alpha) its `get_peft_kwargs` gives every other layer the most common alpha instead of its rank."""
    folded = dict(state_dict)
    for key, alpha in state_dict.items():
        if not (key.startswith("transformer.") and key.endswith(".alpha")):
            continue
        down = state_dict.get(f"{key.removesuffix('.alpha')}.lora_A.weight")
        if down is not None:
            folded[f"{key.removesuffix('.alpha')}.lora_A.weight"] = down.float() * (float(alpha) / down.shape[0])
            del folded[key]
    return folded


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
    ".lora_mid.": "LoCon convolution weights (lora_mid)",
    "bundle_emb.": "OneTrainer's bundled textual-inversion embeddings (bundle_emb)",
}
PLAIN_SUFFIXES = (
    *LORA_WEIGHT_SUFFIXES,
    ".lora_down.weight",
    ".lora_up.weight",
    ".alpha",
    ".down.weight",
    ".up.weight",
    BIAS_DELTA,
    WEIGHT_DELTA,
    *LOKR_PARTS,
    DORA_MAGNITUDE,
    DORA_SCALE,
)


def refuse_unsupported_kinds(state_dict: dict[str, torch.Tensor], input_name: str) -> None:
    strange = [key for key in state_dict if not key.endswith(PLAIN_SUFFIXES)]
    if strange:
        kinds = sorted({kind for marker, kind in UNSUPPORTED_KINDS.items() for key in strange if marker in key})
        raise LoraFormatError(
            f"Invalid {input_name}: it holds tensors of kinds this predictor cannot apply yet "
            f"({', '.join(kinds) or 'unknown'}), and applying the rest would be another LoRA; "
            f"first: {', '.join(strange[:3])}."
        )


def _bfl_targets(name: str) -> tuple[str, ...] | None:
    """The diffusers modules a BFL module name (dots) stands for, in the order its outputs are fused."""
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "double_blocks" and parts[2] in BFL_DOUBLE:
        return tuple(f"transformer_blocks.{parts[1]}.{target}" for target in BFL_DOUBLE[parts[2]])
    if len(parts) == 3 and parts[0] == "single_blocks" and parts[2] in BFL_SINGLE:
        return tuple(f"single_transformer_blocks.{parts[1]}.{target}" for target in BFL_SINGLE[parts[2]])
    return (BFL_OTHER[name],) if name in BFL_OTHER else None


def _kohya_to_bfl(flat: str) -> str | None:
    """`double_blocks_0_img_attn_qkv` -> `double_blocks.0.img_attn.qkv`, by the names BFL's modules have."""
    for bfl in [
        *BFL_OTHER,
        *(f"double_blocks.#.{n}" for n in BFL_DOUBLE),
        *(f"single_blocks.#.{n}" for n in BFL_SINGLE),
    ]:
        pattern = bfl.replace(".", "_").replace("#", r"(\d+)")
        found = re.fullmatch(pattern, flat)
        if found:
            return bfl.replace("#", found[1]) if found.groups() else bfl
    return None


def standard_path_reason(path: Path) -> str | None:
    """Why a LoRA file cannot go into go_fast's slot, which holds LoRA pairs only; None if it can.
    Reads the file's header only, its keys spelled as read_lora spells them."""
    with safetensors.safe_open(str(path), framework="pt") as opened:
        keys = [respelled_key(key) for key in opened.keys() if not encoder_of(key)]  # noqa: SIM118
    if any(key.endswith(BIAS_DELTA) for key in keys):
        return "bias deltas (.diff_b)"
    if any(key.endswith(WEIGHT_DELTA) for key in keys):
        return "full weight deltas (.diff)"
    if any(key.endswith(LOKR_PARTS) for key in keys):
        return "LyCORIS LoKr layers"
    if any(key.endswith((DORA_MAGNITUDE, DORA_SCALE)) for key in keys):
        return "DoRA magnitudes"
    return None


# Prefixes of flattened diffusers module names: SimpleTuner's LyCORIS saves and OneTrainer's/CivitAI's
# "mixture" layout (the names ComfyUI's FLUX key map also takes).
FLAT_DIFFUSERS_PREFIXES = ("lycoris_", "lora_transformer_")


def _flattened(module_names: Iterable[str]) -> dict[str, str]:
    """Module names as the flattened layouts spell them (dots as underscores), to the names."""
    return {name.replace(".", "_"): name for name in module_names}


def _layer_targets(name: str, flat: dict[str, str]) -> tuple[tuple[str, ...], bool]:
    """The diffusers modules a transformer layer name stands for, in any naming this predictor reads (`flat`:
    the model's `_flattened` names), in the order a fused BFL layer's outputs run; and whether its two halves
    swap (BFL's final layer gives (shift, scale) where diffusers' norm_out wants (scale, shift)). No targets:
    no FLUX.1 layer."""
    bfl = None
    if name.startswith("diffusion_model."):
        bfl = name.removeprefix("diffusion_model.")
    elif name.startswith("lora_unet_"):
        bfl = _kohya_to_bfl(name.removeprefix("lora_unet_")) or "?"
    if bfl is not None:
        return _bfl_targets(bfl) or (), bfl == "final_layer.adaLN_modulation.1"
    for prefix in FLAT_DIFFUSERS_PREFIXES:
        if name.startswith(prefix):
            found = flat.get(name.removeprefix(prefix))
            return ((found,) if found else ()), False
    return (name.removeprefix("transformer."),), False


def _row_slices(widths: list[int], swap_halves: bool) -> list[tuple[slice, ...]]:
    """Per target, the rows of the fused layer's output it takes."""
    if swap_halves:
        half = widths[0] // 2
        return [(slice(half, 2 * half), slice(0, half))]
    offsets = [sum(widths[:index]) for index in range(len(widths))]
    return [(slice(offset, offset + width),) for offset, width in zip(offsets, widths, strict=True)]


PAIR_SPELLINGS = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"))


def recomposed_layers(state_dict: dict[str, torch.Tensor]) -> set[str]:
    """The transformer layers (as the file names them) whose DoRA is recomposed into the weight rather than
    held by peft: magnitudes per input column, or a DoRA over a LoKr. Their pairs are not for peft."""
    layers = set()
    for key, magnitude in state_dict.items():
        if key.endswith(DORA_SCALE) and not encoder_of(key):
            layer = key.removesuffix(DORA_SCALE)
            per_column = magnitude.ndim == 2 and magnitude.shape[0] == 1 and magnitude.shape[1] != 1
            if per_column or any(f"{layer}{part}" in state_dict for part in LOKR_PARTS):
                layers.add(layer)
    return layers


def transformer_deltas(
    state_dict: dict[str, torch.Tensor], transformer: torch.nn.Module, input_name: str
) -> dict[tuple[str, ...], Change]:
    """What a file changes in the transformer's own parameters, by the parameter names each change takes:
    `.diff_b` bias deltas, `.diff` weight deltas and LyCORIS LoKr layers (added), and the DoRAs peft cannot
    hold (`recomposed_layers`). diffusers' converters drop the first two (a log line at most), take LoKr
    for other models only, and strip DoRA magnitudes."""
    changes: dict[tuple[str, ...], Change] = {
        (f"{module}.bias",): Delta(tensor=vector)
        for module, vector in _per_output(
            state_dict, transformer, input_name, BIAS_DELTA, "bias deltas (.diff_b)"
        ).items()
    }
    weighted = weighted_modules(transformer)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        suffix = next((s for s in (WEIGHT_DELTA, *LOKR_PARTS) if key.endswith(s)), None)
        if suffix and not encoder_of(key):
            grouped.setdefault(key[: -len(suffix)], {})[suffix] = tensor
    flat = _flattened(weighted)
    recomposed = recomposed_layers(state_dict)
    for layer in recomposed - grouped.keys():
        grouped[layer] = {}
    unmatched = []
    for layer, parts in grouped.items():
        whole, kind = _whole_update(state_dict, layer, parts, input_name)
        targets, swap = _layer_targets(layer, flat)
        layers = [weighted.get(target) for target in targets]
        if not targets or any(module is None for module in layers):
            unmatched.append(layer)
            continue
        if all(isinstance(module, torch.nn.Linear) for module in layers):
            widths = [module.out_features for module in layers]
            expected = (sum(widths), layers[0].in_features)
        else:  # a norm's weight (ai-toolkit's all_layers writes them so), under its diffusers name
            widths = [layers[0].weight.shape[0]]
            expected = tuple(layers[0].weight.shape) if len(layers) == 1 else ()
        if whole.shape != expected:
            raise LoraFormatError(
                f"Invalid {input_name}: the {kind} {layer} is {whole.shape} where this FLUX.1 model's layer is "
                f"{expected}; the LoRA was trained for a different model."
            )
        rows = _row_slices(widths, swap)
        if layer in recomposed:
            names = tuple(f"{target}.weight" for target in targets)
            changes[names] = _recomposed(whole, state_dict[f"{layer}{DORA_SCALE}"], expected, swap, layer, input_name)
            continue
        for target, target_rows in zip(targets, rows, strict=True):
            changes[(f"{target}.weight",)] = Delta(whole.tensor, whole.factors, whole.op, target_rows)
    if unmatched:
        raise LoraFormatError(
            f"Invalid {input_name}: {len(unmatched)} of its LoKr, .diff or DoRA layers match no FLUX.1 layer, so "
            f"it was trained for another model; first: {', '.join(unmatched[:3])}."
        )
    return changes


def _whole_update(
    state_dict: dict[str, torch.Tensor], layer: str, parts: dict[str, torch.Tensor], input_name: str
) -> tuple[Delta, str]:
    """A layer's whole update at scale 1, from its `.diff`, its LoKr factors or (for a recomposed DoRA) its pair."""
    if WEIGHT_DELTA in parts and len(parts) > 1:
        raise LoraFormatError(f"Invalid {input_name}: the layer {layer} holds both a .diff and LoKr tensors.")
    if WEIGHT_DELTA in parts:
        if f"{layer}{DORA_SCALE}" in state_dict:
            raise LoraFormatError(f"Invalid {input_name}: the layer {layer} is a DoRA over a full .diff delta.")
        return Delta(tensor=parts[WEIGHT_DELTA]), "full weight delta (.diff)"
    if parts:
        return Delta(factors=lokr_factors(parts, state_dict.get(f"{layer}.alpha"), layer, input_name)), "LoKr layer"
    for down_suffix, up_suffix in PAIR_SPELLINGS:
        down, up = state_dict.get(f"{layer}{down_suffix}"), state_dict.get(f"{layer}{up_suffix}")
        if down is not None and up is not None:
            alpha = state_dict.get(f"{layer}.alpha")
            scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
            return Delta(factors=(up.float(), down.float() * scale), op="mm"), "DoRA layer"
    raise LoraFormatError(f"Invalid {input_name}: the DoRA layer {layer} has magnitudes but no LoRA pair.")


def _recomposed(
    whole: Delta, magnitude: torch.Tensor, shape: tuple[int, ...], swap: bool, layer: str, input_name: str
) -> Recomposed:
    """A DoRA recomposed into its diffusers modules' stacked weights; BFL's final layer swaps its halves."""
    out_features, in_features = shape
    if swap:
        order = (slice(out_features // 2, out_features), slice(0, out_features // 2))
        whole = Delta(whole.tensor, whole.factors, whole.op, order)
        if magnitude.numel() == out_features:  # per output row: its rows swap too
            magnitude = torch.cat([magnitude.reshape(-1)[row] for row in order])
    recomposed = Recomposed.of(whole, magnitude, shape)
    if recomposed is None:
        raise LoraFormatError(
            f"Invalid {input_name}: the DoRA magnitudes of {layer} have shape {tuple(magnitude.shape)}, neither one "
            f"per output ({out_features}) nor one per input ({in_features}) of this FLUX.1 layer."
        )
    return recomposed


def dora_magnitudes(
    state_dict: dict[str, torch.Tensor], transformer: torch.nn.Module, input_name: str
) -> dict[str, torch.Tensor]:
    """kohya/LyCORIS `.dora_scale` magnitudes of LoRA layers, by diffusers module, as peft's lora_magnitude_vector.

    LyCORIS keeps one magnitude per output row (shape (out, 1), its wd_on_out default), which is what
    peft's DoRA holds: weight = m * (W + dW) / ||W + dW|| row by row. Per-input-column magnitudes, and DoRA
    over LoKr, are recomposed into the weight instead (`transformer_deltas`)."""
    recomposed = recomposed_layers(state_dict)
    flat = {
        key: (t.flatten() if key.endswith(DORA_SCALE) else t)
        for key, t in state_dict.items()
        if not (key.endswith(DORA_SCALE) and key.removesuffix(DORA_SCALE) in recomposed)
    }
    return _per_output(flat, transformer, input_name, DORA_SCALE, "DoRA magnitudes (.dora_scale)", bias=False)


def _per_output(
    state_dict: dict[str, torch.Tensor],
    transformer: torch.nn.Module,
    input_name: str,
    suffix: str,
    kind: str,
    bias: bool = True,
) -> dict[str, torch.Tensor]:
    """Vectors of one value per output feature (`suffix`), by the diffusers module each belongs to,
    split by rows over a fused BFL layer's parts (diffusers' converters drop these)."""
    modules = linear_layers(transformer)
    flat = _flattened(modules)
    vectors: dict[str, torch.Tensor] = {}
    unmatched = []
    for key, vector in state_dict.items():
        if not key.endswith(suffix) or encoder_of(key):
            continue
        targets, swap = _layer_targets(key[: -len(suffix)], flat)
        layers = [modules.get(target) for target in targets]
        if not targets or not all(layer is not None and (layer.bias is not None or not bias) for layer in layers):
            unmatched.append(key)
            continue
        widths = [layer.out_features for layer in layers if layer is not None]
        if vector.ndim != 1 or vector.shape[0] != sum(widths):
            raise LoraFormatError(
                f"Invalid {input_name}: {key} has {tuple(vector.shape)} values where this FLUX.1 model's layer "
                f"has {sum(widths)} outputs; the LoRA was trained for a different model."
            )
        for target, rows in zip(targets, _row_slices(widths, swap), strict=True):
            vectors[target] = torch.cat([vector[row] for row in rows]).float()
    if unmatched:
        with_bias = " with a bias" if bias else ""
        raise LoraFormatError(
            f"Invalid {input_name}: {len(unmatched)} of its {kind} match no FLUX.1 layer{with_bias}, so it was "
            f"trained for another model; first: {', '.join(unmatched[:3])}."
        )
    return vectors


def flattened_names_to_peft(
    state_dict: dict[str, torch.Tensor], transformer: torch.nn.Module, input_name: str
) -> dict[str, torch.Tensor]:
    """Flattened diffusers names with kohya suffixes in PEFT names, alpha/rank folded into A: OneTrainer's and
    CivitAI's "mixture" layout (`lora_transformer_<diffusers module, dots as underscores>`) and SimpleTuner's
    LyCORIS saves (`lycoris_...`). diffusers' converter maps the first's attention and embedder layers only
    and names an MLP or norm layer by its block, so those never applied; it does not know the second."""
    if not any(key.startswith(FLAT_DIFFUSERS_PREFIXES) for key in state_dict):
        return state_dict
    layers = _flattened(linear_layers(transformer))
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    converted = {key: tensor for key, tensor in state_dict.items() if not key.startswith(FLAT_DIFFUSERS_PREFIXES)}
    for key, tensor in state_dict.items():
        prefix = next((prefix for prefix in FLAT_DIFFUSERS_PREFIXES if key.startswith(prefix)), None)
        if prefix:
            flat, _, part = key[len(prefix) :].partition(".")
            grouped.setdefault(flat, {})[part] = tensor
    unmatched = [flat for flat in grouped if flat not in layers]
    if unmatched:
        raise LoraFormatError(
            f"Invalid {input_name}: {len(unmatched)} of its {len(grouped)} layers (flattened diffusers names) name "
            f"no FLUX.1 layer, so it was trained for another model; first: {', '.join(unmatched[:3])}."
        )
    for flat, parts in grouped.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise LoraFormatError(f"Invalid {input_name}: the layer {flat} has only half of a LoRA pair.")
        down = parts["lora_down.weight"]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(down.shape[0])
        converted[f"transformer.{layers[flat]}.lora_A.weight"] = down.float() * (alpha / down.shape[0])
        converted[f"transformer.{layers[flat]}.lora_B.weight"] = parts["lora_up.weight"].float()
    return converted


def bfl_alphas_fixed(state_dict: dict[str, torch.Tensor], transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The alphas of BFL-named pairs (kohya's `lora_unet_`, ComfyUI's `diffusion_model.`) where diffusers'
    converter, which applies the others, falls short:
    - it drops the final layer's alphas (`final_layer.linear`, `.adaLN_modulation.1`: "TODO: alphas" in its
      `assign_remaining_weights`): here alpha / rank is folded into their lora_down, and alpha set to the rank;
    - kohya's `split_qkv` trains q, k, v (and a single block's MLP input) as separate rank-r LoRAs, each
      scaled alpha / r, and saves them as one rank-n*r pair: the downs stacked, the ups block-diagonal, the
      alpha unchanged. Every reader since, kohya's own and diffusers' included, divides that alpha by n*r,
      which weakens those layers n times (kohya-ss/sd-scripts#2204). Such a pair, found the way diffusers
      finds it (the up's off-diagonal blocks all zero), gets its alpha multiplied by n: alpha / r per part,
      as trained."""
    modules = linear_layers(transformer)
    fixed = dict(state_dict)
    for key, alpha in state_dict.items():
        if not (key.startswith(("lora_unet_", "diffusion_model.")) and key.endswith(".alpha")):
            continue
        layer = key.removesuffix(".alpha")
        down, up = state_dict.get(f"{layer}.lora_down.weight"), state_dict.get(f"{layer}.lora_up.weight")
        if down is None or up is None or down.ndim != 2:
            continue
        bfl = layer.removeprefix("diffusion_model.")
        if layer.startswith("lora_unet_"):
            bfl = _kohya_to_bfl(layer.removeprefix("lora_unet_")) or ""
        if bfl.startswith("final_layer."):
            fixed[f"{layer}.lora_down.weight"] = down.float() * (float(alpha) / down.shape[0])
            fixed[key] = torch.tensor(float(down.shape[0]))  # alpha = rank: a scale of 1 from here on
            continue
        layers = [modules.get(target) for target in _bfl_targets(bfl) or ()]
        if _block_diagonal(up, [module.out_features for module in layers if module is not None]):
            fixed[key] = alpha.float() * len(layers)
    return fixed


def _block_diagonal(up: torch.Tensor, widths: list[int]) -> bool:
    """Whether `up` is kohya split_qkv's: one rank-r block per part on the diagonal, zeros elsewhere."""
    if len(widths) < 2 or up.ndim != 2 or sum(widths) != up.shape[0] or up.shape[1] % len(widths) or not up.any():
        return False
    rank = up.shape[1] // len(widths)
    return all(
        not block[:, column * rank : (column + 1) * rank].any()
        for row, block in enumerate(up.split(widths))
        for column in range(len(widths))
        if column != row
    )


def check_lora_matches(
    pipeline: FluxPipeline, state_dict: dict[str, torch.Tensor], input_name: str
) -> dict[str, torch.Tensor]:
    """What `match_lora` gives peft: the transformer's LoRA pairs, with their alphas."""
    return match_lora(pipeline, state_dict, input_name)[0]


def match_lora(
    pipeline: FluxPipeline, state_dict: dict[str, torch.Tensor], input_name: str
) -> tuple[dict[str, torch.Tensor], dict[tuple[str, ...], Change]]:
    """Convert to diffusers' layout and check every tensor against the transformer.

    Returns what to load into the transformer through peft (its part of the converted state dict, with
    its alphas) and what to change in its parameters in place (`transformer_deltas`). The text encoders'
    tensors (lora_loading/text_encoders.py) are matched and checked too, but applied apart; a file may
    hold only those.
    """
    rest, text_encoder_part = split_text_encoder_keys(state_dict)
    encoders = {"text_encoder": pipeline.text_encoder, "text_encoder_2": pipeline.text_encoder_2}
    text_encoder_loras(text_encoder_part, encoders, input_name)
    refuse_unsupported_kinds(rest, input_name)
    deltas = transformer_deltas(rest, pipeline.transformer, input_name)
    magnitudes = dora_magnitudes(rest, pipeline.transformer, input_name)
    # What the deltas and magnitudes took, LoKr layers' alphas and recomposed DoRAs' pairs included, is not
    # for diffusers' converters.
    merged = {key.rsplit(".", 1)[0] for key in rest if key.endswith((WEIGHT_DELTA, *LOKR_PARTS))}
    merged |= recomposed_layers(rest)
    pair_parts = (".alpha", *(suffix for pair in PAIR_SPELLINGS for suffix in pair))
    rest = {
        key: tensor
        for key, tensor in rest.items()
        if not key.endswith((BIAS_DELTA, DORA_SCALE, WEIGHT_DELTA, *LOKR_PARTS))
        and not any(key.endswith(part) and key.removesuffix(part) in merged for part in pair_parts)
    }
    if not rest and (text_encoder_part or deltas):
        return {}, deltas
    rest = flattened_names_to_peft(rest, pipeline.transformer, input_name)
    rest = bfl_alphas_fixed(comfyui_peft_to_kohya(rest), pipeline.transformer)
    # diffusers picks one converter per file, and its kohya converter keeps only the `transformer.` keys of a
    # file that also has them ("has both peft and non-peft state dict"), dropping the rest without a word. So
    # each spelling is converted on its own, and a layer named in both is refused.
    peft_named = {key: tensor for key, tensor in rest.items() if key.startswith("transformer.")}
    spellings = [peft_named, {key: tensor for key, tensor in rest.items() if key not in peft_named}]
    transformer_part: dict[str, torch.Tensor] = {}
    alphas: dict[str, torch.Tensor] = {}
    for spelling in filter(None, spellings):
        try:
            converted, spelling_alphas = FluxPipeline.lora_state_dict(spelling, return_alphas=True)
        except Exception as error:
            raise LoraFormatError(
                f"Invalid {input_name}: this file is not a FLUX LoRA in any supported format "
                f"(diffusers/PEFT, kohya, ComfyUI, CivitAI mixture, XLabs); first keys: {_first_keys(state_dict)}."
            ) from error
        # diffusers' kohya converter names the embedders and the final layer (kohya's in_dims, "train all
        # layers", every ComfyUI extract) without the "transformer." its own loader then filters on, so
        # they were dropped without a word. They are transformer modules: prefixed here, they apply.
        prefixed = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in converted.items()}
        twice = sorted(prefixed.keys() & transformer_part.keys())
        if twice:
            raise LoraFormatError(
                f"Invalid {input_name}: it names {len(twice)} LoRA tensors twice, in diffusers' names and in another "
                f"spelling, so which one it means is unclear; first: {', '.join(twice[:3])}."
            )
        transformer_part |= prefixed
        alphas |= spelling_alphas or {}
    transformer_part.update({f"transformer.{target}{DORA_MAGNITUDE}": m for target, m in magnitudes.items()})

    modules = linear_layers(pipeline.transformer)
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
            if key.endswith(DORA_MAGNITUDE) and key[: -len(DORA_MAGNITUDE)] + ".lora_B.weight" not in transformer_part:
                unmatched.append(key)
            continue
        module = modules.get(key[len("transformer.") : -len(suffix)])
        if module is None:
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
        magnitude = key[: -len(suffix)] + DORA_MAGNITUDE
        if suffix == ".lora_B.weight" and magnitude in transformer_part:
            if tuple(transformer_part[magnitude].shape) != (module.out_features,):
                raise LoraFormatError(
                    f"Invalid {input_name}: the DoRA magnitude {magnitude} has shape "
                    f"{tuple(transformer_part[magnitude].shape)} where this FLUX.1 layer has {module.out_features} "
                    "outputs; the LoRA was trained for a different model."
                )
            to_load[magnitude] = transformer_part[magnitude]
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
    return to_load, deltas


def _first_keys(state_dict: dict[str, torch.Tensor], count: int = 3) -> str:
    return ", ".join(list(state_dict)[:count]) or "(the file holds no tensors)"
