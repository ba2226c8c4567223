"""cog.yaml and the requirements agree with what the tests run, under cog's own resolver rules.

The rules are read in replicate/cog: `pkg/requirements/requirements.go`
(SplitPinnedPythonRequirement, whose pattern is copied below), `pkg/config/config.go`
(pythonPackageForArch: an index written on a requirement's own line wins over cog's torch
table) and `pkg/config/compatibility.go` (cudaVersionFromIndexURL: `cu(\\d{2,})`).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import cog
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
# requirements.SplitPinnedPythonRequirement's pattern, as in cog's Go source.
COG_PINNED = re.compile(
    r"(?:([a-zA-Z0-9\-_]+)==([^ ]+)|--find-links=([^\s]+)|-f\s+([^\s]+)|--extra-index-url=([^\s]+))"
)
COG_CUDA_FROM_INDEX = re.compile(r"cu(\d{2,})")


def config() -> dict:
    return yaml.safe_load((REPO / "cog.yaml").read_text())


def requirement_lines(name: str) -> list[str]:
    """Requirement lines as cog's ReadRequirements keeps them: no comments or blanks."""
    lines = [line.split("#", 1)[0].strip() for line in (REPO / name).read_text().splitlines()]
    return [line for line in lines if line]


def cog_reading(line: str) -> tuple[str, str, list[str]]:
    """(name, version, extra index URLs) as cog's SplitPinnedPythonRequirement reads a line."""
    name = version = ""
    indexes = []
    for match in COG_PINNED.finditer(line):
        name, version = match[1] or name, match[2] or version
        if match[5]:
            indexes.append(match[5])
    return name, version, indexes


def test_the_image_gets_the_sdk_the_tests_run() -> None:
    build = config()["build"]
    assert build["sdk_version"] == cog.__version__
    assert f"cog=={cog.__version__}" in requirement_lines("requirements-dev.txt")
    assert build["python_version"] == f"{sys.version_info.major}.{sys.version_info.minor}"


def test_the_image_gets_a_cuda_build_of_the_torch_the_tests_run() -> None:
    build = config()["build"]
    torch_lines = [line for line in requirement_lines("requirements.txt") if cog_reading(line)[0] == "torch"]
    assert len(torch_lines) == 1
    name, version, indexes = cog_reading(torch_lines[0])
    assert (name, version) == ("torch", torch.__version__.split("+")[0])
    assert build["gpu"] is True
    # cog derives the wheel's CUDA from the index it installs from, and that must be cog.yaml's.
    assert len(indexes) == 1
    digits = COG_CUDA_FROM_INDEX.search(indexes[0])
    assert digits, indexes
    assert f"{digits[1][:-1]}.{digits[1][-1]}" == build["cuda"]


def test_every_runtime_requirement_is_pinned_and_cog_manages_its_own() -> None:
    for line in requirement_lines("requirements.txt"):
        name, version, _ = cog_reading(line)
        assert name and version, f"{line!r} is not pinned with =="
        # cog removes cog and coglet from requirements and installs its own (filterManagedPackages).
        assert name.lower() not in ("cog", "coglet"), line
