"""Settings of verify: :class:`VerifyOptions` (prompts, limit, absolute tolerances),
:class:`GGUFVerifyOptions` (llama.cpp against hook steering, relative to the noise floor) and
:class:`VerifyRunOptions`, with the defaults the verification library shares (written once, here)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from ..outputs import InputFiles
from .base import Overwrite, PromptOptions, opt

# Defaults shared with the library (written once, here).
VERIFY_LIMIT = 16  # verification prompts compared
VERIFY_MAX_NEW_TOKENS = 16  # greedy tokens generated and compared per prompt
FP32_MAX_LOGIT_DELTA = 1e-4  # default tolerances by compared dtype (each overridable by a flag)
HALF_MIN_TOP1 = 0.99
HALF_MAX_KL = 1e-3


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
    steering_noise_share: float = Field(
        0.05, ge=0, allow_inf_nan=False,
        description="GGUF: widen the slope tolerance by this x the noise-to-effect ratio, sqrt(noise floor / steering "
        "effect) in mean KL: llama.cpp's own noise moves its response to an exact edit, the more so the smaller the "
        "edit (docs/verify.md); 0: --max-steering-error alone",
    )  # fmt: skip
    max_prompts: int = Field(
        128, ge=0, description="GGUF: while the prompts are too few to decide a criterion, double them (from --limit) "
        "up to this many; then the verdict is 'not enough positions to decide', never a failure (docs/verify.md)")
    threads: int = Field(2, gt=0, description="GGUF: CPU threads for llama.cpp and the transformers reference")


class VerifyRunOptions(Overwrite):
    """Verification prompts and report"""

    prompts: InputFiles = opt(None, "prompt files (repeatable; default: the refusal recipe's)", metavar="FILE")
    per_prompt: bool = opt(False, "print one line per prompt")
