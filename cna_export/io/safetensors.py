"""Safetensors checkpoints on disk: which tensor is in which shard, reading single tensors, rewriting shards.

Reading goes through the ``safetensors`` library: ``safe_open`` validates and memory-maps a
shard and hands out single tensors lazily, so reading a tensor (or hashing the down_proj
weights of a whole model) costs only that tensor's pages. Headers are read with
``framework="numpy"`` and float tensors can be read as stored (:meth:`Checkpoint.read_stored`,
memory-mapped by numpy), so an export never imports torch. A rewritten shard is streamed: the
kernel copies the bytes of every unchanged tensor (``copy_file_range``) and only the replaced
tensors pass through memory, so an export holds a few tensors, never a shard.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ..core.atomic import public_mode
from ..core.errors import CnaError
from .filecopy import copy_range, write_all

INDEX_SUFFIX = ".safetensors.index.json"
MAX_HEADER = 100_000_000  # the safetensors library's own limit

# safetensors header dtype -> torch dtype name
DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def dtype_name(raw: str) -> str:
    """The torch dtype name of a safetensors header dtype (``"BF16"`` -> ``"bfloat16"``; unknown ones lower-cased)."""
    return DTYPE_NAMES.get(raw, str(raw).lower())


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]


class Checkpoint:
    """A Hugging Face safetensors checkpoint folder: one ``model.safetensors`` or shards with an index.

    ``weight_map`` maps every tensor name to the shard file (relative to the folder) that holds it.
    Nothing is loaded; tensors are read one at a time with :meth:`read`.
    """

    def __init__(self, folder: Path, weight_map: dict[str, str], index_file: str | None):
        self.folder = folder
        self.weight_map = weight_map
        self.index_file = index_file
        self.files = sorted(set(weight_map.values()))

    # -- construction -----------------------------------------------------------
    @classmethod
    def open(cls, folder: str | Path) -> "Checkpoint":
        folder = Path(folder)
        indexes = sorted(folder.glob("*" + INDEX_SUFFIX))
        if len(indexes) > 1:
            names = ", ".join(p.name for p in indexes)
            raise CnaError(f"checkpoint {folder} has several safetensors indexes ({names}); keep one")
        if indexes:
            return cls._from_index(folder, indexes[0])
        shards = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
        if not shards:
            raise CnaError(f"checkpoint {folder} has no safetensors weights")
        weight_map: dict[str, str] = {}
        for shard in shards:
            for name in _header(shard):
                if name in weight_map:
                    raise CnaError(
                        f"checkpoint {folder}: tensor {_shown(name)} is in both {weight_map[name]} and {shard.name} "
                        "and there is no index saying which one counts"
                    )
                weight_map[name] = shard.name
        return cls(folder, weight_map, None)

    @classmethod
    def _from_index(cls, folder: Path, index: Path) -> "Checkpoint":
        try:
            data = json.loads(index.read_text("utf-8"))
            weight_map = data["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (KeyError, TypeError, ValueError, UnicodeDecodeError, RecursionError, MemoryError, OSError):
            raise CnaError(f"safetensors index {index} is not valid (expected JSON with a weight_map)") from None
        if not weight_map:
            raise CnaError(f"safetensors index {index} lists no tensors")
        for file in weight_map.values():
            if (not isinstance(file, str) or not file or "\0" in file or Path(file).is_absolute()
                    or ".." in Path(file).parts):
                raise CnaError(f"safetensors index {index} names an invalid shard path {file!r}"[:300])
        for file in sorted(set(weight_map.values())):
            if not (folder / file).is_file():
                raise CnaError(f"checkpoint {folder} is incomplete: the index names shard {_shown(file)}, "
                               "which is missing")
        by_file: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            by_file.setdefault(file, []).append(name)
        for file, names in by_file.items():
            present = set(_header(folder / file))
            absent = [n for n in names if n not in present]
            if absent:
                raise CnaError(f"checkpoint {folder}: the index puts {_shown(absent[0])} in {_shown(file)}, "
                               "but that shard has no such tensor")
        return cls(folder, weight_map, index.name)

    # -- look-ups -----------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def path(self, file: str) -> Path:
        return self.folder / file

    def first_present(self, candidates: Iterable[str]) -> str | None:
        for name in candidates:
            if name in self.weight_map:
                return name
        return None

    def info(self, name: str) -> TensorInfo:
        from safetensors import safe_open

        file = self.weight_map[name]
        with safe_open(self.path(file), framework="numpy") as f:  # header only: no tensor converted, no torch
            sl = f.get_slice(name)
            raw = sl.get_dtype()
            shape = tuple(int(x) for x in sl.get_shape())
        return TensorInfo(name, file, dtype_name(raw), shape)

    def read(self, name: str):
        """One tensor (memory-mapped, copy-on-write: modifying it never touches the file)."""
        from safetensors import safe_open

        with safe_open(self.path(self.weight_map[name]), framework="pt") as f:
            return f.get_tensor(name)

    def read_stored(self, name: str) -> tuple[np.ndarray, str]:
        """One float tensor's elements as stored (:mod:`cna_export.io.float_bits`: bfloat16 as ``uint16``), in its
        shape, memory-mapped read-only, and its torch dtype name; without torch. Types with no numpy form raise
        KeyError."""
        from .float_bits import storage_dtype

        path = self.path(self.weight_map[name])
        n, header = _raw_header(path)
        entry = header[name]
        dtype = dtype_name(entry["dtype"])
        storage = storage_dtype(dtype)
        if storage is None:
            raise KeyError(dtype)
        begin, end = (int(x) for x in entry["data_offsets"])
        shape = tuple(int(x) for x in entry["shape"])
        if end == begin:
            return np.empty(shape, storage), dtype
        return np.memmap(path, dtype=storage, mode="r", offset=8 + n + begin, shape=shape), dtype

    def metadata(self, file: str) -> dict[str, str]:
        from safetensors import safe_open

        with safe_open(self.path(file), framework="numpy") as f:
            return dict(f.metadata() or {})

    def tensors_in(self, file: str) -> list[str]:
        return sorted(n for n, f in self.weight_map.items() if f == file)

    def total_bytes(self) -> int:
        return sum(self.path(f).stat().st_size for f in self.files)


def _shown(name: str) -> str:
    """A shard or tensor name for a one-line message: as is when printable, else quoted with escapes."""
    return name if name.isprintable() else repr(name)


def _header(path: Path) -> list[str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as f:  # the library validates the header; no tensor is read
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CnaError(f"cannot read safetensors file {path}: {why}") from None


class DownNames(list):
    """Down projection tensor names in layer order (a ``list`` of them: indexing and iteration as before), and how
    many of them each layer has (``per_layer``: one each for a dense model; a mixture-of-experts layer's
    experts, then its shared expert), which scheme-2 and scheme-3 fingerprints hash layer by layer."""

    def __init__(self, names: Iterable[str] = (), per_layer: Sequence[int] | None = None):
        super().__init__(names)
        self.per_layer = tuple(per_layer) if per_layer is not None else (1,) * len(self)
        if sum(self.per_layer) != len(self) or any(n < 1 for n in self.per_layer):
            raise ValueError(f"{len(self)} down projection names cannot be split into layers of {self.per_layer}")

    def layers(self) -> list[list[str]]:
        """The names of each layer, in layer order."""
        out, start = [], 0
        for n in self.per_layer:
            out.append(self[start : start + n])
            start += n
        return out


def fp32_fingerprint(ckpt: Checkpoint, names: Iterable[str], scheme: int | None = None,
                     threads: int | None = None) -> str:
    """The fingerprint (:mod:`cna_export.core.fingerprint`) of the named tensors converted to float32,
    little-endian, in the order given; each layer's tensors are those of ``names.layers()`` for
    :class:`DownNames`, else one tensor per layer (a dense model's down projections).

    With the down_proj weights in layer order this equals ``LoadedModel.fingerprint()`` of the same
    weights, without loading the model: one memory-mapped tensor at a time, a chunk at a time (schemes 2 and 3: on
    ``threads`` threads, a layer each).
    """
    from ..core.fingerprint import SCHEME, fingerprint_layers

    groups = names.layers() if isinstance(names, DownNames) else [[n] for n in names]

    def layer(tensors: list[str]) -> Iterator[np.ndarray]:
        for name in tensors:
            yield from _tensor_fp32_chunks(ckpt, name)

    return fingerprint_layers([functools.partial(layer, g) for g in groups], scheme or SCHEME, threads)


FP32_CHUNK = 1 << 24
"""Bytes of float32 converted (and hashed) at a time."""


def fp32_chunks(t: Any) -> Iterator[np.ndarray]:
    """A tensor as float32 numpy rows in order, about 16 MiB at a time (a float32 copy of a whole down
    projection is 235 MB at 8B; of a chunk, 16 MiB)."""
    import torch

    flat = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
    per = max(1, FP32_CHUNK // max(4 * flat.shape[1], 1))
    for r0 in range(0, flat.shape[0], per):
        yield flat[r0 : r0 + per].to(torch.float32).numpy()


def _tensor_fp32_chunks(ckpt: Checkpoint, name: str) -> Iterator[np.ndarray]:
    """One stored tensor as float32 chunks of :func:`fp32_chunks`' bytes: widened from the memory-mapped file by
    numpy (the same bits as torch's ``.to(torch.float32)``), or by torch for types numpy has no form of."""
    from .float_bits import widen

    try:
        stored, dtype = ckpt.read_stored(name)
    except KeyError:
        yield from fp32_chunks(ckpt.read(name))
        return
    stored = stored.reshape(-1)
    per = max(1, FP32_CHUNK // 4)
    for start in range(0, stored.shape[0], per):
        yield widen(stored[start : start + per], dtype, np.dtype(np.float32))


TENSOR_HASH = "safetensors-tensor"
"""Fingerprint-cache kind of one tensor's sha256 as stored (or after an exactly described edit)."""


def _tensor_extra(name: str, edit: str) -> str:
    return name + (f"|{edit}" if edit else "")


def known_tensor_sha256(shard: Path, name: str, edit: str = "") -> str | None:
    """sha256 of tensor ``name`` of ``shard`` as stored (``edit`` empty), or after the edit that ``edit`` describes
    exactly (e.g. a digest of a fold's columns and their new bytes), from the fingerprint cache when it knows the
    shard as it is now (the same shard and edit give the same bytes); else None (:mod:`cna_export.io.fpcache`)."""
    from . import fpcache

    return fpcache.lookup(TENSOR_HASH, [shard], _tensor_extra(name, edit))


def tensor_hash_key(shard: Path, name: str, edit: str = "") -> str | None:
    """The cache key of that hash with ``shard`` as it is now: take it before hashing, pass it to
    :func:`remember_tensor_sha256` after (None when the cache is off)."""
    from . import fpcache

    return fpcache.stamp(TENSOR_HASH, [shard], _tensor_extra(name, edit))


def remember_tensor_sha256(shard: Path, name: str, digest: str | None, edit: str = "", key: str | None = None) -> None:
    """Remember ``digest`` under ``key`` (:func:`tensor_hash_key`, taken before hashing) if the shard has not
    changed since."""
    from . import fpcache

    if digest is not None and key is not None and tensor_hash_key(shard, name, edit) == key:
        fpcache.store(TENSOR_HASH, [shard], digest, _tensor_extra(name, edit), key=key)


def _raw_header(path: Path) -> tuple[int, dict]:
    """The header length and JSON of a safetensors file that ``safe_open`` has already accepted."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > MAX_HEADER:
            raise ValueError(f"{path.name}: header of {n} bytes")
        header = json.loads(fh.read(n))
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: the header is not a JSON object")
    return n, header


def shard_header(src: Path, names: Iterable[str], metadata: Mapping[str, str]) -> tuple[int, dict, bytes]:
    """Shard ``src``'s header length and JSON (checked by ``safe_open``, which must know every one of ``names``),
    and the header an edited copy gets: the same JSON with ``metadata`` merged into ``__metadata__``, padded
    with spaces so that the data starts at a multiple of 8 (tensor entries and data offsets unchanged)."""
    from safetensors import safe_open

    with safe_open(src, framework="numpy") as f:  # the library validates the header and the offsets
        present = set(f.keys())
    missing = set(names) - present
    if missing:
        raise ValueError(f"{src.name} has no tensor {sorted(missing)[0]}")
    n, header = _raw_header(src)
    new = dict(header)
    new["__metadata__"] = {**(header.get("__metadata__") or {}), **metadata}
    raw = json.dumps(new, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return n, header, raw + b" " * (-(8 + len(raw)) % 8)


def rewrite_shard(src: Path, dst: Path, replacements: Mapping[str, object], metadata: Mapping[str, str]) -> None:
    """Write shard ``src`` to ``dst`` with some tensors replaced and ``metadata`` merged into its header.

    Streams the shard: a new header (the source's, with ``metadata`` merged in; tensor entries and
    data offsets unchanged), then every byte range outside the replaced tensors copied by the
    kernel, and each replacement written from memory. A replacement may be a callable that returns
    the tensor: it is called when its bytes are due, so memory holds one replacement at a time, never
    the shard. Every other tensor keeps its dtype, shape and bytes; existing header metadata (e.g.
    ``{"format": "pt"}``) is kept.
    """
    import torch

    n, header, raw = shard_header(src, replacements, metadata)
    patches = sorted(((int(header[name]["data_offsets"][0]), int(header[name]["data_offsets"][1]), name)
                      for name in replacements), key=lambda p: p[0])

    def data(name: str) -> np.ndarray:
        t = replacements[name]
        t = (t() if callable(t) else t).detach().to("cpu").contiguous()  # type: ignore[attr-defined]
        entry = header[name]
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8)
        begin, end = entry["data_offsets"]
        if (str(t.dtype).removeprefix("torch.") != DTYPE_NAMES.get(entry["dtype"], entry["dtype"])
                or list(t.shape) != list(entry["shape"]) or raw.nbytes != end - begin):
            raise ValueError(f"replacement for {name} changes its dtype or shape")
        return raw

    if not any(callable(t) for t in replacements.values()):
        for name in replacements:  # all given: check them before writing anything
            data(name)
    start = 8 + n
    src_fd = os.open(src, os.O_RDONLY)
    try:
        data_len = os.fstat(src_fd).st_size - start
        dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_all(dst_fd, memoryview(struct.pack("<Q", len(raw)) + raw))
            pos = 0
            for begin, end, name in patches:
                copy_range(src_fd, dst_fd, start + pos, begin - pos)
                write_all(dst_fd, memoryview(data(name)).cast("B"))  # a callable's tensor lives only here
                pos = end
            copy_range(src_fd, dst_fd, start + pos, data_len - pos)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)
    public_mode(dst)


def save_stored(tensors: Mapping[str, tuple[np.ndarray, str]], path: Path, metadata: Mapping[str, str]) -> None:
    """A safetensors file of ``tensors`` (name -> (elements as stored, :mod:`cna_export.io.float_bits`; the torch
    name of their type)) with ``metadata``, laid out as the library lays it out (tensors by name, the header padded
    with spaces to a multiple of 8), for types numpy's binding cannot name (bfloat16); without torch."""
    codes = {name: code for code, name in DTYPE_NAMES.items()}
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    pos, order = 0, sorted(tensors)
    for name in order:
        arr, dtype = tensors[name]
        header[name] = {"dtype": codes[dtype], "shape": list(arr.shape), "data_offsets": [pos, pos + arr.nbytes]}
        pos += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for name in order:
            fh.write(np.ascontiguousarray(tensors[name][0]).reshape(-1).view(np.uint8).data)


def copy_file(src: Path, dst: Path, link: bool = False) -> None:
    """Byte-for-byte copy (the kernel's copy_file_range/sendfile where available), fsynced, or a hard link."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(src, dst)
            return
        except OSError as e:
            if e.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise CnaError(
                    f"cannot hard-link {src.name} into the output ({os.strerror(e.errno)}); "
                    "the output must be on the same filesystem as the input, or drop --link"
                ) from None
            raise
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)  # the folder is renamed into place only once its files are on disk
    finally:
        os.close(fd)
