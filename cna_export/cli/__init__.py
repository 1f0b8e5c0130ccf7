"""Command line: a thin layer over the library API.

One module per group of sub-commands (``discover``, ``export``, ``verify``,
``steer`` (+ ``push``), ``evaluate``, ``audit``), listed in ``_registry``; a command line imports only the
module of the command it runs, and ``--help`` none. Every sub-command parses flags
(generated from the options models), calls one library function and prints a
summary. User errors end as one line on stderr and a non-zero exit code, and so do write, network and
Hub errors (``_errors``); see ``docs/exit-codes.md``. Before any work, each command checks the paths it
reads and writes against the output policy (``paths.guard``, ``core/outputs.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Collection, Sequence

# pydantic scans every installed distribution's entry points for plugins when the first settings model
# is built (about 70 ms of a command's start-up); the CLI uses none, so skip the scan unless the user
# configured plugins (the variable is only set when absent). Must run before pydantic is imported.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

from ..core.errors import CnaError, ExitCode  # noqa: E402
from ..core.progress import wanted  # noqa: E402
from ..core.version import __version__  # noqa: E402
from ._errors import one_line  # noqa: E402
from ._registry import BY_NAME, COMMANDS, TABLE  # noqa: E402


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command; with ``commands``, the same parser with only those commands' flags added (the
    others are listed with their help, as ``--help`` shows them), so only their modules are imported."""
    parser = argparse.ArgumentParser(
        prog="cna-export",
        description="Discover CNA neuron circuits, fold them into weights, export safetensors/GGUF, verify and audit.",
    )
    parser.add_argument("--version", action="version", version=f"cna-export {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summaries")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for c in TABLE:
        p = sub.add_parser(c.name, help=c.help, description=c.description)
        if commands is None or c.name in commands:
            c.add_arguments(p)
    return parser


def wanted_commands(argv: Sequence[str]) -> tuple[str, ...] | None:
    """The commands whose flags parsing ``argv`` can need: the one it names (the first word after the
    top-level switches, none of which takes a value); none when it names no command (argparse then refuses it,
    or prints the top-level help or the version); every command (None) after ``--``."""
    for arg in argv:
        if arg == "--":
            return None
        if arg.startswith("-") and arg != "-":
            continue
        return (arg,) if arg in BY_NAME else ()
    return ()


def _setup_logging(verbose: bool, quiet: bool) -> None:
    import logging  # here, not at the top: --help and argument errors end before it is needed

    level = logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING
    logging.basicConfig(level=level, format="cna-export: %(levelname)s: %(message)s", stream=sys.stderr)
    logging.captureWarnings(True)
    for noisy in ("transformers", "accelerate", "urllib3", "huggingface_hub", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR if not verbose else logging.INFO)
    if not verbose:
        warnings.filterwarnings("ignore", module="transformers")
        warnings.filterwarnings("ignore", module="torch")


def _quiet_transformers(no_bars: bool) -> None:
    """transformers logs errors only (and shows no progress bars when ours are off), without
    importing it: commands that never load a model (GGUF export, show, diff of GGUFs) must not pay
    for the import. Its environment switches apply when it is imported later; an already imported
    transformers (the CLI called in-process) is set directly."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if no_bars:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    transformers = sys.modules.get("transformers")
    if transformers is not None:
        transformers.logging.set_verbosity_error()
        if no_bars:
            transformers.logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ns = build_parser(wanted_commands(argv)).parse_args(argv)
    _setup_logging(ns.verbose, ns.quiet)
    _quiet_transformers(not wanted(ns.quiet))
    try:
        from .paths import check_command_line

        check_command_line(ns)
        return COMMANDS[ns.command](ns)
    except CnaError as e:
        report = getattr(e, "report", None)  # a failed export --verify carries its report table
        if report is not None and not ns.quiet:
            print(report.render())
        return _error(str(e), e.exit_code)
    except KeyboardInterrupt:
        print("cna-export: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except MemoryError:
        return _error("out of memory (try a smaller --batch-size or --device-map auto)", ExitCode.OUT_OF_MEMORY)
    except Exception as e:  # a write, network or Hub error is one line; anything else is a bug: its traceback
        line = one_line(e)
        if line is None:
            raise
        import logging

        logging.getLogger("cna_export").debug("traceback of the error below", exc_info=True)
        return _error(line, ExitCode.USER_ERROR)


def _error(message: str, code: int) -> int:
    print(f"cna-export: error: {message}", file=sys.stderr)
    return code
