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

from collections.abc import Callable, Sequence
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


class QuantizedCopies:
    """Where go_fast's changes to the transformer's Linear weights go: into the quantized copy's weights.

    Each quantized weight is rewritten in place as quantize(W + changes), computed from the bf16 weight W
    it was built from, which this never changes; reset writes quantize(W) back, the copy's own bytes (the
    same quantizer, the same input). Same shapes, dtypes and tensors, so compiled graphs take any LoRA
    without a recompile, and a step costs what it costs without one."""

    def __init__(self, twins: dict[int, torch.Tensor], quantize: Callable[[torch.Tensor], torch.Tensor]):
        self.twins = twins  # by id of a bf16 weight: the quantized weight built from it
        self.quantize = quantize  # a bf16 weight -> its quantized tensor, as the copy was built

    def holds(self, parameter: torch.nn.Parameter) -> bool:
        return id(parameter) in self.twins

    def write(self, parameter: torch.nn.Parameter, value: torch.Tensor) -> None:
        copy_quantized(self.twins[id(parameter)], self.quantize(value.to(parameter.dtype)))

    def reset(self, parameter: torch.nn.Parameter) -> None:
        copy_quantized(self.twins[id(parameter)], self.quantize(parameter.detach()))


def copy_quantized(target: torch.Tensor, source: torch.Tensor) -> None:
    """Copies a quantized tensor's contents into another of the same layout, inner tensor by inner tensor
    (torchao's tensor subclasses list theirs in `__tensor_flatten__`: fp8 data and per-row scales, say)."""
    if not hasattr(target, "__tensor_flatten__"):
        target.copy_(source)
        return
    names, _ = target.__tensor_flatten__()
    source_names, _ = source.__tensor_flatten__()
    if names != source_names or type(target) is not type(source):
        raise TypeError(f"cannot copy a {type(source).__name__} {source_names} into a {type(target).__name__} {names}")
    for name in names:
        copy_quantized(getattr(target, name), getattr(source, name))


class ParameterDeltas:
    """Changes made to parameters, and how to take them back exactly.

    Each parameter's new value is computed once, in float32, from all the changes that take it, and
    written once: into the parameter itself, whose exact original is kept on the CPU (a LoKr over every
    layer of FLUX.1 would otherwise hold a second transformer in GPU memory); or, with `quantized`, into
    the quantized copy of a bf16 weight (go_fast), the bf16 weight left as it is. Parameters that share a
    change (a BFL layer fused from several modules) are computed together, one group at a time, so the
    extra memory is one group's.

    The standard path has one per transformer, shared with its go_fast copy, whose biases and norms are
    the bf16 model's own tensors; the go_fast path has a second, with `quantized`, for the Linear weights.
    The text encoders have one too."""

    def __init__(self, quantized: QuantizedCopies | None = None) -> None:
        self.quantized = quantized
        # By id: each changed parameter, with its exact original on the CPU (None where `quantized` holds it).
        self.changed: dict[int, tuple[torch.nn.Parameter, torch.Tensor | None]] = {}
        self.current: tuple[tuple[tuple[int, ...], int, float], ...] = ()

    @torch.no_grad()
    def set(self, changes: Sequence[tuple[tuple[torch.nn.Parameter, ...], Change, float]]) -> None:
        """(parameters, change, scale) each, in order: a Delta adds scale x delta to its one parameter, a
        Recomposed recomposes its parameters' weights; nothing given: the originals. The same changes at
        the same scales as now change nothing, so a repeated request copies no weights. On any failure
        (a cancel included) every parameter is put back."""
        wanted = tuple((tuple(map(id, parameters)), id(change), scale) for parameters, change, scale in changes)
        if wanted == self.current:
            return
        self.current = ()  # until the writes complete, what the parameters hold is unknown
        try:
            taken = {id(parameter) for parameters, _, _ in changes for parameter in parameters}
            for key in [key for key in self.changed if key not in taken]:
                self._reset(key)
            for group in _groups(changes):
                values: dict[int, torch.Tensor] = {}
                for parameters, change, scale in group:
                    for parameter in parameters:
                        if id(parameter) not in values:
                            values[id(parameter)] = self._original(parameter)
                    if isinstance(change, Delta):
                        (parameter,) = parameters
                        values[id(parameter)] += scale * change.on(parameter.device)
                        continue
                    recomposed = change.apply([values[id(parameter)] for parameter in parameters], scale)
                    values.update(zip(map(id, parameters), recomposed, strict=True))
                for parameters, _, _ in group:
                    for parameter in parameters:
                        if id(parameter) in values:
                            self._write(parameter, values.pop(id(parameter)))
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
        for key in list(self.changed):
            self._reset(key)
        self.current = ()

    def _original(self, parameter: torch.nn.Parameter) -> torch.Tensor:
        """The parameter's value before any change, in float32 on its device."""
        kept = self.changed.get(id(parameter), (parameter, None))[1]
        return (parameter if kept is None else kept).to(parameter.device, torch.float32, copy=True)

    def _write(self, parameter: torch.nn.Parameter, value: torch.Tensor) -> None:
        if self.quantized is not None:
            self.quantized.write(parameter, value)
            self.changed[id(parameter)] = (parameter, None)
            return
        if id(parameter) not in self.changed:
            self.changed[id(parameter)] = (parameter, parameter.detach().to("cpu", copy=True))
        parameter.copy_(value.to(parameter.dtype))

    def _reset(self, key: int) -> None:
        parameter, original = self.changed[key]
        if self.quantized is not None:
            self.quantized.reset(parameter)
        else:
            assert original is not None
            parameter.copy_(original)
        del self.changed[key]


def _groups(
    changes: Sequence[tuple[tuple[torch.nn.Parameter, ...], Change, float]],
) -> list[list[tuple[tuple[torch.nn.Parameter, ...], Change, float]]]:
    """The changes in groups that share no parameter, each group in the changes' own order."""
    group_of: dict[int, int] = {}
    groups: dict[int, list[tuple[tuple[torch.nn.Parameter, ...], Change, float]]] = {}
    for index, change in enumerate(changes):
        joined = {group_of[id(parameter)] for parameter in change[0] if id(parameter) in group_of}
        members = [change]
        for other in sorted(joined):
            members = groups.pop(other) + members
        for parameters, _, _ in members:
            for parameter in parameters:
                group_of[id(parameter)] = index
        groups[index] = members
    # A group merged from others keeps the changes' order: sort by position in `changes`.
    position = {id(change): index for index, change in enumerate(changes)}
    return [sorted(members, key=lambda change: position[id(change)]) for _, members in sorted(groups.items())]
