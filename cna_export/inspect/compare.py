"""Per-tensor comparison for ``diff``: which elements changed beyond what the storage formats explain,
and whether the change is a neuron scaling (with its multipliers) or a rank-1 edit (module docstring of
:mod:`cna_export.inspect.diff`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

import numpy as np

from ..io.weights import TensorEntry, WeightSource
from .diff_report import Rank1, TensorDiff

EXPLAINED_RESIDUAL = 0.25  # a scaled slice's residual energy must be at most this share of its change
RESIDUAL_WRITERS = {"attn_output": 0, "ffn_down": 0, "token_embd": 1, "output": 1}  # role -> hidden axis
NEURON_ROLES = ("ffn_down", "ffn_up", "ffn_gate")
_CHUNK_ELEMENTS = 1 << 24


class PairTolerance(Protocol):
    """What the comparison needs of the tolerance between two storage formats (:class:`cna_export.inspect.diff.
    PairTolerance`)."""

    def changed(self, A: np.ndarray, B: np.ndarray, rmA: np.ndarray, rmB: np.ndarray) -> np.ndarray: ...

    def scaled(self, a: np.ndarray, b: np.ndarray, m: np.ndarray, rmA: np.ndarray, rmB: np.ndarray) -> np.ndarray: ...

    def snap_slack(self) -> float: ...


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


@dataclass
class _Sides:
    """A pair of tensors as 2-D arrays, with their rows' largest magnitudes and the pair's tolerance."""

    A2: np.ndarray
    B2: np.ndarray
    rmA: np.ndarray
    rmB: np.ndarray
    tol: PairTolerance


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
    tol: PairTolerance,
    expect: Expectation | None = None,
) -> TensorDiff:
    """Compare one pair of tensors (already read, ``tol`` for their storages) and explain the change."""
    td = TensorDiff(name, ea.role, ea.layer, list(ea.shape), list(eb.shape), ea.storage, eb.storage, "identical")
    role, A, B = _layout(td, ea.role, A, B, a_src.arch)
    A2, B2 = _as_2d(A), _as_2d(B)
    sides = _Sides(A2, B2, a_src.rows_max_abs(ea, A2), b_src.rows_max_abs(eb, B2), tol)
    st = _compare(A2, B2, tol, sides.rmA, sides.rmB)
    td.rel_change = math.sqrt(st.diff_sq / st.base_sq) if st.base_sq > 0 else (0.0 if st.diff_sq == 0 else math.inf)
    td.max_abs = st.max_abs
    td.changed_elements = st.changed_elements
    if A.ndim == 2:
        td.changed_rows = int(st.changed_rows.sum())
        td.changed_cols = int(st.changed_cols.sum())
    if expect is not None and ea.layer in expect.slices and ea.role == expect.role:
        _check_expected(A2, B2, ea, tol, sides.rmA, sides.rmB, expect)
    if not st.any_difference:
        return td
    if st.changed_elements == 0:
        td.status = "equivalent"
        return td
    td.status = "changed"
    if A.ndim == 1 and role == "ffn_up" and ea.suffix == "bias":
        _scale_bias(td, sides, info)
        return td
    explained_rows = np.zeros(A2.shape[0], dtype=bool)
    explained_cols = np.zeros(A2.shape[1], dtype=bool)
    if A.ndim == 2 and role in NEURON_ROLES and (ea.suffix == "weight" or td.expert_width):
        _scale_neurons(td, role, sides, st, info, explained_rows, explained_cols)
    if bool((st.changed_rows & ~explained_rows).any()) and bool((st.changed_cols & ~explained_cols).any()):
        kind = _rank1_kind(td, role, sides, explained_rows, explained_cols, rank1_share, A.ndim)
        td.structure = kind if not td.scaled else f"scaling+{kind}"
    else:
        td.structure = "scaling"
    return td


def _layout(td: TensorDiff, role: str | None, A: np.ndarray, B: np.ndarray, arch: Any
            ) -> tuple[str | None, np.ndarray, np.ndarray]:
    """The role a tensor is compared as, and A/B laid out for it (MoE expert tensors as dense MLP ones)."""
    expert = _expert_tensor(td.name, arch) if role is None else None
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
    return role, A, B


def _scale_neurons(td: TensorDiff, role: str, s: _Sides, st: _Stats, info: _LayerInfo,
                   explained_rows: np.ndarray, explained_cols: np.ndarray) -> None:
    """Changed columns (down_proj) or rows (up/gate) that are the base's times a constant: scaled neurons."""
    axis = "column" if role == "ffn_down" else "row"
    changed = np.nonzero(st.changed_cols if axis == "column" else st.changed_rows)[0]
    mult, ok = scaled_slices(s.A2, s.B2, axis, changed, s.tol, s.rmA, s.rmB)
    for j, m, good in zip(changed, mult, ok, strict=True):
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


def _scale_bias(td: TensorDiff, s: _Sides, info: _LayerInfo) -> None:
    """Changed elements of an up bias, each as a multiplier (reconciled with the up rows later)."""
    changed = np.nonzero(s.tol.changed(s.A2, s.B2, s.rmA, s.rmB)[0])[0]
    for j in changed:
        a, b = float(s.A2[0, j]), float(s.B2[0, j])
        if a != 0.0:
            td.scaled[int(j) - (info.n_ff if info.fused_up and info.n_ff and j >= info.n_ff else 0)] = b / a
    td.scale_axis = "element"
    td.unexplained = int(changed.size - len(td.scaled))
    td.structure = "scaling" if td.scaled else "other"


def _rank1_kind(td: TensorDiff, role: str | None, s: _Sides, explained_rows: np.ndarray, explained_cols: np.ndarray,
                rank1_share: float, ndim: int) -> str:
    """``rank-1`` when what the scaling leaves is a rank-1 edit of a residual writer (``td.rank1``), else ``other``."""
    D = (s.B2.astype(np.float32) - s.A2.astype(np.float32))
    if explained_cols.any():
        D[:, explained_cols] = 0.0
    if explained_rows.any():
        D[explained_rows, :] = 0.0
    hidden_axis = RESIDUAL_WRITERS.get(role or "") if ndim == 2 else None
    r1 = _rank1(D, hidden_axis, rank1_share) if ndim == 2 else None
    del D
    if r1 is None:
        return "other"
    td.rank1 = r1
    if hidden_axis is None or r1.share < rank1_share:
        return "other"
    r = np.asarray(r1.direction)
    before = _projection(s.A2, r, hidden_axis)
    after = _projection(s.B2, r, hidden_axis)
    r1.projection_ratio = after / before if before > 0 else None
    return "rank-1"


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
    for j, good in zip(inside, ok, strict=True):
        expect.results[(ea.layer, int(j))] = bool(good)



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
        pattern = (re.escape(template).replace(r"\{layer\}", r"(?P<layer>\d+)")
                   .replace(r"\{expert\}", r"(?P<expert>\d+)"))
        m = re.fullmatch(pattern, name)
        if m:
            return int(m.group("layer")), int(m.group("expert"))
    return None


