"""Deployment settings, read once from the environment when the predictor starts."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

DEFAULT_DEV_WEIGHTS = "black-forest-labs/FLUX.1-dev"
DEFAULT_SCHNELL_WEIGHTS = "black-forest-labs/FLUX.1-schnell"
DEFAULT_SAFETY_CHECKER_WEIGHTS = "CompVis/stable-diffusion-safety-checker"
DEFAULT_NSFW_CLASSIFIER_WEIGHTS = "Falconsai/nsfw_image_detection"


@dataclass(frozen=True)
class Settings:
    dev_weights: str
    schnell_weights: str
    safety_checker_weights: str
    nsfw_classifier_weights: str
    device: torch.device
    main_lora: str | None

    @property
    def dtype(self) -> torch.dtype:
        # bf16 is what FLUX was trained in and what fits two transformers on one GPU;
        # on CPU bf16 matmuls are 30-50x slower than fp32, so CPU runs fp32.
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    @classmethod
    def from_env(cls) -> Settings:
        device = os.environ.get("FLUX_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(
            dev_weights=os.environ.get("FLUX_DEV_WEIGHTS") or DEFAULT_DEV_WEIGHTS,
            schnell_weights=os.environ.get("FLUX_SCHNELL_WEIGHTS") or DEFAULT_SCHNELL_WEIGHTS,
            safety_checker_weights=os.environ.get("FLUX_SAFETY_CHECKER_WEIGHTS") or DEFAULT_SAFETY_CHECKER_WEIGHTS,
            nsfw_classifier_weights=os.environ.get("FLUX_NSFW_CLASSIFIER_WEIGHTS") or DEFAULT_NSFW_CLASSIFIER_WEIGHTS,
            device=torch.device(device),
            main_lora=os.environ.get("FLUX_MAIN_LORA") or None,
        )
