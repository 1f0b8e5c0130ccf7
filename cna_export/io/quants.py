"""GGML tensor-type block layouts, and exact row scaling of quantised GGUF tensors.

Folding a neuron multiplier ``m`` into a GGUF file means multiplying one *row*
of a 2-D weight by ``m``: for ``blk.N.ffn_up.weight`` (ggml ``ne = [n_embd,
n_ff]``, numpy shape ``(n_ff, n_embd)``) row ``j`` holds every weight that
feeds neuron ``j``. In GGUF a row is always a whole number of quant blocks,
and every format that this module supports stores, in each block, one or two
floating-point *scale fields* by which every value the block dequantises to
is linear::

    Q4_0, Q5_0, Q8_0, IQ*, TQ*, Q1_0   value = d * f(quants)
    Q3_K, Q6_K                         value = d * sc * q
    Q4_1, Q5_1                         value = d * q + m
    Q2_K, Q4_K, Q5_K                   value = d * sc * q - dmin * mn

So ``m * value`` is obtained by multiplying only the scale fields (``d`` and,
where a format has mins, ``m``/``dmin`` as well) and leaving every quant and
sub-block scale byte alone. Float tensors (F32, F16, BF16, F64) are handled
as blocks of one element whose only "scale field" is the element itself.

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

Byte layouts (offsets of the scale fields inside one block, little-endian;
from ggml's ``ggml-common.h`` block structs, sizes cross-checked against
``gguf.constants.GGML_QUANT_SIZES``)::

    type     elems bytes  scale fields
    Q4_0       32    18   d@0 (f16)
    Q4_1       32    20   d@0, m@2 (f16)
    Q5_0       32    22   d@0
    Q5_1       32    24   d@0, m@2
    Q8_0       32    34   d@0
    Q2_K      256    84   d@80, dmin@82   (after scales[16], qs[64])
    Q3_K      256   110   d@108           (after hmask[32], qs[64], scales[12])
    Q4_K      256   144   d@0, dmin@2
    Q5_K      256   176   d@0, dmin@2
    Q6_K      256   210   d@208           (after ql[128], qh[64], scales[16])
    Q8_K      256   292   d@0 (f32)       (intermediate type; bsums untouched)
    IQ2_XXS   256    66   d@0
    IQ2_XS    256    74   d@0
    IQ2_S     256    82   d@0
    IQ3_XXS   256    98   d@0
    IQ3_S     256   110   d@0
    IQ1_S     256    50   d@0
    IQ1_M     256    56   f16 packed in the high nibbles of the four
                          little-endian uint16 words of scales[8] at byte 48
    IQ4_NL     32    18   d@0
    IQ4_XS    256   136   d@0
    TQ1_0     256    54   d@52            (after qs[48], qh[4])
    TQ2_0     256    66   d@64            (after qs[64])
    Q1_0      128    18   d@0             (value = +d or -d per bit)

Types in :data:`UNSUPPORTED` (and any type not in :data:`LAYOUTS`) make
:func:`get_layout` raise :class:`UnsupportedTensorType`; nothing is ever
skipped silently.

Only little-endian GGUF data is supported (big-endian arrays are rejected).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal, Sequence

import numpy as np
import numpy.typing as npt
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from cna_export.core.errors import CnaError

__all__ = [
    "LAYOUTS",
    "UNSUPPORTED",
    "QuantLayout",
    "ScaleEncoding",
    "ScaleError",
    "ScaleOverflowError",
    "ScaleReport",
    "UnsupportedTensorType",
    "dequantize_rows",
    "get_layout",
    "row_bytes",
    "scale_rows",
]

ScaleEncoding = Literal["f16", "bf16", "f32", "f64", "f16_iq1m"]
"""How a scale field is stored.

