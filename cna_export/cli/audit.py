"""Commands diff and audit."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..core.errors import CnaError
from ..core.progress import wanted
from ..core.recipe import recipe_section
from ..core.settings.audit import AuditSettings, DiffOptions
from .flags import add_flags, settings_of
from .paths import guard


def _write(ns: argparse.Namespace, diff: Any, base: str, data: dict, overwrite: bool) -> None:
    """Write ``--out-circuit`` (the neurons ``diff`` recovered) and ``--json`` (``data``)."""
    import json

    from ..core.atomic import atomic_write_text
    from ..inspect.audit import write_recovered_circuit

    if ns.out_circuit:
        if diff is None or not diff.neurons:
            raise CnaError("no scaled neurons were found, so there is no circuit to write (--out-circuit)")
        write_recovered_circuit(diff, base, ns.out_circuit, overwrite=overwrite)
    if ns.json:
        atomic_write_text(Path(ns.json), json.dumps(data, indent=2, default=str) + "\n", overwrite=overwrite)


def cmd_diff(ns: argparse.Namespace) -> int:
    from ..inspect.diff import diff_checkpoints

    opts: DiffOptions = settings_of(ns, DiffOptions)
    if not 0 < opts.rank1_share <= 1:
        raise CnaError("--rank1-share must be in (0, 1]")
    guard(ns, opts, overwrite=opts.overwrite)
    report = diff_checkpoints(ns.a, ns.b, rank1_share=opts.rank1_share, progress=wanted(ns.quiet), rank_k=opts.rank_k)
    _write(ns, report, ns.a, report.to_dict() if ns.json else {}, opts.overwrite)
    if not ns.quiet:
        print(report.render(top=opts.top))
        print(f"time         {report.seconds:.1f}s" + "".join(f"; wrote {p}" for p in (ns.out_circuit, ns.json) if p))
    return 0


def cmd_audit(ns: argparse.Namespace) -> int:
    from ..inspect.audit import audit

    s: AuditSettings = settings_of(ns, AuditSettings, recipe_section(getattr(ns, "recipe", None), "audit"))
    if ns.out_circuit and not (s.base or s.manifest):
        raise CnaError("--out-circuit needs --base (or --manifest): recovered neurons come from a comparison")
    guard(ns, s, overwrite=s.overwrite)
    report = audit(ns.suspect, s, progress=wanted(ns.quiet))
    diff = report.diff
    _write(ns, diff, diff.a.spec if diff is not None else "", report.to_dict() if ns.json else {}, s.overwrite)
    print(report.verdict if ns.quiet else report.render())
    return report.exit_code


def _outputs(p: argparse.ArgumentParser, circuit_help: str) -> None:
    p.add_argument("--out-circuit", metavar="FILE", help=circuit_help)
    p.add_argument("--json", metavar="FILE", help="write the full report as JSON")


def add_diff_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", help="the reference: HF safetensors folder, .gguf file or bundled:NAME")
    p.add_argument("b", help="the checkpoint to compare with it (any of the same kinds)")
    _outputs(p, "write the recovered neurons as a circuit manifest (kind recovered)")
    add_flags(p, DiffOptions)


def add_audit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("suspect", help="HF safetensors folder, .gguf file, bundled:NAME, or a LoRA adapter (PEFT folder or "
                   "LoRA GGUF)")
    _outputs(p, "write the recovered neurons as a circuit manifest")
    add_flags(p, AuditSettings)
