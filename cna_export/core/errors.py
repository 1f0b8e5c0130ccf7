"""User-facing errors and the exit codes of every command.

Anything a user can cause (bad input, a circuit that does not fit, an existing
output) raises :class:`CnaError`; the CLI prints its message on one line and
exits non-zero. Internal bugs are left as ordinary exceptions. Every exit code
the CLI returns is a member of :class:`ExitCode` (``docs/exit-codes.md``).
"""

from enum import IntEnum


class ExitCode(IntEnum):
    """The exit codes of ``cna-export`` (one table: ``docs/exit-codes.md``)."""

    OK = 0
    """Success; ``audit``: no steering edits found, or the ``--manifest`` check passed."""
    OUT_OF_MEMORY = 1
    USER_ERROR = 2
    """Bad input, a missing file, an output that may not be written, a write or network error."""
    VERIFY_FAILED = 3
    """Verification failed; ``audit --manifest``: the checkpoint does not match its manifest."""
    STEERED = 4
    """``audit``: steering edits found."""
    OTHER_CHANGES = 5
    """``audit --base``: the weights differ from the base, but not by a recognised steering edit."""
    NOTHING_FITS = 6
    """``tune``: no configuration met the quality and drift constraints."""
    VERIFY_INCONCLUSIVE = 7
    """GGUF verify: the tensors are proven exact, but the prompts could not decide a behavioural criterion
    (``docs/verify.md``); an export is written, with the reason."""
    INTERRUPTED = 130


class CnaError(Exception):
    """An error caused by the user's input, reported as one line without a traceback."""

    exit_code: int = ExitCode.USER_ERROR


class VerificationFailed(CnaError):
    """Exported weights do not behave like hook steering within tolerance."""

    exit_code = ExitCode.VERIFY_FAILED


NOTHING_FITS = ExitCode.NOTHING_FITS
"""Exit code of ``tune`` when no configuration met the quality and drift constraints."""
