"""Loading FLUX.1 dev and schnell once, sharing everything the two have in common.

The two checkpoints ship identical text encoders, tokenizers and VAE, so schnell borrows
dev's copies and only its transformer and scheduler are loaded separately. For each model,
txt2img, img2img and inpainting are three diffusers pipelines over the same modules
(`share_modules`), so a LoRA applied to the transformer applies to all three.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
)
from diffusers.pipelines.pipeline_utils import DiffusionPipeline

from engine.config import Settings
from engine.fast import FastSettings, build_fast_transformer, first_line, slot_bytes
from engine.inputs import Mode

log = logging.getLogger(__name__)


@dataclass
class FluxModel:
    name: str
    pipelines: dict[Mode, DiffusionPipeline]
    # T5 tokens kept from the prompt: schnell was distilled with 256, dev with 512.
    max_sequence_length: int
    # The go_fast pipelines: the same modules but a quantized, compiled transformer.
    fast_pipelines: dict[Mode, DiffusionPipeline] | None = None
    # False while the transformer waits in CPU memory on a GPU too small for both.
    resident: bool = True

    @property
    def text_to_image(self) -> FluxPipeline:
        return self.pipelines[Mode.TEXT_TO_IMAGE]  # type: ignore[return-value]

    def pipeline(self, mode: Mode, fast: bool) -> DiffusionPipeline:
        return (self.fast_pipelines if fast and self.fast_pipelines else self.pipelines)[mode]


def share_modules(
    pipeline_class: type[DiffusionPipeline], pipeline: DiffusionPipeline, **replace: torch.nn.Module
) -> DiffusionPipeline:
    """A pipeline of another class over the same modules (those in `replace` swapped in).

    Not diffusers' `from_pipe`: without a dtype argument it casts every shared module to
    float32 (diffusers 0.42, pipeline_utils.from_pipe), which doubles a bf16 model's GPU
    memory and would dequantize the fp8 copy. The constructors take the modules as they are."""
    return pipeline_class(**{**pipeline.components, **replace})


def _for_all_modes(pipeline: FluxPipeline) -> dict[Mode, DiffusionPipeline]:
    return {
        Mode.TEXT_TO_IMAGE: pipeline,
        Mode.IMAGE_TO_IMAGE: share_modules(FluxImg2ImgPipeline, pipeline),
        Mode.INPAINTING: share_modules(FluxInpaintPipeline, pipeline),
    }


def load_models(
    settings: Settings, fast: FastSettings | None = None, home: torch.device | None = None
) -> dict[str, FluxModel]:
    """dev and schnell; with `fast`, each also gets its go_fast pipelines where memory allows.
    `home` is where the weights live when it is not the device (CPU memory, when offloading)."""
    # device_map loads each weight straight onto the device instead of staging 24 GB in RAM.
    place = {"dtype": settings.dtype, "device_map": str(home or settings.device)}
    dev = FluxPipeline.from_pretrained(settings.dev_weights, **place)
    schnell_resident = True
    try:
        schnell_transformer = FluxTransformer2DModel.from_pretrained(
            settings.schnell_weights, subfolder="transformer", **place
        )
    except torch.cuda.OutOfMemoryError:
        # A GPU too small for both transformers: schnell waits in CPU memory and the two swap
        # places when a request needs the other (Engine.make_resident).
        torch.cuda.empty_cache()
        log.warning("Not enough GPU memory for both transformers: schnell stays in CPU memory until needed.")
        schnell_transformer = FluxTransformer2DModel.from_pretrained(
            settings.schnell_weights, subfolder="transformer", dtype=settings.dtype, device_map="cpu"
        )
        schnell_resident, fast = False, None
        log.warning("go_fast: no GPU memory for fp8 copies, so go_fast requests run the standard path.")
    schnell_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(settings.schnell_weights, subfolder="scheduler")
    return assemble_models(dev, schnell_transformer, schnell_scheduler, fast, schnell_resident=schnell_resident)


def assemble_models(
    dev: FluxPipeline,
    schnell_transformer: FluxTransformer2DModel,
    schnell_scheduler: FlowMatchEulerDiscreteScheduler,
    fast: FastSettings | None,
    schnell_resident: bool = True,
) -> dict[str, FluxModel]:
    """The served models from loaded modules (bench/gpu.py passes full-size random ones)."""
    # Decode one image at a time: four 1440x1440 images at once need several GiB of VAE
    # activations, which a GPU holding both models in bf16 and fp8 does not have to spare.
    dev.vae.enable_slicing()
    schnell = FluxPipeline(
        transformer=schnell_transformer,
        scheduler=schnell_scheduler,
        vae=dev.vae,
        text_encoder=dev.text_encoder,
        tokenizer=dev.tokenizer,
        text_encoder_2=dev.text_encoder_2,
        tokenizer_2=dev.tokenizer_2,
    )
    models = {}
    for name, pipeline, max_sequence_length in (("dev", dev, 512), ("schnell", schnell, 256)):
        model = FluxModel(name, _for_all_modes(pipeline), max_sequence_length)
        model.resident = name == "dev" or schnell_resident
        if fast is not None:
            model.fast_pipelines = _fast_pipelines(pipeline, fast, name)
        for mode_pipeline in [*model.pipelines.values(), *(model.fast_pipelines or {}).values()]:
            # Progress goes to the prediction's log, one line a step, instead of a tqdm bar.
            mode_pipeline.set_progress_bar_config(disable=True)
        models[name] = model
        log.info(
            "Loaded FLUX.1 %s: transformer of %.2f B parameters, %s on %s.",
            name,
            _billions(pipeline.transformer),
            pipeline.transformer.dtype,
            pipeline.transformer.device,
        )
    return models


def _fast_pipelines(pipeline: FluxPipeline, fast: FastSettings, name: str) -> dict[Mode, DiffusionPipeline] | None:
    shortfall = gpu_shortfall(pipeline.transformer, fast)
    if shortfall:
        log.warning("go_fast: no fp8 copy of %s (%s); its go_fast requests run bf16.", name, shortfall)
        return None
    try:
        transformer = build_fast_transformer(pipeline.transformer, fast, name)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        log.warning("go_fast: not enough GPU memory for the fp8 copy of %s; its go_fast requests run bf16.", name)
        return None
    except Exception as error:  # torchao refusing the hardware, a quantization that does not build: serve bf16
        log.warning(
            "go_fast: building the fast copy of %s failed (%s); its go_fast requests run the standard path.",
            name,
            first_line(error),
        )
        return None
    return _for_all_modes(share_modules(FluxPipeline, pipeline, transformer=transformer))


def gpu_shortfall(transformer: torch.nn.Module, fast: FastSettings) -> str | None:
    """Why an fp8 copy would not fit beside what is loaded, keeping room for activations and for the LoRA
    slots still to come (its own, and both standard transformers' when they will be compiled): a copy that
    fills the GPU would make later requests fail instead of setup. Merging a LoRA into the copy works one
    layer group at a time in float32 (FLUX.1's largest, linear1, about 0.3 GiB): the reserve covers it."""
    if transformer.device.type != "cuda":
        return None
    linear_weights = sum(m.weight.numel() for m in transformer.modules() if isinstance(m, torch.nn.Linear))
    slots = slot_bytes(transformer, fast.lora_rank) if fast.fast_lora == "slot" else 0
    if fast.compile_standard(transformer.device):
        slots += 2 * slot_bytes(transformer, fast.standard_lora_rank)  # dev's and schnell's, added after
    needed = linear_weights + slots + fast.gpu_reserve_bytes  # one byte per fp8 weight
    free, _ = torch.cuda.mem_get_info(transformer.device)
    if free < needed:
        return (
            f"it needs {needed / 2**30:.1f} GiB with the LoRA slots and the activation reserve and "
            f"{free / 2**30:.1f} GiB are free"
        )
    return None


def standard_slots_shortfall(models: dict[str, FluxModel], fast: FastSettings) -> str | None:
    """Why the standard transformers' LoRA slots would not fit, keeping room for activations."""
    transformers = [model.text_to_image.transformer for model in models.values()]
    if transformers[0].device.type != "cuda":
        return None
    needed = sum(slot_bytes(t, fast.standard_lora_rank) for t in transformers) + fast.gpu_reserve_bytes
    free, _ = torch.cuda.mem_get_info(transformers[0].device)
    if free < needed:
        return (
            f"their LoRA slots need {needed / 2**30:.1f} GiB with the activation reserve and "
            f"{free / 2**30:.1f} GiB are free"
        )
    return None


def _billions(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e9
