"""Multi-objective search over strategy x circuit size x multiplier (``tune --sampler tpe``).

Each trial picks a strategy (a set of :class:`DiscoverOptions` overrides: score, sign, rank,
multiplier mode, ...), a circuit size ``k`` (log-uniform integer between the sizes of the smallest
and largest ``--fractions``) and a multiplier (uniform on a ``--multiplier-step`` grid between the
smallest and largest ``--multipliers``; for ``multiplier_mode: mean-match`` strategies the
mean-match strength in [0, 1] instead; for ``multiplier_mode: learned`` strategies the KL weight λ and
the L1 weight, both log-uniform between ``--kl-weights`` and ``--l1-weights``, and, when the space has a
``benign_weight_range``, the benign-twin weight μ, log-uniform in it). The circuit comes from the
statistics computed once (:meth:`SavedStats.circuit`), so a trial costs one evaluation on the tuning split
and no discovery; a learned-multiplier trial also costs its training (on the recipe's prompts, with the
model attached to the statistics), once per point.

Objectives, both minimised: refusals on the harmful prompts, and benign drift (``kl_last`` or
``kl_gen``). Constraint: quality >= ``quality_ratio`` x the unsteered model's (Optuna's
``constraints_func``: a trial is feasible when ``ratio x reference - quality <= 0``). The sampler
is Optuna's multi-objective TPE (seeded; its first ``startup_trials`` are random), told each
trial's constraint value (``Trial.set_constraint`` on Optuna >= 5, ``constraints_func`` before). A trial whose
configuration was already evaluated reuses that result and does not count against the budget.

The Pareto front is the set of feasible results that no other feasible result dominates (no more
refusals and no more drift, one of them strictly less). The chosen point is the front's point with
the fewest refusals whose drift is within ``max_kl`` (ties: lower drift).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from ..core.errors import CnaError
from ..core.settings.discover import DiscoverOptions
from .evaluator import Condition, Evaluator
from .interventions import Steering
from .saved_stats import SavedStats
from .sweep import fraction_label

# Named strategies: DiscoverOptions overrides of the recipe's settings ("recipe": none at all).
STRATEGIES: dict[str, dict[str, Any]] = {
    "recipe": {},
    "paper": {"score": "mean-diff", "sign": "both", "rank": "score", "multiplier_mode": "constant"},
    "mean-diff+": {"score": "mean-diff", "sign": "positive"},
    "standardized+": {"score": "standardized", "sign": "positive"},
    "direction+": {"score": "direction", "sign": "positive"},
    "direction+ L-1": {"score": "direction", "direction_layer": "-1", "sign": "positive"},
    "attribution+": {"score": "attribution", "sign": "positive"},
    "direction+ per-drift": {"score": "direction", "sign": "positive", "rank": "per-drift"},
    "attribution+ per-drift": {"score": "attribution", "sign": "positive", "rank": "per-drift"},
    "direction+ mean-match": {"score": "direction", "sign": "positive", "multiplier_mode": "mean-match"},
    "attribution+ per-drift mean-match": {"score": "attribution", "sign": "positive", "rank": "per-drift",
                                          "multiplier_mode": "mean-match"},
    "attribution+ learned": {"score": "attribution", "sign": "positive", "multiplier_mode": "learned"},
    "attribution+ per-drift learned": {"score": "attribution", "sign": "positive", "rank": "per-drift",
                                       "multiplier_mode": "learned"},
    "direction+ learned": {"score": "direction", "sign": "positive", "multiplier_mode": "learned"},
}


@dataclass
class SearchSpace:
    """What a trial may pick; ``strategies``: name -> DiscoverOptions overrides."""

    strategies: dict[str, dict[str, Any]]
    k_range: tuple[int, int]
    multiplier_range: tuple[float, float]
    multiplier_step: float = 0.1
    kl_weight_range: tuple[float, float] = (1.0, 100.0)  # learned strategies: λ, log-uniform
    l1_range: tuple[float, float] = (0.001, 0.1)  # learned strategies: the L1 weight, log-uniform
    benign_weight_range: tuple[float, float] | None = None  # learned strategies: μ, log-uniform (None: not searched)

    def check(self, saved: SavedStats) -> None:
        if not self.strategies:
            raise CnaError("the search needs at least one strategy")
        lo, hi = self.k_range
        if not 1 <= lo <= hi:
            raise CnaError(f"circuit sizes {lo}..{hi} are not a range of at least one neuron")
        m0, m1 = self.multiplier_range
        if not (math.isfinite(m0) and math.isfinite(m1) and m0 <= m1):
            raise CnaError(f"multipliers {m0:g}..{m1:g} are not a finite range")
        if not self.multiplier_step > 0:
            raise CnaError("--multiplier-step must be positive")
        for name, over in self.strategies.items():
            try:
                DiscoverOptions.model_validate({**saved.options.model_dump(), **over})
            except ValidationError as e:
                raise CnaError(f"strategy '{name}': {str(e).splitlines()[-1].strip()}") from None
            if over.get("score") == "attribution" and saved.stats.grad_positive is None:
                raise CnaError(f"strategy '{name}' needs attribution gradients: statistics computed without them "
                               "(recompute with a recipe whose score is attribution)")
            if self.learned(name, saved) and saved.loaded is None:
                raise CnaError(f"strategy '{name}' learns multipliers: it needs the model (transformers) attached "
                               "to the statistics")
        for lo, hi in (self.kl_weight_range, self.l1_range, *([self.benign_weight_range]
                                                              if self.benign_weight_range else [])):
            if not 0 < lo <= hi or not math.isfinite(hi):
                raise CnaError(f"learned-multiplier weights {lo:g}..{hi:g} are not a positive range")

    def mode(self, name: str, saved: SavedStats) -> str:
        return self.strategies[name].get("multiplier_mode") or saved.options.multiplier_mode

    def mean_match(self, name: str, saved: SavedStats) -> bool:
        return self.mode(name, saved) == "mean-match"

    def learned(self, name: str, saved: SavedStats) -> bool:
        return self.mode(name, saved) == "learned"

    def distributions(self) -> dict[str, Any]:
        """Optuna's distribution of every parameter a trial may pick (strategies pick some of them)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        (k0, k1), grid = self.k_range, self.multipliers()
        out: dict[str, Any] = {"strategy": CategoricalDistribution(list(self.strategies)),
                               "strength": FloatDistribution(0.0, 1.0, step=0.1),
                               "kl_weight": FloatDistribution(*self.kl_weight_range, log=True),
                               "l1": FloatDistribution(*self.l1_range, log=True)}
        if self.benign_weight_range:
            out["benign_weight"] = FloatDistribution(*self.benign_weight_range, log=True)
        if k1 > k0:
            out["k"] = IntDistribution(k0, k1, log=True)
        if len(grid) > 1:
            out["multiplier"] = FloatDistribution(grid[0], grid[-1], step=self.multiplier_step)
        return out

    def suggest(self, trial: Any, saved: SavedStats) -> "Point":
        """The point a trial picks: a strategy, a size, and the strategy's own multiplier parameters."""
        (k0, k1), grid = self.k_range, self.multipliers()
        st = trial.suggest_categorical("strategy", list(self.strategies))
        k = trial.suggest_int("k", k0, k1, log=True) if k1 > k0 else k0
        if self.learned(st, saved):
            return Point(st, k, kl_weight=trial.suggest_float("kl_weight", *self.kl_weight_range, log=True),
                         l1=trial.suggest_float("l1", *self.l1_range, log=True),
                         benign_weight=trial.suggest_float("benign_weight", *self.benign_weight_range, log=True)
                         if self.benign_weight_range else None)
        if self.mean_match(st, saved):
            return Point(st, k, strength=trial.suggest_float("strength", 0.0, 1.0, step=0.1))
        m = trial.suggest_float("multiplier", grid[0], grid[-1], step=self.multiplier_step) if len(grid) > 1 \
            else grid[0]
        return Point(st, k, multiplier=round(m, 10))

    def prior_params(self, p: dict, saved: SavedStats) -> dict[str, Any] | None:
        """The sampler's parameters of an earlier result, or None when it lies outside this space."""
        st, k = p.get("strategy"), p.get("neurons")
        k0, k1 = self.k_range
        if st not in self.strategies or k is None or not k0 <= k <= k1:
            return None
        d = self.distributions()
        params: dict[str, Any] = {"strategy": st, **({"k": int(k)} if "k" in d else {})}
        if self.learned(st, saved):
            if (self.benign_weight_range is None) != (p.get("benign_weight") is None):
                return None  # μ searched here but not there, or the other way round
            names = ("kl_weight", "l1") + (("benign_weight",) if self.benign_weight_range else ())
        elif self.mean_match(st, saved):
            names = ("strength",)
        elif p.get("multiplier") is None or not any(abs(p["multiplier"] - g) < 1e-9 for g in self.multipliers()):
            return None
        else:
            names = ("multiplier",) if "multiplier" in d else ()
        for n in names:
            if p.get(n) is None or not d[n].low - 1e-12 <= p[n] <= d[n].high + 1e-12:
                return None
            params[n] = float(p[n])
        return params

    def multipliers(self) -> list[float]:
        """The multiplier grid (``multiplier_step`` apart, both ends included)."""
        m0, m1 = self.multiplier_range
        n = math.floor((m1 - m0) / self.multiplier_step + 1e-9)
        return [round(m0 + i * self.multiplier_step, 10) for i in range(n + 1)]


