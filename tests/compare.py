"""Comparing images and loaded weights, with failures that report in milliseconds.

Two kinds of comparison, kept apart on purpose:
- *the same arithmetic* (same path, inputs and seed: scale 0 against the base, an unload against a
  fresh server, A/B/A, a go_fast request that runs the standard path itself, weights that load bit for
  bit alike): the bytes must be equal on any machine. `assert_same_image`.
- *two routes meant to agree* (a kohya, ComfyUI, XLabs or OneTrainer file and its PEFT twin, an alpha
  and a pre-scaled factor): they add the same numbers in another order (a delta merged into the weight
  against peft's separate matmuls, a scale folded into another factor), so the last bit depends on the
  CPU's kernels and thread count. What they load must agree within a few ulps (`loaded_weights` +
  `assert_same_weights`) and the images within a stated bound that sits far below the effect under
  test (`assert_images_close`).

A failure message gives sizes and pixel statistics, never a diff of the bytes: pytest's own
explanation of `bytes == bytes` runs difflib over them, which takes minutes on two PNGs
(tests/report_guard.py answers for bare asserts the same way).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

# Routes that meet in different rounding may differ by one level in a few pixels; two levels is
# the bound, far below what a LoRA under test moves (checked by `assert_images_close(base=...)`).
ROUTE_TOLERANCE = 2  # of 255
# A LoRA effect must be at least this many times the route tolerance to tell routes apart.
EFFECT_MARGIN = 4
# Effective weights from two routes: within this many float32 ulps of each module's largest value.
WEIGHT_ULPS = 16


def pixels(data: bytes) -> np.ndarray:
    """The decoded image as int16 RGB(A), so differences do not wrap."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image).astype(np.int16)


def describe_difference(actual: bytes, expected: bytes) -> str:
    """One line on how two encoded images differ: sizes, and pixel statistics when both decode."""
    head = f"{len(actual)} bytes against {len(expected)} expected"
    try:
        got, want = pixels(actual), pixels(expected)
    except Exception as error:  # not images: the first differing offset is all there is to say
        offset = next((i for i, (a, b) in enumerate(zip(actual, expected, strict=False)) if a != b), None)
        return f"{head}; not both images ({type(error).__name__}); first differing byte at {offset}"
    if got.shape != want.shape:
        return f"{head}; images of shape {got.shape} against {want.shape}"
    difference = np.abs(got - want)
    return (
        f"{head}; largest pixel difference {int(difference.max())}/255, "
        f"{int((difference.max(axis=-1) > 0).sum())} of {difference.shape[0] * difference.shape[1]} pixels differ, "
        f"mean {float(difference.mean()):.3f}/255"
    )


def assert_same_image(actual: bytes, expected: bytes, what: str = "image") -> None:
    """Byte equality, for the same arithmetic."""
    __tracebackhide__ = True
    if actual != expected:
        pytest.fail(f"{what} differs: {describe_difference(actual, expected)}")


def assert_same_images(actual: Iterable[bytes], expected: Iterable[bytes], what: str = "image") -> None:
    __tracebackhide__ = True
    actual, expected = list(actual), list(expected)
    if len(actual) != len(expected):
        pytest.fail(f"{len(actual)} {what}s against {len(expected)} expected")
    for index, (got, want) in enumerate(zip(actual, expected, strict=True)):
        assert_same_image(got, want, f"{what} {index}")


def assert_images_differ(actual: bytes, expected: bytes, what: str = "image") -> None:
    __tracebackhide__ = True
    if actual == expected:
        pytest.fail(f"{what} is byte for byte the one it should differ from ({len(actual)} bytes)")


