"""What ``diff`` reports: per-tensor results, the typed findings (CNA scaling, directional edit, other
changes) and :class:`DiffReport`, which ``diff --json`` writes and ``audit`` embeds."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import numpy as np

from ..core.circuit import neuron_fields
from ..core.multipliers import describe_multipliers, multiplier_counts
from .abliteration import layer_ranges

if TYPE_CHECKING:
    from .abliteration import DirectionalFinding

STATUSES = ("identical", "equivalent", "changed", "only_a", "only_b", "shape_mismatch")


@dataclass
class SourceInfo:
    """One side of a diff."""

    spec: str
    path: str
    format: str  # gguf | safetensors
    architecture: str
    num_layers: int
    tensors: int
    description: str


@dataclass
class Rank1:
    """The top singular component of a tensor's change."""

    share: float  # s1^2 / sum s^2
    direction: list[float]  # unit vector on the hidden side (residual writers) or the smaller side
    hidden_axis: int | None  # 0: W is [hidden, *]; 1: W is [*, hidden]; None: not a residual writer
    projection_ratio: float | None = None  # |r . W_b| / |r . W_a| (0: everything along r removed)


@dataclass
class TensorDiff:
    name: str
    role: str | None
    layer: int | None
    shape_a: list[int] | None
    shape_b: list[int] | None
    storage_a: str | None
    storage_b: str | None
    status: str  # identical | equivalent | changed | only_a | only_b | shape_mismatch
    rel_change: float | None = None  # ||B - A||_F / ||A||_F
    max_abs: float | None = None
    changed_elements: int | None = None
    changed_rows: int | None = None
    changed_cols: int | None = None
    structure: str | None = None  # scaling | rank-1 | other | scaling+rank-1 | scaling+other
    scaled: dict[int, float] = field(default_factory=dict)  # neuron -> multiplier found in this tensor
    scale_axis: str | None = None  # column | row | element
    unexplained: int = 0  # changed slices (or elements) left after scaling
    rank1: Rank1 | None = None
    notes: list[str] = field(default_factory=list)
    expert: int | None = None  # MoE: the expert of a per-expert or shared down projection (shared: -1)
    expert_width: int | None = None  # MoE: fused 3-D down projection, scaled columns are e * width + j

    @property
    def differs(self) -> bool:
        return self.status in ("changed", "only_a", "only_b", "shape_mismatch")

    def to_dict(self, directions: bool = True) -> dict:
        rank1 = asdict(self.rank1) if self.rank1 is not None else None
        if rank1 is not None and (not directions or not self.rank1.direction):
            rank1 = {k: v for k, v in rank1.items() if k != "direction"}
        return {**asdict(self), "scaled": {str(k): v for k, v in sorted(self.scaled.items())}, "rank1": rank1}


@dataclass
class DirectionalEdit:
    """Rank-1 edits of residual-writing matrices, grouped."""

    tensors: list[str]
    layers: list[int]
    embeddings: list[str]  # token_embd / output tensors among them
    consistency: float  # smallest |cos| between a tensor's direction and the reference direction
    direction: list[float]  # reference direction (of the largest change)
    ablated: bool  # every edit removed (almost) everything along its direction


# -- findings: what the difference consists of ----------------------------------------------------------


@dataclass
class CnaFinding:
    """Scaled neurons (a CNA export)."""

    kind: str = field(default="cna", init=False)
    neurons: int
    layers: list[int]
    multipliers: dict[str, int]  # multiplier (:g) -> neurons
    summary: str


@dataclass
class LowRankFinding:
    """A directional edit found by the low-rank analysis (:mod:`cna_export.inspect.abliteration`)."""

    kind: str = field(default="directional", init=False)
    layers: list[int]
    tensors: list[str]
    consistency: float | None  # the flagged writers' share of spike energy along the one direction
    ablated: bool
    edit_kind: str | None
    profile: dict[str, float]  # layer -> mean strength
    summary: str


@dataclass
class Rank1Finding:
    """Rank-1 edits of residual writers along (nearly) one direction, without the low-rank analysis."""

    kind: str = field(default="directional", init=False)
    layers: list[int]
    tensors: list[str]
    consistency: float
    ablated: bool
    summary: str


@dataclass
class OtherFinding:
    """Changed tensors without steering structure."""

    kind: str = field(default="other", init=False)
    tensors: int
    by_status: dict[str, int]
    summary: str


Finding = CnaFinding | LowRankFinding | Rank1Finding | OtherFinding
STEERING_KINDS = ("cna", "directional")


