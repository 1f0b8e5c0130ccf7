"""What scaling rows did to their scale fields (:class:`ScaleReport`), and the errors that refuse a scaling: shared
by numpy's path (:func:`cna_export.io.quants.scale_rows`) and the plain-Python one (:mod:`cna_export.io.row_scale`),
and imported without numpy."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import CnaError
from .quant_layouts import LAYOUTS, GGMLQuantizationType


class ScaleError(CnaError, ValueError):
    """Scaling a row would produce an invalid tensor (non-finite input or multiplier)."""


class ScaleOverflowError(ScaleError, OverflowError):
    """A scaled field does not fit its storage type (it would become infinite)."""


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
    n_rows: int
    n_fields: int
    n_changed: int
    n_subnormal: int
    n_flushed: int
    max_rel_error: float

    @classmethod
    def nothing(cls, ggml_type: GGMLQuantizationType) -> ScaleReport:
        """The report of scaling no rows."""
        return cls(ggml_type, 0, 0, 0, 0, 0, 0.0)

    @property
    def exact(self) -> bool:
        """Whether every written field equals the exact product."""
        return self.max_rel_error == 0.0

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
