"""User-facing errors.

Anything a user can cause (bad input, a circuit that does not fit, an existing
output) raises :class:`CnaError`; the CLI prints its message on one line and
exits non-zero. Internal bugs are left as ordinary exceptions.
"""


class CnaError(Exception):
    """An error caused by the user's input, reported as one line without a traceback."""

    exit_code = 2


class VerificationFailed(CnaError):
    """Exported weights do not behave like hook steering within tolerance."""

    exit_code = 3


NOTHING_FITS = 6
"""Exit code of ``tune`` when no configuration met the quality and drift constraints."""
