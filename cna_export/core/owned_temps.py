"""Owned temporaries: names that record the process writing them, and removal of those whose writer is dead.

An owned temporary of an output ``<name>`` is named ``.<name>.<label><pid>.<start>.<boot>.<random>.tmp``:
``<label>`` is empty or a word and a dash (``convert-``, ``old-``), ``<pid>`` the writer's process id,
``<start>`` its start time in clock ticks since boot (``/proc/<pid>/stat``; 0 where unknown), ``<boot>``
the first 8 hex digits of the kernel's boot id, ``<random>`` 8 hex digits. The writer holds an exclusive
``flock`` on it (:func:`lock`) until it is published or removed.

:func:`remove_stale_temps` removes the owned temporaries of an output whose writer is dead: nobody holds
its lock and, for a writer of this boot, no process runs with its pid and start time (a reused pid has
another start time; a zombie is dead). A writer of another boot, or another host sharing the folder,
counts as dead only when its lock is known to be free. A backup (``old-``) is kept while the output is
missing: it is the only copy of the old output.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

NAME_BYTES = 160
"""At most this many bytes of the output's name go into a temporary's name (which must fit NAME_MAX)."""
TEMP_RE = re.compile(r"^\.(?P<stem>.+)\.(?P<label>(?:[a-z]+-)?)(?P<pid>\d+)\.(?P<start>\d+)\.(?P<boot>[0-9a-f]{8})"
                      r"\.[0-9a-f]{8}\.tmp$", re.DOTALL)


@dataclass(frozen=True)
class Owner:
    """The process that owns a temporary, as recorded in its name."""

    pid: int
    start: int  # start time in clock ticks since boot; 0 where unknown
    boot: str  # first 8 hex digits of the boot id; "00000000" where unknown

    @property
    def tag(self) -> str:
        return f"{self.pid}.{self.start}.{self.boot}"


def _proc_start(pid: int | str) -> tuple[int, bool] | None:
    """(start time in clock ticks, is a zombie) of a process from ``/proc``, or None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return int(fields[19]), fields[0] == b"Z"
    except (OSError, IndexError, ValueError):
        return None


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip().replace("-", "")[:8].lower()
    except OSError:
        return "0" * 8


_ME: dict[int, Owner] = {}


def current_owner() -> Owner:
    """This process as an owner (computed again after a fork)."""
    pid = os.getpid()
    if pid not in _ME:
        found = _proc_start("self")
        _ME.clear()
        _ME[pid] = Owner(pid, found[0] if found else 0, _boot_id())
    return _ME[pid]


def _pid_alive(owner: Owner) -> bool:
    """True when a process with ``owner``'s pid (and, where known, start time) runs on this machine."""
    if os.path.isdir("/proc/self"):
        found = _proc_start(owner.pid)
        return found is not None and not found[1] and (owner.start == 0 or found[0] == owner.start)
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def lock(fd: int, wait: bool) -> bool | None:
    """Take an exclusive ``flock`` on ``fd``: True when taken, False when another holds it, None where
    locks are unavailable (no ``fcntl``, a file system that refuses them)."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def stem(final: Path) -> str:
    """The output's name as it appears in its temporaries' names (cut to fit NAME_MAX)."""
    return os.fsencode(final.name)[:NAME_BYTES].decode("utf-8", "ignore") or "out"


def _owner_of(entry: str, final: Path) -> tuple[Owner, str] | None:
    """(owner, label) of an owned temporary of ``final`` named ``entry``; None for any other name."""
    m = TEMP_RE.match(entry)
    if m is None or m["stem"] != stem(final):
        return None
    return Owner(int(m["pid"]), int(m["start"]), m["boot"]), m["label"]


def _is_stale(path: Path, owner: Owner) -> bool:
    """Whether the owner of the temporary ``path`` is dead (module docstring)."""
    me = current_owner()
    if owner == me:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        free = lock(fd, wait=False)
    finally:
        os.close(fd)
    if free is False:
        return False
    if owner.boot != me.boot:
        return free is True
    return not _pid_alive(owner)


def remove_stale_temps(final: Path) -> list[Path]:
    """Remove the owned temporaries of ``final`` (in its folder) whose writer is dead; returns them."""
    final = Path(final)
    try:
        with os.scandir(final.parent) as it:
            names = [e.name for e in it if e.name.endswith(".tmp")]
    except OSError:
        return []
    removed = []
    for name in names:
        found = _owner_of(name, final)
        if found is None or (found[1] == "old-" and not os.path.lexists(final)):
            continue  # a backup is kept until the output is back in place
        path = final.parent / name
        if _is_stale(path, found[0]):
            remove(path)
            removed.append(path)
    return removed


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def owned_name(final: Path, label: str = "") -> Path:
    """A new owned temporary name beside ``final`` for this process (``label``: '' or a word and a dash)."""
    return final.parent / f".{stem(final)}.{label}{current_owner().tag}.{os.urandom(4).hex()}.tmp"
