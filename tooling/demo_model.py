"""Tiny random-weight FLUX models in the real on-disk formats, built offline.

The predictor, the test suite and ``script/predict`` load these with exactly the
same loaders they use for the real 24 GB checkpoints, so every code path past
"which folder?" is exercised on machines with no GPU, no weights and no network.
Nothing is downloaded: tokenizers are built from in-memory vocabularies and all
weights come from fixed seeds, so two builds on any machine give the same files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import string
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    # Imported lazily at runtime: reading demo_model_env or the paths should not
    # pay for importing diffusers and transformers.
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

# Bump whenever what is written changes: ensure_demo_models trusts a cached build
# only when its marker names this exact version.
DEMO_MODEL_VERSION = "1"

MARKER_NAME = "DEMO_MODEL_VERSION.json"

# Pooled CLIP output feeds pooled_projection_dim and the T5 states feed
# joint_attention_dim, so these two widths tie the encoders to the transformer.
_CLIP_WIDTH = 32
_T5_WIDTH = 32
_LATENT_CHANNELS = 4

# Cosine distances live in [-1, 1]; thresholds well outside that range make the
# safety checker's verdict independent of the (random) image embedding.
_NEVER_FLAG_THRESHOLD = 10.0
_ALWAYS_FLAG_THRESHOLD = -10.0
# The ViT's random classifier weights contribute logits of order 0.1, so a bias
# of this size decides the label for any image.
_VIT_LABEL_BIAS = 10.0

_SEEDS = {
    "text_encoder": 1,
    "text_encoder_2": 2,
    "vae": 3,
    "transformer_dev": 4,
    "transformer_schnell": 5,
    "safety_checker": 6,
    "nsfw_classifier": 7,
}


@dataclass(frozen=True)
class DemoModelPaths:
    dev: Path
    schnell: Path
    safety_checker: Path
    nsfw_classifier: Path


def _paths(root: Path) -> DemoModelPaths:
    return DemoModelPaths(
        dev=root / "dev",
        schnell=root / "schnell",
        safety_checker=root / "safety_checker",
        nsfw_classifier=root / "nsfw_classifier",
    )


def demo_model_env(paths: DemoModelPaths) -> dict[str, str]:
    return {
        "FLUX_DEV_WEIGHTS": str(paths.dev),
        "FLUX_SCHNELL_WEIGHTS": str(paths.schnell),
        "FLUX_SAFETY_CHECKER_WEIGHTS": str(paths.safety_checker),
        "FLUX_NSFW_CLASSIFIER_WEIGHTS": str(paths.nsfw_classifier),
    }


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    # Fork the RNG so building demo models never perturbs the caller's seeds
    # (tests that seed torch themselves would otherwise get different streams).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_clip_tokenizer() -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    # CLIP's BPE is byte-level: text becomes bytes, each shown as one of 256
    # printable stand-in characters. Like the real vocabulary, this one starts
    # with those 256 characters and their word-final ("</w>") forms, so with no
    # merges any prompt (accents, emoji) tokenizes without <unk>, one distinct
    # id per byte. An <unk> would matter: unk is <|endoftext|> here, and the
    # text model pools at the first <|endoftext|>.
    byte_chars = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for piece in byte_chars + [c + "</w>" for c in byte_chars]:
        vocab[piece] = len(vocab)
    # As in the real vocabulary the specials come last, so <|endoftext|> has the
    # largest id: CLIPTextModel pools at the first eos_token_id, and configs
    # with the legacy eos id pool at argmax(input_ids); both then agree.
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(
        vocab=vocab,
        merges=[],
        model_max_length=77,
        pad_token="<|endoftext|>",
    )


def _bytes_to_unicode() -> list[str]:
    # GPT-2/CLIP's byte table, in the real vocabulary's order: the printable
    # Latin-1 bytes stand for themselves, then the remaining bytes (whitespace,
    # controls) are shifted to code points from 256 up, in byte order.
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def build_t5_tokenizer() -> T5Tokenizer:
    from transformers import T5Tokenizer

    # Same ids for the specials as real T5 (pad 0, eos 1, unk 2). T5 is case
    # sensitive, so both cases are present; "▁x" pieces score higher than "▁"+"x"
    # so the unigram model prefers word-initial pieces, like a real SentencePiece.
    chars = list(string.ascii_letters + string.digits + string.punctuation)
    pieces: list[tuple[str, float]] = [
        ("<pad>", 0.0),
        ("</s>", 0.0),
        ("<unk>", 0.0),
        ("▁", -2.0),
    ]
    pieces += [("▁" + c, -3.0) for c in chars]
    pieces += [(c, -4.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _build_text_encoders(
    clip_vocab_size: int, clip_eos_id: int, t5_vocab_size: int
) -> tuple[CLIPTextModel, T5EncoderModel]:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with _seeded(_SEEDS["text_encoder"]):
        clip = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=clip_vocab_size,
                hidden_size=_CLIP_WIDTH,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=77,
                projection_dim=_CLIP_WIDTH,
                bos_token_id=clip_eos_id - 1,
                eos_token_id=clip_eos_id,
                pad_token_id=clip_eos_id,
            )
        )
    with _seeded(_SEEDS["text_encoder_2"]):
        # Gated GELU and untied embeddings, as in the T5 v1.1 XXL encoder FLUX uses.
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=t5_vocab_size,
                d_model=_T5_WIDTH,
                d_kv=8,
                d_ff=64,
                num_layers=1,
                num_heads=4,
                relative_attention_num_buckets=8,
                relative_attention_max_distance=32,
                feed_forward_proj="gated-gelu",
                tie_word_embeddings=False,
                pad_token_id=0,
                eos_token_id=1,
                decoder_start_token_id=0,
            )
        )
    return clip.eval(), t5.eval()


def _build_vae() -> AutoencoderKL:
    from diffusers import AutoencoderKL

    with _seeded(_SEEDS["vae"]):
        # Four levels so vae_scale_factor is 8, as in FLUX. FLUX's VAE has no
        # quant convs and uses these scaling/shift factors; keeping them means
        # the pipeline's latent normalisation runs the real arithmetic.
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            latent_channels=_LATENT_CHANNELS,
            norm_num_groups=4,
            sample_size=64,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    return vae.eval()


def _build_transformer(*, guidance_embeds: bool, seed: int) -> FluxTransformer2DModel:
    from diffusers import FluxTransformer2DModel

    with _seeded(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            # FLUX packs 2x2 latent patches into the channel axis.
            in_channels=_LATENT_CHANNELS * 4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=_T5_WIDTH,
            pooled_projection_dim=_CLIP_WIDTH,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 6, 6),
        )
        _make_prompt_sensitive(transformer)
    return transformer.eval()


def _make_prompt_sensitive(module: torch.nn.Module) -> None:
    # With PyTorch's default Linear init the AdaLN modulation gates come out
    # tiny, so the blocks barely touch the residual stream and the output is a
    # near-linear function of the latents that ignores the prompt (measured: a
    # prompt change moved the velocity by ~6% of its std). Variance-preserving
    # normal init makes prompt, seed and timestep all matter at a similar scale
    # without the activations blowing up.
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0.0, layer.in_features**-0.5)
                if layer.bias is not None:
                    layer.bias.normal_(0.0, 0.1)


def _build_schedulers() -> tuple[FlowMatchEulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    dev = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    schnell = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    return dev, schnell


def _save_flux_pipelines(dev_dir: Path, schnell_dir: Path) -> None:
    from diffusers import FluxPipeline

    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_t5_tokenizer()
    text_encoder, text_encoder_2 = _build_text_encoders(
        clip_vocab_size=len(tokenizer),
        clip_eos_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        t5_vocab_size=len(tokenizer_2),
    )
    vae = _build_vae()
    dev_scheduler, schnell_scheduler = _build_schedulers()
    # The very same component objects go into both pipelines, so the shared
    # folders are byte-identical, as in the real dev and schnell repositories.
    shared = {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer_2,
    }
    variants = (
        (dev_dir, dev_scheduler, True, _SEEDS["transformer_dev"]),
        (schnell_dir, schnell_scheduler, False, _SEEDS["transformer_schnell"]),
    )
    for folder, scheduler, guidance_embeds, seed in variants:
        transformer = _build_transformer(guidance_embeds=guidance_embeds, seed=seed)
        pipe = FluxPipeline(scheduler=scheduler, transformer=transformer, **shared)
        pipe.save_pretrained(folder)


def _save_safety_checker(folder: Path, *, flag_everything_unsafe: bool) -> None:
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
    )
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config={
            "vocab_size": 64,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            # The defaults are the real CLIP ids (49406/49407), outside this
            # vocabulary; transformers warns about them on every load.
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    with _seeded(_SEEDS["safety_checker"]):
        checker = StableDiffusionSafetyChecker(config)
        # Random concept embeddings give cosine distances spread over [-1, 1];
        # the thresholds below then decide the verdict on their own.
        checker.concept_embeds.data.normal_()
        checker.special_care_embeds.data.normal_()
    threshold = _ALWAYS_FLAG_THRESHOLD if flag_everything_unsafe else _NEVER_FLAG_THRESHOLD
    # These are nn.Parameters, so save_pretrained writes them and a reload keeps
    # the forced behaviour.
    checker.concept_embeds_weights.data.fill_(threshold)
    checker.special_care_embeds_weights.data.fill_(threshold)
    checker.save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
    ).save_pretrained(folder)


def _save_nsfw_classifier(folder: Path, *, flag_everything_unsafe: bool) -> None:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_labels=2,
        id2label={0: "normal", 1: "nsfw"},
        label2id={"normal": 0, "nsfw": 1},
    )
    with _seeded(_SEEDS["nsfw_classifier"]):
        model = ViTForImageClassification(config)
    winner = 1 if flag_everything_unsafe else 0
    bias = torch.full((2,), -_VIT_LABEL_BIAS)
    bias[winner] = _VIT_LABEL_BIAS
    model.classifier.bias.data.copy_(bias)
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)


def _write_marker(root: Path, *, flag_everything_unsafe: bool) -> None:
    marker = {
        "version": DEMO_MODEL_VERSION,
        "flag_everything_unsafe": flag_everything_unsafe,
    }
    (root / MARKER_NAME).write_text(json.dumps(marker, sort_keys=True) + "\n")


def _is_complete_default_build(root: Path) -> bool:
    try:
        marker = json.loads((root / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    # An "everything unsafe" build is a test fixture; it must never be reused
    # as the default demo model.
    return (
        isinstance(marker, dict)
        and marker.get("version") == DEMO_MODEL_VERSION
        and marker.get("flag_everything_unsafe") is False
    )


def build_demo_models(root: Path, *, flag_everything_unsafe: bool = False) -> DemoModelPaths:
    """Write all demo models under ``root``; the marker is written last."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = _paths(root)
    with _quiet_progress_bars():
        _save_flux_pipelines(paths.dev, paths.schnell)
        _save_safety_checker(paths.safety_checker, flag_everything_unsafe=flag_everything_unsafe)
        _save_nsfw_classifier(paths.nsfw_classifier, flag_everything_unsafe=flag_everything_unsafe)
    _write_marker(root, flag_everything_unsafe=flag_everything_unsafe)
    return paths


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    # transformers 5 draws a "Writing model shards" bar per save_pretrained,
    # which would clutter script/predict and test output for a 1 s build.
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    # Serialises concurrent builders (pytest-xdist workers, parallel script runs)
    # so they don't each build and race to rename into place.
    lock_path = root.parent / f".{root.name}.lock"
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_demo_models(root: Path) -> DemoModelPaths:
    """Return the default demo models under ``root``, building them only if needed.

    A build goes into a temporary folder beside ``root`` and is renamed into
    place complete, so a killed build never leaves a folder that looks usable.
    """
    root = Path(root).absolute()
    if _is_complete_default_build(root):
        return _paths(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(root):
        # Another process may have finished the build while we waited.
        if _is_complete_default_build(root):
            return _paths(root)
        # Under the lock no other build is running, so any staging folder left
        # here belongs to a build that was killed.
        for leftover in root.parent.glob(f".{root.name}.building-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
        # mkdtemp makes it private (0700); the renamed folder must stay readable
        # by other users, e.g. a server running under a different account.
        staging.chmod(0o755)
        try:
            build_demo_models(staging)
            if root.exists() or root.is_symlink():
                # Stale or partial: move it aside first, since rename onto a
                # non-empty directory fails, then delete it.
                trash = Path(tempfile.mkdtemp(prefix=f".{root.name}.stale-", dir=root.parent))
                os.replace(root, trash / "old")
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(staging, root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return _paths(root)
