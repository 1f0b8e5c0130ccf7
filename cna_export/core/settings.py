"""Settings: one pydantic model per job, feeding CLI flags, YAML recipes and the library API.

Each field's name, type, default and description generate its CLI flag (``top_fraction``
becomes ``--top-fraction``; :func:`opt` adds what a flag needs beyond that: another name, a
metavar, a negated switch; the generator is ``cna_export.cli.flags``), a recipe may set the same
fields (``core.recipe`` reads and validates recipes), and the library takes the model directly.
Precedence: defaults < recipe < CLI flags. Defaults and constraints are written here, once, in
each ``Field``; an int or float field refuses a bool (``top_k: true`` is not one neuron).

Jobs and their models: discover (:class:`DiscoverOptions`, :class:`ModelOptions`), export
(:class:`ExportOptions`, :class:`GGUFExportOptions`, :class:`GGUFVerifyOptions`), verify
(:class:`VerifyOptions`, :class:`GGUFVerifyOptions`, :class:`VerifyRunOptions`), eval
(:class:`EvalJob`, :class:`EvalSettings`), tune (:class:`TuneJob`), diff (:class:`DiffOptions`)
and audit (:class:`AuditSettings`). Shared flags (``--overwrite``, ``--force``, ``--multiplier``,
model loading) are declared once, in :class:`Overwrite`, :class:`Force`, :class:`Multiplier` and
:class:`ModelOptions`.

This module imports no torch or transformers: ``cna-export --help`` builds every flag from it.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .errors import CnaError
from .outputs import INPUT, OUTPUT, InputFile, InputFiles, InputPath, OutputPath

# Defaults shared with the library (written once, here).
VERIFY_LIMIT = 16  # verification prompts compared
VERIFY_MAX_NEW_TOKENS = 16  # greedy tokens generated and compared per prompt
FP32_MAX_LOGIT_DELTA = 1e-4  # default tolerances by compared dtype (each overridable by a flag)
HALF_MIN_TOP1 = 0.99
HALF_MAX_KL = 1e-3
RANK1_SHARE = 0.95  # top singular value's share of a change's energy for a "rank-1" edit


def opt(default: Any = ..., description: str | None = None, *, flag: str | None = None, dest: str | None = None,
        metavar: str | None = None, nargs: str | None = None, const: Any = None, cli: bool = True,
        recipe: bool | None = None, **constraints: Any) -> Any:
    """A pydantic ``Field`` with what its CLI flag needs beyond name, type and default.

    ``flag``: the flag's name when it is not ``--field-name`` (a ``--no-x`` switch for a field
    that defaults to true); ``dest``: the namespace attribute (when two models share a name);
    ``cli=False``: a library-only setting with no flag; ``recipe``: whether a recipe may set it
    (default: when it has a flag).
    """
    extra = {k: v for k, v in dict(flag=flag, dest=dest, metavar=metavar, nargs=nargs, const=const,
                                   recipe=recipe).items() if v is not None}
    if not cli:
        extra["cli"] = False
    return Field(default, description=description, json_schema_extra={"cli": extra} if extra else None,
                 **constraints)


def cli_spec(f: Any) -> dict[str, Any]:
    """What :func:`opt` recorded for a field's flag and recipe key ({} for a plain ``Field``)."""
    extra = f.json_schema_extra
    return dict(extra.get("cli", {})) if isinstance(extra, dict) else {}


def _numeric(tp: Any) -> bool:
    """Whether a field of type ``tp`` takes numbers: int or float, alone, optional, in a union or a list."""
    if tp is int or tp is float:
        return True
    origin = typing.get_origin(tp)
    return origin in (typing.Union, types.UnionType, list, Annotated) and any(_numeric(a) for a in typing.get_args(tp))


