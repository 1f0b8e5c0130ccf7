"""The ``eval`` job, and the steps it shares with ``tune`` (:mod:`cna_export.evaluation.tune_job`).

The steps: prompt sets, backends, statistics, conditions and the output folder. Both jobs write one
folder atomically (it appears complete or not at all, and is never replaced without ``overwrite``).

``eval``: ``generations.jsonl`` (one row per prompt and condition, with the
answer), ``summary.json``, ``summary.md``, and for sweeps ``sweep.csv``,
``sweep.md`` and PNG plots; the circuits evaluated go to ``circuits/``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ..core.circuit import Circuit, check_multiplier
from ..core.errors import CnaError
from ..core.recipe import load_recipe
from ..core.settings.base import build
from ..core.settings.discover import DiscoverOptions
from ..core.settings.evaluate import EvalJob, EvalSettings, TuneJob  # noqa: F401  (part of this API)
from .backends import open_backend
from .eval_sets import EvalSet, load_eval_set, load_jbb
from .evaluator import Condition, Evaluator, JsonlSink, stderr_log, write_report
from .interventions import Backend, Steering
from .saved_stats import SavedStats, compute_stats, load_stats, save_stats
from .sweep import (
    caa_conditions,
    cna_conditions,
    fraction_label,
    parse_layers,
    plot_sweep,
    run_conditions,
    sweep_csv,
    sweep_markdown,
)

# ---------------------------------------------------------------------------------------
# Shared steps
# ---------------------------------------------------------------------------------------


def load_sets(job: EvalJob) -> tuple[EvalSet, EvalSet | None]:
    """Custom --harmful/--benign files, or JBB-Behaviors (benign twins matched by Index)."""
    if job.harmful:
        harmful = load_eval_set(job.harmful, "harmful", job.field, job.column)
        benign = load_eval_set(job.benign, "benign", job.field, job.column) if job.benign else None
    else:
        if job.benign:
            raise CnaError("--benign needs --harmful (JBB-Behaviors supplies both by default)")
        harmful, benign = load_jbb(job.jbb_dir)
    if job.limit is not None:
        if job.limit < 1:
            raise CnaError("--limit must be at least 1")
        harmful = harmful.head(job.limit)
    if benign is not None:
        wanted = [it.index for it in harmful.items]
        have = {it.index for it in benign.items}
        missing = [i for i in wanted if i not in have]
        if missing:
            raise CnaError(f"the benign set has no twin for harmful prompt {missing[0]} (pairs match by index)")
        benign = benign.subset(wanted)
    if not job.settings.benign_set:
        benign = None
    return harmful, benign


def get_stats(job: EvalJob, backend: Backend, log: Callable[[str], None]) -> SavedStats:
    """Discovery statistics from ``job.stats`` if that file exists, else computed from ``job.recipe`` (and saved)."""
    if job.stats and Path(job.stats).is_file():
        saved = load_stats(job.stats)
        log(f"statistics   {job.stats} ({saved.identity.name}, {saved.identity.num_layers} layers)")
        if saved.options.multiplier_mode == "learned":  # trained on the model itself
            saved.attach(transformers_model(job, backend, log, "learned multipliers"))
        return saved
    if not job.recipe:
        raise CnaError("circuit sizes and CAA need discovery statistics: pass --recipe (and optionally --stats FILE "
                       "to save them) or --stats FILE from an earlier run")
    recipe = load_recipe(job.recipe)
    opts: DiscoverOptions = build(DiscoverOptions, recipe)
    loaded = transformers_model(job, backend, log, "discovery")
    t0 = time.perf_counter()
    saved = compute_stats(loaded, opts, progress=job.progress)
    log(f"statistics   discovery passes in {time.perf_counter() - t0:.0f}s")
    if job.stats:
        save_stats(job.stats, saved, overwrite=job.overwrite)
        log(f"statistics   saved to {job.stats}")
    return saved


def transformers_model(job: EvalJob, backend: Backend, log: Callable[[str], None], why: str) -> Any:
    """The backend's transformers model, or ``job.model`` loaded in transformers (for ``why``)."""
    loaded = getattr(backend, "loaded", None)
    if loaded is None:
        from ..model.loading import load_model

        log(f"statistics   loading {job.model} in transformers for {why}")
        loaded = load_model(job.model, **job.model_options)
    return loaded


def open_model(job: EvalJob, spec: str) -> Backend:
    return open_backend(spec, job.backend, batch_size=job.batch_size, threads=job.threads,
                        chat_template=job.chat_template, system_prompt=job.system_prompt,
                        model_options=job.model_options)


def job_meta(job: EvalJob, backend: Backend, reference: Backend | None) -> dict:
    return {
        "model": job.model,
        "backend": backend.name,
        "reference": reference.spec if reference is not None else None,
        "circuit": job.circuit,
        "recipe": job.recipe,
        "stats": job.stats,
    }


def circuit_name(c: Circuit) -> str:
    total = c.model.num_layers * c.model.intermediate_size
    return f"{fraction_label(len(c.neurons) / total)} ({len(c.neurons)})"


def write_circuits(folder: Path, conditions: Sequence[Condition]) -> dict[str, Circuit]:
    out: dict[str, Circuit] = {}
    for c in conditions:
        circ = c.steering.circuit
        if circ is None:
            continue
        name = f"circuit-{len(circ.neurons)}.json"
        if name not in out:
            folder.mkdir(exist_ok=True)
            (folder / name).write_text(circ.to_json() + "\n", "utf-8")
            out[name] = circ
    return out


