"""Prediction logs: Cog streams the worker's stdout to the caller, so log there, plainly."""

from __future__ import annotations

import logging
import sys

from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

# Libraries whose INFO lines are noise (or could echo request URLs) in a prediction's log.
QUIET_LOGGERS = ("httpx", "httpcore", "urllib3", "huggingface_hub", "filelock")


def configure_logging(level: int = logging.INFO) -> None:
    root = logging.getLogger()
    if not any(getattr(handler, "_flux_handler", False) for handler in root.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._flux_handler = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # Loading progress bars and dtype notices from the libraries would bury our own lines.
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
