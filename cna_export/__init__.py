"""cna-export: discover Contrastive Neuron Attribution circuits, fold them into weights, export, verify, audit.

The library entry points are importable from here; they load lazily, so ``import cna_export``
stays cheap (no torch until a function that needs it runs)::

    from cna_export import Circuit, discover, export_gguf, verify, audit

Stages, lowest first (a module imports only its own stage and lower ones; tests/test_layering.py):
``core`` < ``io`` < ``model`` < ``discover`` < ``export`` < ``verify`` < ``evaluate`` <
``inspect`` < ``pipeline`` < this package < ``cli``.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .core.version import __version__

# public name -> (module, attribute)
_API = {
    "CnaError": ("cna_export.core.errors", "CnaError"),
    "Circuit": ("cna_export.core.circuit", "Circuit"),
    "ExportManifest": ("cna_export.core.manifest", "ExportManifest"),
    "DiscoverOptions": ("cna_export.core.settings.discover", "DiscoverOptions"),
    "load_model": ("cna_export.model.loading", "load_model"),
    "load_prompts": ("cna_export.model.prompts", "load_prompts"),
    "discover": ("cna_export.discovery.cna", "discover"),
    "export_safetensors": ("cna_export.export.safetensors", "export_safetensors"),
    "export_gguf": ("cna_export.export.gguf", "export_gguf"),
    "verify": ("cna_export.pipeline", "verify"),
    "verify_export": ("cna_export.verification.safetensors", "verify_export"),
    "verify_gguf": ("cna_export.verification.gguf", "verify_gguf"),
    "diff": ("cna_export.inspect.diff", "diff_checkpoints"),
    "audit": ("cna_export.inspect.audit", "audit"),
    "evaluate": ("cna_export.evaluation.jobs", "run_eval_job"),
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    try:
        module, attr = _API[name]
    except KeyError:
        raise AttributeError(f"module 'cna_export' has no attribute {name!r}") from None
    value = getattr(import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
