"""LyCORIS files as LyCORIS itself writes them, and the updates it computes for them.

`lycoris-lora` (a test requirement) wraps a copy of the demo transformer, its parameters get random
values, and `save_weights` writes the file, as SimpleTuner saves its LyCORIS runs (`lycoris_` and the
diffusers module path). The wrapped copy's forward, which is what training optimised, gives what
the file stands for: every adapted layer of the predictor must compute what it computes, and a
request without the file must find the base model bit for bit.

Not `merge_to`: in lycoris-lora 4.1.3 a LoKr's or LoHa's `get_diff_weight` multiplies by its scale
(alpha / rank) a second time, which its forward does not. ComfyUI's loader applies it once, as here.

kohya's LyCORIS runs name BFL's modules (`lora_unet_double_blocks_0_img_attn_qkv`), whose fused
layers split by rows over diffusers' modules; those are built here as BFL-shaped layers for
LyCORIS to wrap.
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from lycoris import LycorisNetwork, create_lycoris

from errors import InputError
from tests.conftest import data_uri, fast
from tests.test_lora_formats import data_uri_of

logging.getLogger("LyCORIS").setLevel(logging.WARNING)
# SimpleTuner's documented preset. LycorisNetwork keeps presets on the class, so each sets every field it uses.
PRESET = {
    "target_module": ["FluxAttention", "FeedForward"],
    "target_name": [],
    "module_algo_map": {"FeedForward": {"factor": 4}},
}


def transformer_of(predictor: Any) -> torch.nn.Module:
    return predictor.engine.models["dev"].text_to_image.transformer


def plain_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {name: module for name, module in model.named_modules() if type(module) is torch.nn.Linear}


def randomize(network: torch.nn.Module, seed: int) -> None:
    """LyCORIS starts with one factor at zero (no update); a trained file has none."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if "dora_scale" in name:  # the base weight's norms at creation: a small change keeps it a DoRA
                parameter.mul_(1 + 0.1 * torch.rand(parameter.shape, generator=generator))
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def lycoris_file(base: torch.nn.Module, folder: Path, seed: int, scale: float, **config: Any) -> tuple[Path, Any]:
    """The file LyCORIS writes for `config` on a copy of `base`, and that copy, running LyCORIS's forward at `scale`."""
    model = copy.deepcopy(base)
    LycorisNetwork.apply_preset(PRESET)
    network = create_lycoris(model, scale, **config)
    network.apply_to()
    randomize(network, seed)
    path = folder / f"lycoris-{seed}.safetensors"
    network.save_weights(str(path), torch.float32, {"lycoris_config": "{}"})
    return path, model


def weight_of(layer: torch.nn.Module) -> torch.Tensor:
    """A Linear's own weight, under peft's wrapper if a LoRA is loaded."""
    return getattr(layer, "base_layer", layer).weight


@pytest.mark.parametrize(
    "config",
    [
        # SimpleTuner's documented LoKr: dimension past every layer, so both factors are whole (scale 1).
        {"algo": "lokr", "linear_dim": 10000, "linear_alpha": 1, "factor": 4},
        # A low-rank second factor: the scale is alpha / rank.
        {"algo": "lokr", "linear_dim": 2, "linear_alpha": 1, "factor": 4},
        # Both factors low-rank.
        {"algo": "lokr", "linear_dim": 1, "linear_alpha": 3, "factor": 4, "decompose_both": True},
        {"algo": "loha", "linear_dim": 2, "linear_alpha": 1},
        {"algo": "lora", "linear_dim": 4, "linear_alpha": 2},
        # DoRA: magnitudes per output row (peft's DoRA holds them) and per input column (recomposed).
        {"algo": "lora", "linear_dim": 4, "linear_alpha": 2, "dora_wd": True},
        {"algo": "lora", "linear_dim": 4, "linear_alpha": 2, "dora_wd": True, "wd_on_output": False},
        {"algo": "lokr", "linear_dim": 2, "linear_alpha": 1, "factor": 4, "dora_wd": True},
        {"algo": "loha", "linear_dim": 2, "linear_alpha": 1, "dora_wd": True, "wd_on_output": False},
        # "full": the whole weight and bias trained, saved as .diff and .diff_b.
        {"algo": "full"},
    ],
    ids=[
        "lokr-full",
        "lokr-low-rank",
        "lokr-both-low-rank",
        "loha",
        "locon",
        "dora",
        "dora-per-column",
        "lokr-dora",
        "loha-dora-per-column",
        "full",
    ],
)
def test_a_lycoris_file_computes_what_lycoris_computes(predictor: Any, tmp_path: Path, config: dict) -> None:
    """At scale 0.8; a DoRA at 1, the scale it was trained at. Below 1, LyCORIS's multiplier interpolates the
    recomposed weight from W + dW, and lora_scale is peft's definition instead (README, LoRAs)."""
    scale = 1.0 if config.get("dora_wd") else 0.8
    base_image = fast(predictor, prompt="a cat", output_format="png")[0]
    transformer = transformer_of(predictor)
    originals = {name: module.weight.detach().clone() for name, module in plain_linears(transformer).items()}
    biases = {name: module.bias for name, module in plain_linears(transformer).items()}
    path, lycoris_model = lycoris_file(transformer, tmp_path, seed=5, scale=scale, **config)
    if config.get("dora_wd"):
        assert any(key.endswith(".dora_scale") for key in safetensors.torch.load_file(path))
    with_lora = fast(predictor, prompt="a cat", output_format="png", replicate_weights=data_uri(path), lora_scale=scale)
    assert with_lora[0] != base_image
    x = torch.randn(3, 1024, generator=torch.Generator().manual_seed(1))
    changed = 0
    lycoris_layers = plain_linears(lycoris_model)
    for name, module in transformer.named_modules():
        if name not in lycoris_layers or name.endswith(".base_layer") or ".lora_" in name:
            continue
        want_layer = lycoris_layers[name]
        inputs = x[:, : want_layer.in_features]
        want = want_layer(inputs)  # LyCORIS's forward where it wrapped the layer
        torch.testing.assert_close(module(inputs), want, rtol=1e-4, atol=1e-4, msg=name)
        changed += not torch.allclose(want, torch.nn.functional.linear(inputs, originals[name], biases[name]))
    assert changed >= 10  # the attention and MLP layers of both blocks, not a file that did nothing
    assert fast(predictor, prompt="a cat", output_format="png")[0] == base_image
    assert all(torch.equal(plain_linears(transformer)[name].weight, w) for name, w in originals.items())


