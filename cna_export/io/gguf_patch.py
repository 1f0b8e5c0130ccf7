"""Edits of GGUF tensors: multiply rows, columns or elements, exactly, in a buffer or in a file.

* :class:`TensorPatch` is one tensor's edit (rows, columns or bias elements, each with a
  multiplier) applied to a writable buffer laid out like ``ReaderTensor.data``; rows of any type
  :mod:`cna_export.io.quants` supports are scaled through their scale fields, columns and elements
  of float tensors directly;
* :func:`patch_in_place` edits the bytes of tensors in an existing copy of the file through
  ``np.memmap`` (the ``--fast-copy`` path); :func:`cna_export.io.gguf_write.write_patched` writes a
  patched copy instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np

from ..core.errors import CnaError
from .gguf_read import tensor_map
from .quant_layouts import get_layout
from .quant_types import FLOAT_TYPES
from .quants import ScaleReport, scale_rows

Axis = Literal["row", "column", "element"]


@dataclass
class TensorPatch:
    """Multiply rows, columns or elements of one tensor.

    ``axis="row"``: rows of a 2-D (or flattened N-D) tensor of any type that
    :mod:`cna_export.io.quants` supports, through the scale fields. ``axis="column"``:
    columns of a float tensor (F32/F16/BF16/F64). ``axis="element"``: elements of a
    float vector (a bias).
    """

    name: str
    ggml_type: Any
    axis: Axis
    indices: list[int]
    multipliers: list[float]
    shape: list[int] = field(default_factory=list)

    def check(self) -> None:
        """Refuse, before anything is written, an edit this tensor type cannot take exactly."""
        name = self.ggml_type.name
        if self.axis == "row":
            try:
                get_layout(self.ggml_type)
            except CnaError as e:
                raise CnaError(f"{self.name}: {e}") from None
        elif name not in FLOAT_TYPES:
            what = "columns" if self.axis == "column" else "bias elements"
            raise CnaError(
                f"{self.name} is {name}: scaling {what} needs a float tensor (F32, F16, BF16 or F64)"
                + ("; use --fold up for quantised ffn_down tensors" if self.axis == "column" else "")
            )

    def apply(self, buf: np.ndarray) -> ScaleReport:
        """Scale ``buf`` (writable, C-contiguous, laid out like ``ReaderTensor.data``) in place."""
        self.check()
        try:
            if self.axis == "row":
                _, report = scale_rows(buf, self.ggml_type, self.indices, self.multipliers, out=buf)
                return report
            elems = _float_elements(buf, self.ggml_type)
            if self.axis == "element":
                col = elems.reshape(-1, 1)
                _, report = scale_rows(col, self.ggml_type, self.indices, self.multipliers, out=col)
                return report
            if elems.ndim == 3:  # ffn_down_exps [experts, n_embd, n_ff]: flat column e * n_ff + j
                width = elems.shape[-1]
                mat = elems.transpose(1, 0, 2).reshape(elems.shape[1], -1)  # a copy: written back below
                cols = np.ascontiguousarray(mat[:, self.indices].T)
                _, report = scale_rows(cols, self.ggml_type, range(len(self.indices)), self.multipliers, out=cols)
                for k, i in enumerate(self.indices):
                    elems[i // width, :, i % width] = cols[k]
                return report
            mat = elems if elems.ndim == 2 else elems.reshape(-1, elems.shape[-1])
            cols = np.ascontiguousarray(mat[:, self.indices].T)
            _, report = scale_rows(cols, self.ggml_type, range(len(self.indices)), self.multipliers, out=cols)
            mat[:, self.indices] = cols.T
            return report
        except CnaError as e:
            raise CnaError(f"{self.name}: {e}") from None
        except (ValueError, IndexError) as e:
            raise CnaError(f"{self.name}: cannot scale {self.axis}s: {e}") from None

    def patched_copy(self, data: np.ndarray) -> tuple[np.ndarray, ScaleReport]:
        """A patched C-contiguous copy of ``data`` (the source stays untouched)."""
        buf = np.array(data, order="C", copy=True)
        return buf, self.apply(buf)


def _float_elements(buf: np.ndarray, ggml_type: Any) -> np.ndarray:
    """Float tensor data as one element per item (BF16's uint8 bytes seen as uint16), sharing memory."""
    if ggml_type.name == "BF16" and buf.dtype == np.uint8:
        return buf.view("<u2")
    return buf


def patch_in_place(
    path: Path, reader: Any, patches: Mapping[str, TensorPatch]
) -> dict[str, ScaleReport]:
    """Apply ``patches`` to a byte-identical copy of ``reader``'s file at ``path`` through ``np.memmap``.

    Only the touched rows/columns/elements are written; nothing else in the file changes.
    """
    tensors = tensor_map(reader)
    reports: dict[str, ScaleReport] = {}
    for patch in patches.values():
        patch.check()
    for name, patch in patches.items():
        t = tensors[name]
        mm = np.memmap(path, dtype=t.data.dtype, mode="r+", offset=int(t.data_offset), shape=t.data.shape)
        try:
            reports[name] = patch.apply(mm)
            mm.flush()
        finally:
            del mm
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())
    return reports
