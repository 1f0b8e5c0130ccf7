"""Shared rules for the versioned JSON records (circuits, export manifests): schema check, validation."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from .errors import CnaError

R = TypeVar("R", bound=BaseModel)


def validate_record(cls: type[R], data: dict[str, Any], source: str, kind: str, version: int,
                    readable: tuple[int, ...] = ()) -> R:
    """``data`` as a ``cls`` record of schema ``version`` (or an older one in ``readable``); one-line errors
    naming ``source`` and the bad field."""
    found = data.get("schema_version")
    if found != version and (type(found) is not int or found not in readable):
        versions = " or ".join(str(v) for v in sorted({*readable, version}))
        raise CnaError(f"{source} has {kind} schema version {found!r}; this cna-export reads version {versions}")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise CnaError(f"{source} is not a valid {kind} manifest: {where}: {first['msg']}") from None
