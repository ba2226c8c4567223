"""Encoding images into the files a prediction returns."""

from __future__ import annotations

import shutil
from pathlib import Path

from PIL import Image

PIL_FORMATS = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}


def clear_folder(folder: Path) -> None:
    """Drop the previous prediction's files: Cog has read them by the time a new one starts."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def save_images(images: list[Image.Image], folder: Path, output_format: str, quality: int) -> list[Path]:
    paths = []
    for index, image in enumerate(images):
        path = folder / f"out-{index}.{output_format}"
        options: dict[str, object] = {}
        if output_format in ("webp", "jpg"):
            options["quality"] = quality
        image.save(path, format=PIL_FORMATS[output_format], **options)
        paths.append(path)
    return paths
