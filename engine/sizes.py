"""Output sizes: the aspect-ratio table, custom sizes and sizes that follow an input image.

FLUX packs 2x2 latent patches and the VAE downsamples by 8, so every side must be a
multiple of 16.
"""

from __future__ import annotations

# The 1-megapixel size of each aspect ratio, as the published FLUX predictors use them; predict.py's
# aspect_ratio choices are these and "custom" (tests/test_sizes.py holds the two together).
ASPECT_RATIO_SIZES: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "16:9": (1344, 768),
    "21:9": (1536, 640),
    "3:2": (1216, 832),
    "2:3": (832, 1216),
    "4:5": (896, 1088),
    "5:4": (1088, 896),
    "3:4": (896, 1152),
    "4:3": (1152, 896),
    "9:16": (768, 1344),
    "9:21": (640, 1536),
}
SIDE_MULTIPLE = 16
MAX_IMAGE_SIDE = 1440


def round_to_multiple(value: float, multiple: int = SIDE_MULTIPLE) -> int:
    """Nearest multiple, halves rounding up, and never below one multiple."""
    return max(multiple, int(value / multiple + 0.5) * multiple)


def text_to_image_size(aspect_ratio: str, megapixels: str) -> tuple[int, int]:
    width, height = ASPECT_RATIO_SIZES[aspect_ratio]
    if megapixels == "0.25":
        # A quarter of the pixels is half of each side; every table entry stays a multiple of 16.
        return width // 2, height // 2
    return width, height


def custom_size(width: int, height: int) -> tuple[int, int]:
    return round_to_multiple(width), round_to_multiple(height)


def size_following_image(image_width: int, image_height: int) -> tuple[int, int]:
    """The input image's own size, scaled down (never up) so the longest side is at most
    1440, then each side rounded to a multiple of 16."""
    scale = min(1.0, MAX_IMAGE_SIDE / max(image_width, image_height))
    # 1440 is itself a multiple of 16, so rounding never pushes a side past it.
    return round_to_multiple(image_width * scale), round_to_multiple(image_height * scale)
