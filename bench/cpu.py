"""CPU benchmark: `Predictor.predict` against a bare diffusers `FluxPipeline` call.

    PYTHONPATH=. .venv/bin/python bench/cpu.py [--runs 7] [--size 256] [--steps 2]

Both run the offline demo model (built into a temporary folder) from the same weights
folder, with the same prompt, size, steps, guidance, seed and max_sequence_length, and
both write a PNG. Ours gets every input filled as Cog fills it (the declared defaults)
and the safety checker disabled, so the two do the same work; the ratio of the medians
is the predictor's overhead (goal: at most 1.10). The two PNGs must be byte-identical.
Setup time and the per-request time with the safety checker on are printed too.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tooling.cli import default_inputs  # noqa: E402
from tooling.demo_model import build_demo_models, demo_model_env  # noqa: E402

PROMPT = "a photo of a cat"
SEED = 42
GOAL = 1.10


def seconds(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7, help="timed warm runs of each (at least 5; default 7)")
    parser.add_argument("--size", type=int, default=256, help="width and height in pixels (default 256)")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps (default 2)")
    args = parser.parse_args(argv)
    if args.runs < 5:
        parser.error("--runs must be at least 5")

    work = Path(tempfile.mkdtemp(prefix="flux-bench-"))
    try:
        return run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> int:
    start = time.perf_counter()
    models = build_demo_models(work / "models")
    build_s = time.perf_counter() - start
    # As tests/conftest.py's predictor_env.
    os.environ.update({**demo_model_env(models), "FLUX_DEVICE": "cpu", "FLUX_LORA_CACHE_DIR": str(work / "lora-cache")})

    from diffusers import FluxPipeline

    import predict

    predictor = predict.Predictor()
    start = time.perf_counter()
    predictor.setup()
    setup_s = time.perf_counter() - start
    # The per-step log lines still get formatted and written (Cog pays for them too),
    # just not onto this table.
    for handler in logging.getLogger().handlers:
        if getattr(handler, "_flux_handler", False):
            handler.setStream(open(os.devnull, "w"))  # open for the life of the process

    start = time.perf_counter()
    bare = FluxPipeline.from_pretrained(models.dev, dtype=torch.float32, device_map="cpu")
    bare.set_progress_bar_config(disable=True)
    bare_setup_s = time.perf_counter() - start

    inputs = {
        **default_inputs(predictor.predict),
        "prompt": PROMPT,
        "aspect_ratio": "custom",
        "width": args.size,
        "height": args.size,
        "num_inference_steps": args.steps,
        "seed": SEED,
        "output_format": "png",
        "disable_safety_checker": True,
    }
    bare_output = work / "bare.png"

    def ours(**overrides: object) -> bytes:
        (path,) = predictor.predict(**{**inputs, **overrides})
        return Path(path).read_bytes()

    def theirs() -> bytes:
        image = bare(
            prompt=PROMPT,
            width=args.size,
            height=args.size,
            num_inference_steps=args.steps,
            guidance_scale=inputs["guidance_scale"],
            generator=torch.Generator("cpu").manual_seed(SEED),
            max_sequence_length=512,
        ).images[0]
        image.save(bare_output, format="PNG")
        return bare_output.read_bytes()

    # Warm-up, and the equivalence check on the very calls being timed.
    identical = ours() == theirs()
    ours(disable_safety_checker=False)

    ours_s, bare_s, safety_s = [], [], []
    for _ in range(args.runs):  # interleaved, so drift in the machine's speed hits both alike
        ours_s.append(seconds(ours))
        bare_s.append(seconds(theirs))
        safety_s.append(seconds(lambda: ours(disable_safety_checker=False)))
    ours_median, bare_median = statistics.median(ours_s), statistics.median(bare_s)
    ratio = ours_median / bare_median

    print()
    print(f"FLUX demo model on CPU ({torch.get_num_threads()} threads): {args.size}x{args.size}, {args.steps} steps,")
    print(f"guidance {inputs['guidance_scale']:g}, seed {SEED}, PNG; median of {args.runs} warm runs each.")
    print()
    rows = [
        ("demo model build", build_s),
        ("Predictor.setup(): dev + schnell + safety", setup_s),
        ("bare FluxPipeline.from_pretrained (dev)", bare_setup_s),
        ("bare FluxPipeline call + save", bare_median),
        ("Predictor.predict, safety checker off", ours_median),
        ("Predictor.predict, safety checker on", statistics.median(safety_s)),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value * 1000:9.1f} ms")
    print()
    verdict = "ok" if ratio <= GOAL else "OVER GOAL"
    print(f"  ours / bare (safety off): {ratio:.3f}  (goal <= {GOAL:.2f}: {verdict})")
    print(f"  byte-identical PNGs:      {'yes' if identical else 'NO'}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
