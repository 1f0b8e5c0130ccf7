"""Errors from outside the package (the OS, the network, the Hugging Face Hub) as one line.

A write that fails (a folder that cannot be written, a file where a folder should be) or a Hub call
while the network is down reaches the CLI as an ``OSError`` or as an exception of the HTTP client;
:func:`one_line` describes it in one line (``cna-export`` exits 2). The HTTP libraries are recognised
by the module of the exception's class, so none of them is imported at start-up.
"""

from __future__ import annotations

NETWORK_MODULES = ("httpx", "httpcore", "requests", "urllib3", "aiohttp")
"""Packages whose exceptions mean the network or the server failed (and their renamed forks: ``httpx2``)."""
HUB_MODULES = ("huggingface_hub",)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _package(e: BaseException, packages: tuple[str, ...]) -> bool:
    """Whether a class of ``e`` comes from one of ``packages`` (by the name of its top-level package)."""
    return any(c.__module__.split(".")[0].startswith(packages) for c in type(e).__mro__)


def _chain(e: BaseException) -> list[BaseException]:
    """``e`` and the exceptions it was raised from (at most a few)."""
    out: list[BaseException] = []
    x: BaseException | None = e
    while x is not None and len(out) < 8 and x not in out:
        out.append(x)
        x = x.__cause__ or x.__context__
    return out


def os_error_line(e: OSError) -> str:
    """``path: reason`` as the shell tools say it (``/x/out.gguf: Permission denied``)."""
    why = e.strerror or _first_line(e)
    if e.filename is not None and e.filename2 is not None:
        return f"{e.filename} -> {e.filename2}: {why}"
    if e.filename is not None:
        return f"{e.filename}: {why}"
    return why


def one_line(e: BaseException) -> str | None:
    """The one-line message for a write, network or Hub error; None for anything else (a bug)."""
    if _package(e, NETWORK_MODULES + HUB_MODULES):
        cause = next((x for x in _chain(e) if _package(x, NETWORK_MODULES)), None)
        if cause is not None:
            return f"network error ({type(cause).__name__}): {_first_line(cause)}"
        return f"Hugging Face Hub error ({type(e).__name__}): {_first_line(e)}"
    if isinstance(e, OSError):
        return os_error_line(e)
    return None