``f16``/``bf16``/``f32``/``f64``: a plain little-endian float at the offset.
``f16_iq1m``: an fp16 whose four nibbles are the high nibbles (bits 12..15) of
the four consecutive little-endian uint16 words starting at the offset, least
significant nibble first (IQ1_M); the low 12 bits of each word are 3-bit
sub-block scales and are left untouched.
"""

LayoutKind = Literal["float", "block"]


class UnsupportedTensorType(CnaError, ValueError):
    """A GGML tensor type whose rows this module cannot scale exactly."""


class ScaleError(CnaError, ValueError):
    """Scaling a row would produce an invalid tensor (non-finite input or multiplier)."""


class ScaleOverflowError(ScaleError, OverflowError):
    """A scaled field does not fit its storage type (it would become infinite)."""


# ---------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------

_ENCODING_WIDTH: Final[dict[str, int]] = {"f16": 2, "bf16": 2, "f32": 4, "f64": 8, "f16_iq1m": 8}
_ENCODING_UINT: Final[dict[str, type[np.unsignedinteger]]] = {
    "f16": np.uint16,
    "bf16": np.uint16,
    "f32": np.uint32,
    "f64": np.uint64,
    "f16_iq1m": np.uint16,
}
_SMALLEST_NORMAL: Final[dict[str, float]] = {
    "f16": 2.0**-14,
    "f16_iq1m": 2.0**-14,
    "bf16": 2.0**-126,
    "f32": 2.0**-126,
    "f64": 2.0**-1022,
}


@dataclass(frozen=True)
class QuantLayout:
    """Byte layout of one block of a GGML tensor type.

    A row of ``n`` elements is ``n // block_elems`` consecutive blocks of
    ``block_bytes`` bytes each. ``scale_offsets`` are the byte offsets, within
    a block, of the fields that :func:`scale_rows` multiplies; all fields of a
    layout share one ``scale_encoding``. For ``kind == "float"`` a block is a
    single element and the element itself is the scale field.
    """

    ggml_type: GGMLQuantizationType
    block_elems: int
    block_bytes: int
    scale_offsets: tuple[int, ...]
    scale_encoding: ScaleEncoding = "f16"
    kind: LayoutKind = "block"
    note: str = ""

    def __post_init__(self) -> None:
        width = _ENCODING_WIDTH[self.scale_encoding]
        if self.block_elems <= 0 or self.block_bytes <= 0 or not self.scale_offsets:
            raise ValueError(f"invalid layout for {self.name}")
        ends = sorted((off, off + width) for off in self.scale_offsets)
        for (start, end), (next_start, _) in zip(ends, ends[1:]):
            if next_start < end:
                raise ValueError(f"overlapping scale fields in layout for {self.name}")
        if ends[0][0] < 0 or ends[-1][1] > self.block_bytes:
            raise ValueError(f"scale field outside the block in layout for {self.name}")

    @property
    def name(self) -> str:
        """The type's GGML name, e.g. ``"Q4_K"``."""
        return self.ggml_type.name

    @property
    def scale_bytes(self) -> int:
        """Bytes a scale field spans (8 for IQ1_M's nibble-packed fp16)."""
        return _ENCODING_WIDTH[self.scale_encoding]

    @property
    def scales_per_block(self) -> int:
        """Number of scale fields per block."""
        return len(self.scale_offsets)


# (name, block_elems, block_bytes, scale_offsets, encoding, kind, note)
_LayoutSpec = tuple[str, int, int, tuple[int, ...], ScaleEncoding, LayoutKind, str]

