"""Edits of GGUF tensors: multiply rows, columns or elements, exactly, in a buffer or in a file.

* :class:`TensorPatch` is one tensor's edit (rows, columns or bias elements, each with a
  multiplier) applied to a writable buffer laid out like ``ReaderTensor.data``; rows of any type
  :mod:`cna_export.io.quants` supports are scaled through their scale fields, columns and elements
  of float tensors directly;
* :meth:`TensorPatch.spans` gives the bytes a patch rewrites without copying the tensor: the touched
  rows, scaled (a column or element edit rewrites the whole tensor); :func:`patch_spans` does it for
  every patch of a file, before anything is written;
* :func:`patch_in_place` writes those spans into an existing byte copy of the file (the
  ``--fast-copy`` path); :func:`cna_export.io.gguf_write.write_patched` writes a patched copy instead.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping

from ..core.errors import CnaError
from . import row_scale
from .filecopy import write_at
from .gguf_read import tensor_map
from .quant_layouts import get_layout
from .quant_types import FLOAT_TYPES
from .scale_report import ScaleReport

if TYPE_CHECKING:
    import numpy as np

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
        import numpy as np

        from .quants import scale_rows

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
        import numpy as np

        buf = np.array(data, order="C", copy=True)
        return buf, self.apply(buf)

    def spans(self, data: np.ndarray) -> tuple[list[Span], ScaleReport]:
        """The bytes this patch rewrites in ``data`` (laid out like ``ReaderTensor.data``, left untouched), as
        spans sorted by offset, and the scale report. A row edit copies only the touched rows (its cost is
        proportional to them); a column or element edit gives the whole patched tensor as one span."""
        import numpy as np

        from .quants import normalise_rows

        if self.axis != "row":
            buf, report = self.patched_copy(data)
            return [Span(0, byte_view(buf))], report
        self.check()
        n_rows = int(np.prod(data.shape[:-1], dtype=np.int64)) if data.ndim > 1 else 1
        row_bytes = data.nbytes // max(n_rows, 1)
        try:
            idx = normalise_rows(self.indices, n_rows)
        except (ValueError, IndexError) as e:
            raise CnaError(f"{self.name}: cannot scale rows: {e}") from None
        order = np.argsort(idx, kind="stable")
        rows = np.ascontiguousarray(data.reshape(n_rows, -1)[idx[order]])  # the touched rows only (a copy)
        mults = [self.multipliers[int(k)] for k in order] if len(self.multipliers) == len(idx) else self.multipliers
        touched = TensorPatch(self.name, self.ggml_type, "row", list(range(len(idx))), list(mults))
        report = touched.apply(rows)
        flat = byte_view(rows).reshape(len(idx), row_bytes)
        return [Span(int(i) * row_bytes, flat[k]) for k, i in enumerate(idx[order])], report


@dataclass(frozen=True)
class Span:
    """Bytes of a tensor that a patch rewrites: ``data`` (``bytes``, or a uint8 numpy array) at ``offset`` from the
    tensor's first byte."""

    offset: int
    data: bytes | np.ndarray

    @property
    def nbytes(self) -> int:
        return memoryview(self.data).nbytes

    def view(self) -> memoryview:
        """The bytes, without a copy."""
        return memoryview(self.data).cast("B")


@dataclass
class PatchedTensor:
    """One patched tensor of a file: where its bytes lie in the source, the spans that change, the report."""

    name: str
    data_offset: int  # absolute, in the source file
    n_bytes: int
    spans: list[Span]
    report: ScaleReport


def byte_view(arr: np.ndarray) -> np.ndarray:
    import numpy as np

    return np.ascontiguousarray(arr).reshape(-1).view(np.uint8)


def patch_spans(reader: Any, patches: Mapping[str, TensorPatch]) -> dict[str, PatchedTensor]:
    """Every patch's spans (in ``patches`` order), all computed, and so checked, before anything is written."""
    tensors = tensor_map(reader)
    for patch in patches.values():
        patch.check()
    out: dict[str, PatchedTensor] = {}
    for name, patch in patches.items():
        t = tensors[name]
        spans, report = _row_spans(reader, t, patch) or patch.spans(t.data)
        out[name] = PatchedTensor(name, int(t.data_offset), int(t.n_bytes), spans, report)
    return out


