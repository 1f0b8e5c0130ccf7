"""Atomic outputs: everything is written to a temporary sibling and renamed into place.

An existing output is never replaced unless ``overwrite`` is set, a failure
part-way leaves no partial output behind, and outputs are refused when they
would land inside (or on) an input.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import CnaError


def check_output_path(out: Path, overwrite: bool, inputs: tuple[Path, ...] = ()) -> Path:
    """Resolve ``out`` and refuse it if it exists (without overwrite) or sits inside/equal to an input."""
    out = Path(out)
    resolved = out.resolve()
    for src in inputs:
        src_r = Path(src).resolve()
        if resolved == src_r:
            raise CnaError(f"output {out} is the input itself; choose another output path")
        if src_r.is_dir() and src_r in resolved.parents:
            raise CnaError(f"output {out} is inside the input {src}; choose a path outside it")
        if resolved.is_dir() and resolved in src_r.parents and overwrite:
            raise CnaError(f"output {out} contains the input {src}; refusing to overwrite it")
    if out.exists() and not overwrite:
        raise CnaError(f"output {out} already exists; pass --overwrite to replace it")
    if not resolved.parent.exists():
        raise CnaError(f"output folder {out.parent} does not exist")
    return resolved


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def public_mode(path: Path) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give outputs the usual umask permissions."""
    base = 0o777 if path.is_dir() else 0o666
    os.chmod(path, base & ~_umask())


def _replace(tmp: Path, final: Path) -> None:
    """Move ``tmp`` onto ``final``; an existing ``final`` is removed only after the new one is ready."""
    public_mode(tmp)
    if final.exists() or final.is_symlink():
        backup = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, backup)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(backup, final)
            raise
        if backup.is_dir() and not backup.is_symlink():
            shutil.rmtree(backup, ignore_errors=True)
        else:
            backup.unlink(missing_ok=True)
    else:
        os.replace(tmp, final)


@contextlib.contextmanager
def atomic_file(path: Path, overwrite: bool = False, inputs: tuple[Path, ...] = (), mode: str = "wb") -> Iterator:
    """Open a temporary file beside ``path``; on success it is fsynced and renamed onto ``path``."""
    final = check_output_path(Path(path), overwrite, inputs)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        _replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_path(path: Path, overwrite: bool = False, inputs: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary file path beside ``path`` for writers that want a name; renamed on success."""
    final = check_output_path(Path(path), overwrite, inputs)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: Path, overwrite: bool = False, inputs: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it is renamed onto ``path``."""
    final = check_output_path(Path(path), overwrite, inputs)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        _replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str, overwrite: bool = False) -> None:
    with atomic_file(path, overwrite=overwrite, mode="w") as fh:
        fh.write(text)