_SPECS: Final[tuple[_LayoutSpec, ...]] = (
    ("F32", 1, 4, (0,), "f32", "float", "plain float32 elements"),
    ("F16", 1, 2, (0,), "f16", "float", "plain float16 elements"),
    ("BF16", 1, 2, (0,), "bf16", "float", "plain bfloat16 elements"),
    ("F64", 1, 8, (0,), "f64", "float", "plain float64 elements"),
    ("Q4_0", 32, 18, (0,), "f16", "block", "d"),
    ("Q4_1", 32, 20, (0, 2), "f16", "block", "d, m (value = d*q + m)"),
    ("Q5_0", 32, 22, (0,), "f16", "block", "d"),
    ("Q5_1", 32, 24, (0, 2), "f16", "block", "d, m (value = d*q + m)"),
    ("Q8_0", 32, 34, (0,), "f16", "block", "d"),
    ("Q2_K", 256, 84, (80, 82), "f16", "block", "d, dmin after scales[16] and qs[64]"),
    ("Q3_K", 256, 110, (108,), "f16", "block", "d after hmask[32], qs[64], scales[12]"),
    ("Q4_K", 256, 144, (0, 2), "f16", "block", "d, dmin"),
    ("Q5_K", 256, 176, (0, 2), "f16", "block", "d, dmin"),
    ("Q6_K", 256, 210, (208,), "f16", "block", "d after ql[128], qh[64], scales[16]"),
    ("Q8_K", 256, 292, (0,), "f32", "block", "float32 d; bsums are quant sums and stay valid"),
    ("IQ2_XXS", 256, 66, (0,), "f16", "block", "d"),
    ("IQ2_XS", 256, 74, (0,), "f16", "block", "d"),
    ("IQ2_S", 256, 82, (0,), "f16", "block", "d"),
    ("IQ3_XXS", 256, 98, (0,), "f16", "block", "d"),
    ("IQ3_S", 256, 110, (0,), "f16", "block", "d"),
    ("IQ1_S", 256, 50, (0,), "f16", "block", "d"),
    ("IQ1_M", 256, 56, (48,), "f16_iq1m", "block", "fp16 d in the high nibbles of scales[8]"),
    ("IQ4_NL", 32, 18, (0,), "f16", "block", "d"),
    ("IQ4_XS", 256, 136, (0,), "f16", "block", "d"),
    ("TQ1_0", 256, 54, (52,), "f16", "block", "d after qs[48], qh[4]"),
    ("TQ2_0", 256, 66, (64,), "f16", "block", "d after qs[64]"),
    ("Q1_0", 128, 18, (0,), "f16", "block", "d (value = +d or -d per bit)"),
)

_UNSUPPORTED_REASONS: Final[dict[str, str]] = {
    "Q8_1": (
        "intermediate type never stored in model files, and gguf-py's GGML_QUANT_SIZES "
        "(40 bytes: f32 d and s) disagrees with ggml's block_q8_1 (36 bytes: fp16 d and s)"
    ),
    "MXFP4": (
        "its block scale is an unsigned E8M0 exponent (a power of two): only multipliers "
        "that are themselves positive powers of two could be folded into it, not 0, "
        "negative or other values"
    ),
    "NVFP4": (
        "its scales are unsigned 8-bit UE4M3 values: negative multipliers cannot be folded "
        "into them and other multipliers would lose far more than an fp16 rounding"
    ),
    "I8": "integer tensor type (not a weight that multipliers apply to)",
    "I16": "integer tensor type (not a weight that multipliers apply to)",
    "I32": "integer tensor type (not a weight that multipliers apply to)",
    "I64": "integer tensor type (not a weight that multipliers apply to)",
}


def _build_registry() -> tuple[dict[GGMLQuantizationType, QuantLayout], dict[GGMLQuantizationType, str]]:
    layouts: dict[GGMLQuantizationType, QuantLayout] = {}
    unsupported: dict[GGMLQuantizationType, str] = {}
    for name, elems, nbytes, offsets, encoding, kind, note in _SPECS:
        qtype = getattr(GGMLQuantizationType, name, None)
        if qtype is None:  # older gguf-py without this type: it cannot occur in a file it reads
            continue
        expected = GGML_QUANT_SIZES.get(qtype)
        if expected != (elems, nbytes):
            unsupported[qtype] = (
                f"gguf-py's GGML_QUANT_SIZES gives {expected} (elements, bytes) per block "
                f"but this module knows the layout for ({elems}, {nbytes})"
            )
            continue
        layouts[qtype] = QuantLayout(qtype, elems, nbytes, offsets, encoding, kind, note)
    for name, reason in _UNSUPPORTED_REASONS.items():
        qtype = getattr(GGMLQuantizationType, name, None)
        if qtype is not None and qtype not in layouts:
            unsupported[qtype] = reason
    return layouts, unsupported


_REGISTRY = _build_registry()
LAYOUTS: Final[dict[GGMLQuantizationType, QuantLayout]] = _REGISTRY[0]
"""Every tensor type whose rows :func:`scale_rows` can scale, keyed by GGML type."""
UNSUPPORTED: Final[dict[GGMLQuantizationType, str]] = _REGISTRY[1]
"""Known tensor types that are deliberately not supported, with the reason."""


def _coerce_type(ggml_type: GGMLQuantizationType | int) -> GGMLQuantizationType | int:
    try:
        return GGMLQuantizationType(int(ggml_type))
    except ValueError:
        return int(ggml_type)


