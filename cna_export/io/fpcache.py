"""A cache of model fingerprints, keyed by the files they were hashed from.

Hashing every down projection of an 8B checkpoint as float32 (7.5 GB through sha256, after
converting bfloat16 or dequantising Q4_K) takes longer than copying the checkpoint. Discovery,
export and verification of the same weights each need that fingerprint, so it is computed once
and remembered under ``<cache>/fingerprints/`` (``<cache>`` is ``$CNA_EXPORT_CACHE``, else
``$XDG_CACHE_HOME/cna-export``, else ``~/.cache/cna-export``).

An entry is keyed by the fingerprint's scheme (its method text in
:data:`cna_export.core.fingerprint.FINGERPRINT_METHODS`, also recorded in the entry and checked: a
value of one scheme is never returned for another) and, for every file read, its resolved
path, size, inode, device, modification time and change time (all in nanoseconds). Any write to a file
changes its change time, which no user-level call can set back, so a changed file never matches
a stale entry. ``CNA_EXPORT_FINGERPRINT_CACHE`` names another folder for the entries, or is ``off``
to disable the cache (every fingerprint is hashed afresh). A cache that cannot be written
(read-only home) is skipped without an error.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterable

from ..core.atomic import atomic_write_text
from ..core.fingerprint import FINGERPRINT_METHODS, is_fingerprint, scheme_of

TENSOR_HASHES = 0
"""The ``scheme`` of entries that are not model fingerprints but sha256 of stored bytes (touched tensors): keyed
with scheme 1's method text, as every entry was before scheme 2."""

CACHE_SWITCH = "CNA_EXPORT_FINGERPRINT_CACHE"
"""A folder for the entries, or ``off`` (``0``, ``no``, ``false``) to disable the fingerprint cache."""


def enabled() -> bool:
    return os.environ.get(CACHE_SWITCH, "").strip().lower() not in ("off", "0", "no", "false")


def cache_folder() -> Path:
    from .bundled import cache_dir

    chosen = os.environ.get(CACHE_SWITCH, "").strip()
    return Path(chosen).expanduser() if chosen else cache_dir() / "fingerprints"


def _method(scheme: int) -> str:
    return FINGERPRINT_METHODS[1 if scheme == TENSOR_HASHES else scheme]


def _key(kind: str, paths: Iterable[str | Path], extra: str, scheme: int) -> str | None:
    stamps = []
    for p in paths:
        try:
            real = os.path.realpath(p)
            st = os.stat(real)
        except OSError:
            return None
        stamps.append([real, st.st_size, st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns])
    text = json.dumps([_method(scheme), kind, extra, stamps], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def stamp(kind: str, paths: Iterable[str | Path], extra: str = "", scheme: int = TENSOR_HASHES) -> str | None:
    """The entry key of ``paths`` as they are now (pass it to :func:`store` after hashing them, and store only
    if it has not changed meanwhile), or None when the cache is off or a file is missing. ``scheme``: the
    fingerprint scheme of the value (:data:`TENSOR_HASHES` for a sha256 of stored bytes)."""
    return _key(kind, list(paths), extra, scheme) if enabled() else None


def lookup(kind: str, paths: Iterable[str | Path], extra: str = "", scheme: int = TENSOR_HASHES) -> str | None:
    """The cached value of ``paths`` in ``scheme`` (unchanged since it was stored), else None."""
    if not enabled():
        return None
    key = _key(kind, list(paths), extra, scheme)
    if key is None:
        return None
    try:
        entry = json.loads((cache_folder() / f"{key}.json").read_text("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(entry, dict) or entry.get("method") != _method(scheme):
        return None
    fp = entry.get("fingerprint")
    if not isinstance(fp, str) or not is_fingerprint(fp):
        return None
    # the value's own text must say the scheme asked for (an entry written by other code is ignored, not trusted)
    return fp if scheme == TENSOR_HASHES or scheme_of(fp) == scheme else None


def store(kind: str, paths: Iterable[str | Path], fingerprint: str, extra: str = "", key: str | None = None,
          scheme: int = TENSOR_HASHES) -> None:
    """Remember ``fingerprint`` for ``paths`` as they are now (best effort: errors are ignored)."""
    if not enabled():
        return
    paths = list(paths)
    key = key or _key(kind, paths, extra, scheme)
    if key is None:
        return
    try:
        folder = cache_folder()
        folder.mkdir(parents=True, exist_ok=True)
        entry = {"fingerprint": fingerprint, "method": _method(scheme), "kind": kind,
                 "files": [os.path.realpath(p) for p in paths]}
        atomic_write_text(folder / f"{key}.json", json.dumps(entry, indent=1) + "\n", overwrite=True)
    except Exception:  # noqa: BLE001 - a cache is an optimisation, never a failure
        pass


def cached(kind: str, paths: Iterable[str | Path], compute: Callable[[], str], extra: str = "",
           scheme: int = TENSOR_HASHES) -> str:
    """The fingerprint of ``paths`` in ``scheme``: from the cache, else ``compute()``, stored only when no file
    changed while it was hashed."""
    paths = list(paths)
    hit = lookup(kind, paths, extra, scheme)
    if hit is not None:
        return hit
    before = _key(kind, paths, extra, scheme) if enabled() else None
    fp = compute()
    if before is not None and _key(kind, paths, extra, scheme) == before:
        store(kind, paths, fp, extra, key=before, scheme=scheme)
    return fp
