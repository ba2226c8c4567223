"""script/download-weights: FLUX.1 [dev], [schnell] and the safety models from the Hugging Face Hub into
flux-weights/, once, with your HF_TOKEN.

`cog build`/`cog push` then put that folder in the image (.dockerignore lets it through, git ignores it),
and setup() loads it: a hosted container needs no token. With --tar, each model is also written as one
.tar (its files at the root), to host yourself and name in FLUX_*_WEIGHTS instead of shipping them in
the image. huggingface_hub does the downloading: it resumes, checks and reads the Hub's Xet storage.
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
from pathlib import Path

from engine.config import (
    DEFAULT_DEV_WEIGHTS,
    DEFAULT_NSFW_CLASSIFIER_WEIGHTS,
    DEFAULT_SAFETY_CHECKER_WEIGHTS,
    DEFAULT_SCHNELL_WEIGHTS,
    WEIGHTS_FOLDER,
)

# What setup() reads of each repository: FLUX.1-dev's diffusers folders, not the single-file
# checkpoints beside them (another 34 GB); only schnell's transformer and scheduler, as schnell
# borrows dev's encoders and VAE.
DIFFUSERS_DEV = ["model_index.json", *(f"{part}/*" for part in ("scheduler", "text_encoder", "text_encoder_2"))]
DIFFUSERS_DEV += [f"{part}/*" for part in ("tokenizer", "tokenizer_2", "transformer", "vae")]
MODELS: dict[str, tuple[str, list[str] | None]] = {
    "dev": (DEFAULT_DEV_WEIGHTS, DIFFUSERS_DEV),
    "schnell": (DEFAULT_SCHNELL_WEIGHTS, ["model_index.json", "scheduler/*", "transformer/*"]),
    "safety-checker": (DEFAULT_SAFETY_CHECKER_WEIGHTS, None),  # None: its configs and its weights
    "nsfw-classifier": (DEFAULT_NSFW_CLASSIFIER_WEIGHTS, None),
}


def weight_patterns(repo: str, token: str | None) -> list[str]:
    """Configs, plus safetensors weights where the repository has them (else its .bin files)."""
    from huggingface_hub import model_info

    names = [sibling.rfilename for sibling in model_info(repo, token=token).siblings or []]
    weights = "*.safetensors" if any(name.endswith(".safetensors") for name in names) else "*.bin"
    return ["*.json", "*.txt", weights]


def download(name: str, destination: Path, token: str | None) -> Path:
    from huggingface_hub import snapshot_download

    repo, patterns = MODELS[name]
    target = destination / name
    print(f"{repo} -> {target}", file=sys.stderr)
    snapshot_download(repo, allow_patterns=patterns or weight_patterns(repo, token), local_dir=target, token=token)
    return target


def write_tar(folder: Path) -> Path:
    """`folder`'s files at the tar's root, without huggingface_hub's own bookkeeping (.cache/)."""
    archive = folder.with_suffix(".tar")
    with tarfile.open(archive, "w") as tar:
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder)
            if path.is_file() and relative.parts[0] != ".cache":
                tar.add(path, arcname=str(relative))
    return archive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="script/download-weights", description=__doc__)
    parser.add_argument("models", nargs="*", metavar="MODEL", help=f"any of {', '.join(MODELS)} (default: all)")
    parser.add_argument("--dest", type=Path, default=WEIGHTS_FOLDER, help="default: flux-weights/ in the project")
    parser.add_argument("--tar", action="store_true", help="also write <model>.tar beside each folder, to host")
    args = parser.parse_args(argv)
    unknown = [name for name in args.models if name not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}: choose from {', '.join(MODELS)}")
    token = os.environ.get("HF_TOKEN") or None
    from huggingface_hub.errors import HfHubHTTPError

    for name in args.models or list(MODELS):
        repo = MODELS[name][0]
        try:
            folder = download(name, args.dest, token)
        except HfHubHTTPError as error:
            status = error.response.status_code if error.response is not None else None
            if status in (401, 403):  # gated (FLUX.1-dev), or a token that may not read it
                print(
                    f"Error: {repo} refused the download (HTTP {status}): accept its license at "
                    f"https://huggingface.co/{repo} and set HF_TOKEN to a token of that account.",
                    file=sys.stderr,
                )
            else:
                print(f"Error: downloading {repo} failed (HTTP {status}).", file=sys.stderr)
            return 1
        if args.tar:
            print(f"Written {write_tar(folder)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
