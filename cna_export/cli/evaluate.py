"""Commands eval and tune."""

from __future__ import annotations

import argparse
import sys

from ..core.errors import NOTHING_FITS
from ..core.progress import wanted
from ..core.recipe import recipe_section
from ..core.settings.base import ModelOptions
from ..core.settings.evaluate import EVAL_ONLY, EvalJob, EvalSettings, TuneJob
from .flags import add_flags, settings_of
from .paths import guard


def _eval_job(ns: argparse.Namespace, section: str) -> EvalJob:
    """The job from defaults < the recipe's ``section`` < flags."""
    recipe = recipe_section(getattr(ns, "recipe", None), section)
    return settings_of(ns, EvalJob, recipe, model=ns.model, out=ns.out, settings=settings_of(ns, EvalSettings, recipe),
                       model_options=settings_of(ns, ModelOptions).model_dump(), quiet=ns.quiet,
                       progress=wanted(ns.quiet))


def cmd_eval(ns: argparse.Namespace) -> int:
    from ..evaluation.evaluator import markdown_table
    from ..evaluation.jobs import run_eval_job

    job = _eval_job(ns, "eval")
    guard(ns, job, overwrite=job.overwrite)
    report = run_eval_job(job)
    if not ns.quiet:
        print(markdown_table(report["conditions"]), end="")
    return 0


def cmd_tune(ns: argparse.Namespace) -> int:
    from ..evaluation.tune_job import run_tune_job

    tune = settings_of(ns, TuneJob, recipe_section(getattr(ns, "recipe", None), "tune"), eval=_eval_job(ns, "tune"))
    guard(ns, tune, overwrite=tune.eval.overwrite)
    report = run_tune_job(tune)
    if report["chosen"] is None:
        print(f"cna-export: no configuration met the constraints; see {ns.out}/tune.md", file=sys.stderr)
        return NOTHING_FITS
    if not ns.quiet:
        ch = report["chosen"]
        m = "per-neuron (mean-match)" if ch["multiplier"] is None else f"{ch['multiplier']:g}"
        print(f"chosen       top_k {ch['neurons']} ({100 * ch['fraction']:.3g}%), multiplier {m}"
              + (f", strategy {ch['strategy']}" if ch.get("strategy") else ""))
        print(f"recipe       {ns.out}/recipe.yaml")
    return 0


def _common(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    p.add_argument("--model", required=True, help="HF folder, Hub id, .gguf file, or bundled:NAME")
    p.add_argument("--out", required=True, help="output folder (summary.json, summary.md, generations.jsonl, ...)")
    add_flags(p, EvalJob, skip=("max_length", *skip))
    add_flags(p, EvalSettings)
    add_flags(p, ModelOptions)


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)


def add_tune_arguments(p: argparse.ArgumentParser) -> None:
    _common(p, skip=EVAL_ONLY)
    add_flags(p, TuneJob)
