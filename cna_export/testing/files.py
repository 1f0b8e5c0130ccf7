"""File helpers for the tests and benches."""

from __future__ import annotations

import hashlib
from pathlib import Path


def tree_hash(path: Path) -> str:
    """sha256 over a file, or over every file (relative name and bytes) of a folder."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        h.update(str(p.relative_to(path.parent)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()
