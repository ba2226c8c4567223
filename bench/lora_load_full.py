"""The CPU side of loading a full-size FLUX LoRA: read from the local cache, convert, check.

For each main layout at rank 16 and 64, a file covering every layer (bf16, as trainers save) is
written once; each run then reads it (safetensors, from the page cache), converts and checks it
against FLUX.1 dev's transformer built on the meta device (shapes only), and builds the go_fast
slot's factors. The GPU side (peft's upload, the slot write, a LoKr's merge into the weights) is
not measured here. LoKr files (SimpleTuner's LyCORIS names, Kronecker factor 16 on every layer) are
in-place deltas: "convert+check" is their matching; their kron and merge happen at apply time.

    PYTHONPATH=. .venv/bin/python bench/lora_load_full.py [--runs 3] [--ranks 16,64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import safetensors.torch
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lora_loading.formats import LoraFile, check_lora_matches, read_lora  # noqa: E402
from lora_loading.slots import lora_factors  # noqa: E402
from tests.test_lora_coverage import kohya_bfl, mixture, peft  # noqa: E402


def realise(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        key: (tensor if not tensor.is_meta else torch.randn(tensor.shape, generator=generator) * 0.01).to(
            torch.bfloat16 if tensor.is_meta else tensor.dtype
        )
        for key, tensor in state_dict.items()
    }


def lokr(flux: types.SimpleNamespace, rank: int | None) -> dict[str, torch.Tensor]:
    """SimpleTuner's LyCORIS LoKr for every Linear: w1 16 x 16, w2 whole (rank None) or a rank-r pair."""
    state_dict = {}
    for name, module in flux.transformer.named_modules():
        if isinstance(module, torch.nn.Linear):
            key = "lycoris_" + name.replace(".", "_")
            out_features, in_features = module.out_features // 16, module.in_features // 16
            state_dict[f"{key}.lokr_w1"] = torch.empty(16, 16, device="meta")
            if rank is None:
                state_dict[f"{key}.lokr_w2"] = torch.empty(out_features, in_features, device="meta")
            else:
                state_dict[f"{key}.lokr_w2_a"] = torch.empty(out_features, rank, device="meta")
                state_dict[f"{key}.lokr_w2_b"] = torch.empty(rank, in_features, device="meta")
            state_dict[f"{key}.alpha"] = torch.tensor(1.0)
    return state_dict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--ranks", default="16,64")
    args = parser.parse_args()

    from diffusers import FluxTransformer2DModel

    import tests.test_lora_coverage as coverage

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(guidance_embeds=True)
    # The text encoders are not in these files; a stand-in with none of their layers is enough.
    flux = types.SimpleNamespace(
        transformer=transformer, text_encoder=torch.nn.Module(), text_encoder_2=torch.nn.Module()
    )
    layouts = {
        "diffusers/PEFT (ai-toolkit), 504 layers": lambda: peft(flux),
        "kohya, in_dims, 314 modules": lambda: kohya_bfl("lora_unet_", "_", "lora_down.weight", "lora_up.weight"),
        "ComfyUI, kohya names, 314 modules": lambda: kohya_bfl(
            "diffusion_model.", ".", "lora_down.weight", "lora_up.weight"
        ),
        "CivitAI mixture, 504 layers": lambda: mixture(flux),
        "LyCORIS LoKr, factor 16, low-rank w2": lambda: lokr(flux, coverage.RANK),
        "LyCORIS LoKr, factor 16, whole w2": lambda: lokr(flux, None),
    }
    print(f"CPU side of a LoRA load, median of {args.runs} (read + convert/check + go_fast factors):")
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as folder:
        for rank in (int(r) for r in args.ranks.split(",")):
            coverage.RANK = rank  # the writers' rank
            for label, make in layouts.items():
                path = Path(folder) / "lora.safetensors"
                safetensors.torch.save_file(realise(make()), str(path))
                size = path.stat().st_size
                read_s, check_s, factors_s = [], [], []
                for _ in range(args.runs):
                    lora = LoraFile("replicate_weights", label, path, 1.0)
                    start = time.perf_counter()
                    state_dict = read_lora(lora)
                    read_s.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    to_load = check_lora_matches(flux, state_dict, "replicate_weights")
                    check_s.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    lora_factors(to_load)
                    factors_s.append(time.perf_counter() - start)
                read_ms, check_ms, factors_ms = (statistics.median(s) * 1e3 for s in (read_s, check_s, factors_s))
                print(
                    f"  rank {rank:>2}  {label:<42} {size / 2**20:7.0f} MiB  read {read_ms:6.0f} ms"
                    f"  convert+check {check_ms:6.0f} ms  factors {factors_ms:6.0f} ms"
                )


if __name__ == "__main__":
    main()
