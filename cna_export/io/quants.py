"""Exact row scaling of quantised GGUF tensors, dequantisation, rounding noise and quantisation.

Folding a neuron multiplier ``m`` into a GGUF file means multiplying one *row*
of a 2-D weight by ``m``: for ``blk.N.ffn_up.weight`` (ggml ``ne = [n_embd,
n_ff]``, numpy shape ``(n_ff, n_embd)``) row ``j`` holds every weight that
feeds neuron ``j``. In GGUF a row is always a whole number of quant blocks,
and every format that :func:`scale_rows` supports stores, in each block, one
or two floating-point *scale fields* by which every value the block
dequantises to is linear (the layouts are the records of
:mod:`cna_export.io.quant_types`). So ``m * value`` is obtained by multiplying
only the scale fields (``d`` and, where a format has mins, ``m``/``dmin`` as
well) and leaving every quant and sub-block scale byte alone. Float tensors
(F32, F16, BF16, F64) are handled as blocks of one element whose only "scale
field" is the element itself.

Exactness guarantees (each scale field is rounded once, to nearest even,
from the float64 product ``old * m``):

* ``m == 0`` and ``m == -1``: exact in every format (``-x`` and ``0 * x`` are
  representable).
* ``m`` a power of two: exact unless a field leaves the normal range; overflow
  to infinity always raises :class:`ScaleOverflowError`, and any field pushed
  into the subnormal range (or flushed to zero) is counted in the
  :class:`ScaleReport`.
* any other ``m``: each scale field carries one rounding to its storage type
  (relative error at most 2**-11 for fp16 fields in the normal range), which
  the report measures (:attr:`ScaleReport.max_rel_error`).

Because the dequantisers compute every value as a product/sum of scale terms,
``dequantize(scaled) == m * dequantize(original)`` holds bit for bit in the
exact cases above (the tests check this for every supported type).

Only little-endian GGUF data is supported (big-endian arrays are rejected).
"""

from __future__ import annotations

from typing import Final, Sequence

import numpy as np
import numpy.typing as npt

from .gguf_py import k_quant_sub_scales
from .quant_layouts import (
    GGML_QUANT_SIZES,
    LAYOUTS,
    SMALLEST_NORMAL,
    GGMLQuantizationType,
    QuantLayout,
    UnsupportedTensorType,
    coerce_type,
    get_layout,
    type_name,
)
from .quant_types import FLOAT_TYPES, RoundingStep
from .row_scale import checked_rows, row_multipliers
from .scale_codecs import bits_to_float, float_to_bits, read_bits, write_bits
from .scale_report import ScaleError, ScaleOverflowError, ScaleReport

__all__ = [
    "ScaleError",
    "ScaleOverflowError",
    "ScaleReport",
    "dequantize_rows",
    "quantize_rows",
    "rounding_noise_rows",
    "scale_rows",
]


# ---------------------------------------------------------------------------
# Row scaling
# ---------------------------------------------------------------------------


def _row_view(arr: np.ndarray) -> np.ndarray:
    """``arr`` (C-contiguous) seen as ``(n_rows, row_bytes)`` uint8, sharing memory."""
    n_cols = arr.shape[-1] if arr.ndim else 1
    n_rows = int(np.prod(arr.shape[:-1], dtype=np.int64)) if arr.ndim > 1 else 1
    return arr.reshape(n_rows, n_cols).view(np.uint8)


_FLOAT_DTYPES: Final[dict[str, tuple[type[np.generic], ...]]] = {
    "F32": (np.float32, np.uint8),
    "F16": (np.float16, np.uint8),
    "BF16": (np.uint16, np.uint8),
    "F64": (np.float64, np.uint8),
}


