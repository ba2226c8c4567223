"""Request validation: every bad input is one sentence naming the input, the value and what
is accepted; good inputs resolve to the right mode and size. No model is needed."""

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from engine.inputs import LoraRequest, Mode, input_contract, parse_request
from errors import InputError
from predict import Inputs, Predictor

CONTRACT = input_contract(Predictor.predict, Inputs)


def parse(**values: Any) -> Any:
    return parse_request(CONTRACT, **values)


def save_image(path: Path, size: tuple[int, int], mode: str = "RGB", color: object = (10, 200, 30)) -> Path:
    Image.new(mode, size, color).save(path)
    return path


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"num_outputs": 5}, "Invalid num_outputs 5: expected an integer from 1 to 4."),
        ({"num_outputs": 0}, "Invalid num_outputs 0: expected an integer from 1 to 4."),
        ({"num_outputs": True}, "Invalid num_outputs True: expected an integer from 1 to 4."),
        ({"num_outputs": "2"}, "Invalid num_outputs '2': expected an integer from 1 to 4."),
        ({"num_inference_steps": 51}, "Invalid num_inference_steps 51: expected an integer from 1 to 50."),
        ({"guidance_scale": 10.5}, "Invalid guidance_scale 10.5: expected a number from 0 to 10."),
        ({"guidance_scale": float("nan")}, "Invalid guidance_scale nan: expected a number from 0 to 10."),
        ({"prompt_strength": -0.1}, "Invalid prompt_strength -0.1: expected a number from 0 to 1."),
        ({"lora_scale": 3.5}, "Invalid lora_scale 3.5: expected a number from -1 to 3."),
        ({"extra_lora_scale": -2}, "Invalid extra_lora_scale -2: expected a number from -1 to 3."),
        ({"output_quality": 101}, "Invalid output_quality 101: expected an integer from 0 to 100."),
        ({"seed": -1}, "Invalid seed -1: expected an integer from 0 to 18446744073709551615."),
        ({"seed": 1.5}, "Invalid seed 1.5: expected an integer from 0 to 18446744073709551615."),
        ({"aspect_ratio": "2:1"}, "Invalid aspect_ratio '2:1': expected one of 1:1, 16:9, 21:9, 3:2, 2:3, 4:5, 5:4,"),
        ({"megapixels": "2"}, "Invalid megapixels '2': expected one of 1, 0.25."),
        ({"model": "pro"}, "Invalid model 'pro': expected one of dev, schnell."),
        ({"output_format": "gif"}, "Invalid output_format 'gif': expected one of webp, jpg, png."),
        ({"go_fast": "yes"}, "Invalid go_fast 'yes': expected true or false."),
        ({"disable_safety_checker": 1}, "Invalid disable_safety_checker 1: expected true or false."),
        ({"width": 100, "aspect_ratio": "custom"}, "Invalid width 100: expected an integer from 256 to 1440."),
        ({"height": 2000}, "Invalid height 2000: expected an integer from 256 to 1440."),
        ({"aspect_ratio": "custom", "height": 512}, "Invalid width None: aspect_ratio is custom, so width and height"),
        ({"aspect_ratio": "custom", "width": 512}, "Invalid height None: aspect_ratio is custom, so width and height"),
        ({"extra_lora": 5}, "Invalid extra_lora 5: expected a string."),
        ({"prompt": None}, "Invalid prompt None: expected a string."),
    ],
)
def test_bad_values_are_named_with_what_is_accepted(inputs: dict, message: str) -> None:
    with pytest.raises(InputError) as caught:
        parse(**{"prompt": "a cat", **inputs})
    assert str(caught.value).startswith(message)


def test_long_values_are_shortened_in_messages() -> None:
    with pytest.raises(InputError) as caught:
        parse(prompt="x", model="m" * 500)
    assert len(str(caught.value)) < 200


def test_defaults_give_a_one_megapixel_square() -> None:
    request = parse(prompt="a cat")
    assert (request.mode, request.width, request.height) == (Mode.TEXT_TO_IMAGE, 1024, 1024)
    assert request.loras == () and request.seed is None


def test_integral_floats_from_json_count_as_integers() -> None:
    assert parse(prompt="a", num_outputs=2.0, seed=3.0).num_outputs == 2


def test_width_and_height_are_ignored_unless_custom() -> None:
    request = parse(prompt="a", aspect_ratio="16:9", width=512, height=512)
    assert (request.width, request.height) == (1344, 768)


