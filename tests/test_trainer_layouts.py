"""Each trainer's file, written the way that trainer's own saving code writes it, must apply every
tensor it holds, exactly: afterwards each Linear layer of the demo transformer computes
W + s * dW (and b + s * db) for the dW the trainer meant, and every other layer is untouched.
A request without the file then finds the base model bit for bit.

What each writer does was read in its source (2026-12):
- ai-toolkit, `toolkit/network_mixins.py` `get_state_dict` (peft_format for FLUX): every Linear in the
  double and single blocks, `transformer.<diffusers module>.lora_A/.lora_B`, fp16, `.alpha` dropped
  (alpha = rank); its `all_layers` option adds `<module>.diff` for the norms; LoKr keeps `.alpha`.
- kohya sd-scripts, `networks/lora_flux.py`: BFL names flattened under `lora_unet_`, one pair per fused
  layer, `.alpha` in the save precision; `train_blocks` picks double or single blocks, `in_dims` adds the
  embedders; `split_qkv` saves q/k/v (and linear1's four parts) stacked with a block-diagonal up and
  an unchanged alpha (its state_dict override).
- ComfyUI's Train LoRA node, `comfy_extras/nodes_train.py`: every Linear of `diffusion_model.` in BFL
  names, `lora_up/lora_down` and the adapter's `alpha` parameter (1.0), plus `.diff_b` for every bias.
- ComfyUI's extract node, `comfy_extras/nodes_lora_extract.py` (standard, bias_diff on): `lora_up`,
  `lora_down` in fp16 without alpha, and `.diff_b`.
- SimpleTuner (tags v3.1.6, v3.2.3, v3.3.0): its save hook passes peft's state dict through diffusers'
  `convert_state_dict_to_diffusers`, which renames only the attention projections' pairs to `.lora.down`/
  `.lora.up`, to diffusers' `save_lora_weights` with the adapter's config (its checkpoints). Its ComfyUI
  export (`simpletuner/helpers/training/lora_format.py` `convert_diffusers_to_comfyui`) then swaps the
  prefix for `diffusion_model.` (v3.3.0 on keeps FLUX's `transformer.`), spells every pair lora_A/lora_B,
  gives only the respelled ones a float32 `.alpha`, and writes the config unprefixed to the header when
  json.dumps can (not when target_modules is a list, which peft holds as a set).
- OneTrainer, `modules/util/convert_lora_util.py` and `FluxModel.diffusers_to_original`: DIFFUSERS (split
  names, alpha folded into lora_B), KOHYA (`lora_unet_`, fused layers trained fused), ORIGINAL (bare BFL
  names, lora_A/lora_B and `.alpha`), COMFY (the same under `diffusion_model.`), LEGACY (the "mixture":
  `lora_transformer_` + flattened diffusers names). Its INTERNAL backup is its in-memory dict: since the
  2026-07 rework diffusers' names with lora_down/lora_up/`.alpha`; before it (commit 8fd97dcc,
  `modules/util/convert/lora/convert_flux_lora.py`) the OMI layout, `transformer.` + BFL names with fused
  layers trained as parts (`img_attn.qkv.0` is to_q), `img_in.proj`, and the final modulation's lora_up
  swapped to BFL's order (`swap_chunks`), which its SAFETENSORS output also writes with the OMI switch.
- XLabs' x-flux, its DoubleStreamBlockLoraProcessor and SingleStreamBlockLoraProcessor:
  `double_blocks.N.processor.{qkv,proj}_lora{1,2}.{down,up}.weight` (1 the image stream, 2 the text one) and
  `single_blocks.N.processor.{qkv,proj}_lora`, the single block's qkv_lora on linear1's q/k/v rows only and
  its proj_lora on linear2's input; no alpha saved.
- fal's trainers are not public. Its FLUX.1 LoRA API returns a `diffusers_lora_file`, the diffusers/PEFT
  layout ai-toolkit's shows (covered there); its FLUX Kontext trainer's files are what diffusers'
  `_convert_fal_kontext_lora_to_diffusers` (PR #11823) reads: `base_model.model.` + BFL names, lora_A/
  lora_B, every block and `final_layer.linear`, no alpha.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch

from tests.compare import effective, linears
from tests.conftest import fast
from tests.test_fast import fast_predictor  # noqa: F401  (go_fast's quantized copy, on CPU)
from tests.test_lora_coverage import (
    flux,  # noqa: F401  (the meta-device FLUX.1 dev fixture)
    omi_names,
)
from tests.test_lora_formats import data_uri_of

RANK = 4
Pair = tuple[torch.Tensor, torch.Tensor]  # (down, up)

# BFL's module -> the demo transformer's (diffusers') modules its output rows go to, in order, as
# ComfyUI's comfy/ldm/flux/layers.py lays BFL's model out. Written out here rather than taken from
# lora_loading, so the mapping under test is not also the expectation.
BFL_DOUBLE = {
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "img_attn.proj": ["attn.to_out.0"],
    "img_mlp.0": ["ff.net.0.proj"],
    "img_mlp.2": ["ff.net.2"],
    "img_mod.lin": ["norm1.linear"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "txt_attn.proj": ["attn.to_add_out"],
    "txt_mlp.0": ["ff_context.net.0.proj"],
    "txt_mlp.2": ["ff_context.net.2"],
    "txt_mod.lin": ["norm1_context.linear"],
}
# linear1 (q, k, v and the MLP input) is left to test_kohya_linear1_at_full_width: diffusers' converter
# splits it by FLUX.1's own widths (3 x 3072 + 12288), which the demo model does not have.
BFL_SINGLE = {
    "linear2": ["proj_out"],
    "modulation.lin": ["norm.linear"],
}
BFL_IN = {  # kohya's in_dims: img, time, vector, guidance, txt
    "img_in": ["x_embedder"],
    "time_in.in_layer": ["time_text_embed.timestep_embedder.linear_1"],
    "time_in.out_layer": ["time_text_embed.timestep_embedder.linear_2"],
    "vector_in.in_layer": ["time_text_embed.text_embedder.linear_1"],
    "vector_in.out_layer": ["time_text_embed.text_embedder.linear_2"],
    "guidance_in.in_layer": ["time_text_embed.guidance_embedder.linear_1"],
    "guidance_in.out_layer": ["time_text_embed.guidance_embedder.linear_2"],
    "txt_in": ["context_embedder"],
}
BFL_FINAL = {"final_layer.linear": ["proj_out"], "final_layer.adaLN_modulation.1": ["norm_out.linear"]}


def bfl_layers(double: bool = True, single: bool = True, inputs: bool = False, final: bool = False) -> dict:
    layers = {}
    if double:
        layers |= {f"double_blocks.0.{k}": [f"transformer_blocks.0.{t}" for t in v] for k, v in BFL_DOUBLE.items()}
    if single:
        layers |= {
            f"single_blocks.0.{k}": [f"single_transformer_blocks.0.{t}" for t in v] for k, v in BFL_SINGLE.items()
        }
    return layers | (BFL_IN if inputs else {}) | (BFL_FINAL if final else {})


def transformer_of(predictor: Any) -> torch.nn.Module:
    return predictor.engine.models["dev"].text_to_image.transformer


def random_pair(out_features: int, in_features: int, generator: torch.Generator, rank: int = RANK) -> Pair:
    return exact(torch.randn(rank, in_features, generator=generator)), exact(
        torch.randn(out_features, rank, generator=generator)
    )


def exact(values: torch.Tensor) -> torch.Tensor:
    """Multiples of 1/64 below 2: what fp16 and bf16 saves keep exactly, so expectations need no rounding model."""
    return (values * 0.3 * 64).round().clamp(-127, 127) / 64


def fused_file(
    predictor: Any, layers: dict[str, list[str]], seed: int, alpha: float | None
) -> tuple[dict[str, Pair], dict[str, torch.Tensor]]:
    """One pair per BFL layer over its fused output, and the update each diffusers module gets at scale 1."""
    transformer = transformer_of(predictor)
    generator = torch.Generator().manual_seed(seed)
    pairs, expected = {}, {}
    for bfl, targets in layers.items():
        modules = [getattr(transformer.get_submodule(t), "base_layer", transformer.get_submodule(t)) for t in targets]
        down, up = random_pair(sum(m.out_features for m in modules), modules[0].in_features, generator)
        pairs[bfl] = (down, up)
        update = up @ down * ((alpha / RANK) if alpha is not None else 1.0)
        if bfl == "final_layer.adaLN_modulation.1":  # BFL's (shift, scale) is diffusers' (scale, shift)
            update = torch.cat(update.chunk(2)[::-1])
        expected |= dict(zip(targets, update.split([m.out_features for m in modules]), strict=True))
    return pairs, expected


def split_file(predictor: Any, seed: int) -> tuple[dict[str, Pair], dict[str, torch.Tensor]]:
    """One pair per diffusers Linear in the blocks (ai-toolkit's and the diffusers layout's targets)."""
    transformer = transformer_of(predictor)
    generator = torch.Generator().manual_seed(seed)
    pairs, expected = {}, {}
    for name, layer in linears(transformer).items():
        if name.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            base = getattr(layer, "base_layer", layer)
            pairs[name] = random_pair(base.out_features, base.in_features, generator)
            expected[name] = pairs[name][1] @ pairs[name][0]
    return pairs, expected


def check_applies(
    predictor: Any,
    tmp_path: Path,
    state_dict: dict[str, torch.Tensor],
    weights: dict[str, torch.Tensor],
    biases: dict[str, torch.Tensor] | None = None,
    scale: float = 0.7,
) -> None:
    """At lora_scale `scale`, every Linear computes base + scale x its update (none for the rest); then the base."""
    transformer = transformer_of(predictor)
    base_image = fast(predictor, prompt="a cat", output_format="png")[0]
    base = effective(transformer)
    source = data_uri_of(state_dict, tmp_path, "trained")
    adapted = fast(predictor, prompt="a cat", output_format="png", replicate_weights=source, lora_scale=scale)[0]
    assert adapted != base_image
    now = effective(transformer)
    assert set(weights) <= set(now) and set(biases or {}) <= set(now)
    for name, (weight, bias) in now.items():
        want = base[name][0] + scale * weights[name] if name in weights else base[name][0]
        torch.testing.assert_close(weight, want, rtol=1e-4, atol=2e-5, msg=lambda m, name=name: f"{name} weight: {m}")
        if bias is not None:
            want_bias = base[name][1] + scale * biases[name] if biases and name in biases else base[name][1]
            torch.testing.assert_close(
                bias, want_bias, rtol=1e-4, atol=2e-5, msg=lambda m, name=name: f"{name} bias: {m}"
            )
    assert fast(predictor, prompt="a cat", output_format="png")[0] == base_image
    assert all(
        torch.equal(now_w, w) for (now_w, _), (w, _) in zip(effective(transformer).values(), base.values(), strict=True)
    )


def flat(name: str) -> str:
    return name.replace(".", "_")


# ai-toolkit ---------------------------------------------------------------------------------------


def test_ai_toolkit_peft_format(predictor: Any, tmp_path: Path) -> None:
    pairs, expected = split_file(predictor, seed=1)
    state_dict = {}
    for name, (down, up) in pairs.items():
        state_dict[f"transformer.{name}.lora_A.weight"] = down.half()
        state_dict[f"transformer.{name}.lora_B.weight"] = up.half()
    assert len(pairs) == 20  # every Linear of one double (14) and one single block (6)
    check_applies(predictor, tmp_path, state_dict, expected)


def test_ai_toolkit_all_layers_adds_the_norms_as_diff(predictor: Any, tmp_path: Path) -> None:
    """`all_layers`: every weight-bearing leaf that is not Linear (FLUX's RMS norms) is trained whole and
    saved as `<module>.diff`."""
    transformer = transformer_of(predictor)
    fast(predictor, prompt="a cat")
    pairs, expected = split_file(predictor, seed=2)
    state_dict = {}
    for name, (down, up) in pairs.items():
        state_dict[f"transformer.{name}.lora_A.weight"] = down.half()
        state_dict[f"transformer.{name}.lora_B.weight"] = up.half()
    norms = {n: m for n, m in transformer.named_modules() if type(m).__name__ == "RMSNorm"}
    assert len(norms) == 6  # norm_q/k and norm_added_q/k of the double block, norm_q/k of the single one
    generator = torch.Generator().manual_seed(3)
    originals = {n: m.weight.detach().clone() for n, m in norms.items()}
    diffs = {n: (torch.randn(m.weight.shape, generator=generator) * 0.2).half() for n, m in norms.items()}
    state_dict |= {f"transformer.{n}.diff": d for n, d in diffs.items()}
    check_applies(predictor, tmp_path, state_dict, expected)  # the Linears; the norms, at scale 0.7:
    fast(predictor, prompt="a cat", replicate_weights=data_uri_of(state_dict, tmp_path, "norms"), lora_scale=0.7)
    for name, module in norms.items():
        torch.testing.assert_close(module.weight, originals[name] + 0.7 * diffs[name].float(), rtol=0, atol=1e-6)
    fast(predictor, prompt="a cat")
    assert all(torch.equal(module.weight, originals[name]) for name, module in norms.items())


def test_ai_toolkit_lokr_in_peft_format(predictor: Any, tmp_path: Path) -> None:
    """ai-toolkit's LoKr keeps `.alpha` and dotted `transformer.` names; with both factors whole
    (its default for FLUX's widths) the scale is 1, whatever alpha says."""
    transformer = transformer_of(predictor)
    fast(predictor, prompt="a cat")
    generator = torch.Generator().manual_seed(4)
    state_dict, expected = {}, {}
    for name in [
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.ff.net.2",
        "single_transformer_blocks.0.proj_out",
    ]:
        layer = transformer.get_submodule(name)
        w1 = torch.randn(4, 4, generator=generator).half().float()
        w2 = (torch.randn(layer.out_features // 4, layer.in_features // 4, generator=generator) * 0.1).half().float()
        state_dict |= {f"transformer.{name}.lokr_w1": w1.half(), f"transformer.{name}.lokr_w2": w2.half()}
        state_dict[f"transformer.{name}.alpha"] = torch.tensor(10000.0)
        expected[name] = torch.kron(w1, w2)
    check_applies(predictor, tmp_path, state_dict, expected)


# kohya sd-scripts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{}, {"train_blocks": "single"}, {"train_blocks": "double"}, {"in_dims": True}],
    ids=["default", "train_blocks=single", "train_blocks=double", "in_dims"],
)
def test_kohya_sd_scripts(predictor: Any, tmp_path: Path, options: dict) -> None:
    layers = bfl_layers(
        double=options.get("train_blocks") != "single",
        single=options.get("train_blocks") != "double",
        inputs=bool(options.get("in_dims")),
    )
    pairs, expected = fused_file(predictor, layers, seed=5, alpha=2.0)
    state_dict = {}
    for bfl, (down, up) in pairs.items():
        state_dict[f"lora_unet_{flat(bfl)}.lora_down.weight"] = down.bfloat16()
        state_dict[f"lora_unet_{flat(bfl)}.lora_up.weight"] = up.bfloat16()
        state_dict[f"lora_unet_{flat(bfl)}.alpha"] = torch.tensor(2.0).bfloat16()
    check_applies(predictor, tmp_path, state_dict, expected)


def test_kohya_split_qkv_applies_the_scale_it_was_trained_with(predictor: Any, tmp_path: Path) -> None:
    """split_qkv trains q, k, v (and linear1's four parts) as rank-r LoRAs scaled alpha / r each, and saves
    them stacked into one rank-n*r pair with the same alpha. The update meant is each part's own."""
    transformer = transformer_of(predictor)
    fast(predictor, prompt="a cat")
    generator = torch.Generator().manual_seed(6)
    state_dict, expected = {}, {}
    alpha = 2.0
    for bfl, targets in bfl_layers().items():
        modules = [transformer.get_submodule(t) for t in targets]
        parts = [random_pair(m.out_features, m.in_features, generator) for m in modules]
        for target, (down, up) in zip(targets, parts, strict=True):
            expected[target] = up @ down * (alpha / RANK)
        # sd-scripts' LoRANetwork.state_dict with split_qkv: downs stacked, ups on the block diagonal.
        down = torch.cat([d for d, _ in parts])
        up = torch.zeros(sum(u.shape[0] for _, u in parts), RANK * len(parts))
        row = 0
        for index, (_, part_up) in enumerate(parts):
            up[row : row + part_up.shape[0], index * RANK : (index + 1) * RANK] = part_up
            row += part_up.shape[0]
        state_dict[f"lora_unet_{flat(bfl)}.lora_down.weight"] = down
        state_dict[f"lora_unet_{flat(bfl)}.lora_up.weight"] = up
        state_dict[f"lora_unet_{flat(bfl)}.alpha"] = torch.tensor(alpha)
    assert state_dict["lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight"].shape[0] == 3 * RANK
    check_applies(predictor, tmp_path, state_dict, expected)


@pytest.mark.parametrize("split_qkv", [False, True])
def test_kohya_linear1_at_full_width(flux: Any, split_qkv: bool) -> None:  # noqa: F811
    """A single block's linear1 at FLUX.1's real widths (on a meta-device FLUX.1 dev, the LoRA's own tensors
    real): each of q, k, v and the MLP input gets its rows of the update, at alpha / r per part with
    split_qkv (stacked downs, block-diagonal up) and alpha / r of the whole pair without it."""
    from lora_loading.formats import check_lora_matches
    from lora_loading.slots import lora_factors

    targets = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
    widths = [3072, 3072, 3072, 12288]
    generator = torch.Generator().manual_seed(15)
    alpha = 2.0
    if split_qkv:
        parts = [random_pair(width, 3072, generator) for width in widths]
        down = torch.cat([d for d, _ in parts])
        up = torch.block_diag(*[u for _, u in parts])
        expected = [u @ d * (alpha / RANK) for d, u in parts]
    else:
        down, up = random_pair(sum(widths), 3072, generator)
        expected = list((up @ down * (alpha / RANK)).split(widths))
    state_dict = {
        "lora_unet_single_blocks_0_linear1.lora_down.weight": down,
        "lora_unet_single_blocks_0_linear1.lora_up.weight": up,
        "lora_unet_single_blocks_0_linear1.alpha": torch.tensor(alpha),
    }
    factors = lora_factors(check_lora_matches(flux, state_dict, "lora_weights"))
    assert set(factors) == {f"single_transformer_blocks.0.{target}" for target in targets}
    for target, want in zip(targets, expected, strict=True):
        lora_down, lora_up = factors[f"single_transformer_blocks.0.{target}"]
        torch.testing.assert_close(lora_up @ lora_down, want, rtol=1e-5, atol=1e-6, msg=target)


# ComfyUI -------------------------------------------------------------------------------------------


def bias_deltas(predictor: Any, layers: dict[str, list[str]], seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """A `.diff_b` per BFL layer (fused, in BFL's order) and what each diffusers bias gets at scale 1."""
    transformer = transformer_of(predictor)
    generator = torch.Generator().manual_seed(seed)
    deltas, expected = {}, {}
    for bfl, targets in layers.items():
        widths = [transformer.get_submodule(t).out_features for t in targets]
        delta = exact(torch.randn(sum(widths), generator=generator))
        deltas[bfl] = delta
        if bfl == "final_layer.adaLN_modulation.1":
            delta = torch.cat(delta.chunk(2)[::-1])
        expected |= dict(zip(targets, delta.split(widths), strict=True))
    return deltas, expected


def test_comfyui_train_lora_node(predictor: Any, tmp_path: Path) -> None:
    """Every Linear of the model, BFL names under `diffusion_model.`, the adapter's alpha parameter (1.0)
    saved beside its pair, and a `.diff_b` for every bias; bf16, the node's default lora_dtype."""
    fast(predictor, prompt="a cat")
    layers = bfl_layers(inputs=True, final=True)
    pairs, expected = fused_file(predictor, layers, seed=7, alpha=1.0)
    deltas, expected_biases = bias_deltas(predictor, layers, seed=8)
    state_dict = {}
    for bfl, (down, up) in pairs.items():
        state_dict[f"diffusion_model.{bfl}.lora_up.weight"] = up.bfloat16()
        state_dict[f"diffusion_model.{bfl}.lora_down.weight"] = down.bfloat16()
        state_dict[f"diffusion_model.{bfl}.alpha"] = torch.tensor(1.0).bfloat16()
        state_dict[f"diffusion_model.{bfl}.diff_b"] = deltas[bfl].bfloat16()
    assert len(pairs) == 22  # 23 with linear1 (see test_kohya_linear1_at_full_width)
    check_applies(predictor, tmp_path, state_dict, expected, expected_biases)


def test_comfyui_extract_node(predictor: Any, tmp_path: Path) -> None:
    fast(predictor, prompt="a cat")
    layers = bfl_layers(inputs=True, final=True)
    pairs, expected = fused_file(predictor, layers, seed=9, alpha=None)
    deltas, expected_biases = bias_deltas(predictor, layers, seed=10)
    state_dict = {}
    for bfl, (down, up) in pairs.items():
        state_dict[f"diffusion_model.{bfl}.lora_up.weight"] = up.half()
        state_dict[f"diffusion_model.{bfl}.lora_down.weight"] = down.half()
        state_dict[f"diffusion_model.{bfl}.diff_b"] = deltas[bfl].half()
    check_applies(predictor, tmp_path, state_dict, expected, expected_biases)


# SimpleTuner ----------------------------------------------------------------------------------------

ATTENTION_PROJECTIONS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")


def simpletuner_checkpoint(pairs: dict[str, Pair]) -> dict[str, torch.Tensor]:
    """What SimpleTuner's save hook hands diffusers' save_lora_weights: peft's state dict through diffusers'
    `convert_state_dict_to_diffusers(..., StateDictType.PEFT)`, which renames the attention projections'
    pairs only (`.lora.down`/`.lora.up`); save_lora_weights then prefixes `transformer.`."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from diffusers.utils.state_dict_utils import StateDictType

    peft_names = {}
    for name, (down, up) in pairs.items():
        peft_names |= {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}
    return convert_state_dict_to_diffusers(peft_names, original_type=StateDictType.PEFT)


def simpletuner_adapter_config(json_able: bool) -> dict:
    """`_collate_lora_metadata`: the trained adapter's peft config as it is. With target_modules a list, peft
    holds a set, which SimpleTuner's ComfyUI save cannot write as JSON (it then writes no config); a regex
    string can be."""
    from peft import LoraConfig

    # Every Linear of the blocks, as SimpleTuner's "all" target list for FLUX names them (or the same as a regex).
    names = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    names += ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear"]
    names += ["norm1_context.linear", "norm.linear", "proj_mlp", "proj_out"]
    targets = rf".*\.({'|'.join(re.escape(name) for name in names)})" if json_able else names
    return LoraConfig(r=RANK, lora_alpha=2.0 * RANK, target_modules=targets).to_dict()


def simpletuner_comfyui(mixed: dict[str, torch.Tensor], config: dict, prefix: str) -> tuple[dict, dict[str, str]]:
    """SimpleTuner's ComfyUI export (`simpletuner/helpers/training/lora_format.py`, `convert_diffusers_to_comfyui`
    and common.py's `comfyui_save_function`, v3.1.6 to v3.3): the component prefix becomes `diffusion_model.`
    (v3.3.0 on keeps FLUX's `transformer.`), `.lora.down`/`.lora.up` become lora_A/lora_B and only those
    layers get a float32 `.alpha` (the config's lora_alpha), appended after the tensors; the config goes to
    the header unprefixed, indented and sorted, when json.dumps can write it."""
    import json

    state_dict, alphas = {}, {}
    for key, tensor in mixed.items():
        key = f"{prefix}{key}"
        if ".lora.down." in key:
            key = key.replace(".lora.down.", ".lora_A.")
            alphas[f"{key.rsplit('.lora_A.', 1)[0]}.alpha"] = torch.tensor(config["lora_alpha"], dtype=torch.float32)
        key = key.replace(".lora.up.", ".lora_B.")
        state_dict[key] = tensor
    metadata = {"format": "pt"}
    try:
        metadata["lora_adapter_metadata"] = json.dumps(config, indent=2, sort_keys=True)
    except TypeError:
        pass
    return state_dict | alphas, metadata


def saved(state_dict: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> str:
    import safetensors.torch

    from tests.conftest import data_uri

    safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path), metadata=metadata)
    return data_uri(path)


@pytest.mark.parametrize("prefix", ["diffusion_model.", "transformer."], ids=["v3.1.6-v3.2.3", "v3.3.0-on"])
@pytest.mark.parametrize("json_able", [True, False], ids=["config-in-header", "no-config"])
def test_simpletuner_comfyui_export(predictor: Any, tmp_path: Path, prefix: str, json_able: bool) -> None:
    """lora_alpha 2 x rank. The attention projections carry it as `.alpha`; the other layers only in the
    header's config, and where the config could not be written the file says scale 1 for them (as ComfyUI,
    which the export is for, reads it: a pair without alpha)."""
    pairs, expected = split_file(predictor, seed=11)
    config = simpletuner_adapter_config(json_able)
    state_dict, metadata = simpletuner_comfyui(simpletuner_checkpoint(pairs), config, prefix)
    assert ("lora_adapter_metadata" in metadata) == json_able
    assert any(key.startswith(f"{prefix}single_transformer_blocks.0.attn.to_k.lora_A") for key in state_dict)
    with_alpha = {key.removeprefix(prefix).removesuffix(".alpha") for key in state_dict if key.endswith(".alpha")}
    assert with_alpha == {name for name in pairs if name.endswith(ATTENTION_PROJECTIONS)}  # 7 of 20
    scales = {name: 2.0 if name in with_alpha or json_able else 1.0 for name in pairs}
    check_saved(predictor, saved(state_dict, metadata, tmp_path / "comfyui.safetensors"), expected, scales)


def check_saved(
    predictor: Any, source: str, updates: dict[str, torch.Tensor], scales: dict[str, float], lora_scale: float = 0.5
) -> None:
    """check_applies for a file written with its header: each layer gets lora_scale x its scale x its update."""
    transformer = transformer_of(predictor)
    base_image = fast(predictor, prompt="a cat", output_format="png")[0]
    base = effective(transformer)
    fast(predictor, prompt="a cat", replicate_weights=source, lora_scale=lora_scale)
    for name, (weight, _) in effective(transformer).items():
        want = base[name][0] + lora_scale * scales[name] * updates[name] if name in updates else base[name][0]
        torch.testing.assert_close(weight, want, rtol=1e-4, atol=2e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert fast(predictor, prompt="a cat", output_format="png")[0] == base_image


def simpletuner_saved_checkpoint(pairs: dict[str, Pair], folder: Path) -> Path:
    """An intermediate checkpoint as SimpleTuner writes it: diffusers' FluxPipeline.save_lora_weights with the
    mixed names and the adapter's config (diffusers writes it to the header, prefixed `transformer.`)."""
    from diffusers import FluxPipeline

    FluxPipeline.save_lora_weights(
        folder,
        transformer_lora_layers=simpletuner_checkpoint(pairs),
        transformer_lora_adapter_metadata=simpletuner_adapter_config(json_able=False),
    )
    return folder / "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("blocks", ["all", "double"])
def test_simpletuner_checkpoint_mixes_two_spellings(predictor: Any, tmp_path: Path, blocks: str) -> None:
    """Read in sorted order, a file with a single block starts with `...single_transformer_blocks.0.attn.to_k.
    lora.down.weight` (which diffusers converts whole); one of double blocks only with `...attn.add_k_proj.
    lora_A.weight` (after which diffusers drops every `.lora.down` pair). Both load whole, alpha 2 x rank."""
    from tests.conftest import data_uri

    pairs, expected = split_file(predictor, seed=21)
    if blocks == "double":
        pairs = {name: pair for name, pair in pairs.items() if name.startswith("transformer_blocks.")}
    path = simpletuner_saved_checkpoint(pairs, tmp_path / "checkpoint")
    with safetensors.safe_open(str(path), framework="pt") as opened:
        first = sorted(opened.keys())[0]  # noqa: SIM118
    assert first.endswith(".lora.down.weight" if blocks == "all" else ".lora_A.weight")
    check_saved(predictor, data_uri(path), {name: expected[name] for name in pairs}, dict.fromkeys(pairs, 2.0))


def test_simpletuner_checkpoint_loads_whatever_its_key_order(predictor: Any) -> None:
    """diffusers decides on the first key; what is read here must not depend on the order at all."""
    import random

    from lora_loading.formats import match_lora, spelled_as_read

    pairs, _ = split_file(predictor, seed=22)
    mixed = {f"transformer.{key}": tensor for key, tensor in simpletuner_checkpoint(pairs).items()}
    pipeline = predictor.engine.models["dev"].text_to_image
    fast(predictor, prompt="a cat")  # nothing loaded
    reference, _ = match_lora(pipeline, spelled_as_read(mixed, {}, "replicate_weights"), "replicate_weights")
    assert len(reference) == 2 * len(pairs)
    shuffler = random.Random(5)
    for _ in range(8):
        keys = list(mixed)
        shuffler.shuffle(keys)
        shuffled = {key: mixed[key] for key in keys}
        loaded, _ = match_lora(pipeline, spelled_as_read(shuffled, {}, "replicate_weights"), "replicate_weights")
        assert loaded.keys() == reference.keys()
        assert all(torch.equal(loaded[key], reference[key]) for key in reference)


def test_simpletuner_checkpoint_loads_as_diffusers_loads_it_when_diffusers_can(predictor: Any, tmp_path: Path) -> None:
    """The real reader: where the first key lets diffusers convert the file, its own loading (the header's
    alpha through peft's scaling) and ours (alpha folded into A) load the same weights."""
    import copy

    from diffusers import FluxPipeline

    from tests.compare import assert_same_weights, loaded_weights
    from tests.conftest import data_uri

    pairs, _ = split_file(predictor, seed=23)
    path = simpletuner_saved_checkpoint(pairs, tmp_path / "checkpoint")
    fast(predictor, prompt="a cat")  # nothing loaded: plain modules to copy
    reference = copy.deepcopy(transformer_of(predictor))
    base = loaded_weights({"t": reference})
    state_dict, alphas, metadata = FluxPipeline.lora_state_dict(
        str(path), return_alphas=True, return_lora_metadata=True
    )
    FluxPipeline.load_lora_into_transformer(state_dict, network_alphas=alphas, transformer=reference, metadata=metadata)
    fast(predictor, prompt="a cat", replicate_weights=data_uri(path), lora_scale=1.0)
    ours, theirs = loaded_weights({"t": transformer_of(predictor)}), loaded_weights({"t": reference})
    assert_same_weights(ours, theirs)
    changed = {name for name in base if not torch.equal(base[name], theirs[name])}
    assert changed == {f"t.{name}.weight" for name in pairs}


# OneTrainer -----------------------------------------------------------------------------------------


ONETRAINER_FUSED = {
    # format: how a BFL layer's pair is named; its alpha key, or None when alpha is folded into B
    "KOHYA": lambda bfl: (
        f"lora_unet_{flat(bfl)}.lora_down.weight",
        f"lora_unet_{flat(bfl)}.lora_up.weight",
        f"lora_unet_{flat(bfl)}.alpha",
    ),
    "ORIGINAL": lambda bfl: (f"{bfl}.lora_A.weight", f"{bfl}.lora_B.weight", f"{bfl}.alpha"),
    "COMFY": lambda bfl: (
        f"diffusion_model.{bfl}.lora_A.weight",
        f"diffusion_model.{bfl}.lora_B.weight",
        f"diffusion_model.{bfl}.alpha",
    ),
}


@pytest.mark.parametrize("output_format", list(ONETRAINER_FUSED))
def test_onetrainer_fused_formats(predictor: Any, tmp_path: Path, output_format: str) -> None:
    """KOHYA, ORIGINAL and COMFY export fused q/k/v, which OneTrainer then trains fused (one pair over the
    fused output, its needs_qkv_fusion), with the final layer's halves swapped to BFL's order."""
    pairs, expected = fused_file(predictor, bfl_layers(inputs=True, final=True), seed=12, alpha=1.0)
    namer = ONETRAINER_FUSED[output_format]
    state_dict = {}
    for bfl, (down, up) in pairs.items():
        down_key, up_key, alpha_key = namer(bfl)
        state_dict |= {down_key: down, up_key: up, alpha_key: torch.tensor(1.0)}
    check_applies(predictor, tmp_path, state_dict, expected)


def test_onetrainer_diffusers_format(predictor: Any, tmp_path: Path) -> None:
    """Split names, alpha folded into lora_B (convert_lora_suffix_ab with peft_convention), no `.alpha`."""
    pairs, expected = split_file(predictor, seed=13)
    state_dict = {}
    for name, (down, up) in pairs.items():
        state_dict[f"transformer.{name}.lora_A.weight"] = down
        state_dict[f"transformer.{name}.lora_B.weight"] = up * (1.0 / RANK)  # alpha 1, rank 4, folded
    check_applies(predictor, tmp_path, state_dict, {k: v / RANK for k, v in expected.items()})


def test_onetrainer_legacy_mixture_format(predictor: Any, tmp_path: Path) -> None:
    """convert_to_mixture: `lora_transformer_` and the diffusers module path flattened, native suffixes, alpha."""
    pairs, expected = split_file(predictor, seed=14)
    state_dict = {}
    for name, (down, up) in pairs.items():
        state_dict[f"lora_transformer_{flat(name)}.lora_down.weight"] = down
        state_dict[f"lora_transformer_{flat(name)}.lora_up.weight"] = up
        state_dict[f"lora_transformer_{flat(name)}.alpha"] = torch.tensor(float(RANK) / 2)
    check_applies(predictor, tmp_path, state_dict, {k: v / 2 for k, v in expected.items()})


def test_onetrainer_dora_magnitude_spelling_is_peft_s(predictor: Any, tmp_path: Path) -> None:
    """OneTrainer's DIFFUSERS format names peft's DoRA magnitude `lora_magnitude_vector.weight`."""
    from tests.test_lora_formats import assert_applies_alike, peft_dora

    _, state_dict = peft_dora(predictor)
    respelled = {
        re.sub(r"\.lora_magnitude_vector$", ".lora_magnitude_vector.weight", k): v for k, v in state_dict.items()
    }
    assert respelled.keys() != state_dict.keys()
    assert_applies_alike(
        predictor, data_uri_of(respelled, tmp_path, "onetrainer"), data_uri_of(state_dict, tmp_path, "peft")
    )


def omi_alpha(omi: str) -> float:
    """OneTrainer's default alpha (1.0), and other alphas on some parts, so each part's own must apply."""
    return 8.0 if omi.endswith((".qkv.1", "linear1.3")) else 2.0 if omi.startswith("final_layer.") else 1.0


def omi_file(predictor: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Its INTERNAL backup (`lora/lora.safetensors`, the training dtype: float32) and its SAFETENSORS output
    with the OMI switch: lora_down/lora_up and a float32 `.alpha` per part, for every Linear; and the update
    each module gets at scale 1."""
    transformer = transformer_of(predictor)
    generator = torch.Generator().manual_seed(31)
    state_dict, expected = {}, {}
    for omi, name in omi_names(double_blocks=1, single_blocks=1).items():
        layer = getattr(transformer.get_submodule(name), "base_layer", transformer.get_submodule(name))
        down, up = random_pair(layer.out_features, layer.in_features, generator)
        written = torch.cat(up.chunk(2)[::-1]) if omi == "final_layer.adaLN_modulation.1" else up
        state_dict |= {
            f"transformer.{omi}.lora_down.weight": down,
            f"transformer.{omi}.lora_up.weight": written,
            f"transformer.{omi}.alpha": torch.tensor(omi_alpha(omi)),
        }
        expected[name] = up @ down * (omi_alpha(omi) / RANK)
    assert len(expected) == len(linears(transformer)) == 30  # 14 in the double block, 6 in the single, 10 outside
    return state_dict, expected


def test_onetrainer_omi_layout(predictor: Any, tmp_path: Path) -> None:
    check_applies(predictor, tmp_path, *omi_file(predictor))


def test_onetrainer_omi_layout_trains_the_text_encoders_under_their_own_names(predictor: Any, tmp_path: Path) -> None:
    """`clip_l.` + transformers' CLIP names (with `text_model.`), `t5.` + T5's."""
    pipeline = predictor.engine.models["dev"].text_to_image
    fast(predictor, prompt="a cat")
    layers = {
        "clip_l.text_model.encoder.layers.0.self_attn.q_proj": (
            pipeline.text_encoder,
            "encoder.layers.0.self_attn.q_proj",
        ),
        "t5.encoder.block.0.layer.1.DenseReluDense.wo": (
            pipeline.text_encoder_2,
            "encoder.block.0.layer.1.DenseReluDense.wo",
        ),
    }
    generator = torch.Generator().manual_seed(32)
    state_dict, expected, base = {}, {}, {}
    for omi, (model, name) in layers.items():
        layer = model.get_submodule(name)
        down, up = random_pair(layer.out_features, layer.in_features, generator)
        state_dict |= {f"{omi}.lora_down.weight": down, f"{omi}.lora_up.weight": up, f"{omi}.alpha": torch.tensor(2.0)}
        expected[omi] = up @ down * (2.0 / RANK)
        base[omi] = effective_weight(layer)
    fast(predictor, prompt="a cat", replicate_weights=data_uri_of(state_dict, tmp_path, "omi-te"), lora_scale=0.5)
    for omi, (model, name) in layers.items():
        torch.testing.assert_close(effective_weight(model.get_submodule(name)), base[omi] + 0.5 * expected[omi])
    fast(predictor, prompt="a cat")
    assert all(
        torch.equal(effective_weight(model.get_submodule(name)), base[omi]) for omi, (model, name) in layers.items()
    )


def effective_weight(layer: torch.nn.Module) -> torch.Tensor:
    return effective(torch.nn.ModuleDict({"layer": layer}))["layer"][0]


def test_onetrainer_omi_names_outside_flux_are_refused_by_name(predictor: Any, tmp_path: Path) -> None:
    from errors import InputError

    transformer = transformer_of(predictor)
    base_image = fast(predictor, prompt="a cat", output_format="png")[0]
    generator = torch.Generator().manual_seed(33)
    layer = transformer.get_submodule("transformer_blocks.0.attn.to_q")
    down, up = random_pair(layer.out_features, layer.in_features, generator)
    state_dict = {}
    for omi in ("double_blocks.0.img_attn.qkv.0", "double_blocks.0.img_attn.qkv.3"):  # BFL's qkv has 3 parts
        state_dict |= {f"transformer.{omi}.lora_down.weight": down, f"transformer.{omi}.lora_up.weight": up}
    with pytest.raises(
        InputError,
        match=r"2 of its 4 LoRA tensors match no FLUX.1 layer.*transformer\.double_blocks\.0\.img_attn\.qkv\.3\.lora",
    ):
        fast(predictor, prompt="a cat", replicate_weights=data_uri_of(state_dict, tmp_path, "omi-bad"))
    assert fast(predictor, prompt="a cat", output_format="png")[0] == base_image


def test_onetrainer_internal_format_honours_its_alpha(predictor: Any, tmp_path: Path) -> None:
    """Since its 2026-07 rework the INTERNAL backup is the raw in-memory dict: diffusers' module names with
    kohya's suffixes (`lora_down`/`lora_up`/`.alpha`). diffusers loads it at scale 1; the alpha is 2 x rank."""
    pairs, expected = split_file(predictor, seed=34)
    state_dict = {}
    for name, (down, up) in pairs.items():
        state_dict |= {
            f"transformer.{name}.lora_down.weight": down,
            f"transformer.{name}.lora_up.weight": up,
            f"transformer.{name}.alpha": torch.tensor(2.0 * RANK),
        }
    check_applies(predictor, tmp_path, state_dict, {name: 2.0 * update for name, update in expected.items()})


# fal ------------------------------------------------------------------------------------------------


def fal_kontext_file(predictor: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """fal's FLUX Kontext trainer (the layout diffusers PR #11823 reads): peft's `base_model.model.` over BFL
    names, lora_A/lora_B in bf16, no alpha (scale 1), for the blocks and the final layer's linear only."""
    layers = bfl_layers() | {"final_layer.linear": ["proj_out"]}
    pairs, expected = fused_file(predictor, layers, seed=35, alpha=None)
    state_dict = {}
    for bfl, (down, up) in pairs.items():
        state_dict[f"base_model.model.{bfl}.lora_A.weight"] = down.bfloat16()
        state_dict[f"base_model.model.{bfl}.lora_B.weight"] = up.bfloat16()
    return state_dict, expected


def test_fal_kontext_trainer(predictor: Any, tmp_path: Path) -> None:
    check_applies(predictor, tmp_path, *fal_kontext_file(predictor))


# go_fast's slot -------------------------------------------------------------------------------------


def simpletuner_comfyui_file(predictor: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The v3.1.6-v3.2.3 export without its config: alpha 2 x rank on the attention projections only."""
    pairs, expected = split_file(predictor, seed=11)
    mixed = simpletuner_checkpoint(pairs)
    state_dict, _ = simpletuner_comfyui(mixed, simpletuner_adapter_config(False), "diffusion_model.")
    return state_dict, {n: u * (2.0 if n.endswith(ATTENTION_PROJECTIONS) else 1.0) for n, u in expected.items()}


@pytest.mark.parametrize(
    "make", [omi_file, fal_kontext_file, simpletuner_comfyui_file], ids=["OneTrainer OMI", "fal Kontext", "SimpleTuner"]
)
def test_go_fast_s_slot_takes_these_layouts_alike(
    predictor: Any,
    fast_predictor: Any,  # noqa: F811
    tmp_path: Path,
    make: Any,
) -> None:
    """go_fast writes the same converted pairs into its slot: each layer of the fast copy computes its own
    (quantized) weight plus scale x the update, and nothing else changes."""
    state_dict, expected = make(predictor)
    transformer = fast_predictor.engine.models["dev"].fast_pipelines["txt2img"].transformer
    fast(fast_predictor, prompt="a cat", go_fast=True)
    base = effective(transformer)
    source = data_uri_of(state_dict, tmp_path, "layout")
    fast(fast_predictor, prompt="a cat", go_fast=True, replicate_weights=source, lora_scale=0.7)
    for name, (weight, _) in effective(transformer).items():
        want = base[name][0] + 0.7 * expected[name] if name in expected else base[name][0]
        torch.testing.assert_close(weight, want, rtol=1e-4, atol=5e-5, msg=lambda m, name=name: f"{name}: {m}")


# XLabs ---------------------------------------------------------------------------------------------


def test_xlabs_x_flux(predictor: Any, tmp_path: Path) -> None:
    layers = {
        "double_blocks.0.processor.qkv_lora1": [f"transformer_blocks.0.attn.to_{p}" for p in "qkv"],
        "double_blocks.0.processor.proj_lora1": ["transformer_blocks.0.attn.to_out.0"],
        "double_blocks.0.processor.qkv_lora2": [f"transformer_blocks.0.attn.add_{p}_proj" for p in "qkv"],
        "double_blocks.0.processor.proj_lora2": ["transformer_blocks.0.attn.to_add_out"],
        "single_blocks.0.processor.qkv_lora": [f"single_transformer_blocks.0.attn.to_{p}" for p in "qkv"],
        "single_blocks.0.processor.proj_lora": ["single_transformer_blocks.0.proj_out"],
    }
    pairs, expected = fused_file(predictor, layers, seed=16, alpha=None)
    state_dict = {}
    for name, (down, up) in pairs.items():
        state_dict |= {f"{name}.down.weight": down, f"{name}.up.weight": up}
    check_applies(predictor, tmp_path, state_dict, expected)


def onetrainer_dora_file(
    predictor: Any, output_format: str, scale: float
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """OneTrainer's DoRA at its default axis (dora_on_output off: one magnitude per input column), as
    DoRAModule trains it: W' = m * (W + dW) / ||W + dW||, the norm over each input column of the layer
    it wraps (fused q/k/v in the KOHYA format). And the weight each diffusers module should then hold."""
    transformer = transformer_of(predictor)
    generator = torch.Generator().manual_seed(17)
    if output_format == "KOHYA":
        layers = {
            k: v
            for k, v in bfl_layers(final=True).items()
            if k.endswith(("img_attn.qkv", "linear2", "adaLN_modulation.1"))
        }
    else:
        layers = {
            n: [n]
            for n in ["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_out", "norm_out.linear"]
        }
    state_dict, expected = {}, {}
    for name, targets in layers.items():
        weights = [transformer.get_submodule(t).weight.detach().float() for t in targets]
        fused = torch.cat(weights)
        if name == "final_layer.adaLN_modulation.1":  # BFL's row order
            fused = torch.cat(fused.chunk(2)[::-1])
        down, up = random_pair(fused.shape[0], fused.shape[1], generator)
        update = up @ down * (1.0 / RANK)  # alpha 1
        magnitude = fused.norm(dim=0, keepdim=True) * (1 + 0.2 * torch.rand(1, fused.shape[1], generator=generator))
        recomposed = fused + scale * update
        recomposed = magnitude * recomposed / recomposed.norm(dim=0, keepdim=True)
        if name == "final_layer.adaLN_modulation.1":
            recomposed = torch.cat(recomposed.chunk(2)[::-1])
        expected |= dict(zip(targets, recomposed.split([w.shape[0] for w in weights]), strict=True))
        if output_format in ("KOHYA", "LEGACY"):
            key = f"{'lora_unet' if output_format == 'KOHYA' else 'lora_transformer'}_{flat(name)}"
            state_dict |= {
                f"{key}.lora_down.weight": down,
                f"{key}.lora_up.weight": up,
                f"{key}.alpha": torch.tensor(1.0),
            }
        elif output_format == "DIFFUSERS":  # alpha folded into lora_B; a per-input magnitude stays `dora_scale`
            key = f"transformer.{name}"
            state_dict |= {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up / RANK}
        else:  # INTERNAL: the in-memory dict, since 2026-07 in diffusers' names, before in OMI's
            omi = {module: omi for omi, module in omi_names(double_blocks=1, single_blocks=1).items()}
            key = f"transformer.{name if output_format == 'INTERNAL' else omi[name]}"
            written = torch.cat(up.chunk(2)[::-1]) if key.endswith("adaLN_modulation.1") else up
            state_dict |= {
                f"{key}.lora_down.weight": down,
                f"{key}.lora_up.weight": written,
                f"{key}.alpha": torch.tensor(1.0),
            }
        state_dict[f"{key}.dora_scale"] = magnitude
    return state_dict, expected


@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("output_format", ["KOHYA", "DIFFUSERS", "LEGACY", "INTERNAL", "OMI"])
def test_onetrainer_dora_per_input_column(predictor: Any, tmp_path: Path, output_format: str, scale: float) -> None:
    """Recomposed into the weights: at scale 1 what OneTrainer trained; otherwise peft's definition, the
    scale on dW inside the normalisation. Every other layer untouched; then the base, bit for bit."""
    transformer = transformer_of(predictor)
    base_image = fast(predictor, prompt="a cat", output_format="png")[0]
    base = effective(transformer)
    state_dict, expected = onetrainer_dora_file(predictor, output_format, scale)
    source = data_uri_of(state_dict, tmp_path, "dora")
    assert (
        fast(predictor, prompt="a cat", output_format="png", replicate_weights=source, lora_scale=scale)[0]
        != base_image
    )
    for name, (weight, _) in effective(transformer).items():
        want = expected.get(name, base[name][0])
        torch.testing.assert_close(weight, want, rtol=1e-4, atol=2e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert fast(predictor, prompt="a cat", output_format="png")[0] == base_image


# peft's own save_pretrained --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peft_saved(predictor: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A PeftModel around a copy of the demo transformer, saved by peft's save_pretrained: the folder
    (adapter_model.safetensors, with `base_model.model.` keys, and adapter_config.json, which alone holds
    the alpha and alpha_pattern), and the model, whose layers compute what the file means."""
    import copy

    from peft import LoraConfig, get_peft_model

    transformer = copy.deepcopy(transformer_of(predictor))
    transformer.unload_lora()  # the copy of whatever an earlier test left loaded
    config = LoraConfig(
        r=RANK,
        lora_alpha=2 * RANK,
        alpha_pattern={"ff.net.2": RANK},
        target_modules=["attn.to_q", "attn.to_v", "ff.net.2", "proj_out"],
        init_lora_weights=False,
    )
    torch.manual_seed(18)
    model = get_peft_model(transformer, config)
    folder = tmp_path_factory.mktemp("peft") / "my-lora"
    model.save_pretrained(str(folder))
    return folder, model


def check_peft_saved(predictor: Any, source: str, reference: torch.nn.Module) -> None:
    base_image = fast(predictor, prompt="a cat", output_format="png")[0]
    assert fast(predictor, prompt="a cat", output_format="png", replicate_weights=source)[0] != base_image
    transformer = transformer_of(predictor)
    adapted = 0
    for name, layer in linears(transformer).items():
        theirs = reference.base_model.model.get_submodule(name)
        x = torch.randn(2, getattr(theirs, "base_layer", theirs).in_features)
        torch.testing.assert_close(layer(x), theirs(x), rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
        adapted += hasattr(theirs, "base_layer")
    assert adapted == 7  # to_q, to_v in both blocks, ff.net.2, proj_out in the single block and the final one
    assert fast(predictor, prompt="a cat", output_format="png")[0] == base_image


def test_peft_save_pretrained_from_a_local_folder(
    predictor: Any, peft_saved: tuple, demo_models: Any, tmp_path: Path
) -> None:
    """A deployment's FLUX_MAIN_LORA naming the saved file: the config beside it is read."""
    import shutil

    from tests.conftest import data_uri, make_predictor, predictor_env

    folder, _ = peft_saved
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    env = predictor_env(demo_models, tmp_path / "cache", FLUX_MAIN_LORA=str(folder / "adapter_model.safetensors"))
    trained = make_predictor(env, "TrainedLoraPredictor")
    archive = data_uri(Path(shutil.make_archive(str(tmp_path / "lora"), "zip", folder.parent, folder.name)))
    want = fast(predictor, prompt="a cat", output_format="png", replicate_weights=archive)[0]
    assert fast(trained, prompt="a cat", output_format="png")[0] == want


@pytest.mark.parametrize("packing", ["zip", "tar.gz"])
def test_peft_save_pretrained_in_an_archive(predictor: Any, peft_saved: tuple, tmp_path: Path, packing: str) -> None:
    import shutil

    from tests.conftest import data_uri

    folder, reference = peft_saved
    archive = shutil.make_archive(
        str(tmp_path / "lora"), "zip" if packing == "zip" else "gztar", folder.parent, folder.name
    )
    check_peft_saved(predictor, data_uri(Path(archive)), reference)


def test_peft_save_pretrained_from_a_hugging_face_repository(
    predictor: Any, peft_saved: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.fake_hosts import start_fake_host

    folder, reference = peft_saved
    hub = start_fake_host()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    try:
        hub.serve_hf_repo("me/peft-lora", {p.name: p.read_bytes() for p in folder.iterdir()})
        check_peft_saved(predictor, "huggingface.co/me/peft-lora", reference)
        assert any(path.endswith("/adapter_config.json") for path in hub.requests)
    finally:
        hub.close()


def test_peft_save_pretrained_without_its_config_is_refused(predictor: Any, peft_saved: tuple) -> None:
    """The alpha is not in the file: any guess would apply another LoRA."""
    from errors import InputError
    from tests.conftest import data_uri

    folder, _ = peft_saved
    base_image = fast(predictor, prompt="a cat", output_format="png")[0]
    with pytest.raises(InputError) as caught:
        fast(predictor, prompt="a cat", replicate_weights=data_uri(folder / "adapter_model.safetensors"))
    assert str(caught.value) == (
        "Invalid replicate_weights: its keys are diffusers module names under base_model.model., as peft's "
        "save_pretrained writes them, and such a file's alpha is kept in the adapter_config.json beside it, which "
        "did not come with it; give the Hugging Face repository, or a .zip or .tar holding both files."
    )
    assert fast(predictor, prompt="a cat", output_format="png")[0] == base_image
