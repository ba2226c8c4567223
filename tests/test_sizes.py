import pytest

from engine.sizes import ASPECT_RATIO_SIZES, custom_size, round_to_multiple, size_following_image, text_to_image_size


@pytest.mark.parametrize(
    ("ratio", "size"),
    [
        ("1:1", (1024, 1024)),
        ("16:9", (1344, 768)),
        ("21:9", (1536, 640)),
        ("3:2", (1216, 832)),
        ("2:3", (832, 1216)),
        ("4:5", (896, 1088)),
        ("5:4", (1088, 896)),
        ("3:4", (896, 1152)),
        ("4:3", (1152, 896)),
        ("9:16", (768, 1344)),
        ("9:21", (640, 1536)),
    ],
)
def test_one_megapixel_sizes_and_their_quarter(ratio: str, size: tuple[int, int]) -> None:
    assert text_to_image_size(ratio, "1") == size
    assert text_to_image_size(ratio, "0.25") == (size[0] // 2, size[1] // 2)
    assert all(side % 16 == 0 for side in text_to_image_size(ratio, "0.25"))


def test_table_has_every_ratio_of_the_contract() -> None:
    assert list(ASPECT_RATIO_SIZES) == ["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21"]


@pytest.mark.parametrize(
    ("value", "rounded"), [(256, 256), (263, 256), (264, 272), (1000, 1008), (1439, 1440), (1440, 1440), (3, 16)]
)
def test_round_to_nearest_multiple_of_16(value: int, rounded: int) -> None:
    assert round_to_multiple(value) == rounded


def test_custom_size_rounds_each_side() -> None:
    assert custom_size(300, 500) == (304, 496)


@pytest.mark.parametrize(
    ("image", "output"),
    [
        ((1024, 768), (1024, 768)),  # already fine: kept
        ((320, 200), (320, 208)),  # sides rounded to multiples of 16
        ((3000, 1500), (1440, 720)),  # longest side capped at 1440, aspect kept
        ((1500, 3000), (720, 1440)),
        ((2000, 2000), (1440, 1440)),
        ((100, 30), (96, 32)),  # small images are not upscaled
    ],
)
def test_size_following_image(image: tuple[int, int], output: tuple[int, int]) -> None:
    assert size_following_image(*image) == output