def test_custom_size_is_rounded() -> None:
    request = parse(prompt="a", aspect_ratio="custom", width=300, height=1000)
    assert (request.width, request.height) == (304, 1008)


def test_image_makes_img2img_at_the_image_size(tmp_path: Path) -> None:
    image = save_image(tmp_path / "in.png", (3000, 1500))
    request = parse(prompt="a", image=image, aspect_ratio="custom", width=256, height=256)
    assert (request.mode, request.width, request.height) == (Mode.IMAGE_TO_IMAGE, 1440, 720)
    assert request.image is not None and request.image.mode == "RGB"


def test_image_and_mask_make_inpainting_and_the_mask_follows_the_image(tmp_path: Path) -> None:
    image = save_image(tmp_path / "in.png", (320, 200), "RGBA", (1, 2, 3, 128))
    mask = save_image(tmp_path / "mask.png", (64, 40), "RGB", (255, 255, 255))
    request = parse(prompt="a", image=image, mask=mask)
    assert request.mode is Mode.INPAINTING
    assert (request.width, request.height) == (320, 208)
    assert request.mask is not None and request.mask.size == (320, 200) and request.mask.mode == "L"


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.new("RGB", (400, 200)).save(path, exif=exif)
    assert parse(prompt="a", image=path).image.size == (200, 400)


def test_a_string_path_is_not_read(tmp_path: Path) -> None:
    """cog passes a non-URL string through unchanged: it must not open server files."""
    image = save_image(tmp_path / "on-the-server.png", (64, 64))
    with pytest.raises(
        InputError, match=r"^Invalid image '/.*: expected an uploaded file or an http\(s\) or data: URL"
    ):
        parse(prompt="a", image=str(image))


def test_mask_without_image_is_refused(tmp_path: Path) -> None:
    mask = save_image(tmp_path / "mask.png", (64, 64), "L", 255)
    with pytest.raises(InputError, match="^Invalid mask: a mask was given without an image"):
        parse(prompt="a", mask=mask)


@pytest.mark.parametrize("content", [b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, b""])
def test_unreadable_images_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(InputError, match="^Invalid image: the file could not be read as an image"):
        parse(prompt="a", image=path)


def test_truncated_image_is_refused(tmp_path: Path) -> None:
    path = save_image(tmp_path / "full.png", (256, 256), color=(9, 9, 9))
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(InputError, match="^Invalid image: the file could not be read"):
        parse(prompt="a", image=path)


def test_prompt_strength_that_leaves_no_step_is_explained(tmp_path: Path) -> None:
    image = save_image(tmp_path / "in.png", (256, 256))
    with pytest.raises(InputError, match="^Invalid prompt_strength 0.03: with num_inference_steps=28 it leaves no"):
        parse(prompt="a", image=image, prompt_strength=0.03)
    # Without an image, prompt_strength plays no part.
    assert parse(prompt="a", prompt_strength=0.0).mode is Mode.TEXT_TO_IMAGE


def test_loras_are_named_by_their_input_and_blank_means_none() -> None:
    request = parse(prompt="a", replicate_weights=" https://x/a.safetensors ", extra_lora="", lora_scale=-1)
    assert request.loras == (LoraRequest("replicate_weights", "https://x/a.safetensors", -1.0),)
    settings = parse(prompt="a", replicate_weights="/l.safetensors", main_lora_input="FLUX_MAIN_LORA")
    assert settings.loras[0].input_name == "FLUX_MAIN_LORA"


def test_every_choice_the_contract_offers_has_its_behaviour() -> None:
    """Choices live only in predict.py; the engine's tables keyed by them must cover each one."""
    from engine.outputs import PIL_FORMATS
    from engine.sizes import ASPECT_RATIO_SIZES

    assert CONTRACT["aspect_ratio"].choices == [*ASPECT_RATIO_SIZES, "custom"]
    assert CONTRACT["output_format"].choices == list(PIL_FORMATS)
    for megapixels in CONTRACT["megapixels"].choices:
        for ratio, (width, height) in ASPECT_RATIO_SIZES.items():
            request = parse(prompt="a", aspect_ratio=ratio, megapixels=megapixels)
            divisor = {"1": 1, "0.25": 2}[megapixels]
            assert (request.width, request.height) == (width // divisor, height // divisor)
