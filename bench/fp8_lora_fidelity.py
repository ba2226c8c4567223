"""How faithfully go_fast carries a LoRA: merged into the fp8 weights, or in an unmerged slot, against bf16.

    PYTHONPATH=. .venv/bin/python bench/fp8_lora_fidelity.py [--model full|tiny] [--ranks 4,16,64,128]
        [--scales 0.5,1,2] [--strength 0.1] [--seeds 1] [--size 256] [--steps 4]
    PYTHONPATH=. .venv/bin/python bench/fp8_lora_fidelity.py --switch    # the merge's cost per layer

On CPU, with torchao's fp8 per-row config (production's, past its quantize-time hardware check) and
random weights (N(0, 0.02), as bench/gpu.py): `full` is FLUX.1's real widths with one double and one
single block, `tiny` bench/gpu.py's tiny widths. The LoRA is on every Linear layer (as ai-toolkit's,
Replicate's trainer's), random factors scaled so that each layer's update at scale 1 is `strength` of
the layer's weight (Frobenius norms). Images come from diffusers' FluxPipeline (a random 16-channel VAE,
random prompt embeddings), as float pixels in [0, 1], so 8-bit rounding hides nothing.

Three ways to run the same LoRA and seed:
- bf16: the bf16 transformer with the LoRA unmerged (x·W + s·(x·A)·B, as peft's layers on the standard path);
- merged: the fp8 copy with quantize(W + s·B·A) written into its weights (lora_loading/deltas.py
  QuantizedCopies, go_fast's mechanism);
- slot: the fp8 copy with the LoRA unmerged in bf16 on top (what a LoRA slot computes).

`--switch` times go_fast's LoRA switch for one full-width layer on this CPU instead: ParameterDeltas
writing quantize(W + s·B·A) into the fp8 copy (rank 16) and putting quantize(W) back, for a 3072 x 3072
layer (attention) and linear1 (21504 x 3072), medians of 5.

Per rank and scale it prints the RMS distance of the merged and the slot image to the bf16 image with the
LoRA, each as a ratio of the fp8 base's own RMS distance to the bf16 base (1.0: the LoRA adds no error of
its own), and the LoRA's visible effect (image with the LoRA - image without, each path against its own
base) against bf16's: cosine and norm ratio. Averages over `seeds` seeds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

FULL = dict(num_layers=1, num_single_layers=1)  # diffusers' defaults are FLUX.1's widths


def build(model: str) -> tuple[Any, Any]:
    """The bf16 pipeline and the fp8 copy of its transformer, built as engine/fast.py builds it."""
    import torchao.quantization.quant_api as quant_api
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from engine.fast import FastSettings, build_fast_transformer

    torch.manual_seed(0)
    from bench.gpu import TINY

    transformer = FluxTransformer2DModel(**(FULL if model == "full" else TINY["transformer"]), guidance_embeds=True)
    with torch.no_grad():
        for parameter in transformer.parameters():
            parameter.normal_(0, 0.02)
    transformer = transformer.to(torch.bfloat16).eval()
    latent_channels = transformer.config.in_channels // 4  # FluxPipeline packs 2x2 latent patches
    vae = AutoencoderKL(
        block_out_channels=(16, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=4,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    ).to(torch.bfloat16)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    pipeline = FluxPipeline(scheduler, vae, None, None, None, None, transformer)  # type: ignore[arg-type]
    pipeline.set_progress_bar_config(disable=True)
    quant_api._check_hardware_support = lambda granularity: None  # fp8 tensors compute on CPU too
    settings = FastSettings("float8-dynamic", False, "inductor", 0, None, fast_lora="merged")  # no slot: hooks play it
    return pipeline, build_fast_transformer(transformer, settings, model)


def random_lora(
    transformer: Any, rank: int, strength: float, seed: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) per Linear layer, float32, with ||B·A|| = strength x ||W||."""
    from lora_loading.text_encoders import linear_layers

    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for name, layer in linear_layers(transformer).items():
        down = torch.randn(rank, layer.in_features, generator=generator)
        up = torch.randn(layer.out_features, rank, generator=generator)
        up *= strength * layer.weight.float().norm() / (up @ down).norm()
        lora[name] = (down, up)
    return lora


@contextmanager
def unmerged(transformer: Any, lora: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float) -> Iterator[None]:
    """The LoRA beside each layer, in the layer's compute dtype: output + s·(x·Aᵀ)·Bᵀ, as peft's LoRA layer."""
    from lora_loading.text_encoders import linear_layers

    layers = linear_layers(transformer)
    hooks = []
    for name, (down, up) in lora.items():
        down16, up16 = down.to(torch.bfloat16), (up * scale).to(torch.bfloat16)
        hooks.append(
            layers[name].register_forward_hook(lambda m, args, out, a=down16, b=up16: out + args[0] @ a.T @ b.T)
        )
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


@contextmanager
def merged(
    pipeline: Any, fast: Any, lora: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float
) -> Iterator[None]:
    """go_fast's mechanism: quantize(W + s·B·A) written into the fp8 copy's weights, then quantize(W) back."""
    from engine.fast import FastSettings, quantized_twins, weight_quantizer
    from lora_loading.deltas import Delta, ParameterDeltas, QuantizedCopies
    from lora_loading.text_encoders import linear_layers

    twins = quantized_twins(pipeline.transformer, fast)
    quantize = weight_quantizer(FastSettings("float8-dynamic", False, "", 0, None))
    deltas = ParameterDeltas(QuantizedCopies(twins, quantize))
    layers = linear_layers(pipeline.transformer)
    changes = [
        ((layers[name].weight,), Delta(factors=(up, down), op="mm"), scale)
        for name, (down, up) in lora.items()
        if id(layers[name].weight) in twins
    ]
    deltas.set(changes)
    try:
        yield
    finally:
        deltas.restore()


