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

import math
import time
from dataclasses import dataclass, field

import numpy as np

from ..core.errors import CnaError
from ..core.progress import bar as progress_bar
from ..core.settings.audit import RANK1_SHARE  # top singular value's share of a change's energy for a "rank-1" edit
from ..io.quant_types import COARSE_ERROR, QUANT_TYPES, TORCH_FLOAT_NAMES
from ..io.weights import TensorEntry, WeightSource, open_weights, pair_entries
from .abliteration import RANK_K, DirectionalFinding, DirectionalScan
from .compare import RESIDUAL_WRITERS, Expectation, _LayerInfo, compare_tensor
from .diff_report import DiffReport, SourceInfo, TensorDiff

# Representation errors are facts of the GGML type records (io.quant_types): the unit roundoff of float
# types, and for block types the largest error of a quantised value as a fraction of its row's largest magnitude.
_FLOAT_NAMES = TORCH_FLOAT_NAMES
_UNIT_ROUNDOFF = {t.name: t.representation_error for t in QUANT_TYPES.values() if t.kind == "float"}
QUANT_ERROR = {t.name: t.representation_error for t in QUANT_TYPES.values() if t.kind == "block"}
_COARSE_QUANT_ERROR = COARSE_ERROR  # 2-bit and below, and types without a record
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
# Whole checkpoints
# ---------------------------------------------------------------------------


def source_info(src: WeightSource) -> SourceInfo:
    return SourceInfo(spec=src.spec, path=str(src.path), format="gguf" if src.kind == "gguf" else "safetensors",
                      architecture=src.arch.model_type, num_layers=src.num_layers, tensors=len(src.entries),
                      description=src.describe())


def _layer_info(src: WeightSource) -> dict[int, _LayerInfo]:
    out: dict[int, _LayerInfo] = {}
    for layer in range(src.num_layers):
        down = src.find("ffn_down", layer)
        out[layer] = _LayerInfo(n_ff=int(down.shape[1]) if down is not None and len(down.shape) == 2 else None,
                                fused_up=src.arch.fused_gate_up)
    return out


@dataclass
class _Walk:
    """One pass over both checkpoints' tensors (:func:`diff_sources`)."""

    a: WeightSource
    b: WeightSource
    rank1_share: float
    expect: Expectation | None
    scan: DirectionalScan | None
    infos: dict[int, _LayerInfo]
    tensors: list[TensorDiff] = field(default_factory=list)
    scanned: dict[str, tuple[TensorEntry, TensorEntry, list[int]]] = field(default_factory=dict)

    def pair(self, name: str, ea: TensorEntry | None, eb: TensorEntry | None) -> None:
        """Compare one pair of tensors (one side missing, shapes differ, same bytes, or read and compared)."""
        if ea is None or eb is None:
            e = ea or eb
            assert e is not None
            self.tensors.append(TensorDiff(name, e.role, e.layer, list(e.shape) if ea else None,
                                           list(e.shape) if eb else None, ea.storage if ea else None,
                                           eb.storage if eb else None, "only_a" if eb is None else "only_b"))
            return
        status = "shape_mismatch" if ea.shape != eb.shape else "identical"
        expected = self.expect is not None and ea.role == self.expect.role and ea.layer in self.expect.slices
        if status == "shape_mismatch" or (self.a.same_bytes(ea, self.b, eb) and not expected):
            self.tensors.append(TensorDiff(name, ea.role, ea.layer, list(ea.shape), list(eb.shape), ea.storage,
                                           eb.storage, status))
            return
        A = self.a.read(ea)
        B = self.b.read(eb)
        info = self.infos.get(ea.layer, _LayerInfo()) if ea.layer is not None else _LayerInfo()
        td = compare_tensor(name, ea, eb, A, B, self.a, self.b, info, self.rank1_share,
                            PairTolerance(ea.storage, eb.storage), self.expect)
        self.tensors.append(td)
        if self.scan is not None and ea.role in RESIDUAL_WRITERS and A.ndim == 2 and ea.suffix == "weight":
            cols = sorted(td.scaled) if td.scale_axis == "column" else []  # scaled neurons are CNA's, not this
            self.scanned[name] = (ea, eb, cols)
            self.scan.add(name, ea.role, ea.layer, RESIDUAL_WRITERS[ea.role], A, _unscale(A, B, cols))

    def read_pair(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """A scanned writer read again (the low-rank analysis's second pass)."""
        ea, eb, cols = self.scanned[name]
        A = self.a.read(ea)
        return A, _unscale(A, self.b.read(eb), cols)

    def lowrank(self) -> DirectionalFinding | None:
        if self.scan is None or not self.scanned:
            return None
        return self.scan.finish(self.read_pair, rank1_share=self.rank1_share)


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
    t0 = time.perf_counter()
    if a.arch.model_type != b.arch.model_type and (a.arch.gguf.arch[0] != b.arch.gguf.arch[0]):
        raise CnaError(f"cannot compare a {a.arch.model_type} model with a {b.arch.model_type} model")
    pairs = pair_entries(a, b)
    scan = DirectionalScan(a.hidden_size, rank_k=rank_k or RANK_K) if lowrank else None
    walk = _Walk(a, b, rank1_share, expect, scan, _layer_info(a))
    bar = progress_bar(progress, total=len(pairs), desc="diff", unit="tensor")
    for name, ea, eb in pairs:
        walk.pair(name, ea, eb)
        bar.update(1)
    bar.close()
    neurons, sources = _collect_neurons(walk.tensors)
    finding = walk.lowrank()
    return DiffReport(
        a=source_info(a), b=source_info(b), tensors=walk.tensors, neurons=neurons, neuron_sources=sources,
        metadata_differences=a.metadata_differences(b), rank1_share=rank1_share, seconds=time.perf_counter() - t0,
        lowrank=finding,
    )


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


def _collect_neurons(tensors: list[TensorDiff]
                     ) -> tuple[dict[tuple[int, int], float], dict[tuple[int, int], list[str]]]:
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
