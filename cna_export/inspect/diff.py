"""Compare two checkpoints tensor by tensor and recognise steering edits in the difference.

``diff_checkpoints(a, b)`` streams both checkpoints (safetensors folders or
GGUF files, in any combination) through :mod:`cna_export.io.weights`: one
tensor of each side in memory at a time, paired by canonical name, compared
as dequantised float values. Each tensor is *identical* (same values),
*equivalent* (values differ only within what a change of storage format
explains: dtype rounding, quantisation), *changed*, or present in one
checkpoint only.

Changed tensors are then explained, when possible, by one of two structures:

* **neuron scaling** (what CNA export does): a column ``j`` of ``down_proj``,
  a row ``j`` of ``up_proj`` (the up half of a fused ``gate_up_proj``), or
  element ``j`` of the up bias is the base's times a constant ``m``, within the
  tolerance of the storage format; a zeroed ``gate_proj`` row is an ablation
  too (``act(0) = 0``). The multiplier is estimated by least squares and
  snapped to the shortest decimal consistent with the data. A neuron scaled
  in several tensors gets the product.
* **a rank-1 directional edit** (abliteration, ``W' = W - r r^T W``) of a
  residual-writing matrix (``o_proj``, ``down_proj``, the embeddings and
  ``lm_head``): the share of the change's energy carried by its top singular
  value (``s1^2 / sum s^2``, from the Gram matrix on the hidden side) and the
  direction ``r`` (the top singular vector on the hidden side). Whether the
  edit removed everything the matrix wrote along ``r`` is reported as the
  ratio of the projections after and before.

Whatever is left is an *other change*, reported with its statistics
(relative Frobenius change, changed rows and columns, top singular share).

Tolerances. Within one storage format any difference counts, and a scaled
slice must match ``m`` times the base within the rounding of a fold in that
format (``2u + 2^-22`` relative for floats with unit roundoff ``u``;
``2^-9`` of the row's largest magnitude for quantised rows, whose fp16 scale
fields carry the multiplier). Across formats (a GGUF against a safetensors
folder, or two quantisations) each side's representation error is added:
``u`` relative for floats, a fraction of the row's largest magnitude for
quantised types (:data:`QUANT_ERROR`). Edits far smaller than a format's
quantisation step cannot be told from quantisation noise across formats.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from ..core.circuit import neuron_fields
from ..core.errors import CnaError
from ..core.multipliers import describe_multipliers, multiplier_counts  # noqa: F401  (re-exported)
from ..core.progress import bar as progress_bar
from ..io.weights import TensorEntry, WeightSource, open_weights, pair_entries
from .abliteration import layer_ranges

log = logging.getLogger(__name__)

from ..core.settings import RANK1_SHARE  # noqa: E402  top singular value's share of a change's energy for a "rank-1" edit
EXPLAINED_RESIDUAL = 0.25  # a scaled slice's residual energy must be at most this share of its change
RESIDUAL_WRITERS = {"attn_output": 0, "ffn_down": 0, "token_embd": 1, "output": 1}  # role -> hidden axis
NEURON_ROLES = ("ffn_down", "ffn_up", "ffn_gate")
_CHUNK_ELEMENTS = 1 << 24

_FLOAT_NAMES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_UNIT_ROUNDOFF = {"F64": 2.0**-53, "F32": 2.0**-24, "F16": 2.0**-11, "BF16": 2.0**-8}
# Largest representation error of a quantised value, as a fraction of its row's largest magnitude
# (generous: half a quantisation step plus the rounding of sub-block scales).
QUANT_ERROR = {
    "Q8_0": 0.01, "Q8_1": 0.01, "Q8_K": 0.01, "Q6_K": 0.04,
    "Q5_0": 0.06, "Q5_1": 0.06, "Q5_K": 0.06,
    "Q4_0": 0.12, "Q4_1": 0.12, "Q4_K": 0.12, "IQ4_NL": 0.12, "IQ4_XS": 0.12, "MXFP4": 0.12,
    "Q3_K": 0.25, "IQ3_XXS": 0.25, "IQ3_S": 0.25,
}  # fmt: skip
_COARSE_QUANT_ERROR = 0.6  # 2-bit and below
_INT_STORAGES = ("I8", "I16", "I32", "I64", "int8", "int16", "int32", "int64", "uint8", "bool")


# ---------------------------------------------------------------------------
# Tolerances
# ---------------------------------------------------------------------------


def normal_storage(storage: str) -> str:
    """One spelling for a storage type: safetensors float dtypes as GGML names (float32 -> F32)."""
    return _FLOAT_NAMES.get(storage, storage)


@dataclass(frozen=True)
class StorageError:
    """Error bound of a value in some storage: ``rtol * |v| + qfrac * rowmax + atol``."""

    rtol: float = 0.0
    qfrac: float = 0.0
    atol: float = 0.0


def representation_error(storage: str) -> StorageError:
    """How far a stored value can be from the value it was converted from."""
    s = normal_storage(storage)
    if s in _UNIT_ROUNDOFF:
        return StorageError(rtol=_UNIT_ROUNDOFF[s], atol=2.0**-25 if s == "F16" else 0.0)
    if s in _INT_STORAGES:
        return StorageError(atol=0.5)
    return StorageError(qfrac=QUANT_ERROR.get(s, _COARSE_QUANT_ERROR))


def fold_error(storage: str) -> StorageError:
    """How far ``m`` times a stored value, folded into the same storage, can be from the exact product
    (per unit of ``|m|``)."""
    s = normal_storage(storage)
    if s in _UNIT_ROUNDOFF:
        return StorageError(rtol=2 * _UNIT_ROUNDOFF[s] + 2.0**-22, atol=2.0**-24 if s == "F16" else 0.0)
    if s in _INT_STORAGES:
        return StorageError(atol=1.0)
    # fp16 scale fields rounded once; subnormal fields lose up to 2^-25 absolute per quant unit (<= 127)
    return StorageError(qfrac=2.0**-9, atol=127 * 2.0**-25)


@dataclass(frozen=True)
class PairTolerance:
    """Tolerances for comparing a tensor stored as ``storage_a`` with one stored as ``storage_b``."""

    storage_a: str
    storage_b: str

    @property
    def exact(self) -> bool:
        return normal_storage(self.storage_a) == normal_storage(self.storage_b)

    @property
    def a(self) -> StorageError:
        return representation_error(self.storage_a)

    @property
    def b(self) -> StorageError:
        return representation_error(self.storage_b)

    def changed(self, A: np.ndarray, B: np.ndarray, rmA: np.ndarray, rmB: np.ndarray) -> np.ndarray:
        """Elements of B that differ from A beyond what the formats explain (2-D blocks, rm*: [rows, 1])."""
        with np.errstate(invalid="ignore"):
            if self.exact:
                return (A != B) & ~(np.isnan(A) & np.isnan(B))
            a, b = self.a, self.b
            tol = a.rtol * np.abs(A) + b.rtol * np.abs(B) + a.qfrac * rmA + b.qfrac * rmB + (a.atol + b.atol)
            d = np.abs(B - A)
            return ~(d <= tol)

    def scaled(self, a: np.ndarray, b: np.ndarray, m: np.ndarray, rmA: np.ndarray, rmB: np.ndarray) -> np.ndarray:
        """Per slice (rows of ``a``/``b``): is ``b`` equal to ``m * a`` within tolerance? ``m``: [n, 1]."""
        f = fold_error(self.storage_b)
        am = np.abs(m)
        ma = m * a
        tol = f.rtol * np.abs(ma) + f.qfrac * am * rmA + f.atol * am
        if not self.exact:
            ea, eb = self.a, self.b
            tol = tol + ea.rtol * np.abs(ma) + ea.qfrac * am * rmA + ea.atol * am
            tol = tol + eb.rtol * np.abs(b) + eb.qfrac * rmB + eb.atol
        with np.errstate(invalid="ignore"):
            return np.all(np.abs(b - ma) <= tol, axis=1)

    def snap_slack(self) -> float:
        """Relative slack allowed between a snapped multiplier and the least-squares estimate."""
        f = fold_error(self.storage_b)
        return 4 * max(f.rtol, f.qfrac)


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


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
        d = asdict(self)
        d["scaled"] = {str(k): v for k, v in sorted(self.scaled.items())}
        if self.rank1 is not None and (not directions or not self.rank1.direction):
            d["rank1"].pop("direction")
        return d


@dataclass
class DirectionalEdit:
    """Rank-1 edits of residual-writing matrices, grouped."""

    tensors: list[str]
    layers: list[int]
    embeddings: list[str]  # token_embd / output tensors among them
    consistency: float  # smallest |cos| between a tensor's direction and the reference direction
    direction: list[float]  # reference direction (of the largest change)
    ablated: bool  # every edit removed (almost) everything along its direction


@dataclass
class DiffReport:
    a: dict
    b: dict
    tensors: list[TensorDiff]
    neurons: dict[tuple[int, int], float]
    neuron_sources: dict[tuple[int, int], list[str]]
    metadata_differences: list[str]
    rank1_share: float
    seconds: float = 0.0
    lowrank: Any = None  # abliteration.DirectionalFinding: low-rank directional edits along one shared direction

    # -- views ---------------------------------------------------------------
    def count(self, status: str) -> int:
        return sum(t.status == status for t in self.tensors)

    @property
    def identical(self) -> bool:
        return not any(t.differs for t in self.tensors)

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
        lr = self.lowrank if self.lowrank is not None and self.lowrank.detected else None
        along = {w.name for w in lr.support()} if lr is not None else set()
        return [t for t in self.tensors if t.differs and (t.structure is None or "other" in t.structure)
                and t.name not in along]

    def findings(self) -> list[dict]:
        """What the difference consists of: cna scaling, directional edits, other changes."""
        out: list[dict] = []
        lr = self.lowrank if self.lowrank is not None and self.lowrank.detected else None
        if self.neurons:
            out.append({"kind": "cna", "neurons": len(self.neurons),
                        "layers": sorted({k[0] for k in self.neurons}),
                        "multipliers": multiplier_counts(self.neurons.values()),
                        "summary": f"CNA neuron scaling: {neuron_summary(self.neurons)}"})
        d = self.directional()
        if lr is not None:  # the low-rank analysis (inspect/abliteration.py) supersedes the rank-1 grouping
            fl = lr.support()
            out.append({"kind": "directional", "layers": lr.layers, "tensors": [w.name for w in fl],
                        "consistency": lr.shared_share, "ablated": lr.ablation, "edit_kind": lr.kind,
                        "profile": {str(k): v for k, v in lr.profile().items()}, "summary": lr.summary()})
        elif d is not None:
            where = layer_ranges(d.layers) if d.layers else "embeddings only"
            extra = f" and {', '.join(d.embeddings)}" if d.embeddings and d.layers else ""
            shared = "one shared direction" if d.consistency >= 0.9 else f"directions differ (min |cos| {d.consistency:.2f})"
            out.append({"kind": "directional", "layers": d.layers, "tensors": d.tensors, "consistency": d.consistency,
                        "ablated": d.ablated,
                        "summary": f"{'directional ablation' if d.ablated else 'rank-1 directional edit'}: layers {where}"
                                   f"{extra} ({len(d.tensors)} residual-writing tensors, {shared})"})
        other = self.other_changes()
        if other:
            kinds: dict[str, int] = {}
            for t in other:
                kinds[t.status] = kinds.get(t.status, 0) + 1
            rel = [t.rel_change for t in other if t.rel_change is not None]
            stats = f", median relative change {float(np.median(rel)):.2e}" if rel else ""
            out.append({"kind": "other", "tensors": len(other), "by_status": kinds,
                        "summary": f"other changes: {len(other)} tensors without steering structure{stats}"})
        return out

    def verdict(self) -> str:
        f = self.findings()
        if not f:
            eq = self.count("equivalent")
            return "no weight differences" + (f" ({eq} tensors equal within storage-format tolerance)" if eq else "")
        return "; ".join(x["summary"] for x in f)

    # -- outputs ---------------------------------------------------------------
    def recovered_circuit(self, identity: Any, notes: Iterable[str] = ()) -> Any:
        from ..core.circuit import Circuit, Neuron, neuron_fields
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
                "base": self.a["spec"],
                "suspect": self.b["spec"],
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
            "a": self.a,
            "b": self.b,
            "verdict": self.verdict(),
            "findings": self.findings(),
            "counts": {s: self.count(s) for s in ("identical", "equivalent", "changed", "only_a", "only_b", "shape_mismatch")},
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
            f"a            {self.a['description']}",
            f"b            {self.b['description']}",
            f"tensors      {self.count('identical')} identical, {self.count('equivalent')} equivalent within format "
            f"tolerance, {self.count('changed')} changed, {self.count('only_a')} only in a, {self.count('only_b')} only in b"
            + (f", {self.count('shape_mismatch')} with different shapes" if self.count("shape_mismatch") else ""),
        ]
        if self.neurons:
            by_layer: dict[int, list[int]] = {}
            for k in self.neurons:
                by_layer.setdefault(k[0], []).append(k[-1])
            lines.append(f"neurons      {neuron_summary(self.neurons)}")
            lines.append("per layer    " + " ".join(f"L{l}:{len(v)}" for l, v in sorted(by_layer.items())))
        d = self.directional()
        if d is not None:
            lines.append(f"directional  rank-1 edits in {len(d.tensors)} tensors, layers {layer_ranges(d.layers) or '-'}"
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
        changed = [t for t in self.tensors if t.differs]
        if changed:
            lines.append(f"changed      (largest first, {min(top, len(changed))} of {len(changed)})")
            changed.sort(key=lambda t: -(t.rel_change if t.rel_change is not None else math.inf))
            for t in changed[:top]:
                lines.append("  " + describe_tensor(t))
        for m in self.metadata_differences[:top]:
            lines.append(f"metadata     {m}")
        if len(self.metadata_differences) > top:
            lines.append(f"metadata     ... {len(self.metadata_differences) - top} more")
        lines.append(f"verdict      {self.verdict()}")
        return "\n".join(lines)


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
        parts.append(f"{t.scale_axis} scaling of {n} neuron{'s' if n != 1 else ''} ({describe_multipliers(t.scaled, 'counts')})")
    if t.rank1 is not None:
        parts.append(f"top singular share {t.rank1.share:.4f}"
                     + (f", projection ratio {t.rank1.projection_ratio:.2e}" if t.rank1.projection_ratio is not None else ""))
    if t.structure:
        parts.append(f"[{t.structure}]")
    return ", ".join(parts)


def neuron_summary(neurons: Mapping[tuple[int, int], float]) -> str:
    layers = sorted({k[0] for k in neurons})
    mult = describe_multipliers(neurons, "phrase")
    n, k = len(neurons), len(layers)
    return f"{n} neuron{'s' if n != 1 else ''} in {k} layer{'s' if k != 1 else ''} ({layer_ranges(layers)}), {mult}"


# ---------------------------------------------------------------------------
# Per-tensor comparison
# ---------------------------------------------------------------------------


def _as_2d(x: np.ndarray) -> np.ndarray:
    return x.reshape(1, -1) if x.ndim <= 1 else x.reshape(-1, x.shape[-1])


def _row_blocks(n_rows: int, n_cols: int) -> Iterable[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(n_cols, 1))
    for s in range(0, n_rows, step):
        yield slice(s, min(n_rows, s + step))


@dataclass
class _Stats:
    changed_rows: np.ndarray
    changed_cols: np.ndarray
    changed_elements: int
    any_difference: bool
    max_abs: float
    diff_sq: float
    base_sq: float


def _compare(A: np.ndarray, B: np.ndarray, tol: PairTolerance, rmA: np.ndarray, rmB: np.ndarray) -> _Stats:
    """Changed rows/columns/elements and norms, in row blocks (bounded temporary memory)."""
    R, C = A.shape
    rows = np.zeros(R, dtype=bool)
    cols = np.zeros(C, dtype=bool)
    n = 0
    any_diff = False
    max_abs = 0.0
    dsq = 0.0
    bsq = 0.0
    for sl in _row_blocks(R, C):
        a, b = A[sl], B[sl]
        mask = tol.changed(a, b, rmA[sl], rmB[sl])
        rows[sl] = mask.any(axis=1)
        cols |= mask.any(axis=0)
        n += int(mask.sum())
        d = (b.astype(np.float64) - a.astype(np.float64))
        with np.errstate(invalid="ignore"):
            if not any_diff:
                any_diff = bool(np.any((a != b) & ~(np.isnan(a) & np.isnan(b))))
            if d.size:
                max_abs = max(max_abs, float(np.nanmax(np.abs(d))) if not np.all(np.isnan(d)) else math.nan)
        dsq += float(np.nansum(d * d))
        bsq += float(np.square(a, dtype=np.float64).sum())
    return _Stats(rows, cols, n, any_diff, max_abs, dsq, bsq)


def _snap(m_hat: np.ndarray, se: np.ndarray, check: Any, slack: float) -> tuple[np.ndarray, np.ndarray]:
    """Shortest decimals within the estimate's uncertainty that pass ``check``; (multipliers, ok)."""
    n = m_hat.shape[0]
    out = np.full(n, np.nan)
    ok = np.zeros(n, dtype=bool)
    delta = np.maximum(4 * se, np.maximum(slack * np.abs(m_hat), 1e-7 * np.maximum(1.0, np.abs(m_hat))))
    for k in range(0, 7):
        todo = ~ok
        if not todo.any():
            break
        cand = np.round(m_hat, k)
        near = todo & (np.abs(cand - m_hat) <= delta)
        if near.any():
            idx = np.nonzero(near)[0]
            passed = check(idx, cand[idx])
            out[idx[passed]] = cand[idx[passed]]
            ok[idx[passed]] = True
    todo = np.nonzero(~ok & np.isfinite(m_hat))[0]
    if todo.size:
        rounded = np.array([float(f"{v:.7g}") for v in m_hat[todo]])
        passed = check(todo, rounded)
        out[todo[passed]] = rounded[passed]
        ok[todo[passed]] = True
    return out, ok


