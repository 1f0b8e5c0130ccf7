"""The three ``audit`` modes on a checkpoint (module docstring of :mod:`cna_export.inspect.audit`), one
function each. Each returns its typed result (:mod:`cna_export.inspect.verdict`), adds its notes to
``run.notes`` and its timings to ``run.timings``; the verdict is built from the result elsewhere."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.errors import CnaError
from ..core.manifest import ExportManifest
from ..core.settings.audit import AuditSettings
from ..io.weights import WeightSource, open_weights
from .diff import diff_sources
from .report import BaseFreeFindings
from .verdict import BaseFreeResult, BaseResult, ManifestResult

if TYPE_CHECKING:
    from .refusal_direction import Depletion
    from .report import CircuitOverlap


@dataclass
class Run:
    """What one audit run shares between its steps: the settings, and the notes and timings it collects."""

    suspect: str
    settings: AuditSettings
    progress: bool = False
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def manifest_mode(sus: WeightSource, run: Run) -> ManifestResult:
    """``--manifest``: the suspect against the base the manifest was made from (``--base``, else its source)."""
    from .manifest_check import check_manifest, expectation, load_manifest, manifest_base

    s = run.settings
    manifest, where = load_manifest(s.manifest or "embedded", sus)
    base_spec = s.base
    if base_spec is None:
        base_spec = manifest_base(manifest)
        run.notes.append(f"base taken from the manifest's source: {base_spec}")
    base = open_weights(base_spec)
    try:
        expect = expectation(manifest, base)
        diff = diff_sources(base, sus, rank1_share=s.rank1_share, expect=expect, progress=run.progress)
        run.timings["diff"] = diff.seconds
        check = check_manifest(manifest, where, sus, base, diff, expect)
    finally:
        base.close()
    return ManifestResult(check=check, multipliers=[m for m in manifest.multiplier_map().values() if m != 1.0],
                          diff=diff)


def base_mode(sus: WeightSource, run: Run) -> BaseResult:
    """``--base``: the diff (scaled neurons, directional edits), the directional edit's cosine with the base's
    refusal direction, and the recovered neurons' overlap with the base's refusal circuit."""
    s = run.settings
    assert s.base is not None
    base = open_weights(s.base)
    try:
        diff = diff_sources(base, sus, rank1_share=s.rank1_share, progress=run.progress, rank_k=s.rank_k)
    finally:
        base.close()
    run.timings["diff"] = diff.seconds
    result = BaseResult(diff)
    lr = diff.detected_lowrank()
    if lr is not None and s.refusal_direction:
        from .abliteration import refusal_cosines
        from .refusal_direction import refusal_directions

        t1 = time.perf_counter()
        rd, source = refusal_directions(s.base, s.recipe, s.directions, s.direction_prompts, s.overwrite,
                                        run.progress)
        lr.refusal = refusal_cosines(lr.direction, rd.directions(), lr.layers, source)
        run.timings["refusal direction"] = time.perf_counter() - t1
    if diff.neurons and s.discover:
        result.overlap = _overlap(diff.neurons, run)
    return result


def _overlap(neurons: dict[tuple[int, ...], float], run: Run) -> CircuitOverlap | None:
    """The base's refusal circuit against the recovered neurons (a note instead, when it cannot be found)."""
    from .refusal_circuit import refusal_overlap

    s = run.settings
    assert s.base is not None
    t1 = time.perf_counter()
    overlap = None
    try:
        overlap = refusal_overlap(s.base, neurons, s, progress=run.progress)
    except CnaError as e:  # the diff stands without the comparison (e.g. a gradient score on MoE)
        if s.circuit or s.stats and Path(s.stats).is_file():
            raise
        run.notes.append(f"base's refusal circuit not compared ({e})")
    run.timings["refusal circuit"] = time.perf_counter() - t1
    return overlap


def base_free_mode(sus: WeightSource, embedded: ExportManifest | None, run: Run) -> BaseFreeResult:
    """No base: zeroed neurons and annihilated directions in the weights, and the depletion scores along the
    suspect's own refusal directions (when they can be measured)."""
    from .scan import scan_base_free

    s = run.settings
    t1 = time.perf_counter()
    scan = scan_base_free(sus, s.zero_threshold, s.direction_threshold, progress=run.progress)
    run.timings["scan"] = time.perf_counter() - t1
    signals = BaseFreeFindings(scan)
    if s.refusal_direction:
        signals.depletion = _depletion(sus, run)
    return BaseFreeResult(signals=signals, embedded=embedded)


def _depletion(sus: WeightSource, run: Run) -> Depletion | None:
    """The depletion scores along the suspect's own refusal directions (a note instead, when they cannot be
    measured: the weights scan stands without them)."""
    from .refusal_direction import depletion_score, refusal_directions

    s = run.settings
    t1 = time.perf_counter()
    dep = None
    try:
        rd, source = refusal_directions(run.suspect, s.recipe, s.directions, s.direction_prompts, s.overwrite,
                                        run.progress)
    except CnaError as e:
        if s.directions and Path(s.directions).is_file():
            raise
        run.notes.append(f"refusal directions not measured ({e}); no depletion score")
    else:
        dep = depletion_score(sus, rd.directions(), threshold=s.depletion_threshold, write_threshold=s.write_threshold)
        dep.source = source
    run.timings["refusal direction"] = time.perf_counter() - t1
    return dep
