"""Deployment settings, read once from the environment when the predictor starts."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

DEFAULT_DEV_WEIGHTS = "black-forest-labs/FLUX.1-dev"
DEFAULT_SCHNELL_WEIGHTS = "black-forest-labs/FLUX.1-schnell"
DEFAULT_SAFETY_CHECKER_WEIGHTS = "CompVis/stable-diffusion-safety-checker"
DEFAULT_NSFW_CLASSIFIER_WEIGHTS = "Falconsai/nsfw_image_detection"
# float16 is not offered: FLUX's activations overflow it.
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# auto: offload only when FLUX.1 dev does not fit on the GPU (engine/offload.py).
OFFLOAD_CHOICES = ("auto", "on", "off")


@dataclass(frozen=True)
class Settings:
    dev_weights: str
    schnell_weights: str
    safety_checker_weights: str
    nsfw_classifier_weights: str
    device: torch.device
    main_lora: str | None
    dtype: torch.dtype
    offload: str = "auto"

    @classmethod
    def from_env(cls) -> Settings:
        device = torch.device(os.environ.get("FLUX_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
        # bf16 is what FLUX was trained in and what fits two transformers on one GPU; on CPU
        # bf16 matmuls are 30-50x slower than fp32, so CPU defaults to fp32. Tests set bf16
        # on CPU to run the GPU's dtype (and the fp8 path, which needs bf16 weights).
        dtype_name = os.environ.get("FLUX_DTYPE") or ("bfloat16" if device.type == "cuda" else "float32")
        if dtype_name not in DTYPES:
            raise ValueError(f"FLUX_DTYPE={dtype_name!r} is not supported: use one of {', '.join(DTYPES)}.")
        offload = os.environ.get("FLUX_OFFLOAD") or "auto"
        if offload not in OFFLOAD_CHOICES:
            raise ValueError(f"FLUX_OFFLOAD={offload!r} is not supported: use one of {', '.join(OFFLOAD_CHOICES)}.")
        return cls(
            dev_weights=os.environ.get("FLUX_DEV_WEIGHTS") or DEFAULT_DEV_WEIGHTS,
            schnell_weights=os.environ.get("FLUX_SCHNELL_WEIGHTS") or DEFAULT_SCHNELL_WEIGHTS,
            safety_checker_weights=os.environ.get("FLUX_SAFETY_CHECKER_WEIGHTS") or DEFAULT_SAFETY_CHECKER_WEIGHTS,
            nsfw_classifier_weights=os.environ.get("FLUX_NSFW_CLASSIFIER_WEIGHTS") or DEFAULT_NSFW_CLASSIFIER_WEIGHTS,
            device=device,
            main_lora=os.environ.get("FLUX_MAIN_LORA") or None,
            dtype=DTYPES[dtype_name],
            offload=offload,
        )
