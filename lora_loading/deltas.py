"""Changes made to a model's own parameters in place, with the exact originals put back afterwards.

For what peft's LoRA layers cannot hold:
- ComfyUI's bias deltas (`.diff_b`, its extract node's default) and full weight deltas (`.diff`: its
  `full_diff` mode, ai-toolkit's `all_layers` norms, the norm weights of a text-encoder extract);
- LyCORIS LoKr layers. Their update kron(w1, w2) is usually of full rank (FLUX LoKr files mostly keep
  full factors), so it has no exact LoRA form. peft's LoKr layers would be a second adapter type beside
  the LoRA ones and recompute the full delta in every forward; merged here it costs nothing per step;
- the DoRAs peft's DoRA layers do not take (`Recomposed`).

A change stays in the file's small form (a tensor, or two factors) until it is applied, and is made
on the parameter's device then. Originals are kept on the CPU: a LoKr over every layer of FLUX.1
would otherwise hold a second transformer in GPU memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class Delta:
    """A parameter's change at scale 1.

    `tensor` is the change itself, or with `factors` it is computed as `op(*factors)` (torch.kron for
    LoKr, torch.mm for a LoRA pair on a layer peft does not wrap). `rows` picks and orders the rows
    of that result a module takes, for BFL's fused layers; None takes all."""

    tensor: torch.Tensor | None = None
    factors: tuple[torch.Tensor, torch.Tensor] | None = None
    op: str = "kron"  # "kron" or "mm", for factors
    rows: tuple[slice, ...] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        if self.tensor is not None:
            full = tuple(self.tensor.shape)
        else:
            assert self.factors is not None
            first, second = (tuple(factor.shape) for factor in self.factors)
            if self.op == "mm":
                full = (first[0], second[1])
            else:
                full = tuple(a * b for a, b in zip(first, second, strict=True))
        if self.rows is None:
            return full
        return (sum(len(range(*row.indices(full[0]))) for row in self.rows), *full[1:])

    def on(self, device: torch.device) -> torch.Tensor:
        """The delta in float32 on `device`."""
        if self.tensor is not None:
            full = self.tensor
            pieces = [full[row] for row in self.rows] if self.rows is not None else [full]
            return torch.cat([piece.to(device, torch.float32) for piece in pieces])
        assert self.factors is not None
        first, second = (factor.to(device, torch.float32) for factor in self.factors)
        full = torch.kron(first, second) if self.op == "kron" else first @ second
        return full if self.rows is None else torch.cat([full[row] for row in self.rows])


@dataclass(frozen=True, eq=False)
class Recomposed:
    """A DoRA applied into the weight, for what peft's DoRA layers do not hold: magnitudes per input
    column (OneTrainer's default axis, LyCORIS's wd_on_out=False), DoRA over a LoKr, and DoRA on the
    text encoders.

    weight = m * (W + s * dW) / ||W + s * dW||, the norm taken over each input column (`per_column`)
    or output row, of the layer's whole weight: for a BFL layer fused from several diffusers modules,
    their weights stacked. `lora_scale` means what it means in peft's DoRA: it scales dW inside the
    normalisation; at 1 this is what every trainer computes.
    """

    update: Delta  # dW at scale 1, rows in the order of the modules' weights stacked
    magnitude: torch.Tensor  # (1, in) per column, or (out, 1) per row, in the same row order
    per_column: bool

    @classmethod
    def of(cls, update: Delta, magnitude: torch.Tensor, shape: tuple[int, ...]) -> Recomposed | None:
        """Magnitudes given (1, in) are per input column; out of them, per output row. None: they fit
        neither axis of a weight of `shape`."""
        out_features, in_features = shape
        if magnitude.ndim == 2 and tuple(magnitude.shape) == (1, in_features):
            return cls(update, magnitude.float(), per_column=True)
        if magnitude.numel() == out_features:
            return cls(update, magnitude.float().reshape(-1, 1), per_column=False)
        return None

    def apply(self, weights: list[torch.Tensor], scale: float) -> list[torch.Tensor]:
        stacked = torch.cat(weights) + scale * self.update.on(weights[0].device)
        norm = stacked.norm(dim=0 if self.per_column else 1, keepdim=True)
        recomposed = self.magnitude.to(stacked.device, torch.float32) * stacked / norm
        return list(recomposed.split([weight.shape[0] for weight in weights]))


Change = Delta | Recomposed
# A change resolved to the parameters it takes, with the index of the LoRA whose scale it follows.
Placed = tuple[tuple[torch.nn.Parameter, ...], Change, int]


class ParameterDeltas:
    """Changes made to parameters in place, and the exact originals kept to put back.

    One per transformer: its go_fast copy shares the bf16 biases, so both paths of a model see what
    this holds, and each request sets it (the fast path to nothing). The text encoders have one too."""

    def __init__(self) -> None:
        self.originals: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}
        self.current: tuple[tuple[tuple[int, ...], int, float], ...] = ()

    @torch.no_grad()
    def set(self, changes: Sequence[tuple[tuple[torch.nn.Parameter, ...], Change, float]]) -> None:
        """(parameters, change, scale) each, in order: a Delta adds scale x delta to its one parameter, a
        Recomposed recomposes its parameters' weights; nothing given: the originals. The same changes at
        the same scales as now change nothing, so a repeated request copies no weights."""
        wanted = tuple((tuple(map(id, parameters)), id(change), scale) for parameters, change, scale in changes)
        if wanted == self.current:
            return
        self.restore()
        try:
            for parameters, change, scale in changes:
                for parameter in parameters:
                    if id(parameter) not in self.originals:
                        self.originals[id(parameter)] = (parameter, parameter.detach().to("cpu", copy=True))
                if isinstance(change, Delta):
                    (parameter,) = parameters
                    parameter.add_((change.on(parameter.device) * scale).to(parameter.dtype))
                    continue
                values = change.apply([parameter.float() for parameter in parameters], scale)
                for parameter, value in zip(parameters, values, strict=True):
                    parameter.copy_(value.to(parameter.dtype))
        except BaseException:
            self.restore()
            raise
        self.current = wanted

    def set_scaled(self, placed: Sequence[Placed], scales: Sequence[float]) -> None:
        """Each change at the scale of its LoRA. A LoRA at scale 0 is left out rather than scaled by 0: a
        recomposed DoRA at 0 would still renormalise the weights."""
        self.set([(parameters, change, scales[index]) for parameters, change, index in placed if scales[index] != 0])

    @torch.no_grad()
    def restore(self) -> None:
        for parameter, original in self.originals.values():
            parameter.copy_(original)
        self.originals = {}
        self.current = ()
