"""The engine: one code path from a checked request to image files, for all three modes."""

from __future__ import annotations

import gc
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import cog
import torch
from PIL import Image

from downloads import redact
from engine.attention import choose_attention
from engine.compile_cache import (
    artifacts_folder,
    artifacts_name,
    keep_inductor_caches_beside,
    load_artifacts,
    save_artifacts,
)
from engine.config import Settings
from engine.fast import (
    FastSettings,
    configure_compile_cache,
    fast_path_unavailable,
    first_line,
    quantized_twins,
    uncompiled,
    weight_quantizer,
    with_slot_compiled,
)
from engine.inputs import LoraRequest, Mode, Request
from engine.offload import HOME, Offload
from engine.outputs import clear_folder, save_images
from engine.pipelines import FluxModel, load_models, standard_slots_shortfall
from lora_loading.adapters import LoraAdapters, TextEncoderLoras
from lora_loading.deltas import ParameterDeltas, QuantizedCopies
from lora_loading.formats import LoraFile, check_lora_matches, each_file_read_once, read_lora
from lora_loading.merged import FastLoras
from lora_loading.slots import LoraSlots, SlotOrAdapters
from safety import SafetyChecker
from weights import LoraCache, fetch_lora

log = logging.getLogger(__name__)
OFFLOADED = "the models are offloaded to CPU memory (FLUX_OFFLOAD), which leaves no GPU room for fp8 copies"


@contextmanager
def timed(phase: str, device: torch.device, metric: str | None = None) -> Iterator[None]:
    """Log one line with the phase's wall time and, inside a prediction, record it as the
    cog metric `metric` (seconds), which the prediction response lists under `metrics`.
    CUDA runs asynchronously, so the clock is read only after the GPU has finished."""
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    log.info("Timing: %s took %.3f s.", phase, seconds)
    if metric is not None:
        record_metric(metric, round(seconds, 4))


def record_metric(name: str, value: float) -> None:
    """cog's metric API; outside a prediction (setup, script/predict) its scope ignores it."""
    cog.current_scope().record_metric(name, value)  # type: ignore[attr-defined]


def random_seed() -> int:
    return int.from_bytes(os.urandom(4), "big")


