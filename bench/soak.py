"""Soak: many predictions in a row on the offline demo model, cycling through modes, sizes,
output formats and LoRAs (valid and invalid), then checks that nothing grew or leaked.

    PYTHONPATH=. .venv/bin/python bench/soak.py [--count 300]

Prints the RSS curve (every 25 predictions), the RSS growth over the last 100, the time
per prediction, leftover temporary files, the LoRA cache against its bound, and whether
the reference request still gives its reference bytes. Exits 1 if a check fails.
tests/test_soak.py runs a short version of the same loop in the suite.
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

REFERENCE = {"prompt": "a lighthouse", "aspect_ratio": "custom", "width": 256, "height": 256, "seed": 11}


def temporary_files() -> set[str]:
    """Files under this process's temporary folder (the soak points it at its scratch)."""
    root = Path(tempfile.gettempdir())
    return {str(path) for path in root.rglob("*") if path.is_file()}


def requests_cycle(lora_urls: list[str], bad_sources: list[str], image: Path, mask: Path) -> Iterator[dict[str, Any]]:
    """An endless, deterministic mix of requests: every 7th one fails on purpose."""
    sizes = [
        {"aspect_ratio": "custom", "width": 256, "height": 256},
        {"aspect_ratio": "custom", "width": 320, "height": 256},
        {"aspect_ratio": "9:21", "megapixels": "0.25"},
    ]
    modes: list[dict[str, Any]] = [{}, {"image": image, "prompt_strength": 0.6}, {"image": image, "mask": mask}]
    formats = ["webp", "jpg", "png"]
    index = 0
    while True:
        request: dict[str, Any] = {
            "prompt": f"soak {index}",
            "num_inference_steps": 2,
            "seed": index,
            "output_format": formats[index % 3],
            "model": "schnell" if index % 5 == 4 else "dev",
            **sizes[index % len(sizes)],
            **modes[(index // 3) % len(modes)],
        }
        if index % 7 == 6:
            request["extra_lora"] = bad_sources[(index // 7) % len(bad_sources)]
        elif index % 2:
            request["replicate_weights"] = lora_urls[(index // 2) % len(lora_urls)]
            request["lora_scale"] = (0.5, 1.0, -0.5)[index % 3]
        yield request
        index += 1


class Soak:
    """Builds the demo model, a LoRA host and a predictor, in a scratch folder."""

    def __init__(self, folder: Path, lora_count: int = 6, cache_loras: int = 3):
        from PIL import Image

        # Everything this process writes through tempfile lands here, apart from other
        # processes' files, so leftovers can be counted.
        (folder / "tmp").mkdir()
        tempfile.tempdir = str(folder / "tmp")

        from engine.logs import configure_logging
        from tests.fake_hosts import start_fake_host
        from tests.lora_factory import make_peft_lora
        from tooling.demo_model import build_demo_models, demo_model_env

        self.folder = folder
        models = build_demo_models(folder / "models")
        from diffusers import FluxTransformer2DModel

        transformer = FluxTransformer2DModel.from_pretrained(models.dev, subfolder="transformer")
        self.host = start_fake_host()
        self.lora_urls = []
        lora_size = 0
        for seed in range(lora_count):
            path = make_peft_lora(transformer, folder / "loras" / f"{seed}.safetensors", seed=seed)
            lora_size = path.stat().st_size
            self.lora_urls.append(self.host.serve(f"/lora-{seed}.safetensors", path.read_bytes()) + "?sig=x")
        self.cache_dir = folder / "lora-cache"
        self.cache_bound = cache_loras * lora_size + lora_size // 2
        os.environ.update(
            {
                **demo_model_env(models),
                "FLUX_DEVICE": "cpu",
                "FLUX_LORA_CACHE_DIR": str(self.cache_dir),
                "FLUX_LORA_CACHE_BYTES": str(self.cache_bound),
            }
        )
        self.bad_sources = [
            self.host.url + "/missing.safetensors",
            "data:application/octet-stream;base64," + base64.b64encode(b"not a lora").decode(),
            "/etc/passwd",
        ]
        Image.new("RGB", (300, 200), (200, 80, 40)).save(folder / "image.png")
        mask = Image.new("L", (300, 200), 0)
        mask.paste(255, (150, 0, 300, 200))
        mask.save(folder / "mask.png")
        import predict

        self.predictor = predict.Predictor()
        self.predictor.setup()
        configure_logging(logging.WARNING)  # keep step lines out of the bench's output

    def run(self, request: dict[str, Any]) -> list[bytes] | None:
        from errors import InputError
        from tooling.cli import default_inputs

        try:
            outputs = self.predictor.predict(**{**default_inputs(self.predictor.predict), **request})
        except InputError:
            return None
        return [Path(path).read_bytes() for path in outputs]

    def cache_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.cache_dir.glob("*.safetensors"))

    def cycle(self) -> Iterator[dict[str, Any]]:
        return requests_cycle(self.lora_urls, self.bad_sources, self.folder / "image.png", self.folder / "mask.png")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=300)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="soak-") as scratch:
        soak = Soak(Path(scratch))
        reference = soak.run(REFERENCE)
        files_before = temporary_files()
        process = psutil.Process()
        rss, seconds, failures = [], [], 0
        cycle = soak.cycle()
        for index in range(args.count):
            start = time.perf_counter()
            if soak.run(next(cycle)) is None:
                failures += 1
            seconds.append(time.perf_counter() - start)
            rss.append(process.memory_info().rss / 2**20)
            if (index + 1) % 25 == 0:
                print(f"after {index + 1:4d}: RSS {rss[-1]:7.1f} MiB, median {statistics.median(seconds[-25:]):.3f} s")
        leftover = sorted(
            path
            for path in temporary_files() - files_before
            if not path.startswith((scratch, str(soak.predictor.engine.output_folder)))
        )
        same = soak.run(REFERENCE) == reference
        window = min(100, args.count)
        growth = rss[-1] - rss[-window]
        print(
            f"\n{args.count} predictions ({failures} failed on purpose), median {statistics.median(seconds):.3f} s each"
        )
        print(f"RSS growth over the last {window}: {growth:+.1f} MiB (from {rss[-window]:.1f} to {rss[-1]:.1f} MiB)")
        print(f"temporary files left outside the output folder: {len(leftover)} {leftover[:5]}")
        print(f"LoRA cache: {soak.cache_bytes()} bytes, bound {soak.cache_bound}")
        print(f"reference request gives its reference bytes: {same}")
        soak.host.close()
        ok = same and not leftover and soak.cache_bytes() <= soak.cache_bound and failures == args.count // 7
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
