"""Hook steering: scale circuit neurons (the input of down_proj) at every position.

This is the paper's runtime intervention, kept as the reference that exported
weights are verified against. Multipliers are applied in fp32 and rounded once
to the activation dtype.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

from ..core.circuit import Circuit, check_multiplier
from ..core.errors import CnaError


def group_by_layer(multipliers: Mapping[tuple[int, int], float]) -> dict[int, tuple[list[int], list[float]]]:
    """(layer, index) -> m  to  layer -> (indices, multipliers), sorted for determinism."""
    out: dict[int, tuple[list[int], list[float]]] = {}
    for (layer, index), m in sorted(multipliers.items()):
        idx, ms = out.setdefault(layer, ([], []))
        idx.append(index)
        ms.append(check_multiplier(m))
    return out


def resolve_multipliers(
    circuit: Circuit, multiplier: float | None = None, per_neuron: Mapping[tuple[int, int], float] | None = None
) -> dict[tuple[int, int], float]:
    """One multiplier for all neurons, an explicit per-neuron map, or the circuit's own multipliers."""
    if per_neuron is not None:
        return {k: check_multiplier(v) for k, v in per_neuron.items()}
    return circuit.multipliers(multiplier)


@contextlib.contextmanager
def steer(model: Any, arch: Any, multipliers: Mapping[tuple[int, int], float]) -> Iterator[None]:
    """Scale neurons with forward pre-hooks on down_proj for the duration of the block.

    ``multipliers`` maps (layer, neuron index) to a multiplier. Works on any
    device placement (indices are moved to the activation's device).
    """
    import torch

    handles = []
    layers = arch.layer_modules(model)
    try:
        for layer, (idx, ms) in group_by_layer(multipliers).items():
            if layer >= len(layers):
                raise CnaError(f"steering layer {layer} is out of range (model has {len(layers)} layers)")
            down = arch.down_proj_module(model, layer)
            if max(idx) >= down.weight.shape[1]:
                raise CnaError(f"steering neuron {max(idx)} is out of range in layer {layer}")
            idx_t = torch.tensor(idx, dtype=torch.long)
            m_t = torch.tensor(ms, dtype=torch.float32)

            def pre_hook(module: Any, args: tuple, idx_t: Any = idx_t, m_t: Any = m_t) -> tuple:
                x = args[0]
                i = idx_t.to(x.device)
                scaled = (x[..., i].float() * m_t.to(x.device)).to(x.dtype)
                x = x.clone()
                x[..., i] = scaled
                return (x, *args[1:])

            handles.append(down.register_forward_pre_hook(pre_hook))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def steer_circuit(loaded: Any, circuit: Circuit | None, multiplier: float | None = None, per_neuron=None) -> Iterator[None]:
    """Convenience wrapper over :func:`steer` for a :class:`LoadedModel`; ``circuit=None`` steers nothing."""
    if circuit is None:
        yield
        return
    with steer(loaded.model, loaded.arch, resolve_multipliers(circuit, multiplier, per_neuron)):
        yield
