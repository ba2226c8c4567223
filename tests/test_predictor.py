"""The predictor end to end on the tiny FLUX models: modes, sizes, seeds, outputs, safety,
logs, and that a failed request leaves nothing behind."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image

from errors import InputError, UnsafeOutputError
from tests.conftest import FAST, fast, image_of, make_predictor, predictor_env, run


def write_image(path: Path, size: tuple[int, int], mode: str = "RGB", fill: Any = None) -> Path:
    if fill is None:
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    else:
        Image.new(mode, size, fill).save(path)
    return path


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(image_of(data).convert("RGB"), dtype=np.int16)


# Sizes and modes


@pytest.mark.parametrize("ratio", ["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21"])
def test_txt2img_quarter_megapixel_sizes(predictor: Any, ratio: str) -> None:
    from engine.sizes import ASPECT_RATIO_SIZES

    [data] = run(predictor, prompt="a cat", aspect_ratio=ratio, megapixels="0.25", num_inference_steps=1, seed=1)
    width, height = ASPECT_RATIO_SIZES[ratio]
    assert image_of(data).size == (width // 2, height // 2)


def test_txt2img_one_megapixel(predictor: Any) -> None:
    [data] = run(predictor, prompt="a cat", aspect_ratio="16:9", num_inference_steps=1, seed=1)
    assert image_of(data).size == (1344, 768)


def test_custom_size_is_rounded_to_16(predictor: Any) -> None:
    [data] = fast(predictor, prompt="a cat", width=300, height=260)
    assert image_of(data).size == (304, 256)


def test_img2img_follows_the_input_image(predictor: Any, tmp_path: Path) -> None:
    image = write_image(tmp_path / "in.png", (320, 200))
    [data] = fast(predictor, prompt="a cat", image=image, prompt_strength=0.5)
    assert image_of(data).size == (320, 208)


def test_img2img_prompt_strength_controls_how_much_of_the_image_survives(predictor: Any, tmp_path: Path) -> None:
    image = write_image(tmp_path / "in.png", (256, 256))
    original = pixels((tmp_path / "in.png").read_bytes())
    light = fast(
        predictor, prompt="a cat", image=image, prompt_strength=0.5, num_inference_steps=4, output_format="png"
    )
    heavy = fast(
        predictor, prompt="a cat", image=image, prompt_strength=1.0, num_inference_steps=4, output_format="png"
    )
    assert np.abs(pixels(light[0]) - original).mean() < np.abs(pixels(heavy[0]) - original).mean()


def test_inpainting_repaints_white_and_keeps_black(predictor: Any, tmp_path: Path) -> None:
    image = write_image(tmp_path / "in.png", (256, 256))
    mask = Image.new("L", (256, 256), 0)
    mask.paste(255, (128, 0, 256, 256))  # right half white: repaint it
    mask.save(tmp_path / "mask.png")
    common = {"image": image, "mask": tmp_path / "mask.png", "prompt_strength": 1.0, "output_format": "png"}
    first = pixels(fast(predictor, prompt="a red car", **common)[0])
    second = pixels(fast(predictor, prompt="a green forest at night", **common)[0])
    # The kept half's latents do not depend on the prompt and the repainted half's do. The
    # VAE decoder's attention sees the whole image, so the kept pixels still move a little.
    kept = np.abs(first[:, :96] - second[:, :96]).mean()
    repainted = np.abs(first[:, 160:] - second[:, 160:]).mean()
    assert kept < 2.0
    assert repainted > 10 * kept


def test_inpainting_mask_of_another_size_is_resized(predictor: Any, tmp_path: Path) -> None:
    image = write_image(tmp_path / "in.png", (320, 256))
    mask = write_image(tmp_path / "mask.png", (40, 32), "L", 255)
    [data] = fast(predictor, prompt="a cat", image=image, mask=mask)
    assert image_of(data).size == (320, 256)


def test_mask_without_image_fails_clearly(predictor: Any, tmp_path: Path) -> None:
    mask = write_image(tmp_path / "mask.png", (64, 64), "L", 255)
    with pytest.raises(InputError, match="mask was given without an image"):
        fast(predictor, prompt="a cat", mask=mask)


# Seeds and batching


def test_same_seed_same_bytes_and_other_seed_other_bytes(predictor: Any) -> None:
    assert fast(predictor, prompt="a cat", seed=5) == fast(predictor, prompt="a cat", seed=5)
    assert fast(predictor, prompt="a cat", seed=5) != fast(predictor, prompt="a cat", seed=6)


def test_no_seed_draws_one_and_logs_it(predictor: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        first = fast(predictor, prompt="a cat", seed=None)
    seed = int(re.search(r"seed (\d+)\.", caplog.text).group(1))
    assert 0 <= seed < 2**32
    assert fast(predictor, prompt="a cat", seed=seed) == first


def test_num_outputs_come_from_one_batched_call(predictor: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    transformer = predictor.engine.models["dev"].text_to_image.transformer
    batch_sizes = []
    original = transformer.forward

    def spy(*args: Any, **kwargs: Any) -> Any:
        batch_sizes.append(kwargs["hidden_states"].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(transformer, "forward", spy)
    outputs = fast(predictor, prompt="a cat", num_outputs=3, output_format="png")
    assert len(outputs) == 3 and len(set(outputs)) == 3
    assert batch_sizes == [3, 3]  # two steps, each over the whole batch


def test_matches_a_bare_diffusers_call_byte_for_byte(predictor: Any, demo_models: Any) -> None:
    ours = fast(predictor, prompt="a lighthouse", num_outputs=2, output_format="png", disable_safety_checker=True)
    bare = FluxPipeline.from_pretrained(demo_models.dev, dtype=torch.float32)
    bare.vae.enable_slicing()  # as the engine does, to bound decoding memory; batched decoding rounds differently
    images = bare(
        prompt="a lighthouse",
        width=256,
        height=256,
        num_inference_steps=2,
        guidance_scale=3.0,
        num_images_per_prompt=2,
        generator=torch.Generator("cpu").manual_seed(FAST["seed"]),
        max_sequence_length=512,
    ).images
    expected = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        expected.append(buffer.getvalue())
    assert ours == expected


# Models


def test_schnell_ignores_guidance_and_dev_does_not(predictor: Any) -> None:
    assert fast(predictor, prompt="a cat", model="schnell", guidance_scale=0) == fast(
        predictor, prompt="a cat", model="schnell", guidance_scale=10
    )
    assert fast(predictor, prompt="a cat", guidance_scale=0) != fast(predictor, prompt="a cat", guidance_scale=10)


def test_dev_and_schnell_differ_and_use_their_sequence_lengths(predictor: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    lengths = []
    for name in ("dev", "schnell"):
        pipeline = predictor.engine.models[name].text_to_image
        original = pipeline._get_t5_prompt_embeds

        def spy(*args: Any, _original: Any = original, **kwargs: Any) -> torch.Tensor:
            embeds = _original(*args, **kwargs)
            lengths.append(embeds.shape[1])
            return embeds

        monkeypatch.setattr(pipeline, "_get_t5_prompt_embeds", spy)
    assert fast(predictor, prompt="a cat", model="dev") != fast(predictor, prompt="a cat", model="schnell")
    assert lengths == [512, 256]  # and the prompt is encoded once per prediction


def test_models_share_text_encoders_and_vae_and_modes_share_the_transformer(predictor: Any) -> None:
    dev, schnell = predictor.engine.models["dev"], predictor.engine.models["schnell"]
    for component in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae"):
        assert getattr(dev.text_to_image, component) is getattr(schnell.text_to_image, component)
    assert dev.text_to_image.transformer is not schnell.text_to_image.transformer
    for model in (dev, schnell):
        assert len({id(pipeline.transformer) for pipeline in model.pipelines.values()}) == 1


# Outputs


@pytest.mark.parametrize(("output_format", "magic"), [("webp", b"RIFF"), ("jpg", b"\xff\xd8\xff"), ("png", b"\x89PNG")])
def test_output_formats(predictor: Any, output_format: str, magic: bytes) -> None:
    [data] = fast(predictor, prompt="a cat", output_format=output_format)
    assert data.startswith(magic)
    assert image_of(data).format == {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}[output_format]


@pytest.mark.parametrize("output_format", ["webp", "jpg"])
def test_output_quality_is_honoured_for_lossy_formats(predictor: Any, output_format: str) -> None:
    low = fast(predictor, prompt="a cat", output_format=output_format, output_quality=5)
    high = fast(predictor, prompt="a cat", output_format=output_format, output_quality=95)
    assert len(low[0]) < len(high[0])


def test_output_quality_does_not_change_png(predictor: Any) -> None:
    assert fast(predictor, prompt="a cat", output_format="png", output_quality=5) == fast(
        predictor, prompt="a cat", output_format="png", output_quality=95
    )


# Logs


def test_logs_show_mode_size_seed_steps_and_phase_timings(predictor: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        fast(predictor, prompt="a cat", num_inference_steps=3, seed=42)
    assert "Mode txt2img on dev: 256x256, 1 image(s), 3 steps, seed 42." in caplog.text
    assert [line for line in caplog.messages if line.startswith("Denoising step")] == [
        "Denoising step 1/3.",
        "Denoising step 2/3.",
        "Denoising step 3/3.",
    ]
    for phase in ("loading LoRAs", "text encoding", "denoising", "decoding", "safety check", "encoding files"):
        assert (
            len([line for line in caplog.messages if re.fullmatch(rf"Timing: {phase} took \d+\.\d{{3}} s\.", line)])
            == 1
        )


# Safety


@pytest.fixture(scope="module")
def unsafe_predictor(unsafe_demo_models: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return make_predictor(predictor_env(unsafe_demo_models, tmp_path_factory.mktemp("lora-cache")))


def test_images_both_models_flag_are_dropped_and_all_dropped_fails(unsafe_predictor: Any) -> None:
    with pytest.raises(UnsafeOutputError, match="All generated images were flagged as NSFW"):
        fast(unsafe_predictor, prompt="a cat", num_outputs=2)
    assert len(fast(unsafe_predictor, prompt="a cat", num_outputs=2, disable_safety_checker=True)) == 2


def test_only_images_the_classifier_confirms_are_dropped(predictor: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    safety = predictor.engine.safety
    monkeypatch.setattr(safety, "checker", lambda images, clip_input: (images, [True, True, False]))
    votes = iter([[0.0, 5.0], [5.0, 0.0]])  # image 0: nsfw; image 1: normal

    class Classifier:
        def __call__(self, pixel_values: torch.Tensor) -> Any:
            return type("Output", (), {"logits": torch.tensor([next(votes), next(votes)])})()

    monkeypatch.setattr(safety, "classifier", Classifier())
    outputs = fast(predictor, prompt="a cat", num_outputs=3, output_format="png")
    reference = fast(predictor, prompt="a cat", num_outputs=3, output_format="png", disable_safety_checker=True)
    assert outputs == reference[1:]


# Failures leave no trace


def test_a_failed_request_leaves_the_next_one_unchanged(predictor: Any, tmp_path: Path) -> None:
    reference = fast(predictor, prompt="a cat")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"nope")
    for bad in ({"num_outputs": 9}, {"image": broken}, {"aspect_ratio": "custom", "width": None}):
        with pytest.raises(InputError):
            fast(predictor, prompt="a cat", **bad)
    assert fast(predictor, prompt="a cat") == reference


def out_of_memory_once(
    load: Any, attempts: list[dict[str, Any]], counted: Callable[[dict[str, Any]], bool] = lambda kwargs: True
) -> Any:
    """`load`, except that the first counted call raises CUDA's out-of-memory error; each
    counted call's keyword arguments go into `attempts`."""

    def loading(*args: Any, **kwargs: Any) -> Any:
        if counted(kwargs):
            attempts.append(kwargs)
            if len(attempts) == 1:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return load(*args, **kwargs)

    return loading


