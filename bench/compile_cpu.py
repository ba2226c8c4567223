"""CPU benchmark of the compiled standard path, with inductor on the demo model.

    PYTHONPATH=. .venv/bin/python bench/compile_cpu.py [--parts setup,requests] [--runs 5]

- setup: script/warm-cache in a fresh process four ways: cold (an empty FLUX_COMPILE_CACHE_DIR), with
  inductor's own on-disk cache from the cold run (its folder without the artifacts file), with the
  artifacts file alone, and with the whole folder the cold run filled (the file and inductor's caches,
  what the image carries by default). Setup seconds, the compile phase's seconds, inductor's cache hits
  and misses, and each as a ratio of the cold one.
- requests: one predictor compiled (FLUX_COMPILE=1, inductor) and one not, the same requests on each:
  new graphs after warm-up over a sequence that switches LoRAs (none, ranks 4, 16, 64, two at once), sizes,
  batches and modes (goal: 0), and the median time of a 256x256, 4-step request with a LoRA on each.
On two CPU cores the compiled graphs are not expected to be faster: inductor's CPU kernels are not what a
GPU runs. What this checks on CPU is the mechanism (no recompiles, the cache's hits); speed is for bench/gpu.py.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tooling.cli import DEMO_MODEL_FOLDER, default_inputs  # noqa: E402
from tooling.demo_model import demo_model_env, ensure_demo_models  # noqa: E402

INDUCTOR = {"FLUX_COMPILE": "1", "FLUX_COMPILE_BACKEND": "inductor", "FLUX_FAST_QUANTIZATION": "off"}
SUFFIX = ".torch-compile-cache"


def warm_cache(cache_dir: Path, weights_env: dict[str, str]) -> dict[str, Any]:
    env = {**os.environ, **weights_env, **INDUCTOR, "FLUX_DEVICE": "cpu", "FLUX_COMPILE_CACHE_DIR": str(cache_dir)}
    run = subprocess.run([str(REPO / "script" / "warm-cache")], env=env, capture_output=True, text=True, check=True)
    report = json.loads(run.stdout.strip().splitlines()[-1])
    found = re.search(r"Timing: compiling the standard transformers took ([0-9.]+) s", run.stdout + run.stderr)
    report["compile_s"] = float(found[1]) if found else float("nan")
    return report


def bench_setup(work: Path, weights_env: dict[str, str]) -> None:
    cold_dir = work / "cold"
    cold = warm_cache(cold_dir, weights_env)
    on_disk = work / "inductor-cache-only"
    shutil.copytree(cold_dir, on_disk, ignore=shutil.ignore_patterns(f"*{SUFFIX}"))
    disk = warm_cache(on_disk, weights_env)
    shipped = work / "artifacts-only"
    shipped.mkdir()
    shutil.copy(cold["file"], shipped)
    artifacts = warm_cache(shipped, weights_env)
    both = warm_cache(cold_dir, weights_env)  # what script/warm-cache leaves for the image: the file and inductor's
    print("| setup | setup s | compile s | ratio to cold | fxgraph hit/miss | artifacts loaded |")
    print("|---|---|---|---|---|---|")
    for label, report in (
        ("cold", cold),
        ("inductor's on-disk cache", disk),
        ("the artifacts file alone", artifacts),
        ("both (the folder script/warm-cache fills)", both),
    ):
        print(
            f"| {label} | {report['setup_s']:.1f} | {report['compile_s']:.1f} | "
            f"{report['compile_s'] / cold['compile_s']:.2f} | "
            f"{report['fxgraph_cache_hit']}/{report['fxgraph_cache_miss']} | {report['loaded']} |"
        )
    print(f"artifacts file: {Path(cold['file']).name}, {Path(cold['file']).stat().st_size / 2**20:.1f} MiB")


def bench_requests(work: Path, weights_env: dict[str, str], runs: int) -> None:
    from diffusers import FluxTransformer2DModel
    from torch._dynamo.utils import counters

    import predict
    from tests.lora_factory import make_peft_lora

    plain = FluxTransformer2DModel.from_pretrained(weights_env["FLUX_DEV_WEIGHTS"], subfolder="transformer")
    loras = {}  # as data: URIs, as requests take them (not paths)
    for rank in (4, 16, 64):
        data = make_peft_lora(plain, work / f"r{rank}.safetensors", rank=rank, seed=rank).read_bytes()
        loras[rank] = "data:application/octet-stream;base64," + base64.b64encode(data).decode()

    def setup(**env: str) -> Any:
        os.environ.update({**weights_env, "FLUX_DEVICE": "cpu", **env})
        predictor = predict.Predictor()
        predictor.setup()
        return predictor

    def request(predictor: Any, **inputs: Any) -> None:
        fixed = {"prompt": "a cat", "aspect_ratio": "custom", "width": 256, "height": 256, "seed": 1}
        predictor.predict(**{**default_inputs(predictor.predict), **fixed, "num_inference_steps": 4, **inputs})

    compiled = setup(**INDUCTOR, FLUX_COMPILE_CACHE_DIR=str(work / "requests-cache"))
    request(compiled, replicate_weights=loras[4])  # the LoRA cache, not a compile
    before = counters["stats"]["unique_graphs"]
    sequence: list[dict[str, Any]] = [
        {},
        {"replicate_weights": loras[16], "lora_scale": 0.5},
        {"replicate_weights": loras[64], "num_outputs": 3},
        {"replicate_weights": loras[16], "extra_lora": loras[64], "num_outputs": 2},
        {"model": "schnell", "replicate_weights": loras[4], "width": 512, "height": 384},
        {"aspect_ratio": "21:9", "megapixels": "0.25", "num_inference_steps": 1},
    ]
    for inputs in sequence:
        request(compiled, **inputs)
    new_graphs = counters["stats"]["unique_graphs"] - before
    print(f"new graphs after warm-up over {len(sequence)} requests (inductor): {new_graphs}")
    os.environ["FLUX_COMPILE"] = "0"
    eager = setup()
    for label, predictor in (("compiled", compiled), ("eager", eager)):
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            request(predictor, replicate_weights=loras[16])
            times.append(time.perf_counter() - start)
        print(f"{label}: median {statistics.median(times):.3f} s of {runs} (256x256, 4 steps, a rank-16 LoRA)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="setup,requests")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    weights_env = demo_model_env(ensure_demo_models(DEMO_MODEL_FOLDER))
    work = Path(tempfile.mkdtemp(prefix="flux-compile-bench-"))
    try:
        if "setup" in args.parts:
            bench_setup(work, weights_env)
        if "requests" in args.parts:
            bench_requests(work, weights_env, args.runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
