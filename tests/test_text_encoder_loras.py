"""Text-encoder LoRAs (CLIP-L and T5-XXL) in every layout trainers write: applied exactly, once,
all-or-nothing, and kept per encoder, so nothing leaks between dev and schnell or between requests."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from errors import InputError
from lora_loading.adapters import TextEncoderLoras
from lora_loading.formats import LoraFile
from tests.conftest import data_uri, fast

RANK = 4


def encoders(predictor: Any) -> dict[str, torch.nn.Module]:
    pipeline = predictor.engine.models["dev"].text_to_image
    return {"text_encoder": pipeline.text_encoder, "text_encoder_2": pipeline.text_encoder_2}


def pairs(model: torch.nn.Module, seed: int, std: float = 0.6) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A random LoRA pair for every Linear layer of `model`, by transformers' module name."""
    generator = torch.Generator().manual_seed(seed)
    made = {}
    for name, module in model.named_modules():
        layer = getattr(module, "base_layer", module)  # an earlier test's LoRA may still be applied
        if isinstance(layer, torch.nn.Linear) and ".lora_" not in name and not name.endswith(".base_layer"):
            made[name] = (
                torch.randn(RANK, layer.in_features, generator=generator) * std,
                torch.randn(layer.out_features, RANK, generator=generator) * std,
            )
    return made


def flat(name: str) -> str:
    return name.replace(".", "_")


def dotted(prefix: str, *parts: str) -> Any:
    """A layout naming a layer `<prefix><module>.<part>` for its down, up and alpha tensors."""
    return lambda name: tuple(f"{prefix}{name}.{part}" for part in parts)


KOHYA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")
PEFT_PARTS = ("lora_A.weight", "lora_B.weight", "alpha")


# Each layout: how a trainer names one CLIP or T5 layer's tensors. kohya and ComfyUI write CLIP's
# module names as transformers 4 spelled them, with "text_model." first.
def kohya_clip(name: str, prefix: str = "lora_te1_") -> tuple[str, str, str]:
    base = prefix + flat("text_model." + name)
    return f"{base}.lora_down.weight", f"{base}.lora_up.weight", f"{base}.alpha"


LAYOUTS = {
    "kohya lora_te1_": ("text_encoder", kohya_clip),
    "kohya lora_te_": ("text_encoder", lambda name: kohya_clip(name, "lora_te_")),
    "diffusers text_encoder.": ("text_encoder", dotted("text_encoder.text_model.", *PEFT_PARTS)),
    "ComfyUI clip_l": ("text_encoder", dotted("text_encoders.clip_l.transformer.text_model.", *KOHYA_PARTS)),
    "kohya lora_te3_ (T5)": ("text_encoder_2", lambda name: dotted("lora_te3_", *KOHYA_PARTS)(flat(name))),
    "OneTrainer lora_te2_ (T5)": ("text_encoder_2", lambda name: dotted("lora_te2_", *KOHYA_PARTS)(flat(name))),
    "diffusers text_encoder_2.": ("text_encoder_2", dotted("text_encoder_2.", *PEFT_PARTS)),
    "ComfyUI t5xxl": ("text_encoder_2", dotted("text_encoders.t5xxl.transformer.", *KOHYA_PARTS)),
}


def write(layout: str, made: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float | None = None) -> dict:
    namer = LAYOUTS[layout][1]
    state_dict = {}
    for name, (down, up) in made.items():
        down_key, up_key, alpha_key = namer(name)
        state_dict[down_key], state_dict[up_key] = down, up
        if alpha is not None:
            state_dict[alpha_key] = torch.tensor(alpha)
    return state_dict


def as_uri(state_dict: dict[str, torch.Tensor], folder: Path, name: str) -> str:
    path = folder / f"{name}.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return data_uri(path)


def image(predictor: Any, source: str | None = None, **inputs: Any) -> bytes:
    lora = {"replicate_weights": source} if source else {}
    return fast(predictor, prompt="a cat", output_format="png", **lora, **inputs)[0]


