"""What ``audit`` reports: typed records for each part of the report, and :class:`AuditReport`.

Every part is a dataclass; ``AuditReport.to_dict`` (the ``audit --json`` file) writes them with the
field names and values the report always had (``docs/audit.md``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..core.errors import ExitCode
from .abliteration import layer_ranges

if TYPE_CHECKING:
    from .diff_report import DiffReport
    from .refusal_direction import Depletion
    from .scan import BaseFreeScan


@dataclass
class Suspect:
    spec: str
    description: str


@dataclass
class ManifestSummary:
    """What an embedded export manifest says (provenance)."""

    where: str
    tool_version: str
    format: str
    source: str
    fold: str
    neurons: int
    multipliers: str


@dataclass
class Provenance:
    """What the checkpoint says about itself. ``marks`` is None for a LoRA adapter (none are looked for)."""

    marks: list[str] | None = field(default_factory=list)
    manifest_error: str | None = None
    manifest: ManifestSummary | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class ManifestCheck:
    """``--manifest``: did exactly the manifest's edits happen?"""

    where: str
    passed: bool
    expected_neurons: int
    recovered_neurons: int
    fold: str
    problems: list[str]
    notes: list[str]


@dataclass
class Ranks:
    """Ranks (1 = strongest) of the recovered neurons in the base's refusal ranking."""

    median: int | None
    best: int | None
    worst: int | None
    of: int


@dataclass
class CircuitOverlap:
    """How many of the base's refusal-circuit neurons the suspect steers."""

    source: str
    circuit_size: int
    steered: int
    ablated: int
    recovered: int
    same_size_overlap: int | None
    ranks: Ranks | None
    refusal_share: float
    is_refusal_circuit: bool
    summary: str


@dataclass
class Answer:
    text: str
    refused: bool
    evidence: str | None


@dataclass
class ModelBehaviour:
    """One model's answers to the harmful prompts."""

    spec: str
    backend: str
    refused: int
    n: int
    refusal_rate: float
    answers: list[Answer]
    seconds: float


@dataclass
class Behaviour:
    """The behavioural check: refusal rate of each model (label -> answers) on a few harmful prompts."""

    prompts_from: str
    prompts: list[str]
    max_new_tokens: int
    judge: str
    models: dict[str, ModelBehaviour]
    summary: str = ""

    def rates(self) -> str:
        """``5/8 -> 1/8``: refusals per model, in order."""
        return " -> ".join(f"{m.refused}/{m.n}" for m in self.models.values())


@dataclass
class BaseFreeFindings:
    """The base-free signals: the weights scan and, when measured, the depletion scores."""

    scan: BaseFreeScan
    depletion: Depletion | None = None

    def to_dict(self) -> dict:
        out = asdict(self.scan)
        if self.depletion is not None:
            out["depletion"] = asdict(self.depletion)
        return out


@dataclass
class AuditReport:
    suspect: Suspect
    mode: str  # manifest | base | base-free
    verdict: str = ""
    exit_code: ExitCode = ExitCode.OK
    findings: list[str] = field(default_factory=list)
    provenance: Provenance = field(default_factory=Provenance)
    diff: DiffReport | None = None
    manifest_check: ManifestCheck | None = None
    circuit_overlap: CircuitOverlap | None = None
    behaviour: Behaviour | None = None
    base_free: BaseFreeFindings | None = None
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "suspect": asdict(self.suspect),
            "mode": self.mode,
            "verdict": self.verdict,
            "exit_code": int(self.exit_code),
            "findings": self.findings,
            "provenance": self.provenance.to_dict(),
            "diff": self.diff.to_dict() if self.diff is not None else None,
            "manifest_check": _dump(self.manifest_check),
            "circuit_overlap": _dump(self.circuit_overlap),
            "behaviour": _dump(self.behaviour),
            "base_free": self.base_free.to_dict() if self.base_free is not None else None,
            "timings": {k: round(v, 2) for k, v in self.timings.items()},
            "notes": self.notes,
        }

    def render(self) -> str:
        lines = [f"suspect      {self.suspect.description}", f"mode         {self.mode}"]
        lines += _provenance_lines(self.provenance)
        if self.diff is not None:
            lines += _diff_lines(self.diff)
        if self.manifest_check is not None:
            lines += _manifest_lines(self.manifest_check)
        if self.circuit_overlap is not None:
            lines.append(f"refusal      {self.circuit_overlap.summary}")
        if self.base_free is not None:
            lines += _base_free_lines(self.base_free)
        if self.behaviour is not None:
            lines.append(f"behaviour    {self.behaviour.summary}")
        lines += [f"note         {note}" for note in self.notes]
        if self.timings:
            lines.append("time         " + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items()))
        lines.append(f"verdict      {self.verdict}")
        return "\n".join(lines)


