"""Two-stage NSFW filter: the CompVis Stable Diffusion safety checker, confirmed by a ViT.

The CompVis checker alone flags many harmless images (skin, swimwear), so an image it
flags gets a second opinion from the Falconsai ViT classifier and is dropped only when
both agree.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from PIL import Image
from transformers import AutoImageProcessor, ViTForImageClassification

from errors import UnsafeOutputError

log = logging.getLogger(__name__)


class SafetyChecker:
    def __init__(
        self,
        checker_weights: str,
        classifier_weights: str,
        device: torch.device,
        dtype: torch.dtype,
        home: torch.device | None = None,
    ):
        """`home`: where the models wait between checks when it is not `device` (offloading)."""
        self.device = device
        self.dtype = dtype
        self.checker_processor = AutoImageProcessor.from_pretrained(checker_weights)
        self.checker = StableDiffusionSafetyChecker.from_pretrained(
            checker_weights, dtype=dtype, device_map=str(home or device)
        )
        self.classifier_processor = AutoImageProcessor.from_pretrained(classifier_weights)
        self.classifier = ViTForImageClassification.from_pretrained(
            classifier_weights, dtype=dtype, device_map=str(home or device)
        )
        self.checker.eval()
        self.classifier.eval()
        self.nsfw_label = next(
            index for index, label in self.classifier.config.id2label.items() if label.lower() == "nsfw"
        )

    @property
    def modules(self) -> dict[str, torch.nn.Module]:
        return {"safety_checker": self.checker, "nsfw_classifier": self.classifier}

    @torch.inference_mode()
    def flag_unsafe(self, images: list[Image.Image]) -> list[bool]:
        """One flag per image: True where both models call it NSFW."""
        pixels = self.checker_processor(images, return_tensors="pt").pixel_values.to(self.device, self.dtype)
        arrays = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images])
        # The checker returns blacked-out copies alongside its flags; only the flags are used.
        _, checker_flags = self.checker(images=arrays, clip_input=pixels)
        flags = [False] * len(images)
        suspects = [index for index, flagged in enumerate(checker_flags) if flagged]
        if suspects:
            inputs = self.classifier_processor([images[i] for i in suspects], return_tensors="pt")
            logits = self.classifier(pixel_values=inputs.pixel_values.to(self.device, self.dtype)).logits
            for index, predicted in zip(suspects, logits.argmax(dim=-1).tolist(), strict=True):
                flags[index] = predicted == self.nsfw_label
                log.info(
                    "Safety: image %d flagged by the safety checker, %s by the NSFW classifier.",
                    index,
                    "confirmed" if flags[index] else "not confirmed",
                )
        return flags

    def filter(self, images: list[Image.Image]) -> list[Image.Image]:
        """The images both models did not flag; fails when none is left."""
        flags = self.flag_unsafe(images)
        kept = [image for image, unsafe in zip(images, flags, strict=True) if not unsafe]
        if not kept:
            raise UnsafeOutputError(
                "All generated images were flagged as NSFW by the safety checker; try a different prompt or seed."
            )
        if len(kept) < len(images):
            log.info("Safety: dropped %d of %d images as NSFW.", len(images) - len(kept), len(images))
        return kept