@pytest.fixture(scope="module")
def base(predictor: Any) -> dict[str, bytes]:
    return {model: image(predictor, model=model) for model in ("dev", "schnell")}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_takes_effect_and_leaves_no_trace(
    predictor: Any, base: dict[str, bytes], tmp_path: Path, layout: str
) -> None:
    attribute = LAYOUTS[layout][0]
    source = as_uri(write(layout, pairs(encoders(predictor)[attribute], seed=1)), tmp_path, "te")
    adapted = image(predictor, source)
    assert adapted != base["dev"]
    assert image(predictor, source, lora_scale=0.0) == base["dev"]  # scale 0: the base encoders exactly
    assert image(predictor) == base["dev"]  # a request without it: the base encoders exactly
    assert image(predictor, source) == adapted


@pytest.mark.parametrize(
    ("layouts", "attribute"),
    [
        (("kohya lora_te1_", "kohya lora_te_", "diffusers text_encoder.", "ComfyUI clip_l"), "text_encoder"),
        (
            ("kohya lora_te3_ (T5)", "OneTrainer lora_te2_ (T5)", "diffusers text_encoder_2.", "ComfyUI t5xxl"),
            "text_encoder_2",
        ),
    ],
    ids=["CLIP", "T5"],
)
def test_the_layouts_of_one_encoder_name_the_same_layers(
    predictor: Any, tmp_path: Path, layouts: tuple[str, ...], attribute: str
) -> None:
    """The same factors in every layout load the same weights; alpha 2 on rank 4 halves the effect, as A
    scaled by 0.5 without an alpha does."""
    from tests.test_lora_formats import assert_applies_alike

    made = pairs(encoders(predictor)[attribute], seed=2)
    halved = {name: (down * 0.5, up) for name, (down, up) in made.items()}
    first, *others = (as_uri(write(layout, made, alpha=2.0), tmp_path, f"a{i}") for i, layout in enumerate(layouts))
    for source in [*others, as_uri(write(layouts[0], halved), tmp_path, "no-alpha")]:
        assert_applies_alike(predictor, source, first)


def test_nothing_leaks_between_dev_and_schnell(predictor: Any, base: dict[str, bytes], tmp_path: Path) -> None:
    """The encoders are shared: their state follows each request, whichever model it runs."""
    source = as_uri(write("kohya lora_te1_", pairs(encoders(predictor)["text_encoder"], seed=3)), tmp_path, "te")
    dev_adapted = image(predictor, source)
    assert image(predictor, model="schnell") == base["schnell"]
    schnell_adapted = image(predictor, source, model="schnell")
    assert schnell_adapted != base["schnell"]
    assert image(predictor) == base["dev"]
    assert image(predictor, source) == dev_adapted
    assert image(predictor, source, model="schnell") == schnell_adapted


def test_scale_is_applied_once_at_layer_level(predictor: Any, tmp_path: Path) -> None:
    """layer(x) = base(x) + s * (alpha/r) * x A^T B^T, for CLIP and T5, with two LoRAs stacked."""
    image(predictor)  # a request without LoRAs: the shared encoders are plain again, to copy
    models = {name: copy.deepcopy(model).float() for name, model in encoders(predictor).items()}
    clip_pairs, t5_pairs = pairs(models["text_encoder"], seed=4), pairs(models["text_encoder_2"], seed=5)
    main = {**write("kohya lora_te1_", clip_pairs, alpha=2.0), **write("kohya lora_te3_ (T5)", t5_pairs, alpha=8.0)}
    extra = write("diffusers text_encoder.", pairs(models["text_encoder"], seed=6))
    files = []
    for index, (state_dict, scale) in enumerate(((main, 0.7), (extra, -0.4))):
        path = tmp_path / f"{index}.safetensors"
        safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
        files.append(LoraFile("replicate_weights", str(index), path, scale))
    originals = {attribute: dict(model.named_modules()) for attribute, model in models.items()}
    loras = TextEncoderLoras(models)
    loras.apply(files)
    for attribute, made, alpha in (("text_encoder", clip_pairs, 2.0), ("text_encoder_2", t5_pairs, 8.0)):
        layer_name = next(iter(made))
        layer = dict(models[attribute].named_modules())[layer_name]
        x = torch.randn(3, layer.base_layer.in_features)
        down, up = made[layer_name]
        expected = layer.base_layer(x) + 0.7 * (alpha / RANK) * (x @ down.T @ up.T)
        if attribute == "text_encoder":
            extra_down, extra_up = write_pairs(extra, layer_name)
            expected = expected - 0.4 * (x @ extra_down.T @ extra_up.T)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    loras.apply([])
    for attribute, model in models.items():
        restored = dict(model.named_modules())
        assert all(type(restored[name]) is type(module) for name, module in originals[attribute].items())