def resolve_strategies(names: Sequence[str], custom: dict[str, dict[str, Any]] | None = None) -> dict[str, dict]:
    """Names -> overrides, from ``custom`` (a recipe's tune section) or the built-in table."""
    table = {**STRATEGIES, **(custom or {})}
    out = {}
    for n in names or ["recipe"]:
        if n not in table:
            raise CnaError(f"unknown strategy '{n}' (built in: {', '.join(STRATEGIES)}; or define it under "
                           "tune: custom_strategies: in the recipe)")
        out[n] = dict(table[n])
    return out


@dataclass(frozen=True)
class Point:
    """One point of the search space: a strategy, a circuit size and one of: a multiplier, a mean-match
    strength, or (learned multipliers) the KL and L1 weights (and the benign-twin weight when searched)."""

    strategy: str
    k: int
    multiplier: float | None = None
    strength: float | None = None
    kl_weight: float | None = None
    l1: float | None = None
    benign_weight: float | None = None

    def key(self) -> tuple:
        return (self.strategy, self.k, *(None if v is None else round(v, 6) for v in
                                         (self.multiplier, self.strength, self.kl_weight, self.l1, self.benign_weight)))


def trial_label(strategy: str, k: int, total: int, multiplier: float | None, strength: float | None = None,
                kl_weight: float | None = None, l1: float | None = None, benign_weight: float | None = None) -> str:
    if kl_weight is not None:
        tail = f"learned λ{kl_weight:.3g} L1 {l1 or 0:.3g}" + ("" if benign_weight is None else
                                                              f" μ{benign_weight:.3g}")
    else:
        tail = f"mean-match s{strength:g}" if multiplier is None else f"x{multiplier:g}"
    return f"{strategy} {fraction_label(k / total)} ({k}) {tail}"


