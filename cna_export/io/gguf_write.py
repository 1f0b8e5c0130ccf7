"""A patched copy of a GGUF file: the header composed from the source's raw bytes, the data copied by the kernel.

The copy is laid out as gguf-py's ``GGUFWriter`` lays out a file (GGUF version 3, the KV pairs in
file order, the tensor infos, each tensor's data padded to the source's alignment), byte for byte
what it wrote for the same KV pairs and tensors, but nothing is re-encoded:

* :func:`build_header` takes every KV pair's exact bytes from the source (a string that is not valid
  UTF-8, an empty or a nested array round-trip as they are) and encodes only the replaced and
  appended ones (:func:`encode_kv`);
* :func:`write_data` has the kernel copy the data section (``copy_file_range``, a reflink where the
  file system shares extents) and writes the patched spans (:func:`cna_export.io.gguf_patch.patch_spans`)
  over it, while a thread hashes the patched tensors for the manifest (read once from the source);
* :func:`write_header` writes the header last, so an exporter can copy the data while the hashes its
  manifest (in the header) needs are still being computed; :func:`check_written` reads back what was
  written (header bytes and patched spans) instead of parsing the file again.
"""

from __future__ import annotations

import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..core.progress import bar as progress_bar
from .filecopy import copy_range_at
from .gguf_patch import PatchedTensor, TensorPatch, copy_patched, patch_spans, spans_written, write_spans
from .gguf_read import SCALAR_FORMATS, kv_fields
from .scale_report import ScaleReport

GGUF_VERSION = 3  # what GGUFWriter writes, whatever the source's version (2 and 3 share the layout)
_MAGIC = 0x46554747  # b"GGUF" read as a little-endian uint32 (gguf.constants.GGUF_MAGIC)
_STRING, _ARRAY = 8, 9


@dataclass
class Header:
    """A composed GGUF header: its bytes (padded to the alignment), where each KV pair's bytes lie in
    them, where each tensor's data goes in the output, and the output's size."""

    data: bytes
    kv_spans: dict[str, tuple[int, int]]
    tensor_offsets: dict[str, int] = field(default_factory=dict)
    size: int = 0
    alignment: int = 32

    def __len__(self) -> int:
        return len(self.data)

    def string_value(self, key: str) -> str | None:
        """The value of string KV ``key`` decoded from the header's bytes (None when absent or not a string)."""
        if key not in self.kv_spans:
            return None
        start, end = self.kv_spans[key]
        (n_key,) = struct.unpack_from("<Q", self.data, start)
        at = start + 8 + n_key
        if struct.unpack_from("<I", self.data, at)[0] != _STRING:
            return None
        (n,) = struct.unpack_from("<Q", self.data, at + 4)
        if at + 12 + n != end:
            return None
        return self.data[at + 12 : end].decode("utf-8", "replace")


