"""The go_fast path: a second, quantized and compiled copy of each transformer.

Every optimisation is an explicit switch (environment variables, read into FastSettings):
- FLUX_FAST_QUANTIZATION: `auto` (torchao fp8, dynamic activations and per-row weight
  scales, on CUDA GPUs of compute capability 8.9+), `off`, or a named torchao config used
  wherever torchao accepts it: `float8-dynamic` (auto's config without our hardware check;
  the tests run it on CPU past torchao's own check), `int8-weight-only`, `float8-weight-only`;
- FLUX_COMPILE and FLUX_COMPILE_BACKEND (`inductor`; tests use `eager`, `aot_eager`): regional
  torch.compile of the repeated blocks, with dynamic shapes so that sizes, batch sizes and
  modes share compiled graphs. Unset, the fast copy is compiled, and the standard transformer on
  CUDA only; `1` compiles both on any device, `0` neither (`compile_standard`);
- FLUX_COMPILE_CACHE_DIR: where inductor keeps its caches, so a second start is fast;
- FLUX_FAST_LORA: where go_fast's LoRA pairs go (lora_loading/merged.py): `slot` (default), a LoRA
  slot on the fast copy, unmerged in bf16; `merged`, quantize(W + s·B·A) written into the copy's
  weights, so a step costs what it costs without a LoRA. Everything else a LoRA holds (DoRA, LoKr,
  `.diff`) is merged either way; the README's fidelity table says why pairs default to the slot;
- FLUX_FAST_LORA_RANK: the rank of that slot (it grows); FLUX_LORA_SLOT_RANK: the compiled standard
  transformer's (fixed: a wider request runs eager);
- FLUX_GPU_RESERVE_GIB: GPU memory kept free for activations when deciding whether an
  fp8 copy fits (default 8);
- FLUX_WARM_UP_SIZE and FLUX_WARM_UP_BATCH: the image side and the larger batch setup compiles
  at (default 1024 and 4, the largest num_outputs). Inductor tunes its kernels (torchao turns
  coordinate-descent tuning on) for the token counts it first sees, so the warm-up runs the sizes
  requests use: 4,096 image tokens at batch 1, then the largest batch (dynamo keeps batch 1 and
  batch > 1 apart). Tests set toy sizes.

The fast copy shares every non-Linear tensor with the bf16 transformer (loaded by
`load_state_dict(assign=True)` into a meta skeleton), so it costs only its quantized
Linear weights, and the bf16 model is never modified: a LoRA is merged by quantizing the
bf16 weight plus the LoRA's update into the copy's weight (`weight_quantizer`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import FluxTransformer2DModel

from lora_loading.slots import add_lora_slot
from lora_loading.text_encoders import linear_layers

log = logging.getLogger(__name__)
FP8_MIN_CAPABILITY = (8, 9)
RECOMPILE_LIMIT = 64
NAMED_CONFIGS = ("float8-dynamic", "int8-weight-only", "float8-weight-only")


@dataclass(frozen=True)
class FastSettings:
    quantization: str
    compile: bool  # the fast copy
    compile_backend: str
    lora_rank: int
    compile_cache_dir: str | None
    gpu_reserve_bytes: int = 8 * 2**30
    standard_compile: bool | None = None  # the standard transformer; None: on CUDA only
    standard_lora_rank: int = 128
    warm_up_size: int = 1024
    warm_up_batch: int = 4
    fast_lora: str = "slot"  # or "merged"

    @classmethod
    def from_env(cls) -> FastSettings:
        switch = os.environ.get("FLUX_COMPILE", "")
        return cls(
            quantization=os.environ.get("FLUX_FAST_QUANTIZATION", "auto"),
            compile=switch != "0",
            compile_backend=os.environ.get("FLUX_COMPILE_BACKEND", "inductor"),
            lora_rank=int(os.environ.get("FLUX_FAST_LORA_RANK", "64")),
            compile_cache_dir=os.environ.get("FLUX_COMPILE_CACHE_DIR") or None,
            gpu_reserve_bytes=int(float(os.environ.get("FLUX_GPU_RESERVE_GIB", "8")) * 2**30),
            standard_compile={"1": True, "0": False}.get(switch),
            standard_lora_rank=int(os.environ.get("FLUX_LORA_SLOT_RANK", "128")),
            warm_up_size=int(os.environ.get("FLUX_WARM_UP_SIZE", "1024")),
            warm_up_batch=int(os.environ.get("FLUX_WARM_UP_BATCH", "4")),
            fast_lora=os.environ.get("FLUX_FAST_LORA", "slot"),
        )

    def compile_standard(self, device: torch.device) -> bool:
        return self.standard_compile if self.standard_compile is not None else device.type == "cuda"


def fast_path_unavailable(settings: FastSettings, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why go_fast must run the standard path here, or None when the fast path can be built."""
    if settings.quantization == "off":
        return "FLUX_FAST_QUANTIZATION is off"
    if settings.fast_lora not in ("slot", "merged"):
        return f"FLUX_FAST_LORA={settings.fast_lora!r} is not one of slot, merged"
    if settings.quantization not in ("auto", *NAMED_CONFIGS):
        return f"FLUX_FAST_QUANTIZATION={settings.quantization!r} is not one of auto, off, " + ", ".join(NAMED_CONFIGS)
    if settings.quantization == "auto":
        if device.type != "cuda":
            return f"fp8 needs a CUDA GPU and this server runs on {device.type}"
        capability = torch.cuda.get_device_capability(device)
        if capability < FP8_MIN_CAPABILITY:
            return f"fp8 needs compute capability 8.9 or higher and this GPU has {capability[0]}.{capability[1]}"
    if settings.quantization in ("auto", "float8-dynamic") and dtype != torch.bfloat16:
        # torchao's per-row fp8 asserts on anything but bf16 weights.
        return f"fp8 with per-row scales needs bfloat16 weights and FLUX_DTYPE is {str(dtype).removeprefix('torch.')}"
    return None