def test_a_gpu_too_small_for_both_transformers_swaps_them(
    demo_models: Any, predictor: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import engine.pipelines

    attempts: list[dict[str, Any]] = []
    # The schnell transformer's first load fails; the dev pipeline's own loading is not counted.
    load = out_of_memory_once(
        engine.pipelines.FluxTransformer2DModel.from_pretrained,
        attempts,
        lambda kwargs: kwargs.get("subfolder") == "transformer",
    )
    monkeypatch.setattr(engine.pipelines.FluxTransformer2DModel, "from_pretrained", load)
    with caplog.at_level(logging.INFO):
        small = make_predictor(predictor_env(demo_models, tmp_path / "cache"))
    monkeypatch.undo()
    assert "Not enough GPU memory for both transformers: schnell stays in CPU memory" in caplog.text
    assert attempts[1]["device_map"] == "cpu"
    models = small.engine.models
    assert (models["dev"].resident, models["schnell"].resident) == (True, False)
    with caplog.at_level(logging.INFO):
        schnell = fast(small, prompt="a cat", model="schnell")
        dev = fast(small, prompt="a cat")
    assert (models["dev"].resident, models["schnell"].resident) == (True, False)
    assert "Timing: moving FLUX.1 schnell onto the GPU" in caplog.text
    assert schnell == fast(predictor, prompt="a cat", model="schnell")
    assert dev == fast(predictor, prompt="a cat")


def test_dtype_and_offload_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.config import Settings

    monkeypatch.setenv("FLUX_DEVICE", "cpu")
    monkeypatch.delenv("FLUX_DTYPE", raising=False)
    assert Settings.from_env().dtype == torch.float32
    monkeypatch.setenv("FLUX_DEVICE", "cuda")
    assert Settings.from_env().dtype == torch.bfloat16
    monkeypatch.setenv("FLUX_DTYPE", "float32")
    assert Settings.from_env().dtype == torch.float32
    monkeypatch.setenv("FLUX_DTYPE", "float16")
    with pytest.raises(ValueError, match=r"^FLUX_DTYPE='float16' is not supported: use one of bfloat16, float32\.$"):
        Settings.from_env()
    monkeypatch.setenv("FLUX_DTYPE", "bfloat16")
    assert Settings.from_env().offload == "auto"
    monkeypatch.setenv("FLUX_OFFLOAD", "sometimes")
    with pytest.raises(ValueError, match=r"^FLUX_OFFLOAD='sometimes' is not supported: use one of auto, on, off\.$"):
        Settings.from_env()


# GPUs too small for dev: offloading


def test_offload_moves_a_phase_in_and_back_home_even_when_it_fails() -> None:
    from engine.offload import Offload

    moves: list[tuple[str, str]] = []

    class Recorded(torch.nn.Module):
        def __init__(self, name: str):
            super().__init__()
            self.name = name

        def to(self, device: Any) -> Recorded:  # type: ignore[override]
            moves.append((self.name, str(device)))
            return self

    offload = Offload(torch.device("cuda"), enabled=True)
    with offload.running(transformer=Recorded("transformer"), vae=Recorded("vae"), image_encoder=None):
        assert moves == [("transformer", "cuda"), ("vae", "cuda")]
    assert moves[2:] == [("transformer", "cpu"), ("vae", "cpu")]
    with pytest.raises(RuntimeError), offload.running(text_encoder=Recorded("text_encoder")):
        raise RuntimeError("the phase failed")
    assert moves[4:] == [("text_encoder", "cuda"), ("text_encoder", "cpu")]
    with Offload(torch.device("cuda"), enabled=False).running(vae=Recorded("vae")):
        pass
    assert len(moves) == 6


def test_when_dev_does_not_fit_the_models_stay_home_and_each_phase_visits_the_gpu(
    demo_models: Any, predictor: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import engine.pipelines

    attempts: list[dict[str, Any]] = []
    load = out_of_memory_once(engine.pipelines.FluxPipeline.from_pretrained, attempts)
    monkeypatch.setattr(engine.pipelines.FluxPipeline, "from_pretrained", load)
    with caplog.at_level(logging.INFO):
        small = make_predictor(predictor_env(demo_models, tmp_path / "cache"))
    monkeypatch.undo()
    assert "FLUX.1 dev does not fit on this GPU: the models stay in CPU memory" in caplog.text
    assert small.engine.offload.enabled and attempts[1]["device_map"] == "cpu"
    assert "go_fast: the models are offloaded to CPU memory (FLUX_OFFLOAD)" in caplog.text
    Image.new("RGB", (320, 200), (40, 90, 200)).save(tmp_path / "in.png")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        image_to_image = fast(small, prompt="a cat", image=tmp_path / "in.png")
    moved = [line.split(" onto ")[0] for line in caplog.messages if line.startswith("Offload: ")]
    assert moved == [
        "Offload: text_encoder, text_encoder_2",
        "Offload: transformer, vae",
        "Offload: vae",
        "Offload: safety_checker, nsfw_classifier",
    ]
    assert image_to_image == fast(predictor, prompt="a cat", image=tmp_path / "in.png")
    assert fast(small, prompt="a cat", model="schnell", go_fast=True) == fast(
        predictor, prompt="a cat", model="schnell"
    )


def test_offload_off_lets_a_gpu_that_is_too_small_fail_setup(
    demo_models: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import engine.pipelines

    def out_of_memory(*args: Any, **kwargs: Any) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(engine.pipelines.FluxPipeline, "from_pretrained", out_of_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        make_predictor(predictor_env(demo_models, tmp_path / "cache", FLUX_OFFLOAD="off"))


def test_the_model_choices_are_the_models_setup_loads(predictor: Any) -> None:
    assert predictor.contract["model"].choices == list(predictor.engine.models)
