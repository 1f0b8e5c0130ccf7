"""GGUF files: reading, exact row/column patching, and rewriting with gguf-py's writer.

Folding a circuit into a GGUF file changes a few rows of ``blk.N.ffn_up.weight``
(or columns of a float ``blk.N.ffn_down.weight``) and nothing else. This module
does the file-level work around :mod:`cna_export.io.quants`, which scales rows
of quantised tensors exactly through their scale fields:

* :func:`open_gguf` opens a file (memory-mapped, read-only) with one-line errors;
* :class:`TensorPatch` is one tensor's edit (rows, columns or bias elements,
  each with a multiplier) applied to a writable buffer laid out like
  ``ReaderTensor.data``;
* :func:`write_patched` streams a copy through ``gguf.GGUFWriter``: every KV
  pair re-added in file order with its original value type, the alignment kept,
  every tensor written tensor by tensor from the reader's memory map with its
  original GGML type and shape, patched tensors from a patched copy;
* :func:`patch_in_place` edits the bytes of tensors in an existing copy of the
  file through ``np.memmap`` (the ``--fast-copy`` path);
* :func:`kv_differences` and :func:`tensor_differences` compare two files
  exactly (raw KV bytes, tensor types, shapes and bytes);
* :func:`cna_export.io.identity.gguf_identity` and ``gguf_fingerprint`` describe the model the way
  :class:`cna_export.core.circuit.ModelIdentity` does for a transformers model (the
  fingerprint is computed from dequantised ffn_down tensors and equals the one
  of the same file loaded by transformers).

Tensor shapes in this module are numpy order (the reverse of GGML's ``ne``):
``blk.N.ffn_up.weight`` is ``(n_ff, n_embd)``, so neuron ``j`` is row ``j``;
``blk.N.ffn_down.weight`` is ``(n_embd, n_ff)``, so neuron ``j`` is column ``j``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np

from ..core.errors import CnaError
from ..core.progress import bar as progress_bar
from .quants import LAYOUTS, ScaleReport, get_layout, scale_rows

log = logging.getLogger(__name__)

FLOAT_TYPES = ("F32", "F16", "BF16")
Axis = Literal["row", "column", "element"]
_HASH_CHUNK = 1 << 24


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------

_SCALAR = {  # GGUFValueType value -> (struct format, numpy dtype)
    0: ("<B", "<u1"), 1: ("<b", "<i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"),
    4: ("<I", "<u4"), 5: ("<i", "<i4"), 6: ("<f", "<f4"), 7: ("<?", "?"),
    10: ("<Q", "<u8"), 11: ("<q", "<i8"), 12: ("<d", "<f8"),
}  # fmt: skip
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 16  # nested KV arrays deeper than this are refused (real files nest at most once or twice)
_TENSOR_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8,
                  "I16": np.int16, "I32": np.int32, "I64": np.int64}  # as gguf.GGUFReader exposes them


def _shown(name: str) -> str:
    """A key or tensor name for a one-line message: as is when printable, else quoted with escapes."""
    return name if name.isprintable() else repr(name)


@dataclass
class KVField:
    """One KV pair of a GGUF header: where it lies in the file and how to decode it."""

    name: str
    type: Any  # GGUFValueType
    sub_type: Any | None  # element type of an array (ARRAY for nested arrays), None for scalars
    offset: int  # first byte of the pair (the key's length)
    value_offset: int
    end: int
    count: int  # array length (1 for scalars)
    _file: "GGUFFile" = field(repr=False)
    _items: list[tuple[int, int]] | None = field(default=None, repr=False)  # string arrays: (offset, length)

    def raw(self) -> bytes:
        """The exact bytes of the pair in the file: key length, key, value type and value."""
        return self._file.mm[self.offset : self.end]

    def value(self) -> Any:
        """The value as Python data: str, int, float, bool, or a list of those."""
        mm = self._file.mm
        t = int(self.type)
        if t == _STRING:
            return self._string(self.value_offset + 8, struct.unpack_from("<Q", mm, self.value_offset)[0])
        if t != _ARRAY:
            return struct.unpack_from(_SCALAR[t][0], mm, self.value_offset)[0]
        sub = int(self.sub_type) if self.sub_type is not None else None
        if self.count == 0:
            return []
        if sub == _STRING:
            return [self._string(o, n) for o, n in self._items or []]
        if sub in _SCALAR:
            return np.frombuffer(mm, dtype=_SCALAR[sub][1], count=self.count, offset=self.value_offset + 12).tolist()
        raise CnaError(f"GGUF key {_shown(self.name)} is a nested array; its value is not decoded")

    def item(self, index: int) -> Any:
        """One element of an array value (strings decoded)."""
        if int(self.type) != _ARRAY or not 0 <= index < self.count:
            raise IndexError(f"{self.name} has no element {index}")
        if int(self.sub_type) == _STRING:
            assert self._items is not None
            return self._string(*self._items[index])
        fmt = _SCALAR[int(self.sub_type)][0]
        return struct.unpack_from(fmt, self._file.mm, self.value_offset + 12 + index * struct.calcsize(fmt))[0]

    def _string(self, offset: int, length: int) -> str:
        try:
            return self._file.mm[offset : offset + length].decode("utf-8")
        except UnicodeDecodeError:
            raise CnaError(f"GGUF key {_shown(self.name)} holds a string that is not valid UTF-8") from None

    def writer_value(self) -> tuple[Any, Any, Any]:
        """(value, type, sub_type) that make ``GGUFWriter.add_key_value`` write this pair byte for byte.

        Strings (and string arrays) are passed as raw bytes, so they round-trip even
        when they are not valid UTF-8; numbers keep their declared GGUF type.
        Empty and nested arrays cannot be written by gguf-py's writer and are refused
        (``--fast-copy`` keeps them).
        """
        t = int(self.type)
        mm = self._file.mm
        if t == _STRING:
            n = struct.unpack_from("<Q", mm, self.value_offset)[0]
            return mm[self.value_offset + 8 : self.value_offset + 8 + n], self.type, None
        if t != _ARRAY:
            return self.value(), self.type, None
        if self.count == 0:
            raise CnaError(
                f"GGUF key {self.name} is an empty array, which gguf-py's writer cannot write; "
                "use --fast-copy to keep the file's metadata as it is"
            )
        if int(self.sub_type) == _ARRAY:
            raise CnaError(
                f"GGUF key {self.name} is a nested array, which gguf-py's writer cannot reproduce exactly; "
                "use --fast-copy to keep the file's metadata as it is"
            )
        if int(self.sub_type) == _STRING:
            return [mm[o : o + n] for o, n in self._items or []], self.type, self.sub_type
        return self.value(), self.type, self.sub_type


@dataclass
class TensorInfo:
    """One tensor of a GGUF file; ``data`` is a read-only view of its bytes, shaped as gguf.GGUFReader shapes it."""

    name: str
    tensor_type: Any  # GGMLQuantizationType
    ne: tuple[int, ...]  # GGML dimensions (ne[0] first)
    n_elements: int
    n_bytes: int
    data_offset: int  # absolute offset in the file
    data: np.ndarray

    @property
    def shape(self) -> np.ndarray:
        return np.array(self.ne, dtype=np.uint64)


class GGUFFile:
    """A GGUF file opened read-only: header parsed with ``struct`` (fast on large vocabularies), data memory-mapped.

    Mirrors what cna-export needs from ``gguf.GGUFReader`` (``fields``,
    ``tensors``, ``alignment``, ``data_offset``; tensor ``data`` with the same
    dtype and shape conventions) and adds exact raw KV bytes. Only
    little-endian files of GGUF versions 2 and 3 are read.
    """

    def __init__(self, path: str | Path) -> None:
        from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType
        from gguf.quants import quant_shape_to_byte_shape

        self.path = Path(path)
        with open(self.path, "rb") as fh:
            try:
                self.mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:
                raise CnaError(f"{self.path} is not a readable GGUF file: it is empty") from None
        mm = self.mm
        size = len(mm)
        try:
            magic, version = struct.unpack_from("<II", mm, 0)
            if magic != GGUF_MAGIC:
                raise CnaError(f"{self.path} is not a GGUF file (bad magic)")
            if version & 0xFFFF == 0:
                raise CnaError(f"{self.path} is a big-endian GGUF file; only little-endian GGUF files are supported")
            if version not in (2, 3):
                raise CnaError(f"{self.path} is GGUF version {version}; versions 2 and 3 are supported")
            self.version = version
            n_tensors, n_kv = struct.unpack_from("<QQ", mm, 8)
            # every KV takes at least 13 bytes (key length, value type, one byte) and every tensor
            # info at least 24 (name length, n_dims, type, offset): refuse counts the file cannot hold
            if n_kv > (size - 24) // 13 or n_tensors > (size - 24) // 24:
                raise CnaError(
                    f"{self.path} is not a readable GGUF file (truncated or corrupt): its header claims {n_kv} KV pairs and "
                    f"{n_tensors} tensors, more than a {size}-byte file can hold"
                )
            off = 24
            self.fields: dict[str, KVField] = {}
            for _ in range(n_kv):
                start = off
                name, off = self._str(off)
                (vtype,) = struct.unpack_from("<I", mm, off)
                off += 4
                value_offset = off
                sub, count, items, off = self._skip_value(vtype, off)
                if name in self.fields:
                    raise CnaError(f"{self.path} is not a valid GGUF file: duplicate key {_shown(name)}")
                self.fields[name] = KVField(
                    name, GGUFValueType(vtype), None if sub is None else GGUFValueType(sub),
                    start, value_offset, off, count, self, items,
                )  # fmt: skip
            infos = []
            for _ in range(n_tensors):
                name, off = self._str(off)
                (n_dims,) = struct.unpack_from("<I", mm, off)
                if n_dims > _MAX_DIMS:
                    raise CnaError(f"{self.path} is not a valid GGUF file: tensor {_shown(name)} has {n_dims} dimensions "
                                   f"(at most {_MAX_DIMS})")
                ne = struct.unpack_from(f"<{n_dims}Q", mm, off + 4)
                off += 4 + 8 * n_dims
                ttype, rel = struct.unpack_from("<IQ", mm, off)
                off += 12
                infos.append((name, ne, ttype, rel))
        except (struct.error, UnicodeDecodeError, OverflowError, MemoryError, RecursionError):
            raise CnaError(f"{self.path} is not a readable GGUF file: truncated or corrupt header") from None
        except ValueError as e:
            raise CnaError(f"{self.path} is not a readable GGUF file: {str(e).splitlines()[0]}") from None

        self.alignment = GGUF_DEFAULT_ALIGNMENT
        al = self.fields.get("general.alignment")
        if al is not None:
            a = al.value()
            if int(al.type) != 4 or a == 0 or a & (a - 1):
                raise CnaError(f"{self.path} has an invalid general.alignment ({a})")
            self.alignment = int(a)
        self.data_offset = -(-off // self.alignment) * self.alignment
        self.tensors: list[TensorInfo] = []
        try:
            self._read_tensors(infos, size, GGML_QUANT_SIZES, GGMLQuantizationType, quant_shape_to_byte_shape)
        except (ValueError, OverflowError, MemoryError) as e:
            raise CnaError(f"{self.path} is not a valid GGUF file: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

    def _read_tensors(self, infos: list, size: int, GGML_QUANT_SIZES: Any, GGMLQuantizationType: Any,
                      quant_shape_to_byte_shape: Any) -> None:
        mm = self.mm
        seen: set[str] = set()
        spans: list[tuple[int, int, str]] = []
        for name, ne, ttype, rel in infos:
            if name in seen:
                raise CnaError(f"{self.path} is not a valid GGUF file: duplicate tensor {_shown(name)}")
            seen.add(name)
            try:
                qtype = GGMLQuantizationType(ttype)
                block, type_size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise CnaError(f"{self.path}: tensor {_shown(name)} has an unknown GGML type id {ttype}") from None
            n_el = math.prod(ne)  # exact (Python ints): hostile dimensions cannot wrap around
            n_bytes = n_el * type_size // block
            start = self.data_offset + rel
            if start + n_bytes > size:
                raise CnaError(f"{self.path} is truncated: tensor {_shown(name)} extends past the end of the file")
            spans.append((start, start + n_bytes, name))
            dims = tuple(reversed(ne))
            dtype = _TENSOR_DTYPES.get(qtype.name)
            if dtype is None:
                try:
                    dims = quant_shape_to_byte_shape(dims, qtype)
                except ValueError as e:
                    raise CnaError(f"{self.path}: tensor {_shown(name)}: {e}") from None
                data = np.frombuffer(mm, dtype=np.uint8, count=n_bytes, offset=start).reshape(dims)
            else:
                data = np.frombuffer(mm, dtype=dtype, count=n_el, offset=start).reshape(dims)
            self.tensors.append(TensorInfo(name, qtype, tuple(ne), n_el, n_bytes, start, data))
        spans.sort()
        for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
            if start_b < end_a:
                raise CnaError(f"{self.path} is not a valid GGUF file: the data of tensors {_shown(a)} and {_shown(b)} overlap")

    def _str(self, off: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", self.mm, off)
        end = off + 8 + n
        if end > len(self.mm):
            raise struct.error("string past the end")
        return self.mm[off + 8 : end].decode("utf-8"), end

    def _skip_value(self, vtype: int, off: int, depth: int = 0) -> tuple[int | None, int, list | None, int]:
        """(sub_type, count, string items, end offset) of the value at ``off``.

        Every length and count is checked against the file size before it is used, so a hostile
        header cannot make the reader allocate or loop beyond what the file holds.
        """
        mm = self.mm
        if vtype in _SCALAR:
            end = off + struct.calcsize(_SCALAR[vtype][0])
            if end > len(mm):
                raise struct.error("value past the end")
            return None, 1, None, end
        if vtype == _STRING:
            (n,) = struct.unpack_from("<Q", mm, off)
            if off + 8 + n > len(mm):
                raise struct.error("string past the end")
            return None, 1, None, off + 8 + n
        if vtype != _ARRAY:
            raise ValueError(f"unknown GGUF value type {vtype}")
        if depth >= _MAX_NESTING:
            raise ValueError(f"KV arrays nested more than {_MAX_NESTING} deep")
        sub, count = struct.unpack_from("<IQ", mm, off)
        off += 12
        least = {_STRING: 8, _ARRAY: 12}.get(sub, 1)  # smallest possible element
        if count > (len(mm) - off) // least:
            raise struct.error("array past the end")
        if sub in _SCALAR:
            end = off + count * struct.calcsize(_SCALAR[sub][0])
            if end > len(mm):
                raise struct.error("array past the end")
            return sub, count, None, end
        if sub == _STRING:
            items = []
            unpack = struct.Struct("<Q").unpack_from
            for _ in range(count):
                (n,) = unpack(mm, off)
                items.append((off + 8, n))
                off += 8 + n
            if off > len(mm):
                raise struct.error("array past the end")
            return sub, count, items, off
        if sub == _ARRAY:
            for _ in range(count):
                _, _, _, off = self._skip_value(_ARRAY, off, depth + 1)
            return sub, count, None, off
        raise ValueError(f"unknown GGUF array element type {sub}")

    def get_field(self, key: str) -> KVField | None:
        return self.fields.get(key)


def open_gguf(path: str | Path) -> GGUFFile:
    """Open a GGUF file read-only (memory-mapped), with one-line errors for bad files."""
    p = Path(path)
    if not p.is_file():
        raise CnaError(f"GGUF file not found: {p}")
    return GGUFFile(p)


def kv_fields(reader: GGUFFile) -> list[KVField]:
    """The file's KV pairs in file order."""
    return list(reader.fields.values())