def _quantization_config(name: str):  # type: ignore[no-untyped-def]
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        Int8WeightOnlyConfig,
        PerRow,
    )

    if name == "int8-weight-only":
        return Int8WeightOnlyConfig()
    if name == "float8-weight-only":
        return Float8WeightOnlyConfig()
    # auto and float8-dynamic: activations are quantized per token at run time and weights
    # per output row, so the matmuls run on the GPU's fp8 tensor cores.
    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


def configure_compile_cache(settings: FastSettings) -> None:
    if settings.compile_cache_dir:
        # Inductor's FX graph, AOTAutograd and Triton caches (on by default) all live under
        # this folder; a deployment that keeps it skips most of the compile work on its next
        # start. Assigned, not setdefault: torch fills TORCHINDUCTOR_CACHE_DIR with its
        # default the first time anything asks (cache_dir_utils.cache_dir), which imports do.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(settings.compile_cache_dir)


def build_fast_transformer(
    transformer: FluxTransformer2DModel, settings: FastSettings, name: str
) -> FluxTransformer2DModel:
    from torchao.quantization import quantize_

    start = time.perf_counter()
    with torch.device("meta"):
        fast = FluxTransformer2DModel.from_config(transformer.config)
    # Shares the bf16 tensors; quantize_ then replaces each Linear weight with a new
    # quantized tensor, one layer at a time, so the peak extra memory is one layer.
    fast.load_state_dict(transformer.state_dict(), assign=True)
    fast.eval()
    quantize_(fast, _quantization_config(settings.quantization))
    log.info(
        "go_fast: %s transformer quantized (%s) in %.1f s.",
        name,
        settings.quantization if settings.quantization != "auto" else "fp8 per-row",
        time.perf_counter() - start,
    )
    label = f"go_fast {name}"
    if settings.fast_lora == "slot":
        # After quantizing: the slot's own lora_A/lora_B layers stay in the compute dtype.
        add_lora_slot(fast, settings.lora_rank)
        label += f" (a rank-{settings.lora_rank} LoRA slot)"
    if settings.compile:
        compiled(fast, settings, label)
    return fast


def weight_quantizer(settings: FastSettings) -> Callable[[torch.Tensor], torch.Tensor]:
    """A bf16 weight -> its quantized tensor, made as `build_fast_transformer` made the copy's (quantize_ on
    a Linear holding it), so that quantizing a layer's own weight again gives the copy's bytes back."""
    from torchao.quantization import quantize_

    config = _quantization_config(settings.quantization)

    def quantized(weight: torch.Tensor) -> torch.Tensor:
        with torch.device("meta"):
            layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        layer.weight = torch.nn.Parameter(weight, requires_grad=False)
        quantize_(layer, config)
        return layer.weight

    return quantized


def quantized_twins(standard: torch.nn.Module, fast: torch.nn.Module) -> dict[int, torch.Tensor]:
    """By id of each bf16 Linear weight: the fast copy's quantized weight built from it. Layers torchao left
    alone (a width its kernels do not take) share the bf16 weight, and are not here."""
    from torchao.utils import TorchAOBaseTensor

    fast_layers = linear_layers(fast)
    return {
        id(layer.weight): fast_layers[name].weight
        for name, layer in linear_layers(standard).items()
        if isinstance(fast_layers[name].weight, TorchAOBaseTensor)
    }


def slot_bytes(transformer: torch.nn.Module, rank: int) -> int:
    """The memory a LoRA slot of `rank` takes on every Linear of `transformer`, in its dtype: (in + out)
    x rank per layer, 1.3 GiB at rank 128 on FLUX.1's transformer in bf16."""
    per_rank = sum(m.in_features + m.out_features for m in transformer.modules() if isinstance(m, torch.nn.Linear))
    dtype = next(transformer.parameters()).dtype
    return per_rank * rank * (torch.finfo(dtype).bits // 8)


def with_slot_compiled(
    transformer: FluxTransformer2DModel, rank: int, settings: FastSettings, name: str
) -> FluxTransformer2DModel:
    """The compiled standard transformer: a LoRA slot of `rank` on every Linear (lora_loading/slots.py),
    so that switching LoRAs writes tensors instead of changing modules, then its blocks compiled."""
    add_lora_slot(transformer, rank)
    return compiled(transformer, settings, f"{name} (a rank-{rank} LoRA slot)")


def compiled(transformer: FluxTransformer2DModel, settings: FastSettings, name: str) -> FluxTransformer2DModel:
    """Regional compilation of the repeated blocks, as diffusers' `compile_repeated_blocks` does it."""
    # Every block of both models shares one compiled code object, with an entry for each
    # slot state, batch 1 or more, and quantization: past dynamo's default limit of 8, a
    # fullgraph compile raises instead of running the request.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    # dynamic=True: one graph serves every size and batch size, so a new aspect ratio,
    # custom size or img2img input does not recompile.
    transformer.compile_repeated_blocks(fullgraph=True, dynamic=True, backend=settings.compile_backend)
    log.info("%s: blocks compiled (%s).", name, settings.compile_backend)
    return transformer


def uncompiled(transformer: torch.nn.Module) -> None:
    """Back to eager after a compile failed: each module's compiled forward (nn.Module.compile's) dropped."""
    for module in transformer.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None


def first_line(error: BaseException) -> str:
    """An exception in one short line, for a log line that says why something fell back."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:200]
