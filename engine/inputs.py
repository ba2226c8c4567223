"""The request: every input checked and resolved before anything runs.

Cog's server validates inputs only when a generated OpenAPI schema is present, and
in-process callers skip it entirely, so the predictor checks every value itself. Each
failure is one `InputError` sentence naming the input, the value and what is accepted.
Nothing here touches the models, so a rejected request changes no state.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from PIL import Image, ImageOps

from engine.sizes import (
    custom_size,
    size_following_image,
    text_to_image_size,
)
from errors import InputError

SEED_RANGE = (0, 2**64 - 1)  # what torch.Generator.manual_seed accepts as unsigned; the contract sets no bound
# Inputs are resized to at most 1440 px anyway; beyond this a file is a decompression bomb.
MAX_INPUT_PIXELS = 50_000_000


class Mode(StrEnum):
    TEXT_TO_IMAGE = "txt2img"
    IMAGE_TO_IMAGE = "img2img"
    INPAINTING = "inpainting"


@dataclass(frozen=True)
class LoraRequest:
    input_name: str  # which input asked for it, so errors can name it
    source: str
    scale: float


@dataclass(frozen=True)
class Request:
    prompt: str
    mode: Mode
    width: int
    height: int
    image: Image.Image | None
    mask: Image.Image | None
    prompt_strength: float
    model: str
    num_outputs: int
    num_inference_steps: int
    guidance_scale: float
    seed: int | None
    output_format: str
    output_quality: int
    disable_safety_checker: bool
    go_fast: bool
    loras: tuple[LoraRequest, ...]


class InputSpec(Protocol):
    """What the engine reads of an input's declaration: cog's `Input(...)` (FieldInfo)."""

    default: Any
    ge: int | float | None
    le: int | float | None
    choices: list[str | int] | None


def input_contract(predict: Callable[..., Any], declarations: type) -> dict[str, InputSpec]:
    """The `Input(...)` declaration of each of predict()'s parameters, by name: the one copy of
    the contract's bounds, choices and defaults, which cog's schema is built from too.

    predict.py declares parameter `x` as `x: T = Inputs.x`, so the declarations are read
    from that class: cog's server replaces the signature's defaults with plain values
    before setup() runs, so the signature itself no longer holds them.
    """
    names = [name for name in inspect.signature(predict).parameters if name != "self"]
    return {name: getattr(declarations, name) for name in names}


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _fail(name: str, value: Any, accepted: str) -> InputError:
    return InputError(f"Invalid {name} {_show(value)}: {accepted}.")


def _integer(name: str, value: Any, low: int, high: int, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    # JSON Schema counts 3.0 as an integer and cog's validator lets it through as a float.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    # bool is an int subclass in Python; true/false is never a count or a size.
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _fail(name, value, f"expected an integer from {low} to {high}")
    return value


def _bounded_integer(contract: Mapping[str, InputSpec], name: str, value: Any, *, optional: bool = False) -> int | None:
    return _integer(name, value, int(contract[name].ge), int(contract[name].le), optional=optional)  # type: ignore[arg-type]


def _bounded_number(contract: Mapping[str, InputSpec], name: str, value: Any) -> float:
    return _number(name, value, float(contract[name].ge), float(contract[name].le))  # type: ignore[arg-type]


def _number(name: str, value: Any, low: float, high: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        raise _fail(name, value, f"expected a number from {low:g} to {high:g}")
    return float(value)


def _choice(contract: Mapping[str, InputSpec], name: str, value: Any) -> str:
    choices = [str(choice) for choice in contract[name].choices or ()]
    if value not in choices or not isinstance(value, str):
        raise _fail(name, value, "expected one of " + ", ".join(choices))
    return value


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(name, value, "expected true or false")
    return value


def _optional_text(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _fail(name, value, "expected a string")
    # Form-based clients send "" for a field left empty: treat it as not given.
    return value.strip() or None


def _read_image(name: str, value: Any, mode: str) -> Image.Image | None:
    if value is None:
        return None
    if not isinstance(value, Path):
        # cog's server turns http(s) and data: URLs into downloaded files (Path objects), but
        # hands any other string through as it came: read as a path, it would let a client
        # run img2img on any image file the server can read.
        raise _fail(name, value, "expected an uploaded file or an http(s) or data: URL; server paths are not read")
    try:
        with Image.open(value) as opened:
            width, height = opened.size
            if width * height > MAX_INPUT_PIXELS:
                raise InputError(
                    f"Invalid {name}: it is {width}x{height} pixels; images of at most "
                    f"{MAX_INPUT_PIXELS // 1_000_000} megapixels are accepted."
                )
            # Phone photos store their rotation in EXIF; users expect the upright picture.
            return ImageOps.exif_transpose(opened).convert(mode)
    except InputError:
        raise
    except Exception as error:  # PIL raises many types for truncated or foreign files.
        raise InputError(
            f"Invalid {name}: the file could not be read as an image ({type(error).__name__}); "
            "PNG, JPEG, WebP and other common image formats are accepted."
        ) from error


def parse_request(
    contract: Mapping[str, InputSpec], *, main_lora_input: str = "replicate_weights", **values: Any
) -> Request:
    """Check every input and resolve the mode and output size.

    `contract` holds the predictor's `Input` declarations (`input_contract`): their bounds
    and choices are checked here, and their defaults fill the inputs a caller left out.
    `main_lora_input` names where the main LoRA came from (the request's
    `replicate_weights`, or the deployment's FLUX_MAIN_LORA) so errors point at it.
    """
    unknown = sorted(set(values) - set(contract) - {"replicate_weights"})
    if unknown:
        raise InputError(f"Unknown input {unknown[0]!r}: the accepted inputs are {', '.join(contract)}.")
    # An input left out, or called in-process without cog filling it in (the parameter's
    # default is then the Input declaration itself), takes the declared default.
    values = {name: spec.default for name, spec in contract.items()} | {
        name: value for name, value in values.items() if value is not contract.get(name)
    }
    prompt = values["prompt"]
    if not isinstance(prompt, str):
        raise _fail("prompt", prompt, "expected a string")
    aspect_ratio = _choice(contract, "aspect_ratio", values["aspect_ratio"])
    megapixels = _choice(contract, "megapixels", values["megapixels"])
    width = _bounded_integer(contract, "width", values["width"], optional=True)
    height = _bounded_integer(contract, "height", values["height"], optional=True)
    num_inference_steps = _bounded_integer(contract, "num_inference_steps", values["num_inference_steps"])
    prompt_strength = _bounded_number(contract, "prompt_strength", values["prompt_strength"])

    image = _read_image("image", values["image"], "RGB")
    mask = _read_image("mask", values["mask"], "L")
    if mask is not None and image is None:
        raise InputError("Invalid mask: a mask was given without an image; inpainting needs both image and mask.")

    if image is not None:
        mode = Mode.INPAINTING if mask is not None else Mode.IMAGE_TO_IMAGE
        out_width, out_height = size_following_image(*image.size)
        # diffusers keeps int(steps * strength) steps and refuses zero; say so in our terms.
        if int(num_inference_steps * prompt_strength) < 1:
            raise InputError(
                f"Invalid prompt_strength {prompt_strength:g}: with num_inference_steps="
                f"{num_inference_steps} it leaves no denoising step; use a prompt_strength of at least "
                f"{1 / num_inference_steps:.3f} or more steps."
            )
        if mask is not None and mask.size != image.size:
            # A mask drawn at another resolution still means the same region of the picture.
            mask = mask.resize(image.size, Image.Resampling.LANCZOS)
    elif aspect_ratio == "custom":
        for name, value in (("width", width), ("height", height)):
            if value is None:
                raise InputError(
                    f"Invalid {name} None: aspect_ratio is custom, so width and height are "
                    f"required, each an integer from {contract[name].ge} to {contract[name].le}."
                )
        mode = Mode.TEXT_TO_IMAGE
        out_width, out_height = custom_size(width, height)  # type: ignore[arg-type]
    else:
        mode = Mode.TEXT_TO_IMAGE
        out_width, out_height = text_to_image_size(aspect_ratio, megapixels)

    main_source = _optional_text(main_lora_input, values.get("replicate_weights"))
    extra_source = _optional_text("extra_lora", values["extra_lora"])
    main_scale = _bounded_number(contract, "lora_scale", values["lora_scale"])
    extra_scale = _bounded_number(contract, "extra_lora_scale", values["extra_lora_scale"])
    loras = []
    if main_source is not None:
        loras.append(LoraRequest(main_lora_input, main_source, main_scale))
    if extra_source is not None:
        loras.append(LoraRequest("extra_lora", extra_source, extra_scale))

    return Request(
        prompt=prompt,
        mode=mode,
        width=out_width,
        height=out_height,
        image=image,
        mask=mask,
        prompt_strength=prompt_strength,
        model=_choice(contract, "model", values["model"]),
        num_outputs=_bounded_integer(contract, "num_outputs", values["num_outputs"]),  # type: ignore[arg-type]
        num_inference_steps=num_inference_steps,  # type: ignore[arg-type]
        guidance_scale=_bounded_number(contract, "guidance_scale", values["guidance_scale"]),
        seed=_integer("seed", values["seed"], *SEED_RANGE, optional=True),
        output_format=_choice(contract, "output_format", values["output_format"]),
        output_quality=_bounded_integer(contract, "output_quality", values["output_quality"]),  # type: ignore[arg-type]
        disable_safety_checker=_boolean("disable_safety_checker", values["disable_safety_checker"]),
        go_fast=_boolean("go_fast", values["go_fast"]),
        loras=tuple(loras),
    )