class BflDouble(torch.nn.Module):
    """BFL's names for the layers LyCORIS adapts in a double block, at the demo model's widths."""

    def __init__(self, width: int, mlp: int) -> None:
        super().__init__()
        self.img_attn = torch.nn.ModuleDict(
            {"qkv": torch.nn.Linear(width, 3 * width), "proj": torch.nn.Linear(width, width)}
        )
        self.txt_mod = torch.nn.ModuleDict({"lin": torch.nn.Linear(width, 6 * width)})
        self.img_mlp = torch.nn.Sequential(torch.nn.Linear(width, mlp), torch.nn.GELU(), torch.nn.Linear(mlp, width))


class BflFlux(torch.nn.Module):
    def __init__(self, width: int, mlp: int) -> None:
        super().__init__()
        self.double_blocks = torch.nn.ModuleList([BflDouble(width, mlp)])
        self.single_blocks = torch.nn.ModuleList(
            [
                torch.nn.ModuleDict(
                    {"linear1": torch.nn.Linear(width, 3 * width + mlp), "linear2": torch.nn.Linear(width + mlp, width)}
                )
            ]
        )
        self.final_layer = torch.nn.ModuleDict(
            {"adaLN_modulation": torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(width, 2 * width))}
        )


# BFL layer -> the diffusers modules its rows go to, in order; the final layer's halves swap.
BFL_ROWS = {
    "double_blocks.0.img_attn.qkv": [
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.to_k",
        "transformer_blocks.0.attn.to_v",
    ],
    "double_blocks.0.img_attn.proj": ["transformer_blocks.0.attn.to_out.0"],
    "double_blocks.0.txt_mod.lin": ["transformer_blocks.0.norm1_context.linear"],
    "double_blocks.0.img_mlp.0": ["transformer_blocks.0.ff.net.0.proj"],
    "double_blocks.0.img_mlp.2": ["transformer_blocks.0.ff.net.2"],
    "single_blocks.0.linear1": [
        "single_transformer_blocks.0.attn.to_q",
        "single_transformer_blocks.0.attn.to_k",
        "single_transformer_blocks.0.attn.to_v",
        "single_transformer_blocks.0.proj_mlp",
    ],
    "single_blocks.0.linear2": ["single_transformer_blocks.0.proj_out"],
    "final_layer.adaLN_modulation.1": ["norm_out.linear"],
}


