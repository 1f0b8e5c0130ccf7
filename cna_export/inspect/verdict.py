"""The typed result of each ``audit`` mode, and the verdict (text, exit code, findings) built from it.

Every verdict sentence ``audit`` prints is written here, from the records the modes return
(:mod:`cna_export.inspect.modes`, :mod:`cna_export.inspect.adapter`):

* :class:`ManifestResult`: ``--manifest`` (a checkpoint or an adapter);
* :class:`BaseResult`: ``--base`` (the diff and the refusal-circuit overlap);
* :class:`BaseFreeResult`: no base (the weights scan, the depletion scores, the embedded manifest);
* :class:`AdapterDiff` / :class:`AdapterShape`: an adapter with or without a base.

Base-free signals of a directional ablation are the functions in :data:`ABLATION_SIGNALS`: each reads
the :class:`BaseFreeResult` and returns its finding (or None). A new signal is a record measured in
``modes.base_free_mode``, kept on :class:`BaseFreeResult`, and one function added there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import singledispatch
from typing import TYPE_CHECKING, Callable

from ..core.errors import ExitCode
from ..core.multipliers import describe_multipliers
from .abliteration import layer_ranges
from .diff_report import STEERING_KINDS, CnaFinding, neuron_summary
from .report import AuditReport, BaseFreeFindings, Behaviour, CircuitOverlap, ManifestCheck

if TYPE_CHECKING:
    from ..core.manifest import ExportManifest
    from .diff_report import DiffReport


@dataclass
class Verdict:
    text: str
    exit_code: ExitCode
    findings: list[str] = field(default_factory=list)


# -- the modes' results -------------------------------------------------------------------------------------


@dataclass
class ManifestResult:
    """``--manifest``: the check, the manifest's multipliers other than 1, and the diff it was made from."""

    check: ManifestCheck
    multipliers: list[float]
    adapter: bool = False  # a LoRA adapter (no diff: its changes are read from the adapter)
    diff: DiffReport | None = None

    def attach(self, report: AuditReport) -> None:
        report.diff = self.diff
        report.manifest_check = self.check


@dataclass
class BaseResult:
    """``--base``: the diff against the base, and the overlap with the base's refusal circuit."""

    diff: DiffReport
    overlap: CircuitOverlap | None = None

    def attach(self, report: AuditReport) -> None:
        report.diff = self.diff
        report.circuit_overlap = self.overlap


@dataclass
class BaseFreeResult:
    """No base: the signals read from the suspect alone, and what its embedded manifest claims."""

    signals: BaseFreeFindings
    embedded: ExportManifest | None = None

    def attach(self, report: AuditReport) -> None:
        report.base_free = self.signals


@dataclass
class AdapterDiff:
    """An adapter against its base: the neurons it scales, and the changes that are no neuron scaling."""

    scaled: dict[tuple[int, int], float]
    odd: int  # changed down_proj columns that are no constant scaling
    other: list[str]  # adapted weights other than down_proj

    def attach(self, report: AuditReport) -> None:
        return None


@dataclass
class AdapterShape:
    """An adapter alone: whether its A matrices select single neurons of down_proj."""

    one_hot: bool
    columns: int
    layers: list[int]
    weights: int

    def attach(self, report: AuditReport) -> None:
        return None


ModeResult = ManifestResult | BaseResult | BaseFreeResult | AdapterDiff | AdapterShape


# -- the verdict -------------------------------------------------------------------------------------------------


def verdict(result: ModeResult, behaviour: Behaviour | None = None) -> Verdict:
    """The verdict of one mode's result; the behavioural check's refusal counts are appended to its text."""
    v = _verdict(result)
    if behaviour is not None:
        v.text += f" [refusals {behaviour.rates()}]"
    return v


@singledispatch
def _verdict(result: object) -> Verdict:
    raise TypeError(f"no verdict for {type(result).__name__}")


@_verdict.register
def _(r: ManifestResult) -> Verdict:
    mc = r.check
    if mc.passed:
        what = (f"the adapter changes exactly the manifest's {mc.expected_neurons} neurons" if r.adapter else
                f"exactly the manifest's {mc.expected_neurons} neurons changed")
        text = f"manifest check passed: {what}, by its {describe_multipliers(r.multipliers, 'phrase')}, nothing else"
        return Verdict(text, ExitCode.OK, [text])
    more = f" (+{len(mc.problems) - 1} more)" if len(mc.problems) > 1 else ""
    text = f"manifest check FAILED: {mc.problems[0]}{more}"
    return Verdict(text, ExitCode.VERIFY_FAILED, [text])


@_verdict.register
def _(r: BaseResult) -> Verdict:
    findings = r.diff.findings()
    parts = [_cna_text(r.diff, r.overlap) if isinstance(f, CnaFinding) else f.summary for f in findings]
    steered = any(f.kind in STEERING_KINDS for f in findings)
    code = ExitCode.STEERED if steered else (ExitCode.OTHER_CHANGES if findings else ExitCode.OK)
    return Verdict("; ".join(parts) if parts else "no steering edits found (weights equal to the base)", code, parts)