def _row_spans(reader: Any, tensor: Any, patch: TensorPatch) -> tuple[list[Span], ScaleReport] | None:
    """A row edit's spans computed in plain Python from the file's bytes (:mod:`cna_export.io.row_scale`), the
    same bytes and report as :meth:`TensorPatch.spans`; None where that path does not apply (another axis, a
    scale encoding it lacks, too many fields): numpy's path then does it."""
    if patch.axis != "row" or not tensor.n_elements or getattr(reader, "mm", None) is None:
        return None
    layout = get_layout(patch.ggml_type)
    n_rows = tensor.n_elements // tensor.ne[0]
    row_bytes = tensor.n_bytes // n_rows
    if not row_scale.supports(layout, len(patch.indices) * (row_bytes // layout.block_bytes) * layout.scales_per_block):
        return None
    try:  # refused as TensorPatch.spans refuses: rows and counts as "cannot scale rows", a non-finite value as is
        rows = row_scale.checked_rows(patch.indices, n_rows)
        mults = row_scale.row_multipliers(patch.multipliers, len(rows))
        order = sorted(range(len(rows)), key=rows.__getitem__)
        starts = [tensor.data_offset + rows[k] * row_bytes for k in order]
        new, report = row_scale.scale_row_bytes(layout, [reader.mm[a : a + row_bytes] for a in starts],
                                                [rows[k] for k in order], [mults[k] for k in order])
    except CnaError as e:
        raise CnaError(f"{patch.name}: {e}") from None
    except (ValueError, IndexError) as e:
        raise CnaError(f"{patch.name}: cannot scale rows: {e}") from None
    return [Span(rows[k] * row_bytes, data) for k, data in zip(order, new, strict=True)], report


def write_spans(fd: int, tensor_start: int, spans: list[Span]) -> None:
    """Write ``spans`` of a tensor whose bytes start at ``tensor_start`` of ``fd`` (``pwrite``)."""
    for span in spans:
        write_at(fd, span.view(), tensor_start + span.offset)


def spans_written(fd: int, tensor_start: int, spans: list[Span]) -> bool:
    """Whether ``fd`` holds ``spans`` at ``tensor_start`` (read back with ``pread``)."""
    return all(os.pread(fd, span.nbytes, tensor_start + span.offset) == span.view() for span in spans)


def _float_elements(buf: np.ndarray, ggml_type: Any) -> np.ndarray:
    """Float tensor data as one element per item (BF16's uint8 bytes seen as uint16), sharing memory."""
    import numpy as np

    if ggml_type.name == "BF16" and buf.dtype == np.uint8:
        return buf.view("<u2")
    return buf


def patch_in_place(path: Path, reader: Any, patches: Mapping[str, TensorPatch] | Mapping[str, PatchedTensor]
                   ) -> dict[str, ScaleReport]:
    """Apply ``patches`` (or their :func:`patch_spans`) to a byte-identical copy of ``reader``'s file at ``path``.

    Only the touched rows/columns/elements are written (``pwrite``); nothing else in the file changes.
    """
    patched = patches if all(isinstance(p, PatchedTensor) for p in patches.values()) else patch_spans(reader, patches)
    fd = os.open(path, os.O_WRONLY)
    try:
        for p in patched.values():
            write_spans(fd, p.data_offset, p.spans)  # type: ignore[union-attr]
        os.fsync(fd)
    finally:
        os.close(fd)
    return {name: p.report for name, p in patched.items()}  # type: ignore[union-attr]


_HASH_CHUNK = 1 << 24
_KIND = "gguf-tensor"  # fingerprint-cache entries of single tensors' sha256 (keyed by file and tensor name)


def copy_patched(src_fd: int, start: int, n_bytes: int, spans: list[Span], before: bool = True,
                 dst_fd: int | None = None, dst_start: int = 0) -> tuple[str | None, str]:
    """sha256 of a tensor's bytes (``n_bytes`` of ``src_fd`` from ``start``) before (when ``before``) and after
    ``spans`` are written over them, in one read of the file (``preadv`` into one 16 MiB buffer, so neither
    the tensor nor a copy of it is held in memory); with ``dst_fd``, the patched bytes are also written there
    from ``dst_start`` (``pwrite``): the tensor is copied, patched and hashed in one pass."""
    h_before, h_after = hashlib.sha256(), hashlib.sha256()
    buf = bytearray(min(_HASH_CHUNK, max(n_bytes, 1)))
    view = memoryview(buf)
    k_span, pos = 0, 0
    while pos < n_bytes:
        want = min(len(buf), n_bytes - pos)
        got = os.preadv(src_fd, [view[:want]], start + pos)
        if got != want:
            raise OSError(f"file ended inside a tensor ({got} of {want} bytes read)")
        chunk = view[:want]
        if before:
            h_before.update(chunk)
        while k_span < len(spans) and spans[k_span].offset + spans[k_span].nbytes <= pos:
            k_span += 1
        for span in spans[k_span:]:
            if span.offset >= pos + want:
                break
            lo, hi = max(span.offset, pos), min(span.offset + span.nbytes, pos + want)
            chunk[lo - pos : hi - pos] = span.view()[lo - span.offset : hi - span.offset]
        h_after.update(chunk)
        if dst_fd is not None:
            write_at(dst_fd, chunk, dst_start + pos)
        pos += want
    return (h_before.hexdigest() if before else None), h_after.hexdigest()


def _spans_key(p: PatchedTensor) -> str:
    """The tensor's name and a digest of its edit (every span's place and bytes): with the source file unchanged,
    the same edit gives the same patched bytes, so their hash is remembered under this key."""
    h = hashlib.sha256(str(p.n_bytes).encode())
    for span in p.spans:
        h.update(span.offset.to_bytes(8, "little"))
        h.update(span.view())
    return f"{p.name}|{h.hexdigest()}"


def known_hashes(path: Path, patched: Mapping[str, PatchedTensor]
                 ) -> tuple[dict[str, tuple[str | None, str | None]], dict[str, tuple[str | None, str | None]]]:
    """For each patched tensor of file ``path``: its sha256 before and after the edit as far as the fingerprint
    cache knows them (None where not), and the cache's keys of the file as it is now for the ones it does not
    know (for :func:`remember_hashes`)."""
    from . import fpcache

    known, stamps = {}, {}
    for name, p in patched.items():
        extras = (name, _spans_key(p))
        hits = [fpcache.lookup(_KIND, [path], extra) for extra in extras]
        known[name] = (hits[0], hits[1])
        stamps[name] = tuple(fpcache.stamp(_KIND, [path], e) if hit is None else None  # type: ignore[assignment]
                             for e, hit in zip(extras, hits, strict=True))
    return known, stamps


def remember_hashes(path: Path, patched: Mapping[str, PatchedTensor], hashes: Mapping[str, tuple[str, str]],
                    stamps: Mapping[str, tuple[str | None, str | None]]) -> None:
    """Store the sha256 before and after of tensors hashed while the file kept the stamps taken before (best
    effort; a cache is an optimisation)."""
    from . import fpcache

    for name, keys in stamps.items():
        if name not in hashes:
            continue
        for extra, key, digest in zip((name, _spans_key(patched[name])), keys, hashes[name], strict=True):
            if key is not None and fpcache.stamp(_KIND, [path], extra) == key:
                fpcache.store(_KIND, [path], digest, extra, key=key)


def touched_hashes(path: Path, patched: PatchedTensor) -> tuple[str, str]:
    """A patched tensor's sha256 before and after the patch: from the fingerprint cache when it knows them, else
    from one read of the source file (:func:`copy_patched`) and remembered there."""
    known, stamps = known_hashes(path, {patched.name: patched})
    before, after = known[patched.name]
    if before is not None and after is not None:
        return before, after
    fd = os.open(path, os.O_RDONLY)
    try:
        got_before, after = copy_patched(fd, patched.data_offset, patched.n_bytes, patched.spans, before=before is None)
    finally:
        os.close(fd)
    before = before or got_before
    assert before is not None
    remember_hashes(path, {patched.name: patched}, {patched.name: (before, after)}, stamps)
    return before, after