@pytest.mark.parametrize(
    "config",
    [
        {"algo": "lokr", "linear_dim": 10000, "linear_alpha": 1, "factor": 4},
        {"algo": "lokr", "linear_dim": 2, "linear_alpha": 4, "factor": 8},
    ],
    ids=["full", "low-rank"],
)
def test_a_kohya_lokr_splits_bfl_fused_layers_by_rows(predictor: Any, tmp_path: Path, config: dict) -> None:
    """kohya's LyCORIS LoKr on BFL's modules: each fused layer's update goes to its diffusers modules by rows."""
    transformer = transformer_of(predictor)
    fast(predictor, prompt="a cat")  # no LoRA: plain modules
    bfl = BflFlux(width=32, mlp=128)
    originals = {
        name: layer.weight.detach().clone() for name, layer in bfl.named_modules() if isinstance(layer, torch.nn.Linear)
    }
    LycorisNetwork.apply_preset({"target_module": [], "target_name": list(BFL_ROWS), "module_algo_map": {}})
    network = create_lycoris(bfl, 0.6, **config)
    network.apply_to()
    randomize(network, seed=8)
    # LyCORIS's kohya wrapper names these `lora_unet_` + the flattened module path.
    state_dict = {re.sub("^lycoris_", "lora_unet_", key): value for key, value in network.state_dict().items()}
    assert any(key.endswith(".lokr_w1") or key.endswith(".lokr_w1_a") for key in state_dict)
    deltas = {}
    with torch.no_grad():
        for name in BFL_ROWS:  # LyCORIS's forward on the identity, less the base layer's: the update, transposed
            layer = bfl.get_submodule(name)
            eye = torch.eye(layer.in_features)
            deltas[name] = (layer(eye) - torch.nn.functional.linear(eye, originals[name], layer.bias)).T
    assert all(delta.abs().max() > 0 for delta in deltas.values())
    base_weights = {name: layer.weight.detach().clone() for name, layer in plain_linears(transformer).items()}
    base_image = fast(predictor, prompt="a cat", output_format="png")[0]
    source = data_uri_of(state_dict, tmp_path, "kohya-lokr")
    assert (
        fast(predictor, prompt="a cat", output_format="png", replicate_weights=source, lora_scale=0.6)[0] != base_image
    )
    for bfl_name, targets in BFL_ROWS.items():
        delta = deltas[bfl_name]
        if bfl_name.startswith("final_layer"):  # BFL's (shift, scale) is diffusers' (scale, shift)
            delta = torch.cat(delta.chunk(2)[::-1])
        widths = [base_weights[target].shape[0] for target in targets]
        for target, rows in zip(targets, delta.split(widths), strict=True):
            got = weight_of(transformer.get_submodule(target)) - base_weights[target]
            torch.testing.assert_close(got, rows, rtol=1e-4, atol=1e-5, msg=target)
    assert fast(predictor, prompt="a cat", output_format="png")[0] == base_image
    assert all(torch.equal(plain_linears(transformer)[n].weight, w) for n, w in base_weights.items())


def test_a_full_weight_delta_and_a_lora_in_one_request_both_apply(predictor: Any, tmp_path: Path) -> None:
    """ComfyUI's full_diff extract (`.diff` on every weight, `.diff_b` on biases) beside a LoRA as extra_lora,
    each at its own scale; a scale change alone re-adds the delta from the originals."""
    transformer = transformer_of(predictor)
    fast(predictor, prompt="a cat")
    qkv = [transformer.get_submodule(f"transformer_blocks.0.attn.to_{p}") for p in "qkv"]
    originals = [layer.weight.detach().clone() for layer in qkv]
    generator = torch.Generator().manual_seed(4)
    diff = torch.randn(96, 32, generator=generator) * 0.1
    full_diff = {
        "diffusion_model.double_blocks.0.img_attn.qkv.diff": diff.half(),
        "diffusion_model.double_blocks.0.img_attn.qkv.diff_b": torch.randn(96, generator=generator).half(),
    }
    lora = {
        "diffusion_model.double_blocks.0.img_attn.proj.lora_down.weight": torch.randn(
            4, 32, generator=generator
        ).half(),
        "diffusion_model.double_blocks.0.img_attn.proj.lora_up.weight": torch.randn(32, 4, generator=generator).half(),
    }
    base = fast(predictor, prompt="a cat", output_format="png")[0]
    sources = {
        "replicate_weights": data_uri_of(full_diff, tmp_path, "diff"),
        "extra_lora": data_uri_of(lora, tmp_path, "lora"),
    }
    both = fast(predictor, prompt="a cat", output_format="png", **sources, lora_scale=0.5, extra_lora_scale=1.0)[0]
    for layer, original, rows in zip(qkv, originals, diff.half().float().split(32), strict=True):
        torch.testing.assert_close(weight_of(layer), original + 0.5 * rows)
    lora_only = fast(predictor, prompt="a cat", output_format="png", extra_lora=sources["extra_lora"])[0]
    assert len({base, both, lora_only}) == 3
    again = fast(predictor, prompt="a cat", output_format="png", **sources, lora_scale=1.5, extra_lora_scale=1.0)[0]
    for layer, original, rows in zip(qkv, originals, diff.half().float().split(32), strict=True):
        torch.testing.assert_close(weight_of(layer), original + 1.5 * rows)
    assert again != both
    assert (
        fast(predictor, prompt="a cat", output_format="png", **sources, lora_scale=0.5, extra_lora_scale=1.0)[0] == both
    )
    assert fast(predictor, prompt="a cat", output_format="png")[0] == base
    assert all(torch.equal(layer.weight, original) for layer, original in zip(qkv, originals, strict=True))