def _dump(record: Any) -> dict | None:
    return asdict(record) if record is not None else None


def _provenance_lines(p: Provenance) -> list[str]:
    lines = []
    if p.manifest is not None:
        m = p.manifest
        lines.append(f"provenance   {m.where}: cna-export {m.tool_version} {m.format} export of {m.source}, "
                     f"{m.neurons} neurons, {m.multipliers}")
    elif p.manifest_error:
        lines.append(f"provenance   unreadable manifest: {p.manifest_error}")
    return lines + [f"provenance   {mark}" for mark in p.marks or []]


def _diff_lines(diff: DiffReport) -> list[str]:
    lines = ["-- diff against " + diff.a.description]
    lines += ["  " + x for x in diff.render(top=10).splitlines()[2:]]
    lr = diff.lowrank
    if lr is None or not lr.detected:
        return lines
    lines.append(f"-- directional edit along one residual direction ({lr.kind}; per writer along the consensus "
                 "direction: strength = share of the projection removed, corr = projection correlation, rho/z = "
                 "concentration over noise, cos = own direction vs consensus)")
    lines += ["  " + x for x in lr.table().splitlines()]
    rc = lr.refusal
    if rc is not None:
        mean = rc.edited_layers_mean_cos if rc.edited_layers_mean_cos is not None else float("nan")
        lines.append(f"refusal dir  |cos| with the base's refusal direction: best {rc.best_cos:.3f} "
                     f"(layer {rc.best_layer}), mean over the edited layers {mean:.3f} ({rc.source})")
    return lines


def _manifest_lines(mc: ManifestCheck) -> list[str]:
    lines = [f"manifest     {mc.where}: {mc.expected_neurons} neurons expected, {'passed' if mc.passed else 'FAILED'}"]
    lines += [f"  problem    {prob}" for prob in mc.problems[:10]]
    if len(mc.problems) > 10:
        lines.append(f"  problem    ... {len(mc.problems) - 10} more")
    return lines + [f"  note       {note}" for note in mc.notes]


def _base_free_lines(bf: BaseFreeFindings) -> list[str]:
    scan = bf.scan
    g = scan.direction
    lines = [
        f"zero norms   {scan.zeroed_total} neurons with (near-)zero weights"
        + (f" in layers {layer_ranges(scan.zeroed_layers)}" if scan.zeroed_layers else "")
        + f" (threshold {scan.zero_threshold:g} x layer median)",
        f"direction    smallest/median eigenvalue of sum W W^T: {g.ratio:.3e} (all writers), per layer min "
        f"{g.layer_ratio_min:.3e}; flagged layers: {layer_ranges(g.flagged_layers) or 'none'} "
        f"(threshold {scan.direction_threshold:g})",
    ]
    iso = scan.isolated
    if iso is not None:
        lines.append(
            f"gap          layers {iso.window[0]}-{iso.window[1]} ({iso.writers}): smallest / second eigenvalue of the "
            f"writers' Gram, rounding noise debiased, {iso.score:.3f} (threshold {iso.threshold:.3f} for their storage "
            f"types, from clean files); {iso.flagged_windows} of {len(iso.windows)} windows below their threshold"
            + (f"; types never calibrated: {', '.join(iso.uncalibrated)}" if iso.uncalibrated else ""))
    dep = bf.depletion
    if dep is None:
        return lines
    noise = ("rounding noise debiased" if dep.debiased else
             f"no rounding-noise model for {', '.join(dep.not_debiased) or 'its types'}")
    wr = dep.write
    return lines + [
        f"depletion    layers {dep.window[0]}-{dep.window[1]} ({dep.writers}): smallest/median eigenvalue of the "
        f"summed Gram {dep.score:.3f} ({noise}), its direction |cos| {dep.alignment:.2f} with the suspect's own "
        f"refusal direction of layer {dep.direction_layer} ({dep.source}; reported, not used by the verdict)",
        f"refusal write layers {wr.window[0]}-{wr.window[1]} ({wr.writers}): the suspect's own refusal direction "
        f"written at {wr.score:.2f} x a typical direction's energy (reported, not used by the verdict)",
    ]
