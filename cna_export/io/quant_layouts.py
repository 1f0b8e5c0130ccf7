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

from ..core.errors import CnaError
from .gguf_py import gguf_constants
from .quant_types import ENCODING_WIDTH, QUANT_TYPES, QuantType

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
# Scale fields: the smallest normal of each encoding (their numpy codecs: scale_codecs)
# ---------------------------------------------------------------------------

SMALLEST_NORMAL: Final[dict[str, float]] = {  # the smallest normal value of each encoding
    "f16": 2.0**-14,
    "f16_iq1m": 2.0**-14,
    "bf16": 2.0**-126,
    "f32": 2.0**-126,
    "f64": 2.0**-1022,
}