def _check_array(raw: np.ndarray, layout: QuantLayout) -> None:
    if raw.ndim == 0:
        raise ValueError(f"{layout.name} tensor data must have at least one dimension")
    if raw.dtype.byteorder == ">":
        raise ValueError(f"{layout.name} tensor data is big-endian; only little-endian GGUF data is supported")
    allowed = _FLOAT_DTYPES.get(layout.name, (np.uint8,))
    if raw.dtype.type not in allowed:
        names = " or ".join(np.dtype(t).name for t in allowed)
        raise ValueError(f"{layout.name} tensor data must be {names}, got {raw.dtype}")
    nbytes = raw.shape[-1] * raw.dtype.itemsize
    if nbytes % layout.block_bytes:
        raise ValueError(
            f"{layout.name} row of {nbytes} bytes is not a whole number of {layout.block_bytes}-byte blocks"
        )


def normalise_rows(rows: Sequence[int] | np.ndarray, n_rows: int) -> np.ndarray:
    """``rows`` checked (:func:`cna_export.io.row_scale.checked_rows`) as an int64 array."""
    return np.asarray(checked_rows(rows, n_rows), dtype=np.int64)


def _normalise_multipliers(multipliers: Sequence[float] | np.ndarray | float, n: int) -> np.ndarray:
    """One finite multiplier per row (:func:`cna_export.io.row_scale.row_multipliers`) as a float64 array."""
    return np.asarray(row_multipliers(multipliers, n), dtype=np.float64)


def scale_rows(
    raw: npt.NDArray[np.generic],
    ggml_type: GGMLQuantizationType | int,
    rows: Sequence[int] | np.ndarray,
    multipliers: Sequence[float] | np.ndarray | float,
    *,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, ScaleReport]:
    """Multiply rows of a GGUF tensor by multipliers, editing only scale fields.

    ``raw`` is the tensor's data as ``gguf.GGUFReader`` exposes it
    (``ReaderTensor.data``): for block types a uint8 array of shape
    ``(..., row_bytes)``; for F32/F16/F64 a float32/float16/float64 array of
    shape ``(..., n_cols)`` (uint8 bytes are accepted too); for BF16 the reader
    gives uint8 bytes ``(..., 2 * n_cols)`` (uint16 is accepted too). All
    leading dimensions are flattened into rows, so for a 3-D
    ``(n_expert, n_ff, n_embd)`` tensor row ``e * n_ff + j`` is neuron ``j``
    of expert ``e``.

    ``multipliers`` is one float for all ``rows`` or one per row. Each scale
    field is multiplied in float64 and rounded once to its storage type.

    The result is written to ``out`` if given (an array of ``raw``'s shape and
    dtype, C-contiguous and writable; pass ``out=raw`` to edit in place),
    otherwise to a new C-contiguous copy of ``raw``; it is returned together
    with a :class:`ScaleReport`. Rows not listed stay byte-identical.

    All checks happen before anything is written, so on error ``out`` holds
    an unscaled copy of ``raw`` (and ``raw`` itself is untouched even when
    ``out is raw``).

    Raises:
        UnsupportedTensorType: ``ggml_type`` has no registered layout.
        ScaleOverflowError: a scaled field would overflow its storage type.
        ScaleError: a multiplier or an existing scale field is not finite.
        ValueError / IndexError: malformed array, rows or multiplier count.
    """
    layout = get_layout(ggml_type)
    raw = np.asarray(raw)
    _check_array(raw, layout)

    if out is None:
        dst = np.array(raw, order="C", copy=True)
    else:
        if out.shape != raw.shape or out.dtype != raw.dtype:
            raise ValueError(f"out has shape {out.shape} {out.dtype}, expected {raw.shape} {raw.dtype}")
        if not (out.flags.c_contiguous and out.flags.writeable):
            raise ValueError("out must be C-contiguous and writable")
        if out is not raw:
            np.copyto(out, raw)
        dst = out

    byte_rows = _row_view(dst)
    n_rows, n_row_bytes = byte_rows.shape
    idx = normalise_rows(rows, n_rows)
    mult = _normalise_multipliers(multipliers, idx.size)
    if idx.size == 0:
        return dst, ScaleReport.nothing(layout.ggml_type)

    n_blocks = n_row_bytes // layout.block_bytes
    blocks = byte_rows[idx].reshape(idx.size, n_blocks, layout.block_bytes)  # a copy
    new_bits, report = _scaled_fields(blocks, layout, idx, mult)
    for offset, bits in zip(layout.scale_offsets, new_bits, strict=True):
        write_bits(blocks, offset, layout.scale_encoding, bits)
    byte_rows[idx] = blocks.reshape(idx.size, n_row_bytes)
    return dst, report