def _type_name(ggml_type: GGMLQuantizationType | int) -> str:
    return ggml_type.name if isinstance(ggml_type, GGMLQuantizationType) else f"unknown GGML type id {ggml_type}"


def get_layout(ggml_type: GGMLQuantizationType | int) -> QuantLayout:
    """Return the block layout of ``ggml_type``.

    Raises :class:`UnsupportedTensorType` (one line, naming the type and the
    reason) for every type not in :data:`LAYOUTS`.
    """
    qtype = _coerce_type(ggml_type)
    layout = LAYOUTS.get(qtype) if isinstance(qtype, GGMLQuantizationType) else None
    if layout is not None:
        return layout
    name = _type_name(qtype)
    reason = UNSUPPORTED.get(qtype) if isinstance(qtype, GGMLQuantizationType) else None
    if reason is None:
        reason = "no block layout is registered for it"
    raise UnsupportedTensorType(f"cannot scale rows of tensor type {name}: {reason}")


def row_bytes(ggml_type: GGMLQuantizationType | int, n_cols: int) -> int:
    """Bytes of one row of ``n_cols`` elements of ``ggml_type``.

    Uses gguf-py's ``GGML_QUANT_SIZES``, so it also works for types that
    :func:`scale_rows` does not support. Raises ``ValueError`` if ``n_cols`` is
    not a whole number of blocks and :class:`UnsupportedTensorType` for a type
    gguf-py does not know.
    """
    qtype = _coerce_type(ggml_type)
    sizes = GGML_QUANT_SIZES.get(qtype) if isinstance(qtype, GGMLQuantizationType) else None
    if sizes is None:
        raise UnsupportedTensorType(f"tensor type {_type_name(qtype)} has no known block size")
    block_elems, block_bytes = sizes
    if n_cols < 0 or n_cols % block_elems:
        raise ValueError(f"{n_cols} columns is not a whole number of {_type_name(qtype)} blocks of {block_elems}")
    return n_cols // block_elems * block_bytes


# ---------------------------------------------------------------------------
# Scale-field codecs
# ---------------------------------------------------------------------------


def _read_bits(blocks: np.ndarray, offset: int, encoding: ScaleEncoding) -> np.ndarray:
    """Raw bit patterns of the scale field at ``offset`` of every block (``blocks[..., block_bytes]``)."""
    width = _ENCODING_WIDTH[encoding]
    field = np.ascontiguousarray(blocks[..., offset : offset + width])
    if encoding == "f16_iq1m":
        words = field.view("<u2").astype(np.uint16)  # (..., 4)
        bits = np.zeros(words.shape[:-1], dtype=np.uint16)
        for i in range(4):
            bits |= (words[..., i] >> np.uint16(12)) << np.uint16(4 * i)
        return bits
    return field.view(np.dtype(_ENCODING_UINT[encoding]).newbyteorder("<"))[..., 0].astype(_ENCODING_UINT[encoding])


def _write_bits(blocks: np.ndarray, offset: int, encoding: ScaleEncoding, bits: np.ndarray) -> None:
    """Store ``bits`` into the scale field at ``offset`` of every block, in place."""
    width = _ENCODING_WIDTH[encoding]
    if encoding == "f16_iq1m":
        words = np.ascontiguousarray(blocks[..., offset : offset + width]).view("<u2").astype(np.uint16)
        for i in range(4):
            nibble = (bits >> np.uint16(4 * i)) & np.uint16(0xF)
            words[..., i] = (words[..., i] & np.uint16(0x0FFF)) | (nibble << np.uint16(12))
        blocks[..., offset : offset + width] = words.astype("<u2").view(np.uint8)
        return
    le = np.dtype(_ENCODING_UINT[encoding]).newbyteorder("<")
    blocks[..., offset : offset + width] = np.ascontiguousarray(bits.astype(le)[..., None]).view(np.uint8)


def _bits_to_float(bits: np.ndarray, encoding: ScaleEncoding) -> np.ndarray:
    """Decode raw scale-field bits to float64 (exact)."""
    if encoding in ("f16", "f16_iq1m"):
        return bits.astype(np.uint16).view(np.float16).astype(np.float64)
    if encoding == "bf16":
        return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
    if encoding == "f32":
        return bits.astype(np.uint32).view(np.float32).astype(np.float64)
    return bits.astype(np.uint64).view(np.float64).copy()


