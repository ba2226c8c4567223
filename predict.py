"""The Cog contract: FLUX.1 [dev] and [schnell] with LoRAs, txt2img, img2img and inpainting.

The inputs, their order, types, defaults, bounds and choices are a published API: keep
them exact. `cog build` and `cog push` read this file statically (cog's Go schema
generator, before Docker starts), so every `Input(...)` is written in the forms it
resolves: each default is `Inputs.<name>`, a class attribute of this file; bounds are
number literals; choices are literal lists; each description is one string literal
(line breaks or concatenation would be dropped or garbled). tests/test_cog_static.py
checks these rules. The engine validates requests against these same `Input` objects,
so this file is the only copy of the contract.
"""

from __future__ import annotations

from cog import BasePredictor, Input, Path

from engine.config import Settings
from engine.generate import Engine
from engine.inputs import input_contract, parse_request
from engine.logs import configure_logging
from errors import InputError
from weights import SETTINGS_INPUT

LORA_SOURCES = "Load LoRA weights. Supports Replicate models in the format <owner>/<username> or <owner>/<username>/<version>, HuggingFace URLs in the format huggingface.co/<owner>/<model-name>, CivitAI URLs in the format civitai.com/models/<id>[/<model-name>], or arbitrary .safetensors URLs from the Internet. For example, 'fofr/flux-pixar-cars'"


class Inputs:
    prompt = Input(
        description="Prompt for generated image. If you include the `trigger_word` used in the training process you are more likely to activate the trained object, style, or concept in the resulting image."
    )
    image = Input(
        description="Input image for image to image or inpainting mode. If provided, aspect_ratio, width, and height inputs are ignored: the output follows the image's size, longest side at most 1440, each side a multiple of 16.",
        default=None,
    )
    mask = Input(
        description="Image mask for image inpainting mode: white areas are repainted, black areas are kept. Needs an image; a mask of another size is resized to it. If provided, aspect_ratio, width, and height inputs are ignored.",
        default=None,
    )
    aspect_ratio = Input(
        description="Aspect ratio for the generated image. If custom is selected, uses height and width below.",
        choices=["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21", "custom"],
        default="1:1",
    )
    height = Input(
        description="Height of generated image. Only works if `aspect_ratio` is set to custom. Will be rounded to nearest multiple of 16.",
        ge=256,
        le=1440,
        default=None,
    )
    width = Input(
        description="Width of generated image. Only works if `aspect_ratio` is set to custom. Will be rounded to nearest multiple of 16.",
        ge=256,
        le=1440,
        default=None,
    )
    prompt_strength = Input(
        description="Prompt strength when using img2img. 1.0 corresponds to full destruction of information in image",
        ge=0.0,
        le=1.0,
        default=0.8,
    )
    model = Input(
        description="Which model to run inference with. The dev model performs best with around 28 inference steps but the schnell model only needs 4 steps.",
        choices=["dev", "schnell"],
        default="dev",
    )
    num_outputs = Input(description="Number of outputs to generate", ge=1, le=4, default=1)
    num_inference_steps = Input(
        description="Number of denoising steps. More steps can give more detailed images, but take longer.",
        ge=1,
        le=50,
        default=28,
    )
    guidance_scale = Input(
        description="Guidance scale for the diffusion process. Lower values can give more realistic images. Good values to try are 2, 2.5, 3 and 3.5. The schnell model ignores it.",
        ge=0.0,
        le=10.0,
        default=3.0,
    )
    seed = Input(
        description="Random seed. Set for reproducible generation; when empty, a random seed is drawn and logged.",
        default=None,
    )
    output_format = Input(description="Format of the output images", choices=["webp", "jpg", "png"], default="webp")
    output_quality = Input(
        description="Quality when saving the output images, from 0 to 100. 100 is best quality, 0 is lowest quality. Not relevant for .png outputs",
        ge=0,
        le=100,
        default=80,
    )
    disable_safety_checker = Input(description="Disable safety checker for generated images.", default=False)
    go_fast = Input(
        description="Run faster predictions with model optimized for speed (fp8 quantized and compiled, on CUDA GPUs of compute capability 8.9 or higher, for every mode, size and LoRA); disable to run in original bf16. Elsewhere it runs the original model and logs why.",
        default=False,
    )
    megapixels = Input(
        description="Approximate number of megapixels for generated image", choices=["1", "0.25"], default="1"
    )
    replicate_weights = Input(description=LORA_SOURCES, default=None)
    lora_scale = Input(
        description="Determines how strongly the main LoRA should be applied. The weights used are base + scale x LoRA delta, with the same scale with and without go_fast: 0 gives the base model exactly and negative values subtract the LoRA. Sane results between 0 and 1.",
        ge=-1.0,
        le=3.0,
        default=1.0,
    )
    extra_lora = Input(description=LORA_SOURCES, default=None)
    extra_lora_scale = Input(
        description="Determines how strongly the extra LoRA should be applied. The weights used are base + scale x LoRA delta, with the same scale with and without go_fast: 0 gives the base model exactly and negative values subtract the LoRA. Sane results between 0 and 1.",
        ge=-1.0,
        le=3.0,
        default=1.0,
    )


