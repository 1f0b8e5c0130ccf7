"""The prompts a verification runs: the user's files, or the bundled refusal recipe's harmful and benign sets."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from ..core.errors import CnaError

DEFAULT_PROMPT_FILES = ("prompts/refusal-harmful.txt", "prompts/refusal-benign.txt")


from ..core.settings.verify import VERIFY_LIMIT as DEFAULT_LIMIT  # noqa: E402  (the default, written once)


def recipes_dir() -> Path:
    """The bundled recipes: packaged inside the wheel (cna_export/recipes) or beside the source tree."""
    packaged = resources.files("cna_export").joinpath("recipes")
    if packaged.is_dir():
        return Path(str(packaged))
    repo = Path(__file__).resolve().parents[2] / "recipes"
    if repo.is_dir():
        return repo
    raise CnaError("the bundled recipes are missing; pass --prompts FILE")


def verification_prompts(
    files: Sequence[str | Path] | None = None,
    limit: int | None = DEFAULT_LIMIT,
    field: str | None = None,
    column: str | None = None,
) -> tuple[list[str], dict[str, Any]]:
    """Prompts from ``files`` (default: the refusal recipe's harmful and benign sets), taken round-robin
    across files so each set is represented, capped at ``limit``; plus their provenance."""
    from ..model.prompts import load_prompts

    paths = [Path(f) for f in files] if files else [recipes_dir() / f for f in DEFAULT_PROMPT_FILES]
    sets = [load_prompts(p, field=field, column=column) for p in paths]
    out: list[str] = []
    depth = max(len(s.texts) for s in sets)
    for i in range(depth):
        for s in sets:
            if i < len(s.texts):
                out.append(s.texts[i])
    if limit is not None:
        out = out[:limit]
    info = {"prompt_files": {s.path: s.sha256 for s in sets}, "prompts_used": len(out)}
    return out, info