def _float_to_bits(values: np.ndarray, encoding: ScaleEncoding) -> np.ndarray:
    """Round float64 ``values`` once (to nearest even) to ``encoding`` and return its bits.

    Values too large for the encoding become infinities (the caller checks).
    """
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        if encoding in ("f16", "f16_iq1m"):
            return values.astype(np.float16).view(np.uint16)  # numpy rounds float64 -> half directly
        if encoding == "f32":
            return values.astype(np.float32).view(np.uint32)
        if encoding == "f64":
            return values.astype(np.float64).view(np.uint64)
        # bf16: round to odd at float32 precision (24 >= 8 + 2 bits), then to nearest even
        # at bfloat16 precision; together that is a single correct rounding from float64.
        f32 = values.astype(np.float32)
        u32 = f32.view(np.uint32).copy()
        inexact = np.isfinite(f32) & (f32.astype(np.float64) != values)
        even = (u32 & np.uint32(1)) == 0
        fix = inexact & even
        towards_zero = np.abs(f32.astype(np.float64)) > np.abs(values)
        u32[fix & towards_zero] -= np.uint32(1)
        u32[fix & ~towards_zero] += np.uint32(1)
        rounded = (u32.astype(np.uint64) + np.uint64(0x7FFF) + ((u32 >> np.uint32(16)) & np.uint32(1))) >> np.uint64(16)
        return rounded.astype(np.uint16)


# ---------------------------------------------------------------------------
# Row scaling
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ScaleReport:
    """What :func:`scale_rows` did to the scale fields of the rows it scaled.

    ``n_fields`` fields were rewritten (one per scale field per block per
    row; for float tensors one per element), of which ``n_changed`` got a
    different bit pattern. ``n_subnormal`` written values are nonzero but below
    the storage type's smallest normal (2**-14 for fp16) and ``n_flushed``
    became zero although the exact product was not. ``max_rel_error`` is the
    worst ``|written - exact| / |exact|`` over fields whose exact float64
    product ``old * m`` is nonzero (0.0 when the scaling was exact).
    """

    ggml_type: GGMLQuantizationType
    n_rows: int = 0
    n_fields: int = 0
    n_changed: int = 0
    n_subnormal: int = 0
    n_flushed: int = 0
    max_rel_error: float = 0.0

    @property
    def exact(self) -> bool:
        """Whether every written field equals the exact product."""
        return self.max_rel_error == 0.0

    def merged(self, other: ScaleReport) -> ScaleReport:
        """Combine two reports (e.g. over several calls): counts add, the worst error wins.

        The result keeps this report's ``ggml_type``.
        """
        return ScaleReport(
            ggml_type=self.ggml_type,
            n_rows=self.n_rows + other.n_rows,
            n_fields=self.n_fields + other.n_fields,
            n_changed=self.n_changed + other.n_changed,
            n_subnormal=self.n_subnormal + other.n_subnormal,
            n_flushed=self.n_flushed + other.n_flushed,
            max_rel_error=max(self.max_rel_error, other.max_rel_error),
        )

    def warning(self) -> str | None:
        """A one-line warning if precision was lost to subnormals or flushing, else ``None``."""
        if not (self.n_subnormal or self.n_flushed):
            return None
        layout = LAYOUTS.get(self.ggml_type)
        storage = "fp16" if layout is None or layout.scale_encoding.startswith("f16") else layout.scale_encoding
        return (
            f"{self.ggml_type.name}: multiplier pushes {self.n_subnormal} scales into {storage} subnormals "
            f"and flushes {self.n_flushed} to zero, worst relative error {self.max_rel_error:.3g}"
        )


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


def _normalise_rows(rows: Sequence[int] | np.ndarray, n_rows: int) -> np.ndarray:
    idx = np.asarray(rows)
    if idx.size == 0:
        return np.zeros(0, dtype=np.int64)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError("rows must be a flat sequence of integers")
    idx = idx.astype(np.int64)
    if idx.min() < 0 or idx.max() >= n_rows:
        bad = int(idx[(idx < 0) | (idx >= n_rows)][0])
        raise IndexError(f"row {bad} is out of range for a tensor of {n_rows} rows")
    if np.unique(idx).size != idx.size:
        raise ValueError("rows must not repeat (a repeated row would be scaled ambiguously)")
    return idx


