"""Folding neuron multipliers into weights: pure functions on torch tensors (and on numpy arrays of stored
elements, :func:`scale_stored`, for the safetensors export, which never imports torch for the usual float types).

A circuit neuron ``j`` of layer ``L`` is the ``j``-th input of ``mlp.down_proj``.
Hook steering multiplies that input by ``m``; because ``down_proj`` is linear,
``W @ (x * s) == (W * s) @ x`` where ``s`` is 1 except ``s[j] = m``, so the same
effect is obtained once and for all by scaling *column* ``j`` of the down_proj
weight (shape ``[hidden, intermediate]``). Scaling *row* ``j`` of up_proj (and
element ``j`` of its bias) is the alternative fold for gated MLPs
(``act(gate x) * up x`` is linear in ``up x``).

Arithmetic: the touched slices are converted to float32 (float64 for float64
tensors), multiplied, and rounded **once** to the tensor's dtype (round to
nearest even). So for float32 tensors the result is the float32 product, exact
for multipliers 0, -1 and powers of two (unless it leaves the normal range);
for bfloat16/float16 tensors each scaled element is within half an ulp of the
exact product. Every other element is returned bit for bit. Inputs are never
modified; each function returns a new tensor.

The inverse direction (which columns differ between two tensors, and by what
factor) is here too, for checks and for auditing third-party checkpoints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

from ..core.errors import CnaError
from ..io.tensor_bytes import int_view

Axis = str  # "column" (dim 1), "row" (dim 0) or "element" (1-D)
_DIMS = {"column": 1, "row": 0, "element": 0}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the multiplication is done in: float32, or float64 for float64 tensors."""
    import torch

    if not dtype.is_floating_point:
        raise CnaError(f"cannot fold a multiplier into a {str(dtype).removeprefix('torch.')} tensor "
                       "(not floating point)")
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(weight: torch.Tensor, axis: Axis, indices: Sequence[int], multipliers: Sequence[float]) -> int:
    if axis not in _DIMS:
        raise ValueError(f"axis must be one of {sorted(_DIMS)}, got {axis!r}")
    want_dims = 1 if axis == "element" else 2
    if weight.dim() != want_dims:
        raise CnaError(f"cannot scale the {axis}s of a tensor of shape {list(weight.shape)} (expected {want_dims}-D)")
    if len(indices) != len(multipliers):
        raise ValueError("indices and multipliers must have the same length")
    dim = _DIMS[axis]
    size = weight.shape[dim]
    if len(set(indices)) != len(indices):
        raise CnaError(f"an index is listed twice in the {axis}s to scale")
    for i in indices:
        if not 0 <= int(i) < size:
            raise CnaError(f"{axis} {i} is out of range for a tensor of shape {list(weight.shape)}")
    return dim


def scale_slices(
    weight: torch.Tensor, axis: Axis, indices: Sequence[int], multipliers: Sequence[float] | float
) -> torch.Tensor:
    """A copy of ``weight`` with the given columns/rows/elements multiplied (one rounding each).

    A 3-D ``[experts, rows, columns]`` tensor (fused MoE experts) counts its columns/rows expert by
    expert: flat index ``e * columns + j`` is column ``j`` of expert ``e`` (rows: ``e * rows + r``)."""
    import torch

    if isinstance(multipliers, (int, float)):
        multipliers = [float(multipliers)] * len(indices)
    if weight.dim() == 3 and axis in ("column", "row"):
        return _scale_experts(weight, axis, indices, multipliers)
    dim = _check(weight, axis, indices, multipliers)
    out = weight.detach().clone()
    if not len(indices):
        return out
    ct = compute_dtype(weight.dtype)
    idx = torch.as_tensor(list(indices), dtype=torch.long, device=weight.device)
    m = torch.as_tensor([float(x) for x in multipliers], dtype=ct, device=weight.device)
    picked = out.index_select(dim, idx).to(ct)
    shape = [1] * weight.dim()
    shape[dim] = len(indices)
    scaled = (picked * m.reshape(shape)).to(weight.dtype)
    out.index_copy_(dim, idx, scaled)
    return out


