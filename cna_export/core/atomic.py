"""Atomic outputs: everything is written to a temporary sibling and renamed into place.

An existing output is never replaced unless ``overwrite`` is set (also when another
run creates it while this one is writing: the final rename refuses to replace it),
a failure part-way leaves no partial output behind, and every output obeys the output
policy of :mod:`cna_export.core.outputs` (never an input, never a device or FIFO, never a
folder this tool did not write, never the working folder). A missing parent folder of the
output is created when it is written.

Temporaries live beside the output and are named ``.<output name>.<random>.tmp``
(plus ``.<output name>.convert-<random>.tmp`` for a converted source). A process
killed with SIGKILL cannot remove its temporary: a later run ignores it (it picks a
new random name) and it may be deleted by hand. Errors while writing (a full
disk, a file-size limit, a folder that cannot be written) are reported as one-line
:class:`CnaError`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import CnaError
from .outputs import check_output


def check_output_path(out: Path, overwrite: bool, inputs: tuple[Path, ...] = ()) -> Path:
    """Resolve ``out`` and refuse it where the output policy does (:func:`cna_export.core.outputs.check_output`):
    an existing output without ``overwrite``, an output on, inside or containing one of ``inputs``, a device
    or FIFO, a folder this tool did not write, the working folder."""
    return check_output(Path(out), overwrite, tuple(Path(p) for p in inputs))


def _new_temp(final: Path, folder: bool) -> Path:
    """A new temporary file or folder beside ``final``, creating its missing parent folders (a write error,
    such as a folder that cannot be written, is one line)."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if folder:
            return Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        return Path(name)
    except OSError as e:
        _raise_write_error(e, final)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def public_mode(path: Path) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give outputs the usual umask permissions."""
    base = 0o777 if path.is_dir() else 0o666
    os.chmod(path, base & ~_umask())


def _publish_private_files(folder: Path) -> None:
    """Files that a library wrote through its own private temporary (safetensors' ``save_file`` leaves
    0600) get the usual umask permissions. Hard-linked files are left alone: they are the input's."""
    for f in folder.rglob("*"):
        st = f.lstat()
        if f.is_file() and not f.is_symlink() and st.st_nlink == 1 and not st.st_mode & 0o077:
            public_mode(f)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, raising FileExistsError if ``dst`` exists (atomically where the OS can)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # unsupported here: fall back below
            raise OSError(err, os.strerror(err), str(dst))
    if src.is_dir() or os.path.lexists(dst):
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
        os.rename(src, dst)
        return
    os.link(src, dst)  # fails with EEXIST if another run got there first
    os.unlink(src)


def _replace(tmp: Path, final: Path, overwrite: bool = True) -> None:
    """Move ``tmp`` onto ``final``; an existing ``final`` is removed only after the new one is ready.

    Without ``overwrite`` an output that appeared meanwhile (another run) is never replaced.
    """
    public_mode(tmp)
    if not overwrite:
        try:
            _rename_noreplace(tmp, final)
        except FileExistsError:
            raise CnaError(
                f"output {final} already exists (another run created it meanwhile); pass --overwrite to replace it"
            ) from None
        return
    if final.exists() or final.is_symlink():
        check_output(final, True, exists_ok=True)  # what appeared meanwhile is still ours to replace
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
def atomic_path(path: Path, overwrite: bool = False, inputs: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary file path beside ``path`` for writers that want a name; renamed on success."""
    final = check_output_path(Path(path), overwrite, inputs)
    tmp = _new_temp(final, folder=False)
    try:
        yield tmp
        _replace(tmp, final, overwrite)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        _raise_write_error(e, final)
        raise


@contextlib.contextmanager
def atomic_file(path: Path, overwrite: bool = False, inputs: tuple[Path, ...] = (), mode: str = "wb") -> Iterator:
    """Open a temporary file beside ``path``; on success it is fsynced and renamed onto ``path``."""
    with atomic_path(path, overwrite, inputs) as tmp:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_dir(path: Path, overwrite: bool = False, inputs: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it is renamed onto ``path``."""
    final = check_output_path(Path(path), overwrite, inputs)
    tmp = _new_temp(final, folder=True)
    try:
        yield tmp
        _publish_private_files(tmp)
        _replace(tmp, final, overwrite)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_write_error(e, final)
        raise


def _raise_write_error(e: BaseException, final: Path) -> None:
    """An OSError while writing (a full disk, EFBIG, EIO) becomes a one-line CnaError naming the output."""
    if isinstance(e, OSError):
        why = e.strerror or str(e).splitlines()[0] if str(e) else type(e).__name__
        if e.errno is None and "requested and" in why:  # a buffered writer's short write: ENOSPC/EFBIG
            why = f"short write, the disk is full or a file size limit was reached ({why})"
        name = str(e.filename or "")
        inside = name.startswith(str(final.parent / f".{final.name}.")) or name == str(final)
        where = f" ({name})" if name and not inside else ""
        raise CnaError(f"cannot write {final}: {why}{where}") from None


def atomic_write_text(path: Path, text: str, overwrite: bool = False) -> None:
    with atomic_file(path, overwrite=overwrite, mode="w") as fh:
        fh.write(text)
