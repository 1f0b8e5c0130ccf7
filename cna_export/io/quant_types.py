"""GGML tensor types: one record per type, as gguf-py's quant classes carry their own layout.

Each :class:`QuantType` (:data:`QUANT_TYPES`, by GGML name) holds what the package knows of a type:

* its **block layout**: elements and bytes per block, and the byte offsets and encoding of the
  *scale fields* that :func:`cna_export.io.quants.scale_rows` multiplies. A type without one
  cannot have its rows scaled exactly; ``unsupported`` says why. :mod:`cna_export.io.quant_layouts`
  binds the layouts to gguf-py's ``GGMLQuantizationType`` (:data:`~cna_export.io.quant_layouts.LAYOUTS`);
* its **representation error**: how far a stored value can be from the value it was converted
  from (the unit roundoff for float types; a fraction of the row's largest magnitude for block
  types, generous: half a quantisation step plus the rounding of sub-block scales);
* its **rounding step** (:class:`RoundingStep`), for block types whose weights are rounded on a
  uniform grid: which weights share one step and where the step's factors lie in a block.

Every supported block format stores, in each block, one or two floating-point scale fields by
which every value the block dequantises to is linear::

    Q4_0, Q5_0, Q8_0, IQ*, TQ*, Q1_0   value = d * f(quants)
    Q3_K, Q6_K                         value = d * sc * q
    Q4_1, Q5_1                         value = d * q + m
    Q2_K, Q4_K, Q5_K                   value = d * sc * q - dmin * mn

Byte layouts (offsets of the scale fields inside one block, little-endian; from ggml's
``ggml-common.h`` block structs, sizes cross-checked against ``gguf.constants.GGML_QUANT_SIZES``)::

    type     elems bytes  scale fields
    Q4_0       32    18   d@0 (f16)
    Q4_1       32    20   d@0, m@2 (f16)
    Q5_0       32    22   d@0
    Q5_1       32    24   d@0, m@2
    Q8_0       32    34   d@0
    Q2_K      256    84   d@80, dmin@82   (after scales[16], qs[64])
    Q3_K      256   110   d@108           (after hmask[32], qs[64], scales[12])
    Q4_K      256   144   d@0, dmin@2     (then scales[12]: packed 6-bit sub-scales and mins)
    Q5_K      256   176   d@0, dmin@2     (then scales[12])
    Q6_K      256   210   d@208           (after ql[128], qh[64], scales[16] (int8) at 192)
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

Float tensors (F32, F16, BF16, F64) are blocks of one element whose only scale field is the
element itself.

This module is plain data and does not import gguf-py (half a second), so that diff and audit of
safetensors checkpoints stay light.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Final, Literal

ScaleEncoding = Literal["f16", "bf16", "f32", "f64", "f16_iq1m"]
"""How a scale field is stored.

