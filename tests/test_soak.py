"""A short soak in the suite (bench/soak.py runs the long one): a mix of modes, sizes,
formats and valid and invalid LoRAs leaves no temporary files, keeps the LoRA cache in
its bound and the reference request's bytes unchanged."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.soak import REFERENCE, Soak, temporary_files

SOAK_SETTINGS = (
    "FLUX_DEV_WEIGHTS",
    "FLUX_SCHNELL_WEIGHTS",
    "FLUX_SAFETY_CHECKER_WEIGHTS",
    "FLUX_NSFW_CLASSIFIER_WEIGHTS",
    "FLUX_DEVICE",
    "FLUX_LORA_CACHE_DIR",
    "FLUX_LORA_CACHE_BYTES",
)


@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Soak]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "tempdir", tempfile.tempdir)
        # Soak writes the predictor's settings into os.environ: setting them here first
        # makes the context restore them afterwards.
        for name in SOAK_SETTINGS:
            patch.setenv(name, "")
        runner = Soak(tmp_path_factory.mktemp("soak"))
        yield runner
        runner.host.close()


def test_a_mixed_run_leaks_nothing(soak: Soak) -> None:
    reference = soak.run(REFERENCE)
    before = temporary_files()
    cycle = soak.cycle()
    results = [soak.run(next(cycle)) for _ in range(28)]
    assert [index for index, result in enumerate(results) if result is None] == [6, 13, 20, 27]
    output_folder = str(soak.predictor.engine.output_folder)
    assert {path for path in temporary_files() - before if not path.startswith(output_folder)} == set()
    assert 0 < soak.cache_bytes() <= soak.cache_bound
    assert soak.run(REFERENCE) == reference
    assert not list(Path(soak.cache_dir).glob("*.part"))