def split_run(folder: Path, backend: Backend, harmful: EvalSet, benign: EvalSet | None, job: EvalJob,
               log: Callable[[str], None], run: Callable[[Evaluator], Any],
               reference: Backend | None = None) -> tuple[Evaluator, Any, Any]:
    """One evaluation in ``folder`` (generations streamed to its ``generations.jsonl``): the baseline
    (the unsteered model, or ``reference``), then ``run(evaluator)``; returns (evaluator, baseline,
    what ``run`` returned)."""
    folder.mkdir(exist_ok=True)
    sink = JsonlSink(folder / "generations.jsonl")
    try:
        ev = Evaluator(backend, harmful, benign, job.settings, reference=reference, log=log, on_rows=sink)
        base = ev.baseline("unsteered" if reference is None else f"reference {job.reference}")
        result = run(ev)
    finally:
        sink.close()
    return ev, base, result


# ---------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------


def check_job(job: EvalJob) -> None:
    """Refuse inconsistent flags before anything is loaded."""
    mults = job.sweep_multipliers
    if job.multiplier is not None:
        check_multiplier(job.multiplier)
        if mults:
            raise CnaError("pass either --multiplier or --sweep-multipliers")
    for m in (mults or []) + (job.caa_alphas or []):
        check_multiplier(m)
    if job.circuit and job.sweep_fractions:
        raise CnaError("--sweep-fractions selects circuits from discovery statistics; do not pass --circuit as well")
    if (job.multiplier is not None or mults) and not (job.circuit or job.sweep_fractions):
        raise CnaError("--multiplier/--sweep-multipliers need --circuit or --sweep-fractions")
    if (job.sweep_fractions or job.caa_alphas) and not job.recipe and not (job.stats and Path(job.stats).is_file()):
        raise CnaError("circuit sizes and CAA need discovery statistics: pass --recipe (and optionally --stats FILE "
                       "to save them) or --stats FILE from an earlier run")
    if job.reference and (job.circuit or job.sweep_fractions or job.caa_alphas):
        raise CnaError("--reference compares two models; steering options evaluate one model against itself")
    for f in job.sweep_fractions or []:
        if not 0 < f <= 1:
            raise CnaError(f"--sweep-fractions: {f} is not in (0, 1]")
    if job.circuit:
        Circuit.load(job.circuit)
    if job.recipe:
        load_recipe(job.recipe)


def build_conditions(job: EvalJob, backend: Backend,
                     log: Callable[[str], None]) -> tuple[list[Condition], SavedStats | None]:
    check_job(job)
    conds: list[Condition] = []
    saved: SavedStats | None = None
    mults = job.sweep_multipliers  # checked by check_job
    if job.circuit:
        circuit = Circuit.load(job.circuit)
        for m in (mults or [job.multiplier]):
            n = len(circuit.neurons)
            label = f"CNA {n} x{m:g}" if m is not None else f"CNA {n} (own multipliers)"
            info = {"method": "cna", "neurons": len(circuit.neurons), "multiplier": m}
            conds.append(Condition(label, Steering.cna(circuit, m, label=label, force=job.force), None, info))
    if job.sweep_fractions or job.caa_alphas:
        saved = get_stats(job, backend, log)
        if job.sweep_fractions:
            conds += cna_conditions(saved, job.sweep_fractions, mults or [0.0], force=job.force)
        if job.caa_alphas:
            for a in job.caa_alphas:
                check_multiplier(a)
            layers = parse_layers(job.caa_layers, saved.identity.num_layers)
            conds += caa_conditions(saved, job.caa_alphas, layers)
    return conds, saved


def run_eval_job(job: EvalJob) -> dict:
    from ..core.atomic import atomic_dir, check_output_path

    out = Path(job.out)
    check_output_path(out, job.overwrite)
    log = stderr_log(job.quiet)
    check_job(job)
    from .judge import check_judge

    check_judge(job.settings.judge, job.settings.judge_model)
    harmful, benign = load_sets(job)
    t0 = time.perf_counter()
    backend = open_model(job, job.model)
    reference = open_model(job, job.reference) if job.reference else None
    try:
        conds, saved = build_conditions(job, backend, log)
        log(f"model        {job.model} ({backend.name}); {len(harmful)} harmful"
            + (f" + {len(benign)} benign" if benign is not None else "") + f" prompts, {job.settings.max_new_tokens} "
            "new tokens, greedy")
        if reference is not None:
            conds = [Condition(job.model, Steering.none(job.model), backend, {"method": "model"})]
        sweep = bool(job.sweep_multipliers or job.sweep_fractions or job.caa_alphas)
        with atomic_dir(out, overwrite=job.overwrite) as tmp:
            ev, _, results = split_run(tmp, backend, harmful, benign, job, log, lambda e: run_conditions(e, conds),
                                        reference=reference)
            circuits = write_circuits(tmp / "circuits", conds)
            summaries = [r.summary for r in ev.results]
            meta = job_meta(job, backend, reference)
            meta["seconds"] = round(time.perf_counter() - t0, 1)
            extra = ""
            if sweep:
                (tmp / "sweep.csv").write_text(sweep_csv(summaries), "utf-8")
                (tmp / "sweep.md").write_text(sweep_markdown(summaries), "utf-8")
                named = {circuit_name(c): c for c in circuits.values()} if circuits else None
                plots = plot_sweep(tmp, summaries, named, saved.identity.num_layers if saved else None,
                                   title=str(job.model))
                extra = "\n".join(f"![{p.stem}]({p.name})" for p in plots)
            report = write_report(tmp, ev, meta, extra_md=extra)
        log(f"wrote        {out} ({len(results) + 1} conditions, {time.perf_counter() - t0:.0f}s)")
        return report
    finally:
        backend.close()
        if reference is not None:
            reference.close()
