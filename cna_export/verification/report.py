"""The verification report: tolerances, per-check results, logit metrics and the rendered table."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..core.errors import CnaError

# Default tolerances by compared dtype (the brief of issue #3; each is overridable by a flag).
from ..core.settings.verify import FP32_MAX_LOGIT_DELTA, HALF_MAX_KL, HALF_MIN_TOP1  # noqa: E402,F401
from ..core.version import __version__


class Tolerances(BaseModel):
    """Pass criteria; ``None`` means the metric is reported but not checked."""

    model_config = ConfigDict(extra="forbid")

    max_abs_logit_delta: float | None = Field(None, ge=0)
    max_mean_kl: float | None = Field(None, ge=0)
    min_top1_agreement: float | None = Field(None, ge=0, le=1)
    identical_greedy: bool = False

    @classmethod
    def for_dtype(cls, dtype: str) -> "Tolerances":
        if dtype in ("float32", "float64"):
            return cls(max_abs_logit_delta=FP32_MAX_LOGIT_DELTA, identical_greedy=True)
        return cls(min_top1_agreement=HALF_MIN_TOP1, max_mean_kl=HALF_MAX_KL)

    def override(self, **given: Any) -> "Tolerances":
        return self.model_copy(update={k: v for k, v in given.items() if v is not None})

    def failures(self, metrics: Mapping[str, float]) -> dict[str, str]:
        """metric name -> why it is out of tolerance (empty when all checked metrics pass; NaN fails)."""
        out: dict[str, str] = {}

        def bad(value: float | None, ok: bool) -> bool:
            return value is None or math.isnan(value) or not ok

        v = metrics.get("max_abs_logit_delta")
        if self.max_abs_logit_delta is not None and bad(v, v is not None and v <= self.max_abs_logit_delta):
            out["max_abs_logit_delta"] = f"max |delta logit| {_fmt(v)} > {self.max_abs_logit_delta:g}"
        v = metrics.get("mean_kl")
        if self.max_mean_kl is not None and bad(v, v is not None and v <= self.max_mean_kl):
            out["mean_kl"] = f"mean KL {_fmt(v)} > {self.max_mean_kl:g}"
        v = metrics.get("top1_agreement")
        if self.min_top1_agreement is not None and bad(v, v is not None and v >= self.min_top1_agreement):
            out["top1_agreement"] = f"top-1 agreement {_pct(v)} < {self.min_top1_agreement:.2%}"
        v = metrics.get("greedy_identical")
        if self.identical_greedy and bad(v, v is not None and v >= 1.0):
            out["greedy_identical"] = (
                f"greedy continuations differ on {_pct(1 - v)} of prompts" if v is not None
                else "greedy continuations were not compared (--max-new-tokens 0)"
            )
        return out

    def describe(self, metric: str) -> str:
        return {
            "max_abs_logit_delta": f"<= {self.max_abs_logit_delta:g}" if self.max_abs_logit_delta is not None else "-",
            "mean_kl": f"<= {self.max_mean_kl:g}" if self.max_mean_kl is not None else "-",
            "top1_agreement": f">= {self.min_top1_agreement:.2%}" if self.min_top1_agreement is not None else "-",
            "greedy_identical": "all" if self.identical_greedy else "-",
        }.get(metric, "-")


class PromptDetail(BaseModel):
    """Per-prompt figures (``greedy_*`` are absent when no generation was run)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    positions: int
    max_abs_logit_delta: float
    mean_kl: float
    top1_agreement: float
    last_top1_agree: bool
    greedy_reference: str | None = None
    greedy_candidate: str | None = None
    greedy_identical: bool | None = None


class Check(BaseModel):
    """One pass/fail criterion beyond the absolute tolerances (e.g. relative to a noise floor), for the table."""

    label: str
    value: str
    tolerance: str
    ok: bool | None = Field(None, description="None: informative only, or undecided")
    undecided: bool = Field(False, description="the prompts could not decide it (shown as ?)")


