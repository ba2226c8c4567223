"""GPUs too small for FLUX.1 dev with its text encoders (about 32 GiB in bf16, so 24 GB and
32 GB cards): the models stay in CPU memory, and each phase of a request moves the modules
it runs onto the GPU and back when it ends (the safety models too). At most the
transformer (22 GiB) is on the GPU at once. It costs a few seconds of transfers a request,
but the server runs instead of failing at setup.

This is what diffusers' model CPU offload does, but by phase rather than with its hooks:
the hooks chain one pipeline's modules, and here six pipelines (two models, three modes)
share the text encoders and VAE.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

log = logging.getLogger(__name__)
HOME = torch.device("cpu")


class Offload:
    def __init__(self, device: torch.device, enabled: bool):
        self.device = device
        self.enabled = enabled

    @contextmanager
    def running(self, **modules: torch.nn.Module | None) -> Iterator[None]:
        """The named modules on the GPU for the duration; back home even when the phase fails."""
        if not self.enabled:
            yield
            return
        present = {name: module for name, module in modules.items() if module is not None}
        start = time.perf_counter()
        try:
            for module in present.values():
                module.to(self.device)
            log.info("Offload: %s onto %s in %.2f s.", ", ".join(present), self.device, time.perf_counter() - start)
            yield
        finally:
            for module in present.values():
                module.to(HOME)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