def image(pipeline: Any, transformer: Any, seed: int, args: argparse.Namespace) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    config = transformer.config
    prompt = torch.randn(1, 64, config.joint_attention_dim, generator=generator).to(torch.bfloat16)
    pooled = torch.randn(1, config.pooled_projection_dim, generator=generator).to(torch.bfloat16)
    pipeline.transformer = transformer
    with torch.inference_mode():
        pixels = pipeline(
            prompt_embeds=prompt,
            pooled_prompt_embeds=pooled,
            width=args.size,
            height=args.size,
            num_inference_steps=args.steps,
            guidance_scale=3.5,
            generator=torch.Generator().manual_seed(seed),
            output_type="pt",
        ).images
    return pixels.float()


def rms(tensor: torch.Tensor) -> float:
    return float(tensor.pow(2).mean().sqrt())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def switch_cost() -> None:
    import torchao.quantization.quant_api as quant_api

    from engine.fast import FastSettings, weight_quantizer
    from lora_loading.deltas import Delta, ParameterDeltas, QuantizedCopies

    quant_api._check_hardware_support = lambda granularity: None
    quantize = weight_quantizer(FastSettings("float8-dynamic", False, "", 0, None))
    for out_features, in_features in ((3072, 3072), (21504, 3072)):
        weight = torch.nn.Parameter((torch.randn(out_features, in_features) * 0.02).to(torch.bfloat16), False)
        twin = quantize(weight.detach())
        deltas = ParameterDeltas(QuantizedCopies({id(weight): twin}, quantize))
        change = Delta(factors=(torch.randn(out_features, 16) * 0.01, torch.randn(16, in_features) * 0.01), op="mm")
        samples = {"merge": [], "put back": []}
        for _ in range(5):
            begin = time.perf_counter()
            deltas.set([((weight,), change, 1.0)])
            samples["merge"].append(time.perf_counter() - begin)
            begin = time.perf_counter()
            deltas.restore()
            samples["put back"].append(time.perf_counter() - begin)
        print(
            f"{out_features} x {in_features}: "
            + ", ".join(f"{name} {statistics.median(times) * 1000:.1f} ms" for name, times in samples.items())
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("full", "tiny"), default="full")
    parser.add_argument("--ranks", default="4,16,64,128")
    parser.add_argument("--scales", default="0.5,1,2")
    parser.add_argument("--strength", type=float, default=0.1, help="||B·A|| / ||W|| per layer at scale 1")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--switch", action="store_true", help="time the merge of one layer instead")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.switch:
        switch_cost()
        return

    start = time.perf_counter()
    pipeline, fast = build(args.model)
    standard = pipeline.transformer
    seeds = list(range(args.seeds))
    bf16_base = {seed: image(pipeline, standard, seed, args) for seed in seeds}
    fp8_base = {seed: image(pipeline, fast, seed, args) for seed in seeds}
    base_distance = statistics.mean(rms(fp8_base[s] - bf16_base[s]) for s in seeds)
    print(
        f"{args.model} model, strength {args.strength}, {args.size}², {args.steps} steps, {len(seeds)} seeds: "
        f"fp8 base vs bf16 base RMS {base_distance:.5f} (built and first images in {time.perf_counter() - start:.0f} s)"
    )
    print(
        "| rank | scale | merged / fp8 base distance | slot / fp8 base distance | effect cosine merged | slot "
        "| effect norm merged | slot | bf16 effect RMS |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for rank in map(int, args.ranks.split(",")):
        lora = random_lora(standard, rank, args.strength, seed=rank)
        for scale in map(float, args.scales.split(",")):
            rows: dict[str, list[float]] = {}
            for seed in seeds:
                with unmerged(standard, lora, scale):
                    bf16 = image(pipeline, standard, seed, args)
                with merged(pipeline, fast, lora, scale):
                    fused = image(pipeline, fast, seed, args)
                with unmerged(fast, lora, scale):
                    slot = image(pipeline, fast, seed, args)
                effect = bf16 - bf16_base[seed]
                for name, value in (
                    ("merged distance", rms(fused - bf16)),
                    ("slot distance", rms(slot - bf16)),
                    ("merged cosine", cosine(fused - fp8_base[seed], effect)),
                    ("slot cosine", cosine(slot - fp8_base[seed], effect)),
                    ("merged norm", rms(fused - fp8_base[seed]) / rms(effect)),
                    ("slot norm", rms(slot - fp8_base[seed]) / rms(effect)),
                    ("effect", rms(effect)),
                ):
                    rows.setdefault(name, []).append(value)
            mean = {name: statistics.mean(values) for name, values in rows.items()}
            print(
                f"| {rank} | {scale:g} | {mean['merged distance'] / base_distance:.2f} "
                f"| {mean['slot distance'] / base_distance:.2f} | {mean['merged cosine']:.3f} "
                f"| {mean['slot cosine']:.3f} | {mean['merged norm']:.2f} | {mean['slot norm']:.2f} "
                f"| {mean['effect']:.5f} |",
                flush=True,
            )
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
