"""What `cog build` sends to Docker and copies into the image: code and weights only.

cog's generated Dockerfile does `COPY . /src` over the whole project folder, filtered only by
.dockerignore (cog never reads .gitignore). The context is computed here by docker-py's
`exclude_paths`, an implementation of Docker's own .dockerignore rules, not by ours.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from docker.utils.build import exclude_paths

REPO = Path(__file__).resolve().parents[1]
WEIGHTS_FOLDER = "flux-weights"
# What the image must hold for predict.py to run: the request path and its configuration.
RUNTIME = {"cog.yaml", "requirements.txt", "predict.py", "errors.py", "weights.py", "downloads.py", "model_weights.py"}
RUNTIME_PACKAGES = ("engine", "lora_loading", "safety")
MAX_CONTEXT_BYTES = 2 * 1024**2


def dockerignore_patterns(root: Path) -> list[str]:
    """As docker-py's `APIClient.build` reads the file: stripped lines, no blanks or comments."""
    lines = (root / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def build_context(root: Path) -> set[str]:
    """The files COPY . /src puts in the image. Docker sends .dockerignore itself to the
    daemon whatever it says (docker-py's exclude_paths lists it), but COPY leaves it out."""
    sent = {path for path in exclude_paths(str(root), dockerignore_patterns(root)) if (root / path).is_file()}
    return sent - {".dockerignore"}


def tracked_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return [name for name in listed.decode().split("\0") if name and (REPO / name).is_file()]


def expected_code(files: list[str]) -> set[str]:
    return {
        name
        for name in files
        if name in RUNTIME or (name.startswith(tuple(f"{p}/" for p in RUNTIME_PACKAGES)) and name.endswith(".py"))
    }


@pytest.fixture(scope="module")
def project_with_clutter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tracked files, plus what a developer's folder holds after script/test and a weights download."""
    root = tmp_path_factory.mktemp("project")
    for name in tracked_files():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / name, root / name)
    clutter = [
        ".venv/lib/python3.11/site-packages/torch/__init__.py",
        ".venv/pyvenv.cfg",
        ".cache/demo-model/transformer/model.safetensors",
        ".git/HEAD",
        ".cog/openapi_schema.json",
        ".pytest_cache/v/cache/lastfailed",
        ".ruff_cache/0.17.5/123",
        ".whl/torch-2.13.0-cp311-linux_x86_64.whl",
        "engine/__pycache__/generate.cpython-311.pyc",
        "output.0.webp",
        "notes.txt",
        "secrets.env",
        "tests/scratch.py",
        f"{WEIGHTS_FOLDER}/dev/.cache/huggingface/download/transformer/config.json.metadata",
        f"{WEIGHTS_FOLDER}/dev.tar",
    ]
    for name in clutter:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    (root / WEIGHTS_FOLDER / "dev" / "model_index.json").write_text("{}")
    (root / WEIGHTS_FOLDER / "dev" / "transformer").mkdir()
    (root / WEIGHTS_FOLDER / "dev" / "transformer" / "model.safetensors").write_bytes(b"w" * 1000)
    return root


def test_the_context_is_the_runtime_code_and_the_weights_folder(project_with_clutter: Path) -> None:
    context = build_context(project_with_clutter)
    weights = {f"{WEIGHTS_FOLDER}/dev/model_index.json", f"{WEIGHTS_FOLDER}/dev/transformer/model.safetensors"}
    assert context == expected_code(tracked_files()) | weights


def test_the_real_folder_sends_only_tracked_code_and_stays_small() -> None:
    """This checkout as it is (with .venv, .cache and .git after script/test)."""
    context = build_context(REPO)
    weights = {name for name in context if name.startswith(f"{WEIGHTS_FOLDER}/")}
    code = context - weights
    assert code == expected_code(tracked_files())
    size = sum((REPO / name).stat().st_size for name in code)
    assert size < MAX_CONTEXT_BYTES, f"{len(code)} files, {size} bytes"


def test_the_image_code_imports_on_its_own(tmp_path: Path) -> None:
    """predict.py loads from the context alone: nothing the image lacks (tooling/, tests/) is imported."""
    for name in build_context(REPO):
        if not name.startswith(f"{WEIGHTS_FOLDER}/"):
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(REPO / name, tmp_path / name)
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import predict; print(predict.Predictor.__name__, predict.TrainedLoraPredictor.__name__)",
        ],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.split() == ["Predictor", "TrainedLoraPredictor"]
