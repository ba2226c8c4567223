"""LoRA files for the tiny demo transformer, written in the diffusers/PEFT layout.

    make_peft_lora(pipeline.transformer, tmp_path / "style.safetensors")

gives `transformer.<module>.lora_A.weight` (rank x in_features) and
`transformer.<module>.lora_B.weight` (out_features x rank) for every selected
`torch.nn.Linear`, with seeded normal values large enough that the effect on an image
is plain to see. The file loads through `FluxPipeline.load_lora_weights` and through the
predictor's LoRA inputs like any LoRA trained with diffusers or ai-toolkit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch

# The attention projections every FLUX block has (single blocks have no to_out).
ATTENTION_SUFFIXES = (".to_q", ".to_k", ".to_v", ".to_out.0")


def attention_layers(name: str, module: torch.nn.Linear) -> bool:
    """The default selection: the image-stream attention projections of every block."""
    return name.endswith(ATTENTION_SUFFIXES)


def make_peft_lora(
    transformer: torch.nn.Module,
    path: Path | str,
    rank: int = 4,
    seed: int = 0,
    std: float = 0.5,
    module_filter: Callable[[str, torch.nn.Linear], bool] | None = None,
    prefix: str = "transformer.",
) -> Path:
    """Write a random LoRA for `transformer`'s selected Linear layers to `path`; returns it.

    `module_filter(name, module)` picks the layers (default: `attention_layers`). The same
    arguments always give the same file. `prefix` is prepended to every module name; keep
    the default for a LoRA that diffusers' Flux loaders accept.
    """
    selected = module_filter or attention_layers
    generator = torch.Generator("cpu").manual_seed(seed)
    state_dict: dict[str, torch.Tensor] = {}
    for name, module in transformer.named_modules():
        if ".lora_" in name:  # a peft adapter's own layers (a server's LoRA slot), not the model's
            continue
        name = name.removesuffix(".base_layer")  # the model's layer inside peft's wrapper, by the model's name
        if not isinstance(module, torch.nn.Linear) or not selected(name, module):
            continue
        down = torch.randn(rank, module.in_features, generator=generator) * std
        up = torch.randn(module.out_features, rank, generator=generator) * std
        state_dict[f"{prefix}{name}.lora_A.weight"] = down.contiguous()
        state_dict[f"{prefix}{name}.lora_B.weight"] = up.contiguous()
    if not state_dict:
        raise ValueError("make_peft_lora: the module filter selected no torch.nn.Linear layer.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(state_dict, str(path))
    return path


def another_models_lora(path: Path | str) -> Path:
    """A LoRA for a FLUX transformer of other widths than the demo model's (attention 2 x 32 against its own):
    every tensor the predictor must refuse as trained for a different model."""
    from diffusers import FluxTransformer2DModel

    wider = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(8, 12, 12),
    )
    return make_peft_lora(wider, path)
