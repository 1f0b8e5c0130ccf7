"""A patched copy of a GGUF file, written through gguf-py's ``GGUFWriter``.

:func:`write_patched` streams a copy: every KV pair re-added in file order with its original value
type, the alignment kept, every tensor written tensor by tensor from the reader's memory map with
its original GGML type and shape, patched tensors from a patched copy. Where the source's data
section is laid out as the writer lays it out, the kernel copies it (``copy_file_range``) and only
the patched tensors pass through memory. The writer's internals are behind
:class:`cna_export.io.gguf_py.CopyWriter`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..core.progress import bar as progress_bar
from .filecopy import copy_range, write_all
from .gguf_patch import TensorPatch
from .gguf_py import CopyWriter
from .gguf_read import kv_fields
from .quants import ScaleReport


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
    writer = CopyWriter(int(reader.alignment))
    _add_kvs(writer, reader, kv_replace or {}, kv_append)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    reports: dict[str, ScaleReport] = {}
    bar = progress_bar(progress, total=sum(int(t.n_bytes) for t in reader.tensors), desc="writing GGUF", unit="B",
                       unit_scale=True)
    try:
        writer.write_header(Path(path))
        if _same_data_layout(reader, writer.alignment):
            _copy_data_section(reader, writer, patches, reports, bar)
        else:
            _write_tensors(reader, writer, patches, reports, bar)
        writer.sync()
    finally:
        writer.close()
        bar.close()
    return reports


def _add_kvs(writer: CopyWriter, reader: Any, kv_replace: Mapping[str, tuple[Any, Any]],
             kv_append: Sequence[tuple[str, Any, Any]]) -> None:
    """The source's KV pairs in file order (replaced ones in place), then replacements of keys the file
    lacks, then the appended ones."""
    replace = dict(kv_replace)
    appended: list[tuple[str, Any, Any]] = []
    for key, value, vtype in kv_append:
        if reader.get_field(key) is not None:
            replace[key] = (value, vtype)
        else:
            appended.append((key, value, vtype))
    for fld in kv_fields(reader):
        if fld.name in replace:
            value, vtype = replace.pop(fld.name)
            writer.add_kv(fld.name, value, vtype)
        else:
            value, vtype, sub = fld.writer_value()
            writer.add_kv(fld.name, value, vtype, sub)
    for key, (value, vtype) in replace.items():  # replacements of keys the file lacks
        writer.add_kv(key, value, vtype)
    for key, value, vtype in appended:
        writer.add_kv(key, value, vtype)


def _write_tensors(reader: Any, writer: CopyWriter, patches: Mapping[str, TensorPatch],
                   reports: dict[str, ScaleReport], bar: Any) -> None:
    """Every tensor through the writer in file order, patched ones from a patched copy."""
    for t in reader.tensors:
        patch = patches.get(t.name)
        if patch is None:
            writer.write_tensor(t.data)
        else:
            buf, reports[t.name] = patch.patched_copy(t.data)
            writer.write_tensor(buf)
            del buf
        bar.update(int(t.n_bytes))


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


def _copy_data_section(reader: Any, writer: CopyWriter, patches: Mapping[str, TensorPatch],
                       reports: dict[str, ScaleReport], bar: Any) -> None:
    """After the header: the source's data section copied by the kernel (padding included), each
    patched tensor written from its patched copy instead (one tensor in memory at a time)."""
    fd = writer.fileno()
    pos = os.lseek(fd, 0, os.SEEK_CUR)
    write_all(fd, memoryview(bytes(_padded(pos, writer.alignment) - pos)))
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
            end = int(t.data_offset) + _padded(int(t.n_bytes), writer.alignment)
            bar.update(int(t.n_bytes))
        copy_range(sfd, fd, pos, min(end, size) - pos)
    if end > size:  # the source's last tensor was not padded: GGUFWriter would have padded it
        write_all(fd, memoryview(bytes(end - size)))
    os.lseek(fd, 0, os.SEEK_END)
