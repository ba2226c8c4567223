"""The compile cache a deployment carries: torch's cache artifacts, one file per setup it is valid for.

`cog build` has no GPU and a container's inductor cache dies with it, so without this every boot
compiles from nothing. `torch.compiler.save_cache_artifacts()` packs what compiling produced
(inductor's FX graphs and kernels, AOTAutograd's entries) into one blob, and
`load_cache_artifacts()` puts it back into this process's caches before anything compiles, so the
warm-up finds every graph compiled. Inductor's entries are keyed by, among others, the GPU and the
CUDA and Triton versions: a blob from another setup is dead weight, so the file is named by what its
validity depends on (`artifacts_name`) and only a file of this name is loaded. A missing, mismatched
or unreadable file is skipped with a log line, never an error.

Where: FLUX_COMPILE_CACHE_DIR when set, else `flux-weights/compile-cache/`, which `.dockerignore` lets into
the image with the weights; inductor's own caches go there too (`keep_inductor_caches_beside`).
`script/warm-cache` writes it on a GPU machine in the image's environment (README, "The compile
cache"); a setup that loaded no file of its name writes one after its warm-up.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import tempfile
from pathlib import Path

import torch

from engine.config import WEIGHTS_FOLDER
from engine.fast import FastSettings, first_line

log = logging.getLogger(__name__)
SUFFIX = ".torch-compile-cache"


def artifacts_folder(settings: FastSettings) -> Path:
    return Path(settings.compile_cache_dir) if settings.compile_cache_dir else WEIGHTS_FOLDER / "compile-cache"


def keep_inductor_caches_beside(settings: FastSettings) -> None:
    """Without FLUX_COMPILE_CACHE_DIR, inductor's own caches go into the artifacts' folder too, when it can be
    written, so that script/warm-cache leaves both there for the image to carry: inductor's CPU kernels (built
    C++) are in its own cache only, not in the artifacts (bench/compile_cpu.py, two runs: the compile phase of a
    setup from the artifacts alone took 0.67 and 0.68 of a cold one, from inductor's own cache 0.29)."""
    if settings.compile_cache_dir:
        return  # engine/fast.py configure_compile_cache has put inductor's caches there
    folder = artifacts_folder(settings)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        writable = os.access(folder, os.W_OK)
    except OSError:
        writable = False
    if writable:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder.resolve())
    else:
        log.info("Compile cache: %s cannot be written; inductor keeps its caches in a temporary folder.", folder)


def artifacts_name(settings: FastSettings, device: torch.device, dtype: torch.dtype) -> str:
    """The file name: the hardware and versions in words, then a hash of all of it and of the compile
    settings (backend, quantization, slot ranks, which transformers are compiled, dtype)."""
    if device.type == "cuda":
        hardware = f"{torch.cuda.get_device_name(device)}-cuda{torch.version.cuda}"
    else:  # inductor's C++ kernels are built for the CPU's instruction set
        hardware = f"{device.type}-{platform.machine()}-{torch.backends.cpu.get_cpu_capability()}"
    versions = f"torch{torch.__version__}-triton{_version('triton')}"
    compiled = {
        "backend": settings.compile_backend,
        "fast": [settings.compile, settings.quantization, settings.fast_lora, settings.lora_rank],
        "standard": [settings.compile_standard(device), settings.standard_lora_rank],
        "dtype": str(dtype),
    }
    digest = hashlib.sha256(json.dumps([hardware, versions, compiled], sort_keys=True).encode()).hexdigest()
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{hardware}-{versions}")[:160] + f"-{digest[:12]}{SUFFIX}"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def load_artifacts(path: Path) -> bool:
    """Loads the file into this process's compile caches; False (with a log line) when there is none of this
    name or it cannot be read."""
    others = [p.name for p in path.parent.glob(f"*{SUFFIX}") if p != path] if path.parent.is_dir() else []
    if others:
        log.info("Compile cache: skipping %d file(s) made for another setup (%s).", len(others), ", ".join(others[:2]))
    if not path.is_file():
        log.info("Compile cache: no %s; compiling from the start.", path)
        return False
    try:
        # torch logs and returns None for a blob that fails its checksum; it raises for others.
        info = torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception as error:  # a truncated or foreign blob: compile as if it were not there
        info, why = None, first_line(error)
    else:
        why = "torch found it corrupt"
    if info is None:
        log.warning("Compile cache: skipping %s, which cannot be loaded (%s).", path, why)
        return False
    entries = sum(len(keys) for keys in info.artifacts.values())
    log.info("Compile cache: loaded %s (%d entries).", path, entries)
    return True


def save_artifacts(path: Path) -> bool:
    """Writes what this process compiled to `path`, whole or not at all; False (logged) when there is
    nothing to write or the folder cannot take it."""
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None or not artifacts[0]:
        log.info("Compile cache: nothing compiled to save.")
        return False
    partial = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".writing-", delete=False) as partial:
            partial.write(artifacts[0])
        os.replace(partial.name, path)
    except OSError as error:
        if partial is not None:
            Path(partial.name).unlink(missing_ok=True)
        log.warning("Compile cache: could not write %s (%s).", path, error.strerror or type(error).__name__)
        return False
    log.info("Compile cache: wrote %s (%.1f MiB).", path, len(artifacts[0]) / 2**20)
    return True