def field_value(reader: GGUFFile, key: str, default: Any = None) -> Any:
    """A KV's value as Python data (strings decoded, arrays as lists), or ``default`` if absent."""
    fld = reader.get_field(key)
    return default if fld is None else fld.value()


def tensor_map(reader: GGUFFile) -> dict[str, TensorInfo]:
    return {t.name: t for t in reader.tensors}


def type_name(tensor: TensorInfo) -> str:
    return tensor.tensor_type.name


def np_shape(tensor: TensorInfo) -> list[int]:
    """Element shape in numpy order (GGML ``ne`` reversed)."""
    return [int(x) for x in reversed(tensor.ne)]


def byte_view(arr: np.ndarray) -> np.ndarray:
    """A C-contiguous array seen as flat uint8 (no copy)."""
    return arr.reshape(-1).view(np.uint8)


def sha256_array(arr: np.ndarray) -> str:
    """sha256 of an array's bytes, streamed in chunks (works on memory maps without loading them)."""
    b = byte_view(arr)
    h = hashlib.sha256()
    for start in range(0, b.size, _HASH_CHUNK):
        h.update(b[start : start + _HASH_CHUNK])
    return h.hexdigest()


def arrays_equal_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two arrays hold identical bytes, compared chunk by chunk."""
    x, y = byte_view(a), byte_view(b)
    if x.size != y.size:
        return False
    for start in range(0, x.size, _HASH_CHUNK):
        if not np.array_equal(x[start : start + _HASH_CHUNK], y[start : start + _HASH_CHUNK]):
            return False
    return True


# ---------------------------------------------------------------------------
# Patches
# ---------------------------------------------------------------------------


@dataclass
class TensorPatch:
    """Multiply rows, columns or elements of one tensor.

    ``axis="row"``: rows of a 2-D (or flattened N-D) tensor of any type that
    :mod:`quants` supports, through the scale fields. ``axis="column"``:
    columns of a float tensor (F32/F16/BF16). ``axis="element"``: elements of a
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
                f"{self.name} is {name}: scaling {what} needs a float tensor (F32, F16 or BF16)"
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


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def write_patched(
    reader: Any,
    path: Path,
    patches: Mapping[str, TensorPatch],
    kv_replace: Mapping[str, tuple[Any, Any]] | None = None,
    kv_append: Sequence[tuple[str, Any, Any]] = (),
    progress: bool = False,
) -> dict[str, ScaleReport]:
    """Write ``reader``'s file to ``path`` through ``GGUFWriter``, with ``patches`` applied.

    KV pairs are re-added in file order with their original types;
    ``kv_replace`` maps a key to a new ``(value, type)`` written in the same
    place; ``kv_append`` adds ``(key, value, type)`` at the end (a key that
    already exists is replaced in place instead). The data alignment is kept.
    Tensors are written one at a time in file order: untouched ones straight
    from the memory map, patched ones from a patched copy (one tensor in memory
    at a time). Returns the scale report of each patched tensor.
    """
    from gguf import GGUFWriter

    arch = field_value(reader, "general.architecture", "")
    replace = dict(kv_replace or {})
    appended: list[tuple[str, Any, Any]] = []
    for key, value, vtype in kv_append:
        if reader.get_field(key) is not None:
            replace[key] = (value, vtype)
        else:
            appended.append((key, value, vtype))

    writer = GGUFWriter(None, arch)
    writer.kv_data = [{}]  # drop the architecture KV the constructor adds: all KVs come back in file order
    writer.data_alignment = int(reader.alignment)
    for fld in kv_fields(reader):
        if fld.name in replace:
            value, vtype = replace.pop(fld.name)
            writer.add_key_value(fld.name, value, vtype)
        else:
            value, vtype, sub = fld.writer_value()
            writer.add_key_value(fld.name, value, vtype, sub_type=sub)
    for key, (value, vtype) in replace.items():  # replacements of keys the file lacks
        writer.add_key_value(key, value, vtype)
    for key, value, vtype in appended:
        writer.add_key_value(key, value, vtype)

    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, raw_dtype=t.tensor_type)

    reports: dict[str, ScaleReport] = {}
    bar = progress_bar(progress, total=sum(int(t.n_bytes) for t in reader.tensors), desc="writing GGUF", unit="B",
                       unit_scale=True)
    try:
        writer.write_header_to_file(path=Path(path))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        if _same_data_layout(reader, writer.data_alignment):
            _copy_data_section(reader, writer, patches, reports, bar)
        else:
            for t in reader.tensors:
                patch = patches.get(t.name)
                if patch is None:
                    writer.write_tensor_data(t.data)
                else:
                    buf, reports[t.name] = patch.patched_copy(t.data)
                    writer.write_tensor_data(buf)
                    del buf
                bar.update(int(t.n_bytes))
        writer.flush()
        assert writer.fout is not None
        for fh in writer.fout:
            os.fsync(fh.fileno())
    finally:
        writer.close()
        bar.close()
    return reports