def condition(saved: SavedStats, strategy: str, overrides: dict[str, Any], k: int, multiplier: float | None,
              strength: float | None = None, force: bool = False, kl_weight: float | None = None,
              l1: float | None = None, benign_weight: float | None = None) -> Condition:
    """The steering of one search point (a circuit from the saved statistics; ``kl_weight``/``l1``/
    ``benign_weight``: a learned-multiplier strategy's weights, μ only when searched)."""
    over = dict(overrides)
    if kl_weight is not None:
        over.update(learn_kl_weight=float(kl_weight), learn_l1=float(l1 or 0.0))
        if benign_weight is not None:
            over["learn_benign_weight"] = float(benign_weight)
    elif multiplier is None:
        over["multiplier_strength"] = float(strength if strength is not None else 1.0)
    circuit = saved.circuit(k, **over)
    label = trial_label(strategy, k, saved.total_neurons, multiplier, strength, kl_weight, l1, benign_weight)
    info = {"method": "cna", "strategy": strategy, "overrides": over, "fraction": k / saved.total_neurons,
            "neurons": k, "multiplier": multiplier, "strength": strength}
    if kl_weight is not None:
        learned = circuit.method.get("learned", {})
        info.update(kl_weight=kl_weight, l1=l1, changed=learned.get("changed"), learn_seconds=learned.get("seconds"))
        if benign_weight is not None:
            info["benign_weight"] = benign_weight
    return Condition(label, Steering.cna(circuit, multiplier, label=label, force=force), None, info)


def point_condition(saved: SavedStats, space: SearchSpace, p: Point, force: bool = False) -> Condition:
    return condition(saved, p.strategy, space.strategies[p.strategy], p.k, p.multiplier, p.strength, force,
                     p.kl_weight, p.l1, p.benign_weight)


def chosen_condition(saved: SavedStats, space: SearchSpace, chosen: dict, force: bool = False) -> Condition:
    """The condition of a result of :func:`tpe_search` (its summary), e.g. for the held-out check."""
    return point_condition(saved, space, Point(chosen["strategy"], int(chosen["neurons"]), chosen.get("multiplier"),
                                               chosen.get("strength"), chosen.get("kl_weight"), chosen.get("l1"),
                                               chosen.get("benign_weight")),
                           force)


# ---------------------------------------------------------------------------------------
# Pareto front
# ---------------------------------------------------------------------------------------


