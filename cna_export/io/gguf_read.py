"""GGUF files read: the header parsed with ``struct``, the tensor data memory-mapped.

* :func:`open_gguf` opens a file (memory-mapped, read-only) with one-line errors;
* :class:`GGUFFile` is the open file: its KV pairs (:class:`KVField`, with exact raw bytes) and
  tensors (:class:`TensorInfo`, data as ``gguf.GGUFReader`` shapes it);
* :func:`kv_fields`, :func:`field_value`, :func:`tensor_map`, :func:`type_name` and :func:`np_shape`
  read it.

Tensor shapes here are numpy order (the reverse of GGML's ``ne``): ``blk.N.ffn_up.weight`` is
``(n_ff, n_embd)``, so neuron ``j`` is row ``j``; ``blk.N.ffn_down.weight`` is ``(n_embd, n_ff)``, so
neuron ``j`` is column ``j``.
"""

from __future__ import annotations

import functools
import math
import mmap
import struct
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import CnaError
from .gguf_py import gguf_constants, quant_shape_to_byte_shape

if TYPE_CHECKING:
    import numpy as np

SCALAR_FORMATS = {  # GGUFValueType value -> struct format
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}  # fmt: skip
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 16  # nested KV arrays deeper than this are refused (real files nest at most once or twice)
_TENSOR_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I8": "<i1", "I16": "<i2", "I32": "<i4",
                  "I64": "<i8"}  # numpy dtypes of the tensor types gguf.GGUFReader does not expose as bytes


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
    _item_list: list[tuple[int, int]] | None = field(default=None, repr=False)  # string arrays: (offset, length)

    @property
    def _items(self) -> list[tuple[int, int]] | None:
        """(offset, length) of each string of a string array, found on first use (opening a file only walks
        past them: a vocabulary of 100k+ strings costs tens of milliseconds to list)."""
        if self._item_list is None and int(self.type) == _ARRAY and self.sub_type is not None \
                and int(self.sub_type) == _STRING:
            items, off = [], self.value_offset + 12
            unpack = struct.Struct("<Q").unpack_from
            for _ in range(self.count):
                (n,) = unpack(self._file.mm, off)
                items.append((off + 8, n))
                off += 8 + n
            self._item_list = items
        return self._item_list

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
            return struct.unpack_from(SCALAR_FORMATS[t], mm, self.value_offset)[0]
        sub = int(self.sub_type) if self.sub_type is not None else None
        if self.count == 0:
            return []
        if sub == _STRING:
            return [self._string(o, n) for o, n in self._items or []]
        if sub in SCALAR_FORMATS:
            return list(struct.unpack_from(f"<{self.count}{SCALAR_FORMATS[sub][1:]}", mm, self.value_offset + 12))
        raise CnaError(f"GGUF key {_shown(self.name)} is a nested array; its value is not decoded")

    def item(self, index: int) -> Any:
        """One element of an array value (strings decoded)."""
        if int(self.type) != _ARRAY or not 0 <= index < self.count:
            raise IndexError(f"{self.name} has no element {index}")
        if int(self.sub_type) == _STRING:
            if self._item_list is not None:
                return self._string(*self._item_list[index])
            # walk to it (the array was checked when the file was opened): a vocabulary's special tokens, near its
            # start, are found without listing 100k+ strings
            unpack, off = struct.Struct("<Q").unpack_from, self.value_offset + 12
            for _ in range(index):
                off += 8 + unpack(self._file.mm, off)[0]
            return self._string(off + 8, unpack(self._file.mm, off)[0])
        fmt = SCALAR_FORMATS[int(self.sub_type)]
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
    """One tensor of a GGUF file; ``data`` is a read-only view of its bytes, shaped as gguf.GGUFReader shapes it
    (numpy is imported on first use: a small export reads the bytes it edits without it)."""

    name: str
    tensor_type: Any  # GGMLQuantizationType
    ne: tuple[int, ...]  # GGML dimensions (ne[0] first)
    n_elements: int
    n_bytes: int
    data_offset: int  # absolute offset in the file
    dims: tuple[int, ...] = field(repr=False)  # ``data``'s shape
    _file: GGUFFile = field(repr=False, compare=False)

    @functools.cached_property
    def data(self) -> np.ndarray:
        import numpy as np

        dtype = _TENSOR_DTYPES.get(self.tensor_type.name, "<u1")
        count = self.n_bytes if dtype == "<u1" else self.n_elements
        return np.frombuffer(self._file.mm, dtype=dtype, count=count, offset=self.data_offset).reshape(self.dims)

    @property
    def shape(self) -> np.ndarray:
        import numpy as np

        return np.array(self.ne, dtype=np.uint64)


