"""The verdict of the GGUF behaviour check: four criteria, each decided on an interval over the prompts.

Every criterion compares the steered pair (hook steering in transformers vs the export in llama.cpp)
with the noise floor (transformers vs the source in llama.cpp, unsteered), and is decided by
:meth:`cna_export.verification.stats.Criterion.decide`: it fails only when its strict interval lies
outside the tolerance, passes when its loose interval lies inside, and is undecided otherwise.

* **mean KL**: steered mean KL - (``max_kl_ratio`` x the floor's + ``max_effect_share`` x the steering
  effect) at most 0;
* **top-1 flips**: at the positions where both references are confident (top-1/top-2 gap at least
  ``top1_min_margin``), the steered pair's flip rate minus the floor pair's at most ``max_top1_drop``.
  A one-sided test, never undecided: it fails only when the strict interval lies beyond the tolerance
  and the exact McNemar test on the discordant positions agrees at the same level; else it passes;
* **steering slope** (when steering moves transformers by more than the floor): llama.cpp's logit
  change regressed on transformers' within ``max_steering_error`` + ``steering_noise_share`` x
  sqrt(floor / effect) of 1 (:func:`slope_tolerance`);
* **closer to steered** (same condition): mean KL to hook steering minus mean KL to the unsteered
  model below 0.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from ..core.settings.verify import GGUFVerifyOptions
from .report import Check
from .stats import (
    CRITERIA,
    FALSE_ALARM,
    MISS,
    Criterion,
    Decision,
    LookPlan,
    Verdict,
    bootstrap_weights,
    mcnemar_greater,
    overall,
    ratio_estimate,
)


class _Comps(Protocol):
    """What the judge reads of the accumulated comparisons (``gguf_behaviour._Comparisons``)."""

    acc: dict[str, Any]  # pair -> MetricAccumulator
    details: list[dict[str, Any]]
    margins: dict[str, list[np.ndarray]]
    agree: dict[str, list[np.ndarray]]
    kl_sums: dict[str, list[float]]
    positions: list[int]
    notes: list[str]
    slope_terms: list[tuple[float, float]]

    def flips(self, min_margin: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


def confident_agreement(margin: np.ndarray, agree: np.ndarray, min_margin: float) -> float:
    """Top-1 agreement over the positions whose reference margin is at least ``min_margin`` nats."""
    keep = margin >= min_margin
    return float(agree[keep].mean()) if np.any(keep) else 1.0


@dataclass
class BehaviourResult:
    metrics: dict[str, float]
    details: list[dict[str, Any]]
    reasons: list[str]
    notes: list[str]
    checks: list[Check] = field(default_factory=list)
    undecided: list[str] = field(default_factory=list)
    """Criteria the prompts could not decide (why); empty unless ``verdict`` is undecided."""
    verdict: Verdict = "pass"


@dataclass
class Outcome:
    """One criterion: its decision (None: not checked), the table row, and why it failed or is undecided."""

    decision: Decision | None
    check: Check
    reason: str = ""


def _row(label: str, value: str, tolerance: str, d: Decision | None) -> Check:
    if d is None:
        return Check(label=label, value=value, tolerance=tolerance)
    undecided = d.verdict == "undecided"
    return Check(label=label, value=value, tolerance=tolerance, ok=None if undecided else d.verdict == "pass",
                 undecided=undecided)


def _span(d: Decision, fmt: Callable[[float], str]) -> str:
    lo, hi = d.loose
    return f"{fmt(lo)} .. {fmt(hi)}" if math.isfinite(lo) and math.isfinite(hi) else "unbounded"


def _undecided(what: str, d: Decision, fmt: Callable[[float], str]) -> str:
    return (f"not enough positions to decide {what}: over {d.estimate.prompts} prompts its {1 - 2 * MISS:.0%} interval "
            f"{_span(d, fmt)} straddles the tolerance")  # fmt: skip


def _point_metrics(comp: _Comps, t0: float) -> dict[str, float]:
    """The point figures (means over positions) of the five comparisons."""
    m = {k: a.metrics() for k, a in comp.acc.items()}
    metrics = dict(m["steered"])
    for k in ("mean_kl", "max_kl", "top1_agreement", "max_abs_logit_delta"):
        metrics[f"floor_{k}"] = m["floor"][k]
    floor_kl, kl = m["floor"]["mean_kl"], m["steered"]["mean_kl"]
    metrics["kl_ratio"] = (kl / floor_kl) if floor_kl > 0 else (1.0 if kl == 0 else float("inf"))
    metrics["export_vs_unsteered_mean_kl"] = m["export_vs_plain"]["mean_kl"]
    metrics["steering_effect_mean_kl"] = m["effect_hf"]["mean_kl"]
    metrics["export_effect_mean_kl"] = m["effect_llama"]["mean_kl"]
    metrics["behaviour_seconds"] = time.perf_counter() - t0
    return metrics


def _kl(comp: _Comps, opts: GGUFVerifyOptions, metrics: dict[str, float], alpha: float, w: np.ndarray) -> Outcome:
    floor_kl, kl, effect = metrics["floor_mean_kl"], metrics["mean_kl"], metrics["steering_effect_mean_kl"]
    allowed = opts.max_kl_ratio * floor_kl + opts.max_effect_share * effect
    metrics["allowed_mean_kl"] = allowed
    metrics["excess_share_of_effect"] = ((kl - floor_kl) / effect if effect > 0
                                         else 0.0 if kl <= floor_kl else float("inf"))
    s = comp.kl_sums
    excess = [a - opts.max_kl_ratio * f - opts.max_effect_share * e
              for a, f, e in zip(s["steered"], s["floor"], s["effect_hf"], strict=True)]  # fmt: skip
    d = Criterion(high=0.0).decide(ratio_estimate(excess, comp.positions, w), alpha)
    metrics["kl_excess_over_allowed"], metrics["kl_excess_over_allowed_se"] = d.estimate.value, d.estimate.se
    allowance = f"{opts.max_kl_ratio:g} x noise floor {floor_kl:.4g}" + (
        f" + {opts.max_effect_share:g} x steering effect {effect:.4g}" if opts.max_effect_share else "")
    check = _row("mean KL, allowed", f"{kl:.3e}", f"<= {allowed:.3e}", d)
    if d.verdict == "fail":
        return Outcome(d, check, f"steered mean KL {kl:.4g} is above the allowed {allowed:.4g} ({allowance}); its "
                       f"excess over the floor is {metrics['excess_share_of_effect']:.2%} of the steering effect")
    if d.verdict == "undecided":
        return Outcome(d, check, _undecided(f"whether steered mean KL {kl:.4g} is within the allowed {allowed:.4g}",
                                            d, lambda x: f"{max(x + allowed, 0.0):.4g}"))  # fmt: skip
    return Outcome(d, check)


def _top1(comp: _Comps, opts: GGUFVerifyOptions, metrics: dict[str, float], alpha: float, w: np.ndarray) -> Outcome:
    n, b, c = comp.flips(opts.top1_min_margin)
    p = mcnemar_greater(int(b.sum()), int(c.sum()))
    metrics.update(top1_paired_positions=float(n.sum()), top1_steered_only_flips=float(b.sum()),
                   top1_floor_only_flips=float(c.sum()), top1_mcnemar_p=p)  # fmt: skip
    label, tol = f"top-1 flips vs floor, margin >= {opts.top1_min_margin:g}", f"<= +{opts.max_top1_drop:.2%}"
    if not n.sum():
        return Outcome(None, Check(label=label, value="no position", tolerance=tol))
    d = Criterion(high=opts.max_top1_drop).decide(ratio_estimate(b - c, n, w), alpha)
    # a test, not an equivalence: flips are rare, their absence on a few hundred positions proves little (mean KL
    # and the slope carry the pass); they fail a verify only when significantly beyond the tolerance, and with
    # few discordant positions the exact test must agree
    d = Decision(d.estimate, d.strict, d.loose, "fail" if d.verdict == "fail" and p < alpha else "pass")
    metrics["top1_flip_excess"], metrics["top1_flip_excess_se"] = d.estimate.value, d.estimate.se
    check = _row(label, f"{d.estimate.value:+.2%}", tol, d)
    if d.verdict == "fail":
        return Outcome(d, check, f"the steered pair flips top-1 at {int(b.sum())} positions where the floor pair does "
                       f"not, and the floor pair at {int(c.sum())} where the steered pair does not, of {int(n.sum())} "
                       f"confident positions: {d.estimate.value:+.2%}, more than {opts.max_top1_drop:.2%} above the "
                       f"noise floor's flip rate (exact McNemar p = {p:.2g})")  # fmt: skip
    return Outcome(d, check)


def noise_ratio(floor_kl: float, effect_kl: float) -> float:
    """sqrt(noise floor / steering effect), both mean KLs: how large llama.cpp's own noise is against the edit's
    effect, as a ratio of logit-change sizes (inf without an effect)."""
    if effect_kl <= 0:
        return math.inf
    return math.sqrt(max(floor_kl, 0.0) / effect_kl)


def slope_tolerance(opts: GGUFVerifyOptions, ratio: float) -> float:
    """The slope's tolerance: ``max_steering_error`` plus ``steering_noise_share`` x the noise-to-effect ``ratio``
    (:func:`noise_ratio`).

    An exact export's slope is not exactly 1 in llama.cpp: its own rounding (activations quantised for the
    matmuls, a different accumulation order) perturbs the state the edit acts on, and the part of that noise that
    lies along the edit's effect biases the regression. The bias grows with the noise against the effect (Gemma 3,
    and SmolLM2 edits of 10 neurons at x0.2, effect 1.3-2.2x the floor: 1.4-3.2% off; SmolLM2 edits 20x the floor
    or more: within 2%). Calibration: docs/verify.md."""
    return opts.max_steering_error + opts.steering_noise_share * ratio


def _tolerance_terms(opts: GGUFVerifyOptions, ratio: float) -> str:
    """What the slope's tolerance is made of, for the report's reasons and notes."""
    if not opts.steering_noise_share:
        return f"{opts.max_steering_error:.0%}"
    return f"{opts.max_steering_error:.0%} + {opts.steering_noise_share:g} x noise/effect {ratio:.2f}"


def _slope(comp: _Comps, opts: GGUFVerifyOptions, metrics: dict[str, float], alpha: float, w: np.ndarray) -> Outcome:
    num, den = [t[0] for t in comp.slope_terms], [t[1] for t in comp.slope_terms]
    ratio = noise_ratio(metrics["floor_mean_kl"], metrics["steering_effect_mean_kl"])
    e = slope_tolerance(opts, ratio)
    metrics["noise_to_effect"], metrics["slope_tolerance"] = ratio, e
    d = Criterion(1 - e, 1 + e).decide(ratio_estimate(num, den, w), alpha)
    slope, se = d.estimate.value, d.estimate.se
    metrics["steering_reproduced"], metrics["steering_reproduced_se"] = slope, se
    allowed = f"100% +- {e:.1%}"
    why = _tolerance_terms(opts, ratio)
    check = _row("steering reproduced (slope)", f"{_pct(slope)} +- {_pct(se)}", allowed, d)
    if d.verdict == "fail":
        return Outcome(d, check, f"llama.cpp reproduces {_pct(slope)} (+- {_pct(se)}) of the hook-steering effect; "
                       f"allowed {allowed} ({why})")  # fmt: skip
    if d.verdict == "undecided":
        return Outcome(d, check, _undecided(f"whether llama.cpp reproduces the steering ({_pct(slope)}) within "
                                            f"{allowed} ({why})", d, lambda x: f"{x:.1%}"))  # fmt: skip
    return Outcome(d, check)


def _closer(comp: _Comps, opts: GGUFVerifyOptions, metrics: dict[str, float], alpha: float, w: np.ndarray) -> Outcome:
    kl, plain = metrics["mean_kl"], metrics["export_vs_unsteered_mean_kl"]
    gap = [a - u for a, u in zip(comp.kl_sums["steered"], comp.kl_sums["export_vs_plain"], strict=True)]
    d = Criterion(high=0.0).decide(ratio_estimate(gap, comp.positions, w), alpha)
    check = _row("KL to steered / to unsteered", f"{kl / max(plain, 1e-300):.2%}", "< 100%", d)
    if d.verdict == "fail":
        return Outcome(d, check, f"the export is not closer to hook steering (mean KL {kl:.4g}) than to the unsteered "
                       f"model (mean KL {plain:.4g})")  # fmt: skip
    if d.verdict == "undecided":
        return Outcome(d, check, _undecided("whether the export is closer to hook steering than to the unsteered model",
                                            d, lambda x: f"{x:+.3g}"))  # fmt: skip
    return Outcome(d, check)


def _pct(v: float, digits: int = 1) -> str:
    return f"{v:.{digits}%}" if math.isfinite(v) else "n/a"


def decision_note(plan: LookPlan) -> str:
    """The decision rule and its false-alarm rate, as the report prints it."""
    widen = " -> ".join(str(n) for n in plan.sizes)
    return (f"decision: a criterion fails only when its whole {1 - plan.alpha:.3%} interval lies outside its "
            f"tolerance, passes when its {1 - 2 * MISS:.0%} interval lies inside it, else the prompts are widened "
            f"({widen}); false-alarm rate for an exact export at most {FALSE_ALARM:.0%} (Bonferroni over {CRITERIA} "
            f"criteria x {len(plan.sizes)} look{'s' if len(plan.sizes) > 1 else ''}; intervals from a paired "
            "bootstrap over prompts)")


def judge(comp: _Comps, opts: GGUFVerifyOptions, t0: float, plan: LookPlan | None = None) -> BehaviourResult:
    """Metrics, the verdict, fail or undecided reasons and notes from the accumulated comparisons."""
    plan = plan or LookPlan((len(comp.positions),))
    metrics = _point_metrics(comp, t0)
    w = bootstrap_weights(len(comp.positions))
    effect, floor_kl = metrics["steering_effect_mean_kl"], metrics["floor_mean_kl"]
    steers = effect > floor_kl  # steering measurably moves the model: llama.cpp must move with it
    criteria = [_kl, _top1] + ([_slope, _closer] if steers else [])
    outcomes = [f(comp, opts, metrics, plan.alpha, w) for f in criteria]
    if not steers:
        num, den = [t[0] for t in comp.slope_terms], [t[1] for t in comp.slope_terms]
        est = ratio_estimate(num, den, w)
        metrics["steering_reproduced"], metrics["steering_reproduced_se"] = est.value, est.se
    verdict = overall([o.decision.verdict for o in outcomes if o.decision is not None])
    n = len(comp.positions)
    metrics["looks"] = float(plan.sizes.index(n) + 1 if n in plan.sizes else len(plan.sizes))
    metrics["false_alarm_per_test"] = plan.alpha
    reasons = [o.reason for o in outcomes if o.decision is not None and o.decision.verdict == "fail"]
    undecided = [o.reason for o in outcomes if o.decision is not None and o.decision.verdict == "undecided"]
    notes = comp.notes + _notes(comp, opts, metrics, steers) + [decision_note(plan)]
    if verdict == "fail" and undecided:
        notes += [f"also undecided: {u}" for u in undecided]
    checks = [Check(label="noise floor mean KL", value=f"{floor_kl:.3e}", tolerance="-")] + [o.check for o in outcomes]
    return BehaviourResult(metrics, comp.details, reasons, notes, checks,
                           undecided if verdict == "undecided" else [], verdict)  # fmt: skip


def _notes(comp: _Comps, opts: GGUFVerifyOptions, metrics: dict[str, float], steers: bool) -> list[str]:
    m = metrics
    fm, sm = np.concatenate(comp.margins["floor"]), np.concatenate(comp.margins["steered"])
    top1 = confident_agreement(sm, np.concatenate(comp.agree["steered"]), opts.top1_min_margin)
    floor_top1 = confident_agreement(fm, np.concatenate(comp.agree["floor"]), opts.top1_min_margin)
    m["confident_top1_agreement"], m["floor_confident_top1_agreement"] = top1, floor_top1
    m["confident_positions"] = float(np.sum(sm >= opts.top1_min_margin))
    m["floor_confident_positions"] = float(np.sum(fm >= opts.top1_min_margin))
    return [
        f"noise floor (llama.cpp source vs transformers, no steering): mean KL {m['floor_mean_kl']:.4g}, "
        f"top-1 {m['floor_top1_agreement']:.2%} (steered pair {m['top1_agreement']:.2%}), max |delta logit| "
        f"{m['floor_max_abs_logit_delta']:.3g}",
        f"steered mean KL {m['mean_kl']:.4g} = {m['kl_ratio']:.3f}x the floor, excess "
        f"{m['excess_share_of_effect']:.2%} of the steering effect; allowed {m['allowed_mean_kl']:.4g}",
        f"top-1 {top1:.2%} vs the floor's {floor_top1:.2%} at reference margins >= {opts.top1_min_margin:g} nats "
        f"({int(m['confident_positions'])} and {int(m['floor_confident_positions'])} positions); paired: "
        f"{int(m['top1_steered_only_flips'])} flips of the steered pair alone, {int(m['top1_floor_only_flips'])} of "
        f"the floor pair alone, of {int(m['top1_paired_positions'])} (exact McNemar p = {m['top1_mcnemar_p']:.2g})",
        f"steering reproduced: llama.cpp's logit change is {_pct(m['steering_reproduced'], 2)} (+- "
        f"{_pct(m['steering_reproduced_se'])}) of transformers' (slope; "
        + (f"at most {m['slope_tolerance']:.1%} off: {_tolerance_terms(opts, m['noise_to_effect'])}" if steers
           else "not checked: the steering effect is within the noise floor") + ")",
        f"steering moves transformers by mean KL {m['steering_effect_mean_kl']:.4g} and llama.cpp by "
        f"{m['export_effect_mean_kl']:.4g}; export vs unsteered transformers: mean KL "
        f"{m['export_vs_unsteered_mean_kl']:.4g}",
    ]
