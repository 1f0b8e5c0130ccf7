"""Settings of discover and generate: :class:`DiscoverOptions` (the fields a recipe's discovery may set)
and :class:`GenerateOptions`."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from ..outputs import InputFile
from .base import PromptOptions, _Switches, opt


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