def write_pairs(state_dict: dict[str, torch.Tensor], layer_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        state_dict[f"text_encoder.text_model.{layer_name}.lora_A.weight"],
        state_dict[f"text_encoder.text_model.{layer_name}.lora_B.weight"],
    )


def test_a_file_with_transformer_and_text_encoder_parts_applies_both(
    predictor: Any, base: dict[str, bytes], tmp_path: Path
) -> None:
    from tests.lora_factory import make_peft_lora

    transformer_file = make_peft_lora(
        predictor.engine.models["dev"].text_to_image.transformer, tmp_path / "t.safetensors"
    )
    transformer_part = safetensors.torch.load_file(str(transformer_file))
    text_part = write("diffusers text_encoder_2.", pairs(encoders(predictor)["text_encoder_2"], seed=7))
    only_transformer = image(predictor, as_uri(transformer_part, tmp_path, "t"))
    only_text = image(predictor, as_uri(text_part, tmp_path, "e"))
    both = image(predictor, as_uri({**transformer_part, **text_part}, tmp_path, "both"))
    assert len({base["dev"], only_transformer, only_text, both}) == 4


@pytest.mark.parametrize(
    ("key", "shape", "problem"),
    [
        (
            "lora_te1_text_model_encoder_layers_9_self_attn_q_proj",
            (RANK, 32),
            "name no layer of FLUX.1's text encoders",
        ),
        ("lora_te3_encoder_block_0_layer_0_SelfAttention_q", (RANK, 4096), "it was trained for another text encoder"),
        (
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.oft_blocks",
            None,
            "of a kind this predictor cannot apply",
        ),
        (
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.dora_scale",
            (1, 7),
            "DoRA magnitudes of the CLIP-L text encoder layer encoder.layers.0.self_attn.q_proj fit neither",
        ),
    ],
    ids=["unknown layer", "wrong width", "OFT", "DoRA of no axis"],
)
def test_a_text_encoder_tensor_that_cannot_apply_refuses_the_file(
    predictor: Any, base: dict[str, bytes], tmp_path: Path, key: str, shape: tuple | None, problem: str
) -> None:
    state_dict = write("kohya lora_te1_", pairs(encoders(predictor)["text_encoder"], seed=8))
    if shape is None:
        state_dict[key] = torch.ones(1, 32)
    elif key.endswith(".dora_scale"):
        state_dict[key] = torch.ones(*shape)
    else:
        state_dict[f"{key}.lora_down.weight"] = torch.ones(*shape)
        state_dict[f"{key}.lora_up.weight"] = torch.ones(32, RANK)
    with pytest.raises(InputError, match=problem) as caught:
        image(predictor, as_uri(state_dict, tmp_path, "bad"))
    assert str(caught.value).startswith("Invalid replicate_weights")
    assert image(predictor) == base["dev"]


def test_text_encoder_bias_deltas_apply_and_come_back(predictor: Any, base: dict[str, bytes], tmp_path: Path) -> None:
    """ComfyUI extracts carry `.diff_b` for the encoders' biases too: bias += scale x delta, and back."""
    clip = encoders(predictor)["text_encoder"]
    q_proj = clip.get_submodule("encoder.layers.0.self_attn.q_proj")
    original = getattr(q_proj, "base_layer", q_proj).bias.detach().clone()
    delta = torch.randn(original.shape, generator=torch.Generator().manual_seed(12))
    key = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.diff_b"
    source = as_uri({key: delta}, tmp_path, "bias")
    assert image(predictor, source, lora_scale=0.5) != base["dev"]
    q_proj = clip.get_submodule("encoder.layers.0.self_attn.q_proj")
    torch.testing.assert_close(getattr(q_proj, "base_layer", q_proj).bias, original + 0.5 * delta, rtol=0, atol=1e-6)
    assert image(predictor) == base["dev"]
    assert torch.equal(getattr(q_proj, "base_layer", q_proj).bias, original)


