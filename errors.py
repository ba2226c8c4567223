"""The error types a prediction or setup can end with, below every module that raises them.

Each message is meant for the caller: one sentence naming the input or setting, the value
and what is accepted. Secrets never appear in them.
"""

from __future__ import annotations


class InputError(ValueError):
    """A request input that cannot be served."""


class LoraFormatError(InputError):
    """The file is not a LoRA this FLUX model can take."""


class LoraSourceError(InputError):
    """A LoRA reference that cannot be fetched; the message names the input."""


class WeightsError(RuntimeError):
    """Model weights a deployment setting names that cannot be fetched or used; fails setup."""


class UnsafeOutputError(RuntimeError):
    """Every image of a prediction was judged NSFW."""
