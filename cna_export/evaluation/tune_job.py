"""The ``tune`` job: circuit size and multiplier chosen on a tuning split, checked on the held-out split.

It writes one folder atomically (it appears complete or not at all, and is never replaced without
``overwrite``): what ``eval`` writes (:mod:`cna_export.evaluation.jobs`), for the tuning grid
(``tune/``) and the held-out check (``heldout/``), ``tune.md`` / ``tune.json`` with the choice, and the
tuned recipe ``recipe.yaml``. ``--sampler tpe`` replaces the grid by the multi-objective search of
:mod:`cna_export.evaluation.search`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ..core.circuit import check_multiplier
from ..core.errors import CnaError
from ..core.recipe import load_recipe
from ..core.settings.evaluate import EvalJob, TuneJob
from .eval_sets import EvalSet, split_pairs
from .evaluator import Condition, markdown_table, stderr_log, write_report
from .interventions import Backend
from .jobs import (
    circuit_name,
    get_stats,
    job_meta,
    load_sets,
    open_model,
    split_run,
    transformers_model,
    write_circuits,
)
from .saved_stats import SavedStats
from .sweep import (
    choose,
    cna_conditions,
    plot_sweep,
    run_conditions,
    sweep_csv,
    sweep_markdown,
    tuned_recipe_yaml,
)


def run_tune_job(t: TuneJob) -> dict:
    from ..core.atomic import atomic_dir, check_output_path

    job = t.eval
    if not job.recipe and not job.stats:
        raise CnaError("tune needs --recipe (discovery settings) or --stats from an earlier run")
    out = Path(job.out)
    check_output_path(out, job.overwrite)
    log = stderr_log(job.quiet)
    if t.kl_metric not in ("kl_last", "kl_gen"):
        raise CnaError("--kl-metric must be kl_last or kl_gen")
    from .sweep import QUALITY_KEYS

    if t.quality_metric not in QUALITY_KEYS:
        raise CnaError(f"--quality-metric must be one of {', '.join(QUALITY_KEYS)}")
    if t.quality_metric == "benign" and not (job.settings.benign_set and job.settings.benign_answers):
        raise CnaError("--quality-metric benign needs benign answers (drop --no-benign / --benign-kl-only)")
    if t.kl_metric == "kl_gen" and not job.settings.kl_tokens:
        raise CnaError("--kl-metric kl_gen needs --kl-tokens N")
    if not 0 < t.quality_ratio <= 1.5:
        raise CnaError("--quality-ratio must be in (0, 1.5]")
    for m in t.multipliers:
        check_multiplier(m)
    if not t.fractions or not t.multipliers:
        raise CnaError("tune needs at least one fraction and one multiplier")
    if t.sampler == "grid" and (t.strategies or t.custom_strategies):
        raise CnaError("--strategy (and custom_strategies) need --sampler tpe; the grid uses the recipe's settings")
    if t.sampler == "tpe":
        from .search import resolve_strategies

        resolve_strategies(t.strategies, t.custom_strategies)
        if not job.settings.benign_set:
            raise CnaError("--sampler tpe minimises benign KL: it needs the benign twins (drop --no-benign)")
    for f in t.fractions:
        if not 0 < f <= 1:
            raise CnaError(f"--fractions: {f} is not in (0, 1]")
    if job.recipe:
        load_recipe(job.recipe)
    from .judge import check_judge

    check_judge(job.settings.judge, job.settings.judge_model)
    lim = job.limit
    job.limit = None
    harmful, benign = load_sets(job)
    job.limit = lim
    tune_idx, held_idx = split_pairs(harmful, benign, t.tune_size, t.seed)
    if lim is not None:  # --limit caps the held-out split (the tuning split is --tune-size)
        held_idx = held_idx[:lim]
    t0 = time.perf_counter()
    backend = open_model(job, job.model)
    try:
        saved = get_stats(job, backend, log)
        if t.sampler == "tpe":
            return _run_tpe(t, saved, backend, harmful, benign, tune_idx, held_idx, log, t0)
        grid = cna_conditions(saved, t.fractions, t.multipliers, force=job.force)
        h_tune = harmful.subset(tune_idx)
        b_tune = benign.subset(tune_idx) if benign is not None else None
        log(f"tune         {len(grid)} configurations on {len(h_tune)} harmful"
            + (f" + {len(b_tune)} benign" if b_tune is not None else "") + f" prompts (seed {t.seed}); held out "
            f"{len(held_idx)}")
        with atomic_dir(out, overwrite=job.overwrite) as tmp:
            ev, base, _ = split_run(tmp / "tune", backend, h_tune, b_tune, job, log, lambda e: run_conditions(e, grid))
            summaries = [r.summary for r in ev.results]
            kl_key = t.kl_metric if b_tune is not None else None
            choice = choose(summaries, base.summary, t.quality_ratio, t.max_kl if kl_key else None, kl_key or "kl_last",
                            QUALITY_KEYS[t.quality_metric])
            circuits = write_circuits(tmp / "circuits", grid)
            named = {circuit_name(c): c for c in circuits.values()}
            (tmp / "tune" / "sweep.csv").write_text(sweep_csv(summaries), "utf-8")
            (tmp / "tune" / "sweep.md").write_text(sweep_markdown(summaries), "utf-8")
            plots = plot_sweep(tmp / "tune", summaries, named, saved.identity.num_layers, title=str(job.model))
            write_report(tmp / "tune", ev, job_meta(job, backend, None), title="cna-export tune: tuning split",
                         extra_md="\n".join(f"![{p.stem}]({p.name})" for p in plots))
            held: list[dict] = []
            chosen = choice.summary
            if chosen is not None:
                log(f"chosen       {chosen['label']}: refused {chosen['refused']}/{chosen['harmful_n']}, quality ratio "
                    f"{chosen['quality_ratio']:.3f}" + (f", {kl_key} {chosen[kl_key]:.4f}" if kl_key else ""))
                if t.heldout and held_idx:
                    cond = next(c for c in grid if c.label == chosen["label"])
                    held = _heldout_check(tmp, backend, harmful, benign, held_idx, cond, job, log)
                notes = _tune_notes(t, job, "fewest refusals on the tuning split", tune_idx, chosen, base.summary, held)
                (tmp / "recipe.yaml").write_text(tuned_recipe_yaml(job.recipe, out, chosen, saved, notes), "utf-8")
            report = {
                "model": job.model,
                "backend": backend.name,
                "grid": {"fractions": t.fractions, "multipliers": t.multipliers},
                "constraints": {"quality_ratio": t.quality_ratio, "quality_metric": t.quality_metric,
                                "reference_quality": choice.reference_quality,
                                "max_kl": t.max_kl, "kl_metric": t.kl_metric},
                "split": {"tune": tune_idx, "heldout": held_idx, "seed": t.seed},
                "chosen": chosen,
                "rejected": [{"label": s["label"], "reason": why} for s, why in choice.rejected],
                "tuning": summaries,
                "heldout": held,
                "seconds": round(time.perf_counter() - t0, 1),
            }
            (tmp / "tune.json").write_text(json.dumps(report, indent=2, default=str) + "\n", "utf-8")
            (tmp / "tune.md").write_text(_tune_markdown(report, job), "utf-8")
        log(f"wrote        {out} ({time.perf_counter() - t0:.0f}s)")
        return report
    finally:
        backend.close()


def _run_tpe(t: TuneJob, saved: SavedStats, backend: Backend, harmful: EvalSet, benign: EvalSet | None,
             tune_idx: list[int], held_idx: list[int], log: Callable[[str], None], t0: float) -> dict:
    """``tune --sampler tpe``: the multi-objective search (evaluation/search.py) on the tuning split,
    its Pareto front, the chosen point on the held-out split, the tuned recipe."""
    from ..core.atomic import atomic_dir
    from .search import (
        FRONT_COLUMNS,
        SearchSpace,
        chosen_condition,
        feasible,
        plot_frontier,
        resolve_strategies,
        tpe_search,
    )
    from .sweep import QUALITY_KEYS

    job = t.eval
    out = Path(job.out)
    if benign is None:
        raise CnaError("--sampler tpe minimises benign KL: it needs the benign twins (drop --no-benign)")
    space = SearchSpace(resolve_strategies(t.strategies, t.custom_strategies),
                        (saved.size_for(min(t.fractions)), saved.size_for(max(t.fractions))),
                        (min(t.multipliers), max(t.multipliers)), t.multiplier_step,
                        tuple(t.kl_weights), tuple(t.l1_weights),
                        tuple(t.benign_weights) if t.benign_weights else None)
    if any(space.learned(name, saved) for name in space.strategies) and saved.loaded is None:
        saved.attach(transformers_model(job, backend, log, "learned multipliers"))
    space.check(saved)
    kl_key, q_key = t.kl_metric, QUALITY_KEYS[t.quality_metric]
    h_tune, b_tune = harmful.subset(tune_idx), benign.subset(tune_idx)
    log(f"tune         tpe: {t.trials} trials over {len(space.strategies)} strateg"
        f"{'y' if len(space.strategies) == 1 else 'ies'} x {space.k_range[0]}-{space.k_range[1]} neurons x "
        f"multiplier {space.multiplier_range[0]:g}..{space.multiplier_range[1]:g} on {len(h_tune)} pairs (seed "
        f"{t.seed}); held out {len(held_idx)}")
    with atomic_dir(out, overwrite=job.overwrite) as tmp:
        ev, base, res = split_run(
            tmp / "tune", backend, h_tune, b_tune, job, log,
            lambda e: tpe_search(e, saved, space, t.trials, t.seed, t.quality_ratio, q_key, kl_key, t.max_kl,
                                 t.startup_trials, force=job.force, log=log))
        tuning = [base.summary] + res.trials
        (tmp / "tune" / "sweep.csv").write_text(sweep_csv(tuning), "utf-8")
        (tmp / "tune" / "sweep.md").write_text(sweep_markdown(tuning), "utf-8")
        plot_frontier(tmp / "tune" / "frontier.png", tuning, kl_key, res.front, res.chosen,
                      title=f"{job.model}: tuning split, {len(res.trials)} trials",
                      feasible_if=lambda s: feasible(s, res.reference_quality, t.quality_ratio, q_key))
        write_report(tmp / "tune", ev, job_meta(job, backend, None), title="cna-export tune (tpe): tuning split",
                     extra_md="![frontier](frontier.png)")
        chosen = res.chosen
        held: list[dict] = []
        if chosen is not None:
            log(f"chosen       {chosen['label']}: refused {chosen['refused']}/{chosen['harmful_n']}, quality ratio "
                f"{chosen['quality_ratio']:.3f}, {kl_key} {chosen[kl_key]:.4f}")
            cond = chosen_condition(saved, space, chosen, force=job.force)
            write_circuits(tmp / "circuits", [cond])
            if t.heldout and held_idx:
                held = _heldout_check(tmp, backend, harmful, benign, held_idx, cond, job, log)
            notes = _tune_notes(t, job, f"Pareto front of (refusals, {kl_key}) on the tuning split (multi-objective "
                                f"TPE, {len(res.trials)} trials); chosen: fewest refusals on the front within the KL "
                                "bound", tune_idx, chosen, base.summary, held, strategy=chosen["strategy"])
            (tmp / "recipe.yaml").write_text(tuned_recipe_yaml(job.recipe, out, chosen, saved, notes), "utf-8")
        front_labels = {s["label"] for s in res.front}
        report = {
            "model": job.model,
            "backend": backend.name,
            "sampler": "tpe",
            "search": {"strategies": space.strategies, "k_range": list(space.k_range),
                       "multiplier_range": list(space.multiplier_range), "multiplier_step": space.multiplier_step,
                       "trials": t.trials, "asked": res.asked, "startup_trials": t.startup_trials, "seed": t.seed},
            "constraints": {"quality_ratio": t.quality_ratio, "quality_metric": t.quality_metric,
                            "reference_quality": res.reference_quality, "max_kl": t.max_kl, "kl_metric": t.kl_metric},
            "split": {"tune": tune_idx, "heldout": held_idx, "seed": t.seed},
            "front": res.front,
            "chosen": chosen,
            "rejected": [{"label": s["label"], "reason": f"quality {s.get(q_key):.3f} < {t.quality_ratio:g} x "
                          f"{res.reference_quality:.3f}"} for s in res.trials
                         if res.reference_quality is not None and s.get(q_key) is not None
                         and s[q_key] < t.quality_ratio * res.reference_quality],
            "tuning": tuning,
            "heldout": held,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        (tmp / "tune.json").write_text(json.dumps(report, indent=2, default=str) + "\n", "utf-8")
        lines = ["# cna-export tune (tpe)", "",
                 f"Model `{job.model}` ({backend.name}); {len(res.trials)} configurations ({res.asked} asked, repeats "
                 f"reused) over strategies {', '.join(space.strategies)} x {space.k_range[0]}-{space.k_range[1]} "
                 f"neurons x multiplier {space.multiplier_range[0]:g}..{space.multiplier_range[1]:g} (step "
                 f"{space.multiplier_step:g}); tuning split {len(tune_idx)} pairs (seed {t.seed}), held out "
                 f"{len(held_idx)}; greedy, {job.settings.max_new_tokens} new tokens.", "",
                 f"Objectives: refusals, {kl_key} (both minimised). Constraint: {t.quality_metric} quality >= "
                 f"{t.quality_ratio:g} x unsteered. Choice: fewest refusals on the front"
                 + (f" with {kl_key} <= {t.max_kl:g}." if t.max_kl is not None else "."), "",
                 "## Pareto front (tuning split)", "", markdown_table(res.front, FRONT_COLUMNS),
                 "![frontier](tune/frontier.png)", "", "## All trials", "",
                 markdown_table([{**s, "label": s["label"] + (" (front)" if s["label"] in front_labels else "")}
                                 for s in tuning]),
                 "## Choice", ""]
        if chosen is not None:
            lines.append(f"**{chosen['label']}** (strategy `{chosen['strategy']}`: {chosen['overrides'] or 'recipe'}); "
                         "written to `recipe.yaml`.")
        else:
            lines.append("No point of the front met the constraints; no recipe written.")
        if held:
            lines += ["", "## Held-out split", "", markdown_table(held)]
        (tmp / "tune.md").write_text("\n".join(lines) + "\n", "utf-8")
    log(f"wrote        {out} ({time.perf_counter() - t0:.0f}s)")
    return report


def _heldout_check(tmp: Path, backend: Backend, harmful: EvalSet, benign: EvalSet | None, held_idx: list[int],
                   cond: Condition, job: EvalJob, log: Callable[[str], None]) -> list[dict]:
    """The chosen condition against the unsteered model on the held-out pairs (``tmp/heldout``)."""
    ev, _, _ = split_run(tmp / "heldout", backend, harmful.subset(held_idx),
                          benign.subset(held_idx) if benign is not None else None, job, log,
                          lambda e: run_conditions(e, [cond]))
    write_report(tmp / "heldout", ev, job_meta(job, backend, None), title="cna-export tune: held-out check")
    return [r.summary for r in ev.results]


def _tune_notes(t: TuneJob, job: EvalJob, objective: str, tune_idx: Sequence[int], chosen: dict, base: dict,
                held: Sequence[dict], **extra: Any) -> dict:
    """What a tuned recipe records about how it was chosen."""
    return {
        "objective": objective,
        **extra,
        "constraints": {"quality_ratio": t.quality_ratio, "quality_metric": t.quality_metric,
                        "max_kl": t.max_kl, "kl_metric": t.kl_metric},
        "tuning_split": {"size": len(tune_idx), "seed": t.seed, "indices": list(tune_idx)},
        "model": job.model,
        "judge": job.settings.judge,
        "max_new_tokens": job.settings.max_new_tokens,
        "tuning": _brief(chosen, base),
        **({"heldout": _brief(held[1], held[0])} if len(held) == 2 else {}),
    }


def _brief(s: dict, base: dict) -> dict:
    keys = ("refused", "harmful_n", "refusal_rate", "quality_harmful", "quality_ratio", "over_refusal_rate",
            "kl_last", "kl_gen")
    return {"steered": {k: s.get(k) for k in keys}, "unsteered": {k: base.get(k) for k in keys}}


def _tune_markdown(r: dict, job: EvalJob) -> str:
    c = r["constraints"]
    lines = ["# cna-export tune", ""]
    lines.append(f"Model `{r['model']}` ({r['backend']}); grid fractions {r['grid']['fractions']} x multipliers "
                 f"{r['grid']['multipliers']}; tuning split {len(r['split']['tune'])} pairs "
                 f"(seed {r['split']['seed']}), "
                 f"held out {len(r['split']['heldout'])}; greedy, {job.settings.max_new_tokens} new tokens.")
    q = c["reference_quality"]
    lines.append("")
    lines.append(f"Constraints: {c.get('quality_metric', 'harmful')} quality >= {c['quality_ratio']:g} x unsteered "
                 f"({q:.3f} -> {c['quality_ratio'] * q:.3f})"
                 if q is not None else f"Constraints: quality ratio {c['quality_ratio']:g}")
    lines[-1] += f"; {c['kl_metric']} <= {c['max_kl']}." if c["max_kl"] is not None else "."
    lines += ["", "## Tuning split", "", sweep_markdown(r["tuning"])]
    if r["rejected"]:
        lines += ["Rejected:", ""] + [f"- {x['label']}: {x['reason']}" for x in r["rejected"]] + [""]
    if r["chosen"]:
        ch = r["chosen"]
        lines += ["## Choice", "", f"**{ch['label']}**: top_k {ch['neurons']}, multiplier {ch['multiplier']:g} "
                  "(written to `recipe.yaml`).", ""]
    else:
        lines += ["## Choice", "", "No configuration met the constraints; no recipe written.", ""]
    if r["heldout"]:
        lines += ["## Held-out split", "", markdown_table(r["heldout"])]
    return "\n".join(lines) + "\n"