def _has_bool(value: Any) -> bool:
    return isinstance(value, bool) or (isinstance(value, (list, tuple)) and any(isinstance(x, bool) for x in value))


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)  # schemas built on first use: faster start-up

    negatable: ClassVar[bool] = True
    """True: a bool field gets ``--x/--no-x``; False: a plain ``--x`` switch (or its ``flag``)."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        """pydantic reads true as 1: a bool given for a number is a mistake (``top_k: true``), not 1."""
        if info.field_name is not None and _numeric(cls.model_fields[info.field_name].annotation) and _has_bool(v):
            raise PydanticCustomError("bool_not_number", "Input should be a number, not a boolean")
        return v


class _Switches(_Options):
    negatable: ClassVar[bool] = False


# -- shared flags ----------------------------------------------------------------------------


class Overwrite(_Switches):
    """Output"""

    overwrite: bool = opt(False, "replace existing output files")


class Force(_Switches):
    """Circuit fit"""

    force: bool = opt(False, "apply a circuit found on different weights")


class Multiplier(_Switches):
    """Steering strength"""

    multiplier: float | None = opt(None, "multiplier for every circuit neuron (default: the circuit's own)",
                                   allow_inf_nan=False)


class ModelOptions(_Options):
    """How to load a model."""

    dtype: str = Field(
        "auto", description="auto (float32 on CPU, checkpoint dtype with a device map), float32, bfloat16, float16")
    device_map: str | None = Field(
        None, description="passed to accelerate, e.g. auto to spread a large model over GPUs and CPU")
    allow_pickle: bool = Field(False, description="allow loading pickled .bin/.pt weights (can run arbitrary code)")
    trust_remote_code: bool = Field(
        False, description="allow model code from the checkpoint (transformers trust_remote_code)")


class PromptOptions(_Options):
    """How prompts are read and rendered."""

    field: str | None = Field(None, description="JSONL field holding the prompt (default: prompt/goal/text/...)")
    column: str | None = Field(None, description="CSV column holding the prompt (default: prompt/Goal/text/...)")
    chat_template: bool = Field(
        True, description="render prompts as one user turn with the chat template (off for base models)")
    system_prompt: str | None = Field(None, description="optional system message placed before the user turn")
    max_length: int | None = Field(
        None, gt=0, description="keep at most this many tokens of each prompt (from the end)")
    batch_size: int | Literal["auto"] = Field(
        "auto", description="prompts per forward pass, or auto: the largest batch whose forward pass fits in half "
        "the memory free on the device (sized per batch, longest prompts first)",
        json_schema_extra={"cli": {"metavar": "N|auto"}},
    )  # fmt: skip

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() == "auto":
            return "auto"
        try:
            n = int(v)
        except (TypeError, ValueError, OverflowError):  # OverflowError: an infinite float
            raise ValueError("expected a positive integer or 'auto'") from None
        if n < 1 or (isinstance(v, float) and v != n) or isinstance(v, bool):
            raise ValueError("expected a positive integer or 'auto'")
        return n


# -- discover ----------------------------------------------------------------------------------


class DiscoverOptions(PromptOptions):
    """CNA discovery settings (the fields a recipe may set)."""

    positive: InputFile = Field(None, description="prompt set showing the behaviour (text, JSONL or CSV)")
    negative: InputFile = Field(None, description="matched prompt set without it")
    neutral: InputFile = Field(None, description="diverse neutral prompts for the universal-neuron filter")
    top_fraction: float = Field(0.001, gt=0, le=1, description="circuit size as a fraction of all MLP neurons")
    top_k: int | None = Field(None, gt=0, description="circuit size in neurons (overrides --top-fraction)")
    score: Literal["mean-diff", "standardized", "direction", "attribution"] = Field(
        "mean-diff",
        description="per-neuron score: mean-diff (the paper: mean_pos - mean_neg), standardized (over the pooled "
        "std), direction (mean-diff x W_down column . unit behaviour direction of the residual stream), attribution "
        "(mean-diff x gradient of the refusal-vs-compliance first-token log-prob gap; one backward pass per batch)",
    )  # fmt: skip
    direction_layer: str = Field(
        "own",
        description="direction score: residual-stream layer whose positive-negative mean difference is the "
        "behaviour direction: own (each neuron's layer output) or a layer number (negative: from the end)",
    )  # fmt: skip
    rank: Literal["score", "per-drift"] = Field(
        "score",
        description="rank by |score| (the paper) or per-drift: |score| / sqrt(E_benign[a^2] |W_down col|^2 + floor), "
        "neurons silent on the negative and neutral prompts first",
    )  # fmt: skip
    drift_floor: float = Field(
        0.1, ge=0, description="per-drift ranking: floor added to the drift, as a share of the median neuron's drift")
    multiplier_mode: Literal["constant", "mean-match", "learned"] = Field(
        "constant",
        description="per-neuron multipliers: constant (--multiplier for all), mean-match (m = mean_neg / mean_pos "
        "clipped to --mean-match-range, moved towards 1 by --multiplier-strength): lands the positive mean on "
        "the negative, or learned (one scalar per circuit neuron fitted by gradient descent on the recipe's prompts: "
        "behaviour loss + --learn-kl-weight x benign KL + --learn-l1 x |m - 1|; starts from --multiplier, else 1)",
    )  # fmt: skip
    learn_goal: Literal["suppress", "increase"] = Field(
        "suppress", description="learned: lower the behaviour on the positive prompts (refusal removal) or raise it "
        "(hardening)")
    learn_kl_weight: float = Field(
        10.0, ge=0, allow_inf_nan=False, description="learned: lambda, the weight of KL(unsteered || steered) over "
        "the unsteered model's own greedy answers to the negative and neutral prompts")
    learn_kl_tokens: int = Field(16, ge=1, le=64, description="learned: answer tokens the KL is averaged over")
    learn_benign_weight: float = Field(
        0.0, ge=0, allow_inf_nan=False, description="learned: mu, the weight of the benign-twin penalty: a "
        "squared hinge on the move of the refusal-minus-compliance opening gap on the negative prompts (not the "
        "neutral ones) in the goal's direction, against the unsteered model's gap (0: off)")
    learn_l1: float = Field(
        0.0, ge=0, allow_inf_nan=False, description="learned: weight of the L1 penalty on m - 1 (nats per unit of "
        "change, per neuron): neurons the objective does not need stay at (or return to) 1")
    learn_steps: int = Field(40, gt=0, description="learned: optimiser steps (Adam, proximal for the L1)")
    learn_lr: float = Field(0.05, gt=0, allow_inf_nan=False, description="learned: Adam learning rate")
    learn_batch: int = Field(8, gt=0, description="learned: positive and benign prompts per step (each)")
    learn_seed: int = Field(0, ge=0, description="learned: seed of the prompt batches")
    mean_match_range: list[float] = Field(
        [-1.0, 1.0], min_length=2, max_length=2, description="mean-match: lowest,highest multiplier")
    multiplier_strength: float = Field(
        1.0, allow_inf_nan=False,
        description="mean-match: m = 1 + strength x (m - 1) (1: full match, 0: no change, >1: overshoot)",
    )  # fmt: skip
    capture: Literal["last", "mean-last-k"] = Field(
        "last", description="activation position: the last prompt token (the paper) or the mean over the "
        "last --capture-k tokens"
    )  # fmt: skip
    capture_k: int = Field(4, gt=0, description="mean-last-k: number of trailing prompt (template) tokens averaged")
    sign: Literal["both", "positive", "negative"] = Field(
        "both",
        description="which scores may enter the circuit: both (ranked by |score|, the paper), positive (more active "
        "on the positive set) or negative",
    )  # fmt: skip
    exclude_layers: list[int] = Field(default_factory=list, description="layers never included (comma-separated)")
    universal_threshold: float = Field(
        0.8, gt=0, le=1, description="share of neutral prompts a universal neuron is top-k on")
    universal_top_k: int = Field(50, gt=0, description="per-layer top-k (by |activation|) for the universal filter")
    limit: int | None = Field(None, gt=0, description="use at most this many prompts of each set")
    multiplier: float | None = Field(
        None, allow_inf_nan=False,
        description="store this multiplier with every circuit neuron (export and eval use it when not given one; "
        "a tuned recipe sets it)",
    )  # fmt: skip

    @field_validator("direction_layer", mode="before")
    @classmethod
    def _direction_layer(cls, v: Any) -> str:
        text = str(v).strip()
        if text != "own":
            try:
                int(text)
            except ValueError:
                raise ValueError("expected 'own' or a layer number") from None
        return text

    @field_validator("mean_match_range")
    @classmethod
    def _range(cls, v: list[float]) -> list[float]:
        if v[0] > v[1]:
            raise ValueError("lowest must not exceed highest")
        return v

    STRATEGY_FIELDS: ClassVar[tuple[str, ...]] = (
        "direction_layer", "rank", "drift_floor", "multiplier_mode", "mean_match_range", "multiplier_strength",
        "capture", "capture_k", "learn_goal", "learn_kl_weight", "learn_kl_tokens", "learn_l1", "learn_steps",
        "learn_lr", "learn_batch", "learn_seed", "learn_benign_weight",
    )
    """The strategy settings beyond the paper's: recorded in :meth:`method_params` when not their default."""

    def method_params(self) -> dict[str, Any]:
        """The parameters that define the method (paths are recorded separately, with hashes); the
        strategy settings beyond the paper's appear only when they differ from the paper's."""
        keep = (
            "score sign top_fraction top_k exclude_layers universal_threshold universal_top_k "
            "batch_size max_length chat_template system_prompt limit"
        ).split()
        out = {k: getattr(self, k) for k in keep}
        relevant = {"direction_layer": self.score == "direction",
                    "drift_floor": self.rank == "per-drift",
                    "mean_match_range": self.multiplier_mode == "mean-match",
                    "multiplier_strength": self.multiplier_mode == "mean-match",
                    "capture_k": self.capture == "mean-last-k",
                    **{k: self.multiplier_mode == "learned" for k in self.STRATEGY_FIELDS if k.startswith("learn_")}}
        for k in self.STRATEGY_FIELDS:
            default = type(self).model_fields[k].get_default(call_default_factory=True)
            if getattr(self, k) != default and relevant.get(k, True):
                out[k] = getattr(self, k)
        return out


