"""Recipes: YAML files of settings, checked by the settings models of :mod:`.settings`.

A recipe's top level (and its ``discover:`` section) holds discovery settings; each job's section
(``export:``, ``steer:``, ``verify:``, ``eval:``, ``tune:``, ``audit:``) holds that job's settings.
A key is a field of one of its section's models (:data:`RECIPE_SECTIONS`), spelled with ``_`` or
``-``; pydantic validates every value with its model, so each ``Field`` constraint and field
validator applies. Precedence when a job runs: defaults < recipe < CLI flags.

Checks that span several fields (a model validator) are left to :func:`.settings.build`, which
sees every layer: a recipe section is one layer, and a flag may complete it.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from .errors import CnaError
from .settings.audit import AuditSettings
from .settings.base import ModelOptions, cli_spec, error_text
from .settings.discover import DiscoverOptions
from .settings.evaluate import EvalJob, EvalSettings, TuneJob
from .settings.export import ExportOptions, GGUFExportOptions, HubOptions, SteerOptions
from .settings.verify import GGUFVerifyOptions, VerifyRunOptions
from .text import read_text

RECIPE_PATH_FIELDS = ("positive", "negative", "neutral")
"""Discovery prompt files, resolved against the recipe's folder."""
RECIPE_META_FIELDS = ("name", "description", "tuned")
"""Top-level keys that describe the recipe (free-form, not settings)."""
RECIPE_SECTIONS: dict[str, tuple[type[BaseModel], ...]] = {
    "discover": (DiscoverOptions, ModelOptions),
    "export": (ExportOptions, GGUFExportOptions, GGUFVerifyOptions, HubOptions),
    "steer": (SteerOptions, HubOptions),
    "verify": (GGUFVerifyOptions, VerifyRunOptions, ModelOptions),
    "eval": (EvalSettings, EvalJob),
    "tune": (TuneJob, EvalSettings, EvalJob),
    "audit": (AuditSettings,),
}
"""Each job's section of a recipe and the models its keys belong to (a key may feed several)."""


def _norm(data: dict) -> dict[str, Any]:
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _keys(cls: type[BaseModel]) -> list[str]:
    """The fields of ``cls`` a recipe may set: those with a flag, and those marked ``recipe=True``."""
    out = []
    for name, f in cls.model_fields.items():
        spec = cli_spec(f)
        if spec.get("recipe", spec.get("cli") is not False):
            out.append(name)  # not: the job's plumbing (model, out, nested settings) or library-only settings
    return out


def _one_line(text: str, limit: int = 80) -> str:
    """``text`` fit for a one-line error: control characters escaped, long values cut."""
    text = str(text).encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_known(where: str, data: dict[str, Any], known: list[str]) -> None:
    for key in data:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise CnaError(f"{where}unknown key '{_one_line(key)}'{hint}")


def _validate(where: str, cls: type[BaseModel], given: dict[str, Any]) -> None:
    """``given`` validated by ``cls`` (its defaults for the rest); one line naming the first bad key."""
    try:
        cls.model_validate(given)
    except ValidationError as e:
        bad = next((err for err in e.errors() if err["loc"] and err["loc"][0] in given), None)
        if bad is not None:  # else only cross-field checks failed: build() judges them over every layer
            key = str(bad["loc"][0])
            raise CnaError(f"{where}{key}: {error_text(bad)} (got {_one_line(repr(given[key]))})") from None
    except CnaError:
        pass  # a model validator's cross-field check: build() judges it over every layer


def _check_section(where: str, data: dict[str, Any], models: tuple[type[BaseModel], ...],
                   extra: tuple[str, ...] = ()) -> None:
    """Every key of ``data`` known to one of ``models`` (or in ``extra``), every value valid for each model
    that has the key."""
    keys = {cls: _keys(cls) for cls in models}
    _check_known(where, {k: v for k, v in data.items() if k not in extra},
                 list(dict.fromkeys(k for ks in keys.values() for k in ks)) + list(extra))
    for cls, ks in keys.items():
        given = {k: v for k, v in data.items() if k in ks}
        if given:
            _validate(where, cls, given)


def _read_yaml(p: Path) -> dict[str, Any]:
    import yaml

    if not p.is_file():
        raise CnaError(f"recipe not found: {p}")
    text = read_text(p, "recipe")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise CnaError(f"recipe {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    except (RecursionError, ValueError, MemoryError) as e:  # deep nesting, integers past Python's digit limit
        why = "nested too deeply" if isinstance(e, RecursionError) else (str(e).splitlines() or [type(e).__name__])[0]
        raise CnaError(f"recipe {p} cannot be read: {why}") from None
    if not isinstance(data, dict):
        raise CnaError(f"recipe {p} must be a mapping of settings")
    return _norm(data)


def read_recipe(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """A recipe's YAML, validated: every key known to its section's settings models, every value of its type."""
    p = Path(path)
    data = _read_yaml(p)
    _check_section(f"recipe {p}: ", data, RECIPE_SECTIONS["discover"], RECIPE_META_FIELDS + tuple(RECIPE_SECTIONS))
    for name, models in RECIPE_SECTIONS.items():
        section = data.get(name)
        if section is None:
            continue
        if not isinstance(section, dict):
            raise CnaError(f"recipe {p}: section '{name}' must be a mapping of settings")
        data[name] = _norm(section)
        _check_section(f"recipe {p}: {name}: ", data[name], models)
    return p, data


def load_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe's discovery settings (top level and its ``discover:`` section), validated; relative
    prompt paths are resolved against the recipe's folder. Unknown keys anywhere are an error."""
    p, data = read_recipe(path)
    out = {k: v for k, v in data.items() if k not in RECIPE_META_FIELDS and k not in RECIPE_SECTIONS}
    out.update(data.get("discover") or {})
    for key in RECIPE_PATH_FIELDS:
        if isinstance(out.get(key), str):
            try:
                out[key] = str((p.parent / out[key]).resolve())
            except (UnicodeEncodeError, ValueError, OSError) as e:  # lone surrogates, NUL bytes, name too long
                raise CnaError(f"recipe {p}: {key}: not a usable path ({_one_line(repr(out[key]))}: "
                               f"{type(e).__name__})") from None
    return out


def recipe_section(path: str | Path | None, job: str) -> dict[str, Any]:
    """The validated ``job:`` section of a recipe ({} without a recipe or section)."""
    if not path:
        return {}
    return dict(read_recipe(path)[1].get(job) or {})