def _scaled_fields(blocks: np.ndarray, layout: QuantLayout, idx: np.ndarray,
                   mult: np.ndarray) -> tuple[list[np.ndarray], ScaleReport]:
    """The new bits of every scale field of ``blocks`` (rows ``idx``, ``(rows, n_blocks, block_bytes)``), each
    field times its row's multiplier rounded once, and the report; raises before anything is written."""
    enc = layout.scale_encoding
    new_bits: list[np.ndarray] = []
    n_changed = n_subnormal = n_flushed = 0
    max_rel = 0.0
    for offset in layout.scale_offsets:
        old_bits = read_bits(blocks, offset, enc)
        old = bits_to_float(old_bits, enc)
        if not np.all(np.isfinite(old)):
            r, b = (int(v[0]) for v in np.nonzero(~np.isfinite(old)))
            raise ScaleError(
                f"{layout.name} row {int(idx[r])} block {b} has a non-finite scale field at byte {offset}"
            )
        exact = old * mult[:, None]
        bits = float_to_bits(exact, enc)
        written = bits_to_float(bits, enc)
        overflow = ~np.isfinite(written)
        if np.any(overflow):
            r, b = (int(v[0]) for v in np.nonzero(overflow))
            raise ScaleOverflowError(
                f"{layout.name} row {int(idx[r])}: multiplier {mult[r]:g} overflows a scale field "
                f"({old[r, b]:g} * {mult[r]:g} = {exact[r, b]:g} does not fit {enc.removesuffix('_iq1m')})"
            )
        nonzero_exact = exact != 0
        mag = np.abs(written)
        n_changed += int(np.count_nonzero(bits != old_bits))
        n_subnormal += int(np.count_nonzero((mag > 0) & (mag < SMALLEST_NORMAL[enc])))
        n_flushed += int(np.count_nonzero(nonzero_exact & (written == 0)))
        if np.any(nonzero_exact):
            rel = np.abs(written[nonzero_exact] - exact[nonzero_exact]) / np.abs(exact[nonzero_exact])
            max_rel = max(max_rel, float(rel.max()))
        new_bits.append(bits)
    n_fields = int(idx.size * blocks.shape[1] * layout.scales_per_block)
    return new_bits, ScaleReport(layout.ggml_type, int(idx.size), n_fields, n_changed, n_subnormal, n_flushed, max_rel)


# ---------------------------------------------------------------------------
# Dequantisation (verification helper)
# ---------------------------------------------------------------------------


def _dequantize_fallback(qtype: GGMLQuantizationType, blocks: np.ndarray) -> np.ndarray | None:
    """Dequantise ``(n_blocks, block_bytes)`` uint8 blocks of types gguf-py cannot handle."""
    if qtype == GGMLQuantizationType.Q8_K:
        d = blocks[:, :4].copy().view("<f4").astype(np.float32)
        qs = blocks[:, 4 : 4 + 256].view(np.int8).astype(np.float32)
        return d * qs
    if getattr(GGMLQuantizationType, "Q1_0", None) == qtype:
        d = blocks[:, :2].copy().view("<f2").astype(np.float32)
        bits = np.unpackbits(blocks[:, 2:18], axis=-1, bitorder="little").astype(np.float32)
        return np.where(bits != 0, d, -d).astype(np.float32)
    return None