def assert_images_close(
    actual: bytes,
    expected: bytes,
    base: bytes | None = None,
    tolerance: int = ROUTE_TOLERANCE,
    what: str = "image",
) -> None:
    """Within `tolerance`/255 in every pixel, for two routes to the same result. With `base` (the image
    without the change under test), also that the change moves some pixel by EFFECT_MARGIN times the
    tolerance or more, so the bound cannot hide it."""
    __tracebackhide__ = True
    got, want = pixels(actual), pixels(expected)
    if got.shape != want.shape:
        pytest.fail(f"{what}: shape {got.shape} against {want.shape}")
    largest = int(np.abs(got - want).max())
    if largest > tolerance:
        pytest.fail(f"{what} beyond {tolerance}/255: {describe_difference(actual, expected)}")
    if base is not None:
        effect = int(np.abs(want - pixels(base)).max())
        if effect < EFFECT_MARGIN * tolerance:
            pytest.fail(
                f"{what}: the change under test moves no pixel by more than {effect}/255, too close to the "
                f"{tolerance}/255 route tolerance to tell the routes apart"
            )


def linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Each Linear layer by name; under a loaded LoRA, peft's wrapper (whose output carries it)."""
    found = {}
    for name, module in model.named_modules():
        base = getattr(module, "base_layer", module)
        if isinstance(base, torch.nn.Linear) and ".lora_" not in name and not name.endswith(".base_layer"):
            found[name] = module
    return found


@torch.no_grad()
def effective(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """What each Linear layer computes, as (weight, bias), whatever holds the LoRA (peft's LoRA and DoRA
    layers, or the weight changed in place): its output on the identity and on zero, as layers linear in x."""
    computed = {}
    for name, layer in linears(model).items():
        in_features = getattr(layer, "base_layer", layer).in_features
        zero = layer(torch.zeros(1, in_features))[0]
        weight = (layer(torch.eye(in_features)) - zero).T
        computed[name] = (weight, zero if getattr(layer, "base_layer", layer).bias is not None else None)
    return computed


def loaded_weights(models: Mapping[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """What the models compute with, by name: each Linear's `effective` weight and bias, and every other
    parameter as it is."""
    weights: dict[str, torch.Tensor] = {}
    for prefix, model in models.items():
        layers = effective(model)
        for name, (weight, bias) in layers.items():
            weights[f"{prefix}.{name}.weight"] = weight
            if bias is not None:
                weights[f"{prefix}.{name}.bias"] = bias
        inside_a_linear = tuple(f"{name}." for name in layers)
        for module_name, module in model.named_modules():
            if module_name in layers or module_name.startswith(inside_a_linear):
                continue
            for name, parameter in module.named_parameters(recurse=False):
                weights[".".join(filter(None, (prefix, module_name, name)))] = parameter.detach().clone()
    return weights


def assert_same_weights(
    actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], ulps: int = WEIGHT_ULPS
) -> None:
    """Every layer within `ulps` float32 ulps of its largest value, and the same layers."""
    __tracebackhide__ = True
    if actual.keys() != expected.keys():
        extra, missing = sorted(actual.keys() - expected.keys()), sorted(expected.keys() - actual.keys())
        pytest.fail(f"other layers: {extra[:3]} not expected, {missing[:3]} missing")
    eps = torch.finfo(torch.float32).eps
    worst = []
    for name, want in expected.items():
        got = actual[name]
        if got.shape != want.shape:
            pytest.fail(f"{name}: shape {tuple(got.shape)} against {tuple(want.shape)}")
        bound = ulps * eps * float(want.abs().max().clamp_min(torch.finfo(torch.float32).tiny))
        error = float((got - want).abs().max()) if want.numel() else 0.0
        if error > bound:
            worst.append(f"{name}: {error:.3g} (bound {bound:.3g})")
    if worst:
        pytest.fail(f"{len(worst)} layers load differently: " + "; ".join(worst[:5]))


def predictor_weights(predictor: Any, model: str = "dev") -> dict[str, torch.Tensor]:
    """`loaded_weights` of what a request on `model` computes with: its transformer and the two text
    encoders, as the last request left them."""
    pipeline = predictor.engine.models[model].text_to_image
    return loaded_weights({name: getattr(pipeline, name) for name in ("transformer", "text_encoder", "text_encoder_2")})
