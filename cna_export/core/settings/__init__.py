"""Settings: one pydantic model per job, feeding CLI flags, YAML recipes and the library API.

Each field's name, type, default and description generate its CLI flag (``top_fraction``
becomes ``--top-fraction``; :func:`~.base.opt` adds what a flag needs beyond that: another name, a
metavar, a negated switch; the generator is ``cna_export.cli.flags``), a recipe may set the same
fields (``core.recipe`` reads and validates recipes), and the library takes the model directly.
Precedence: defaults < recipe < CLI flags. Defaults and constraints are written once, in each
``Field``; an int or float field refuses a bool (``top_k: true`` is not one neuron).

The models, one module per job:

- :mod:`.base`: the machinery (``opt``, ``cli_spec``, ``build``, ``error_text``) and the shared flags
  (:class:`Overwrite`, :class:`Force`, :class:`Multiplier`, :class:`ModelOptions`, :class:`PromptOptions`);
- :mod:`.discover`: discover and generate (:class:`DiscoverOptions`, :class:`GenerateOptions`);
- :mod:`.verify`: verify (:class:`VerifyOptions`, :class:`GGUFVerifyOptions`, :class:`VerifyRunOptions`)
  and the verification defaults (``VERIFY_LIMIT``, the tolerances by dtype);
- :mod:`.export`: export and steer (:class:`ExportOptions`, :class:`GGUFExportOptions`, :class:`HubOptions`,
  :class:`SteerOptions`, ``EXPORT_FORMATS``);
- :mod:`.evaluate`: eval and tune (:class:`EvalSettings`, :class:`EvalJob`, :class:`TuneJob`, ``EVAL_ONLY``);
- :mod:`.audit`: show, diff and audit (:class:`ShowOptions`, :class:`DiffOptions`, :class:`AuditSettings`,
  ``RANK1_SHARE``).

This package imports no torch or transformers, and its ``__init__`` stays cheap: it imports none of the
modules above. Every name is re-exported here, lazily (PEP 562): ``from cna_export.core.settings import
X`` imports the module that defines ``X`` (and :mod:`.base`) on first use, so a command that imports its
own job's module (``from ..core.settings.export import ExportOptions``) builds no other job's models.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_NAMES = {
    "base": ("opt", "cli_spec", "_numeric", "_has_bool", "_Options", "_Switches", "Overwrite", "Force", "Multiplier",
             "ModelOptions", "PromptOptions", "error_text", "build"),
    "discover": ("DiscoverOptions", "GenerateOptions"),
    "verify": ("VERIFY_LIMIT", "VERIFY_MAX_NEW_TOKENS", "FP32_MAX_LOGIT_DELTA", "HALF_MIN_TOP1", "HALF_MAX_KL",
               "VerifyOptions", "GGUFVerifyOptions", "VerifyRunOptions"),
    "export": ("ExportOptions", "EXPORT_FORMATS", "GGUFExportOptions", "HubOptions", "SteerOptions"),
    "evaluate": ("EvalSettings", "EvalJob", "EVAL_ONLY", "TuneJob"),
    "audit": ("RANK1_SHARE", "ShowOptions", "DiffOptions", "AuditSettings"),
}
"""Module -> the names it defines that this package re-exports (the underscore ones: for the tests)."""

_MODULE_OF = {name: module for module, names in _NAMES.items() for name in names}

__all__ = sorted(n for n in _MODULE_OF if not n.startswith("_"))


def __getattr__(name: str) -> Any:
    try:
        module = _MODULE_OF[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE_OF))

