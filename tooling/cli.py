"""`script/predict`: the `cog predict` experience without Docker, in this process.

    script/predict -i prompt="a photo of a cat" -i image=@photo.png -i num_outputs=2

Values are typed from predict()'s signature; `@path` names a file. Outputs are written to
the current folder as output.<n>.<ext>, as `cog predict` does.
"""

from __future__ import annotations

import argparse
import inspect
import os
import shutil
import sys
import types
import typing
from pathlib import Path
from typing import Any

import torch

from engine.config import WEIGHT_SETTINGS
from tooling.demo_model import demo_model_env, ensure_demo_models

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL_FOLDER = REPO / ".cache" / "demo-model"
DEMO_BANNER = """\
*** Offline demo model ***
No CUDA GPU and no FLUX_DEV_WEIGHTS here, so this runs a tiny FLUX with random weights,
built locally so that every code path runs offline. Its images are noise.
For real images, run on a CUDA GPU (the FLUX.1 weights download from Hugging Face; set
HF_TOKEN for the gated FLUX.1-dev), or point FLUX_DEV_WEIGHTS and FLUX_SCHNELL_WEIGHTS at
diffusers-format folders. FLUX_DEMO_MODEL=0 turns this fallback off."""


def use_demo_model_if_needed() -> bool:
    """Point the weight settings at the offline demo model when no real weights can run.

    FLUX_DEMO_MODEL=1 forces it and =0 forbids it; otherwise it is used on a machine with
    no CUDA GPU where no weights were configured.
    """
    choice = os.environ.get("FLUX_DEMO_MODEL", "")
    configured = any(os.environ.get(variable) for variable, _ in WEIGHT_SETTINGS.values())
    wanted = choice == "1" or (choice != "0" and not configured and not torch.cuda.is_available())
    if wanted:
        print(DEMO_BANNER, file=sys.stderr)
        os.environ.update(demo_model_env(ensure_demo_models(DEMO_MODEL_FOLDER)))
    return wanted


def default_inputs(predict: Any) -> dict[str, Any]:
    """predict()'s declared defaults: what Cog passes for inputs a request leaves out."""
    defaults = {}
    for name, parameter in inspect.signature(predict).parameters.items():
        declared = parameter.default
        defaults[name] = getattr(declared, "default", declared)
    return defaults


def _base_type(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    return annotation


def parse_inputs(predict: Any, pairs: list[str]) -> dict[str, Any]:
    hints = typing.get_type_hints(predict)
    inputs = {}
    for pair in pairs:
        name, separator, text = pair.partition("=")
        if not separator:
            raise SystemExit(f"Error: -i {pair!r} must look like name=value.")
        if name not in hints or name == "return":
            accepted = ", ".join(n for n in hints if n != "return")
            raise SystemExit(f"Error: unknown input {name!r}; the inputs are: {accepted}.")
        inputs[name] = _convert(name, text, _base_type(hints[name]))
    return inputs


def _convert(name: str, text: str, kind: Any) -> Any:
    if issubclass(kind, Path):
        return kind(text.removeprefix("@"))
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise SystemExit(f"Error: {name} must be true or false, not {text!r}.")
        return text.lower() in ("true", "1")
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise SystemExit(
                f"Error: {name} must be {'an integer' if kind is int else 'a number'}, not {text!r}."
            ) from None
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="script/predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "-i", "--input", action="append", default=[], metavar="NAME=VALUE", help="an input; @path for files"
    )
    parser.add_argument("-o", "--output-dir", type=Path, default=Path.cwd(), help="where outputs go (default: here)")
    parser.add_argument(
        "--predictor", default=os.environ.get("PREDICTOR", "Predictor"), help="Predictor or TrainedLoraPredictor"
    )
    args = parser.parse_args(argv)

    use_demo_model_if_needed()
    sys.path.insert(0, str(REPO))
    import predict as predict_module
    from errors import InputError, UnsafeOutputError

    predictor = getattr(predict_module, args.predictor)()
    inputs = {**default_inputs(predictor.predict), **parse_inputs(predictor.predict, args.input)}
    predictor.setup()
    try:
        outputs = predictor.predict(**inputs)
    except (InputError, UnsafeOutputError) as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for index, path in enumerate(outputs):
        target = args.output_dir / f"output.{index}{Path(path).suffix}"
        shutil.copyfile(path, target)
        print(f"Written {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
