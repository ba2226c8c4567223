"""The attention kernel chosen at setup (engine/attention.py): by compute capability and a probe against the
default, falling back on any error or mismatch. The GPU's capability and the probe's outcome are injected;
the probe itself runs for real on CPU, where cuDNN's attention fails as it would on a GPU without it."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import torch

from engine.attention import PROBE_BOUND, choose_attention, probe
from tests.conftest import fast, image_of, make_predictor, predictor_env

CUDA = torch.device("cuda")


def probes(outcomes: dict[str, float | Exception]) -> Any:
    def run(backend: str, device: torch.device) -> float:
        outcome = outcomes[backend]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    return run


def test_auto_keeps_sdpa_off_hopper(caplog: pytest.LogCaptureFixture) -> None:
    never = probes({})
    with caplog.at_level(logging.INFO):
        assert choose_attention(torch.device("cpu"), "auto", run_probe=never) is None
        assert choose_attention(CUDA, "auto", capability=(8, 9), run_probe=never) is None
    assert "FA3 and cuDNN attention are for CUDA GPUs" in caplog.text
    assert "chosen on compute capability 9.0+, and this GPU has 8.9" in caplog.text


def test_auto_on_hopper_takes_the_first_candidate_that_runs_and_agrees(caplog: pytest.LogCaptureFixture) -> None:
    missing = RuntimeError("Flash Attention 3 backend '_flash_3' is not usable because of missing package")
    with caplog.at_level(logging.INFO):
        assert choose_attention(CUDA, "auto", (9, 0), probes({"_flash_3": 0.003, "_native_cudnn": 0.002})) == "_flash_3"
        assert choose_attention(CUDA, "auto", (9, 0), probes({"_flash_3": missing, "_native_cudnn": 0.002})) == (
            "_native_cudnn"
        )
    assert "Attention: _flash_3 did not run (RuntimeError: Flash Attention 3 backend '_flash_3' is not usable" in (
        caplog.text
    )
    assert "Attention: _native_cudnn (probed: 0.002 from the default, relative RMS)." in caplog.text


@pytest.mark.parametrize("wrong", [0.05, float("nan")])
def test_a_kernel_that_disagrees_with_the_default_is_not_used(wrong: float, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        assert choose_attention(CUDA, "auto", (9, 0), probes({"_flash_3": wrong, "_native_cudnn": wrong})) is None
    assert f"differs from the default by {wrong:.2g} (RMS, relative; the bound is {PROBE_BOUND:g}); not used." in (
        caplog.text
    )
    assert caplog.text.rstrip().endswith("Attention: SDPA, diffusers' default.")


def test_sdpa_setting_probes_nothing() -> None:
    assert choose_attention(CUDA, "sdpa", (9, 0), probes({})) is None


def test_the_real_probe_on_cpu(caplog: pytest.LogCaptureFixture) -> None:
    """torch's math kernel agrees with SDPA within the bound; cuDNN's attention does not run on a CPU, and
    FA3's package is not installed: each is refused with torch's or diffusers' own sentence."""
    assert probe("_native_math", torch.device("cpu")) < PROBE_BOUND
    with caplog.at_level(logging.INFO):
        assert choose_attention(torch.device("cpu"), "_native_cudnn") is None
        assert choose_attention(torch.device("cpu"), "_flash_3") is None
        assert choose_attention(torch.device("cpu"), "_native_math") == "_native_math"
    assert "Attention: _native_cudnn did not run (RuntimeError: No viable backend for scaled_dot_product_attention" in (
        caplog.text
    )
    assert "Attention: _flash_3 did not run (RuntimeError: Flash Attention 3 backend '_flash_3' is not usable" in (
        caplog.text
    )


def test_the_chosen_kernel_runs_both_transformers(
    demo_models: Any, predictor: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    # set_attention_backend also sets diffusers' process-wide default, which the other tests' models use.
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend)
    env = {"FLUX_ATTENTION": "_native_math", "FLUX_FAST_QUANTIZATION": "int8-weight-only", "FLUX_COMPILE": "0"}
    chosen = make_predictor(predictor_env(demo_models, tmp_path / "lora-cache", **env))
    model = chosen.engine.models["dev"]
    for transformer in (model.text_to_image.transformer, model.fast_pipelines["txt2img"].transformer):
        assert transformer.transformer_blocks[0].attn.processor._attention_backend == "_native_math"

    def pixels(predictor: Any, **inputs: Any) -> np.ndarray:
        return np.asarray(image_of(fast(predictor, prompt="a cat", output_format="png", **inputs)[0]), np.float32)

    # Another kernel, the same image up to its rounding: far closer than another seed; go_fast with it too,
    # up to int8's rounding.
    default = pixels(predictor)
    another_seed = np.abs(pixels(predictor, seed=8) - default).mean()
    assert np.abs(pixels(chosen) - default).mean() < 0.05 * another_seed
    assert np.abs(pixels(chosen, go_fast=True) - pixels(chosen)).mean() < 0.25 * another_seed
