"""Publish a file with its companions (a GGUF with its Modelfile and side manifest) in one step.

Each file is staged beside its final path (:func:`cna_export.core.atomic.atomic_path`), and all of
them are renamed into place together, the main file first, under an exclusive lock on their folder
(``flock``): two runs writing the same outputs (``--overwrite``) each publish their whole set, one
after the other, so a Modelfile never describes another run's GGUF. A failure before the renames
leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Sequence

from ..core.atomic import atomic_path


class _FolderLock:
    """An exclusive ``flock`` on a folder, taken by :meth:`acquire` and held until the context exits."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.fd: int | None = None

    def __enter__(self) -> _FolderLock:
        return self

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # no flock on this platform: the renames still happen in one step
            return
        self.fd = os.open(self.folder, os.O_RDONLY)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None


@contextlib.contextmanager
def publish_together(paths: Sequence[Path], overwrite: bool, inputs: tuple[Path, ...] = ()) -> Iterator[list[Path]]:
    """Temporary paths for ``paths`` (the main output first, its companions in the same folder); on success
    all are renamed into place under the folder's lock, the main output first."""
    lock = _FolderLock(Path(paths[0]).resolve().parent)
    with contextlib.ExitStack() as stack:
        stack.enter_context(lock)
        # entered last, renamed first: the main output, then each companion
        temps = [stack.enter_context(atomic_path(Path(p), overwrite=overwrite, inputs=inputs))
                 for p in reversed(paths)][::-1]
        yield temps
        lock.acquire()


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to a staged file, flushed to disk before it is published."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