def dequantize_rows(
    raw: npt.NDArray[np.generic],
    ggml_type: GGMLQuantizationType | int,
    rows: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Dequantise ``rows`` (all rows if ``None``) of ``raw`` to floats, shape ``(len(rows), n_cols)``.

    ``raw`` is laid out as for :func:`scale_rows` (leading dimensions are
    flattened into rows). Returns float32, except float64 for F64 tensors.
    Block types go through ``gguf.quants.dequantize``; Q8_K and Q1_0, which
    gguf-py cannot dequantise, use a small reference implementation here.
    Works for every type gguf-py can dequantise, including ones that
    :func:`scale_rows` does not support (e.g. MXFP4).
    """
    from gguf import quants as gguf_quants

    qtype = coerce_type(ggml_type)
    if not isinstance(qtype, GGMLQuantizationType) or qtype not in GGML_QUANT_SIZES:
        raise UnsupportedTensorType(f"cannot dequantize tensor type {type_name(qtype)}: unknown to gguf-py")
    arr = np.ascontiguousarray(np.asarray(raw))
    if arr.ndim == 0:
        raise ValueError("tensor data must have at least one dimension")
    if arr.dtype.byteorder == ">":
        raise ValueError("big-endian tensor data is not supported")
    byte_rows = _row_view(arr)
    if rows is not None:
        byte_rows = byte_rows[normalise_rows(rows, byte_rows.shape[0])]
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    if byte_rows.shape[1] % block_bytes:
        raise ValueError(f"{qtype.name} row of {byte_rows.shape[1]} bytes is not a whole number of blocks")
    n_sel, n_row_bytes = byte_rows.shape
    n_cols = n_row_bytes // block_bytes * block_elems
    byte_rows = np.ascontiguousarray(byte_rows)

    floats = _dequantize_floats(qtype, byte_rows)
    if floats is not None:
        return floats
    fallback = _dequantize_fallback(qtype, byte_rows.reshape(-1, block_bytes))
    if fallback is not None:
        return fallback.reshape(n_sel, n_cols)

    def numpy_rows(b: np.ndarray) -> np.ndarray:
        try:
            result = gguf_quants.dequantize(b, qtype)
        except NotImplementedError as exc:
            raise UnsupportedTensorType(f"cannot dequantize tensor type {qtype.name}: gguf-py cannot ({exc})") from None
        return np.asarray(result, dtype=np.float32).reshape(b.shape[0], n_cols)

    fast = _ggml_rows(byte_rows, qtype, n_cols)
    if fast is not None:
        # the C routine must give gguf-py's bits (the fingerprint is defined by them): check a row
        # of every call; one difference retires it for this type in this process
        probe = min(n_sel - 1, 1 + n_sel // 2)
        if np.array_equal(fast[probe].view(np.uint32), numpy_rows(byte_rows[probe : probe + 1])[0].view(np.uint32)):
            return fast
        _GGML_BAD.add(qtype)
    return numpy_rows(byte_rows)


def _dequantize_floats(qtype: GGMLQuantizationType, byte_rows: np.ndarray) -> np.ndarray | None:
    """Float rows (C-contiguous ``(n_rows, row_bytes)`` uint8) as float32 (float64 for F64), None for other types."""
    if qtype == GGMLQuantizationType.F32:
        return byte_rows.view("<f4").astype(np.float32)
    if qtype == GGMLQuantizationType.F16:
        return byte_rows.view("<f2").astype(np.float32)
    if qtype == GGMLQuantizationType.F64:
        return byte_rows.view("<f8").astype(np.float64)
    if qtype == GGMLQuantizationType.BF16:
        return (byte_rows.view("<u2").astype(np.uint32) << np.uint32(16)).view(np.float32)
    return None


_GGML_BAD: set[GGMLQuantizationType] = set()  # types ggml's C routine is not used for (missing, or not gguf-py's bits)


def _ggml_rows(byte_rows: np.ndarray, qtype: GGMLQuantizationType, n_cols: int) -> np.ndarray | None:
    """ggml's own dequantisation of the rows (:func:`cna_export.io.llama.ggml_dequantize`), or None where it is
    missing or retired for this type."""
    if qtype in _GGML_BAD or byte_rows.shape[0] == 0:
        return None
    from .llama import ggml_dequantize  # lazily: ctypes and the libggml look-up only when rows are dequantised

    fast = ggml_dequantize(byte_rows, qtype.name, n_cols)
    if fast is None:
        _GGML_BAD.add(qtype)
    return fast


# ---------------------------------------------------------------------------
# Rounding noise (the audit's base-free score) and quantisation
# ---------------------------------------------------------------------------


def _group_steps(layout: QuantLayout, rounding: RoundingStep, blocks: np.ndarray) -> np.ndarray:
    """The quantisation step of every weight group of ``(n_blocks, block_bytes)`` blocks: ``(n_blocks, groups)``
    float64, the block's ``d`` (its first scale field) times the group's sub-scale."""
    d = bits_to_float(read_bits(blocks, layout.scale_offsets[0], layout.scale_encoding), layout.scale_encoding)
    d = d.reshape(-1, 1)
    start, end = rounding.at
    if rounding.sub_scales == "none":
        return d
    if rounding.sub_scales == "k6":
        return d * k_quant_sub_scales(blocks[:, start:end]).astype(np.float64)
    if rounding.sub_scales == "i8":
        return d * blocks[:, start:end].copy().view(np.int8).astype(np.float64)
    return d * (blocks[:, start:end] & 0x0F).astype(np.float64)  # lo4


def rounding_noise_rows(raw: npt.NDArray[np.generic], ggml_type: GGMLQuantizationType | int) -> np.ndarray | None:
    """Expected squared rounding error per row of a stored tensor: the sum over the row's weights of
    step**2 / 12, where step is the quantisation step of the weight's group (uniform rounding error within
    one step). Float types give zeros (their rounding is orders of magnitude below any block type's); types
    without a uniform step here (Q3_K, the IQ codebooks, ...) give None."""
    qtype = coerce_type(ggml_type)
    byte_rows = _row_view(np.ascontiguousarray(np.asarray(raw)))
    if type_name(qtype) in FLOAT_TYPES:
        return np.zeros(byte_rows.shape[0])
    layout = LAYOUTS.get(qtype) if isinstance(qtype, GGMLQuantizationType) else None
    rounding = layout.rounding if layout is not None else None
    if layout is None or rounding is None:
        return None
    n_rows = byte_rows.shape[0]
    steps = _group_steps(layout, rounding, np.ascontiguousarray(byte_rows).reshape(-1, layout.block_bytes))
    return (rounding.group * steps.reshape(n_rows, -1) ** 2 / 12.0).sum(axis=1)


def quantize_rows(values: np.ndarray, ggml_type: GGMLQuantizationType | int) -> np.ndarray:
    """Float rows ``(n_rows, n_cols)`` quantised to ``ggml_type`` by ggml's own ``ggml_quantize_chunk``
    (llama-cpp-python's libggml-base; no importance matrix, as ``llama-quantize`` without ``--imatrix``):
    uint8 ``(n_rows, row_bytes)``. Used by benches and tests that build quantised checkpoints; K-quants
    are beyond gguf-py's own quantiser."""
    qtype = coerce_type(ggml_type)
    from .llama import ggml_has, ggml_quantize

    if not ggml_has("ggml_quantize_chunk"):
        raise UnsupportedTensorType("quantising needs llama-cpp-python's libggml-base (pip install llama-cpp-python)")
    if not isinstance(qtype, GGMLQuantizationType) or qtype not in GGML_QUANT_SIZES:
        raise UnsupportedTensorType(f"cannot quantise to {type_name(qtype)}")
    src = np.ascontiguousarray(values, dtype=np.float32)
    if src.ndim != 2:
        raise ValueError("quantize_rows takes a 2-D array of rows")
    elems, nbytes = GGML_QUANT_SIZES[qtype]
    if src.shape[1] % elems:
        raise ValueError(f"{qtype.name} rows must hold a multiple of {elems} values, not {src.shape[1]}")
    out, written = ggml_quantize(src, int(qtype), src.shape[1] // elems * nbytes)
    if written != out.size:
        raise UnsupportedTensorType(f"ggml_quantize_chunk wrote {written} bytes for {qtype.name}, expected {out.size}")
    return out
