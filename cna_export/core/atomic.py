"""Atomic outputs: everything is written to a temporary beside the output and published in one step.

An existing output is never replaced unless ``overwrite`` is set (also when another
run creates it while this one is writing: the publication refuses to replace it),
a failure part-way leaves no partial output behind, and every output obeys the output
policy of :mod:`cna_export.core.outputs` (never an input, never a device or FIFO, never a
folder this tool did not write, never the working folder). A missing parent folder of the
output is created when it is written.

Nothing is left behind by a kill (SIGKILL, a power loss):

* a single-file output (:func:`atomic_path`, :func:`atomic_file`) is written to an unnamed file in
  the output's folder (``O_TMPFILE``; writers that want a name open it as ``/proc/self/fd/<n>``) and
  published with ``linkat``, which fails if the output exists. The kernel frees an unnamed file when
  its last descriptor closes, whatever killed the process. With ``overwrite`` and an existing output,
  the file is linked to an owned temporary name (below) and renamed over the output: a kill between
  those two calls leaves that name, which the next run removes. Where ``O_TMPFILE`` or
  ``/proc/self/fd`` is missing (other systems, some file systems), an owned temporary name is used;
* a folder output (:func:`atomic_dir`), and the fallback above, is written under an owned temporary
  name ``.<output name>.<pid>.<start>.<boot>.<random>.tmp`` that records its writer, which holds a
  ``flock`` on it (:mod:`cna_export.core.owned_temps`). Before it writes an output, every run removes
  the owned temporaries of that output whose writer is dead (:func:`remove_stale_temps`). Replacing a
  folder swaps it with the old output in one step (``RENAME_EXCHANGE``), then removes the old one from
  the owned name it was swapped to.

Errors while writing (a full disk, a file-size limit, a folder that cannot be written) are reported
as one-line :class:`CnaError`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import CnaError
from .outputs import check_output
from .owned_temps import lock, owned_name, remove, remove_stale_temps, stem

_PROC_FD = "/proc/self/fd"


def check_output_path(out: Path, overwrite: bool, inputs: tuple[Path, ...] = ()) -> Path:
    """Resolve ``out`` and refuse it where the output policy does (:func:`cna_export.core.outputs.check_output`):
    an existing output without ``overwrite``, an output on, inside or containing one of ``inputs``, a device
    or FIFO, a folder this tool did not write, the working folder."""
    return check_output(Path(out), overwrite, tuple(Path(p) for p in inputs))


# ---------------------------------------------------------------------------
# Temporaries
# ---------------------------------------------------------------------------


@dataclass
class _Temp:
    """A temporary being written: ``path`` is what writers open (a name beside the output, or
    ``/proc/self/fd/<fd>`` for an unnamed file); ``fd`` is held open (with the owner's lock on a named
    one) until the temporary is published or discarded."""

    path: Path
    fd: int
    unnamed: bool

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _new_owned(final: Path, folder: bool, label: str = "") -> _Temp:
    """A new owned temporary file or folder beside ``final`` (private: 0600/0700), locked by this process."""
    cloexec = getattr(os, "O_CLOEXEC", 0)
    while True:
        path = owned_name(final, label)
        try:
            if folder:
                os.mkdir(path, 0o700)
                fd = os.open(path, os.O_RDONLY | cloexec)
            else:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | cloexec, 0o600)
        except FileExistsError:
            continue
        lock(fd, wait=True)
        return _Temp(path, fd, unnamed=False)


def _new_unnamed(final: Path) -> _Temp | None:
    """An unnamed file in ``final``'s folder that writers can open by name, or None where the system
    or file system offers none."""
    if not hasattr(os, "O_TMPFILE"):
        return None
    try:
        fd = os.open(final.parent, os.O_TMPFILE | os.O_RDWR | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError:  # unsupported here (or unwritable: the named fallback reports it)
        return None
    path = Path(f"{_PROC_FD}/{fd}")
    if not os.path.exists(path):
        os.close(fd)
        return None
    return _Temp(path, fd, unnamed=True)


def _new_temp(final: Path, folder: bool) -> _Temp:
    """A new temporary beside ``final``, creating its missing parent folders, after removing the stale
    temporaries of ``final`` (a write error, such as a folder that cannot be written, is one line)."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(final)
        return (None if folder else _new_unnamed(final)) or _new_owned(final, folder)
    except OSError as e:
        _raise_write_error(e, final)
        raise


