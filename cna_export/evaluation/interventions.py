"""What an evaluation asks of a model: the :class:`Steering` record and the :class:`Backend` interface.

A :class:`Steering` is one intervention (nothing, CNA: scale circuit neurons, CAA: add per-layer
vectors); a :class:`Backend` generates greedy answers and scores continuations under one. The two
backends are :class:`cna_export.evaluation.backends.TransformersBackend` (hook steering) and
:class:`cna_export.evaluation.llama_backend.LlamaCppBackend` (a GGUF in llama.cpp).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from ..core.circuit import Circuit, check_multiplier
from ..core.errors import CnaError
from ..core.multipliers import describe_multipliers
from ..model.generation import Generation

# ---------------------------------------------------------------------------------------
# What to do to the model
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Steering:
    """An intervention: nothing, CNA (scale circuit neurons) or CAA (add per-layer vectors).

    ``vectors`` (CAA) is ``[num_layers, hidden]``; ``layers`` restricts which
    layers receive their vector (None: all).
    """

    kind: str = "none"
    label: str = "unsteered"
    circuit: Circuit | None = None
    multipliers: Mapping[tuple[int, int], float] | None = None
    multiplier: float | None = None
    vectors: np.ndarray | None = None
    alpha: float = 0.0
    layers: tuple[int, ...] | None = None
    force: bool = False
    info: dict = field(default_factory=dict)

    @staticmethod
    def none(label: str = "unsteered") -> "Steering":
        return Steering(kind="none", label=label)

    @staticmethod
    def cna(
        circuit: Circuit,
        multiplier: float | None = None,
        per_neuron: Mapping[tuple[int, int], float] | None = None,
        label: str | None = None,
        force: bool = False,
        info: dict | None = None,
    ) -> "Steering":
        from ..model.steering import resolve_multipliers

        mults = resolve_multipliers(circuit, multiplier, per_neuron)
        if not mults:
            raise CnaError("the circuit has no neurons to steer")
        name = label or f"CNA {len(mults)} neurons {describe_multipliers(mults, 'counts')}"
        return Steering(kind="cna", label=name, circuit=circuit, multipliers=dict(mults), multiplier=multiplier,
                        force=force, info=dict(info or {}))

    @staticmethod
    def caa(
        vectors: np.ndarray,
        alpha: float,
        layers: Sequence[int] | None = None,
        label: str | None = None,
        info: dict | None = None,
    ) -> "Steering":
        v = np.asarray(vectors, dtype=np.float64)
        if v.ndim != 2:
            raise CnaError("CAA vectors must be [layers, hidden]")
        alpha = check_multiplier(alpha)
        if layers is not None:
            bad = [l for l in layers if not 0 <= l < v.shape[0]]
            if bad:
                raise CnaError(f"CAA layer {bad[0]} is out of range (model has {v.shape[0]} layers)")
        name = label or f"CAA alpha={alpha:g}"
        return Steering(kind="caa", label=name, vectors=v, alpha=alpha,
                        layers=tuple(sorted(set(layers))) if layers is not None else None, info=dict(info or {}))

    def caa_layers(self) -> list[int]:
        assert self.vectors is not None
        return list(self.layers) if self.layers is not None else list(range(self.vectors.shape[0]))

    def describe(self) -> dict:
        out: dict[str, Any] = {"kind": self.kind, "label": self.label}
        if self.kind == "cna":
            assert self.multipliers is not None
            out["neurons"] = len(self.multipliers)
            out["multiplier"] = self.multiplier
            layers: dict[int, int] = {}
            for (layer, _), _m in self.multipliers.items():
                layers[layer] = layers.get(layer, 0) + 1
            out["per_layer_counts"] = dict(sorted(layers.items()))
        elif self.kind == "caa":
            out["alpha"] = self.alpha
            out["layers"] = self.caa_layers()
        out.update(self.info)
        return out


# ---------------------------------------------------------------------------------------
# Interface
# ---------------------------------------------------------------------------------------


class Backend(Protocol):
    name: str
    spec: str

    def generate(
        self, prompts: Sequence[str], steering: Steering, max_new_tokens: int, first_logprobs: bool = False
    ) -> list[Generation]: ...

    def score(self, prompts: Sequence[str], continuations: Sequence[Sequence[int]],
              steering: Steering) -> list[np.ndarray]:
        """Per prompt, log-probs [max(1, len(cont)), vocab] at the last prompt position and after each
        continuation token but the last (teacher forcing)."""
        ...

    def close(self) -> None: ...