@pytest.mark.parametrize(
    ("state_dict", "message"),
    [
        ({"lora_unet_img_in.lokr_w1": torch.ones(4, 4)}, "lacks its w2 factor"),
        (
            {"lora_unet_img_in.lokr_w1": torch.ones(2, 2), "lora_unet_img_in.lokr_w2": torch.ones(16, 16)},
            "the LoKr layer lora_unet_img_in is (32, 32) where this FLUX.1 model's layer is (32, 16)",
        ),
        (
            {
                "lora_unet_img_in.lokr_w1": torch.ones(2, 2),
                "lora_unet_img_in.lokr_w2_a": torch.ones(16, 2),
                "lora_unet_img_in.lokr_w2_b": torch.ones(2, 32),
                "lora_unet_img_in.lokr_t2": torch.ones(2, 2, 1, 1),
            },
            "is a Tucker (lokr_t2) convolution LoKr",
        ),
        (
            {
                "diffusion_model.img_in.diff": torch.ones(32, 16),
                "diffusion_model.img_in.dora_scale": torch.ones(32, 1),
            },
            "the layer diffusion_model.img_in is a DoRA over a full .diff delta",
        ),
        (
            {"diffusion_model.double_blocks.5.img_attn.qkv.diff": torch.ones(96, 32)},
            "1 of its LoKr, .diff or DoRA layers match no FLUX.1 layer",
        ),
        (
            {"diffusion_model.double_blocks.0.img_attn.norm.query_norm.diff": torch.ones(16)},
            "1 of its LoKr, .diff or DoRA layers match no FLUX.1 layer",
        ),
    ],
    ids=["half-lokr", "wrong-shape", "tucker", "dora-diff", "no-such-block", "norm-scale"],
)
def test_a_broken_or_foreign_lokr_or_diff_is_refused_and_changes_nothing(
    predictor: Any, tmp_path: Path, state_dict: dict, message: str
) -> None:
    base = fast(predictor, prompt="a cat", output_format="png")[0]
    with pytest.raises(InputError, match=re.escape(message)):
        fast(predictor, prompt="a cat", replicate_weights=data_uri_of(state_dict, tmp_path, "broken"))
    assert fast(predictor, prompt="a cat", output_format="png")[0] == base


@pytest.mark.parametrize("algo", ["diag-oft", "ia3"])
def test_lycoris_kinds_not_applied_are_refused_by_name(predictor: Any, tmp_path: Path, algo: str) -> None:
    transformer = transformer_of(predictor)
    fast(predictor, prompt="a cat")
    base = fast(predictor, prompt="a cat", output_format="png")[0]
    path, _ = lycoris_file(transformer, tmp_path, seed=9, scale=1.0, algo=algo, linear_dim=4)
    with pytest.raises(InputError, match="it holds tensors of kinds this predictor cannot apply"):
        fast(predictor, prompt="a cat", replicate_weights=data_uri(path))
    assert fast(predictor, prompt="a cat", output_format="png")[0] == base


def test_a_failing_second_lora_leaves_no_trace_of_the_first_ones_merge(predictor: Any, tmp_path: Path) -> None:
    """All-or-nothing holds for merged changes too: a valid LoKr with a broken extra_lora fails the request,
    and the model is the base (bit for bit) for the next one, which then merges the LoKr afresh."""
    transformer = transformer_of(predictor)
    base_image = fast(predictor, prompt="a cat", output_format="png")[0]
    weights = {name: module.weight.detach().clone() for name, module in plain_linears(transformer).items()}
    path, _ = lycoris_file(transformer, tmp_path, seed=12, scale=1.0, algo="lokr", linear_dim=10000, factor=4)
    lokr_alone = fast(predictor, prompt="a cat", output_format="png", replicate_weights=data_uri(path))[0]
    broken = data_uri_of({"lora_unet_img_in.lokr_w1": torch.ones(2, 2)}, tmp_path, "broken")
    with pytest.raises(InputError, match="lacks its w2 factor"):
        fast(predictor, prompt="a cat", replicate_weights=data_uri(path), extra_lora=broken)
    assert all(torch.equal(plain_linears(transformer)[name].weight, w) for name, w in weights.items())
    assert fast(predictor, prompt="a cat", output_format="png")[0] == base_image
    assert fast(predictor, prompt="a cat", output_format="png", replicate_weights=data_uri(path))[0] == lokr_alone
