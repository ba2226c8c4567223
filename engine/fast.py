"""The go_fast switch: which way the transformer runs for a request.

fp8 (torchao float8 + torch.compile) needs a CUDA GPU of compute capability 8.9 or
higher. Everywhere else go_fast runs the standard path and says why, once per process.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)
FP8_MIN_CAPABILITY = (8, 9)
_explained = False


def fp8_unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"fp8 needs a CUDA GPU and this server runs on {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        return f"fp8 needs compute capability 8.9 or higher and this GPU has {capability[0]}.{capability[1]}"
    return "the fp8 fast path is not built yet"


def use_fast_path(go_fast: bool, device: torch.device) -> bool:
    global _explained
    if not go_fast:
        return False
    reason = fp8_unavailable_reason(device)
    if reason is not None:
        if not _explained:
            log.info("go_fast: %s, so predictions run the standard path.", reason)
            _explained = True
        return False
    return True