def comfyui_extract(model: torch.nn.Module, prefix: str, seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """What ComfyUI's LoraSave node (comfy_extras/nodes_lora_extract.py, bias_diff on by default) writes for a
    text encoder: a rank-r pair (lora_up, lora_down, no alpha) for every 2-D weight, embeddings included,
    `.diff` for 1-D weights (the norms) and `.diff_b` for biases. And the change each parameter should get."""
    generator = torch.Generator().manual_seed(seed)
    state_dict, changes = {}, {}
    for name, parameter in model.named_parameters():
        name = name.replace(".base_layer.", ".")
        if ".lora_" in name:
            continue
        module, kind = name.rsplit(".", 1)
        key = prefix + module
        if kind == "bias":
            state_dict[f"{key}.diff_b"] = changes[name] = torch.randn(parameter.shape, generator=generator) * 0.3
        elif parameter.ndim < 2:
            state_dict[f"{key}.diff"] = changes[name] = torch.randn(parameter.shape, generator=generator) * 0.3
        else:
            up = torch.randn(parameter.shape[0], RANK, generator=generator) * 0.3
            down = torch.randn(RANK, parameter.shape[1], generator=generator) * 0.3
            state_dict[f"{key}.lora_up.weight"], state_dict[f"{key}.lora_down.weight"] = up.half(), down.half()
            changes[name] = up.half().float() @ down.half().float()
    return state_dict, changes


def own_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each parameter of the base model, by its name without peft's wrapper; LoRA factors left out."""
    return {
        name.replace(".base_layer.", "."): parameter.detach().clone()
        for name, parameter in model.named_parameters()
        if ".lora_" not in name
    }


@pytest.mark.parametrize(
    ("attribute", "prefix"),
    [
        ("text_encoder", "text_encoders.clip_l.transformer.text_model."),
        ("text_encoder_2", "text_encoders.t5xxl.transformer."),
    ],
    ids=["clip_l", "t5xxl"],
)
def test_a_comfyui_text_encoder_extract_applies_every_tensor(
    predictor: Any,
    base: dict[str, bytes],
    tmp_path: Path,
    attribute: str,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every tensor of the extract takes effect: the Linear layers' pairs through peft, and the embeddings'
    pairs, the norms' `.diff` and the biases' `.diff_b` in place. CLIP's text_projection, which ComfyUI's
    CLIP has and FLUX.1 never runs, is skipped with a log line."""
    image(predictor)  # no LoRA: plain modules
    model = encoders(predictor)[attribute]
    originals = own_parameters(model)
    state_dict, changes = comfyui_extract(model, prefix, seed=21)
    assert any(".diff" in key for key in state_dict) and any("embed" in key or "shared" in key for key in state_dict)
    if attribute == "text_encoder":
        projection = "text_encoders.clip_l.transformer.text_projection"
        state_dict[f"{projection}.lora_up.weight"] = torch.ones(32, RANK)
        state_dict[f"{projection}.lora_down.weight"] = torch.ones(RANK, 32)
    source = as_uri(state_dict, tmp_path, "extract")
    with caplog.at_level("WARNING"):
        assert image(predictor, source, lora_scale=0.5) != base["dev"]
    if attribute == "text_encoder":
        assert (
            "skipped the LoRA layer text_projection (CLIP-L text encoder: FLUX.1 takes CLIP-L's pooled" in caplog.text
        )
    wrapped = {
        name
        for name, module in model.named_modules()
        if isinstance(getattr(module, "base_layer", None), torch.nn.Linear)
    }
    for name in wrapped:  # a peft-wrapped Linear: its output carries the pair
        module = model.get_submodule(name)
        x = torch.randn(2, module.base_layer.in_features)
        got = module(x) - module.base_layer(x)
        torch.testing.assert_close(got, 0.5 * x @ changes[f"{name}.weight"].T, rtol=1e-4, atol=1e-4, msg=name)
    in_place = [name for name in changes if name.removesuffix(".weight") not in wrapped]
    now = own_parameters(model)
    for name in in_place:  # embeddings, norms and biases
        torch.testing.assert_close(now[name], originals[name] + 0.5 * changes[name], rtol=0, atol=1e-5, msg=name)
    applied = len(wrapped) + len(in_place)
    assert applied == len(changes)
    assert image(predictor) == base["dev"]
    assert all(torch.equal(parameter, originals[name]) for name, parameter in own_parameters(model).items())


def test_a_lycoris_lokr_on_the_text_encoders_merges_and_comes_back(
    predictor: Any, base: dict[str, bytes], tmp_path: Path
) -> None:
    """LyCORIS's kohya wrapper trains the encoders under kohya's names: each layer's weight gains
    s * kron(w1, w2_a @ w2_b) * alpha / rank, and comes back exactly."""
    image(predictor)
    generator = torch.Generator().manual_seed(31)
    layers = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": ("text_encoder", "encoder.layers.0.self_attn.q_proj"),
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q": (
            "text_encoder_2",
            "encoder.block.0.layer.0.SelfAttention.q",
        ),
    }
    state_dict, expected, originals = {}, {}, {}
    for kohya, (attribute, name) in layers.items():
        weight = encoders(predictor)[attribute].get_submodule(name).weight
        w1 = torch.randn(4, 4, generator=generator)
        w2_a = torch.randn(weight.shape[0] // 4, 2, generator=generator)
        w2_b = torch.randn(2, weight.shape[1] // 4, generator=generator)
        state_dict |= {f"{kohya}.lokr_w1": w1, f"{kohya}.lokr_w2_a": w2_a, f"{kohya}.lokr_w2_b": w2_b}
        state_dict[f"{kohya}.alpha"] = torch.tensor(1.0)
        expected[attribute, name] = torch.kron(w1, w2_a @ w2_b) * 0.5  # alpha 1 / rank 2
        originals[attribute, name] = weight.detach().clone()
    assert image(predictor, as_uri(state_dict, tmp_path, "te-lokr"), lora_scale=0.3) != base["dev"]
    for (attribute, name), change in expected.items():
        weight = encoders(predictor)[attribute].get_submodule(name).weight
        torch.testing.assert_close(weight, originals[attribute, name] + 0.3 * change, rtol=0, atol=1e-5)
    assert image(predictor) == base["dev"]
    for (attribute, name), original in originals.items():
        assert torch.equal(encoders(predictor)[attribute].get_submodule(name).weight, original)


@pytest.mark.parametrize("per_column", [False, True], ids=["per output row", "per input column"])
def test_a_text_encoder_dora_is_recomposed_into_the_weight(
    predictor: Any, base: dict[str, bytes], tmp_path: Path, per_column: bool
) -> None:
    """kohya/LyCORIS DoRA on CLIP and T5: weight = m * (W + s dW) / ||W + s dW||, per output row or input
    column; and back."""
    image(predictor)
    generator = torch.Generator().manual_seed(41)
    layers = {
        "lora_te1_text_model_encoder_layers_0_mlp_fc1": ("text_encoder", "encoder.layers.0.mlp.fc1"),
        "lora_te3_encoder_block_0_layer_0_SelfAttention_o": (
            "text_encoder_2",
            "encoder.block.0.layer.0.SelfAttention.o",
        ),
    }
    state_dict, expected, originals = {}, {}, {}
    for kohya, (attribute, name) in layers.items():
        weight = encoders(predictor)[attribute].get_submodule(name).weight.detach().clone()
        down = torch.randn(RANK, weight.shape[1], generator=generator) * 0.3
        up = torch.randn(weight.shape[0], RANK, generator=generator) * 0.3
        axis = 0 if per_column else 1
        magnitude = weight.norm(dim=axis, keepdim=True) * 1.2
        state_dict |= {
            f"{kohya}.lora_down.weight": down,
            f"{kohya}.lora_up.weight": up,
            f"{kohya}.alpha": torch.tensor(2.0),
        }
        state_dict[f"{kohya}.dora_scale"] = magnitude
        changed = weight + 0.6 * (up @ down) * (2.0 / RANK)
        expected[attribute, name] = magnitude * changed / changed.norm(dim=axis, keepdim=True)
        originals[attribute, name] = weight
    assert image(predictor, as_uri(state_dict, tmp_path, "te-dora"), lora_scale=0.6) != base["dev"]
    for (attribute, name), want in expected.items():
        layer = encoders(predictor)[attribute].get_submodule(name)
        torch.testing.assert_close(getattr(layer, "base_layer", layer).weight, want, rtol=1e-5, atol=1e-5)
    assert image(predictor) == base["dev"]
    for (attribute, name), original in originals.items():
        assert torch.equal(encoders(predictor)[attribute].get_submodule(name).weight, original)