def feasible(s: dict, reference_quality: float | None, quality_ratio: float, quality_key: str) -> bool:
    q = s.get(quality_key)
    return reference_quality is None or q is None or q >= quality_ratio * reference_quality


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(summaries: Sequence[dict], kl_key: str, keep: Callable[[dict], bool] = lambda s: True) -> list[dict]:
    """The results (``keep`` ones only) that no other kept result dominates on (refused, drift);
    equal points are kept once (the first). Sorted by refusals."""
    pts = [s for s in summaries if keep(s) and s.get(kl_key) is not None and s.get("refused") is not None]
    out: list[dict] = []
    seen: set[tuple] = set()
    for s in pts:
        v = (s["refused"], s[kl_key])
        if v in seen or any(dominates((o["refused"], o[kl_key]), v) for o in pts):
            continue
        seen.add(v)
        out.append(s)
    return sorted(out, key=lambda s: (s["refused"], s[kl_key]))


def choose_on_front(front: Sequence[dict], max_kl: float | None, kl_key: str) -> dict | None:
    ok = [s for s in front if max_kl is None or s[kl_key] <= max_kl]
    return min(ok, key=lambda s: (s["refused"], s[kl_key])) if ok else None


# ---------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------


@dataclass
class SearchResult:
    trials: list[dict]  # one summary per evaluated configuration, in order, with "trial" and "params"
    front: list[dict]
    chosen: dict | None
    reference_quality: float | None
    asked: int = 0  # trials asked of the sampler (repeats included)
    skipped_priors: list[str] = field(default_factory=list)


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise CnaError("--sampler tpe needs optuna (pip install 'cna-export[tune]')") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _study(optuna: Any, seed: int, startup_trials: int) -> tuple[Any, bool]:
    """A seeded two-objective TPE study, and whether constraints are told per trial (Optuna >= 5:
    ``Trial.set_constraint``; 4.x through ``constraints_func``)."""
    import warnings

    per_trial = hasattr(optuna.trial.Trial, "set_constraint")
    with warnings.catch_warnings():  # multivariate/group are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=startup_trials, multivariate=True, group=True,
            **({} if per_trial else {"constraints_func": lambda t: (t.user_attrs["constraint"],)}))
    return optuna.create_study(directions=["minimize", "minimize"], sampler=sampler), per_trial


