"""The compile cache a deployment carries (engine/compile_cache.py, script/warm-cache), and setup surviving the
fast path's and the compiler's real failures (a C++ compiler that fails under inductor; fp8 refused by the
hardware), each serving the standard path's bytes.

The end-to-end tests run script/warm-cache itself with inductor on CPU (about a minute each cold): a first
setup compiles and writes the file; a second, given a folder holding only that file (inductor's own on-disk
caches are elsewhere, as in a fresh container), loads it and compiles nothing new, by inductor's cache-hit
counters."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.compile_cache import SUFFIX, artifacts_name, load_artifacts, save_artifacts
from engine.fast import FastSettings
from tests.test_scripts import REPO, run_predict, script_env
from tooling.cli import DEMO_MODEL_FOLDER
from tooling.demo_model import demo_model_env, ensure_demo_models

INDUCTOR = {"FLUX_COMPILE": "1", "FLUX_COMPILE_BACKEND": "inductor", "FLUX_FAST_QUANTIZATION": "off"}
needs_a_compiler = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="inductor on CPU needs a C++ compiler"
)


def settings(**changes: Any) -> FastSettings:
    base = {"quantization": "off", "compile": True, "compile_backend": "inductor", "lora_rank": 64}
    return FastSettings(**{"compile_cache_dir": None, "standard_compile": True, **base, **changes})


def test_the_file_is_named_by_what_its_validity_depends_on() -> None:
    name = artifacts_name(settings(), torch.device("cpu"), torch.bfloat16)
    assert name.startswith("cpu-") and name.endswith(SUFFIX)
    assert f"torch{torch.__version__}".replace("+", "_") in name
    assert torch.backends.cpu.get_cpu_capability() in name
    others = [
        settings(compile_backend="aot_eager"),
        settings(standard_lora_rank=64),
        settings(lora_rank=128),
        settings(fast_lora="merged"),
        settings(quantization="int8-weight-only"),
        settings(standard_compile=False),
    ]
    names = {artifacts_name(other, torch.device("cpu"), torch.bfloat16) for other in others}
    names.add(artifacts_name(settings(), torch.device("cpu"), torch.float32))
    assert name not in names and len(names) == len(others) + 1


def test_a_missing_corrupt_or_foreign_file_is_skipped_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / artifacts_name(settings(), torch.device("cpu"), torch.bfloat16)
    (tmp_path / f"NVIDIA_H100-cuda12.8-torch2.13.0-0123456789ab{SUFFIX}").write_bytes(b"from another setup")
    with caplog.at_level(logging.INFO):
        assert load_artifacts(path) is False
    assert f"Compile cache: no {path}; compiling from the start." in caplog.text
    assert "Compile cache: skipping 1 file(s) made for another setup (NVIDIA_H100-cuda12.8" in caplog.text
    path.write_bytes(b"\x00not a cache\xff" * 10)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert load_artifacts(path) is False
    assert f"Compile cache: skipping {path}, which cannot be loaded (" in caplog.text


def test_a_folder_that_cannot_take_the_file_is_logged_and_left_clean(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"artifacts", None))
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with caplog.at_level(logging.INFO):
        assert save_artifacts(blocked / "cache.bin") is False
    assert f"Compile cache: could not write {blocked / 'cache.bin'}" in caplog.text
    assert save_artifacts(tmp_path / "cache" / "cache.bin") is True
    assert (tmp_path / "cache" / "cache.bin").read_bytes() == b"artifacts"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["cache.bin"]  # no partial file left


def warm_cache(cache_dir: Path, **extra: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    models = ensure_demo_models(DEMO_MODEL_FOLDER)
    env = script_env(cache_dir.parent / "lora-cache", **demo_model_env(models), **INDUCTOR, **extra)
    env["FLUX_COMPILE_CACHE_DIR"] = str(cache_dir)
    run = subprocess.run(
        [str(REPO / "script" / "warm-cache")], env=env, capture_output=True, text=True, timeout=600, cwd=REPO
    )
    lines = run.stdout.strip().splitlines()
    return run, json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}


@needs_a_compiler
def test_a_second_setup_loads_the_file_and_compiles_nothing_new(tmp_path: Path) -> None:
    first, made = warm_cache(tmp_path / "first")
    assert first.returncode == 0, first.stderr[-3000:]
    assert made["written"] and not made["loaded"] and made["standard_path_compiled"]
    assert made["fxgraph_cache_miss"] > 0 and made["fxgraph_cache_hit"] == 0
    shipped = tmp_path / "shipped"  # the file alone, as an image carries it into a fresh container
    shipped.mkdir()
    shutil.copy(made["file"], shipped)
    second, used = warm_cache(shipped)
    assert second.returncode == 0, second.stderr[-3000:]
    assert used["loaded"] and not used["written"]
    assert (used["fxgraph_cache_hit"], used["fxgraph_cache_miss"]) == (made["fxgraph_cache_miss"], 0)
    assert used["graphs"] == made["graphs"]


TXT2IMG = ("-i", "prompt=a cat", "-i", "aspect_ratio=custom", "-i", "width=256", "-i", "height=256")
TXT2IMG += ("-i", "num_inference_steps=2", "-i", "output_format=png", "-i", "seed=3")


def predicted(folder: Path, *args: str, **env: str) -> tuple[str, bytes]:
    """script/predict in `folder`: its log, and the image it wrote."""
    folder.mkdir()
    run = run_predict(folder, *args, extra_env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stderr + run.stdout, (folder / "output.0.png").read_bytes()


@needs_a_compiler
def test_a_compiler_that_fails_leaves_the_server_running_eager(tmp_path: Path) -> None:
    """No working C++ compiler for inductor (the real failure, not a mock): setup logs why for the go_fast copy
    and for the standard path, and a go_fast request gets the bytes of a server that never compiled."""
    env = {**INDUCTOR, "CXX": "/bin/false", "FLUX_COMPILE_CACHE_DIR": str(tmp_path / "compile-cache")}
    env["FLUX_FAST_QUANTIZATION"] = "int8-weight-only"  # a go_fast copy too, whose warm-up fails first
    log, image = predicted(tmp_path / "failed", *TXT2IMG, "-i", "go_fast=true", **env)
    assert "go_fast: compiling the fast copy of dev failed (InductorError: InvalidCxxCompiler" in log
    assert "; its go_fast requests run the standard path." in log
    assert "Standard path: compiling failed (InductorError: InvalidCxxCompiler" in log
    assert "; it runs eager." in log
    _, plain = predicted(tmp_path / "plain", *TXT2IMG)
    assert image == plain


def test_fp8_refused_by_the_hardware_leaves_go_fast_on_the_standard_path(tmp_path: Path) -> None:
    """torchao's own refusal of dynamic fp8 on a machine without it (here: a CPU), at quantize time: setup
    goes on, and a go_fast request gets the standard path's bytes."""
    bf16 = {"FLUX_DTYPE": "bfloat16", "FLUX_COMPILE_CACHE_DIR": str(tmp_path / "compile-cache")}
    log, image = predicted(
        tmp_path / "refused", *TXT2IMG, "-i", "go_fast=true", FLUX_FAST_QUANTIZATION="float8-dynamic", **bf16
    )
    assert "go_fast: building the fast copy of dev failed (AssertionError: " in log
    assert "go_fast: no model has a fast copy (the setup log says why); running the standard path." in log
    _, plain = predicted(tmp_path / "plain", *TXT2IMG, **bf16)
    assert image == plain


def test_without_a_setting_inductor_keeps_its_caches_beside_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """So that script/warm-cache leaves both in flux-weights/compile-cache/ for the image; a folder that cannot
    be written leaves inductor where it was, with a log line."""
    import engine.compile_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "before"))
    monkeypatch.setattr(engine.compile_cache, "WEIGHTS_FOLDER", tmp_path / "weights")
    engine.compile_cache.keep_inductor_caches_beside(settings())
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "weights" / "compile-cache")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "before"))
    engine.compile_cache.keep_inductor_caches_beside(settings(compile_cache_dir=str(tmp_path / "chosen")))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "before")  # the setting's own, set elsewhere
    (tmp_path / "blocked").write_text("a file where the folder would go")
    monkeypatch.setattr(engine.compile_cache, "WEIGHTS_FOLDER", tmp_path / "blocked")
    with caplog.at_level(logging.INFO):
        engine.compile_cache.keep_inductor_caches_beside(settings())
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "before")
    assert "cannot be written; inductor keeps its caches in a temporary folder." in caplog.text
