"""The output policy: which paths a command may write, and what it must never replace.

Every command that writes (``export`` in every format, ``steer``, ``discover``, ``verify --json``,
``diff``/``audit --json``/``--out-circuit``/``--plot``/``--save-direction``, ``eval``, ``tune``)
checks its outputs here against every input it reads, before any work (:func:`check_outputs`),
and each writer checks its output again when it writes (:func:`check_output`, through
``core.atomic.check_output_path``). An output is refused when:

* its path is empty or blank, ``.``, ``..``, the working folder or a folder above it;
* it is an input, lies inside an input folder, or contains an input (symlinks resolved);
* it exists and is neither a regular file nor a folder (a device, a FIFO, a socket);
* it is an existing, non-empty folder that this tool did not write (:func:`is_our_output`): refused
  even with ``--overwrite``, naming what the folder holds;
* it exists and ``overwrite`` is off: the message suggests ``--overwrite`` (only reached where
  replacing is safe: a regular file, an empty folder, or a previous output of this tool);
* a file sits where one of its parent folders should be. A missing parent folder is created when the
  output is written.

Which settings are paths is declared as data: a settings field carries :data:`INPUT`,
:data:`INPUT_FILE` or :data:`OUTPUT` in its annotation (``Annotated[str | None, INPUT_FILE]``, spelt
:data:`InputFile`), and :func:`declared_paths` reads them back.
"""

from __future__ import annotations

import itertools
import json
import os
import stat
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Iterable, Sequence

from .errors import CnaError


class PathRole(Enum):
    """What a path setting is to its command."""

    INPUT = "input"
    """read: a file or a folder (a model, an exported checkpoint)"""
    INPUT_FILE = "input file"
    """read, and must be a file (a circuit, a recipe, a prompt file)"""
    OUTPUT = "output"
    """written"""


INPUT = PathRole.INPUT
INPUT_FILE = PathRole.INPUT_FILE
OUTPUT = PathRole.OUTPUT

InputPath = Annotated[str | None, INPUT]
"""An optional setting naming a file or folder the command reads."""
InputFile = Annotated[str | None, INPUT_FILE]
"""An optional setting naming a file the command reads."""
InputFiles = Annotated[list[str] | None, INPUT_FILE]
"""An optional list of files the command reads."""
OutputPath = Annotated[str | None, OUTPUT]
"""An optional setting naming a file the command writes."""

OUTPUT_MARKERS = ("cna_manifest.json", "steer.json", "summary.json", "tune/summary.json")
"""Files that mark a folder as a previous output of this tool: an export's manifest (safetensors, PEFT
LoRA; ``core.manifest.MANIFEST_FILE``), a steer folder's state (``steer.STATE_FILE``), an ``eval``
report, a ``tune`` report. Each is JSON whose ``tool`` starts with ``cna-export``."""

_MARKER_MAX_BYTES = 64 << 20
_SHOWN_ENTRIES = 4
_COUNTED_ENTRIES = 1000


@dataclass(frozen=True)
class PathArg:
    """One path a command reads or writes: ``label`` names it in messages (``--circuit``)."""

    label: str
    value: str | Path
    role: PathRole = INPUT

    @property
    def path(self) -> Path:
        return Path(os.path.expanduser(str(self.value))) if self.role is not OUTPUT else Path(self.value)


def declared_paths(settings: Any) -> list[PathArg]:
    """The paths a settings model (and the models nested in it) declares, with their values set."""
    found: list[PathArg] = []
    for name, f in type(settings).model_fields.items():
        value = getattr(settings, name)
        if hasattr(type(value), "model_fields"):
            found += declared_paths(value)
            continue
        role = next((m for m in f.metadata if isinstance(m, PathRole)), None)
        if role is None or value is None or value == _flag_const(f):
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            found.append(PathArg("--" + name.replace("_", "-"), v, role))
    return found


def _flag_const(f: Any) -> Any:
    """The value a flag stores when given bare (``--manifest`` alone: "embedded"), which names no path."""
    extra = f.json_schema_extra
    return extra.get("cli", {}).get("const") if isinstance(extra, dict) else None


def _resolve(p: Path, label: str) -> Path:
    try:
        return p.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise CnaError(f"{label} {p} cannot be resolved: {getattr(e, 'strerror', None) or e}") from None


def check_inputs(inputs: Iterable[PathArg]) -> None:
    """An input that must be a file but is a folder is named as a folder (not as missing)."""
    for a in inputs:
        if a.role is INPUT_FILE and a.path.is_dir():
            raise CnaError(f"{a.label} {a.value} is a folder; expected a file")


def _existing(inputs: Iterable[PathArg]) -> list[tuple[PathArg, Path]]:
    """The inputs that exist, resolved (one that does not exist cannot be harmed)."""
    out = []
    for a in inputs:
        if a.role is not OUTPUT and str(a.value).strip() and os.path.lexists(a.path):
            out.append((a, _resolve(a.path, a.label)))
    return out