class Engine:
    def __init__(self, settings: Settings):
        with timed("fetching weights named by URL", settings.device):
            settings = settings.with_weights_fetched()
        self.settings = settings
        self.device = settings.device
        fast = FastSettings.from_env()
        self.fast_unavailable = fast_path_unavailable(fast, self.device, settings.dtype)
        configure_compile_cache(fast)
        self.offload = Offload(self.device, enabled=settings.offload == "on")
        if self.offload.enabled:
            self.fast_unavailable = OFFLOADED
        with timed(
            "loading FLUX.1 dev and schnell" + ("" if self.fast_unavailable else " (+ go_fast copies)"), self.device
        ):
            self.models: dict[str, FluxModel] = self._load_models(fast)
        if self.fast_unavailable:
            log.info("go_fast: %s, so go_fast requests run the standard path.", self.fast_unavailable)
        # Before anything is compiled: the kernel is part of the compiled graphs.
        self.attention = set_attention(self.models, self.device)
        compiles = (fast.compile and not self.fast_unavailable) or fast.compile_standard(self.device)
        # The compile cache this setup loads before compiling and, when it had none, writes after (script/warm-cache
        # reports these).
        self.compile_cache = artifacts_folder(fast) / artifacts_name(fast, self.device, settings.dtype)
        if compiles:
            keep_inductor_caches_beside(fast)
        self.compile_cache_loaded = compiles and load_artifacts(self.compile_cache)
        if fast.compile and not self.fast_unavailable:
            with timed("compiling the go_fast transformers", self.device):
                self._warm_up_fast_path(fast)
        if not self.fast_unavailable and not any(model.fast_pipelines for model in self.models.values()):
            self.fast_unavailable = "no model has a fast copy (the setup log says why)"
        # After the fast copies, which are built from the plain transformers' state dicts.
        self.standard_compiled = self._compile_standard_path(fast)
        self.compile_cache_written = compiles and not self.compile_cache_loaded and save_artifacts(self.compile_cache)
        with timed("loading the safety checker", self.device):
            self.safety = SafetyChecker(
                settings.safety_checker_weights,
                settings.nsfw_classifier_weights,
                self.device,
                settings.dtype,
                home=HOME if self.offload.enabled else None,
            )
        # dev and schnell share their text encoders, so those have one LoRA state, set by every request.
        dev = self.models["dev"].text_to_image
        self.text_encoder_loras = TextEncoderLoras(
            {"text_encoder": dev.text_encoder, "text_encoder_2": dev.text_encoder_2}
        )
        self.loras = lora_states(self.models, self.standard_compiled, fast)
        self.lora_cache = LoraCache.from_env()
        self.output_folder = Path(tempfile.mkdtemp(prefix="flux-outputs-"))
        self._explained_go_fast = False

    def _load_models(self, fast: FastSettings) -> dict[str, FluxModel]:
        if self.offload.enabled:
            return load_models(self.settings, home=HOME)
        try:
            return load_models(self.settings, None if self.fast_unavailable else fast)
        except torch.cuda.OutOfMemoryError:
            if self.settings.offload == "off":
                raise
        gc.collect()  # what the failed load had placed on the GPU
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.warning(
            "FLUX.1 dev does not fit on this GPU: the models stay in CPU memory and each step of a request "
            "moves what it runs onto the GPU, which adds seconds to every request (FLUX_OFFLOAD=off refuses)."
        )
        self.offload.enabled, self.fast_unavailable = True, OFFLOADED
        return load_models(self.settings, home=HOME)

    def _warm_up_fast_path(self, fast: FastSettings) -> None:
        for model in self.models.values():
            if not model.fast_pipelines:  # None where the GPU had no room for the fp8 copy, or it failed to build
                continue
            try:
                warm_up_compiled_pipeline(model.fast_pipelines[Mode.TEXT_TO_IMAGE], model.max_sequence_length, fast)
            except Exception as error:  # a compiler that fails (no C++ compiler, a kernel that does not build)
                # The copy goes: this model's go_fast requests take the standard path, which needed none of it.
                log.warning(
                    "go_fast: compiling the fast copy of %s failed (%s); its go_fast requests run the standard path.",
                    model.name,
                    first_line(error),
                )
                model.fast_pipelines = None

    def _compile_standard_path(self, fast: FastSettings) -> bool:
        """The standard transformers with a fixed-rank LoRA slot and their blocks compiled, as the fast copies
        are (engine/fast.py); whether they are. Not where modules move between devices during requests."""
        if not fast.compile_standard(self.device):
            log.info("Standard path: not compiled (FLUX_COMPILE=1 compiles it on %s).", self.device.type)
            return False
        why_not = (
            "the models are offloaded to CPU memory (FLUX_OFFLOAD)"
            if self.offload.enabled
            else "schnell's transformer moves between CPU and GPU memory"
            if not all(model.resident for model in self.models.values())
            else standard_slots_shortfall(self.models, fast)
        )
        if why_not:
            log.warning("Standard path: not compiled, as %s.", why_not)
            return False
        with timed("compiling the standard transformers", self.device):
            try:
                for model in self.models.values():
                    with_slot_compiled(model.text_to_image.transformer, fast.standard_lora_rank, fast, model.name)
                    warm_up_compiled_pipeline(model.text_to_image, model.max_sequence_length, fast)
            except Exception as error:  # a compiler that fails: the server runs eager rather than not at all
                log.warning("Standard path: compiling failed (%s); it runs eager.", first_line(error))
                for model in self.models.values():
                    uncompiled(model.text_to_image.transformer)
                    if getattr(model.text_to_image.transformer, "peft_config", None):
                        model.text_to_image.transformer.unload_lora()  # the slot out: plain modules again
                return False
        return True

    @torch.inference_mode()
    def predict(self, request: Request) -> list[Path]:
        clear_folder(self.output_folder)
        model = self.models[request.model]
        wanted = _unique_loras(request.loras)
        with timed("fetching LoRAs", self.device):
            paths = [fetch_lora(lora.input_name, lora.source, self.lora_cache) for lora in wanted]
        fast = request.go_fast and model.fast_pipelines is not None
        if request.go_fast and not fast and not self._explained_go_fast:
            why = self.fast_unavailable or f"FLUX.1 {model.name} has no fast copy (the setup log says why)"
            log.info("go_fast: %s; running the standard path.", why)
            self._explained_go_fast = True
        pipeline = model.pipeline(request.mode, fast)
        self.make_resident(model)
        seed = request.seed if request.seed is not None else random_seed()
        log.info(
            "Mode %s on %s%s: %dx%d, %d image(s), %d steps, seed %d.",
            request.mode.value,
            model.name,
            " (go_fast)" if fast else "",
            request.width,
            request.height,
            request.num_outputs,
            request.num_inference_steps,
            seed,
        )

        with timed("loading LoRAs", self.device, "lora_load_time"):
            eager = self._apply_loras(wanted, paths, request.model, fast)
        if eager:
            log.info("Compiled blocks: %s, which their LoRA slot cannot hold; this request runs eager.", eager)

        text_encoders = {"text_encoder": pipeline.text_encoder, "text_encoder_2": pipeline.text_encoder_2}
        with timed("text encoding", self.device, "text_encoding_time"), self.offload.running(**text_encoders):
            # One prompt embedding per image, so the batched call draws the same noise as
            # diffusers' own `num_images_per_prompt`.
            prompt_embeds, pooled_prompt_embeds, _ = pipeline.encode_prompt(
                prompt=request.prompt,
                prompt_2=None,
                device=self.device,
                num_images_per_prompt=request.num_outputs,
                max_sequence_length=model.max_sequence_length,
            )

        # The VAE encodes img2img and inpainting inputs inside the call.
        denoising_modules = {"transformer": pipeline.transformer, "vae": pipeline.vae}
        with (
            timed("denoising", self.device, "denoising_time"),
            self.offload.running(**denoising_modules),
            torch.compiler.set_stance("force_eager" if eager else "default"),
        ):
            latents = pipeline(
                prompt_embeds=prompt_embeds,
                pooled_prompt_embeds=pooled_prompt_embeds,
                width=request.width,
                height=request.height,
                num_inference_steps=request.num_inference_steps,
                guidance_scale=request.guidance_scale,
                generator=torch.Generator(device=self.device).manual_seed(seed),
                max_sequence_length=model.max_sequence_length,
                output_type="latent",
                callback_on_step_end=_log_step,
                **_image_inputs(request),
            ).images

        with timed("decoding", self.device, "decoding_time"), self.offload.running(vae=pipeline.vae):
            images = decode_latents(pipeline, latents, request.width, request.height)

        if request.disable_safety_checker:
            log.info("Safety checker disabled by the request.")
        else:
            with timed("safety check", self.device, "safety_check_time"), self.offload.running(**self.safety.modules):
                images = self.safety.filter(images)

        with timed("encoding files", self.device, "file_encoding_time"):
            paths = save_images(images, self.output_folder, request.output_format, request.output_quality)
        record_metric("image_output_count", len(paths))
        return paths

    def make_resident(self, model: FluxModel) -> None:
        """On a GPU too small for both transformers, move the other one out and this one in."""
        if model.resident:
            return
        with timed(f"moving FLUX.1 {model.name} onto the GPU", self.device):
            for other in self.models.values():
                if other.resident and other is not model:
                    other.text_to_image.transformer.to("cpu")
                    other.resident = False
            torch.cuda.empty_cache()
            model.text_to_image.transformer.to(self.device)
            model.resident = True

    def check_lora(self, input_name: str, source: str) -> None:
        """Fetch and check a LoRA without applying it, so a deployment's fixed LoRA that
        cannot work fails at setup rather than on every request."""
        path = fetch_lora(input_name, source, self.lora_cache)
        check_lora_matches(
            self.models["dev"].text_to_image, read_lora(LoraFile(input_name, source, path, 1.0)), input_name
        )

    def _apply_loras(self, wanted: list[LoraRequest], paths: list[Path], model: str, fast: bool) -> str | None:
        """Fetched first, then applied: a failed download leaves the model untouched. The request's files are
        held while it loads them and kept by the cache's eviction, which runs once they are all here.
        Returns why the request cannot run compiled blocks (SlotOrAdapters), or None."""
        with ExitStack() as held:
            try:
                held.enter_context(self.lora_cache.in_use(paths))
            except FileNotFoundError:  # another process sharing the cache evicted one in between
                paths = [fetch_lora(lora.input_name, lora.source, self.lora_cache) for lora in wanted]
                held.enter_context(self.lora_cache.in_use(paths))
            try:
                self.lora_cache.evict(keep=paths)
            except OSError as error:
                log.warning("LoRA cache: eviction failed (%s).", error.strerror or type(error).__name__)
            files = [
                LoraFile(lora.input_name, lora.source, path, lora.scale)
                for lora, path in zip(wanted, paths, strict=True)
            ]
            try:
                with each_file_read_once():
                    self.text_encoder_loras.apply(files)
                    eager = self.loras[model, fast].apply(files)
            except BaseException:
                self.text_encoder_loras.unload()  # nothing of a failed request stays applied
                raise
        for lora in wanted:
            log.info("LoRA %s %s at scale %g.", lora.input_name, redact(lora.source), lora.scale)
        return eager