def _discard(temp: _Temp) -> None:
    """Remove a temporary that will not be published (an unnamed one goes with its descriptor)."""
    if not temp.unnamed:
        remove(temp.path)
    temp.close()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def public_mode(path: Path) -> None:
    """Owned temporaries are created private (0600/0700); give outputs the usual umask permissions."""
    base = 0o777 if path.is_dir() else 0o666
    os.chmod(path, base & ~_umask())


def _publish_private_files(folder: Path) -> None:
    """Files that a library wrote through its own private temporary (safetensors' ``save_file`` leaves
    0600) get the usual umask permissions. Hard-linked files are left alone: they are the input's."""
    for f in folder.rglob("*"):
        st = f.lstat()
        if f.is_file() and not f.is_symlink() and st.st_nlink == 1 and not st.st_mode & 0o077:
            public_mode(f)


# ---------------------------------------------------------------------------
# Publication
# ---------------------------------------------------------------------------

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_UNSUPPORTED = (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP)


def _libc_call(name: str, *args: object) -> int | None:
    """``libc.<name>(*args)``: 0 on success, the errno on failure, None where libc lacks it."""
    import ctypes  # only where a rename or link needs a call Python lacks

    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    return 0 if fn(*args) == 0 else ctypes.get_errno()


def _renameat2(src: Path, dst: Path, flags: int) -> int | None:
    return _libc_call("renameat2", _AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags)


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, raising FileExistsError if ``dst`` exists (atomically where the OS can)."""
    err = _renameat2(src, dst, _RENAME_NOREPLACE)
    if err == 0:
        return
    if err == errno.EEXIST:
        raise FileExistsError(err, os.strerror(err), str(dst))
    if err is not None and err not in _UNSUPPORTED:  # unsupported here: fall back below
        raise OSError(err, os.strerror(err), str(dst))
    if src.is_dir() or os.path.lexists(dst):
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
        os.rename(src, dst)
        return
    os.link(src, dst)  # fails with EEXIST if another run got there first
    os.unlink(src)


def _link_unnamed(temp: _Temp, dst: Path) -> None:
    """Give the unnamed file ``temp`` the name ``dst`` (``linkat``; FileExistsError if ``dst`` exists):
    through ``/proc/self/fd/<n>`` with AT_SYMLINK_FOLLOW, else on the descriptor with AT_EMPTY_PATH."""
    folder = os.open(dst.parent, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:  # a dst_dir_fd makes os.link call linkat(..., AT_SYMLINK_FOLLOW) instead of link()
        os.link(temp.path, dst.name, dst_dir_fd=folder)
    except FileExistsError:
        raise
    except OSError as first:
        err = _libc_call("linkat", temp.fd, b"", folder, os.fsencode(dst.name), _AT_EMPTY_PATH)
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst)) from None
        if err != 0:
            raise first
    finally:
        os.close(folder)


def _exists_error(final: Path) -> CnaError:
    return CnaError(f"output {final} already exists (another run created it meanwhile); pass --overwrite to "
                    "replace it")


def _publish(temp: _Temp, final: Path, overwrite: bool) -> None:
    """Put the finished temporary in place of ``final`` (module docstring)."""
    if not temp.unnamed:
        _replace(temp.path, final, overwrite)
        return
    os.fsync(temp.fd)
    try:
        _link_unnamed(temp, final)
        return
    except FileExistsError:
        if not overwrite:
            raise _exists_error(final) from None
    named = owned_name(final)
    _link_unnamed(temp, named)
    try:
        _replace(named, final, overwrite=True)
    except BaseException:
        remove(named)
        raise


def _replace(tmp: Path, final: Path, overwrite: bool = True) -> None:
    """Move the named temporary ``tmp`` onto ``final``; an existing ``final`` is replaced only with
    ``overwrite``, in one step where the OS can (a file over a file; ``RENAME_EXCHANGE`` otherwise).

    Without ``overwrite`` an output that appeared meanwhile (another run) is never replaced.
    """
    public_mode(tmp)
    if not overwrite:
        try:
            _rename_noreplace(tmp, final)
        except FileExistsError:
            raise _exists_error(final) from None
        return
    if not (final.exists() or final.is_symlink()):
        os.replace(tmp, final)
        return
    check_output(final, True, exists_ok=True)  # what appeared meanwhile is still ours to replace
    if not tmp.is_dir() and (final.is_symlink() or not final.is_dir()):
        os.replace(tmp, final)  # atomic: a reader sees the old file or the new one
        return
    err = _renameat2(tmp, final, _RENAME_EXCHANGE)
    if err == 0:  # the old output now sits at tmp's owned name: removed now, or by the next run if killed
        remove(tmp)
        return
    if err is not None and err not in _UNSUPPORTED:
        raise OSError(err, os.strerror(err), str(final))
    _replace_through_backup(tmp, final)


def _replace_through_backup(tmp: Path, final: Path) -> None:
    """Where ``RENAME_EXCHANGE`` is missing: the old output is moved to an owned backup name, the new one
    renamed into place, then the backup removed (kept by stale-temporary removal until the output is back)."""
    backup = owned_name(final, "old-")
    os.replace(final, backup)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(backup, final)
        raise
    remove(backup)


# ---------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _staged(path: Path, overwrite: bool, inputs: tuple[Path, ...], folder: bool) -> Iterator[_Temp]:
    final = check_output_path(Path(path), overwrite, inputs)
    temp = _new_temp(final, folder=folder)
    try:
        yield temp
        if folder:
            _publish_private_files(temp.path)
        _publish(temp, final, overwrite)
    except BaseException as e:
        _discard(temp)
        _raise_write_error(e, final)
        raise
    finally:
        temp.close()


@contextlib.contextmanager
def atomic_path(path: Path, overwrite: bool = False, inputs: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary file path for writers that want a name (an unnamed file's ``/proc/self/fd/<n>``
    where the system has them, else a name beside ``path``); published onto ``path`` on success."""
    with _staged(path, overwrite, inputs, folder=False) as temp:
        yield temp.path


