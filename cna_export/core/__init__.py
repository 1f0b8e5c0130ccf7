"""Core records and rules, the lowest stage: it imports nothing else of the package.

Owns the error type and exit codes (``errors``), the typed, versioned records (``circuit``:
circuits and model identities; ``manifest``: export manifests), the architecture table
(``architectures`` + ``data/architectures.json``), every job's settings model (``settings``;
the CLI flags are generated from them in ``cli.flags``), recipe reading and validation
(``recipe``), the model fingerprint (``fingerprint``), atomic output writing
(``atomic``), log-probability arithmetic (``numerics``), progress bars (``progress``) and the
package version.
"""