class GGUFFile:
    """A GGUF file opened read-only: header parsed with ``struct`` (fast on large vocabularies), data memory-mapped.

    Mirrors what cna-export needs from ``gguf.GGUFReader`` (``fields``,
    ``tensors``, ``alignment``, ``data_offset``; tensor ``data`` with the same
    dtype and shape conventions) and adds exact raw KV bytes. Only
    little-endian files of GGUF versions 2 and 3 are read.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as fh:
            try:
                self.mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:
                raise CnaError(f"{self.path} is not a readable GGUF file: it is empty") from None
        try:
            n_tensors, n_kv = self._read_counts()
            self.fields: dict[str, KVField] = {}
            off = self._read_kvs(n_kv, 24)
            infos, off = self._read_infos(n_tensors, off)
        except (struct.error, UnicodeDecodeError, OverflowError, MemoryError, RecursionError):
            raise CnaError(f"{self.path} is not a readable GGUF file: truncated or corrupt header") from None
        except ValueError as e:
            raise CnaError(f"{self.path} is not a readable GGUF file: {str(e).splitlines()[0]}") from None
        self.alignment = self._alignment()
        self.data_offset = -(-off // self.alignment) * self.alignment
        self.tensors: list[TensorInfo] = []
        try:
            self._read_tensors(infos, len(self.mm))
        except (ValueError, OverflowError, MemoryError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CnaError(f"{self.path} is not a valid GGUF file: {why}") from None

    def _read_counts(self) -> tuple[int, int]:
        """Check the magic and version; (tensor count, KV count), refused when the file cannot hold them."""
        GGUF_MAGIC = gguf_constants().GGUF_MAGIC  # noqa: N806

        mm, size = self.mm, len(self.mm)
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
                f"{self.path} is not a readable GGUF file (truncated or corrupt): its header claims {n_kv} KV pairs "
                f"and {n_tensors} tensors, more than a {size}-byte file can hold"
            )
        return n_tensors, n_kv

    def _read_kvs(self, n_kv: int, off: int) -> int:
        """Read ``n_kv`` KV pairs from ``off`` into ``fields``; the offset after them."""
        GGUFValueType = gguf_constants().GGUFValueType  # noqa: N806

        for _ in range(n_kv):
            start = off
            name, off = self._str(off)
            (vtype,) = struct.unpack_from("<I", self.mm, off)
            off += 4
            value_offset = off
            sub, count, items, off = self._skip_value(vtype, off)
            if name in self.fields:
                raise CnaError(f"{self.path} is not a valid GGUF file: duplicate key {_shown(name)}")
            self.fields[name] = KVField(
                name, GGUFValueType(vtype), None if sub is None else GGUFValueType(sub),
                start, value_offset, off, count, self, items,
            )  # fmt: skip
        return off

    def _read_infos(self, n_tensors: int, off: int) -> tuple[list[tuple[str, tuple[int, ...], int, int]], int]:
        """(name, ne, type id, relative data offset) of ``n_tensors`` tensor infos from ``off``; the offset after."""
        mm = self.mm
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
        return infos, off

    def _alignment(self) -> int:
        GGUF_DEFAULT_ALIGNMENT = gguf_constants().GGUF_DEFAULT_ALIGNMENT  # noqa: N806

        al = self.fields.get("general.alignment")
        if al is None:
            return GGUF_DEFAULT_ALIGNMENT
        a = al.value()
        if int(al.type) != 4 or a == 0 or a & (a - 1):
            raise CnaError(f"{self.path} has an invalid general.alignment ({a})")
        return int(a)

    def _read_tensors(self, infos: list, size: int) -> None:
        c = gguf_constants()
        GGML_QUANT_SIZES, GGMLQuantizationType = c.GGML_QUANT_SIZES, c.GGMLQuantizationType  # noqa: N806

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
            if max(dims, default=0) >= 1 << 63:  # an empty tensor's other dimensions can be anything
                raise ValueError(f"tensor {_shown(name)} has a dimension of 2**63 or more")
            if qtype.name not in _TENSOR_DTYPES:
                try:
                    dims = quant_shape_to_byte_shape(dims, qtype)
                except ValueError as e:
                    raise CnaError(f"{self.path}: tensor {_shown(name)}: {e}") from None
            self.tensors.append(TensorInfo(name, qtype, tuple(ne), n_el, n_bytes, start, dims, self))
        spans.sort()
        for (_, end_a, a), (start_b, _, b) in pairwise(spans):
            if start_b < end_a:
                raise CnaError(f"{self.path} is not a valid GGUF file: the data of tensors {_shown(a)} and {_shown(b)} "
                               "overlap")

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
        if vtype in SCALAR_FORMATS:
            end = off + struct.calcsize(SCALAR_FORMATS[vtype])
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
        if sub in SCALAR_FORMATS:
            end = off + count * struct.calcsize(SCALAR_FORMATS[sub])
            if end > len(mm):
                raise struct.error("array past the end")
            return sub, count, None, end
        if sub == _STRING:  # walked past; the items are listed on first use (KVField._items)
            unpack = struct.Struct("<Q").unpack_from  # raises past the end of the file
            for _ in range(count):
                off += 8 + unpack(mm, off)[0]
            if off > len(mm):
                raise struct.error("array past the end")
            return sub, count, None, off
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
