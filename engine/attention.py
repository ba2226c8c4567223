"""The attention kernel both paths run, chosen once at setup (FLUX_ATTENTION).

diffusers' default is torch's SDPA, which on Hopper picks FlashAttention 2. Attention is about a fifth
of a 1024² step's FLOPs and a third at 4 x 1440²; lora-fast measured 4.30 -> 3.55 s on an H100 from
FA3 alone, and cog-flux runs cuDNN's attention. diffusers dispatches both: "_flash_3" (where the
flash_attn_interface package is installed) and "_native_cudnn" (torch's own SDPBackend.CUDNN_ATTENTION,
no new package). Design, not yet measured here: no GPU has been lent to this project.

`FLUX_ATTENTION`: `auto` (default) tries FA3 then cuDNN on compute capability 9.0+; `sdpa` keeps the
default; a diffusers backend name tries that one on any device. Each candidate is probed first: one
attention call at FLUX's head shape, against the default's output. An error, or a difference over
`PROBE_BOUND`, keeps the default (or the next candidate), with a log line that says why: a kernel that
does not run on this GPU never reaches a request.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from engine.fast import first_line

log = logging.getLogger(__name__)
CANDIDATES = ("_flash_3", "_native_cudnn")  # the faster first
MIN_CAPABILITY = (9, 0)
# RMS of (candidate - default) / RMS of the default's output. Two exact kernels in bf16 differ by their
# rounding (bf16 keeps 8 bits: 0.4% per element, less after averaging); a wrong one by far more.
PROBE_BOUND = 0.01


def probe(backend: str, device: torch.device) -> float:
    """Runs `backend` and the default on one attention call (1 x 1024 tokens x 24 heads x 128, bf16, as
    FLUX's layout: batch, tokens, heads, head dim); the relative RMS difference of their outputs."""
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _check_attention_backend_requirements,
        dispatch_attention_fn,
    )

    name = AttentionBackendName(backend)
    _check_attention_backend_requirements(name)  # a missing package, as a sentence
    generator = torch.Generator(device).manual_seed(0)
    query, key, value = (
        torch.randn(1, 1024, 24, 128, generator=generator, device=device, dtype=torch.bfloat16) for _ in range(3)
    )
    reference = dispatch_attention_fn(query, key, value, backend=AttentionBackendName.NATIVE).float()
    candidate = dispatch_attention_fn(query, key, value, backend=name).float()
    if candidate.shape != reference.shape:
        raise RuntimeError(f"it returned shape {tuple(candidate.shape)} for {tuple(reference.shape)}")
    return float((candidate - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt())


def choose_attention(
    device: torch.device,
    setting: str | None = None,
    capability: tuple[int, int] | None = None,
    run_probe: Callable[[str, torch.device], float] = probe,
) -> str | None:
    """The diffusers attention backend to set on every transformer, or None for the default (SDPA).
    `capability` is the GPU's (read from it when None); tests pass it, and `run_probe`, in."""
    setting = setting or os.environ.get("FLUX_ATTENTION", "auto")
    if setting == "sdpa":
        log.info("Attention: SDPA, diffusers' default (FLUX_ATTENTION=sdpa).")
        return None
    if setting == "auto":
        if device.type != "cuda":
            log.info("Attention: SDPA, diffusers' default (FA3 and cuDNN attention are for CUDA GPUs).")
            return None
        capability = capability or torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:
            log.info(
                "Attention: SDPA, diffusers' default (FA3 and cuDNN attention are chosen on compute capability "
                "9.0+, and this GPU has %d.%d).",
                *capability,
            )
            return None
        candidates: tuple[str, ...] = CANDIDATES
    else:
        candidates = (setting,)
    for backend in candidates:
        try:
            difference = run_probe(backend, device)
        except Exception as error:  # not installed, not built for this GPU, refused for these shapes
            log.info("Attention: %s did not run (%s); not used.", backend, first_line(error))
            continue
        if not difference <= PROBE_BOUND:  # NaN too
            log.warning(
                "Attention: %s differs from the default by %.2g (RMS, relative; the bound is %g); not used.",
                backend,
                difference,
                PROBE_BOUND,
            )
            continue
        log.info("Attention: %s (probed: %.2g from the default, relative RMS).", backend, difference)
        return backend
    log.info("Attention: SDPA, diffusers' default.")
    return None
