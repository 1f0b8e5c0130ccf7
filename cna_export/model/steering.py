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
from ..core.experts import SHARED, describe, group_multipliers, is_expert_key


def group_by_layer(multipliers: Mapping[tuple[int, int], float]) -> dict[int, tuple[list[int], list[float]]]:
    """(layer, index) -> m  to  layer -> (indices, multipliers), sorted for determinism (dense neurons;
    expert neurons are grouped by :func:`cna_export.core.experts.group_multipliers`)."""
    out: dict[int, tuple[list[int], list[float]]] = {}
    for key in multipliers:
        if is_expert_key(key):
            raise CnaError(f"neuron {describe(key)} is an expert neuron; this step handles dense MLP neurons only")
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

    ``multipliers`` maps (layer, neuron index) to a multiplier, or (layer, expert, index) for the
    neurons of a mixture-of-experts layer (routed experts through
    :func:`cna_export.model.experts.intercept_experts`, the shared expert's with a pre-hook on its
    down_proj). Works on any device placement (indices are moved to the activation's device).
    """
    import torch

    from .experts import intercept_experts, scaler

    handles = []
    layers = arch.layer_modules(model)
    routed: dict[int, dict[int, tuple[list[int], list[float]]]] = {}
    stack = contextlib.ExitStack()
    try:
        for (layer, expert), (idx, ms) in group_multipliers(multipliers).items():
            ms = [check_multiplier(m) for m in ms]
            if layer >= len(layers):
                raise CnaError(f"steering layer {layer} is out of range (model has {len(layers)} layers)")
            if expert is not None:
                experts = arch.experts_module(model, layer)
                if experts is None:
                    raise CnaError(f"steering neuron {describe((layer, expert, idx[0]))}: layer {layer} has no experts")
                if expert == SHARED:
                    shared = arch.shared_module(model, layer)
                    if shared is None:
                        raise CnaError(f"steering neuron {describe((layer, expert, idx[0]))}: layer {layer} has no "
                                       "shared expert")
                    down = getattr(shared, arch.down_proj)
                else:
                    n_experts, _, width = experts.down_proj.shape
                    if expert >= n_experts:
                        raise CnaError(f"steering neuron {describe((layer, expert, idx[0]))}: the layer has "
                                       f"{n_experts} experts")
                    if max(idx) >= width:
                        raise CnaError(f"steering neuron {max(idx)} is out of range in layer {layer}, expert {expert}")
                    routed.setdefault(layer, {})[expert] = (idx, ms)
                    continue
            else:
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
        if routed:
            modules = {layer: arch.experts_module(model, layer) for layer in routed}
            stack.enter_context(intercept_experts(modules, lambda layer: scaler(routed[layer])))
        yield
    finally:
        stack.close()
        for h in handles:
            h.remove()


@contextlib.contextmanager
def steer_circuit(loaded: Any, circuit: Circuit | None, multiplier: float | None = None,
                  per_neuron=None) -> Iterator[None]:
    """Convenience wrapper over :func:`steer` for a :class:`LoadedModel`; ``circuit=None`` steers nothing."""
    if circuit is None:
        yield
        return
    with steer(loaded.model, loaded.arch, resolve_multipliers(circuit, multiplier, per_neuron)):
        yield
