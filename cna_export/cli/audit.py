"""Commands diff and audit."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..core.errors import CnaError
from ._registry import PARSERS, command


# -- diff / audit ---------------------------------------------------------------------------


def _check_outputs(ns: argparse.Namespace, inputs: tuple[str | None, ...]) -> None:
    from ..core.atomic import check_output_path
    from ..io.sources import resolve_source

    paths = tuple(p for p in (resolve_source(x).path for x in inputs if x) if p is not None)
    for out in (getattr(ns, "json", None), getattr(ns, "out_circuit", None)):
        if out:
            check_output_path(Path(out), ns.overwrite, paths)


def _write_json(path: str, data: dict, overwrite: bool) -> None:
    import json

    from ..core.atomic import atomic_write_text

    atomic_write_text(Path(path), json.dumps(data, indent=2, default=str) + "\n", overwrite=overwrite)


@command("diff")
def cmd_diff(ns: argparse.Namespace) -> int:
    from ..inspect.audit import write_recovered_circuit
    from ..inspect.diff import diff_checkpoints

    if not 0 < ns.rank1_share <= 1:
        raise CnaError("--rank1-share must be in (0, 1]")
    _check_outputs(ns, (ns.a, ns.b))
    report = diff_checkpoints(ns.a, ns.b, rank1_share=ns.rank1_share, progress=not ns.quiet and sys.stderr.isatty())
    if ns.out_circuit:
        if not report.neurons:
            raise CnaError("no scaled neurons were found, so there is no circuit to write (--out-circuit)")
        write_recovered_circuit(report, ns.a, ns.out_circuit, overwrite=ns.overwrite)
    if ns.json:
        _write_json(ns.json, report.to_dict(), ns.overwrite)
    if not ns.quiet:
        print(report.render(top=ns.top))
        print(f"time         {report.seconds:.1f}s"
              + "".join(f"; wrote {p}" for p in (ns.out_circuit, ns.json) if p))
    return 0


def _diff_parser(sub: Any) -> None:
    p = sub.add_parser("diff", help="compare two checkpoints tensor by tensor; recover scaled neurons and directional edits")
    p.add_argument("a", help="the reference: HF safetensors folder, .gguf file or bundled:NAME")
    p.add_argument("b", help="the checkpoint to compare with it (any of the same kinds)")
    p.add_argument("--out-circuit", metavar="FILE", help="write the recovered neurons as a circuit manifest (kind recovered)")
    p.add_argument("--json", metavar="FILE", help="write the full comparison as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--top", type=int, default=20, help="list this many changed tensors (default: 20)")
    p.add_argument("--rank1-share", type=float, default=0.95,
                   help="top singular value's share of a change's energy that makes it a rank-1 edit (default: 0.95)")


@command("audit")
def cmd_audit(ns: argparse.Namespace) -> int:
    from ..inspect.audit import AuditSettings, audit, write_recovered_circuit

    if ns.out_circuit and not (ns.base or ns.manifest):
        raise CnaError("--out-circuit needs --base (or --manifest): recovered neurons come from a comparison")
    _check_outputs(ns, (ns.suspect, ns.base))
    settings = AuditSettings(
        base=ns.base, manifest=ns.manifest, recipe=ns.recipe, circuit=ns.circuit, stats=ns.stats,
        overwrite=ns.overwrite, discover=not ns.no_discover,
        generate=not ns.no_generate, prompts=ns.prompts, max_new_tokens=ns.max_new_tokens, backend=ns.backend,
        threads=ns.threads, batch_size=ns.batch_size, zero_threshold=ns.zero_threshold,
        direction_threshold=ns.direction_threshold, rank1_share=ns.rank1_share,
    )
    report = audit(ns.suspect, settings, progress=not ns.quiet and sys.stderr.isatty())
    if ns.out_circuit:
        if report.diff is None or not report.diff.neurons:
            raise CnaError("no scaled neurons were found, so there is no circuit to write (--out-circuit)")
        write_recovered_circuit(report.diff, report.diff.a["spec"], ns.out_circuit, overwrite=ns.overwrite)
    if ns.json:
        _write_json(ns.json, report.to_dict(), ns.overwrite)
    if ns.quiet:
        print(report.verdict)
    else:
        print(report.render())
    return report.exit_code


def _audit_parser(sub: Any) -> None:
    p = sub.add_parser("audit", help="was this checkpoint steered? check a manifest, diff against a base, or scan alone",
                       description="Exit codes: 0 nothing found / manifest check passed, 2 bad input, "
                                   "3 manifest check failed, 4 steering edits found, 5 weights differ without steering structure.")
    p.add_argument("suspect", help="HF safetensors folder, .gguf file or bundled:NAME")
    p.add_argument("--base", help="the model the suspect may have been made from (diff, refusal-circuit overlap, behaviour)")
    p.add_argument("--manifest", nargs="?", const="embedded", metavar="FILE",
                   help="check that exactly this export manifest's edits were made (no FILE: the embedded one)")
    p.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    p.add_argument("--out-circuit", metavar="FILE", help="write the recovered neurons as a circuit manifest")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--recipe", help="discovery recipe for the base's refusal circuit and the harmful prompts "
                   "(default: the bundled recipes/refusal.yaml)")
    p.add_argument("--circuit", help="the base's refusal circuit, already discovered (skips discovery)")
    p.add_argument("--stats", metavar="FILE",
                   help="the base's discovery statistics: read when FILE exists (checked against the base's weights and "
                   "the recipe), else computed and saved there, so later audits against the same base skip discovery")
    p.add_argument("--no-discover", action="store_true", help="skip the refusal-circuit overlap")
    p.add_argument("--no-generate", action="store_true", help="skip the behavioural check")
    p.add_argument("--prompts", type=int, default=8, help="harmful prompts for the behavioural check (default: 8)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="greedy tokens per answer (default: 40)")
    p.add_argument("--backend", default="auto", choices=["auto", "transformers", "llama.cpp"],
                   help="generation backend (auto: llama.cpp for GGUF files when installed)")
    p.add_argument("--threads", type=int, help="CPU threads for generation")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch (default: 8)")
    p.add_argument("--zero-threshold", type=float, default=1e-3,
                   help="base-free: flag weights with norm below this x the layer median (default: 1e-3)")
    p.add_argument("--direction-threshold", type=float, default=1e-3,
                   help="base-free: flag a residual direction whose eigenvalue is below this x the median (default: 1e-3)")
    p.add_argument("--rank1-share", type=float, default=0.95, help="as for diff (default: 0.95)")


PARSERS += [_diff_parser, _audit_parser]
