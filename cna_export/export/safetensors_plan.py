"""Which tensors of which safetensors shards a fold scales, and how (:class:`FoldPlan`): down_proj columns (the
default; every gated or non-gated MLP, experts included) or up_proj rows (``--fold up``: dense gated MLPs with an
up_proj of their own, whose rows are contiguous, so the shard is a copy plus the touched rows)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

from ..core.architectures import ArchSpec
from ..core.circuit import ModelIdentity
from ..core.errors import CnaError
from ..core.experts import group_multipliers
from ..core.manifest import MANIFEST_FILE
from ..core.version import __version__
from ..io import safetensors as st_io
from ..io.identity import expert_tensors
from ..model.steering import group_by_layer


@dataclass
class FoldPlan:
    """Which tensor of which shard gets which columns (down fold) or rows (up fold) scaled."""

    arch: ArchSpec
    identity: ModelIdentity
    ckpt: st_io.Checkpoint
    # shard file -> tensor name -> (layer, indices, multipliers)
    by_file: dict[str, dict[str, tuple[int, list[int], list[float]]]]
    fold: Literal["up", "down"] = "down"

    @property
    def axis(self) -> Literal["row", "column"]:
        return "row" if self.fold == "up" else "column"


def plan_down(
    ckpt: st_io.Checkpoint, arch: ArchSpec, identity: ModelIdentity, down_names: Sequence[str],
    mults: Mapping[tuple[int, int], float],
) -> FoldPlan:
    """The down fold: column ``j`` of each circuit layer's down_proj (``down_names``), or of its experts' tensors
    (flat column ``e * width + j`` of a fused 3-D tensor)."""
    by_file: dict[str, dict[str, tuple[int, list[int], list[float]]]] = {}
    if identity.moe is not None:  # MoE: per-expert or fused 3-D tensors (flat column e * width + j)
        layout = identity.layout()
        for (layer, expert), (idx, ms) in group_multipliers(mults).items():
            for j in idx:
                layout.check((layer, j) if expert is None else (layer, expert, j))
            name, slot = expert_tensors(ckpt, arch, layer).groups[expert]
            flat = idx if slot is None else [slot * layout.expert_width + j for j in idx]
            _, have_idx, have_ms = by_file.setdefault(ckpt.weight_map[name], {}).setdefault(name, (layer, [], []))
            have_idx.extend(flat)
            have_ms.extend(ms)
        return FoldPlan(arch, identity, ckpt, dict(sorted(by_file.items())))
    for layer, (idx, ms) in group_by_layer(mults).items():
        name = down_names[layer]
        by_file.setdefault(ckpt.weight_map[name], {})[name] = (layer, idx, ms)
    return FoldPlan(arch, identity, ckpt, dict(sorted(by_file.items())))


def plan_up(ckpt: st_io.Checkpoint, arch: ArchSpec, identity: ModelIdentity,
            mults: Mapping[tuple[int, int], float]) -> FoldPlan:
    """The up fold: row ``j`` of each circuit layer's own ``up_proj`` (row ``j`` feeds neuron ``j`` only, so scaling
    it scales the neuron, and the row is contiguous: the shard is a copy plus the touched rows). Refused where the
    up projection is not a tensor of its own (fused gate/up, experts) or the MLP is not gated."""
    if identity.moe is not None or arch.fused_gate_up or not arch.gated:
        why = ("its experts" if identity.moe is not None else "a fused gate/up projection" if arch.gated
               else "a non-gated MLP")
        raise CnaError(f"--fold up for a safetensors export needs a gated MLP with its own up_proj; "
                       f"{arch.model_type} has {why}: use --fold down")
    by_file: dict[str, dict[str, tuple[int, list[int], list[float]]]] = {}
    for layer, (idx, ms) in group_by_layer(mults).items():
        name = ckpt.first_present(arch.checkpoint_up_names(layer))
        if name is None:
            raise CnaError(f"layer {layer} has no up_proj weight (looked for {arch.checkpoint_up_names(layer)[0]})")
        by_file.setdefault(ckpt.weight_map[name], {})[name] = (layer, idx, ms)
    return FoldPlan(arch, identity, ckpt, dict(sorted(by_file.items())), fold="up")


def shard_summary(circuit_sha: str, mults: Mapping[tuple[int, int], float],
                  entries: Mapping[str, tuple[int, list[int], list[float]]], fold: str) -> str:
    """The summary each rewritten shard carries in its safetensors metadata (``cna_export``)."""
    values = sorted(set(mults.values()))
    return json.dumps({
        "tool": "cna-export",
        "version": __version__,
        "fold": fold,
        "manifest": MANIFEST_FILE,
        "circuit_sha256": circuit_sha,
        "neurons": len(mults),
        "multiplier": values[0] if len(values) == 1 else "per-neuron",
        "tensors": {name: len(idx) for name, (_, idx, _) in entries.items()},
    }, separators=(",", ":"))