def _padded(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def _string(text: str | bytes) -> bytes:
    raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return struct.pack("<Q", len(raw)) + raw


def encode_kv(key: str, value: Any, vtype: Any) -> bytes:
    """One KV pair as GGUFWriter encodes it: a string (``str`` or raw ``bytes``) or a scalar of ``vtype``."""
    t = int(vtype)
    if t == _STRING:
        return _string(key) + struct.pack("<I", t) + _string(value)
    if t in SCALAR_FORMATS:
        return _string(key) + struct.pack("<I", t) + struct.pack(SCALAR_FORMATS[t], value)
    raise ValueError(f"cannot encode a new {key} KV of value type {t} (strings and scalars only)")


def _kv_pairs(reader: Any, kv_replace: Mapping[str, tuple[Any, Any]],
              kv_append: Sequence[tuple[str, Any, Any]]) -> list[tuple[str, bytes]]:
    """(key, bytes) of every KV pair: the source's in file order (raw, replaced ones re-encoded in place),
    then replacements of keys the file lacks, then the appended ones (a key the file has is replaced instead)."""
    replace = dict(kv_replace)
    appended: list[tuple[str, Any, Any]] = []
    for key, value, vtype in kv_append:
        if reader.get_field(key) is not None:
            replace[key] = (value, vtype)
        else:
            appended.append((key, value, vtype))
    pairs = []
    for fld in kv_fields(reader):
        if fld.name in replace:
            value, vtype = replace.pop(fld.name)
            pairs.append((fld.name, encode_kv(fld.name, value, vtype)))
        else:
            pairs.append((fld.name, bytes(fld.raw())))
    pairs += [(key, encode_kv(key, value, vtype)) for key, (value, vtype) in replace.items()]
    pairs += [(key, encode_kv(key, value, vtype)) for key, value, vtype in appended]
    return pairs


def build_header(reader: Any, kv_replace: Mapping[str, tuple[Any, Any]] | None = None,
                 kv_append: Sequence[tuple[str, Any, Any]] = ()) -> Header:
    """The header of the patched copy of ``reader``'s file, with every tensor's place in the output."""
    alignment = int(reader.alignment)
    pairs = _kv_pairs(reader, kv_replace or {}, kv_append)
    parts = [struct.pack("<IIQQ", _MAGIC, GGUF_VERSION, len(reader.tensors), len(pairs))]
    pos, kv_spans = len(parts[0]), {}
    for key, raw in pairs:
        kv_spans[key] = (pos, pos + len(raw))
        parts.append(raw)
        pos += len(raw)
    rel = 0
    relative: dict[str, int] = {}
    for t in reader.tensors:
        ne = [int(x) for x in t.ne]
        parts.append(_string(t.name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, int(t.tensor_type), rel))
        relative[t.name] = rel
        rel += _padded(int(t.n_bytes), alignment)
    data = b"".join(parts)
    data += bytes(_padded(len(data), alignment) - len(data))
    offsets = {name: len(data) + r for name, r in relative.items()}
    return Header(data, kv_spans, offsets, len(data) + rel, alignment)


def _same_data_layout(reader: Any, alignment: int) -> bool:
    """True when the source's tensor data sit where ``GGUFWriter`` puts them (header order, each tensor
    padded to ``alignment``): then the data section can be copied as a whole."""
    expected = reader.data_offset
    for t in reader.tensors:
        if int(t.data_offset) != expected:
            return False
        expected += _padded(int(t.n_bytes), alignment)
    return True


@dataclass(frozen=True)
class _Piece:
    """``n`` bytes from ``src`` in the source to ``dst`` in the output: a kernel copy, or patched tensor ``name``."""

    src: int
    dst: int
    n: int
    name: str | None = None


def _pieces(reader: Any, header: Header | None, patched: Mapping[str, PatchedTensor], size: int) -> list[_Piece]:
    """The output's bytes as pieces in file order: the patched tensors, and kernel copies of the rest cut into
    ``PIECE``-sized parts. ``header`` None: the whole file copied as it is (``--fast-copy``)."""
    if header is None:
        spans = [(0, 0, size)]
    elif _same_data_layout(reader, header.alignment):
        spans = [(reader.data_offset, len(header), min(header.size - len(header), size - reader.data_offset))]
    else:
        spans = [(int(t.data_offset), header.tensor_offsets[t.name], int(t.n_bytes)) for t in reader.tensors]
    cuts = sorted((p.data_offset, p.n_bytes, p.name) for p in patched.values())
    pieces: list[_Piece] = []
    for src, dst, n in spans:
        pos, end, shift = src, src + n, dst - src
        for start, length, name in cuts:
            if start >= end or start + length <= src:
                continue
            pieces += _kernel_pieces(pos, pos + shift, start - pos)
            pieces.append(_Piece(start, start + shift, length, name))
            pos = start + length
        pieces += _kernel_pieces(pos, pos + shift, end - pos)
    return pieces


PIECE = 1 << 30
"""Bytes of one kernel copy (the progress bar's step)."""


def _kernel_pieces(src: int, dst: int, n: int) -> list[_Piece]:
    return [_Piece(src + k, dst + k, min(PIECE, n - k)) for k in range(0, max(n, 0), PIECE)]


def write_data(reader: Any, fd: int, header: Header | None, patched: Mapping[str, PatchedTensor],
               known: Mapping[str, tuple[str | None, str | None]] | None = None, progress: bool = False,
               cloned: bool = False) -> dict[str, tuple[str, str]]:
    """Every tensor's data into ``fd`` at the places ``header`` gives (``None``: the source's own layout, the
    whole file copied), padding as zeros, the header itself left out (:func:`write_header`): the kernel copies
    it in file order (one stream: two into one file are slower), each patched tensor's spans written over its
    copy. Meanwhile a thread hashes the patched tensors from the source (:func:`copy_patched`; hashes ``known``
    as ``(before, after)``, None where not, are not computed again). ``cloned``: ``fd`` already holds a reflink
    of the source; only the patched spans are written. Returns each patched tensor's sha256 before and after."""
    known = known or {}
    with open(reader.path, "rb") as src:
        sfd = src.fileno()
        size = os.fstat(sfd).st_size
        if not cloned:
            os.ftruncate(fd, 0)
            os.ftruncate(fd, header.size if header is not None else size)
        pieces = [p for p in _pieces(reader, header, patched, size) if p.name is not None or not cloned]
        hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cna-hash")
        bar = progress_bar(progress, total=sum(p.n for p in pieces), desc="writing GGUF", unit="B", unit_scale=True)
        try:
            hashing = {name: hasher.submit(_hashes, sfd, p, known.get(name, (None, None)))
                       for name, p in patched.items()}
            for piece in pieces:
                if not cloned:
                    copy_range_at(sfd, fd, piece.src, piece.dst, piece.n)
                if piece.name is not None:
                    write_spans(fd, piece.dst, patched[piece.name].spans)
                bar.update(piece.n)
            return {name: job.result() for name, job in hashing.items()}
        finally:
            hasher.shutdown(wait=True, cancel_futures=True)
            bar.close()


def _hashes(sfd: int, p: PatchedTensor, known: tuple[str | None, str | None]) -> tuple[str, str]:
    """A patched tensor's sha256 before and after its patch: ``known`` ones as they are, the others from one
    read of the source's bytes (page cache: far cheaper than writing them)."""
    before, after = known
    if after is None or before is None:
        got_before, after = copy_patched(sfd, p.data_offset, p.n_bytes, p.spans, before=before is None)
        before = before or got_before
    assert before is not None and after is not None
    return before, after


def write_header(fd: int, header: Header) -> None:
    """The header at the start of ``fd`` (``pwrite``; the data after it stays as written)."""
    view, at = memoryview(header.data), 0
    while view:
        k = os.pwrite(fd, view, at)
        view, at = view[k:], at + k


def check_written(fd: int, header: Header | None, patched: Mapping[str, PatchedTensor], size: int) -> list[str]:
    """What the written file lacks of what was meant: its ``size``, its header bytes (``None``: the source's,
    kept in place), every patched span (read back; the rest of the data was copied by the kernel). [] when it
    is whole."""
    problems = []
    got = os.fstat(fd).st_size
    if got != size:
        problems.append(f"the file has {got} bytes, {size} were written")
    if header is not None and os.pread(fd, len(header), 0) != header.data:
        problems.append("the header does not hold the bytes written")
    for name, p in patched.items():
        if not spans_written(fd, header.tensor_offsets[name] if header is not None else p.data_offset, p.spans):
            problems.append(f"tensor {name} does not hold the patched bytes")
    return problems


def write_patched(
    reader: Any,
    path: Path,
    patches: Mapping[str, TensorPatch],
    kv_replace: Mapping[str, tuple[Any, Any]] | None = None,
    kv_append: Sequence[tuple[str, Any, Any]] = (),
    progress: bool = False,
) -> dict[str, ScaleReport]:
    """Write ``reader``'s file to ``path`` with ``patches`` applied, ``kv_replace`` (key -> ``(value, type)``,
    in place) and ``kv_append`` (``(key, value, type)`` at the end; a key the file has is replaced in place).
    Checked by reading it back; returns the scale report of each patched tensor."""
    patched = patch_spans(reader, patches)
    header = build_header(reader, kv_replace, kv_append)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_data(reader, fd, header, patched, progress=progress)
        write_header(fd, header)
        os.fsync(fd)
        problems = check_written(fd, header, patched, header.size)
    finally:
        os.close(fd)
    if problems:
        raise OSError(f"the written GGUF file failed its self-check: {problems[0]}")
    return {name: p.report for name, p in patched.items()}