def _padded(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def _same_data_layout(reader: Any, alignment: int) -> bool:
    """True when the source's tensor data sit where ``GGUFWriter`` puts them (header order, each
    tensor padded to ``alignment``): then the data section can be copied as a whole."""
    expected = reader.data_offset
    for t in reader.tensors:
        if int(t.data_offset) != expected:
            return False
        expected += _padded(int(t.n_bytes), alignment)
    return True


def _copy_data_section(reader: Any, writer: Any, patches: Mapping[str, TensorPatch],
                       reports: dict[str, ScaleReport], bar: Any) -> None:
    """After the header: the source's data section copied by the kernel (padding included), each
    patched tensor written from its patched copy instead (one tensor in memory at a time)."""
    from .filecopy import copy_range, write_all

    fout = writer.fout[0]
    fout.flush()
    fd = fout.fileno()
    pos = os.lseek(fd, 0, os.SEEK_CUR)
    write_all(fd, memoryview(bytes(_padded(pos, writer.data_alignment) - pos)))
    size = os.path.getsize(reader.path)
    end = reader.data_offset
    with open(reader.path, "rb") as src:
        sfd = src.fileno()
        pos = reader.data_offset  # next source byte to copy
        for t in reader.tensors:
            patch = patches.get(t.name)
            if patch is not None:
                copy_range(sfd, fd, pos, int(t.data_offset) - pos)
                buf, reports[t.name] = patch.patched_copy(t.data)
                write_all(fd, memoryview(np.ascontiguousarray(buf).reshape(-1).view(np.uint8)))
                del buf
                pos = int(t.data_offset) + int(t.n_bytes)
            end = int(t.data_offset) + _padded(int(t.n_bytes), writer.data_alignment)
            bar.update(int(t.n_bytes))
        copy_range(sfd, fd, pos, min(end, size) - pos)
    if end > size:  # the source's last tensor was not padded: GGUFWriter would have padded it
        write_all(fd, memoryview(bytes(end - size)))
    os.lseek(fd, 0, os.SEEK_END)


def patch_in_place(
    path: Path, reader: Any, patches: Mapping[str, TensorPatch]
) -> dict[str, ScaleReport]:
    """Apply ``patches`` to a byte-identical copy of ``reader``'s file at ``path`` through ``np.memmap``.

    Only the touched rows/columns/elements are written; nothing else in the file changes.
    """
    tensors = tensor_map(reader)
    reports: dict[str, ScaleReport] = {}
    for name, patch in patches.items():
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


# ---------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------


def kv_differences(a: Any, b: Any, ignore: Iterable[str] = ()) -> list[str]:
    """Differences between the KV pairs of two files (raw bytes, types and order), ignoring ``ignore``.

    Keys present in only one file (and not ignored) are reported, as are keys in a different order.
    """
    skip = set(ignore)
    fa = [f for f in kv_fields(a) if f.name not in skip]
    fb = [f for f in kv_fields(b) if f.name not in skip]
    out: list[str] = []
    names_a, names_b = [f.name for f in fa], [f.name for f in fb]
    for name in sorted(set(names_a) - set(names_b)):
        out.append(f"key {name} is missing")
    for name in sorted(set(names_b) - set(names_a)):
        out.append(f"key {name} was added")
    common_a = [n for n in names_a if n in set(names_b)]
    common_b = [n for n in names_b if n in set(names_a)]
    if common_a != common_b:
        out.append("keys are in a different order")
    bmap = {f.name: f for f in fb}
    for f in fa:
        g = bmap.get(f.name)
        if g is not None and f.raw() != g.raw():
            out.append(f"key {f.name} differs (type {f.type.name} -> {g.type.name})")
    if int(a.alignment) != int(b.alignment):
        out.append(f"alignment differs ({a.alignment} -> {b.alignment})")
    return out


def tensor_differences(a: Any, b: Any, ignore_data: Iterable[str] = (), data: bool = True) -> list[str]:
    """Differences in tensor names, order, types, shapes and (unless ``data`` is off, except ``ignore_data``) bytes."""
    skip = set(ignore_data)
    out: list[str] = []
    ta, tb = tensor_map(a), tensor_map(b)
    for name in sorted(set(ta) - set(tb)):
        out.append(f"tensor {name} is missing")
    for name in sorted(set(tb) - set(ta)):
        out.append(f"tensor {name} was added")
    if [t.name for t in a.tensors if t.name in tb] != [t.name for t in b.tensors if t.name in ta]:
        out.append("tensors are in a different order")
    for name, x in ta.items():
        y = tb.get(name)
        if y is None:
            continue
        if x.tensor_type != y.tensor_type or x.ne != y.ne:
            out.append(f"tensor {name} changed from {type_name(x)} {np_shape(x)} to {type_name(y)} {np_shape(y)}")
        elif data and name not in skip and not arrays_equal_bytes(x.data, y.data):
            out.append(f"tensor {name} bytes differ")
    return out


# ---------------------------------------------------------------------------
# Model identity
# ---------------------------------------------------------------------------


def gguf_arch(reader: Any) -> Any:
    """The :class:`ArchSpec` for the file's ``general.architecture``."""
    from ..core.architectures import arch_for_gguf

    name = field_value(reader, "general.architecture")
    if not name:
        raise CnaError("GGUF file has no general.architecture")
    moe = any(t.name.endswith("_exps.weight") for t in reader.tensors)
    return arch_for_gguf(str(name), moe=moe)


def num_layers(reader: Any) -> int:
    arch = field_value(reader, "general.architecture", "")
    n = field_value(reader, f"{arch}.block_count")
    if n is None:
        raise CnaError(f"GGUF file has no {arch}.block_count")
    return int(n)


def ffn_tensors(reader: Any, spec: Any, layer: int) -> tuple[Any, Any]:
    """(ffn_down, ffn_up) of ``layer``, refusing files that lack them."""
    tensors = tensor_map(reader)
    down = tensors.get(spec.gguf_down_name(layer))
    up = tensors.get(spec.gguf_up_name(layer))
    for name, t in ((spec.gguf_down_name(layer), down), (spec.gguf_up_name(layer), up)):
        if t is None:
            raise CnaError(f"GGUF file has no tensor {name} (expected for a {spec.model_type} model)")
        if len(t.ne) != 2:
            raise CnaError(f"not supported yet: {name} has {len(t.ne)} dimensions (expected a 2-D MLP weight)")
    return down, up


@dataclass
class ExpertFFN:
    """One mixture-of-experts layer's expert tensors (llama.cpp ``ne``: down ``[n_ff, n_embd, n_expert]``,
    up ``[n_embd, n_ff, n_expert]``, or a fused gate_up ``[n_embd, 2 n_ff, n_expert]``, gate half first)."""

    layer: int
    down: Any
    up: Any
    fused_up: bool
    down_shexp: Any = None
    up_shexp: Any = None

    @property
    def experts(self) -> int:
        return int(self.down.ne[2])

    @property
    def width(self) -> int:
        return int(self.down.ne[0])

    @property
    def hidden(self) -> int:
        return int(self.down.ne[1])

    @property
    def shared_width(self) -> int:
        return int(self.down_shexp.ne[0]) if self.down_shexp is not None else 0


def expert_ffn(reader: Any, spec: Any, layer: int) -> ExpertFFN | None:
    """The expert tensors of ``layer``, or None for a dense layer (or a dense architecture)."""
    moe = spec.moe
    if moe is None:
        return None
    tensors = tensor_map(reader)
    down = tensors.get(moe.gguf_down_exps.format(layer=layer))
    if down is None:
        return None
    up = tensors.get(moe.gguf_up_exps.format(layer=layer))
    fused = False
    if up is None and moe.gguf_gate_up_exps:
        up, fused = tensors.get(moe.gguf_gate_up_exps.format(layer=layer)), True
    if up is None:
        raise CnaError(f"GGUF file has {down.name} but no {moe.gguf_up_exps.format(layer=layer)}")
    for t in (down, up):
        if len(t.ne) != 3:
            raise CnaError(f"not supported yet: {t.name} has {len(t.ne)} dimensions (expected [.., .., experts])")
    want_up = (int(down.ne[1]), (2 if fused else 1) * int(down.ne[0]), int(down.ne[2]))
    if tuple(int(x) for x in up.ne) != want_up:
        raise CnaError(f"{up.name} has shape {list(up.ne)}, expected {list(want_up)} for {down.name} {list(down.ne)}")
    out = ExpertFFN(layer, down, up, fused)
    if moe.gguf_down_shexp:
        out.down_shexp = tensors.get(moe.gguf_down_shexp.format(layer=layer))
        if out.down_shexp is not None:
            out.up_shexp = tensors.get((moe.gguf_up_shexp or "").format(layer=layer))
            if out.up_shexp is None:
                raise CnaError(f"GGUF file has {out.down_shexp.name} but no shared up projection")
    return out


def intermediate_size(down: Any) -> int:
    """Neurons of a layer: GGML ``ne[0]`` of its ffn_down (numpy columns)."""
    return int(down.ne[0])


def supported_row_types() -> list[str]:
    return [t.name for t in LAYOUTS]
