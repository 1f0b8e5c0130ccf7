"""Commands eval and tune."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..core.errors import NOTHING_FITS, CnaError
from ..core.settings import ModelOptions, PromptOptions, add_flags, build, flags_of
from ._registry import PARSERS, command


# -- eval / tune --------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None


def _eval_job(ns: argparse.Namespace) -> Any:
    from ..evaluate.jobs import EvalJob
    from ..evaluate.evaluator import EvalSettings

    popts: PromptOptions = build(PromptOptions, flags_of(ns, PromptOptions))
    mopts: ModelOptions = build(ModelOptions, flags_of(ns, ModelOptions))
    settings = EvalSettings(max_new_tokens=ns.max_new_tokens, kl_tokens=ns.kl_tokens, judge=ns.judge,
                            benign=not ns.no_benign, benign_answers=not ns.benign_kl_only,
                            benign_max_new_tokens=ns.benign_max_new_tokens)
    return EvalJob(
        model=ns.model, out=ns.out, settings=settings, backend=ns.backend, circuit=getattr(ns, "circuit", None),
        multiplier=getattr(ns, "multiplier", None), force=ns.force, harmful=ns.harmful, benign=ns.benign,
        jbb_dir=ns.jbb_dir, field=popts.field, column=popts.column, limit=ns.limit, recipe=ns.recipe,
        stats=ns.stats, batch_size=popts.batch_size, threads=ns.threads, chat_template=popts.chat_template,
        system_prompt=popts.system_prompt, model_options=mopts.model_dump(), overwrite=ns.overwrite,
        quiet=ns.quiet, progress=not ns.quiet and sys.stderr.isatty(),
    )


@command("eval")
def cmd_eval(ns: argparse.Namespace) -> int:
    from ..evaluate.jobs import run_eval_job

    job = _eval_job(ns)
    job.reference = ns.reference
    job.sweep_multipliers = ns.sweep_multipliers
    job.sweep_fractions = ns.sweep_fractions
    job.caa_alphas = ns.caa_alphas
    job.caa_layers = ns.caa_layers
    report = run_eval_job(job)
    if not ns.quiet:
        from ..evaluate.evaluator import markdown_table

        print(markdown_table(report["conditions"]), end="")
    return 0


def _eval_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF folder, Hub id, .gguf file, or bundled:NAME")
    p.add_argument("--out", required=True, help="output folder (summary.json, summary.md, generations.jsonl, ...)")
    p.add_argument("--backend", default="auto", choices=["auto", "transformers", "llama.cpp"],
                   help="auto: llama.cpp for a GGUF when llama-cpp-python is installed, else transformers")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--harmful", help="harmful prompt file (default: JBB-Behaviors harmful)")
    p.add_argument("--benign", help="benign prompt file, twins of --harmful by position (default: JBB benign)")
    p.add_argument("--jbb-dir", help="folder with JBB harmful-behaviors.csv / benign-behaviors.csv "
                   "(default: $CNA_JBB_DIR, then <repo>/../shared/data/jbb, then the Hub)")
    p.add_argument("--no-benign", action="store_true", help="skip the benign set (no over-refusal or KL)")
    p.add_argument("--benign-kl-only", action="store_true",
                   help="score benign prompts for KL only (no answers: no over-refusal or benign quality; much faster)")
    p.add_argument("--benign-max-new-tokens", type=int,
                   help="answer length on the benign set (default: --max-new-tokens)")
    p.add_argument("--limit", type=int, help="use the first N harmful prompts (and their twins)")
    p.add_argument("--max-new-tokens", type=int, default=150, help="greedy answer length (default: 150, as the paper)")
    p.add_argument("--kl-tokens", type=int, default=0,
                   help="also average KL over the first N tokens of the unsteered answer (default: 0, first token only)")
    p.add_argument("--judge", default="keyword", help="refusal judge: keyword (the paper's regex) or phrases")
    p.add_argument("--recipe", help="discovery recipe, for circuit sizes (--sweep-fractions) and CAA")
    p.add_argument("--stats", help="discovery statistics .npz: read if it exists, else computed from --recipe and saved")
    p.add_argument("--force", action="store_true", help="apply a circuit found on different weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_flags(p, PromptOptions, skip=("max_length",))
    add_flags(p, ModelOptions)


def _eval_parser(sub: Any) -> None:
    p = sub.add_parser("eval", help="refusal, over-refusal, quality and KL drift; multiplier/size sweeps; CAA baseline")
    _eval_common(p)
    p.add_argument("--circuit", help="circuit manifest to steer with")
    p.add_argument("--multiplier", type=float, help="multiplier for every circuit neuron (default: the circuit's own)")
    p.add_argument("--reference", help="evaluate --model (e.g. an export) against this unsteered model instead")
    p.add_argument("--sweep-multipliers", type=_floats, metavar="M,M,...", help="e.g. 1,0.5,0,-0.5,2")
    p.add_argument("--sweep-fractions", type=_floats, metavar="F,F,...",
                   help="circuit sizes as fractions of all MLP neurons (needs --recipe or --stats)")
    p.add_argument("--caa-alphas", type=_floats, metavar="A,A,...",
                   help="CAA baseline strengths (negative: against the positive set; needs --recipe or --stats)")
    p.add_argument("--caa-layers", help="layers CAA steers: all (default) or e.g. 1-23 (llama.cpp cannot steer layer 0)")


@command("tune")
def cmd_tune(ns: argparse.Namespace) -> int:
    from ..evaluate.jobs import TuneJob, run_tune_job

    job = _eval_job(ns)
    if not ns.recipe and not ns.stats:
        raise CnaError("tune needs --recipe (discovery settings) or --stats from an earlier run")
    t = TuneJob(eval=job, fractions=ns.fractions, multipliers=ns.multipliers, tune_size=ns.tune_size, seed=ns.seed,
                quality_ratio=ns.quality_ratio, max_kl=None if ns.max_kl < 0 else ns.max_kl,
                kl_metric=ns.kl_metric, quality_metric=ns.quality_metric, heldout=not ns.no_heldout)
    report = run_tune_job(t)
    if report["chosen"] is None:
        print(f"cna-export: no configuration met the constraints; see {ns.out}/tune.md", file=sys.stderr)
        return NOTHING_FITS
    if not ns.quiet:
        ch = report["chosen"]
        print(f"chosen       top_k {ch['neurons']} ({100 * ch['fraction']:.3g}%), multiplier {ch['multiplier']:g}")
        print(f"recipe       {ns.out}/recipe.yaml")
    return 0


def _tune_parser(sub: Any) -> None:
    p = sub.add_parser("tune", help="choose circuit size and multiplier on a tuning split; check on the held-out split")
    _eval_common(p)
    p.add_argument("--fractions", type=_floats, default=[0.001, 0.0025, 0.005], metavar="F,F,...",
                   help="circuit sizes to try (default: 0.001,0.0025,0.005)")
    p.add_argument("--multipliers", type=_floats, default=[0.0, 0.5, -0.5], metavar="M,M,...",
                   help="multipliers to try (default: 0,0.5,-0.5)")
    p.add_argument("--tune-size", type=int, default=30, help="harmful prompts (and twins) in the tuning split (default: 30)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tuning/held-out split (default: 0)")
    p.add_argument("--quality-ratio", type=float, default=0.97,
                   help="keep quality >= this x the unsteered model's on the tuning prompts (default: 0.97)")
    p.add_argument("--max-kl", type=float, default=0.25, help="benign KL bound in nats; negative: none (default: 0.25)")
    p.add_argument("--kl-metric", default="kl_last", choices=["kl_last", "kl_gen"],
                   help="which KL the bound applies to (kl_gen needs --kl-tokens)")
    p.add_argument("--quality-metric", default="harmful", choices=["harmful", "compliant", "benign"],
                   help="quality the bound applies to: all harmful answers (default), the harmful answers not judged "
                   "refusals (a short refusal scores 1.0, so fewer refusals lower the mean), or benign answers")
    p.add_argument("--no-heldout", action="store_true", help="skip the held-out check")


PARSERS += [_eval_parser, _tune_parser]