class GenerateOptions(_Switches):
    """Generation"""

    max_new_tokens: int = opt(64, "greedy tokens per answer", gt=0)
    compare: bool = opt(False, "also print the unsteered continuation")


# -- verify ------------------------------------------------------------------------------------


class VerifyOptions(PromptOptions):
    """Verification settings."""

    limit: int = Field(VERIFY_LIMIT, gt=0, description="compare at most this many prompts")
    max_new_tokens: int = Field(
        VERIFY_MAX_NEW_TOKENS, ge=0, description="greedy tokens generated and compared per prompt (0: skip)")
    dtype: str = Field("auto", description="dtype both models run in; auto: the exported down_proj dtype")
    max_logit_delta: float | None = Field(
        None, ge=0, description=f"tolerance on max |delta logit| (default {FP32_MAX_LOGIT_DELTA:g} for float32)")
    max_kl: float | None = Field(
        None, ge=0, description=f"tolerance on mean KL (default {HALF_MAX_KL:g} for bf16/fp16)")
    min_top1: float | None = Field(
        None, ge=0, le=1, description=f"minimum top-1 agreement (default {HALF_MIN_TOP1:g} for bf16/fp16)")
    identical_greedy: bool | None = Field(None, description="require identical greedy text (default: on for float32)")

    def tolerance_overrides(self) -> dict[str, Any]:
        """The tolerances given (None: the dtype's default), named as ``verify.report.Tolerances`` names them."""
        return dict(max_abs_logit_delta=self.max_logit_delta, max_mean_kl=self.max_kl,
                    min_top1_agreement=self.min_top1, identical_greedy=self.identical_greedy)


