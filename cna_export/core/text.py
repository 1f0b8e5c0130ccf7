"""Reading small text inputs (circuits, manifests, recipes, multiplier files) with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import CnaError


def read_text(path: Path, what: str) -> str:
    """A small UTF-8 text file, with one-line errors for unreadable or non-UTF-8 files."""
    try:
        return path.read_text("utf-8")
    except UnicodeDecodeError as e:
        raise CnaError(f"{what} {path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise CnaError(f"cannot read {what} {path}: {e.strerror or type(e).__name__}") from None


def parse_json(text: str, source: str) -> object:
    """``json.loads`` with one-line errors, also for inputs that are valid JSON the parser cannot take
    (nesting deeper than the recursion limit, integers longer than Python's digit limit)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CnaError(f"{source} is not valid JSON: {e}") from None
    except (ValueError, RecursionError, MemoryError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0] or type(e).__name__
        raise CnaError(f"{source} cannot be read as JSON: {why}") from None
