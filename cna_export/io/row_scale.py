"""A few rows of a GGUF tensor scaled through their scale fields in plain Python (``struct``), without numpy.

The same numbers as :func:`cna_export.io.quants.scale_rows`, bit for bit: each scale field is multiplied by its
row's multiplier in float64 and rounded once, to nearest even, to its storage type (``struct``'s ``e``, ``f`` and
``d`` formats round correctly from a double, and refuse a value too large for the type); the report counts the
same fields, and the same inputs are refused in the same order. It serves the edits of a small export, where
importing numpy costs more than the edit itself (a 3-neuron circuit: 108 fields against numpy's 60-90 ms import).
:func:`supports` says when to use it: fp16, fp32 and fp64 scale fields (not bfloat16, nor IQ1_M's nibble-packed
fp16), and at most :data:`MAX_FIELDS` fields; larger edits go through numpy, which is faster per field.
``tests/test_row_scale.py`` checks both paths against each other on random rows and multipliers of every layout.
"""

from __future__ import annotations

import math
import operator
import struct
from typing import Any, Sequence

from .quant_layouts import SMALLEST_NORMAL, QuantLayout
from .scale_report import ScaleError, ScaleOverflowError, ScaleReport

MAX_FIELDS = 1 << 16
"""The most scale fields an edit may have to be scaled here (about 0.1 s of Python; numpy's import is 0.06-0.09 s
and its vector path is faster beyond that)."""

_FORMATS = {"f16": struct.Struct("<e"), "f32": struct.Struct("<f"), "f64": struct.Struct("<d")}


def checked_rows(indices: Any, n_rows: int) -> list[int]:
    """``indices`` (a sequence or numpy array) as ints, each a row of a tensor of ``n_rows`` rows, none repeated;
    else ``ValueError``/``IndexError``. The one rule for both scaling paths (:func:`cna_export.io.quants.normalise_rows`
    is this as a numpy array)."""
    items = indices.tolist() if hasattr(indices, "tolist") else indices
    try:
        if any(isinstance(i, bool) for i in items):
            raise TypeError
        rows = [operator.index(i) for i in items]
    except TypeError:
        raise ValueError("rows must be a flat sequence of integers") from None
    bad = [i for i in rows if not 0 <= i < n_rows]
    if bad:
        raise IndexError(f"row {bad[0]} is out of range for a tensor of {n_rows} rows")
    if len(set(rows)) != len(rows):
        raise ValueError("rows must not repeat (a repeated row would be scaled ambiguously)")
    return rows


def row_multipliers(multipliers: Any, n: int) -> list[float]:
    """One finite float per row: ``multipliers`` is one number for all ``n`` rows, or a flat sequence (or numpy
    array) of ``n``; else ``ValueError``, or :class:`ScaleError` for a non-finite one. The one rule for both
    scaling paths."""
    if isinstance(multipliers, (int, float)) or getattr(multipliers, "ndim", None) == 0:
        mults = [float(multipliers)] * n
    else:
        items = multipliers.tolist() if hasattr(multipliers, "tolist") else multipliers
        try:
            mults = [float(m) for m in items]
        except TypeError:
            raise ValueError(f"got {getattr(multipliers, 'size', len(items))} multipliers for {n} rows") from None
        if len(mults) != n:
            raise ValueError(f"got {len(mults)} multipliers for {n} rows")
    bad = next((m for m in mults if not math.isfinite(m)), None)
    if bad is not None:
        raise ScaleError(f"non-finite multiplier {bad!r}")
    return mults


def supports(layout: QuantLayout, n_fields: int) -> bool:
    """Whether :func:`scale_row_bytes` scales ``n_fields`` fields of ``layout`` (else use numpy's path)."""
    return layout.scale_encoding in _FORMATS and n_fields <= MAX_FIELDS


def scale_row_bytes(layout: QuantLayout, rows: Sequence[bytes], row_ids: Sequence[int],
                    multipliers: Sequence[float]) -> tuple[list[bytes], ScaleReport]:
    """``rows`` (each a whole row's bytes, tensor rows ``row_ids``) with every scale field times its row's
    multiplier, and the report. Raises :class:`ScaleError` (a non-finite multiplier or field) or
    :class:`ScaleOverflowError` before returning anything; ``rows`` are never modified."""
    codec = _FORMATS[layout.scale_encoding]
    multipliers = row_multipliers(multipliers, len(rows))
    out = [bytearray(r) for r in rows]
    counts = _Counts(layout.scale_encoding)
    for offset in layout.scale_offsets:
        fields = [_fields(codec, row, offset, layout.block_bytes) for row in out]
        _check_finite(layout, fields, row_ids, offset)
        for row, old_row, m, row_id in zip(out, fields, multipliers, row_ids, strict=True):
            for b, old in enumerate(old_row):
                at = b * layout.block_bytes + offset
                new = _rounded(codec, layout, old, m, row_id)
                if new != row[at : at + codec.size]:
                    counts.changed += 1
                    row[at : at + codec.size] = new
                counts.add(old * m, codec.unpack(new)[0])
    n_fields = len(out) * (len(out[0]) // layout.block_bytes if out else 0) * layout.scales_per_block
    return [bytes(r) for r in out], counts.report(layout, len(out), n_fields)


def _fields(codec: struct.Struct, row: bytearray, offset: int, block_bytes: int) -> list[float]:
    return [codec.unpack_from(row, at)[0] for at in range(offset, len(row), block_bytes)]


def _check_finite(layout: QuantLayout, fields: list[list[float]], row_ids: Sequence[int], offset: int) -> None:
    for row_id, row in zip(row_ids, fields, strict=True):
        for b, v in enumerate(row):
            if not math.isfinite(v):
                raise ScaleError(f"{layout.name} row {row_id} block {b} has a non-finite scale field at byte {offset}")


def _rounded(codec: struct.Struct, layout: QuantLayout, old: float, m: float, row_id: int) -> bytes:
    """``old * m`` rounded once to the field's type; refused when it does not fit."""
    exact = old * m
    try:
        packed = codec.pack(exact)
        if math.isfinite(codec.unpack(packed)[0]):
            return packed
    except OverflowError:
        pass
    raise ScaleOverflowError(
        f"{layout.name} row {row_id}: multiplier {m:g} overflows a scale field "
        f"({old:g} * {m:g} = {exact:g} does not fit {layout.scale_encoding})"
    )


class _Counts:
    """The report's counters, field by field."""

    def __init__(self, encoding: str) -> None:
        self.smallest = SMALLEST_NORMAL[encoding]
        self.changed = self.subnormal = self.flushed = 0
        self.max_rel = 0.0

    def add(self, exact: float, written: float) -> None:
        if 0 < abs(written) < self.smallest:
            self.subnormal += 1
        if exact != 0:
            if written == 0:
                self.flushed += 1
            self.max_rel = max(self.max_rel, abs(written - exact) / abs(exact))

    def report(self, layout: QuantLayout, n_rows: int, n_fields: int) -> ScaleReport:
        return ScaleReport(layout.ggml_type, n_rows, n_fields, self.changed, self.subnormal, self.flushed,
                           self.max_rel)
