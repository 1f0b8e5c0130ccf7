"""Copying byte ranges between files in the kernel, for exports that patch a few tensors of a big file.

``copy_range`` uses ``copy_file_range`` (the kernel copies, with a reflink where the file system
shares extents), and falls back to ``pread``/``write`` through a 16 MiB buffer where that call is
missing or refused (other file systems, older kernels).
"""

from __future__ import annotations

import errno
import os


def write_all(fd: int, data: memoryview) -> None:
    while data:
        k = os.write(fd, data)
        data = data[k:]


def copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> None:
    """Copy ``count`` bytes of ``src_fd`` from ``offset`` to ``dst_fd``'s position: in the kernel
    (``copy_file_range``, a reflink where the file system shares extents) when it can, else through
    a 16 MiB buffer."""
    kernel = hasattr(os, "copy_file_range")
    while count > 0:
        if kernel:
            try:
                k = os.copy_file_range(src_fd, dst_fd, min(count, 1 << 30), offset)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
                    raise
                kernel = False
                continue
            if k == 0:
                raise OSError(errno.EIO, "source file ended early")
        else:
            chunk = os.pread(src_fd, min(count, 1 << 24), offset)
            if not chunk:
                raise OSError(errno.EIO, "source file ended early")
            write_all(dst_fd, memoryview(chunk))
            k = len(chunk)
        offset += k
        count -= k