@dataclass
class DiffReport:
    a: SourceInfo
    b: SourceInfo
    tensors: list[TensorDiff]
    neurons: dict[tuple[int, int], float]
    neuron_sources: dict[tuple[int, int], list[str]]
    metadata_differences: list[str]
    rank1_share: float
    seconds: float = 0.0
    lowrank: DirectionalFinding | None = None  # low-rank directional edits along one shared direction

    # -- views ---------------------------------------------------------------
    def count(self, status: str) -> int:
        return sum(t.status == status for t in self.tensors)

    @property
    def identical(self) -> bool:
        return not any(t.differs for t in self.tensors)

    def detected_lowrank(self) -> DirectionalFinding | None:
        """The low-rank analysis, when it found a directional edit."""
        return self.lowrank if self.lowrank is not None and self.lowrank.detected else None

    def directional(self) -> DirectionalEdit | None:
        edits = [t for t in self.tensors if t.rank1 is not None and t.rank1.hidden_axis is not None
                 and t.structure is not None and "rank-1" in t.structure]
        if not edits:
            return None
        ref = max(edits, key=lambda t: (t.rel_change or 0.0) * math.prod(t.shape_a or [1]))
        r = np.asarray(ref.rank1.direction)
        cos = [abs(float(np.dot(r, np.asarray(t.rank1.direction)))) for t in edits]
        ablated = all(t.rank1.projection_ratio is not None and t.rank1.projection_ratio < 0.05 for t in edits)
        return DirectionalEdit(
            tensors=[t.name for t in edits],
            layers=sorted({t.layer for t in edits if t.layer is not None}),
            embeddings=[t.name for t in edits if t.layer is None],
            consistency=min(cos),
            direction=list(ref.rank1.direction),
            ablated=ablated,
        )

    def other_changes(self) -> list[TensorDiff]:
        lr = self.detected_lowrank()
        along = {w.name for w in lr.support()} if lr is not None else set()
        return [t for t in self.tensors if t.differs and (t.structure is None or "other" in t.structure)
                and t.name not in along]

    def findings(self) -> list[Finding]:
        """What the difference consists of: cna scaling, directional edits, other changes."""
        out: list[Finding] = []
        if self.neurons:
            out.append(CnaFinding(neurons=len(self.neurons), layers=sorted({k[0] for k in self.neurons}),
                                  multipliers=multiplier_counts(self.neurons.values()),
                                  summary=f"CNA neuron scaling: {neuron_summary(self.neurons)}"))
        directional = self._directional_finding()
        if directional is not None:
            out.append(directional)
        other = self.other_changes()
        if other:
            kinds: dict[str, int] = {}
            for t in other:
                kinds[t.status] = kinds.get(t.status, 0) + 1
            rel = [t.rel_change for t in other if t.rel_change is not None]
            stats = f", median relative change {float(np.median(rel)):.2e}" if rel else ""
            out.append(OtherFinding(tensors=len(other), by_status=kinds,
                                    summary=f"other changes: {len(other)} tensors without steering structure{stats}"))
        return out

    def _directional_finding(self) -> LowRankFinding | Rank1Finding | None:
        lr = self.detected_lowrank()
        if lr is not None:  # the low-rank analysis (inspect/abliteration.py) supersedes the rank-1 grouping
            return LowRankFinding(layers=lr.layers, tensors=[w.name for w in lr.support()],
                                  consistency=lr.shared_share, ablated=lr.ablation, edit_kind=lr.kind,
                                  profile={str(k): v for k, v in lr.profile().items()}, summary=lr.summary())
        d = self.directional()
        if d is None:
            return None
        where = layer_ranges(d.layers) if d.layers else "embeddings only"
        extra = f" and {', '.join(d.embeddings)}" if d.embeddings and d.layers else ""
        shared = ("one shared direction" if d.consistency >= 0.9 else
                  f"directions differ (min |cos| {d.consistency:.2f})")
        return Rank1Finding(layers=d.layers, tensors=d.tensors, consistency=d.consistency, ablated=d.ablated,
                            summary=f"{'directional ablation' if d.ablated else 'rank-1 directional edit'}: layers "
                                    f"{where}{extra} ({len(d.tensors)} residual-writing tensors, {shared})")

    def verdict(self) -> str:
        f = self.findings()
        if not f:
            eq = self.count("equivalent")
            return "no weight differences" + (f" ({eq} tensors equal within storage-format tolerance)" if eq else "")
        return "; ".join(x.summary for x in f)

    # -- outputs ---------------------------------------------------------------
    def recovered_circuit(self, identity: Any, notes: Iterable[str] = ()) -> Any:
        from ..core.circuit import Circuit, Neuron
        from ..core.experts import format_key

        neurons = [Neuron(**neuron_fields(k), score=0.0, multiplier=m) for k, m in sorted(self.neurons.items())]
        counts: dict[int, int] = {}
        for n in neurons:
            counts[n.layer] = counts.get(n.layer, 0) + 1
        return Circuit(
            kind="recovered",
            model=identity,
            method={
                "name": "recovered-by-diff",
                "base": self.a.spec,
                "suspect": self.b.spec,
                "sources": {format_key(k): s for k, s in sorted(self.neuron_sources.items())},
                "score": "not measured (0.0): recovered neurons carry their multiplier instead",
            },
            neurons=neurons,
            per_layer_counts=dict(sorted(counts.items())),
            notes=list(notes),
        )

    def to_dict(self) -> dict:
        d = self.directional()
        return {
            "a": asdict(self.a),
            "b": asdict(self.b),
            "verdict": self.verdict(),
            "findings": [asdict(f) for f in self.findings()],
            "counts": {s: self.count(s) for s in STATUSES},
            "neurons": [{**neuron_fields(k), "multiplier": m, "tensors": self.neuron_sources.get(k, [])}
                        for k, m in sorted(self.neurons.items())],
            "directional": asdict(d) if d else None,
            "lowrank": self.lowrank.to_dict() if self.lowrank is not None else None,
            "metadata_differences": self.metadata_differences,
            "rank1_share_threshold": self.rank1_share,
            "tensors": [t.to_dict() for t in self.tensors if t.status != "identical"],
            "identical_tensors": self.count("identical"),
            "seconds": round(self.seconds, 3),
        }

    def render(self, top: int = 20) -> str:
        lines = [
            f"a            {self.a.description}",
            f"b            {self.b.description}",
            f"tensors      {self.count('identical')} identical, {self.count('equivalent')} equivalent within format "
            f"tolerance, {self.count('changed')} changed, {self.count('only_a')} only in a, {self.count('only_b')} "
            "only in b"
            + (f", {self.count('shape_mismatch')} with different shapes" if self.count("shape_mismatch") else ""),
        ]
        lines += self._structure_lines()
        changed = [t for t in self.tensors if t.differs]
        if changed:
            lines.append(f"changed      (largest first, {min(top, len(changed))} of {len(changed)})")
            changed.sort(key=lambda t: -(t.rel_change if t.rel_change is not None else math.inf))
            lines += ["  " + describe_tensor(t) for t in changed[:top]]
        lines += [f"metadata     {m}" for m in self.metadata_differences[:top]]
        if len(self.metadata_differences) > top:
            lines.append(f"metadata     ... {len(self.metadata_differences) - top} more")
        lines.append(f"verdict      {self.verdict()}")
        return "\n".join(lines)

    def _structure_lines(self) -> list[str]:
        """The render's lines on recovered neurons, rank-1 edits and the low-rank analysis."""
        lines = []
        if self.neurons:
            by_layer: dict[int, list[int]] = {}
            for k in self.neurons:
                by_layer.setdefault(k[0], []).append(k[-1])
            lines.append(f"neurons      {neuron_summary(self.neurons)}")
            lines.append("per layer    " + " ".join(f"L{l}:{len(v)}" for l, v in sorted(by_layer.items())))
        d = self.directional()
        if d is not None:
            lines.append(f"directional  rank-1 edits in {len(d.tensors)} tensors, layers "
                         f"{layer_ranges(d.layers) or '-'}"
                         + (f" + {', '.join(d.embeddings)}" if d.embeddings else "")
                         + f"; min |cos| to the main direction {d.consistency:.3f}; "
                         + ("projection removed" if d.ablated else "projection not removed"))
        lr = self.lowrank
        if lr is not None:
            lines.append(f"low rank     hollow spike {lr.spike:.3g} vs permuted {lr.null_spike:.3g} "
                         f"({'coherent' if lr.coherent else 'not coherent'}); flagged writers {len(lr.flagged())}, "
                         f"carrying the edit {len(lr.support())}"
                         + (f", shared share {lr.shared_share:.2f}" if lr.shared_share is not None else ""))
            if lr.detected:
                lines.append("profile      " + " ".join(f"L{l}:{v:.2f}" for l, v in lr.profile().items()))
        return lines


