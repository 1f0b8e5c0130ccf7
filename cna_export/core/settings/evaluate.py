"""Settings of eval and tune: :class:`EvalSettings`, :class:`EvalJob` (and :data:`EVAL_ONLY`, its fields
``tune`` has no flag for) and :class:`TuneJob`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from ..outputs import INPUT, OUTPUT, InputFile, InputPath
from .base import Force, Multiplier, Overwrite, PromptOptions, _Switches, opt


class EvalSettings(_Switches):
    """Evaluation"""

    max_new_tokens: int = opt(150, "greedy answer length (150, as the paper)", ge=1)
    kl_tokens: int = opt(0, "also average KL over the first N tokens of the unsteered answer (0: first token only)",
                         ge=0)
    judge: str = opt("keyword", "refusal judge: keyword (the paper's regex), phrases, or model (a local GGUF asked "
                     "whether each answer complies, refuses or is unusable; needs --judge-model; reports its agreement "
                     "with keyword and phrases)")
    judge_model: InputFile = opt(None, "--judge model: the judge's GGUF (any local instruction model through "
                                 "llama.cpp; a larger one than the model evaluated judges better)", metavar="FILE")
    judge_calibration: Literal["none", "content-free"] = opt(
        "none", "--judge model: content-free divides each reply's probability by the judge's own on content-free "
        "pairs (for a small judge that favours one reply whatever the answer); none: as the judge gives them")
    benign_set: bool = opt(True, "skip the benign set (no over-refusal or KL)", flag="--no-benign")
    benign_answers: bool = opt(True, "score benign prompts for KL only (no answers: no over-refusal or benign quality; "
                               "much faster)", flag="--benign-kl-only")
    benign_max_new_tokens: int | None = opt(None, "answer length on the benign set (default: --max-new-tokens)", ge=1)
    score_chunk: int = opt(4, "prompts per scoring pass", cli=False, gt=0)

    @model_validator(mode="after")
    def _benign_covers_kl(self) -> "EvalSettings":
        if self.benign_max_new_tokens is not None and self.benign_max_new_tokens < self.kl_tokens:
            raise ValueError("--benign-max-new-tokens must be at least --kl-tokens")
        if (self.judge == "model") != (self.judge_model is not None):
            raise ValueError("--judge model needs --judge-model FILE.gguf" if self.judge == "model"
                             else "--judge-model needs --judge model")
        if self.judge_calibration != "none" and self.judge != "model":
            raise ValueError("--judge-calibration needs --judge model")
        return self


class EvalJob(PromptOptions, Multiplier, Force, Overwrite):
    """Evaluation job"""

    model: Annotated[str, INPUT] = opt("", "HF folder, Hub id, .gguf file, or bundled:NAME", cli=False)
    out: Annotated[str | Path, OUTPUT] = opt("", "output folder", cli=False)
    settings: EvalSettings = Field(default_factory=EvalSettings, json_schema_extra={"cli": {"cli": False}})
    backend: Literal["auto", "transformers", "llama.cpp"] = opt(
        "auto", "auto: llama.cpp for a GGUF when llama-cpp-python is installed, else transformers")
    threads: int | None = opt(None, "CPU threads (default: all cores)")
    harmful: InputFile = opt(None, "harmful prompt file (default: JBB-Behaviors harmful)")
    benign: InputFile = opt(None, "benign prompt file, twins of --harmful by position (default: JBB benign)")
    jbb_dir: InputPath = opt(None, "folder with JBB harmful-behaviors.csv / benign-behaviors.csv "
                              "(default: $CNA_JBB_DIR, then <repo>/../shared/data/jbb, then the Hub)")
    limit: int | None = opt(None, "use the first N harmful prompts (and their twins)")
    recipe: InputFile = opt(None, "discovery recipe, for circuit sizes (--sweep-fractions) and CAA")
    stats: InputFile = opt(None, "discovery statistics .npz: read if it exists, else computed from --recipe and saved")
    circuit: InputFile = opt(None, "circuit manifest to steer with")
    reference: InputPath = opt(None, "evaluate --model (e.g. an export) against this unsteered model instead")
    sweep_multipliers: list[float] | None = opt(None, "e.g. 1,0.5,0,-0.5,2", metavar="M,M,...")
    sweep_fractions: list[float] | None = opt(
        None, "circuit sizes as fractions of all MLP neurons (needs --recipe or --stats)", metavar="F,F,...")
    caa_alphas: list[float] | None = opt(
        None, "CAA baseline strengths (negative: against the positive set; needs --recipe or --stats)",
        metavar="A,A,...")
    caa_layers: str | None = opt(None, "layers CAA steers: all (default) or e.g. 1-23 (llama.cpp cannot steer layer 0)")
    model_options: dict[str, Any] = opt({}, "ModelOptions as a dict", cli=False)
    quiet: bool = opt(False, "no log lines", cli=False)
    progress: bool = opt(False, "progress bars", cli=False)


EVAL_ONLY = ("circuit", "multiplier", "reference", "sweep_multipliers", "sweep_fractions", "caa_alphas", "caa_layers")
"""EvalJob fields that ``tune`` has no flag for."""


class TuneJob(_Switches):
    """Tuning"""

    eval: EvalJob = Field(default_factory=EvalJob, json_schema_extra={"cli": {"cli": False}})
    fractions: list[float] = opt([0.001, 0.0025, 0.005], "circuit sizes to try", metavar="F,F,...")
    multipliers: list[float] = opt([0.0, 0.5, -0.5], "multipliers to try", metavar="M,M,...")
    tune_size: int = opt(30, "harmful prompts (and twins) in the tuning split")
    seed: int = opt(0, "seed of the tuning/held-out split")
    quality_ratio: float = opt(0.97, "keep quality >= this x the unsteered model's on the tuning prompts")
    max_kl: float | None = opt(0.25, "benign KL bound in nats; negative: none")
    kl_metric: Literal["kl_last", "kl_gen"] = opt("kl_last", "which KL the bound applies to (kl_gen needs --kl-tokens)")
    quality_metric: Literal["harmful", "compliant", "benign"] = opt(
        "harmful", "quality the bound applies to: all harmful answers, the harmful answers not judged refusals (a "
        "short refusal scores 1.0, so fewer refusals lower the mean), or benign answers")
    heldout: bool = opt(True, "skip the held-out check", flag="--no-heldout")
    sampler: Literal["grid", "tpe"] = opt(
        "grid", "grid: every --fractions x --multipliers point; tpe: Optuna's multi-objective TPE over strategy x "
        "circuit size (log, between the sizes of the smallest and largest --fractions) x multiplier (between the "
        "smallest and largest --multipliers), minimising refusals and benign KL under the quality bound")
    trials: int = opt(12, "tpe: configurations to evaluate", gt=0)
    strategies: list[str] = opt([], "tpe: a strategy to search (repeat the flag): recipe (its own settings), a "
                                "built-in name (paper, mean-diff+, direction+, attribution+, direction+ per-drift, "
                                "attribution+ per-drift, direction+ mean-match, ...) or one of the recipe's "
                                "tune: custom_strategies (default: recipe)", flag="--strategy", metavar="NAME")
    custom_strategies: dict[str, dict[str, Any]] = opt({}, "tpe: name -> discovery settings overriding the recipe's",
                                                       cli=False, recipe=True)
    multiplier_step: float = opt(0.1, "tpe: multiplier grid step", gt=0)
    startup_trials: int = opt(4, "tpe: random trials before the sampler models the results", ge=0)
    kl_weights: list[Annotated[float, Field(gt=0, allow_inf_nan=False)]] = opt(
        [1.0, 100.0], "tpe, learned-multiplier strategies: lowest,highest lambda (benign KL weight; searched "
        "log-uniform)", metavar="LO,HI", min_length=2, max_length=2)
    l1_weights: list[Annotated[float, Field(gt=0, allow_inf_nan=False)]] = opt(
        [0.001, 0.1], "tpe, learned-multiplier strategies: lowest,highest L1 weight on m - 1 (searched log-uniform)",
        metavar="LO,HI", min_length=2, max_length=2)
    benign_weights: list[Annotated[float, Field(gt=0, allow_inf_nan=False)]] | None = opt(
        None, "tpe, learned-multiplier strategies: lowest,highest mu (benign-twin penalty; searched log-uniform; "
        "default: not searched, each strategy's own)", metavar="LO,HI", min_length=2, max_length=2)

    @field_validator("kl_weights", "l1_weights", "benign_weights")
    @classmethod
    def _ordered(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and v[0] > v[1]:
            raise ValueError("lowest must not exceed highest")
        return v

    @model_validator(mode="after")
    def _no_bound(self) -> "TuneJob":
        if self.max_kl is not None and self.max_kl < 0:
            self.max_kl = None
        return self
