"""Audit a checkpoint: did someone strip the refusals out of it, and how?

``audit(suspect, settings)`` runs in one of three modes:

``manifest`` (``--manifest [FILE]``; the manifest may be embedded: ``cna_manifest.json``
    in a safetensors folder, the ``cna.manifest`` KV or side file of a GGUF)
    The suspect is compared with the model the export was made from (``--base``,
    else the manifest's ``source`` when it resolves on this machine): exactly the
    manifest's neurons must have changed, each by exactly its multiplier within the
    tolerance of the storage format, in the tensors its fold names, and nothing
    else (other tensors, GGUF KV pairs other than ``general.name`` and
    ``cna.manifest``, folder files other than the manifest and the model card). The
    touched tensors' sha256 are checked against the manifest as well.

``base`` (``--base BASE``)
    :func:`cna_export.inspect.diff.diff_sources` against the base, which recovers scaled
    neurons (with multipliers) and rank-1 directional edits; the overlap of the
    recovered neurons with the refusal circuit discovered on the base with the
    bundled recipe (``recipes/refusal.yaml``, or ``--recipe``/``--circuit``); and a
    short behavioural check (refusal rate on a few of the recipe's harmful prompts,
    base vs suspect, greedy, judged by the paper's keyword judge).

``base-free`` (no base)
    Signals readable from the suspect alone: ``down_proj`` columns, ``up_proj`` rows
    and ``gate_proj`` rows with (near-)zero norm (trained models have none: norms
    below ``zero_threshold`` x the layer's median are flagged); a residual direction
    that the residual-writing matrices annihilate (smallest eigenvalue of
    ``sum W W^T`` over ``o_proj`` and ``down_proj``, globally and per layer, far below
    the median eigenvalue); embedded provenance; and the behavioural check.

Exit codes (see ``docs/exit-codes.md``): 0 nothing found (or the manifest check
passed), 3 the manifest check failed, 4 steering edits found, 5 the weights differ
from the base but not by a recognised steering edit.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..core.settings.audit import AuditSettings
from ..io.weights import open_weights
from .diff_report import DiffReport
from .modes import Run, base_free_mode, base_mode, manifest_mode
from .report import AuditReport, Provenance, Suspect
from .verdict import ModeResult, verdict


def audit(suspect: str, settings: AuditSettings | None = None, progress: bool = False) -> AuditReport:
    """Library entry point (see the module docstring)."""
    from .adapter import adapter_kind

    run = Run(suspect, settings or AuditSettings(), progress)
    t0 = time.perf_counter()
    if adapter_kind(suspect):  # a LoRA adapter: no weights of its own to diff (inspect/adapter.py)
        report = _audit_adapter(run)
    else:
        report = _audit_weights(run)
        write_directional_outputs(report, run.settings)
    run.timings["total"] = time.perf_counter() - t0
    return report


def mode_of(s: AuditSettings) -> str:
    return "manifest" if s.manifest else ("base" if s.base else "base-free")


def _audit_weights(run: Run) -> AuditReport:
    """A checkpoint in one of the three modes, then the behavioural check (not with ``--manifest``)."""
    from .manifest_check import provenance

    s = run.settings
    sus = open_weights(run.suspect)
    try:
        prov, embedded = provenance(sus)
        report = _report(run, sus.describe(), prov)
        result: ModeResult
        if report.mode == "manifest":
            result = manifest_mode(sus, run)
        elif report.mode == "base":
            result = base_mode(sus, run)
        else:
            result = base_free_mode(sus, embedded, run)
    finally:
        sus.close()
    if s.generate and report.mode != "manifest":
        from .behaviour import behaviour_check

        t1 = time.perf_counter()
        models = [("base", s.base), ("suspect", run.suspect)] if s.base else [("suspect", run.suspect)]
        report.behaviour = behaviour_check(models, s)
        run.timings["behaviour"] = time.perf_counter() - t1
    _conclude(report, result)
    return report


def _audit_adapter(run: Run) -> AuditReport:
    """A LoRA adapter: its manifest, its changes against ``--base``, or its shape alone."""
    from .adapter import (
        adapter_diff,
        adapter_provenance,
        adapter_shape,
        check_adapter_manifest,
        describe_adapter,
        read_adapter,
    )

    s = run.settings
    ad = read_adapter(run.suspect)
    report = _report(run, describe_adapter(ad), adapter_provenance(ad))
    result: ModeResult
    if s.manifest:
        result = check_adapter_manifest(ad, s, run.notes)
    elif s.base:
        result = adapter_diff(ad, s.base)
    else:
        result = adapter_shape(ad)
    _conclude(report, result)
    return report


def _report(run: Run, description: str, prov: Provenance) -> AuditReport:
    """The report of ``run``, sharing its notes and timings."""
    return AuditReport(suspect=Suspect(run.suspect, description), mode=mode_of(run.settings), provenance=prov,
                       notes=run.notes, timings=run.timings)


def _conclude(report: AuditReport, result: ModeResult) -> None:
    """The mode's result into the report, and the verdict built from it."""
    result.attach(report)
    v = verdict(result, report.behaviour)
    report.verdict, report.exit_code, report.findings = v.text, v.exit_code, v.findings


def write_directional_outputs(report: AuditReport, s: AuditSettings) -> None:
    """``--plot`` (strength profile PNG) and ``--save-direction`` (consensus direction) of a directional edit."""
    lr = report.diff.detected_lowrank() if report.diff is not None else None
    for flag, path in (("--plot", s.plot), ("--save-direction", s.save_direction)):
        if path and lr is None:
            report.notes.append(f"{flag}: no directional edit was found, {path} not written")
    if lr is None:
        return
    from .abliteration import plot_profile, save_direction

    if s.plot:
        plot_profile(s.plot, lr, title=f"{Path(report.suspect.spec).name}: strength along the consensus direction",
                     overwrite=s.overwrite)
    if s.save_direction:
        save_direction(s.save_direction, lr, overwrite=s.overwrite)


def write_recovered_circuit(diff: DiffReport, base_spec: str, out: str | Path, overwrite: bool = False) -> Any:
    """Save the neurons a diff recovered as a ``recovered`` circuit manifest fitted to the base."""
    src = open_weights(base_spec)
    try:
        identity = src.identity(fingerprint=True)
    finally:
        src.close()
    circuit = diff.recovered_circuit(identity, notes=[f"recovered by cna-export diff of {diff.b.spec} against "
                                                      f"{diff.a.spec}"])
    circuit.save(out, overwrite=overwrite)
    return circuit
