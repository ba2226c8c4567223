"""GPU benchmark of the standard (bf16) and go_fast paths, on the full-size FLUX.1
architecture with random weights, so it needs no download and no internet.

It builds what the server holds, at full size: dev and schnell transformers, the T5-XXL and
CLIP-L text encoders, the VAE and both safety models, and assembles them with the server's
own code (engine.pipelines.assemble_models: fp8 copies, memory checks, shared modules), then
warms up with the server's own warm-up. On the GPU machine, from the repo root, with
diffusers, torchao and peft wheels in .whl/ (bench/fetch_wheels.sh):

    bash bench/run_gpu.sh                       # the table, within 9 minutes on an H100
    bash bench/run_gpu.sh --parts headline --no-warm-setup

It prints each row as soon as it is measured, the headline first (after setup, which everything
needs): dev, batch 1, go_fast and bf16, each without and with a rank-16 LoRA, the LoRA switch,
peak memory, recompiles and go_fast's accuracy against bf16 (latents, and the LoRA's effect);
then the other models and batches, text encoding and wider LoRAs while time is left
(BENCH_DEADLINE), then setup again with a warm compile cache. Times are medians of warm runs
timed with CUDA events (denoising + VAE decode; text encoding has its own row); a table of
every row ends the run.
`--tiny` runs every code path at toy sizes on a CPU in production's configuration (bf16,
torchao's dynamic fp8 past its hardware check, inductor), to check the script first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.inputs import Mode  # noqa: E402  (after the repo is on the path)

FULL = {
    "transformer": {},  # diffusers' defaults are FLUX.1's
    "vae": dict(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=16,
        layers_per_block=2,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    ),
    "t5": dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    "checker": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
    "checker_projection": 768,
    "classifier": {},  # ViT-base, as Falconsai's
}
TINY = {
    "transformer": dict(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6),
    ),
    "vae": dict(
        block_out_channels=(16, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    ),
    "t5": dict(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4),
    "clip": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
    "checker": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
    "checker_projection": 16,
    "classifier": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
}
LORA_FOLDER = Path("/tmp/flux-bench-loras")  # GBs at rank 64: kept out of $OUT


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device("cpu" if args.tiny else "cuda")
        self.dtype = torch.bfloat16
        self.sizes = TINY if args.tiny else FULL
        self.rows: list[tuple[str, str]] = []
        self.outputs: dict[tuple[str, str], list[torch.Tensor]] = {}

    def row(self, name: str, value: str) -> None:
        self.rows.append((name, value))
        print(f"{name}: {value}", flush=True)
        # Written as it goes, so a run cut short by a time limit still reports what it measured.
        (Path(self.args.out) / "bench.json").write_text(json.dumps(dict(self.rows), indent=1))

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed_ms(self, action: Any, runs: int) -> float:
        samples = []
        for _ in range(runs):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                action()
                end.record()
                torch.cuda.synchronize()
                samples.append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                action()
                samples.append((time.perf_counter() - begin) * 1000)
        return statistics.median(samples)

    # What the server holds, with random weights

    def random_module(self, build: Any, seed: int) -> Any:
        """Built on the meta device and filled on the GPU: no 48 GB float32 staging."""
        with torch.device("meta"):
            module = build()
        # Cast while still on meta, so the GPU never holds a float32 copy (48 GB for one transformer).
        module = module.to(self.dtype).to_empty(device=self.device).eval()
        generator = torch.Generator(self.device).manual_seed(seed)
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.normal_(0, 0.02, generator=generator)
        return module

    def build_components(self) -> tuple[Any, Any, Any]:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        from tooling.demo_model import build_clip_tokenizer, build_t5_tokenizer

        sizes = self.sizes
        clip_tokenizer, t5_tokenizer = build_clip_tokenizer(), build_t5_tokenizer()
        eos = clip_tokenizer.eos_token_id
        clip_config = CLIPTextConfig(
            vocab_size=49408,
            max_position_embeddings=77,
            projection_dim=sizes["clip"]["hidden_size"],
            bos_token_id=eos - 1,
            eos_token_id=eos,
            pad_token_id=eos,
            **sizes["clip"],
        )
        t5_config = T5Config(
            vocab_size=32128,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
            **sizes["t5"],
        )
        # Text encoders have buffers (CLIP's position ids) that meta construction would leave
        # empty, so they are built on the device directly.
        with torch.device(self.device):
            clip = CLIPTextModel(clip_config).to(self.dtype).eval()
            t5 = T5EncoderModel(t5_config).to(self.dtype).eval()
        dev = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(
                shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15
            ),
            vae=self.random_module(lambda: AutoencoderKL(**sizes["vae"]), seed=2),
            text_encoder=clip,
            tokenizer=clip_tokenizer,
            text_encoder_2=t5,
            tokenizer_2=t5_tokenizer,
            transformer=self.random_module(
                lambda: FluxTransformer2DModel(**sizes["transformer"], guidance_embeds=True), seed=0
            ),
        )
        schnell_transformer = self.random_module(
            lambda: FluxTransformer2DModel(**sizes["transformer"], guidance_embeds=False), seed=1
        )
        return dev, schnell_transformer, FlowMatchEulerDiscreteScheduler(shift=1.0)

    def build_safety_models(self) -> list[Any]:
        """Held for their memory only: the CompVis checker (CLIP ViT-L/14) and a ViT-base."""
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPConfig, ViTConfig, ViTForImageClassification

        checker = CLIPConfig(
            vision_config=dict(patch_size=14, image_size=224, **self.sizes["checker"]),
            projection_dim=self.sizes["checker_projection"],
        )
        classifier = ViTConfig(num_labels=2, **self.sizes["classifier"])
        with torch.device("meta"):
            models = [StableDiffusionSafetyChecker(checker), ViTForImageClassification(classifier)]
        return [model.to(self.dtype).to_empty(device=self.device) for model in models]

    def setup(self) -> None:
        from engine.fast import FastSettings, configure_compile_cache
        from engine.generate import set_attention, warm_up_compiled_pipeline
        from engine.pipelines import assemble_models

        a = self.args
        self.fast_settings = FastSettings(
            quantization="float8-dynamic" if a.tiny else "auto",
            compile=not a.no_compile,
            compile_backend=a.backend,
            lora_rank=a.slot_rank,
            compile_cache_dir=a.compile_cache,
            gpu_reserve_bytes=int(a.reserve_gib * 2**30),
            standard_compile=not a.no_compile,
            standard_lora_rank=a.standard_slot_rank,
            warm_up_size=a.size,
            warm_up_batch=a.warm_up_batch,
            fast_lora=a.fast_lora,
        )
        configure_compile_cache(self.fast_settings)
        if a.tiny:
            import torchao.quantization.quant_api as quant_api

            # As in tests/test_fast.py: torchao's fp8 tensors compute on CPU; only its
            # quantize-time hardware check refuses.
            quant_api._check_hardware_support = lambda granularity: None
        cache = Path(a.compile_cache)
        label = "warm" if cache.is_dir() and any(cache.iterdir()) else "cold"
        # In the server's order: models, fp8 copies (each checked against the memory left), the attention
        # kernel, warm-up, then the safety models.
        start = time.perf_counter()
        dev, schnell_transformer, schnell_scheduler = self.build_components()
        self.sync()
        built = time.perf_counter()
        self.models = assemble_models(dev, schnell_transformer, schnell_scheduler, self.fast_settings)
        self.sync()
        assembled = time.perf_counter()
        self.row("setup: random full-size weights, both models", f"{built - start:.1f} s")
        self.row("setup: fp8 copies (quantize)", f"{assembled - built:.1f} s")
        for name, model in self.models.items():
            if model.fast_pipelines is None:
                self.row(f"{name}: fp8 copy", "skipped by the server's memory check (see log); go_fast runs bf16")
        self.row("setup: attention kernel", set_attention(self.models, self.device) or "SDPA (default)")
        from torch._dynamo.utils import counters

        from engine.compile_cache import artifacts_name, load_artifacts, save_artifacts
        from engine.fast import with_slot_compiled
        from engine.generate import lora_states
        from engine.pipelines import standard_slots_shortfall

        # As Engine does: the compile cache file (in --compile-cache, beside inductor's own) loaded before
        # compiling, written after when there was none.
        artifacts = Path(a.compile_cache) / artifacts_name(self.fast_settings, self.device, self.dtype)
        loaded = not a.no_compile and load_artifacts(artifacts)
        start = time.perf_counter()
        for model in self.models.values():
            if model.fast_pipelines and not a.no_compile:
                pipeline = model.fast_pipelines[Mode.TEXT_TO_IMAGE]
                warm_up_compiled_pipeline(pipeline, model.max_sequence_length, self.fast_settings)
        self.sync()
        self.row(
            f"setup: go_fast compile + warm-up ({a.size}px, batch 1 and {a.warm_up_batch}), {label} cache",
            f"{time.perf_counter() - start:.1f} s",
        )
        # The standard path as a CUDA server runs it by default: a fixed-rank LoRA slot and compiled blocks.
        self.standard_compiled = not a.no_compile and standard_slots_shortfall(self.models, self.fast_settings) is None
        if self.standard_compiled:
            start = time.perf_counter()
            for name, model in self.models.items():
                transformer = model.text_to_image.transformer
                with_slot_compiled(transformer, a.standard_slot_rank, self.fast_settings, name)
                warm_up_compiled_pipeline(model.text_to_image, model.max_sequence_length, self.fast_settings)
            self.sync()
            self.row(
                f"setup: standard path slot (rank {a.standard_slot_rank}) + compile, both models, {label} cache",
                f"{time.perf_counter() - start:.1f} s",
            )
        elif not a.no_compile:
            self.row(
                "setup: standard path", f"not compiled: {standard_slots_shortfall(self.models, self.fast_settings)}"
            )
        if not a.no_compile:
            self.row("setup: compile cache file", "loaded" if loaded else f"written: {save_artifacts(artifacts)}")
        self.graphs_after_warm_up = counters["stats"]["unique_graphs"]
        self.states = lora_states(self.models, self.standard_compiled, self.fast_settings)
        self.safety_models = self.build_safety_models()
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info()
            self.row(
                "GPU memory after setup (allocated / free of total)",
                f"{torch.cuda.memory_allocated() / 2**30:.1f} / {free / 2**30:.1f} of {total / 2**30:.1f} GiB",
            )

    # Measurements

    def inputs(self, model: str, batch: int) -> dict[str, Any]:
        config = self.models[model].text_to_image.transformer.config
        text = self.models[model].max_sequence_length
        generator = torch.Generator(self.device).manual_seed(7)

        def random(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator, device=self.device).to(self.dtype)

        # Random embeddings rather than a random T5's output: the same well-scaled input
        # for both paths, so the fp8-vs-bf16 difference measures the transformer alone.
        return dict(
            prompt_embeds=random(batch, text, config.joint_attention_dim),
            pooled_prompt_embeds=random(batch, config.pooled_projection_dim),
            width=self.args.size,
            height=self.args.size,
            num_inference_steps=self.args.steps or (28 if model == "dev" else 4),
            guidance_scale=3.0,
            max_sequence_length=text,
        )

    def paths(self, model: str) -> list[tuple[str, bool]]:
        """(label, go_fast), go_fast first: the headline path."""
        standard = "bf16 compiled" if self.standard_compiled else "bf16"
        return ([("go_fast", True)] if self.models[model].fast_pipelines else []) + [(standard, False)]

    @torch.inference_mode()
    def generate(self, model: str, fast: bool, batch: int, steps: int | None = None) -> torch.Tensor:
        from engine.generate import decode_latents

        pipeline = self.models[model].pipeline(Mode.TEXT_TO_IMAGE, fast)
        inputs = self.inputs(model, batch)
        inputs["num_inference_steps"] = steps or inputs["num_inference_steps"]
        latents = pipeline(**inputs, generator=torch.Generator(self.device).manual_seed(1), output_type="latent").images
        decode_latents(pipeline, latents, self.args.size, self.args.size)
        return latents

    def timed_generation(self, model: str, label: str, fast: bool, batch: int, runs: int, note: str = "") -> None:
        # One step at this shape first: cuBLAS and allocator set-up, not the run's cost.
        self.generate(model, fast, batch, steps=1)
        outputs: list[torch.Tensor] = []
        ms = self.timed_ms(lambda: outputs.append(self.generate(model, fast, batch)), runs)
        steps = self.inputs(model, batch)["num_inference_steps"]
        self.row(f"{model} {label}{note} {self.args.size}px batch {batch}, {steps} steps", f"{ms / 1000:.3f} s")
        self.outputs[model, label + note, batch] = outputs

    def lora_files(self, model: str, rank: int) -> list[Any]:
        """Two rank-`rank` LoRAs on the attention and MLP layers (ai-toolkit's default set), on local disk."""
        from lora_loading.formats import LoraFile
        from tests.lora_factory import make_peft_lora

        def attention_and_mlp(name: str, module: torch.nn.Linear) -> bool:
            return any(part in name for part in (".attn.", ".ff.", ".ff_context.", "proj_mlp", "proj_out"))

        transformer = self.models[model].text_to_image.transformer
        return [
            LoraFile(
                "bench",
                f"{model}-r{rank}-{seed}",
                make_peft_lora(
                    transformer,
                    LORA_FOLDER / f"{model}-r{rank}-{seed}.safetensors",
                    rank=rank,
                    seed=seed,
                    std=0.01,
                    module_filter=attention_and_mlp,
                ),
                1.0,
            )
            for seed in (1, 2)
        ]

    def apply(self, model: str, fast: bool, loras: list[Any]) -> None:
        eager = self.states[model, fast].apply(loras)
        if eager:  # the server would run this request eager; a benchmark of the compiled path must not
            raise RuntimeError(f"{model}: {eager}")
        self.sync()

    def headline(self) -> None:
        """dev at the bench's size and steps, batch 1: each path without and with a LoRA, the LoRA switch,
        then peak memory and recompiles so far."""
        model = "dev"
        files = self.lora_files(model, 16)
        for label, fast in self.paths(model):
            self.apply(model, fast, [])
            self.timed_generation(model, label, fast, 1, self.args.runs)
            self.apply(model, fast, files[:1])
            self.timed_generation(model, label, fast, 1, self.args.runs, note=" + rank-16 LoRA")
            self.lora_switches(model, label, fast, files, 16)
            self.apply(model, fast, [])
        self.memory_and_recompiles()
        self.accuracy(model)

    def lora_switches(self, model: str, label: str, fast: bool, files: list[Any], rank: int) -> None:
        from lora_loading.formats import LoraFile

        self.row(
            f"{model} {label}: switch LoRA, rank {rank}, attention + MLP (file on local disk)",
            f"{self.timed_ms(alternate(lambda loras: self.apply(model, fast, loras), files), 5):.1f} ms",
        )
        scaled = [LoraFile("bench", files[0].key, files[0].path, scale) for scale in (0.5, 1.0)]
        self.row(
            f"{model} {label}: scale-only change, rank {rank}",
            f"{self.timed_ms(alternate(lambda loras: self.apply(model, fast, loras), scaled), 5):.1f} ms",
        )

    def accuracy(self, model: str) -> None:
        """go_fast against bf16: the latents without a LoRA, and the LoRA's effect (latents with it - without)."""
        fast, standard = (label for label, _ in self.paths(model)) if self.models[model].fast_pipelines else ("", "")
        if not fast:
            return
        reference, quick = self.outputs[model, standard, 1][-1].float(), self.outputs[model, fast, 1]
        relative = ((quick[-1].float() - reference).norm() / reference.norm()).item()
        self.row(f"{model}: go_fast vs bf16 latents, relative L2 difference", f"{relative:.4f}")
        self.row(
            f"{model}: go_fast, runs with one seed, bit-identical", str(all(torch.equal(r, quick[0]) for r in quick))
        )
        note = " + rank-16 LoRA"
        effect = self.outputs[model, standard + note, 1][-1].float() - reference
        quick_effect = self.outputs[model, fast + note, 1][-1].float() - quick[-1].float()
        cosine = torch.nn.functional.cosine_similarity(quick_effect.flatten(), effect.flatten(), dim=0).item()
        self.row(
            f"{model}: go_fast's LoRA effect vs bf16's (latents): cosine, norm ratio",
            f"{cosine:.3f}, {(quick_effect.norm() / effect.norm()).item():.3f}",
        )

    def more_speed(self) -> None:
        """Every model and batch the headline left out."""
        for model in self.args.models:
            for batch in self.args.batches:
                if (model, batch) == ("dev", 1):
                    continue
                for label, fast in self.paths(model):
                    if not self.time_left(f"{model} {label} batch {batch}"):
                        return
                    self.timed_generation(model, label, fast, batch, max(1, self.args.runs - 2))

    @torch.inference_mode()
    def text_encoding(self) -> None:
        for model in self.args.models:
            pipeline = self.models[model].pipeline(Mode.TEXT_TO_IMAGE, False)
            length = self.models[model].max_sequence_length

            def encode(p: Any = pipeline, n: int = length) -> None:
                p.encode_prompt(prompt="a photo of a cat", prompt_2=None, device=self.device, max_sequence_length=n)

            encode()
            self.row(f"{model}: text encoding (CLIP + T5, {length} tokens)", f"{self.timed_ms(encode, 5):.1f} ms")

    def loras(self) -> None:
        """Wider LoRAs than the headline's: switch and scale-change times, one generation each."""
        model = "dev"
        for rank in self.args.lora_ranks:
            files = self.lora_files(model, rank)
            for label, fast in self.paths(model):
                if not self.time_left(f"{model} {label} rank {rank}"):
                    return
                self.lora_switches(model, label, fast, files, rank)
                self.apply(model, fast, files[:1])
                ms = self.timed_ms(lambda f=fast: self.generate(model, f, 1), 1)
                self.row(f"{model} {label} with a rank-{rank} LoRA, batch 1", f"{ms / 1000:.3f} s")
                self.apply(model, fast, [])

    def time_left(self, part: str) -> bool:
        """Whether the run's deadline (BENCH_DEADLINE, seconds since the epoch) leaves time for `part`."""
        if time.time() < self.args.deadline - 30:
            return True
        self.row(part, "skipped: the run's time limit")
        return False

    def memory_and_recompiles(self) -> None:
        from torch._dynamo.utils import counters

        if self.device.type == "cuda":
            self.row("peak GPU memory", f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        self.row(
            "new graphs after warm-up (recompiles)", str(counters["stats"]["unique_graphs"] - self.graphs_after_warm_up)
        )


def alternate(apply: Any, choices: list[Any]) -> Any:
    """An action that applies each choice in turn (the first is applied now, untimed)."""
    turn = iter(range(10**9))
    apply([choices[0]])
    return lambda: apply([choices[(next(turn) + 1) % len(choices)]])


def run_child(args: argparse.Namespace, out: Path, *extra: str) -> dict[str, str]:
    """One measuring process; each starts with an empty GPU, and is stopped at the run's deadline."""
    command = [sys.executable, __file__, "--child", "--out", str(out), *extra]
    for option in ("models", "batches", "lora_ranks"):
        command += [f"--{option.replace('_', '-')}", ",".join(map(str, getattr(args, option)))]
    command += ["--size", str(args.size), "--steps", str(args.steps), "--runs", str(args.runs)]
    command += ["--warm-up-batch", str(args.warm_up_batch), "--standard-slot-rank", str(args.standard_slot_rank)]
    command += ["--slot-rank", str(args.slot_rank), "--fast-lora", args.fast_lora]
    command += [
        "--reserve-gib",
        str(args.reserve_gib),
        "--compile-cache",
        args.compile_cache,
        "--backend",
        args.backend,
    ]
    command += ["--tiny"] * args.tiny + ["--no-compile"] * args.no_compile
    (out / "bench.json").unlink(missing_ok=True)  # no rows of an earlier run
    try:
        returncode = subprocess.run(command, timeout=max(1.0, args.deadline - time.time())).returncode
    except subprocess.TimeoutExpired:
        returncode = -1
    rows = json.loads((out / "bench.json").read_text()) if (out / "bench.json").exists() else {}
    if returncode:
        rows["failed"] = f"{' '.join(extra)} exited with {returncode}; rows above it are complete (see log)"
    return rows


def drive(args: argparse.Namespace) -> None:
    """The headline rows first (each printed as it is measured), then the rest while time is left, then setup
    again in a fresh process with the cache the first run filled (what a deployment that keeps
    FLUX_COMPILE_CACHE_DIR pays on its next start), if 3 minutes are left."""
    out = Path(args.out)
    if not args.keep_cache:
        shutil.rmtree(args.compile_cache, ignore_errors=True)
    rows = run_child(args, out / "main", "--parts", args.parts)
    if "failed" in rows or args.deadline - time.time() < 180:
        args.no_warm_setup = True
    if not args.no_warm_setup and not args.no_compile:
        start = time.perf_counter()
        warm = run_child(args, out / "warm-setup", "--parts", "setup")
        rows.update({f"second {name}": value for name, value in warm.items() if name.startswith("setup")})
        rows["second setup, whole process"] = f"{time.perf_counter() - start:.1f} s"
    print("\n| measurement | value |\n|---|---|")
    for name, value in rows.items():
        print(f"| {name} | {value} |")
    (out / "bench.json").write_text(json.dumps(rows, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--parts",
        default="headline,more_speed,text_encoding,loras",
        help="after setup: headline (dev batch 1, both paths, with and without a LoRA), more_speed, "
        "text_encoding, loras; setup alone: 'setup'",
    )
    parser.add_argument("--models", default="dev,schnell", help="which models more_speed times (both are built)")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=0, help="default: 28 for dev, 4 for schnell")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per headline row (the median)")
    parser.add_argument("--lora-ranks", default="64", help="the loras part's ranks (the headline's is 16)")
    parser.add_argument("--warm-up-batch", type=int, default=4, help="FLUX_WARM_UP_BATCH")
    parser.add_argument("--standard-slot-rank", type=int, default=128, help="FLUX_LORA_SLOT_RANK")
    parser.add_argument("--slot-rank", type=int, default=64, help="FLUX_FAST_LORA_RANK")
    parser.add_argument("--fast-lora", choices=("slot", "merged"), default="slot", help="FLUX_FAST_LORA")
    parser.add_argument("--reserve-gib", type=float, default=8.0, help="FLUX_GPU_RESERVE_GIB")
    parser.add_argument("--compile-cache", default="/tmp/flux-compile-cache")
    parser.add_argument("--keep-cache", action="store_true", help="start from the compile cache as it is")
    parser.add_argument("--no-warm-setup", action="store_true", help="skip the second, warm-cache setup")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="toy sizes on CPU, to check the script")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/bench-gpu"))
    args = parser.parse_args()
    args.models = args.models.split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.lora_ranks = [int(r) for r in args.lora_ranks.split(",")]
    # Seconds since the epoch by which everything must have ended (bench/run_gpu.sh sets it).
    args.deadline = float(os.environ.get("BENCH_DEADLINE", "inf"))
    if args.tiny:
        args.size = min(args.size, 128)
        args.warm_up_batch = min(args.warm_up_batch, 2)
    Path(args.out).mkdir(parents=True, exist_ok=True)

    if not args.child:
        drive(args)
        return

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    bench = Bench(args)
    bench.setup()
    for part in args.parts.split(","):
        if part != "setup":
            getattr(bench, part)()
    if args.parts != "setup":
        bench.memory_and_recompiles()
    (Path(args.out) / "bench.json").write_text(json.dumps(dict(bench.rows), indent=1))


if __name__ == "__main__":
    main()
