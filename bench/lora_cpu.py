"""LoRA timings on the offline demo model (CPU): loading, switching, and a scale-only change.

    PYTHONPATH=. .venv/bin/python bench/lora_cpu.py [--runs 7] [--rank 16]

Times `LoraAdapters.apply`, the step a prediction spends in "loading LoRAs" once the file
is in the local cache: the full-size figures come from bench/gpu.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def median_ms(action, runs: int) -> float:  # type: ignore[no-untyped-def]
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        action()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    from tooling.demo_model import build_demo_models, demo_model_env

    folder = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    os.environ.update({**demo_model_env(build_demo_models(folder / "models")), "FLUX_DEVICE": "cpu"})
    from engine.config import Settings
    from engine.logs import configure_logging
    from engine.pipelines import load_models
    from lora_loading import LoraAdapters, LoraFile
    from tests.lora_factory import make_peft_lora

    def every_linear(name: str, module: torch.nn.Linear) -> bool:
        return True

    configure_logging()
    pipeline = load_models(Settings.from_env())["dev"].text_to_image
    files = [
        LoraFile(
            "bench",
            f"lora-{seed}",
            make_peft_lora(
                pipeline.transformer,
                folder / f"{seed}.safetensors",
                rank=args.rank,
                seed=seed,
                module_filter=every_linear,
            ),
            1.0,
        )
        for seed in (1, 2)
    ]
    adapters = LoraAdapters(pipeline)
    flip = iter(range(10**9))

    def load_first() -> None:
        adapters.unload()
        adapters.apply([files[0]])

    def switch() -> None:
        adapters.apply([files[next(flip) % 2]])

    def scale_only() -> None:
        current = files[0]
        adapters.apply([LoraFile(current.input_name, current.key, current.path, 0.5 + (next(flip) % 2) * 0.5)])

    adapters.apply([files[0]])
    print(f"LoRA on every Linear of the demo transformer, rank {args.rank}, median of {args.runs} runs:")
    print("| step | median ms |\n|---|---|")
    print(f"| unload, then load (file in the local cache) | {median_ms(load_first, args.runs):.1f} |")
    print(f"| switch to another LoRA | {median_ms(switch, args.runs):.1f} |")
    adapters.apply([files[0]])
    print(f"| scale-only change | {median_ms(scale_only, args.runs):.2f} |")


if __name__ == "__main__":
    main()
