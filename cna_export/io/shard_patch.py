"""A safetensors shard with a few rows or columns scaled, written at the cost of a copy.

:func:`patch_shard` writes the new header (:func:`~cna_export.io.safetensors.shard_header`: the source's,
with our metadata merged in, so the data may start at another offset), has the kernel copy the source's
data section at that shifted offset (``copy_file_range``, :func:`~cna_export.io.filecopy.copy_range_at`),
and writes only what the edit changes:

* rows (``axis="row"``): the kernel copies the whole tensor, then each touched row is read, scaled and
  written over the copy at its offset;
* columns (``axis="column"``, the down_proj fold): every row holds touched elements, so the tensor is
  not kernel-copied but streamed through one reused 16 MiB buffer (read, touched columns scaled in place,
  written), which costs one copy of its bytes and no fresh memory.

A 3-D ``[experts, rows, columns]`` tensor (fused MoE experts) counts its rows/columns expert by expert
(flat index ``e * size + j``), as :func:`cna_export.export.fold.scale_slices` does. The arithmetic is the
caller's ``scale`` (:func:`cna_export.export.fold.scale_stored`, on numpy arrays of the stored elements: no
torch): it is applied to the gathered slices only, and because it works
element by element the result is byte for byte that of scaling the whole tensor in memory. The sha256 of a
tensor before or after the edit is computed on the way where asked (``hash_before``/``hash_after``).
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Mapping, Sequence

import numpy as np

from ..core.atomic import public_mode
from ..core.errors import CnaError
from . import float_bits
from .filecopy import copy_range_at, write_at
from .safetensors import dtype_name, shard_header

CHUNK = 1 << 24
"""Bytes of a streamed tensor read, patched and written at a time."""

Scale = Callable[[np.ndarray, str, str, Sequence[float]], np.ndarray]
"""``scale(slices, dtype, axis, multipliers) -> new slices`` on stored elements, one multiplier per column or row
(:func:`cna_export.export.fold.scale_stored`)."""


@dataclass(frozen=True)
class SlicePatch:
    """Rows or columns of one tensor, each times its multiplier."""

    name: str
    axis: Literal["row", "column"]
    indices: list[int]
    multipliers: list[float]


@dataclass
class PatchedTensor:
    """What :func:`patch_shard` did to one tensor."""

    name: str
    dtype: str  # torch dtype name
    shape: list[int]
    offset: int  # of its bytes in the written shard
    nbytes: int
    edit: bytes = b""  # the new bytes of the touched slices, expert by expert (2-D columns: ``new[:, idx]``)
    sha256_before: str | None = None
    sha256_after: str | None = None


@dataclass
class _Job:
    patch: SlicePatch
    out: PatchedTensor
    src_offset: int
    dims: tuple[int, int, int]  # experts, rows, columns (1 expert for a 2-D tensor)
    dtype: np.dtype  # of the stored elements (:mod:`cna_export.io.float_bits`)
    by_expert: dict[int, tuple[list[int], list[float]]] = field(default_factory=dict)


def patch_shard(src: Path, dst: Path, patches: Sequence[SlicePatch], metadata: Mapping[str, str], scale: Scale,
                hash_before: frozenset[str] = frozenset(), hash_after: frozenset[str] = frozenset(),
                fsync: bool = True) -> dict[str, PatchedTensor]:
    """Write shard ``src`` to ``dst`` with ``patches`` applied and ``metadata`` merged into its header
    (module docstring); ``dst`` is fsynced unless ``fsync`` is False. Returns what was done per tensor."""
    n, header, raw = shard_header(src, [p.name for p in patches], metadata)
    src_start, dst_start = 8 + n, 8 + len(raw)
    jobs = sorted((_job(p, header, src_start, dst_start) for p in patches), key=lambda j: j.src_offset)
    src_fd = os.open(src, os.O_RDONLY)
    try:
        data_len = os.fstat(src_fd).st_size - src_start
        dst_fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_at(dst_fd, struct.pack("<Q", len(raw)) + raw, 0)
            streamed = [j for j in jobs if j.patch.axis == "column"]
            _copy_gaps(src_fd, dst_fd, src_start, dst_start, data_len, streamed)
            buf = bytearray(CHUNK)
            for job in jobs:
                name = job.patch.name
                if job.patch.axis == "column":
                    _stream(job, src_fd, dst_fd, buf, scale, name in hash_before, name in hash_after)
                else:
                    _rows(job, src_fd, dst_fd, scale)
                    if name in hash_before:
                        job.out.sha256_before = region_sha256(src_fd, job.src_offset, job.out.nbytes, buf)
                    if name in hash_after:
                        job.out.sha256_after = region_sha256(dst_fd, job.out.offset, job.out.nbytes, buf)
            if fsync:
                os.fsync(dst_fd)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)
    public_mode(dst)
    return {j.patch.name: j.out for j in jobs}


def _job(patch: SlicePatch, header: dict, src_start: int, dst_start: int) -> _Job:
    entry = header[patch.name]
    begin, end = (int(x) for x in entry["data_offsets"])
    name = dtype_name(entry["dtype"])
    dtype = float_bits.storage_dtype(name)
    if dtype is None:
        raise CnaError(float_bits.not_foldable(name))
    shape = [int(x) for x in entry["shape"]]
    if len(patch.indices) != len(patch.multipliers):
        raise ValueError("indices and multipliers must have the same length")
    dims = _dims(shape, patch.axis)
    out = PatchedTensor(patch.name, name, shape, dst_start + begin, end - begin)
    job = _Job(patch, out, src_start + begin, dims, dtype)
    size = dims[2] if patch.axis == "column" else dims[1]
    if len(set(patch.indices)) != len(patch.indices):
        raise CnaError(f"an index is listed twice in the {patch.axis}s to scale")
    for i, m in zip(patch.indices, patch.multipliers, strict=True):
        if not 0 <= int(i) < dims[0] * size:
            raise CnaError(f"{patch.axis} {i} is out of range for a tensor of shape {shape}")
        e, j = divmod(int(i), size)
        job.by_expert.setdefault(e, ([], []))[0].append(j)
        job.by_expert[e][1].append(float(m))
    return job


def _dims(shape: list[int], axis: str) -> tuple[int, int, int]:
    if len(shape) == 3:
        return shape[0], shape[1], shape[2]
    if len(shape) == 2:
        return 1, shape[0], shape[1]
    if len(shape) == 1 and axis == "row":
        return 1, shape[0], 1  # a bias: its elements are rows of one value
    raise CnaError(f"cannot scale the {axis}s of a tensor of shape {shape}")


def _copy_gaps(src_fd: int, dst_fd: int, src_start: int, dst_start: int, data_len: int,
               streamed: Sequence[_Job]) -> None:
    """The kernel copies the data section at its new offset, except the streamed tensors' bytes."""
    pos = 0
    for job in streamed:
        begin = job.src_offset - src_start
        copy_range_at(src_fd, dst_fd, src_start + pos, dst_start + pos, begin - pos)
        pos = begin + job.out.nbytes
    copy_range_at(src_fd, dst_fd, src_start + pos, dst_start + pos, data_len - pos)


