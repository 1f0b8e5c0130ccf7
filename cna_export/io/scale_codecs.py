"""Scale fields of GGUF blocks read and written as numpy arrays: the raw bits of the field at one offset of every
block, and their exact decoding to float64 and single rounding back (what
:func:`cna_export.io.quants.scale_rows` multiplies). :mod:`cna_export.io.row_scale` does the same for a few rows in
plain Python."""

from __future__ import annotations

from typing import Final

import numpy as np

from .quant_types import ENCODING_WIDTH, ScaleEncoding

_ENCODING_UINT: Final[dict[str, type[np.unsignedinteger]]] = {
    "f16": np.uint16,
    "bf16": np.uint16,
    "f32": np.uint32,
    "f64": np.uint64,
    "f16_iq1m": np.uint16,
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