def check_outputs(outputs: Sequence[PathArg], inputs: Sequence[PathArg], overwrite: bool,
                  exists_ok: bool = False, markers: tuple[str, ...] = OUTPUT_MARKERS) -> None:
    """Refuse any output the policy forbids (module docstring), before a command does any work.

    ``exists_ok``: an existing output is no error by itself (``steer`` resumes in its folder); the
    other checks still apply. ``markers``: the files that make an existing folder this command's own
    (``steer``: only a steer folder)."""
    check_inputs(inputs)
    outs = [o for o in dict.fromkeys(outputs) if o.value is not None]
    resolved: list[tuple[PathArg, Path]] = []
    for o in outs:
        if not str(o.value).strip():
            raise CnaError(f"{o.label} is empty or blank; name the output file or folder")
        r = check_output(Path(o.value), overwrite, (), label=o.label, exists_ok=exists_ok, inputs_named=inputs,
                         markers=markers)
        resolved.append((o, r))
    for (a, ra), (b, rb) in itertools.combinations(resolved, 2):
        if ra == rb or ra in rb.parents or rb in ra.parents:
            raise CnaError(f"{a.label} {a.value} and {b.label} {b.value} overlap; give each output its own path")


def check_output(out: Path, overwrite: bool, inputs: Sequence[Path] = (), *, label: str = "output",
                 exists_ok: bool = False, inputs_named: Sequence[PathArg] = (),
                 markers: tuple[str, ...] = OUTPUT_MARKERS) -> Path:
    """Check one output against the policy; returns it resolved. ``inputs``: bare input paths
    (named "the input"); ``inputs_named``: inputs with the flag that gave them; ``exists_ok`` and
    ``markers``: as for :func:`check_outputs`."""
    text, name = str(out), Path(out).name
    if not text.strip() or (name and not name.strip()):
        raise CnaError(f"{label} path {text!r} is empty or blank; name the output file or folder")
    resolved = _resolve(Path(out), label)
    _check_working_folder(out, resolved, label)
    named = [*inputs_named, *(PathArg("input", p) for p in inputs)]
    for a, src in _existing(named):
        _check_overlap(out, resolved, a, src, label)
    if os.path.lexists(resolved):
        _check_existing(out, resolved, overwrite, label, exists_ok, markers)
    _check_parents(out, resolved, label)
    return resolved


def _check_working_folder(out: Path, resolved: Path, label: str) -> None:
    cwd = Path.cwd().resolve()
    if resolved == cwd:
        raise CnaError(f"{label} {out} is the working folder; name a new file or folder inside it")
    if resolved in cwd.parents:
        raise CnaError(f"{label} {out} contains the working folder; name a new file or folder")


def _check_overlap(out: Path, resolved: Path, a: PathArg, src: Path, label: str) -> None:
    given = f" ({a.label} {a.value})" if a.label != "input" else ""
    if resolved == src or _same_file(resolved, src):
        raise CnaError(f"{label} {out} is the input itself{given}; choose another output path")
    if src in resolved.parents and src.is_dir():
        raise CnaError(f"{label} {out} is inside the input {src}{given}; choose a path outside it")
    if resolved in src.parents:
        raise CnaError(f"{label} {out} contains the input {src}{given}; choose another output path")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _kind(mode: int) -> str | None:
    """What a non-regular, non-folder entry is (None for a file or folder)."""
    for test, name in ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return None if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else "special file"


def _check_existing(out: Path, resolved: Path, overwrite: bool, label: str, exists_ok: bool,
                    markers: tuple[str, ...]) -> None:
    try:
        mode = os.stat(resolved).st_mode
    except OSError:  # a dangling symlink: replacing it loses nothing
        mode = stat.S_IFREG
    kind = _kind(mode)
    if kind is not None:
        raise CnaError(f"{label} {out} is a {kind}, not a regular file or folder; outputs only replace regular "
                       "files and folders")
    if stat.S_ISDIR(mode) and not is_our_output(resolved, markers):
        entries = folder_entries(resolved)
        if entries and markers == OUTPUT_MARKERS:
            raise CnaError(f"{label} {out} already exists and is a folder that cna-export did not write (it holds "
                           f"{entries}); refusing to replace it: choose a new path")
        if entries:  # one kind of folder only (steer's own): named after its marker
            kind = " or ".join(Path(m).stem for m in markers)
            raise CnaError(f"{label} {out} already exists and is not a {kind} folder (no {' or '.join(markers)}; "
                           f"it holds {entries}): choose a new path")
    if not overwrite and not exists_ok:
        raise CnaError(f"{label} {out} already exists; pass --overwrite to replace it")


def _check_parents(out: Path, resolved: Path, label: str) -> None:
    """A missing parent is created when the output is written; a file in its place is an error."""
    for parent in resolved.parents:
        if parent.is_dir():
            return
        if os.path.lexists(parent):
            raise CnaError(f"cannot write {label} {out}: {parent} is a file, not a folder")


def folder_entries(folder: Path) -> str:
    """The first few entries of ``folder``, for a message ('' when it is empty)."""
    try:
        with os.scandir(folder) as it:
            names = sorted(e.name + ("/" if e.is_dir(follow_symlinks=False) else "")
                           for e in itertools.islice(it, _COUNTED_ENTRIES))
    except OSError as e:
        return f"entries that cannot be listed: {e.strerror}"
    if not names:
        return ""
    more = len(names) - _SHOWN_ENTRIES
    shown = ", ".join(names[:_SHOWN_ENTRIES])
    if more <= 0:
        return shown
    return f"{shown} and {more}{'+' if len(names) == _COUNTED_ENTRIES else ''} more"


def is_our_output(folder: Path, markers: tuple[str, ...] = OUTPUT_MARKERS) -> bool:
    """True when ``folder`` carries one of ``markers`` (a JSON file whose ``tool`` is this tool's)."""
    for name in markers:
        marker = folder / name
        try:
            if not marker.is_file() or marker.stat().st_size > _MARKER_MAX_BYTES:
                continue
            data = json.loads(marker.read_bytes())
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(data, dict) and str(data.get("tool", "")).startswith("cna-export"):
            return True
    return False