class Predictor(BasePredictor):
    def setup(self) -> None:
        configure_logging()
        self.settings = Settings.from_env()
        self.engine = Engine(self.settings)
        # The bounds, choices and defaults the engine checks requests against: the Input
        # declaration of each parameter of this class's predict().
        self.contract = input_contract(self.predict, Inputs)

    def predict(
        self,
        prompt: str = Inputs.prompt,
        image: Path | None = Inputs.image,
        mask: Path | None = Inputs.mask,
        aspect_ratio: str = Inputs.aspect_ratio,
        height: int | None = Inputs.height,
        width: int | None = Inputs.width,
        prompt_strength: float = Inputs.prompt_strength,
        model: str = Inputs.model,
        num_outputs: int = Inputs.num_outputs,
        num_inference_steps: int = Inputs.num_inference_steps,
        guidance_scale: float = Inputs.guidance_scale,
        seed: int | None = Inputs.seed,
        output_format: str = Inputs.output_format,
        output_quality: int = Inputs.output_quality,
        disable_safety_checker: bool = Inputs.disable_safety_checker,
        go_fast: bool = Inputs.go_fast,
        megapixels: str = Inputs.megapixels,
        replicate_weights: str | None = Inputs.replicate_weights,
        lora_scale: float = Inputs.lora_scale,
        extra_lora: str | None = Inputs.extra_lora,
        extra_lora_scale: float = Inputs.extra_lora_scale,
    ) -> list[Path]:
        request = parse_request(
            self.contract,
            prompt=prompt,
            image=image,
            mask=mask,
            aspect_ratio=aspect_ratio,
            height=height,
            width=width,
            prompt_strength=prompt_strength,
            model=model,
            num_outputs=num_outputs,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            seed=seed,
            output_format=output_format,
            output_quality=output_quality,
            disable_safety_checker=disable_safety_checker,
            go_fast=go_fast,
            megapixels=megapixels,
            replicate_weights=replicate_weights,
            lora_scale=lora_scale,
            extra_lora=extra_lora,
            extra_lora_scale=extra_lora_scale,
        )
        return [Path(path) for path in self.engine.predict(request)]


class TrainedLoraPredictor(Predictor):
    """A published fine-tune: the main LoRA is fixed by the deployment (FLUX_MAIN_LORA)."""

    def setup(self) -> None:
        super().setup()
        if self.settings.main_lora is None:
            raise InputError(f"{SETTINGS_INPUT} is not set: TrainedLoraPredictor needs the path or URL of its LoRA.")
        self.engine.check_lora(SETTINGS_INPUT, self.settings.main_lora)

    def predict(  # type: ignore[override]
        self,
        prompt: str = Inputs.prompt,
        image: Path | None = Inputs.image,
        mask: Path | None = Inputs.mask,
        aspect_ratio: str = Inputs.aspect_ratio,
        height: int | None = Inputs.height,
        width: int | None = Inputs.width,
        prompt_strength: float = Inputs.prompt_strength,
        model: str = Inputs.model,
        num_outputs: int = Inputs.num_outputs,
        num_inference_steps: int = Inputs.num_inference_steps,
        guidance_scale: float = Inputs.guidance_scale,
        seed: int | None = Inputs.seed,
        output_format: str = Inputs.output_format,
        output_quality: int = Inputs.output_quality,
        disable_safety_checker: bool = Inputs.disable_safety_checker,
        go_fast: bool = Inputs.go_fast,
        megapixels: str = Inputs.megapixels,
        lora_scale: float = Inputs.lora_scale,
        extra_lora: str | None = Inputs.extra_lora,
        extra_lora_scale: float = Inputs.extra_lora_scale,
    ) -> list[Path]:
        request = parse_request(
            self.contract,
            prompt=prompt,
            image=image,
            mask=mask,
            aspect_ratio=aspect_ratio,
            height=height,
            width=width,
            prompt_strength=prompt_strength,
            model=model,
            num_outputs=num_outputs,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            seed=seed,
            output_format=output_format,
            output_quality=output_quality,
            disable_safety_checker=disable_safety_checker,
            go_fast=go_fast,
            megapixels=megapixels,
            replicate_weights=self.settings.main_lora,
            main_lora_input=SETTINGS_INPUT,
            lora_scale=lora_scale,
            extra_lora=extra_lora,
            extra_lora_scale=extra_lora_scale,
        )
        return [Path(path) for path in self.engine.predict(request)]