class GGUFVerifyOptions(VerifyOptions):
    """GGUF verification settings (llama.cpp against hook steering, relative to the noise floor)

    Extends :class:`VerifyOptions` (prompts, limit, absolute tolerances).
    """

    max_kl_ratio: float = Field(
        1.1, gt=0, description="GGUF: steered mean KL may be at most this x the unsteered noise floor")
    max_effect_share: float = Field(
        0.01, ge=0,
        description="GGUF: plus this share of the steering effect (transformers' mean KL between hooked and plain): "
        "the steered model sits further from llama.cpp than the unsteered one; 0: the noise floor alone",
    )  # fmt: skip
    max_top1_drop: float = Field(
        0.01, ge=0, le=1, description="GGUF: the steered pair's top-1 flip rate may be at most this above the noise "
        "floor's (paired, at positions where both references are confident)")
    top1_min_margin: float = Field(
        0.1, ge=0,
        description="GGUF: count top-1 agreement where the reference's top-1/top-2 log-prob gap is at least this "
        "(nats; near-ties flip under any noise); 0: all positions",
    )  # fmt: skip
    max_steering_error: float = Field(
        0.03, ge=0,
        description="GGUF: llama.cpp must reproduce the hook-steering effect to within this share (regression slope "
        "of its logit change on transformers')",
    )  # fmt: skip
    max_prompts: int = Field(
        64, ge=0, description="GGUF: while the prompts are too few to decide a criterion, double them (from --limit) "
        "up to this many; then the verdict is 'not enough positions to decide', never a failure (docs/verify.md)")
    threads: int = Field(2, gt=0, description="GGUF: CPU threads for llama.cpp and the transformers reference")