def scaled_slices(
    A: np.ndarray, B: np.ndarray, axis: str, idx: np.ndarray, tol: PairTolerance, rmA: np.ndarray, rmB: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For slices ``idx`` (columns or rows of 2-D A/B): the multiplier each is scaled by, and whether it is.

    Returns (multipliers, ok); ``multipliers[i]`` is NaN where slice ``idx[i]`` is not a scaled copy.
    """
    if idx.size == 0:
        return np.zeros(0), np.zeros(0, dtype=bool)
    if axis == "column":
        a = A[:, idx].T.astype(np.float64)
        b = B[:, idx].T.astype(np.float64)
        ra = np.broadcast_to(rmA[:, 0][None, :], a.shape)
        rb = np.broadcast_to(rmB[:, 0][None, :], b.shape)
    else:
        a = A[idx].astype(np.float64)
        b = B[idx].astype(np.float64)
        ra = np.broadcast_to(rmA[idx], a.shape)
        rb = np.broadcast_to(rmB[idx], b.shape)
    aa = np.einsum("ij,ij->i", a, a)
    ab = np.einsum("ij,ij->i", a, b)
    with np.errstate(invalid="ignore", divide="ignore"):
        m_hat = np.where(aa > 0, ab / aa, np.nan)
        resid = b - m_hat[:, None] * a
        se = np.sqrt(np.einsum("ij,ij->i", resid, resid) / max(a.shape[1] - 1, 1) / aa)
    se = np.where(np.isfinite(se), se, np.inf)

    unscaled = np.einsum("ij,ij->i", b - a, b - a)  # the change if nothing were scaled

    def check(rows: np.ndarray, m: np.ndarray) -> np.ndarray:
        """Within tolerance of m * a, and the scaling explains (>= 75% of the energy of) the change."""
        left = b[rows] - m[:, None] * a[rows]
        explains = np.einsum("ij,ij->i", left, left) <= EXPLAINED_RESIDUAL * unscaled[rows]
        return explains & tol.scaled(a[rows], b[rows], m[:, None], ra[rows], rb[rows])

    return _snap(m_hat, se, check, tol.snap_slack())


def top_eigenvector(G: np.ndarray, iterations: int = 100) -> np.ndarray:
    """Unit eigenvector of the largest eigenvalue of a PSD matrix (power iteration, sign-normalised)."""
    x = G[:, int(np.argmax(np.einsum("ii->i", G)))].copy()
    if not np.any(x):
        x = np.ones(G.shape[0])
    x /= np.linalg.norm(x)
    for _ in range(iterations):
        y = G @ x
        n = np.linalg.norm(y)
        if n == 0:
            break
        y /= n
        done = np.linalg.norm(y - x) < 1e-12
        x = y
        if done:
            break
    return x * (1.0 if x[np.argmax(np.abs(x))] >= 0 else -1.0)


def gram(D: np.ndarray, axis: int) -> np.ndarray:
    """D D^T (axis 0) or D^T D (axis 1) in float64, in bounded chunks."""
    R, C = D.shape
    n = R if axis == 0 else C
    G = np.zeros((n, n), dtype=np.float64)
    if axis == 0:
        step = max(1, _CHUNK_ELEMENTS // max(R, 1))
        for s in range(0, C, step):
            blk = D[:, s : s + step].astype(np.float64)
            G += blk @ blk.T
    else:
        for sl in _row_blocks(R, C):
            blk = D[sl].astype(np.float64)
            G += blk.T @ blk
    return G


def _rank1(D: np.ndarray, hidden_axis: int | None, rank1_share: float) -> Rank1 | None:
    """Top singular component of D from its Gram matrix on the hidden side (or the smaller side).

    The direction is computed only when the component carries at least ``rank1_share`` of the energy.
    """
    R, C = D.shape
    axis = hidden_axis if hidden_axis is not None else (0 if R <= C else 1)
    if (R if axis == 0 else C) > 8192:
        return None
    G = gram(D, axis)
    total = float(np.trace(G))
    if not total > 0 or not math.isfinite(total):
        return None
    w = np.linalg.eigvalsh(G)
    share = float(max(w[-1], 0.0) / total)
    direction = [float(x) for x in top_eigenvector(G)] if share >= rank1_share else []
    return Rank1(share=share, direction=direction, hidden_axis=hidden_axis)


def _projection(W: np.ndarray, r: np.ndarray, hidden_axis: int) -> float:
    if hidden_axis == 0:
        return float(np.linalg.norm(r @ W.astype(np.float64)))
    return float(np.linalg.norm(W.astype(np.float64) @ r))


@dataclass
class _LayerInfo:
    n_ff: int | None = None
    fused_up: bool = False


@dataclass
class Expectation:
    """Slices that must be scaled by given multipliers (a manifest check): role -> layer -> {slice: m}."""

    role: str
    slices: dict[int, dict[int, float]]  # layer -> {slice index in the stored tensor: multiplier}
    results: dict[tuple[int, int], bool] = field(default_factory=dict)  # (layer, slice) -> matched


def compare_tensor(
    name: str,
    ea: TensorEntry,
    eb: TensorEntry,
    A: np.ndarray,
    B: np.ndarray,
    a_src: WeightSource,
    b_src: WeightSource,
    info: _LayerInfo,
    rank1_share: float,
    expect: Expectation | None = None,
) -> TensorDiff:
    """Compare one pair of tensors (already read) and explain the change."""
    td = TensorDiff(name, ea.role, ea.layer, list(ea.shape), list(eb.shape), ea.storage, eb.storage, "identical")
    tol = PairTolerance(ea.storage, eb.storage)
    role = ea.role
    expert = _expert_tensor(name, a_src.arch) if role is None else None
    if expert is not None and expert[1] is not None:  # a per-expert down projection [hidden, width]
        role, td.layer, td.expert = "ffn_down", expert[0], expert[1]
    elif role in ("ffn_down_shexp", "ffn_up_shexp", "ffn_gate_shexp"):  # the shared expert: a dense MLP
        role, td.expert = role.removesuffix("_shexp"), -1
    elif role in ("ffn_up_exps", "ffn_gate_exps") and A.ndim == 3 and A.shape == B.shape:
        # [experts, n_ff, hidden]: rows e * n_ff + j
        td.expert_width = int(A.shape[1])
        A, B = A.reshape(-1, A.shape[2]), B.reshape(-1, B.shape[2])
        role = role.removesuffix("_exps")
    elif (role == "ffn_down_exps" or expert is not None) and A.ndim == 3 and A.shape == B.shape:
        # fused [experts, hidden, width]: columns e * width + j of [hidden, experts * width]
        if expert is not None:
            td.layer = expert[0]
        td.expert_width = int(A.shape[2])
        A = np.ascontiguousarray(A.transpose(1, 0, 2)).reshape(A.shape[1], -1)
        B = np.ascontiguousarray(B.transpose(1, 0, 2)).reshape(B.shape[1], -1)
        role = "ffn_down"
    A2, B2 = _as_2d(A), _as_2d(B)
    rmA = a_src.rows_max_abs(ea, A2)
    rmB = b_src.rows_max_abs(eb, B2)
    st = _compare(A2, B2, tol, rmA, rmB)
    td.rel_change = math.sqrt(st.diff_sq / st.base_sq) if st.base_sq > 0 else (0.0 if st.diff_sq == 0 else math.inf)
    td.max_abs = st.max_abs
    td.changed_elements = st.changed_elements
    if A.ndim == 2:
        td.changed_rows = int(st.changed_rows.sum())
        td.changed_cols = int(st.changed_cols.sum())
    if expect is not None and ea.layer in expect.slices and ea.role == expect.role:
        _check_expected(A2, B2, ea, tol, rmA, rmB, expect)
    if not st.any_difference:
        return td
    if st.changed_elements == 0:
        td.status = "equivalent"
        return td
    td.status = "changed"

    explained_rows = np.zeros(A2.shape[0], dtype=bool)
    explained_cols = np.zeros(A2.shape[1], dtype=bool)
    if A.ndim == 2 and role in NEURON_ROLES and (ea.suffix == "weight" or td.expert_width):
        axis = "column" if role == "ffn_down" else "row"
        changed = np.nonzero(st.changed_cols if axis == "column" else st.changed_rows)[0]
        mult, ok = scaled_slices(A2, B2, axis, changed, tol, rmA, rmB)
        for j, m, good in zip(changed, mult, ok):
            if not good or m == 1.0:
                continue
            neuron = int(j)
            if role == "ffn_up" and info.fused_up and info.n_ff and td.expert is None and not td.expert_width:
                if j < info.n_ff:  # gate half of a fused gate_up: only an ablation is a neuron edit
                    if m != 0.0:
                        continue
                else:
                    neuron = int(j) - info.n_ff
            if role == "ffn_gate" and m != 0.0:
                continue
            td.scaled[neuron] = float(m)
            if axis == "column":
                explained_cols[j] = True
            else:
                explained_rows[j] = True
        td.scale_axis = axis
        td.unexplained = int(changed.size - len(td.scaled))
    elif A.ndim == 1 and role == "ffn_up" and ea.suffix == "bias":
        changed = np.nonzero(tol.changed(A2, B2, rmA, rmB)[0])[0]
        for j in changed:
            a, b = float(A2[0, j]), float(B2[0, j])
            if a != 0.0:
                td.scaled[int(j) - (info.n_ff if info.fused_up and info.n_ff and j >= info.n_ff else 0)] = b / a
        td.scale_axis = "element"
        td.unexplained = int(changed.size - len(td.scaled))  # reconciled with the up rows later
        td.structure = "scaling" if td.scaled else "other"
        return td

    left_rows = st.changed_rows & ~explained_rows
    left_cols = st.changed_cols & ~explained_cols
    leftover = bool(left_rows.any()) and bool(left_cols.any())
    if not leftover:
        td.structure = "scaling"
        return td
    D = (B2.astype(np.float32) - A2.astype(np.float32))
    if explained_cols.any():
        D[:, explained_cols] = 0.0
    if explained_rows.any():
        D[explained_rows, :] = 0.0
    hidden_axis = RESIDUAL_WRITERS.get(role or "") if A.ndim == 2 else None
    r1 = _rank1(D, hidden_axis, rank1_share) if A.ndim == 2 else None
    del D
    kind = "other"
    if r1 is not None:
        td.rank1 = r1
        if hidden_axis is not None and r1.share >= rank1_share:
            r = np.asarray(r1.direction)
            before = _projection(A2, r, hidden_axis)
            after = _projection(B2, r, hidden_axis)
            r1.projection_ratio = after / before if before > 0 else None
            kind = "rank-1"
    td.structure = kind if not td.scaled else f"scaling+{kind}"
    return td


def _check_expected(
    A2: np.ndarray, B2: np.ndarray, ea: TensorEntry, tol: PairTolerance, rmA: np.ndarray, rmB: np.ndarray,
    expect: Expectation,
) -> None:
    want = expect.slices[ea.layer]
    axis = "column" if expect.role == "ffn_down" else "row"
    idx = np.array(sorted(want), dtype=np.int64)
    limit = A2.shape[1] if axis == "column" else A2.shape[0]
    inside = idx[idx < limit]
    for j in idx[idx >= limit]:
        expect.results[(ea.layer, int(j))] = False
    if inside.size == 0:
        return
    m = np.array([want[int(j)] for j in inside], dtype=np.float64)
    if axis == "column":
        a, b = A2[:, inside].T.astype(np.float64), B2[:, inside].T.astype(np.float64)
        ra = np.broadcast_to(rmA[:, 0][None, :], a.shape)
        rb = np.broadcast_to(rmB[:, 0][None, :], b.shape)
    else:
        a, b = A2[inside].astype(np.float64), B2[inside].astype(np.float64)
        ra, rb = np.broadcast_to(rmA[inside], a.shape), np.broadcast_to(rmB[inside], b.shape)
    ok = tol.scaled(a, b, m[:, None], ra, rb)
    for j, good in zip(inside, ok):
        expect.results[(ea.layer, int(j))] = bool(good)


# ---------------------------------------------------------------------------
# Whole checkpoints
# ---------------------------------------------------------------------------


def source_info(src: WeightSource) -> dict:
    return {
        "spec": src.spec,
        "path": str(src.path),
        "format": "gguf" if src.kind == "gguf" else "safetensors",
        "architecture": src.arch.model_type,
        "num_layers": src.num_layers,
        "tensors": len(src.entries),
        "description": src.describe(),
    }


def _layer_info(src: WeightSource) -> dict[int, _LayerInfo]:
    out: dict[int, _LayerInfo] = {}
    for layer in range(src.num_layers):
        down = src.find("ffn_down", layer)
        out[layer] = _LayerInfo(n_ff=int(down.shape[1]) if down is not None and len(down.shape) == 2 else None,
                                fused_up=src.arch.fused_gate_up)
    return out


def diff_sources(
    a: WeightSource,
    b: WeightSource,
    rank1_share: float = RANK1_SHARE,
    expect: Expectation | None = None,
    progress: bool = False,
    lowrank: bool = True,
    rank_k: int | None = None,
) -> DiffReport:
    """Compare two opened checkpoints tensor by tensor (one tensor of each side in memory at a time).

    ``lowrank``: also run the low-rank directional analysis of the residual writers
    (:mod:`cna_export.inspect.abliteration`, which reads those tensors a second time)."""
    from .abliteration import RANK_K, DirectionalScan

    t0 = time.perf_counter()
    if a.arch.model_type != b.arch.model_type and (a.arch.gguf.arch[0] != b.arch.gguf.arch[0]):
        raise CnaError(f"cannot compare a {a.arch.model_type} model with a {b.arch.model_type} model")
    pairs = pair_entries(a, b)
    infos = _layer_info(a)
    tensors: list[TensorDiff] = []
    scan = DirectionalScan(a.hidden_size, rank_k=rank_k or RANK_K) if lowrank else None
    scanned: dict[str, tuple[TensorEntry, TensorEntry, list[int]]] = {}
    bar = progress_bar(progress, total=len(pairs), desc="diff", unit="tensor")
    for name, ea, eb in pairs:
        if ea is None or eb is None:
            e = ea or eb
            assert e is not None
            tensors.append(TensorDiff(name, e.role, e.layer, list(e.shape) if ea else None, list(e.shape) if eb else None,
                                      ea.storage if ea else None, eb.storage if eb else None,
                                      "only_a" if eb is None else "only_b"))
        elif ea.shape != eb.shape:
            tensors.append(TensorDiff(name, ea.role, ea.layer, list(ea.shape), list(eb.shape), ea.storage, eb.storage,
                                      "shape_mismatch"))
        elif a.same_bytes(ea, b, eb) and not (expect is not None and ea.role == expect.role and ea.layer in expect.slices):
            tensors.append(TensorDiff(name, ea.role, ea.layer, list(ea.shape), list(eb.shape), ea.storage, eb.storage,
                                      "identical"))
        else:
            A = a.read(ea)
            B = b.read(eb)
            info = infos.get(ea.layer, _LayerInfo()) if ea.layer is not None else _LayerInfo()
            tensors.append(compare_tensor(name, ea, eb, A, B, a, b, info, rank1_share, expect))
            if scan is not None and ea.role in RESIDUAL_WRITERS and A.ndim == 2 and ea.suffix == "weight":
                td = tensors[-1]
                cols = sorted(td.scaled) if td.scale_axis == "column" else []  # scaled neurons are CNA's, not this
                scanned[name] = (ea, eb, cols)
                scan.add(name, ea.role, ea.layer, RESIDUAL_WRITERS[ea.role], A, _unscale(A, B, cols))
            del A, B
        bar.update(1)
    bar.close()
    neurons, sources = _collect_neurons(tensors)
    finding = None
    if scan is not None and scanned:

        def read_pair(n: str) -> tuple[np.ndarray, np.ndarray]:
            ea, eb, cols = scanned[n]
            A = a.read(ea)
            return A, _unscale(A, b.read(eb), cols)

        finding = scan.finish(read_pair, rank1_share=rank1_share)
    return DiffReport(
        a=source_info(a), b=source_info(b), tensors=tensors, neurons=neurons, neuron_sources=sources,
        metadata_differences=a.metadata_differences(b), rank1_share=rank1_share, seconds=time.perf_counter() - t0,
        lowrank=finding,
    )


def _expert_tensor(name: str, arch: Any) -> tuple[int, int | None] | None:
    """(layer, expert) when ``name`` is a per-expert down projection of the architecture's MoE layout,
    (layer, None) when it is a fused 3-D one."""
    import re

    if arch.moe is None:
        return None
    for template in arch.moe.checkpoint_fused_down:
        m = re.fullmatch(re.escape(template).replace(r"\{layer\}", r"(\d+)"), name)
        if m:
            return int(m.group(1)), None
    for template in arch.moe.checkpoint_expert_down:
        pattern = re.escape(template).replace(r"\{layer\}", r"(?P<layer>\d+)").replace(r"\{expert\}", r"(?P<expert>\d+)")
        m = re.fullmatch(pattern, name)
        if m:
            return int(m.group("layer")), int(m.group("expert"))
    return None


def _neuron_key(t: TensorDiff, j: int) -> tuple[int, ...]:
    if t.expert_width:
        return (t.layer, j // t.expert_width, j % t.expert_width)  # type: ignore[return-value]
    if t.expert is not None:
        return (t.layer, t.expert, j)  # type: ignore[return-value]
    return (t.layer, j)  # type: ignore[return-value]


def _unscale(A: np.ndarray, B: np.ndarray, cols: list[int]) -> np.ndarray:
    """B with the columns a neuron scaling explains put back to A's (left out of the directional analysis)."""
    if not cols:
        return B
    B = B.copy()
    B[:, cols] = A[:, cols]
    return B


def _collect_neurons(tensors: list[TensorDiff]) -> tuple[dict[tuple[int, int], float], dict[tuple[int, int], list[str]]]:
    """Combine per-tensor scalings into neuron multipliers (products across tensors of the same neuron)."""
    mults: dict[tuple[int, int], float] = {}
    sources: dict[tuple[int, int], list[str]] = {}
    up_rows: dict[tuple[int, int], float] = {}
    for t in tensors:
        if t.layer is None or not t.scaled or t.scale_axis == "element":
            continue
        for j, m in t.scaled.items():
            key = _neuron_key(t, j)
            mults[key] = mults.get(key, 1.0) * m
            sources.setdefault(key, []).append(t.name)
            if t.role == "ffn_up":
                up_rows[key] = m
    for t in tensors:  # up biases must follow their up rows
        if t.scale_axis != "element" or t.layer is None:
            continue
        bad = 0
        for j, m in list(t.scaled.items()):
            row_m = up_rows.get((t.layer, j))
            if row_m is None or not math.isclose(m, row_m, rel_tol=1e-2, abs_tol=1e-6):
                bad += 1
                del t.scaled[j]
            else:
                sources.setdefault((t.layer, j), []).append(t.name)
        t.unexplained += bad
        t.structure = "scaling" if not t.unexplained else ("scaling+other" if t.scaled else "other")
    mults = {k: (0.0 if v == 0 else float(f"{v:.7g}")) for k, v in mults.items() if v != 1.0}
    return dict(sorted(mults.items())), {k: sources[k] for k in sorted(mults)}


def diff_checkpoints(a: str, b: str, rank1_share: float = RANK1_SHARE, progress: bool = False,
                     rank_k: int | None = None) -> DiffReport:
    """Library entry point: open both checkpoints and compare them (two GGUF files in llama.cpp's
    own names and layout, which needs neither transformers nor torch)."""
    from ..io.sources import resolve_source

    both_gguf = all(resolve_source(x).kind == "gguf" for x in (a, b))
    sa = open_weights(a, hf_layout=not both_gguf)
    try:
        sb = open_weights(b, hf_layout=not both_gguf)
        try:
            return diff_sources(sa, sb, rank1_share=rank1_share, progress=progress, rank_k=rank_k)
        finally:
            sb.close()
    finally:
        sa.close()