class VerifyReport(BaseModel):
    """The outcome of comparing a reference (hook-steered original) with a candidate (an export)."""

    model_config = ConfigDict(extra="forbid")

    tool: str = "cna-export"
    tool_version: str = __version__
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    method: str = Field("hooks-vs-weights", description="how reference and candidate were produced")
    reference: str = Field(description="what the reference is, e.g. 'SRC + hook steering'")
    candidate: str = Field(description="what was verified, e.g. the exported folder")
    dtype: str = Field(description="dtype both models ran in")
    positions: str = Field("all", description="which prompt positions were compared: all real tokens, or last")
    settings: dict[str, Any] = Field(default_factory=dict, description="prompt sources and hashes, limits")
    seconds: dict[str, float] = Field(default_factory=dict, description="wall time of each phase")
    metrics: dict[str, float] = Field(default_factory=dict)
    tolerances: Tolerances
    passed: bool
    verdict: Literal["passed", "inconclusive", "failed"] | None = Field(
        None, description="passed; inconclusive: no criterion failed, but the prompts could not decide every one "
        "(a GGUF export whose tensors were proven exact is then written); failed")
    reasons: list[str] = Field(default_factory=list, description="why it failed (empty when passed)")
    undecided: list[str] = Field(default_factory=list, description="what the prompts could not decide (inconclusive)")
    failed_metrics: list[str] = Field(default_factory=list, description="metrics outside tolerance")
    checks: list[Check] = Field(default_factory=list, description="relative criteria, shown in the table")
    notes: list[str] = Field(default_factory=list)
    prompts: list[PromptDetail] = Field(default_factory=list)

    @model_validator(mode="after")
    def _verdict(self) -> "VerifyReport":
        if self.verdict is None:  # a report from before verdicts, or built without one
            self.verdict = "passed" if self.passed else "failed"
        if self.passed != (self.verdict == "passed"):
            raise ValueError(f"passed={self.passed} contradicts verdict {self.verdict!r}")
        return self

    @classmethod
    def build(cls, metrics: Mapping[str, float], tolerances: Tolerances, extra_reasons: Sequence[str] = (),
              undecided: Sequence[str] = (), **kw: Any) -> "VerifyReport":
        """Failed when any reason (or absolute tolerance) fails it; else inconclusive when anything is ``undecided``."""
        failures = tolerances.failures(metrics)
        reasons = list(extra_reasons) + list(failures.values())
        verdict = "failed" if reasons else "inconclusive" if undecided else "passed"
        return cls(metrics=dict(metrics), tolerances=tolerances, passed=verdict == "passed", verdict=verdict,
                   reasons=reasons, undecided=[] if reasons else list(undecided), failed_metrics=list(failures), **kw)

    @property
    def publishable(self) -> bool:
        """Whether an export may be written: it passed, or it is inconclusive (never on a failure)."""
        return self.verdict != "failed"

    @property
    def status(self) -> str:
        """One line: ``passed``, ``INCONCLUSIVE (not a failure): ...`` or ``FAILED: ...``."""
        if self.verdict == "inconclusive":
            return "INCONCLUSIVE (not a failure): " + "; ".join(self.undecided)
        return "passed" if self.passed else "FAILED: " + "; ".join(self.reasons)

    def summary(self) -> dict[str, Any]:
        """A short dict (no per-prompt details) for manifests and model cards."""
        return self.model_dump(exclude={"prompts"})

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    def render(self, per_prompt: bool = False) -> str:
        m = self.metrics
        n_prompts = int(m.get("prompts", len(self.prompts)))
        lines = [
            f"reference    {self.reference}",
            f"candidate    {self.candidate}",
            f"compared     {n_prompts} prompts, {int(m.get('positions', 0))} positions ({self.positions} real "
            f"positions), dtype {self.dtype}",
            "",
            f"{'metric':<34}{'value':>14}  {'tolerance':<12}{'ok':>4}",
        ]
        rows = [
            ("max |delta logit|", "max_abs_logit_delta", _fmt),
            ("mean KL(reference || candidate)", "mean_kl", _fmt),
            ("max KL", "max_kl", _fmt),
            ("top-1 agreement", "top1_agreement", _pct),
            ("top-1 agreement, last position", "last_top1_agreement", _pct),
        ]

        def ok(key: str) -> str:
            if self.tolerances.describe(key) == "-":
                return ""
            return "no" if key in self.failed_metrics else "yes"

        for label, key, fmt in rows:
            if key in m:
                lines.append(f"{label:<34}{fmt(m[key]):>14}  {self.tolerances.describe(key):<12}{ok(key):>4}")
        if "greedy_identical" in m:
            same = round(m["greedy_identical"] * n_prompts)
            label = f"identical greedy ({int(m.get('max_new_tokens', 0))} tokens)"
            tol = self.tolerances.describe("greedy_identical")
            lines.append(f"{label:<34}{f'{same}/{n_prompts}':>14}  {tol:<12}{ok('greedy_identical'):>4}")
        for c in self.checks:
            mark = "?" if c.undecided else "" if c.ok is None else "yes" if c.ok else "no"
            lines.append(f"{c.label:<34}{c.value:>14}  {c.tolerance:<12}{mark:>4}")
        if per_prompt and self.prompts:
            lines += ["", f"{'#':>3} {'pos':>4} {'max|dlogit|':>12} {'mean KL':>10} {'top-1':>7} {'greedy':>6}  prompt"]
            for i, p in enumerate(self.prompts):
                g = "-" if p.greedy_identical is None else ("same" if p.greedy_identical else "DIFF")
                lines.append(f"{i:>3} {p.positions:>4} {_fmt(p.max_abs_logit_delta):>12} {_fmt(p.mean_kl):>10} "
                             f"{_pct(p.top1_agreement):>7} {g:>6}  {p.prompt[:60]}")
        for note in self.notes:
            lines.append(f"note: {note}")
        if self.seconds:
            lines.append("seconds      " + ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items()))
        lines.append("")
        lines.append("result       " + ("PASSED" if self.passed else self.status))
        return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3e}"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2%}"