class VerifyRunOptions(Overwrite):
    """Verification prompts and report"""

    prompts: InputFiles = opt(None, "prompt files (repeatable; default: the refusal recipe's)", metavar="FILE")
    per_prompt: bool = opt(False, "print one line per prompt")


# -- export ------------------------------------------------------------------------------------


class ExportOptions(Multiplier, Force, Overwrite):
    """Export"""

    multipliers: InputFile = opt(None, 'per-neuron multipliers: {"layer:index": m} or [{layer, index, multiplier}]',
                                  metavar="FILE")
    link: bool = opt(False, "hard-link untouched shards instead of copying them (same filesystem)")
    verify: bool = opt(False, "verify against hook steering before writing (exit 3 and no output if it fails)")
    prompts: InputFiles = opt(None, "verification prompts (repeatable; default: the refusal recipe's)",
                                    metavar="FILE")
    convert_dtype: str = opt("auto", "dtype of a converted GGUF/pickled source: auto (float32 for GGUF), float32, "
                             "bfloat16, float16", flag="--dtype")
    max_shard_size: str | None = opt(None, "shard size of a converted source, e.g. 2GB (default: transformers')")


EXPORT_FORMATS = ("safetensors", "gguf", "lora", "gguf-lora")
"""What ``export --format`` and ``steer --format`` write: a steered checkpoint (safetensors folder, GGUF
file), a PEFT LoRA adapter folder, or a llama.cpp LoRA adapter GGUF."""


class GGUFExportOptions(_Switches):
    """GGUF export"""

    format: Literal["safetensors", "gguf", "lora", "gguf-lora"] | None = opt(
        None, "output format: safetensors or gguf (a steered checkpoint), lora (a PEFT adapter folder) or gguf-lora "
        "(a llama.cpp LoRA adapter GGUF for a GGUF base) (default: gguf when --out ends in .gguf, else safetensors)")
    adapter_dtype: Literal["auto", "float32", "float16", "bfloat16"] = opt(
        "auto", "LoRA: dtype of the adapter factors (auto: float32; gguf-lora takes float32 or float16)")
    fold: Literal["up", "down"] | None = opt(
        None, "GGUF: scale ffn_up rows (default; any supported quant type) or ffn_down columns (float only)")
    fast_copy: bool = opt(False, "GGUF: copy the file and patch the touched rows in place; header unchanged, manifest "
                          "in <out>.cna_manifest.json")
    modelfile: bool = opt(True, "GGUF: do not write an Ollama Modelfile beside the output", flag="--no-modelfile")


class HubOptions(_Switches):
    """Hugging Face Hub"""

    push_to_hub: str | None = opt(None, "after writing (and verifying), upload the export to this Hub repo "
                                  "(created if missing) in one commit; token from HF_TOKEN or the cached login",
                                  metavar="REPO_ID")
    private: bool = opt(False, "create the Hub repo private")


class SteerOptions(_Switches):
    """Steer job"""

    formats: str = opt("auto", "formats to export, comma-separated: safetensors, gguf, lora, gguf-lora (gguf and "
                       "gguf-lora need a GGUF model); auto: every format that applies to the model",
                       flag="--format", dest="steer_formats", metavar="F,F,...")
    fresh: bool = opt(False, "redo every step, even those whose inputs are unchanged")
    preview: int = opt(8, "behaviour preview: hold back the last N prompts of each recipe set from discovery and "
                       "answer them greedily with the unsteered and the exported model (refusals and over-refusals "
                       "before -> after, first-token KL, one answer side by side; printed, in steer.json and the "
                       "model card)", ge=1, le=10000, metavar="N")
    preview_on: bool = opt(True, "no behaviour preview (discovery uses every prompt)", flag="--no-preview")
    preview_tokens: int = opt(32, "greedy tokens per preview answer", ge=1, le=4096)


# -- eval / tune -------------------------------------------------------------------------------


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


# -- diff / audit ------------------------------------------------------------------------------


class ShowOptions(_Options):
    """Listing"""

    top: int = opt(10, "list this many neurons (0: none)", ge=0)


