"""The paths each command reads and writes, checked against the output policy before any work.

Settings fields declare their role in their annotation (``core.outputs``: :data:`~cna_export.core.outputs.InputFile`,
:data:`~cna_export.core.outputs.OutputPath`, ...); the arguments that are no settings field (``--model``,
``--out``, positional paths) are declared once, in :data:`CLI_PATHS`. Every command that reads or writes
files calls :func:`guard` once with the settings it built; before that, ``cli.main`` checks the
command-line paths (:func:`check_command_line`), which some commands read while they build their settings
(``--recipe``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..core.outputs import (
    INPUT,
    INPUT_FILE,
    OUTPUT,
    OUTPUT_MARKERS,
    PathArg,
    PathRole,
    check_inputs,
    check_outputs,
    declared_paths,
)

CLI_PATHS: dict[str, tuple[str, PathRole]] = {
    "model": ("--model", INPUT),
    "circuit": ("--circuit", INPUT_FILE),
    "recipe": ("--recipe", INPUT_FILE),
    "original": ("--original", INPUT),
    "exported": ("--exported", INPUT),
    "reference": ("--reference", INPUT),
    "a": ("A", INPUT),
    "b": ("B", INPUT),
    "suspect": ("SUSPECT", INPUT),
    "path": ("PATH", INPUT),
    "out": ("--out", OUTPUT),
    "json": ("--json", OUTPUT),
    "out_circuit": ("--out-circuit", OUTPUT),
}
"""Namespace name -> (label in messages, role) of the command-line paths that are no settings field."""

RECIPE_PROMPTS = ("positive", "negative", "neutral")
"""A recipe's own inputs: its prompt files (resolved against the recipe's folder)."""


def cli_paths(ns: argparse.Namespace) -> list[PathArg]:
    """The paths given on the command line that are no settings field (:data:`CLI_PATHS`)."""
    return [PathArg(label, value, role) for dest, (label, role) in CLI_PATHS.items()
            if (value := getattr(ns, dest, None)) is not None]


def check_command_line(ns: argparse.Namespace) -> None:
    """Before any command reads them: an input file given as a folder is named as one, not as missing."""
    check_inputs(cli_paths(ns))


def command_paths(ns: argparse.Namespace, *settings: Any) -> list[PathArg]:
    """Every path of a command: its command-line paths, its settings' declared paths, its recipes' prompts."""
    found = cli_paths(ns)
    for s in settings:
        found += declared_paths(s)
    found += _recipe_prompts(found)
    return [_local(a) for a in dict.fromkeys(found)]


def guard(ns: argparse.Namespace, *settings: Any, overwrite: bool = False, exists_ok: bool = False,
          markers: tuple[str, ...] = OUTPUT_MARKERS) -> None:
    """Refuse the command's outputs where the output policy does (``core.outputs``), and an input file
    given as a folder; ``exists_ok``: an existing output is resumed, not refused, when it carries one of
    ``markers`` (``steer``)."""
    paths = command_paths(ns, *settings)
    check_outputs([a for a in paths if a.role is OUTPUT], [a for a in paths if a.role is not OUTPUT],
                  overwrite, exists_ok=exists_ok, markers=markers)


def _recipe_prompts(found: list[PathArg]) -> list[PathArg]:
    out = []
    for a in found:
        if a.label == "--recipe" and Path(a.value).is_file():
            from ..core.recipe import load_recipe  # here: a command without a recipe does not import it

            settings = load_recipe(a.value)
            out += [PathArg(f"--recipe {a.value}: {key}", settings[key], INPUT_FILE) for key in RECIPE_PROMPTS
                    if isinstance(settings.get(key), str)]
    return out


def _local(a: PathArg) -> PathArg:
    """A ``bundled:NAME`` model as the file it names (other specs are paths or Hub ids)."""
    from ..io import bundled

    if a.role is OUTPUT or not str(a.value).startswith(bundled.PREFIX):
        return a
    return PathArg(a.label, bundled.resolve(str(a.value)), a.role)
