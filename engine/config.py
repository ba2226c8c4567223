"""Deployment settings, read once from the environment when the predictor starts."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from model_weights import fetch_weights, is_weights_url

DEFAULT_DEV_WEIGHTS = "black-forest-labs/FLUX.1-dev"
DEFAULT_SCHNELL_WEIGHTS = "black-forest-labs/FLUX.1-schnell"
DEFAULT_SAFETY_CHECKER_WEIGHTS = "CompVis/stable-diffusion-safety-checker"
DEFAULT_NSFW_CLASSIFIER_WEIGHTS = "Falconsai/nsfw_image_detection"
# script/download-weights fills this folder; .dockerignore lets the image carry it, and setup uses
# what it holds unless a setting names other weights.
WEIGHTS_FOLDER = Path(__file__).resolve().parents[1] / "flux-weights"
# Each weights setting: its environment variable and its subfolder of WEIGHTS_FOLDER.
WEIGHT_SETTINGS = {
    "dev_weights": ("FLUX_DEV_WEIGHTS", "dev"),
    "schnell_weights": ("FLUX_SCHNELL_WEIGHTS", "schnell"),
    "safety_checker_weights": ("FLUX_SAFETY_CHECKER_WEIGHTS", "safety-checker"),
    "nsfw_classifier_weights": ("FLUX_NSFW_CLASSIFIER_WEIGHTS", "nsfw-classifier"),
}
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
            dev_weights=_weights("dev_weights", DEFAULT_DEV_WEIGHTS),
            schnell_weights=_weights("schnell_weights", DEFAULT_SCHNELL_WEIGHTS),
            safety_checker_weights=_weights("safety_checker_weights", DEFAULT_SAFETY_CHECKER_WEIGHTS),
            nsfw_classifier_weights=_weights("nsfw_classifier_weights", DEFAULT_NSFW_CLASSIFIER_WEIGHTS),
            device=device,
            main_lora=os.environ.get("FLUX_MAIN_LORA") or None,
            dtype=DTYPES[dtype_name],
            offload=offload,
        )

    def with_weights_fetched(self) -> Settings:
        """These settings with each http(s) .tar URL replaced by the local folder it unpacks to."""
        fetched = {
            field.name: str(fetch_weights(WEIGHT_SETTINGS[field.name][0], getattr(self, field.name)))
            for field in fields(self)
            if field.name in WEIGHT_SETTINGS and is_weights_url(getattr(self, field.name))
        }
        return replace(self, **fetched)


def _weights(field: str, default: str) -> str:
    """The setting; else the bundled folder, when script/download-weights filled it; else the hub repo."""
    variable, subfolder = WEIGHT_SETTINGS[field]
    bundled = WEIGHTS_FOLDER / subfolder
    filled = any((bundled / name).is_file() for name in ("model_index.json", "config.json"))
    return os.environ.get(variable) or (str(bundled) if filled else default)