def set_attention(models: dict[str, FluxModel], device: torch.device) -> str | None:
    """The attention kernel chosen by FLUX_ATTENTION and a probe (engine/attention.py), set on every transformer,
    standard and go_fast; None: diffusers' default."""
    backend = choose_attention(device)
    if backend:
        for model in models.values():
            model.text_to_image.transformer.set_attention_backend(backend)
            if model.fast_pipelines:
                model.fast_pipelines[Mode.TEXT_TO_IMAGE].transformer.set_attention_backend(backend)
    return backend


LoraState = LoraAdapters | SlotOrAdapters | FastLoras


def lora_states(
    models: dict[str, FluxModel], standard_compiled: bool, fast: FastSettings
) -> dict[tuple[str, bool], LoraState]:
    """Each model's LoRA state, by (model, go_fast): peft adapters on the standard path (beside its slot when
    compiled); on the go_fast copy, LoRA pairs in its slot (or merged, FLUX_FAST_LORA=merged) and the rest
    merged into its weights. Both states of a model share one record of what is changed in place: the copy
    holds the bf16 model's own biases and norms."""
    states: dict[tuple[str, bool], LoraState] = {}
    for name, model in models.items():
        in_place = ParameterDeltas()
        standard = SlotOrAdapters if standard_compiled else LoraAdapters
        states[name, False] = standard(model.text_to_image, in_place)
        if model.fast_pipelines:
            copy = model.fast_pipelines[Mode.TEXT_TO_IMAGE]
            twins = QuantizedCopies(
                quantized_twins(model.text_to_image.transformer, copy.transformer), weight_quantizer(fast)
            )
            slot = LoraSlots(copy, in_place) if fast.fast_lora == "slot" else None
            states[name, True] = FastLoras(model.text_to_image, in_place, twins, slot)
    return states


