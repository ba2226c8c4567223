"""The Cog contract: FLUX.1 [dev] and [schnell] with LoRAs, txt2img, img2img and inpainting.

The inputs, their order, types, defaults, bounds and choices are a published API: keep
them exact. Each input is declared once below and shared by both predictors.
"""

from __future__ import annotations

from typing import Any

from cog import BasePredictor, Input, Path

from engine.config import Settings
from engine.generate import Engine
from engine.inputs import (
    GUIDANCE_SCALE_RANGE,
    LORA_SCALE_RANGE,
    MODELS,
    NUM_INFERENCE_STEPS_RANGE,
    NUM_OUTPUTS_RANGE,
    OUTPUT_FORMATS,
    OUTPUT_QUALITY_RANGE,
    PROMPT_STRENGTH_RANGE,
    SIDE_RANGE,
    InputError,
    parse_request,
)
from engine.logs import configure_logging
from engine.sizes import ASPECT_RATIOS, MEGAPIXELS
from weights import SETTINGS_INPUT

LORA_SOURCES = (
    "Load LoRA weights. Supports Replicate models in the format <owner>/<username> or "
    "<owner>/<username>/<version>, HuggingFace URLs in the format huggingface.co/<owner>/<model-name>, CivitAI "
    "URLs in the format civitai.com/models/<id>[/<model-name>], or arbitrary .safetensors URLs from the Internet. "
    "For example, 'fofr/flux-pixar-cars'"
)
LORA_SCALE = (
    "The weights used are base + scale x LoRA delta, with the same scale with and without go_fast: 0 gives the "
    "base model exactly and negative values subtract the LoRA. Sane results between 0 and 1."
)

PROMPT = Input(
    description="Prompt for generated image. If you include the `trigger_word` used in the training process "
    "you are more likely to activate the trained object, style, or concept in the resulting image."
)
IMAGE = Input(
    description="Input image for image to image or inpainting mode. If provided, aspect_ratio, width, and "
    "height inputs are ignored: the output follows the image's size, longest side at most 1440, each side a "
    "multiple of 16.",
    default=None,
)
MASK = Input(
    description="Image mask for image inpainting mode: white areas are repainted, black areas are kept. "
    "Needs an image; a mask of another size is resized to it. If provided, aspect_ratio, width, and height "
    "inputs are ignored.",
    default=None,
)
ASPECT_RATIO = Input(
    description="Aspect ratio for the generated image. If custom is selected, uses height and width below.",
    choices=ASPECT_RATIOS,
    default="1:1",
)
HEIGHT = Input(
    description="Height of generated image. Only works if `aspect_ratio` is set to custom. Will be rounded to "
    "nearest multiple of 16.",
    ge=SIDE_RANGE[0],
    le=SIDE_RANGE[1],
    default=None,
)
WIDTH = Input(
    description="Width of generated image. Only works if `aspect_ratio` is set to custom. Will be rounded to "
    "nearest multiple of 16.",
    ge=SIDE_RANGE[0],
    le=SIDE_RANGE[1],
    default=None,
)
PROMPT_STRENGTH = Input(
    description="Prompt strength when using img2img. 1.0 corresponds to full destruction of information in image",
    ge=PROMPT_STRENGTH_RANGE[0],
    le=PROMPT_STRENGTH_RANGE[1],
    default=0.8,
)
MODEL = Input(
    description="Which model to run inference with. The dev model performs best with around 28 inference "
    "steps but the schnell model only needs 4 steps.",
    choices=MODELS,
    default="dev",
)
NUM_OUTPUTS = Input(
    description="Number of outputs to generate", ge=NUM_OUTPUTS_RANGE[0], le=NUM_OUTPUTS_RANGE[1], default=1
)
NUM_INFERENCE_STEPS = Input(
    description="Number of denoising steps. More steps can give more detailed images, but take longer.",
    ge=NUM_INFERENCE_STEPS_RANGE[0],
    le=NUM_INFERENCE_STEPS_RANGE[1],
    default=28,
)
GUIDANCE_SCALE = Input(
    description="Guidance scale for the diffusion process. Lower values can give more realistic images. Good "
    "values to try are 2, 2.5, 3 and 3.5. The schnell model ignores it.",
    ge=GUIDANCE_SCALE_RANGE[0],
    le=GUIDANCE_SCALE_RANGE[1],
    default=3.0,
)
SEED = Input(
    description="Random seed. Set for reproducible generation; when empty, a random seed is drawn and logged.",
    default=None,
)
OUTPUT_FORMAT = Input(description="Format of the output images", choices=OUTPUT_FORMATS, default="webp")
OUTPUT_QUALITY = Input(
    description="Quality when saving the output images, from 0 to 100. 100 is best quality, 0 is lowest "
    "quality. Not relevant for .png outputs",
    ge=OUTPUT_QUALITY_RANGE[0],
    le=OUTPUT_QUALITY_RANGE[1],
    default=80,
)
DISABLE_SAFETY_CHECKER = Input(description="Disable safety checker for generated images.", default=False)
GO_FAST = Input(
    description="Run faster predictions with model optimized for speed (fp8 quantized and compiled, on CUDA GPUs "
    "of compute capability 8.9 or higher, for every mode, size and LoRA); disable to run in original bf16. "
    "Elsewhere it runs the original model and logs why.",
    default=False,
)
MEGAPIXELS_INPUT = Input(
    description="Approximate number of megapixels for generated image", choices=MEGAPIXELS, default="1"
)
REPLICATE_WEIGHTS = Input(description=LORA_SOURCES, default=None)
LORA_SCALE_INPUT = Input(
    description="Determines how strongly the main LoRA should be applied. " + LORA_SCALE,
    ge=LORA_SCALE_RANGE[0],
    le=LORA_SCALE_RANGE[1],
    default=1.0,
)
EXTRA_LORA = Input(description=LORA_SOURCES, default=None)
EXTRA_LORA_SCALE = Input(
    description="Determines how strongly the extra LoRA should be applied. " + LORA_SCALE,
    ge=LORA_SCALE_RANGE[0],
    le=LORA_SCALE_RANGE[1],
    default=1.0,
)