def _read_at(fd: int, view: memoryview, offset: int) -> None:
    while view:
        k = os.preadv(fd, [view], offset)
        if k == 0:
            raise OSError(errno.EIO, "source file ended early")
        view, offset = view[k:], offset + k


def _stream(job: _Job, src_fd: int, dst_fd: int, buf: bytearray, scale: Scale, hb: bool, ha: bool) -> None:
    """The tensor through ``buf`` in whole rows, its touched columns scaled on the way."""
    experts, rows, cols = job.dims
    es = job.dtype.itemsize
    per = max(1, len(buf) // max(cols * es, 1))
    if per * cols * es > len(buf):  # one row longer than the buffer
        buf = bytearray(cols * es)
    base = np.frombuffer(buf, dtype=job.dtype)
    before, after = (hashlib.sha256() if hb else None), (hashlib.sha256() if ha else None)
    edits: list[bytes] = []
    off = 0
    for e in range(experts):
        picked = job.by_expert.get(e)
        idx = np.asarray(picked[0], dtype=np.intp) if picked else None
        for r0 in range(0, rows, per):
            k = min(per, rows - r0) * cols * es
            view = memoryview(buf)[:k]
            _read_at(src_fd, view, job.src_offset + off)
            if before is not None:
                before.update(view)
            if picked:
                t = base[: k // es].reshape(-1, cols)
                new = scale(t[:, idx], job.out.dtype, "column", picked[1])
                t[:, idx] = new
                edits.append(new.tobytes())
            if after is not None:
                after.update(view)
            write_at(dst_fd, view, job.out.offset + off)
            off += k
    job.out.edit = b"".join(edits)
    job.out.sha256_before = before.hexdigest() if before is not None else None
    job.out.sha256_after = after.hexdigest() if after is not None else None


def _rows(job: _Job, src_fd: int, dst_fd: int, scale: Scale) -> None:
    """Each touched row read from the source, scaled and written over the kernel's copy."""
    _, rows, cols = job.dims
    es = job.dtype.itemsize
    edits: list[bytes] = []
    for e, (js, ms) in sorted(job.by_expert.items()):
        for j, m in zip(js, ms, strict=True):
            at = ((e * rows + j) * cols) * es
            row = bytearray(cols * es)
            _read_at(src_fd, memoryview(row), job.src_offset + at)
            t = np.frombuffer(row, dtype=job.dtype).reshape(1, cols)
            new = scale(t, job.out.dtype, "row", [m]).tobytes()
            write_at(dst_fd, new, job.out.offset + at)
            edits.append(new)
    job.out.edit = b"".join(edits)


def region_sha256(fd: int, offset: int, count: int, buf: bytearray | None = None) -> str:
    """sha256 of ``count`` bytes of ``fd`` from ``offset``, read through ``buf`` (16 MiB when not given)."""
    buf = buf if buf is not None else bytearray(CHUNK)
    h = hashlib.sha256()
    while count > 0:
        view = memoryview(buf)[: min(count, len(buf))]
        _read_at(fd, view, offset)
        h.update(view)
        offset, count = offset + len(view), count - len(view)
    return h.hexdigest()
