"""GPU benchmark of the standard (bf16) and go_fast paths, on the full-size FLUX.1
architecture with random weights, so it needs no download and no internet.

On the GPU machine, from the repo root, with diffusers, torchao and peft wheels in .whl/
(see README, "GPU benchmark"):

    bash bench/run_gpu.sh                       # everything that fits in one call
    bash bench/run_gpu.sh --parts speed --models dev --batches 1,4

It prints one table: medians of warm runs timed with CUDA events (denoising + VAE decode,
as a prediction runs them; text encoding is left out), LoRA switch and scale-change times,
setup time, peak memory, recompiles and the fp8-vs-bf16 relative difference.
`--tiny` runs every code path at toy sizes on a CPU (int8 weight-only, eager backend), to
check the script before spending GPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY_TRANSFORMER = dict(
    patch_size=1,
    in_channels=16,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=(4, 6, 6),
)
TINY_VAE = dict(
    block_out_channels=(8, 8, 8, 8),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=4,
    scaling_factor=0.3611,
    shift_factor=0.1159,
)
FULL_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=16,
    layers_per_block=2,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=0.3611,
    shift_factor=0.1159,
)


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device("cpu" if args.tiny else "cuda")
        self.dtype = torch.float32 if args.tiny else torch.bfloat16
        self.rows: list[tuple[str, str]] = []

    def row(self, name: str, value: str) -> None:
        self.rows.append((name, value))
        print(f"{name}: {value}", flush=True)

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

    def build_pipeline(self, model: str) -> Any:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

        config = dict(TINY_TRANSFORMER) if self.args.tiny else {}
        with torch.device("meta"):
            transformer = FluxTransformer2DModel(**config, guidance_embeds=model == "dev")
            vae = AutoencoderKL(**(TINY_VAE if self.args.tiny else FULL_VAE))
        generator = torch.Generator(self.device).manual_seed(0 if model == "dev" else 1)
        for module in (transformer, vae):
            module.to_empty(device=self.device)
            with torch.no_grad():
                for parameter in module.parameters():
                    parameter.normal_(0, 0.02, generator=generator)
            module.to(self.dtype).eval()
        scheduler = (
            FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
            if model == "dev"
            else FlowMatchEulerDiscreteScheduler(shift=1.0)
        )
        pipeline = FluxPipeline(
            scheduler=scheduler,
            vae=vae,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            transformer=transformer,
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def inputs(self, model: str, batch: int) -> dict[str, Any]:
        config = self.pipelines[model].transformer.config
        text = 512 if model == "dev" else 256
        generator = torch.Generator(self.device).manual_seed(7)
        return dict(
            prompt_embeds=torch.randn(
                batch, text, config.joint_attention_dim, generator=generator, device=self.device
            ).to(self.dtype),
            pooled_prompt_embeds=torch.randn(
                batch, config.pooled_projection_dim, generator=generator, device=self.device
            ).to(self.dtype),
            width=self.args.size,
            height=self.args.size,
            num_inference_steps=self.args.steps or (28 if model == "dev" else 4),
            guidance_scale=3.0,
            max_sequence_length=text,
        )

    @torch.inference_mode()
    def generate(self, pipeline: Any, model: str, batch: int, seed: int = 1) -> torch.Tensor:
        from engine.generate import decode_latents

        latents = pipeline(
            **self.inputs(model, batch), generator=torch.Generator(self.device).manual_seed(seed), output_type="latent"
        ).images
        decode_latents(pipeline, latents, self.args.size, self.args.size)
        return latents

    def setup(self) -> None:
        from diffusers import FluxPipeline

        from engine.fast import FastSettings, build_fast_transformer, configure_compile_cache
        from engine.pipelines import share_modules

        self.fast_settings = FastSettings(
            quantization="int8-weight-only" if self.args.tiny else "auto",
            compile=not self.args.no_compile,
            compile_backend="eager" if self.args.tiny else "inductor",
            lora_rank=self.args.slot_rank,
            compile_cache_dir=self.args.compile_cache,
        )
        configure_compile_cache(self.fast_settings)
        self.pipelines, self.fast_pipelines = {}, {}
        for model in self.args.models:
            start = time.perf_counter()
            self.pipelines[model] = self.build_pipeline(model)
            self.sync()
            built = time.perf_counter()
            fast = build_fast_transformer(self.pipelines[model].transformer, self.fast_settings, model)
            self.fast_pipelines[model] = share_modules(FluxPipeline, self.pipelines[model], transformer=fast)
            self.fast_pipelines[model].set_progress_bar_config(disable=True)
            self.sync()
            self.row(
                f"{model}: build bf16 / build go_fast copy",
                f"{built - start:.1f} s / {time.perf_counter() - built:.1f} s",
            )

    def warm_up(self) -> None:
        """The same warm-up the engine does at setup: batch 1 and 2, LoRA slot off and on."""
        from torch._dynamo.utils import counters

        for model in self.args.models:
            pipeline = self.fast_pipelines[model]
            start = time.perf_counter()
            for lora_on in (False, True):
                if lora_on:
                    pipeline.transformer.enable_adapters()
                for batch in (1, 2):
                    self.generate(pipeline, model, batch)
            pipeline.transformer.disable_adapters()
            self.sync()
            self.row(f"{model}: go_fast warm-up (compile)", f"{time.perf_counter() - start:.1f} s")
        self.graphs_after_warm_up = counters["stats"]["unique_graphs"]

    def speed(self) -> None:
        for model in self.args.models:
            for batch in self.args.batches:
                for label, pipeline in (("bf16", self.pipelines[model]), ("go_fast", self.fast_pipelines[model])):
                    self.generate(pipeline, model, batch)  # warm run
                    ms = self.timed_ms(lambda p=pipeline, m=model, b=batch: self.generate(p, m, b), self.args.runs)
                    steps = self.inputs(model, batch)["num_inference_steps"]
                    self.row(f"{model} {label} {self.args.size}px batch {batch}, {steps} steps", f"{ms / 1000:.3f} s")

    def accuracy(self) -> None:
        for model in self.args.models:
            reference = self.generate(self.pipelines[model], model, 1).float()
            quick = self.generate(self.fast_pipelines[model], model, 1).float()
            again = self.generate(self.fast_pipelines[model], model, 1).float()
            relative = ((quick - reference).norm() / reference.norm()).item()
            self.row(f"{model}: go_fast vs bf16 latents, relative L2 difference", f"{relative:.4f}")
            self.row(f"{model}: go_fast repeat, same seed, bit-identical", str(torch.equal(quick, again)))

    def loras(self) -> None:
        from lora_loading.formats import LoraFile
        from lora_loading.slots import LoraSlots
        from tests.lora_factory import make_peft_lora

        folder = Path(self.args.out) / "loras"
        model = self.args.models[0]
        pipeline = self.fast_pipelines[model]
        slots = LoraSlots(pipeline)

        def attention_and_mlp(name: str, module: torch.nn.Linear) -> bool:
            return (
                ".attn." in name or ".ff." in name or ".ff_context." in name or "proj_mlp" in name or "proj_out" in name
            )

        for rank in self.args.lora_ranks:
            files = [
                LoraFile(
                    "bench",
                    f"r{rank}-{seed}",
                    make_peft_lora(
                        self.pipelines[model].transformer,
                        folder / f"r{rank}-{seed}.safetensors",
                        rank=rank,
                        seed=seed,
                        std=0.01,
                        module_filter=attention_and_mlp,
                    ),
                    1.0,
                )
                for seed in (1, 2)
            ]
            self.row(
                f"{model} go_fast: switch LoRA, rank {rank}, attention + MLP (file cached)",
                f"{self.timed_ms(alternate(slots, files), self.args.runs):.1f} ms",
            )
            scaled = [LoraFile("bench", files[0].key, files[0].path, scale) for scale in (0.5, 1.0)]
            self.row(
                f"{model} go_fast: scale-only change, rank {rank}",
                f"{self.timed_ms(alternate(slots, scaled), self.args.runs):.1f} ms",
            )
            self.generate(pipeline, model, 1)
            ms = self.timed_ms(lambda: self.generate(pipeline, model, 1), self.args.runs)
            self.row(f"{model} go_fast with a rank-{rank} LoRA, batch 1", f"{ms / 1000:.3f} s")
        slots.apply([])

    def memory_and_recompiles(self) -> None:
        from torch._dynamo.utils import counters

        if self.device.type == "cuda":
            self.row("peak GPU memory", f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        self.row(
            "new graphs after warm-up (recompiles)", str(counters["stats"]["unique_graphs"] - self.graphs_after_warm_up)
        )


def alternate(slots: Any, choices: list[Any]) -> Any:
    """An action that applies each choice in turn (the first is applied now, untimed)."""
    turn = iter(range(10**9))
    slots.apply([choices[0]])
    return lambda: slots.apply([choices[(next(turn) + 1) % len(choices)]])


def cold_and_warm_setup(args: argparse.Namespace) -> None:
    """Setup twice in fresh processes sharing one compile cache: the second start's time is
    what a deployment that keeps FLUX_COMPILE_CACHE_DIR pays."""
    cache = Path(args.out) / "compile-cache"
    for label in ("cold", "warm"):
        command = [
            sys.executable,
            __file__,
            "--parts",
            "setup",
            "--models",
            args.models[0],
            "--compile-cache",
            str(cache),
        ]
        command += ["--tiny"] if args.tiny else []
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        print(f"setup with a {label} compile cache: {time.perf_counter() - start:.1f} s (whole process)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="speed,accuracy,loras", help="speed, accuracy, loras, setup, coldwarm")
    parser.add_argument("--models", default="dev,schnell")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=0, help="default: 28 for dev, 4 for schnell")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--lora-ranks", default="16,64")
    parser.add_argument("--slot-rank", type=int, default=64)
    parser.add_argument("--compile-cache", default=None)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="toy sizes on CPU, to check the script")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/bench-gpu"))
    args = parser.parse_args()
    args.models = args.models.split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.lora_ranks = [int(r) for r in args.lora_ranks.split(",")]
    if args.tiny:
        args.size = min(args.size, 128)
    parts = args.parts.split(",")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if "coldwarm" in parts:
        cold_and_warm_setup(args)
        parts.remove("coldwarm")
        if not parts:
            return

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    bench = Bench(args)
    bench.setup()
    bench.warm_up()
    for part in parts:
        if part != "setup":
            getattr(bench, part)()
    bench.memory_and_recompiles()
    print("\n| measurement | value |\n|---|---|")
    for name, value in bench.rows:
        print(f"| {name} | {value} |")
    (Path(args.out) / "bench.json").write_text(json.dumps(dict(bench.rows), indent=1))


if __name__ == "__main__":
    main()
