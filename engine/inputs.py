"""The request: every input checked and resolved before anything runs.

Cog's server validates inputs only when a generated OpenAPI schema is present, and
in-process callers skip it entirely, so the predictor checks every value itself. Each
failure is one `InputError` sentence naming the input, the value and what is accepted.
Nothing here touches the models, so a rejected request changes no state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from engine.sizes import (
    ASPECT_RATIOS,
    MEGAPIXELS,
    custom_size,
    size_following_image,
    text_to_image_size,
)

MODELS = ["dev", "schnell"]
OUTPUT_FORMATS = ["webp", "jpg", "png"]
# Bounds of the public contract; predict.py builds its schema from these same names.
SIDE_RANGE = (256, 1440)
PROMPT_STRENGTH_RANGE = (0.0, 1.0)
NUM_OUTPUTS_RANGE = (1, 4)
NUM_INFERENCE_STEPS_RANGE = (1, 50)
GUIDANCE_SCALE_RANGE = (0.0, 10.0)
OUTPUT_QUALITY_RANGE = (0, 100)
LORA_SCALE_RANGE = (-1.0, 3.0)
SEED_RANGE = (0, 2**64 - 1)  # what torch.Generator.manual_seed accepts as unsigned
# Inputs are resized to at most 1440 px anyway; beyond this a file is a decompression bomb.
MAX_INPUT_PIXELS = 50_000_000


class InputError(ValueError):
    """A request input that cannot be served; the message is meant for the caller."""


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


def _number(name: str, value: Any, low: float, high: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        raise _fail(name, value, f"expected a number from {low:g} to {high:g}")
    return float(value)


def _choice(name: str, value: Any, choices: list[str]) -> str:
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
    *,
    prompt: Any,
    image: Any = None,
    mask: Any = None,
    aspect_ratio: Any = "1:1",
    height: Any = None,
    width: Any = None,
    prompt_strength: Any = 0.8,
    model: Any = "dev",
    num_outputs: Any = 1,
    num_inference_steps: Any = 28,
    guidance_scale: Any = 3.0,
    seed: Any = None,
    output_format: Any = "webp",
    output_quality: Any = 80,
    disable_safety_checker: Any = False,
    go_fast: Any = False,
    megapixels: Any = "1",
    replicate_weights: Any = None,
    lora_scale: Any = 1.0,
    extra_lora: Any = None,
    extra_lora_scale: Any = 1.0,
    main_lora_input: str = "replicate_weights",
) -> Request:
    """Check every input and resolve the mode and output size.

    `main_lora_input` names where the main LoRA came from (the request's
    `replicate_weights`, or the deployment's FLUX_MAIN_LORA) so errors point at it.
    """
    if not isinstance(prompt, str):
        raise _fail("prompt", prompt, "expected a string")
    aspect_ratio = _choice("aspect_ratio", aspect_ratio, ASPECT_RATIOS)
    megapixels = _choice("megapixels", megapixels, MEGAPIXELS)
    low, high = SIDE_RANGE
    width = _integer("width", width, low, high, optional=True)
    height = _integer("height", height, low, high, optional=True)
    num_inference_steps = _integer("num_inference_steps", num_inference_steps, *NUM_INFERENCE_STEPS_RANGE)
    prompt_strength = _number("prompt_strength", prompt_strength, *PROMPT_STRENGTH_RANGE)

    image = _read_image("image", image, "RGB")
    mask = _read_image("mask", mask, "L")
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
                    f"required, each an integer from {low} to {high}."
                )
        mode = Mode.TEXT_TO_IMAGE
        out_width, out_height = custom_size(width, height)  # type: ignore[arg-type]
    else:
        mode = Mode.TEXT_TO_IMAGE
        out_width, out_height = text_to_image_size(aspect_ratio, megapixels)

    main_source = _optional_text(main_lora_input, replicate_weights)
    extra_source = _optional_text("extra_lora", extra_lora)
    main_scale = _number("lora_scale", lora_scale, *LORA_SCALE_RANGE)
    extra_scale = _number("extra_lora_scale", extra_lora_scale, *LORA_SCALE_RANGE)
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
        model=_choice("model", model, MODELS),
        num_outputs=_integer("num_outputs", num_outputs, *NUM_OUTPUTS_RANGE),  # type: ignore[arg-type]
        num_inference_steps=num_inference_steps,  # type: ignore[arg-type]
        guidance_scale=_number("guidance_scale", guidance_scale, *GUIDANCE_SCALE_RANGE),
        seed=_integer("seed", seed, *SEED_RANGE, optional=True),
        output_format=_choice("output_format", output_format, OUTPUT_FORMATS),
        output_quality=_integer("output_quality", output_quality, *OUTPUT_QUALITY_RANGE),  # type: ignore[arg-type]
        disable_safety_checker=_boolean("disable_safety_checker", disable_safety_checker),
        go_fast=_boolean("go_fast", go_fast),
        loras=tuple(loras),
    )
