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
    (``with bar(show, total=n) as b: b.update(1)``). A bar that is not shown does not import tqdm
    (``tqdm.auto`` costs 35-70 ms of start-up).
    """
    if not show:
        return _Silent(iterable, total)
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, disable=not show,
                dynamic_ncols=True, file=sys.stderr, **kwargs)


class _Silent:
    """A bar that is not shown: the calls of a disabled tqdm bar, doing nothing."""

    def __init__(self, iterable: Iterable[Any] | None, total: int | None) -> None:
        self.iterable, self.total, self.n = iterable, total, 0

    def __iter__(self) -> Any:
        return iter(self.iterable if self.iterable is not None else ())

    def __len__(self) -> int:
        return len(self.iterable) if hasattr(self.iterable, "__len__") else int(self.total or 0)  # type: ignore[arg-type]

    def __enter__(self) -> "_Silent":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def update(self, n: float = 1) -> None:
        self.n += n

    def close(self) -> None:
        return None

    def __getattr__(self, name: str) -> Any:  # set_description, set_postfix, refresh, ...: nothing to show
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None