def _cna_text(diff: DiffReport, co: CircuitOverlap | None) -> str:
    vals = list(diff.neurons.values())
    action = describe_multipliers(vals, "action")
    if co is not None and co.is_refusal_circuit:
        hit = co.ablated if action == "ablated" else co.steered
        return (f"refusal circuit {action}: CNA, {len(vals)} neurons, {describe_multipliers(vals, 'phrase')} "
                f"({hit} of {co.circuit_size} refusal-circuit neurons)")
    extra = f"; {co.steered} of {co.circuit_size} refusal-circuit neurons" if co else ""
    return f"CNA neuron steering ({action}): {neuron_summary(diff.neurons)}{extra}"


BASE_FREE_CLEAN = ("no steering edits found (weights only: a partial directional ablation, such as heretic's, "
                   "can stay below this check's limit; compare with --base to rule one out, docs/audit.md)")


@_verdict.register
def _(r: BaseFreeResult) -> Verdict:
    parts = []
    scan = r.signals.scan
    if scan.zeroed_total:
        parts.append(f"zeroed MLP neurons: {scan.zeroed_total} in layers {layer_ranges(scan.zeroed_layers)} "
                     "(CNA-style ablation, multiplier 0)")
    ablation = [text for signal in ABLATION_SIGNALS if (text := signal(r)) is not None]
    if ablation:
        parts.append("refusals stripped by directional ablation: " + "; ".join(ablation))
    if r.embedded is not None:
        parts.append(_manifest_claim(r))
    return Verdict("; ".join(parts) if parts else BASE_FREE_CLEAN, ExitCode.STEERED if parts else ExitCode.OK, parts)


def _isolated(r: BaseFreeResult) -> str | None:
    """A window of layers whose writers write one residual direction far below the rest of their spectrum (the
    eigenvalue gap, calibrated per storage type on clean files: :mod:`cna_export.inspect.isolated`)."""
    iso = r.signals.scan.isolated
    if iso is None or not iso.flagged:
        return None
    where = layer_ranges(list(range(iso.window[0], iso.window[1] + 1)))
    return (f"the {iso.writers} of layers {where} write one residual direction at "
            f"{iso.score:.2f} x the next weakest (threshold {iso.threshold:.2f} for their storage types, from clean "
            f"files; {iso.flagged_windows} windows below it)")


ABLATION_SIGNALS: tuple[Callable[[BaseFreeResult], str | None], ...] = (_isolated,)
"""Base-free signals of a directional ablation, in the order the verdict lists them. Read from the weights alone:
the depletion and refusal-write scores along the suspect's own refusal directions are reported, never decisive
(an ablation removes the very direction they are measured along)."""


def _manifest_claim(r: BaseFreeResult) -> str:
    """What the embedded manifest declares, and whether the zeroed weights bear its ablations out."""
    assert r.embedded is not None
    mults = r.embedded.multiplier_map()
    claim = f"{len(mults)} neurons, {describe_multipliers(mults, 'phrase')}"
    zero_claim = {k for k, v in mults.items() if v == 0.0}
    found = {(z.layer, z.index) for z in r.signals.scan.zeroed}
    if zero_claim:
        claim += ("; all its ablations are zeroed in the weights" if zero_claim <= found else
                  f"; only {len(zero_claim & found)} of its {len(zero_claim)} ablations are zeroed in the weights")
        if found - zero_claim:
            claim += f", and {len(found - zero_claim)} zeroed neurons are not in it"
    return f"embedded cna-export manifest declares CNA steering: {claim} (pass --manifest to check it)"


@_verdict.register
def _(r: AdapterDiff) -> Verdict:
    parts = []
    vals = list(r.scaled.values())
    if r.scaled:
        parts.append(f"LoRA adapter with CNA neuron steering ({describe_multipliers(vals, 'action')}): "
                     f"{len(r.scaled)} neurons in layers {sorted({k[0] for k in r.scaled})}, "
                     f"{describe_multipliers(vals, 'phrase')}")
    if r.odd or r.other:
        parts.append(f"LoRA adapter changes {r.odd} down_proj columns and {len(r.other)} other weights that are not "
                     "neuron scalings")
    code = ExitCode.STEERED if r.scaled else (ExitCode.OTHER_CHANGES if parts else ExitCode.OK)
    return Verdict("; ".join(parts) or "the adapter changes nothing", code, parts)


@_verdict.register
def _(r: AdapterShape) -> Verdict:
    if r.one_hot and r.columns:
        text = (f"LoRA adapter selecting {r.columns} single MLP neurons in the down_proj of layers {r.layers}: "
                "CNA-style neuron steering (pass --base to recover the multipliers)")
        return Verdict(text, ExitCode.STEERED, [text])
    text = f"LoRA adapter on {r.weights} weights (not a neuron-selecting CNA adapter)"
    return Verdict(text, ExitCode.OTHER_CHANGES if r.weights else ExitCode.OK, [text])
