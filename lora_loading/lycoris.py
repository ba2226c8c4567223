"""LyCORIS layers: LoHa rewritten as exact LoRA pairs, so they take every path a LoRA takes; LoKr as the
factors of a full weight delta (merged by lora_loading/deltas.py).

A LoHa layer's update is ((w1_a @ w1_b) * (w2_a @ w2_b)) * alpha / rank. A Hadamard product of two
products factors exactly: with A[i, (k, l)] = w1_a[i, k] * w2_a[i, l] and
B[(k, l), j] = w1_b[k, j] * w2_b[l, j], (A @ B)[i, j] = (w1_a @ w1_b)[i, j] * (w2_a @ w2_b)[i, j].
So a LoHa of rank r is a LoRA of rank r * r, which then goes through diffusers' converters (BFL's
fused layers split by rows, which this form allows), our checks, peft and the go_fast slot.

Where the field falls short: diffusers' FLUX.1 loader takes LoRA (and LoKr for other models) only,
and peft's LoHa is an adapter type of its own, which could not share the go_fast slot. LoKr is not
rewritten: FLUX LoKr files mostly keep full Kronecker factors, whose product has no low rank.
"""

from __future__ import annotations

import torch

from errors import LoraFormatError

MAX_RANK = 256  # the LoRA rank a LoHa may become (a LoHa of rank 16); past it, memory grows like a full copy
HADA = (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b")
LOKR_PARTS = (".lokr_w1", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2")


def lokr_factors(
    parts: dict[str, torch.Tensor], alpha: torch.Tensor | None, layer: str, input_name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(w1 with the layer's scale folded in, w2), whose Kronecker product is the layer's update.

    Each factor is kept whole (`lokr_w1`) or as a low-rank pair (`_a` @ `_b`). The scale is LyCORIS's
    alpha / rank, the rank being that of the pairs; a layer with both factors whole has scale 1, whatever
    its alpha (LyCORIS sets alpha = rank then; ComfyUI's loader reads it the same way)."""
    if ".lokr_t2" in parts:
        raise LoraFormatError(
            f"Invalid {input_name}: the LoKr layer {layer} is a Tucker (lokr_t2) convolution LoKr, which FLUX.1's "
            "Linear layers cannot take."
        )
    factors, rank = [], None
    for name in ("w1", "w2"):
        whole, down_up = parts.get(f".lokr_{name}"), (parts.get(f".lokr_{name}_a"), parts.get(f".lokr_{name}_b"))
        if whole is not None and down_up == (None, None):
            factors.append(whole.float())
        elif whole is None and None not in down_up:
            up, down = down_up
            assert up is not None and down is not None
            if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
                raise LoraFormatError(f"Invalid {input_name}: the LoKr layer {layer} has a malformed {name} pair.")
            factors.append(up.float() @ down.float())
            rank = down.shape[0]
        else:
            raise LoraFormatError(
                f"Invalid {input_name}: the LoKr layer {layer} lacks its {name} factor (lokr_{name}, or lokr_{name}_a "
                f"with lokr_{name}_b)."
            )
    if any(factor.ndim != 2 for factor in factors):
        raise LoraFormatError(f"Invalid {input_name}: the LoKr layer {layer} is not a Linear LoKr.")
    scale = float(alpha) / rank if alpha is not None and rank else 1.0
    return factors[0] * scale, factors[1]


def loha_to_lora(state_dict: dict[str, torch.Tensor], input_name: str) -> dict[str, torch.Tensor]:
    """The file with each LoHa layer replaced by its LoRA pair, in the same naming: PEFT's lora_A/lora_B with
    the scale folded in under `transformer.`/`text_encoder*.` names, kohya's lora_down/lora_up and alpha elsewhere."""
    layers = sorted({key.rsplit(".hada_", 1)[0] for key in state_dict if ".hada_" in key})
    if not layers:
        return state_dict
    converted = {key: value for key, value in state_dict.items() if ".hada_" not in key}
    for layer in layers:
        parts = {suffix: state_dict.get(layer + suffix) for suffix in HADA}
        extra = [key for key in state_dict if key.startswith(layer + ".hada_") and key[len(layer) :] not in HADA]
        if extra or any(part is None for part in parts.values()):
            raise LoraFormatError(
                f"Invalid {input_name}: the LoHa layer {layer} is not a plain Linear LoHa (w1_a, w1_b, w2_a, w2_b); "
                f"Tucker (hada_t*) and convolution LoHa are not applied; first: {', '.join(extra[:3]) or layer}."
            )
        up1, down1, up2, down2 = (parts[suffix].float() for suffix in HADA)
        rank = down1.shape[0]
        if up1.shape[0] != up2.shape[0] or down1.shape[1] != down2.shape[1] or rank * down2.shape[0] > MAX_RANK:
            raise LoraFormatError(
                f"Invalid {input_name}: the LoHa layer {layer} is malformed or of rank {rank} x {down2.shape[0]}, "
                f"past the {MAX_RANK} this predictor takes."
            )
        up = (up1[:, :, None] * up2[:, None, :]).reshape(up1.shape[0], -1)
        down = (down1[:, None, :] * down2[None, :, :]).reshape(-1, down1.shape[1])
        alpha = state_dict.get(f"{layer}.alpha")
        scale = float(alpha) / rank if alpha is not None else 1.0  # LyCORIS: alpha / lora_dim, the w1 rank
        converted.pop(f"{layer}.alpha", None)
        if layer.startswith(("transformer.", "text_encoder.", "text_encoder_2.")):
            converted[f"{layer}.lora_A.weight"] = down * scale
            converted[f"{layer}.lora_B.weight"] = up
        else:
            converted[f"{layer}.lora_down.weight"] = down
            converted[f"{layer}.lora_up.weight"] = up
            converted[f"{layer}.alpha"] = torch.tensor(scale * down.shape[0])  # alpha / (r*r) = the LoHa's scale
    return converted