@contextlib.contextmanager
def atomic_file(path: Path, overwrite: bool = False, inputs: tuple[Path, ...] = (), mode: str = "wb") -> Iterator:
    """Open a temporary file for ``path``; on success it is fsynced and published onto ``path``."""
    with atomic_path(path, overwrite, inputs) as tmp:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_dir(path: Path, overwrite: bool = False, inputs: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield an owned temporary folder beside ``path``; on success it is renamed onto ``path``."""
    with _staged(path, overwrite, inputs, folder=True) as temp:
        yield temp.path


@contextlib.contextmanager
def scratch_dir(beside: Path, label: str = "convert") -> Iterator[Path]:
    """An owned temporary folder ``.<name>.<label>-<owner>.<random>.tmp`` beside the output ``beside``,
    for intermediate files (a converted source); removed on exit, or by a later run if this one is killed."""
    if not re.fullmatch(r"[a-z]+", label):
        raise ValueError(f"scratch label {label!r} must be lowercase letters")
    final = Path(beside)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        temp = _new_owned(final, folder=True, label=label + "-")
    except OSError as e:
        _raise_write_error(e, final)
        raise
    try:
        yield temp.path
    finally:
        _discard(temp)


def _raise_write_error(e: BaseException, final: Path) -> None:
    """An OSError while writing (a full disk, EFBIG, EIO) becomes a one-line CnaError naming the output."""
    if isinstance(e, OSError):
        why = e.strerror or str(e).splitlines()[0] if str(e) else type(e).__name__
        if e.errno is None and "requested and" in why:  # a buffered writer's short write: ENOSPC/EFBIG
            why = f"short write, the disk is full or a file size limit was reached ({why})"
        name = str(e.filename or "")
        inside = name.startswith((str(final.parent / f".{stem(final)}."), f"{_PROC_FD}/")) or name == str(final)
        where = f" ({name})" if name and not inside else ""
        raise CnaError(f"cannot write {final}: {why}{where}") from None


def atomic_write_text(path: Path, text: str, overwrite: bool = False) -> None:
    with atomic_file(path, overwrite=overwrite, mode="w") as fh:
        fh.write(text)