class Predictor(BasePredictor):
    def setup(self) -> None:
        configure_logging()
        self.settings = Settings.from_env()
        self.engine = Engine(self.settings)

    def predict(
        self,
        prompt: str = PROMPT,
        image: Path | None = IMAGE,
        mask: Path | None = MASK,
        aspect_ratio: str = ASPECT_RATIO,
        height: int | None = HEIGHT,
        width: int | None = WIDTH,
        prompt_strength: float = PROMPT_STRENGTH,
        model: str = MODEL,
        num_outputs: int = NUM_OUTPUTS,
        num_inference_steps: int = NUM_INFERENCE_STEPS,
        guidance_scale: float = GUIDANCE_SCALE,
        seed: int | None = SEED,
        output_format: str = OUTPUT_FORMAT,
        output_quality: int = OUTPUT_QUALITY,
        disable_safety_checker: bool = DISABLE_SAFETY_CHECKER,
        go_fast: bool = GO_FAST,
        megapixels: str = MEGAPIXELS_INPUT,
        replicate_weights: str | None = REPLICATE_WEIGHTS,
        lora_scale: float = LORA_SCALE_INPUT,
        extra_lora: str | None = EXTRA_LORA,
        extra_lora_scale: float = EXTRA_LORA_SCALE,
    ) -> list[Path]:
        return self._generate(locals())

    def _generate(self, inputs: dict[str, Any], main_lora_input: str = "replicate_weights") -> list[Path]:
        inputs = {name: value for name, value in inputs.items() if name not in ("self", "__class__")}
        return [Path(path) for path in self.engine.predict(parse_request(**inputs, main_lora_input=main_lora_input))]


class TrainedLoraPredictor(Predictor):
    """A published fine-tune: the main LoRA is fixed by the deployment (FLUX_MAIN_LORA)."""

    def setup(self) -> None:
        super().setup()
        if self.settings.main_lora is None:
            raise InputError(f"{SETTINGS_INPUT} is not set: TrainedLoraPredictor needs the path or URL of its LoRA.")
        self.engine.check_lora(SETTINGS_INPUT, self.settings.main_lora)

    def predict(  # type: ignore[override]
        self,
        prompt: str = PROMPT,
        image: Path | None = IMAGE,
        mask: Path | None = MASK,
        aspect_ratio: str = ASPECT_RATIO,
        height: int | None = HEIGHT,
        width: int | None = WIDTH,
        prompt_strength: float = PROMPT_STRENGTH,
        model: str = MODEL,
        num_outputs: int = NUM_OUTPUTS,
        num_inference_steps: int = NUM_INFERENCE_STEPS,
        guidance_scale: float = GUIDANCE_SCALE,
        seed: int | None = SEED,
        output_format: str = OUTPUT_FORMAT,
        output_quality: int = OUTPUT_QUALITY,
        disable_safety_checker: bool = DISABLE_SAFETY_CHECKER,
        go_fast: bool = GO_FAST,
        megapixels: str = MEGAPIXELS_INPUT,
        lora_scale: float = LORA_SCALE_INPUT,
        extra_lora: str | None = EXTRA_LORA,
        extra_lora_scale: float = EXTRA_LORA_SCALE,
    ) -> list[Path]:
        return self._generate({**locals(), "replicate_weights": self.settings.main_lora}, SETTINGS_INPUT)