def tpe_search(
    ev: Evaluator,
    saved: SavedStats,
    space: SearchSpace,
    trials: int,
    seed: int,
    quality_ratio: float,
    quality_key: str = "quality_harmful",
    kl_key: str = "kl_last",
    max_kl: float | None = None,
    startup_trials: int = 4,
    prior: Sequence[dict] = (),
    on_result: Callable[[dict], None] | None = None,
    force: bool = False,
    log: Callable[[str], None] = lambda m: None,
) -> SearchResult:
    """Run ``trials`` new evaluations chosen by multi-objective TPE (see the module docstring).

    ``prior``: summaries already measured on the same split with the same settings (with
    ``strategy``, ``neurons`` and ``multiplier``/``strength``/``kl_weight`` and ``l1``): told to the sampler
    first, counted in the front, not re-evaluated (those outside the search space are skipped)."""
    optuna = _optuna()
    if trials < 1:
        raise CnaError("--trials must be at least 1")
    space.check(saved)
    base = ev.baseline().summary
    ref_q = base.get(quality_key)
    if base.get(kl_key) is None:
        raise CnaError("--sampler tpe minimises benign drift: it needs the benign twins (drop --no-benign)")

    def constraint(s: dict) -> float:
        q = s.get(quality_key)
        return 0.0 if ref_q is None or q is None else quality_ratio * ref_q - q

    study, per_trial = _study(optuna, seed, startup_trials)
    done: dict[tuple, dict] = {}
    results: list[dict] = []
    skipped: list[str] = []
    dists = space.distributions()
    for p in prior:
        params = space.prior_params(p, saved) if p.get(kl_key) is not None else None
        if params is None:
            skipped.append(str(p.get("label")))
            continue
        c = constraint(p)
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions={n: dists[n] for n in params}, values=[float(p["refused"]),
                                                                               float(p[kl_key])],
            user_attrs={"constraint": c}, **({"constraints": {"quality": c}} if per_trial else
                                             {"system_attrs": {"constraints": (c,)}})))
        done[Point(p["strategy"], int(p["neurons"]), p.get("multiplier"), p.get("strength"), p.get("kl_weight"),
                   p.get("l1"), p.get("benign_weight")).key()] = p
        results.append({**p, "trial": None, "prior": True})

    asked = 0
    evaluated = 0
    while evaluated < trials and asked < 20 * trials:
        t = study.ask()
        asked += 1
        point = space.suggest(t, saved)
        if point.key() in done:
            summary = done[point.key()]
        else:
            cond = point_condition(saved, space, point, force=force)
            log(f"trial {evaluated + 1}/{trials}  {cond.label}")
            summary = {**ev.run(cond).summary, "trial": t.number, "params": dict(t.params)}
            done[point.key()] = summary
            results.append(summary)
            evaluated += 1
            if on_result is not None:
                on_result(summary)
        t.set_user_attr("constraint", constraint(summary))
        if per_trial:
            t.set_constraint("quality", constraint(summary))
        study.tell(t, [float(summary["refused"]), float(summary[kl_key])])

    def keep(s: dict) -> bool:
        return feasible(s, ref_q, quality_ratio, quality_key)

    front = pareto_front(results, kl_key, keep)
    return SearchResult(results, front, choose_on_front(front, max_kl, kl_key), ref_q, asked, skipped)


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def plot_frontier(path: Any, summaries: Sequence[dict], kl_key: str = "kl_last", front: Sequence[dict] = (),
                  chosen: dict | None = None, points: Sequence[tuple[str, float, float]] = (), title: str = "",
                  refusal_key: str = "refusal_rate", feasible_if: Callable[[dict], bool] | None = None) -> None:
    """Refusal rate vs benign drift: one series per strategy (CNA), the unsteered model, CAA
    conditions, the Pareto front as a step line, the chosen point circled, and ``points``: extra
    (label, drift, refusal rate) markers (e.g. a peer tool's result). CNA points that fail
    ``feasible_if`` (the quality bound) are drawn hollow."""
    from .sweep import _plt, _save

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[str, list[dict]] = {}
    for s in summaries:
        if s.get(kl_key) is None and s.get("method") != "none":
            continue
        name = s.get("strategy") or {"caa": "CAA", "none": "unsteered"}.get(s.get("method") or "", "CNA")
        groups.setdefault(name, []).append(s)
    for name, rows in sorted(groups.items(), key=lambda kv: (kv[0] in ("CAA", "unsteered"), kv[0])):
        marker = {"CAA": "s", "unsteered": "*"}.get(name, "o")
        xs = [r.get(kl_key) or 0.0 for r in rows]
        sc = ax.scatter(xs, [r[refusal_key] for r in rows], label=name, marker=marker,
                        s=120 if name == "unsteered" else 30, color="black" if name == "unsteered" else None)
        if feasible_if is not None and name not in ("CAA", "unsteered"):
            colour = sc.get_facecolor()[0]
            sc.set_facecolors([colour if feasible_if(r) else (1, 1, 1, 0) for r in rows])
            sc.set_edgecolors([colour] * len(rows))
        for r, x in zip(rows, xs):
            if name == "CAA":
                ax.annotate(f"a={r.get('alpha'):g}", (x, r[refusal_key]), fontsize=6)
            elif name != "unsteered":
                m = r.get("multiplier")
                ax.annotate(f"{r.get('neurons')}" + ("mm" if m is None else f"x{m:g}"), (x, r[refusal_key]), fontsize=6)
    if front:
        f = sorted(front, key=lambda s: s[kl_key])
        ax.step([s[kl_key] for s in f], [s[refusal_key] for s in f], where="post", color="grey", linestyle="--",
                linewidth=1, label="Pareto front (feasible)")
    if chosen is not None:
        ax.scatter([chosen[kl_key]], [chosen[refusal_key]], s=160, facecolors="none", edgecolors="red",
                   label="chosen")
    for lab, x, y in points:
        ax.scatter([x], [y], marker="x", s=60, label=lab)
    ax.set_xscale("symlog", linthresh=0.05)
    if feasible_if is not None:
        ax.text(0.99, 0.01, "hollow: below the quality bound", transform=ax.transAxes, ha="right", va="bottom",
                fontsize=6)
    ax.set_xlabel(f"benign drift: {kl_key} (KL(unsteered || steered), nats)")
    ax.set_ylabel("refusal rate (harmful)")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


FRONT_COLUMNS = [("label", "condition"), ("strategy", "strategy"), ("neurons", "neurons"),
                 ("multiplier", "multiplier"), ("kl_weight", "λ (learned)"), ("l1", "L1 (learned)"),
                 ("changed", "neurons changed"), ("refused", "refused"), ("kl_last", "KL first token"),
                 ("kl_gen", "KL answer tokens"), ("quality_ratio", "quality / unsteered"), ("trial", "trial")]
