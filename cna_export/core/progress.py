"""Progress bars: one tqdm wrapper for the whole package.

Library functions take ``progress: bool`` and open their bars with :func:`bar`. The CLI decides
once, with :func:`wanted`, whether bars are shown at all: never with ``--quiet``, and only when
stderr is a terminal (a log file or a pipe gets no carriage-return noise).
"""

from __future__ import annotations

import sys
from typing import Any, Iterable


def wanted(quiet: bool = False) -> bool:
    """Whether progress bars should be shown: not ``quiet`` and stderr is a terminal."""
    if quiet:
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # closed or replaced stderr
        return False


def bar(show: bool, iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
        unit: str = "it", leave: bool = False, **kwargs: Any) -> Any:
    """A tqdm bar on stderr, or a silent one (same interface) when ``show`` is false.

    Use it around an iterable (``for x in bar(show, items, desc=...)``) or as a manual bar
    (``with bar(show, total=n) as b: b.update(1)``).
    """
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, disable=not show,
                dynamic_ncols=True, file=sys.stderr, **kwargs)
