"""The type records of :mod:`cna_export.io.quant_types` bound to gguf-py's ``GGMLQuantizationType``:
the block layout of every type whose rows can be scaled exactly (:data:`LAYOUTS`), the reason for
every known type whose rows cannot (:data:`UNSUPPORTED`), and the codecs of scale fields.

Each layout is checked against gguf-py's ``GGML_QUANT_SIZES``; a type gguf-py sizes otherwise is
unsupported. :func:`get_layout` raises :class:`UnsupportedTensorType` for every type not in
:data:`LAYOUTS`; nothing is ever skipped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Final

import numpy as np

from ..core.errors import CnaError
from .gguf_py import gguf_constants
from .quant_types import ENCODING_WIDTH, QUANT_TYPES, QuantType, ScaleEncoding

_GGUF = gguf_constants()  # gguf-py's constants without the rest of gguf-py (io.gguf_py)
GGML_QUANT_SIZES = _GGUF.GGML_QUANT_SIZES
GGMLQuantizationType = _GGUF.GGMLQuantizationType


class UnsupportedTensorType(CnaError, ValueError):
    """A GGML tensor type whose rows cannot be scaled (or dequantised) exactly."""


@dataclass(frozen=True)
class QuantLayout(QuantType):
    """The record of a type whose rows can be scaled, bound to gguf-py's ``GGMLQuantizationType``.

    A row of ``n`` elements is ``n // block_elems`` consecutive blocks of
    ``block_bytes`` bytes each. ``scale_offsets`` are the byte offsets, within
    a block, of the fields that ``scale_rows`` multiplies; all fields of a
    layout share one ``scale_encoding``. For ``kind == "float"`` a block is a
    single element and the element itself is the scale field.
    """

    ggml_type: GGMLQuantizationType = field(kw_only=True)

    @classmethod
    def bind(cls, ggml_type: GGMLQuantizationType, facts: QuantType) -> QuantLayout:
        return cls(**{f.name: getattr(facts, f.name) for f in fields(facts)}, ggml_type=ggml_type)

    @property
    def scale_bytes(self) -> int:
        """Bytes a scale field spans (8 for IQ1_M's nibble-packed fp16)."""
        return ENCODING_WIDTH[self.scale_encoding]

    @property
    def scales_per_block(self) -> int:
        """Number of scale fields per block."""
        return len(self.scale_offsets)


def _build_registry() -> tuple[dict[GGMLQuantizationType, QuantLayout], dict[GGMLQuantizationType, str]]:
    layouts: dict[GGMLQuantizationType, QuantLayout] = {}
    unsupported: dict[GGMLQuantizationType, str] = {}
    for facts in QUANT_TYPES.values():
        qtype = getattr(GGMLQuantizationType, facts.name, None)
        if qtype is None:  # older gguf-py without this type: it cannot occur in a file it reads
            continue
        if not facts.block_elems:
            unsupported[qtype] = facts.unsupported
            continue
        expected = GGML_QUANT_SIZES.get(qtype)
        if expected != (facts.block_elems, facts.block_bytes):
            unsupported[qtype] = (
                f"gguf-py's GGML_QUANT_SIZES gives {expected} (elements, bytes) per block "
                f"but this module knows the layout for ({facts.block_elems}, {facts.block_bytes})"
            )
            continue
        layouts[qtype] = QuantLayout.bind(qtype, facts)
    return layouts, unsupported


_REGISTRY = _build_registry()
LAYOUTS: Final[dict[GGMLQuantizationType, QuantLayout]] = _REGISTRY[0]
"""Every tensor type whose rows :func:`~cna_export.io.quants.scale_rows` can scale, keyed by GGML type."""
UNSUPPORTED: Final[dict[GGMLQuantizationType, str]] = _REGISTRY[1]
"""Known tensor types that are deliberately not supported, with the reason."""


def coerce_type(ggml_type: GGMLQuantizationType | int) -> GGMLQuantizationType | int:
    """``ggml_type`` as a ``GGMLQuantizationType`` when gguf-py knows the id, else the int."""
    try:
        return GGMLQuantizationType(int(ggml_type))
    except ValueError:
        return int(ggml_type)


def type_name(ggml_type: GGMLQuantizationType | int) -> str:
    """A type's GGML name, or ``unknown GGML type id N``."""
    return ggml_type.name if isinstance(ggml_type, GGMLQuantizationType) else f"unknown GGML type id {ggml_type}"


def get_layout(ggml_type: GGMLQuantizationType | int) -> QuantLayout:
    """Return the block layout of ``ggml_type``.

    Raises :class:`UnsupportedTensorType` (one line, naming the type and the
    reason) for every type not in :data:`LAYOUTS`.
    """
    qtype = coerce_type(ggml_type)
    layout = LAYOUTS.get(qtype) if isinstance(qtype, GGMLQuantizationType) else None
    if layout is not None:
        return layout
    name = type_name(qtype)
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
    qtype = coerce_type(ggml_type)
    sizes = GGML_QUANT_SIZES.get(qtype) if isinstance(qtype, GGMLQuantizationType) else None
    if sizes is None:
        raise UnsupportedTensorType(f"tensor type {type_name(qtype)} has no known block size")
    block_elems, block_bytes = sizes
    if n_cols < 0 or n_cols % block_elems:
        raise ValueError(f"{n_cols} columns is not a whole number of {type_name(qtype)} blocks of {block_elems}")
    return n_cols // block_elems * block_bytes


# ---------------------------------------------------------------------------
# Scale-field codecs
# ---------------------------------------------------------------------------

_ENCODING_UINT: Final[dict[str, type[np.unsignedinteger]]] = {
    "f16": np.uint16,
    "bf16": np.uint16,
    "f32": np.uint32,
    "f64": np.uint64,
    "f16_iq1m": np.uint16,
}
SMALLEST_NORMAL: Final[dict[str, float]] = {  # the smallest normal value of each encoding
    "f16": 2.0**-14,
    "f16_iq1m": 2.0**-14,
    "bf16": 2.0**-126,
    "f32": 2.0**-126,
    "f64": 2.0**-1022,
}


def read_bits(blocks: np.ndarray, offset: int, encoding: ScaleEncoding) -> np.ndarray:
    """Raw bit patterns of the scale field at ``offset`` of every block (``blocks[..., block_bytes]``)."""
    width = ENCODING_WIDTH[encoding]
    field = np.ascontiguousarray(blocks[..., offset : offset + width])
    if encoding == "f16_iq1m":
        words = field.view("<u2").astype(np.uint16)  # (..., 4)
        bits = np.zeros(words.shape[:-1], dtype=np.uint16)
        for i in range(4):
            bits |= (words[..., i] >> np.uint16(12)) << np.uint16(4 * i)
        return bits
    return field.view(np.dtype(_ENCODING_UINT[encoding]).newbyteorder("<"))[..., 0].astype(_ENCODING_UINT[encoding])


def write_bits(blocks: np.ndarray, offset: int, encoding: ScaleEncoding, bits: np.ndarray) -> None:
    """Store ``bits`` into the scale field at ``offset`` of every block, in place."""
    width = ENCODING_WIDTH[encoding]
    if encoding == "f16_iq1m":
        words = np.ascontiguousarray(blocks[..., offset : offset + width]).view("<u2").astype(np.uint16)
        for i in range(4):
            nibble = (bits >> np.uint16(4 * i)) & np.uint16(0xF)
            words[..., i] = (words[..., i] & np.uint16(0x0FFF)) | (nibble << np.uint16(12))
        blocks[..., offset : offset + width] = words.astype("<u2").view(np.uint8)
        return
    le = np.dtype(_ENCODING_UINT[encoding]).newbyteorder("<")
    blocks[..., offset : offset + width] = np.ascontiguousarray(bits.astype(le)[..., None]).view(np.uint8)


def bits_to_float(bits: np.ndarray, encoding: ScaleEncoding) -> np.ndarray:
    """Decode raw scale-field bits to float64 (exact)."""
    if encoding in ("f16", "f16_iq1m"):
        return bits.astype(np.uint16).view(np.float16).astype(np.float64)
    if encoding == "bf16":
        return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
    if encoding == "f32":
        return bits.astype(np.uint32).view(np.float32).astype(np.float64)
    return bits.astype(np.uint64).view(np.float64).copy()


def float_to_bits(values: np.ndarray, encoding: ScaleEncoding) -> np.ndarray:
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