def describe_tensor(t: TensorDiff) -> str:
    if t.status in ("only_a", "only_b"):
        return f"{t.name}: only in {t.status[-1]} ({t.storage_a or t.storage_b} {t.shape_a or t.shape_b})"
    if t.status == "shape_mismatch":
        return f"{t.name}: shape {t.shape_a} -> {t.shape_b}"
    parts = [f"{t.name}: rel {t.rel_change:.3e}"]
    if t.changed_rows is not None:
        parts.append(f"rows {t.changed_rows}/{t.shape_a[0]} cols {t.changed_cols}/{t.shape_a[1]}")
    elif t.changed_elements is not None:
        parts.append(f"elements {t.changed_elements}")
    if t.scaled:
        n = len(t.scaled)
        parts.append(f"{t.scale_axis} scaling of {n} neuron{'s' if n != 1 else ''} "
                     f"({describe_multipliers(t.scaled, 'counts')})")
    if t.rank1 is not None:
        parts.append(f"top singular share {t.rank1.share:.4f}"
                     + (f", projection ratio {t.rank1.projection_ratio:.2e}" if t.rank1.projection_ratio is not None
                        else ""))
    if t.structure:
        parts.append(f"[{t.structure}]")
    return ", ".join(parts)


def neuron_summary(neurons: Mapping[tuple[int, int], float]) -> str:
    layers = sorted({k[0] for k in neurons})
    mult = describe_multipliers(neurons, "phrase")
    n, k = len(neurons), len(layers)
    return f"{n} neuron{'s' if n != 1 else ''} in {k} layer{'s' if k != 1 else ''} ({layer_ranges(layers)}), {mult}"
