"""Neurons of mixture-of-experts layers: keys, labels and the per-layer layout.

A dense circuit neuron is ``(layer, index)``: input ``index`` of the layer's down projection. In a
mixture-of-experts layer every expert is a gated MLP of its own, so a neuron is
``(layer, expert, index)``: input ``index`` of expert ``expert``'s down projection. The shared
expert(s) of Qwen2-MoE and DeepSeek (always computed, not routed) form one group of their own,
written ``"shared"`` in JSON and :data:`SHARED` (-1) in keys, so keys stay tuples of ints that sort.

Discovery works on one flat index per layer (the statistics are ``[layers, width]`` arrays): a MoE
layer's neurons are its routed experts' in expert order, then the shared group's
(``e * expert_width + j``, then ``experts * expert_width + j``); a dense layer's are its MLP's.
:class:`Layout` converts between the two.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import CnaError

SHARED = -1
"""The expert number of the shared expert group in neuron keys."""

Key = tuple[int, int] | tuple[int, int, int]


def is_expert_key(key: Sequence[int]) -> bool:
    return len(key) == 3


def key_layer(key: Sequence[int]) -> int:
    return int(key[0])


def key_expert(key: Sequence[int]) -> int | None:
    """The expert of a key (:data:`SHARED` for the shared group), None for a dense neuron."""
    return int(key[1]) if len(key) == 3 else None


def key_index(key: Sequence[int]) -> int:
    return int(key[-1])


def parse_expert(value: Any) -> int | None:
    """The key form of a JSON expert value (int >= 0, ``"shared"`` or None)."""
    if value is None:
        return None
    if value == "shared":
        return SHARED
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CnaError(f"expert must be a number >= 0 or \"shared\", got {value!r}")
    return int(value)


def make_key(layer: int, index: int, expert: int | None = None) -> Key:
    return (int(layer), int(index)) if expert is None else (int(layer), int(expert), int(index))


def describe(key: Sequence[int]) -> str:
    """``(layer 3, index 7)`` or ``(layer 3, expert 2, index 7)`` / ``(layer 3, shared expert, index 7)``."""
    e = key_expert(key)
    if e is None:
        return f"(layer {key[0]}, index {key[-1]})"
    return f"(layer {key[0]}, {'shared expert' if e == SHARED else f'expert {e}'}, index {key[-1]})"


def format_key(key: Sequence[int]) -> str:
    """``L:i`` or ``L:e:i`` (``L:shared:i``), the multipliers-file form."""
    e = key_expert(key)
    if e is None:
        return f"{key[0]}:{key[1]}"
    return f"{key[0]}:{'shared' if e == SHARED else e}:{key[2]}"


def parse_key_text(text: str) -> Key:
    parts = str(text).split(":")
    if len(parts) == 2:
        return make_key(int(parts[0]), int(parts[1]))
    if len(parts) == 3:
        return make_key(int(parts[0]), int(parts[2]), parse_expert(parts[1] if parts[1] == "shared" else int(parts[1])))
    raise ValueError(text)


def group_multipliers(
    mults: Mapping[Sequence[int], float],
) -> dict[tuple[int, int | None], tuple[list[int], list[float]]]:
    """(layer, expert or None) -> (indices, multipliers), sorted for determinism."""
    out: dict[tuple[int, int | None], tuple[list[int], list[float]]] = {}
    for k in sorted(mults):
        idx, ms = out.setdefault((key_layer(k), key_expert(k)), ([], []))
        idx.append(key_index(k))
        ms.append(float(mults[k]))
    return out


@dataclass(frozen=True)
class Layout:
    """Which neuron groups each layer has: dense layers one (expert None), MoE layers ``experts`` routed
    groups of ``expert_width`` plus a shared group of ``shared_width`` (when > 0)."""

    num_layers: int
    dense_width: int
    experts: int = 0
    expert_width: int = 0
    shared_width: int = 0
    moe_layers: frozenset[int] = frozenset()

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    def groups(self, layer: int) -> list[tuple[int | None, int]]:
        if layer not in self.moe_layers:
            return [(None, self.dense_width)]
        out: list[tuple[int | None, int]] = [(e, self.expert_width) for e in range(self.experts)]
        if self.shared_width:
            out.append((SHARED, self.shared_width))
        return out

    def width(self, layer: int) -> int:
        return sum(w for _, w in self.groups(layer))

    @property
    def max_width(self) -> int:
        return max(self.width(layer) for layer in range(self.num_layers))

    @property
    def total(self) -> int:
        return sum(self.width(layer) for layer in range(self.num_layers))

    def offset(self, layer: int, expert: int | None) -> int:
        off = 0
        for e, w in self.groups(layer):
            if e == expert:
                return off
            off += w
        raise KeyError(expert)

    def key(self, layer: int, flat: int) -> Key:
        """The neuron key of flat index ``flat`` in ``layer``."""
        off = 0
        for e, w in self.groups(layer):
            if flat < off + w:
                return make_key(layer, flat - off, e)
            off += w
        raise CnaError(f"flat neuron index {flat} is out of range in layer {layer} ({off} neurons)")

    def flat(self, key: Sequence[int]) -> int:
        self.check(key)
        return self.offset(key_layer(key), key_expert(key)) + key_index(key)

    def check(self, key: Sequence[int], what: str = "circuit does not fit the model") -> None:
        """A one-line :class:`CnaError` unless ``key`` names a neuron of this layout."""
        layer, expert, index = key_layer(key), key_expert(key), key_index(key)
        if not 0 <= layer < self.num_layers:
            raise CnaError(f"{what}: neuron layer {layer} is out of range (model has {self.num_layers} layers)")
        if expert is None and layer in self.moe_layers:
            raise CnaError(f"{what}: layer {layer} is a mixture-of-experts layer; its neurons need an expert")
        if expert is not None and layer not in self.moe_layers:
            raise CnaError(f"{what}: neuron {describe(key)} names an expert, but layer {layer} is a dense MLP")
        widths = dict(self.groups(layer))
        if expert is not None and expert not in widths:
            has = f"{self.experts} experts" + (" and a shared expert" if self.shared_width else ", no shared expert")
            raise CnaError(f"{what}: neuron {describe(key)} names an expert the model lacks (layer {layer} has {has})")
        if not 0 <= index < widths[expert]:
            per = "" if expert is None else (" in the shared expert" if expert == SHARED else " per expert")
            raise CnaError(f"{what}: neuron {describe(key)} is out of range ({widths[expert]} neurons{per})")