``f16``/``bf16``/``f32``/``f64``: a plain little-endian float at the offset.
``f16_iq1m``: an fp16 whose four nibbles are the high nibbles (bits 12..15) of
the four consecutive little-endian uint16 words starting at the offset, least
significant nibble first (IQ1_M); the low 12 bits of each word are 3-bit
sub-block scales and are left untouched.
"""

TypeKind = Literal["float", "block", "int"]
SubScales = Literal["none", "k6", "i8", "lo4"]

ENCODING_WIDTH: Final[dict[str, int]] = {"f16": 2, "bf16": 2, "f32": 4, "f64": 8, "f16_iq1m": 8}
"""Bytes a scale field of each encoding spans."""

COARSE_ERROR: Final = 0.6
"""Representation error of block types without a finer figure (2-bit and below), and of unknown types."""


@dataclass(frozen=True)
class RoundingStep:
    """Where a block type's quantisation step lies: ``group`` consecutive weights share one uniform
    step, the block's first scale field ``d`` times the group's sub-scale.

    ``sub_scales``: ``"none"`` (``d`` alone is the step: one group per block), ``"k6"`` (Q4_K/Q5_K:
    the 6-bit sub-scales packed in ``scales[12]``), ``"i8"`` (Q6_K: one int8 per group) or ``"lo4"``
    (Q2_K: the low nibble of one byte per group); ``at`` is their byte range in the block.
    """

    group: int
    sub_scales: SubScales = "none"
    at: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class QuantType:
    """What the package knows of one GGML tensor type (see the module docstring).

    ``block_elems == 0``: no block layout is known, the rows cannot be scaled (``unsupported`` says
    why). ``representation_error``: the unit roundoff for float types, a fraction of the row's
    largest magnitude for block types, 0 for integer types.
    """

    name: str
    kind: TypeKind
    representation_error: float
    block_elems: int = 0
    block_bytes: int = 0
    scale_offsets: tuple[int, ...] = ()
    scale_encoding: ScaleEncoding = "f16"
    note: str = ""
    unsupported: str = ""
    rounding: RoundingStep | None = None
    torch_name: str = ""  # float types: the torch (safetensors) dtype name

    def __post_init__(self) -> None:
        if not self.block_elems:
            return
        width = ENCODING_WIDTH[self.scale_encoding]
        if self.block_elems < 0 or self.block_bytes <= 0 or not self.scale_offsets:
            raise ValueError(f"invalid layout for {self.name}")
        ends = sorted((off, off + width) for off in self.scale_offsets)
        for (_, end), (next_start, _) in pairwise(ends):
            if next_start < end:
                raise ValueError(f"overlapping scale fields in layout for {self.name}")
        if ends[0][0] < 0 or ends[-1][1] > self.block_bytes:
            raise ValueError(f"scale field outside the block in layout for {self.name}")


def _float(name: str, nbytes: int, encoding: ScaleEncoding, unit_roundoff: float, torch_name: str) -> QuantType:
    return QuantType(name, "float", unit_roundoff, 1, nbytes, (0,), encoding, f"plain {torch_name} elements",
                     torch_name=torch_name)


def _block(name: str, elems: int, nbytes: int, offsets: tuple[int, ...], note: str, error: float = COARSE_ERROR,
           rounding: RoundingStep | None = None, encoding: ScaleEncoding = "f16") -> QuantType:
    return QuantType(name, "block", error, elems, nbytes, offsets, encoding, note, rounding=rounding)


def _unsupported(name: str, kind: TypeKind, error: float, reason: str) -> QuantType:
    return QuantType(name, kind, error, unsupported=reason)


_D32 = RoundingStep(32)  # fp16 d first, one step per 32-weight block
_K45 = RoundingStep(32, "k6", (4, 16))  # d * 6-bit sub-scale, 8 groups of 32
_INTEGER = "integer tensor type (not a weight that multipliers apply to)"

QUANT_TYPES: Final[dict[str, QuantType]] = {t.name: t for t in (
    _float("F32", 4, "f32", 2.0**-24, "float32"),
    _float("F16", 2, "f16", 2.0**-11, "float16"),
    _float("BF16", 2, "bf16", 2.0**-8, "bfloat16"),
    _float("F64", 8, "f64", 2.0**-53, "float64"),
    _block("Q4_0", 32, 18, (0,), "d", 0.12, _D32),
    _block("Q4_1", 32, 20, (0, 2), "d, m (value = d*q + m)", 0.12, _D32),
    _block("Q5_0", 32, 22, (0,), "d", 0.06, _D32),
    _block("Q5_1", 32, 24, (0, 2), "d, m (value = d*q + m)", 0.06, _D32),
    _block("Q8_0", 32, 34, (0,), "d", 0.01, _D32),
    _block("Q2_K", 256, 84, (80, 82), "d, dmin after scales[16] and qs[64]", COARSE_ERROR,
           RoundingStep(16, "lo4", (0, 16))),
    _block("Q3_K", 256, 110, (108,), "d after hmask[32], qs[64], scales[12]", 0.25),
    _block("Q4_K", 256, 144, (0, 2), "d, dmin", 0.12, _K45),
    _block("Q5_K", 256, 176, (0, 2), "d, dmin", 0.06, _K45),
    _block("Q6_K", 256, 210, (208,), "d after ql[128], qh[64], scales[16]", 0.04, RoundingStep(16, "i8", (192, 208))),
    _block("Q8_K", 256, 292, (0,), "float32 d; bsums are quant sums and stay valid", 0.01, encoding="f32"),
    _block("IQ2_XXS", 256, 66, (0,), "d"),
    _block("IQ2_XS", 256, 74, (0,), "d"),
    _block("IQ2_S", 256, 82, (0,), "d"),
    _block("IQ3_XXS", 256, 98, (0,), "d", 0.25),
    _block("IQ3_S", 256, 110, (0,), "d", 0.25),
    _block("IQ1_S", 256, 50, (0,), "d"),
    _block("IQ1_M", 256, 56, (48,), "fp16 d in the high nibbles of scales[8]", encoding="f16_iq1m"),
    _block("IQ4_NL", 32, 18, (0,), "d", 0.12),
    _block("IQ4_XS", 256, 136, (0,), "d", 0.12),
    _block("TQ1_0", 256, 54, (52,), "d after qs[48], qh[4]"),
    _block("TQ2_0", 256, 66, (64,), "d after qs[64]"),
    _block("Q1_0", 128, 18, (0,), "d (value = +d or -d per bit)"),
    _unsupported("Q8_1", "block", 0.01, "intermediate type never stored in model files, and gguf-py's "
                 "GGML_QUANT_SIZES (40 bytes: f32 d and s) disagrees with ggml's block_q8_1 (36 bytes: fp16 d and s)"),
    _unsupported("MXFP4", "block", 0.12, "its block scale is an unsigned E8M0 exponent (a power of two): only "
                 "multipliers that are themselves positive powers of two could be folded into it, not 0, "
                 "negative or other values"),
    _unsupported("NVFP4", "block", COARSE_ERROR, "its scales are unsigned 8-bit UE4M3 values: negative multipliers "
                 "cannot be folded into them and other multipliers would lose far more than an fp16 rounding"),
    _unsupported("I8", "int", 0.0, _INTEGER),
    _unsupported("I16", "int", 0.0, _INTEGER),
    _unsupported("I32", "int", 0.0, _INTEGER),
    _unsupported("I64", "int", 0.0, _INTEGER),
)}  # fmt: skip
"""Every GGML type the package has facts on, by GGML name."""

FLOAT_TYPES: Final[frozenset[str]] = frozenset(t.name for t in QUANT_TYPES.values() if t.kind == "float")
"""GGML names of the float types (F32, F16, BF16, F64)."""
TORCH_FLOAT_NAMES: Final[dict[str, str]] = {t.torch_name: t.name for t in QUANT_TYPES.values() if t.torch_name}
"""torch (safetensors) dtype name -> GGML name of the same float type (``"bfloat16"`` -> ``"BF16"``)."""


def float_type(storage: str) -> str | None:
    """The GGML name of a float storage spelled either way (``"F32"`` or ``"float32"``), None when not a float."""
    return storage if storage in FLOAT_TYPES else TORCH_FLOAT_NAMES.get(storage)