@torch.inference_mode()
def warm_up_compiled_pipeline(pipeline: Any, max_sequence_length: int, settings: FastSettings) -> None:
    """Compile at setup rather than in the first request, at the sizes requests use (FLUX_WARM_UP_SIZE, so that
    inductor tunes its kernels for real token counts): batch 1 and the largest batch (dynamo specialises a
    dimension of size 1), with the LoRA slot, where there is one, off and on. One step each: with dynamic
    shapes, every other size and batch reuses these graphs."""
    slot = bool(getattr(pipeline.transformer, "peft_config", None))
    for lora_on in (False, True) if slot else (False,):
        if lora_on:
            pipeline.transformer.enable_adapters()
        for batch in (1, settings.warm_up_batch):
            pipeline(
                prompt="",
                width=settings.warm_up_size,
                height=settings.warm_up_size,
                num_inference_steps=1,
                num_images_per_prompt=batch,
                max_sequence_length=max_sequence_length,
                output_type="latent",
            )
    if slot:
        pipeline.transformer.disable_adapters()


def _unique_loras(loras: tuple[LoraRequest, ...]) -> list[LoraRequest]:
    unique: list[LoraRequest] = []
    for lora in loras:
        if any(kept.source == lora.source for kept in unique):
            log.warning(
                "%s names the same LoRA as %s; it is applied once, at %s's scale.",
                lora.input_name,
                unique[0].input_name,
                unique[0].input_name,
            )
            continue
        unique.append(lora)
    return unique


def _image_inputs(request: Request) -> dict[str, Any]:
    if request.mode is Mode.TEXT_TO_IMAGE:
        return {}
    inputs: dict[str, Any] = {"image": request.image, "strength": request.prompt_strength}
    if request.mode is Mode.INPAINTING:
        inputs["mask_image"] = request.mask
    return inputs


def _log_step(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
    log.info("Denoising step %d/%d.", step + 1, pipeline.num_timesteps)
    return tensors


def decode_latents(pipeline: Any, latents: torch.Tensor, width: int, height: int) -> list[Image.Image]:
    """The last lines of diffusers' Flux pipelines, run outside the call so decoding is
    timed on its own. `_unpack_latents` is the pipelines' own (private) helper."""
    latents = pipeline._unpack_latents(latents, height, width, pipeline.vae_scale_factor)
    latents = latents / pipeline.vae.config.scaling_factor + pipeline.vae.config.shift_factor
    decoded = pipeline.vae.decode(latents, return_dict=False)[0]
    return pipeline.image_processor.postprocess(decoded, output_type="pil")