class DiffOptions(Overwrite):
    """Comparison"""

    top: int = opt(20, "list this many changed tensors", ge=0)
    rank1_share: float = opt(RANK1_SHARE, "top singular value's share of a change's energy that makes it a rank-1 edit")
    rank_k: int = opt(4, "low-rank directional edits: rank counted from the top k singular values of a change",
                      ge=1, le=64)


class AuditSettings(Overwrite):
    """Audit"""

    base: InputPath = opt(
        None, "the model the suspect may have been made from (diff, refusal-circuit overlap, behaviour)")
    manifest: InputFile = opt(None, "check that exactly this export manifest's edits were made (no FILE: the "
                               "embedded one)", nargs="?", const="embedded", metavar="FILE")
    recipe: InputFile = opt(None, "discovery recipe for the base's refusal circuit and the harmful prompts "
                             "(default: the bundled recipes/refusal.yaml)")
    circuit: InputFile = opt(None, "the base's refusal circuit, already discovered (skips discovery)")
    stats: InputFile = opt(None, "the base's discovery statistics: read when FILE exists (checked against the base's "
                            "weights and the recipe), else computed and saved there, so later audits against the same "
                            "base skip discovery", metavar="FILE")
    discover: bool = opt(True, "skip the refusal-circuit overlap", flag="--no-discover")
    generate: bool = opt(True, "skip the behavioural check", flag="--no-generate")
    prompts: int = opt(8, "harmful prompts for the behavioural check", ge=1)
    max_new_tokens: int = opt(40, "greedy tokens per answer")
    backend: Literal["auto", "transformers", "llama.cpp"] = opt(
        "auto", "generation backend (auto: llama.cpp for GGUF files when installed)")
    threads: int | None = opt(None, "CPU threads for generation")
    batch_size: int = opt(8, "prompts per generation batch")
    zero_threshold: float = opt(1e-3, "base-free: flag weights with norm below this x the layer median", gt=0)
    direction_threshold: float = opt(1e-3, "base-free: list the layers whose writers' smallest eigenvalue is below "
                                     "this x the median (reported; the verdict uses the calibrated eigenvalue gap)",
                                     gt=0)
    rank1_share: float = opt(RANK1_SHARE, "as for diff")
    rank_k: int = opt(4, "as for diff", ge=1, le=64)
    refusal_direction: bool = opt(True, "skip the refusal directions (cosine with a directional edit; base-free "
                                  "depletion score)", flag="--no-refusal-direction")
    directions: InputFile = opt(None, "refusal directions (mean residual, harmful - benign, per layer) of the base "
                                 "(or, without a base, of the suspect): read when FILE exists (checked against the "
                                 "weights and the recipe's prompts), else computed and saved there", metavar="FILE")
    direction_prompts: int = opt(32, "harmful and benign prompts each for the refusal directions", ge=2)
    depletion_threshold: float = opt(0.05, "base-free, reported only: a window of layers' writers writing a "
                                     "direction below this x a typical direction (smallest / median eigenvalue)",
                                     gt=0)
    write_threshold: float = opt(0.8, "base-free, reported only: a window of layers' writers writing the suspect's "
                                 "own refusal direction below this x a typical direction's energy", gt=0)
    plot: OutputPath = opt(None, "write the directional edit's per-layer strength profile as a PNG", metavar="FILE")
    save_direction: OutputPath = opt(None, "write the directional edit's consensus direction (.npy or "
                                     ".safetensors)", metavar="FILE")


# -- building ------------------------------------------------------------------------------


def error_text(err: Any) -> str:
    """One pydantic error's message; a validator's own ``ValueError`` text without pydantic's prefix."""
    if err["type"] == "value_error" and "error" in err.get("ctx", {}):
        return str(err["ctx"]["error"])
    return err["msg"]


def build(cls: type[_Options], *layers: dict[str, Any]) -> Any:
    """Validate merged settings into ``cls`` with a one-line error naming the bad setting by its flag."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update({k: v for k, v in layer.items() if k in cls.model_fields})
    try:
        return cls.model_validate(merged)
    except ValidationError as e:
        err = e.errors()[0]
        if not err["loc"]:  # a check across fields: its message names them
            raise CnaError(error_text(err)) from None
        name = str(err["loc"][0])
        f = cls.model_fields.get(name)
        flag = cli_spec(f).get("flag") if f is not None else None
        raise CnaError(f"{flag or '--' + name.replace('_', '-')}: {error_text(err)}") from None
