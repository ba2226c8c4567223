"""lora_loading/deltas.py: changes computed per group of parameters in float32 and written once, in place or
into a quantized copy (go_fast), and put back exactly, after a failure too."""

from __future__ import annotations

import pytest
import torch

from engine.fast import FastSettings, weight_quantizer
from lora_loading.deltas import Delta, ParameterDeltas, QuantizedCopies, Recomposed

QUANTIZE = weight_quantizer(FastSettings("int8-weight-only", False, "eager", 8, None))


def parameter(*shape: int, seed: int) -> torch.nn.Parameter:
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(*shape, generator=generator), requires_grad=False)


def inner(tensor: torch.Tensor) -> list[torch.Tensor]:
    return [getattr(tensor, name).clone() for name in tensor.__tensor_flatten__()[0]]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(map(torch.equal, a, b))


def test_changes_sharing_a_parameter_are_computed_together_in_order_and_put_back_exactly() -> None:
    q, k, other = parameter(4, 6, seed=0), parameter(4, 6, seed=1), parameter(3, 6, seed=2)
    originals = [p.detach().clone() for p in (q, k, other)]
    add = Delta(tensor=torch.full((4, 6), 0.5))
    fused = Recomposed.of(Delta(tensor=torch.ones(8, 6)), torch.ones(1, 6), (8, 6))
    assert fused is not None
    deltas = ParameterDeltas()
    deltas.set([((q,), add, 2.0), ((q, k), fused, 0.5), ((other,), Delta(tensor=torch.ones(3, 6)), -1.0)])
    stacked = torch.cat([originals[0] + 1.0, originals[1]]) + 0.5
    expected = stacked / stacked.norm(dim=0, keepdim=True)
    torch.testing.assert_close(torch.cat([q, k]), expected, rtol=0, atol=1e-6)
    assert torch.equal(other, originals[2] - 1.0)
    deltas.restore()
    assert all(torch.equal(p, o) for p, o in zip((q, k, other), originals, strict=True))


def test_a_quantized_copy_takes_the_change_and_the_bf16_weight_stays() -> None:
    weights = [parameter(32, 64, seed=seed) for seed in range(3)]
    originals = [w.detach().clone() for w in weights]
    twins = {id(w): QUANTIZE(w.detach()) for w in weights}
    built = {key: inner(twin) for key, twin in twins.items()}
    deltas = ParameterDeltas(QuantizedCopies(twins, QUANTIZE))
    up, down = torch.randn(32, 4), torch.randn(4, 64)
    deltas.set([((weights[0],), Delta(factors=(up, down), op="mm"), 0.5)])
    assert same(inner(twins[id(weights[0])]), inner(QUANTIZE(originals[0] + 0.5 * (up @ down))))
    assert same(inner(twins[id(weights[1])]), built[id(weights[1])])
    assert all(torch.equal(w, o) for w, o in zip(weights, originals, strict=True))
    # Another layer now: the first goes back to the copy's own bytes.
    deltas.set([((weights[1],), Delta(factors=(up, down), op="mm"), 1.0)])
    assert same(inner(twins[id(weights[0])]), built[id(weights[0])])
    deltas.set([])
    assert all(same(inner(twins[key]), built[key]) for key in twins)


def test_a_write_that_fails_part_way_leaves_every_quantized_weight_as_built() -> None:
    weights = [parameter(32, 64, seed=seed) for seed in range(3)]
    twins = {id(w): QUANTIZE(w.detach()) for w in weights}
    built = {key: inner(twin) for key, twin in twins.items()}
    calls = iter(range(100))

    def fails_on_the_third(weight: torch.Tensor) -> torch.Tensor:
        if next(calls) == 2:
            raise KeyboardInterrupt  # a cancel arriving mid-write
        return QUANTIZE(weight)

    copies = QuantizedCopies(twins, fails_on_the_third)
    deltas = ParameterDeltas(copies)
    change = Delta(tensor=torch.ones(32, 64))
    with pytest.raises(KeyboardInterrupt):
        deltas.set([((w,), change, 1.0) for w in weights])
    assert all(same(inner(twins[key]), built[key]) for key in twins)
    assert deltas.current == () and not deltas.changed