def _normalise_multipliers(multipliers: Sequence[float] | np.ndarray | float, n: int) -> np.ndarray:
    mult = np.asarray(multipliers, dtype=np.float64)
    if mult.ndim == 0:
        mult = np.full(n, float(mult))
    elif mult.shape != (n,):
        raise ValueError(f"got {mult.size} multipliers for {n} rows")
    if not np.all(np.isfinite(mult)):
        raise ScaleError(f"non-finite multiplier {mult[~np.isfinite(mult)][0]!r}")
    return mult


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
    idx = _normalise_rows(rows, n_rows)
    mult = _normalise_multipliers(multipliers, idx.size)
    if idx.size == 0:
        return dst, ScaleReport(layout.ggml_type)

    n_blocks = n_row_bytes // layout.block_bytes
    blocks = byte_rows[idx].reshape(idx.size, n_blocks, layout.block_bytes)  # a copy
    enc = layout.scale_encoding

    new_bits: list[np.ndarray] = []
    n_changed = n_subnormal = n_flushed = 0
    max_rel = 0.0
    for offset in layout.scale_offsets:
        old_bits = _read_bits(blocks, offset, enc)
        old = _bits_to_float(old_bits, enc)
        if not np.all(np.isfinite(old)):
            r, b = (int(v[0]) for v in np.nonzero(~np.isfinite(old)))
            raise ScaleError(
                f"{layout.name} row {int(idx[r])} block {b} has a non-finite scale field at byte {offset}"
            )
        exact = old * mult[:, None]
        bits = _float_to_bits(exact, enc)
        written = _bits_to_float(bits, enc)
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
        n_subnormal += int(np.count_nonzero((mag > 0) & (mag < _SMALLEST_NORMAL[enc])))
        n_flushed += int(np.count_nonzero(nonzero_exact & (written == 0)))
        if np.any(nonzero_exact):
            rel = np.abs(written[nonzero_exact] - exact[nonzero_exact]) / np.abs(exact[nonzero_exact])
            max_rel = max(max_rel, float(rel.max()))
        new_bits.append(bits)

    for offset, bits in zip(layout.scale_offsets, new_bits):
        _write_bits(blocks, offset, enc, bits)
    byte_rows[idx] = blocks.reshape(idx.size, n_row_bytes)

    report = ScaleReport(
        ggml_type=layout.ggml_type,
        n_rows=int(idx.size),
        n_fields=int(idx.size * n_blocks * layout.scales_per_block),
        n_changed=n_changed,
        n_subnormal=n_subnormal,
        n_flushed=n_flushed,
        max_rel_error=max_rel,
    )
    return dst, report


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

    qtype = _coerce_type(ggml_type)
    if not isinstance(qtype, GGMLQuantizationType) or qtype not in GGML_QUANT_SIZES:
        raise UnsupportedTensorType(f"cannot dequantize tensor type {_type_name(qtype)}: unknown to gguf-py")
    arr = np.ascontiguousarray(np.asarray(raw))
    if arr.ndim == 0:
        raise ValueError("tensor data must have at least one dimension")
    if arr.dtype.byteorder == ">":
        raise ValueError("big-endian tensor data is not supported")
    byte_rows = _row_view(arr)
    if rows is not None:
        byte_rows = byte_rows[_normalise_rows(rows, byte_rows.shape[0])]
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    if byte_rows.shape[1] % block_bytes:
        raise ValueError(f"{qtype.name} row of {byte_rows.shape[1]} bytes is not a whole number of blocks")
    n_sel, n_row_bytes = byte_rows.shape
    n_cols = n_row_bytes // block_bytes * block_elems
    byte_rows = np.ascontiguousarray(byte_rows)

    if qtype == GGMLQuantizationType.F32:
        return byte_rows.view("<f4").astype(np.float32)
    if qtype == GGMLQuantizationType.F16:
        return byte_rows.view("<f2").astype(np.float32)
    if qtype == GGMLQuantizationType.F64:
        return byte_rows.view("<f8").astype(np.float64)
    if qtype == GGMLQuantizationType.BF16:
        return (byte_rows.view("<u2").astype(np.uint32) << np.uint32(16)).view(np.float32)

    fallback = _dequantize_fallback(qtype, byte_rows.reshape(-1, block_bytes))
    if fallback is not None:
        return fallback.reshape(n_sel, n_cols)

    def numpy_rows(b: np.ndarray) -> np.ndarray:
        try:
            result = gguf_quants.dequantize(b, qtype)
        except NotImplementedError as exc:
            raise UnsupportedTensorType(f"cannot dequantize tensor type {qtype.name}: gguf-py cannot ({exc})") from None
        return np.asarray(result, dtype=np.float32).reshape(b.shape[0], n_cols)

    fast = _ggml_dequantize(byte_rows, qtype, n_cols)
    if fast is not None:
        # the C routine must give gguf-py's bits (the fingerprint is defined by them): check a row
        # of every call; one difference retires it for this type in this process
        probe = min(n_sel - 1, 1 + n_sel // 2)
        if np.array_equal(fast[probe].view(np.uint32), numpy_rows(byte_rows[probe : probe + 1])[0].view(np.uint32)):
            return fast
        _GGML_BAD.add(qtype)
    return numpy_rows(byte_rows)


# -- ggml's own C dequantisation (llama-cpp-python's libggml-base), when installed ---------------

_GGML_BAD: set[GGMLQuantizationType] = set()
_GGML_LIB: list[Any] = []


def _ggml_lib() -> Any:
    """libggml-base from the llama_cpp package (found without importing it), or None."""
    if not _GGML_LIB:
        lib = None
        try:
            import ctypes
            import importlib.util
            from pathlib import Path

            spec = importlib.util.find_spec("llama_cpp")
            if spec is not None and spec.submodule_search_locations:
                root = Path(list(spec.submodule_search_locations)[0]) / "lib"
                for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
                    if (root / name).is_file():
                        lib = ctypes.CDLL(str(root / name))
                        break
        except (OSError, ImportError, ValueError):
            lib = None
        _GGML_LIB.append(lib)
    return _GGML_LIB[0]


def _ggml_dequantize(byte_rows: np.ndarray, qtype: GGMLQuantizationType, n_cols: int) -> np.ndarray | None:
    """``dequantize_row_<type>`` of libggml-base over contiguous rows (10x to 40x gguf-py's numpy,
    and it releases the GIL), or None where the library or the routine is missing."""
    if qtype in _GGML_BAD or byte_rows.shape[0] == 0:
        return None
    lib = _ggml_lib()
    if lib is None:
        return None
    import ctypes

    name = "dequantize_row_" + qtype.name.lower().replace("_k", "_K")
    try:
        fn = getattr(lib, name)
    except AttributeError:
        _GGML_BAD.add(qtype)
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    src = np.ascontiguousarray(byte_rows)
    out = np.empty((src.shape[0], n_cols), dtype=np.float32)
    step = max(1, (1 << 24) // max(1, n_cols))  # 16 Mi values per call
    for r0 in range(0, src.shape[0], step):
        r1 = min(src.shape[0], r0 + step)
        fn(src[r0:r1].ctypes.data, out[r0:r1].ctypes.data, (r1 - r0) * n_cols)
    return out


# -- rounding noise (the audit's base-free score) ------------------------------------------------

# type name -> (elements sharing one rounding step, the step per group from the (n_blocks, block_bytes) blocks)
def _steps_d(blocks: np.ndarray) -> np.ndarray:  # Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: fp16 d first, one step per block
    return blocks[:, :2].copy().view("<f2").astype(np.float64)


def _steps_k45(blocks: np.ndarray) -> np.ndarray:  # Q4_K, Q5_K: d * 6-bit sub-scale, 8 groups of 32
    from gguf.quants import Q4_K

    d = blocks[:, :2].copy().view("<f2").astype(np.float64)
    sc, _ = Q4_K.get_scale_min(np.ascontiguousarray(blocks[:, 4:16]))
    return d * sc.reshape(blocks.shape[0], -1).astype(np.float64)


def _steps_q6k(blocks: np.ndarray) -> np.ndarray:  # Q6_K: d (last) * int8 scale, 16 groups of 16
    d = blocks[:, 208:210].copy().view("<f2").astype(np.float64)
    return d * blocks[:, 192:208].copy().view(np.int8).astype(np.float64)


def _steps_q2k(blocks: np.ndarray) -> np.ndarray:  # Q2_K: d * low nibble of scales[16], 16 groups of 16
    d = blocks[:, 80:82].copy().view("<f2").astype(np.float64)
    return d * (blocks[:, :16] & 0x0F).astype(np.float64)


_ROUNDING_STEPS: Final[dict[str, tuple[int, Any]]] = {
    "Q4_0": (32, _steps_d), "Q4_1": (32, _steps_d), "Q5_0": (32, _steps_d), "Q5_1": (32, _steps_d),
    "Q8_0": (32, _steps_d), "Q4_K": (32, _steps_k45), "Q5_K": (32, _steps_k45), "Q6_K": (16, _steps_q6k),
    "Q2_K": (16, _steps_q2k),
}
FLOAT_TYPES: Final = frozenset({"F32", "F64", "F16", "BF16"})


def rounding_noise_rows(raw: npt.NDArray[np.generic], ggml_type: GGMLQuantizationType | int) -> np.ndarray | None:
    """Expected squared rounding error per row of a stored tensor: the sum over the row's weights of
    step**2 / 12, where step is the quantisation step of the weight's group (uniform rounding error within
    one step). Float types give zeros (their rounding is orders of magnitude below any block type's); types
    without a uniform step here (Q3_K, the IQ codebooks, ...) give None."""
    qtype = _coerce_type(ggml_type)
    name = _type_name(qtype)
    byte_rows = _row_view(np.ascontiguousarray(np.asarray(raw)))
    if name in FLOAT_TYPES:
        return np.zeros(byte_rows.shape[0])
    spec = _ROUNDING_STEPS.get(name)
    if spec is None:
        return None
    group, fn = spec
    _, block_bytes = GGML_QUANT_SIZES[qtype]
    n_rows = byte_rows.shape[0]
    steps = fn(np.ascontiguousarray(byte_rows).reshape(-1, block_bytes))
    return (group * steps.reshape(n_rows, -1) ** 2 / 12.0).sum(axis=1)


def quantize_rows(values: np.ndarray, ggml_type: GGMLQuantizationType | int) -> np.ndarray:
    """Float rows ``(n_rows, n_cols)`` quantised to ``ggml_type`` by ggml's own ``ggml_quantize_chunk``
    (llama-cpp-python's libggml-base; no importance matrix, as ``llama-quantize`` without ``--imatrix``):
    uint8 ``(n_rows, row_bytes)``. Used by benches and tests that build quantised checkpoints; K-quants
    are beyond gguf-py's own quantiser."""
    import ctypes

    qtype = _coerce_type(ggml_type)
    lib = _ggml_lib()
    if lib is None or not hasattr(lib, "ggml_quantize_chunk"):
        raise UnsupportedTensorType("quantising needs llama-cpp-python's libggml-base (pip install llama-cpp-python)")
    if not isinstance(qtype, GGMLQuantizationType) or qtype not in GGML_QUANT_SIZES:
        raise UnsupportedTensorType(f"cannot quantise to {_type_name(qtype)}")
    src = np.ascontiguousarray(values, dtype=np.float32)
    if src.ndim != 2:
        raise ValueError("quantize_rows takes a 2-D array of rows")
    elems, nbytes = GGML_QUANT_SIZES[qtype]
    if src.shape[1] % elems:
        raise ValueError(f"{qtype.name} rows must hold a multiple of {elems} values, not {src.shape[1]}")
    fn = lib.ggml_quantize_chunk
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]
    fn.restype = ctypes.c_size_t
    out = np.zeros((src.shape[0], src.shape[1] // elems * nbytes), dtype=np.uint8)
    written = fn(int(qtype), src.ctypes.data, out.ctypes.data, 0, src.shape[0], src.shape[1], None)
    if written != out.size:
        raise UnsupportedTensorType(f"ggml_quantize_chunk wrote {written} bytes for {qtype.name}, expected {out.size}")
    return out