def scale_stored(values: np.ndarray, dtype: str, axis: Axis, multipliers: Sequence[float]) -> np.ndarray:
    """:func:`scale_slices` of gathered slices held as stored (numpy, :mod:`cna_export.io.float_bits`), without torch.

    ``values`` is 2-D: its columns (``axis="column"``) or rows (``"row"``) are the slices, one multiplier each, and
    ``dtype`` the torch name of its float type (float64, float32, float16 or bfloat16). The same arithmetic and
    the same bits as :func:`scale_slices` (NaNs: :mod:`cna_export.io.float_bits`). Returns a new array."""
    from ..io import float_bits

    if float_bits.storage_dtype(dtype) is None:
        raise CnaError(float_bits.not_foldable(dtype))
    shape = (1, len(multipliers)) if axis == "column" else (len(multipliers), 1)
    ct = float_bits.compute_dtype(dtype)
    m = np.asarray([float(x) for x in multipliers], dtype=ct).reshape(shape)
    return float_bits.narrow(float_bits.widen(values, dtype) * m, dtype)


def _scale_experts(weight: torch.Tensor, axis: Axis, indices: Sequence[int],
                   multipliers: Sequence[float]) -> torch.Tensor:
    size = weight.shape[2] if axis == "column" else weight.shape[1]
    if len(indices) != len(multipliers):
        raise ValueError("indices and multipliers must have the same length")
    if len(set(indices)) != len(indices):
        raise CnaError(f"an index is listed twice in the {axis}s to scale")
    by_expert: dict[int, tuple[list[int], list[float]]] = {}
    for i, m in zip(indices, multipliers):
        if not 0 <= int(i) < weight.shape[0] * size:
            raise CnaError(f"expert {axis} {i} is out of range for a tensor of shape {list(weight.shape)}")
        e, j = divmod(int(i), size)
        by_expert.setdefault(e, ([], []))[0].append(j)
        by_expert[e][1].append(float(m))
    out = weight.detach().clone()
    for e, (js, ms) in sorted(by_expert.items()):
        out[e] = scale_slices(weight[e], axis, js, ms)
    return out


def scale_columns(weight: torch.Tensor, indices: Sequence[int], multipliers: Sequence[float] | float) -> torch.Tensor:
    """Columns ``indices`` of a 2-D weight times ``multipliers`` (the down_proj fold)."""
    return scale_slices(weight, "column", indices, multipliers)


def scale_rows(weight: torch.Tensor, indices: Sequence[int], multipliers: Sequence[float] | float) -> torch.Tensor:
    """Rows ``indices`` of a 2-D weight (or elements of a 1-D bias) times ``multipliers`` (the up_proj fold)."""
    return scale_slices(weight, "element" if weight.dim() == 1 else "row", indices, multipliers)


def changed_slices(before: torch.Tensor, after: torch.Tensor, axis: Axis = "column") -> list[int]:
    """Indices of the columns/rows/elements whose bits differ between ``before`` and ``after``."""
    import torch

    if before.shape != after.shape or before.dtype != after.dtype:
        raise CnaError(
            f"tensors differ in shape or dtype ({list(before.shape)} {before.dtype} vs {list(after.shape)} "
            f"{after.dtype})"
        )
    dim = _DIMS[axis]
    a = before.detach().contiguous().view(int_view(before.dtype))
    b = after.detach().contiguous().view(int_view(after.dtype))
    diff = a != b
    if diff.dim() == 2:
        diff = diff.any(dim=1 - dim)
    return [int(i) for i in torch.nonzero(diff).flatten()]


def estimate_multipliers(
    before: torch.Tensor, after: torch.Tensor, indices: Sequence[int], axis: Axis = "column"
) -> dict[int, dict[str, Any]]:
    """For each index: the least-squares factor ``after ~ m * before`` (float64) and the largest residual."""
    import torch

    dim = _DIMS[axis]
    out: dict[int, dict[str, Any]] = {}
    for i in indices:
        x = before.select(dim, i).to(torch.float64) if before.dim() == 2 else before[i : i + 1].to(torch.float64)
        y = after.select(dim, i).to(torch.float64) if after.dim() == 2 else after[i : i + 1].to(torch.float64)
        denom = float((x * x).sum())
        m = float((x * y).sum()) / denom if denom else float("nan")
        resid = float((y - m * x).abs().max()) if denom else float("nan")
        out[int(i)] = {"multiplier": m, "max_residual": resid}
    return out
