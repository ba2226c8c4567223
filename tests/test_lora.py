"""LoRA semantics on the tiny models: applied exactly once, stackable, exactly removable,
all-or-nothing, separate per model, and fetched safely."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from diffusers import FluxTransformer2DModel

from errors import InputError
from tests.conftest import data_uri, fast, make_predictor, predictor_env
from tests.fake_hosts import FakeHost, start_fake_host
from tests.lora_factory import another_models_lora, make_peft_lora


@pytest.fixture(scope="module")
def base_transformer(demo_models: Any) -> FluxTransformer2DModel:
    return FluxTransformer2DModel.from_pretrained(demo_models.dev, subfolder="transformer")


@pytest.fixture(scope="module")
def loras(base_transformer: FluxTransformer2DModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("loras")
    return {
        "style": make_peft_lora(base_transformer, folder / "style.safetensors", seed=1),
        "other": make_peft_lora(base_transformer, folder / "other.safetensors", seed=2),
        "mlp": make_peft_lora(base_transformer, folder / "mlp.safetensors", seed=3, module_filter=_mlp_layers),
    }


def _mlp_layers(name: str, module: torch.nn.Linear) -> bool:
    return name.endswith(("ff.net.2", "proj_mlp"))


@pytest.fixture(scope="module")
def host() -> Iterator[FakeHost]:
    fake = start_fake_host()
    yield fake
    fake.close()


@pytest.fixture
def base(predictor: Any) -> list[bytes]:
    return fast(predictor, prompt="a cat", output_format="png")


def png(predictor: Any, **inputs: Any) -> list[bytes]:
    return fast(predictor, prompt="a cat", output_format="png", **inputs)


def test_lora_changes_the_image_and_no_lora_restores_it_exactly(predictor: Any, loras: dict, base: list) -> None:
    styled = png(predictor, replicate_weights=data_uri(loras["style"]))
    assert styled != base
    assert png(predictor) == base
    assert png(predictor, replicate_weights=data_uri(loras["style"])) == styled


def test_scale_zero_is_the_base_model(predictor: Any, loras: dict, base: list) -> None:
    assert png(predictor, replicate_weights=data_uri(loras["style"]), lora_scale=0) == base


def test_scale_is_applied_once_and_negative_subtracts(predictor: Any, loras: dict) -> None:
    png(predictor, replicate_weights=data_uri(loras["style"]), lora_scale=-0.5)
    transformer = predictor.engine.models["dev"].text_to_image.transformer
    layer = transformer.transformer_blocks[0].attn.to_q
    lora = safetensors.torch.load_file(str(loras["style"]))
    down = lora["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]
    up = lora["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"]
    x = torch.randn(3, down.shape[1])
    expected = layer.base_layer(x) + (-0.5) * (x @ down.T @ up.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_scale_change_reloads_nothing(predictor: Any, loras: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    source = data_uri(loras["style"])
    first = png(predictor, replicate_weights=source, lora_scale=1.0)
    pipeline = predictor.engine.models["dev"].text_to_image
    loads = []
    original = pipeline.load_lora_weights
    monkeypatch.setattr(pipeline, "load_lora_weights", lambda *a, **k: loads.append(1) or original(*a, **k))
    half = png(predictor, replicate_weights=source, lora_scale=0.5)
    assert loads == [] and half != first
    assert png(predictor, replicate_weights=source, lora_scale=1.0) == first


def test_extra_lora_stacks_and_applies_alone(predictor: Any, loras: dict, base: list) -> None:
    main_only = png(predictor, replicate_weights=data_uri(loras["style"]))
    extra_only = png(predictor, extra_lora=data_uri(loras["mlp"]))
    both = png(predictor, replicate_weights=data_uri(loras["style"]), extra_lora=data_uri(loras["mlp"]))
    assert len({bytes(b) for b in (base[0], main_only[0], extra_only[0], both[0])}) == 4
    extra_off = png(
        predictor, replicate_weights=data_uri(loras["style"]), extra_lora=data_uri(loras["mlp"]), extra_lora_scale=0
    )
    assert extra_off == main_only
    # Two LoRAs on the same layers stack as well.
    same_layers = png(predictor, replicate_weights=data_uri(loras["style"]), extra_lora=data_uri(loras["other"]))
    assert same_layers not in (main_only, png(predictor, replicate_weights=data_uri(loras["other"])))


def test_same_lora_in_both_fields_is_applied_once(
    predictor: Any, loras: dict, caplog: pytest.LogCaptureFixture
) -> None:
    source = data_uri(loras["style"])
    once = png(predictor, replicate_weights=source, lora_scale=0.7)
    with caplog.at_level(logging.WARNING):
        twice = png(predictor, replicate_weights=source, lora_scale=0.7, extra_lora=source, extra_lora_scale=2.0)
    assert twice == once
    assert "extra_lora names the same LoRA as replicate_weights; it is applied once" in caplog.text


def test_a_lora_matching_no_layer_fails_and_changes_nothing(
    predictor: Any, loras: dict, base: list, tmp_path: Path
) -> None:
    path = tmp_path / "sdxl.safetensors"
    safetensors.torch.save_file(
        {"unet.down_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8), "unet.x.lora_B.weight": torch.zeros(8, 4)},
        str(path),
    )
    with pytest.raises(InputError, match=r"^Invalid extra_lora: this LoRA matches no FLUX.1 layer; first keys: unet\."):
        png(predictor, extra_lora=data_uri(path))
    assert png(predictor) == base


def test_a_lora_for_another_model_size_fails_and_changes_nothing(predictor: Any, loras: dict, tmp_path: Path) -> None:
    styled = png(predictor, replicate_weights=data_uri(loras["style"]))
    path = another_models_lora(tmp_path / "wide.safetensors")
    with pytest.raises(InputError, match=r"^Invalid extra_lora: tensor transformer\..* features where this FLUX.1"):
        png(predictor, replicate_weights=data_uri(loras["style"]), extra_lora=data_uri(path))
    # The main LoRA that loaded before the failure was removed too; asking again rebuilds it.
    assert png(predictor, replicate_weights=data_uri(loras["style"])) == styled


def test_dev_and_schnell_keep_their_own_lora_state(predictor: Any, loras: dict) -> None:
    schnell_base = png(predictor, model="schnell")
    png(predictor, replicate_weights=data_uri(loras["style"]))
    assert png(predictor, model="schnell") == schnell_base


def test_pickles_and_other_files_are_refused(predictor: Any, tmp_path: Path) -> None:
    path = tmp_path / "lora.bin"
    path.write_bytes(pickle.dumps({"transformer.x.lora_A.weight": [1.0]}))
    with pytest.raises(
        InputError, match=r"^Invalid replicate_weights 'data:application/octet-stream;base64,\.\.\.': the"
    ):
        png(predictor, replicate_weights=data_uri(path))


@pytest.mark.parametrize("source", ["/etc/passwd", "file:///etc/passwd", "ftp://example.com/a.safetensors"])
def test_request_inputs_may_not_read_local_files(predictor: Any, source: str) -> None:
    with pytest.raises(InputError, match="local paths and other schemes are not accepted in requests"):
        png(predictor, extra_lora=source)


def test_http_download_keeps_the_query_hides_it_and_caches(predictor: Any, loras: dict, host: FakeHost) -> None:
    body = loras["other"].read_bytes()

    def signed(handler: Any) -> tuple[int, dict, bytes]:
        return (200, {}, body) if handler.path.endswith("?sig=s3cr3t") else (403, {}, b"denied")

    host.routes["/signed/other.safetensors"] = signed
    url = host.url + "/signed/other.safetensors?sig=s3cr3t"
    first = png(predictor, replicate_weights=url)
    assert first == png(predictor, replicate_weights=data_uri(loras["other"]))
    png(predictor)
    assert png(predictor, replicate_weights=url) == first
    assert host.requests.count("/signed/other.safetensors?sig=s3cr3t") == 1  # the second came from the cache


@pytest.mark.parametrize(
    ("status", "message"),
    [(404, "not found (HTTP 404)"), (401, "access denied (HTTP 401)"), (500, "the server answered HTTP 500")],
)
def test_http_errors_are_explained_without_secrets(predictor: Any, host: FakeHost, status: int, message: str) -> None:
    url = host.serve(f"/err{status}.safetensors", b"no", status=status) + "?token=s3cr3t"
    with pytest.raises(InputError) as caught:
        png(predictor, extra_lora=url)
    assert message in str(caught.value) and str(caught.value).startswith("Invalid extra_lora")
    assert "s3cr3t" not in str(caught.value)


def test_an_html_page_is_not_a_lora(predictor: Any, host: FakeHost) -> None:
    url = host.serve("/page.safetensors", b"<html>Sign in</html>", headers={"Content-Type": "text/html"})
    with pytest.raises(InputError, match="the file is not a .safetensors file"):
        png(predictor, extra_lora=url)


def test_trained_lora_predictor_uses_flux_main_lora(
    demo_models: Any, loras: dict, tmp_path: Path, predictor: Any
) -> None:
    trained = make_predictor(
        predictor_env(demo_models, tmp_path / "cache", FLUX_MAIN_LORA=str(loras["style"])), "TrainedLoraPredictor"
    )
    expected = png(predictor, replicate_weights=data_uri(loras["style"]), lora_scale=0.5)
    assert png(trained, lora_scale=0.5) == expected


def test_trained_lora_predictor_needs_flux_main_lora(demo_models: Any, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="^FLUX_MAIN_LORA is not set"):
        make_predictor(predictor_env(demo_models, tmp_path / "cache"), "TrainedLoraPredictor")


def test_trained_lora_predictor_fails_setup_on_a_broken_lora(demo_models: Any, tmp_path: Path) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a lora")
    with pytest.raises(InputError, match="^Invalid FLUX_MAIN_LORA .*: the file is not a .safetensors file"):
        make_predictor(
            predictor_env(demo_models, tmp_path / "cache", FLUX_MAIN_LORA=str(broken)), "TrainedLoraPredictor"
        )


def test_after_many_swaps_no_lora_equals_a_server_that_never_loaded_one(
    predictor: Any, loras: dict, demo_models: Any, tmp_path: Path
) -> None:
    for name in ("style", "other", "mlp", "style"):
        png(predictor, replicate_weights=data_uri(loras[name]), extra_lora=data_uri(loras["mlp"]), lora_scale=0.3)
    fresh = make_predictor(predictor_env(demo_models, tmp_path / "cache"))
    assert png(predictor) == png(fresh)
    assert png(predictor, model="schnell") == png(fresh, model="schnell")