def logit_metrics(ref: Any, cand: Any) -> dict[str, Any]:
    """Per-position figures for two ``[positions, vocab]`` logit tensors (float64 math).

    Returns ``abs_delta`` (max |diff| per position), ``kl`` (KL(ref || cand) per position) and
    ``top1`` (argmax agreement per position) as float64 tensors.
    """
    import torch

    if ref.shape != cand.shape:
        raise CnaError(f"logits have different shapes: {list(ref.shape)} vs {list(cand.shape)}")
    r = ref.detach().to(torch.float64)
    c = cand.detach().to(torch.float64)
    abs_delta = (r - c).abs().amax(dim=-1)
    lp = torch.log_softmax(r, dim=-1)
    lq = torch.log_softmax(c, dim=-1)
    kl = (lp.exp() * (lp - lq)).sum(dim=-1)
    top1 = (r.argmax(dim=-1) == c.argmax(dim=-1)).to(torch.float64)
    return {"abs_delta": abs_delta, "kl": kl, "top1": top1}


class MetricAccumulator:
    """Aggregates per-prompt :func:`logit_metrics` into report metrics (means over all positions)."""

    def __init__(self) -> None:
        self.positions = 0
        self.max_abs = 0.0
        self.kl_sum = 0.0
        self.kl_max = 0.0
        self.top1_sum = 0.0
        self.last_top1 = 0
        self.prompts = 0
        self.nan = False

    def add(self, per_position: Mapping[str, Any]) -> dict[str, float]:
        """Add one prompt's per-position figures (last row = last prompt position); return its summary."""
        a, kl, t = per_position["abs_delta"], per_position["kl"], per_position["top1"]
        n = int(a.numel())
        mx, kls, tops = float(a.max()), float(kl.sum()), float(t.sum())
        if any(math.isnan(x) for x in (mx, kls)):
            self.nan = True
        self.positions += n
        self.prompts += 1
        self.max_abs = max(self.max_abs, mx) if not math.isnan(mx) else float("nan")
        self.kl_sum += kls
        self.kl_max = max(self.kl_max, float(kl.max()))
        self.top1_sum += tops
        last = bool(t[-1] > 0)
        self.last_top1 += int(last)
        return {"positions": n, "max_abs_logit_delta": mx, "mean_kl": kls / n, "top1_agreement": tops / n,
                "last_top1_agree": last}

    def metrics(self) -> dict[str, float]:
        if not self.positions:
            raise CnaError("nothing was compared (no prompt positions)")
        nan = float("nan")
        return {
            "prompts": float(self.prompts),
            "positions": float(self.positions),
            "max_abs_logit_delta": nan if self.nan else self.max_abs,
            "mean_kl": nan if self.nan else self.kl_sum / self.positions,
            "max_kl": nan if self.nan else self.kl_max,
            "top1_agreement": self.top1_sum / self.positions,
            "last_top1_agreement": self.last_top1 / self.prompts,
        }


def inconclusive_exit(verifications: Sequence[Any], what: str = "export written") -> int:
    """The exit code after a command's verifications (reports or their ``summary()`` dicts, None when not
    run) published what they checked: ``ExitCode.VERIFY_INCONCLUSIVE`` when one was inconclusive, saying
    why on stderr, else 0 (a failed one never gets here: it raised ``VerificationFailed``)."""
    import sys

    from ..core.errors import ExitCode

    code = 0
    for v in verifications:
        d = v.summary() if isinstance(v, VerifyReport) else v
        if d and d.get("verdict") == "inconclusive":
            print(f"cna-export: verification inconclusive ({what}): " + "; ".join(d.get("undecided") or []),
                  file=sys.stderr)  # fmt: skip
            code = ExitCode.VERIFY_INCONCLUSIVE
    return code
