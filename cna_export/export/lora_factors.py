"""The factors of an exact LoRA adapter, in numpy on weights held as stored (no torch).

Scaling columns ``S`` of a down_proj weight ``W`` (``[hidden, intermediate]``) by ``m`` is ``W + B A``:

* ``A`` (``[r, intermediate]``): one one-hot row per neuron (it selects the activations ``x[S]``);
* ``B`` (``[hidden, r]``): the change of the selected columns, ``W'[:, S] - W[:, S]``, where ``W'`` is what the
  safetensors export writes (:func:`cna_export.export.fold.scale_stored`: ``W[:, j] * m`` rounded once to the
  weight's type). The difference is taken in float64 (exact) and rounded once to the adapter's type; where
  ``W + round(B)`` would not round back to ``W'`` (the difference can need more bits than that type has), a
  neighbouring value of it that does is taken, so merging the adapter reproduces the export.

Arrays are held as :mod:`cna_export.io.float_bits` stores them (bfloat16 as ``uint16`` bits), with the torch
name of their type beside them, and every conversion gives torch's bits: a float64 difference reaches float16 or
bfloat16 through float32, as torch converts it. :func:`merged_sha256` hashes ``W + B A`` as PEFT's merge computes
it (in float32, float64 for a float64 weight, cast back once), in row blocks, so a large weight is never widened
whole.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from ..io import float_bits as fb
from ..io.tensor_bytes import byte_view
from .fold import scale_stored

_ROWS = 256  # rows of W merged and hashed at a time by merged_sha256


def to_type(values: np.ndarray, name: str) -> np.ndarray:
    """float32 or float64 ``values`` as stored elements of type ``name``, rounded as torch's ``.to()`` rounds
    (float64 to float16 or bfloat16 through float32)."""
    if values.dtype == np.float64 and name in ("float16", "bfloat16"):
        values = values.astype(np.float32)
    return fb.narrow(values, name)


def next_toward(stored: np.ndarray, name: str, direction: float) -> np.ndarray:
    """The neighbour of each element of ``name`` towards ``direction`` (+inf or -inf), as ``torch.nextafter``."""
    if name != "bfloat16":
        with np.errstate(over="ignore"):  # the largest finite value's neighbour is the infinity
            return np.nextafter(stored, np.array(direction, stored.dtype))
    bits = stored.astype(np.int32)
    value = fb.widen(stored, name)
    up = direction > 0
    toward = np.where(value > 0, 1, -1) * (1 if up else -1)  # +1: away from zero, -1: towards it
    step = np.where(value == 0, 0, toward)
    out = np.where(value == 0, (0x0001 if up else 0x8001), bits + step)
    stuck = np.isnan(value) | (np.isinf(value) & ((value > 0) == up))  # NaN, or already at the infinity
    return np.where(stuck, bits, out).astype(np.uint16)


def _merge(cols: np.ndarray, name: str, delta: np.ndarray, out: str) -> np.ndarray:
    """``cols + delta`` as :func:`merged_sha256` adds a column of B, compared by value (float)."""
    ct = fb.compute_dtype(name)
    return fb.widen(to_type(fb.widen(cols, name, ct) + fb.widen(delta, out, ct), name), name, ct)


def lora_factors(cols: np.ndarray, name: str, indices: Sequence[int], multipliers: Sequence[float], width: int,
                 rank: int | None = None, out: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """``(A, B)`` stored as type ``out`` for the columns ``cols`` (``[hidden, k]``, stored as ``name``) that sit
    at ``indices`` of a weight ``width`` columns wide, each scaled by its multiplier. ``rank`` larger than
    ``k`` pads A with zero rows and B with zero columns, which add exactly nothing."""
    k = len(indices)
    r = k if rank is None else int(rank)
    if r < k:
        raise ValueError(f"rank {r} is smaller than the {k} neurons to steer")
    ct = fb.compute_dtype(name)
    target = scale_stored(cols, name, "column", list(multipliers))
    want = fb.widen(target, name, ct)
    delta = to_type(fb.widen(target, name, np.float64) - fb.widen(cols, name, np.float64), out)
    for _ in range(2):
        off = _merge(cols, name, delta, out) != want
        if not off.any():
            break
        for direction in (np.inf, -np.inf):
            step = next_toward(delta, out, direction)
            fixed = off & (_merge(cols, name, step, out) == want)
            delta = np.where(fixed, step, delta)
            off &= ~fixed
    storage = fb.STORAGE[out]
    a = np.zeros((r, width), storage)
    a[np.arange(k), np.asarray(indices, dtype=np.int64)] = to_type(np.ones(1, np.float32), out)[0]
    b = np.zeros((cols.shape[0], r), storage)
    b[:, :k] = delta
    return a, b


def plus_zero(stored: np.ndarray, name: str, zero: np.ndarray | float) -> np.ndarray:
    """Stored elements of ``name`` plus a zero (``zero``: +0.0 or -0.0 per row, shaped ``[rows, 1]``, or one
    for all), in float32 (float64 for float64) and rounded back: ``-0 + -0`` is the only -0, and a NaN comes
    back quiet, as :mod:`cna_export.io.float_bits` converts it. For bfloat16 and float16 it is done on the bits,
    without widening, since a zero changes nothing else."""
    if name not in ("bfloat16", "float16"):
        ct = fb.compute_dtype(name)
        with np.errstate(invalid="ignore"):  # a signalling NaN comes back quiet
            return to_type(fb.widen(stored, name, ct) + np.asarray(zero, ct), name)
    bits = np.ascontiguousarray(stored).view(np.uint16)
    magnitude = bits & np.uint16(0x7FFF)
    special = np.flatnonzero((magnitude == 0) | (magnitude > (0x7F80 if name == "bfloat16" else 0x7C00)))
    out = bits.copy()
    if special.size:  # zeros and NaNs, rare: fixed one by one
        flat, were = out.reshape(-1), bits.reshape(-1)[special]
        negative = np.signbit(np.asarray(zero, np.float32)).reshape(-1)
        row_negative = negative[special // bits.shape[-1]] if negative.size > 1 else negative
        zeros = np.where((were == 0x8000) & row_negative, 0x8000, 0)
        quiet = np.full_like(were, 0xFFFF) if name == "bfloat16" else were | np.uint16(0x0200)
        flat[special] = np.where((were & 0x7FFF) == 0, zeros, quiet)
    return out.view(fb.STORAGE[name])


def merged_sha256(weight: np.ndarray, name: str, indices: Sequence[int], b: np.ndarray, out: str) -> str:
    """sha256 of the bytes of ``W + B A`` (``weight`` ``[hidden, intermediate]`` stored as ``name``, ``B`` stored
    as ``out``, ``A`` selecting ``indices``) as PEFT merges it: ``B A`` in float32 (float64 for a float64 weight),
    added to ``W`` and cast back once.

    ``B A`` is ``B``'s column at each selected column and a zero elsewhere, whose sign is torch's: at rank 1 the
    product ``B[:, 0] x 0`` (signed as ``B``), at higher ranks a sum that starts from +0 (so +0, and a selected
    column's ``-0`` becomes +0). The other columns are :func:`plus_zero` of ``W``."""
    ct = fb.compute_dtype(name)
    idx = np.asarray(indices, dtype=np.int64)
    h = hashlib.sha256()
    for start in range(0, weight.shape[0], _ROWS):
        rows = np.asarray(weight[start:start + _ROWS])
        bb = fb.widen(b[start:start + _ROWS], out, ct)
        cols = bb[:, :len(idx)] if b.shape[1] == 1 else bb[:, :len(idx)] + ct.type(0)
        zero = bb[:, :1] * ct.type(0) if b.shape[1] == 1 else ct.type(0)
        if np.isfinite(zero).all():
            block = plus_zero(rows, name, zero)
            block[:, idx] = to_type(fb.widen(rows[:, idx], name, ct) + cols, name)
        else:  # a rank-1 B holding an infinity: its row's zeros are NaNs, as the float sum makes them
            block = fb.widen(rows, name, ct) + zero
            block[:, idx] = fb.widen(rows[:, idx], name, ct) + cols
            block = to_type(block, name)
        h.update(byte_view(np.ascontiguousarray(block)))
    return h.hexdigest()
