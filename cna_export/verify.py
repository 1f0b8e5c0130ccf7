"""Verification: an exported checkpoint must behave like hook steering of the original.

The reference is the *original* model with the circuit's multipliers applied by
forward pre-hooks on down_proj (:func:`cna_export.steering.steer`, the paper's
intervention); the candidate is the *exported* model run plainly. Both see the
same tokenised, chat-templated prompts in the same left-padded batches, and the
next-token logits are compared at **every real (non-padding) position of every
prompt**, not only the last one, so a wrong column shows up wherever the neuron
fires:

- ``max_abs_logit_delta``: max over positions and vocabulary of |logit_ref - logit_cand|;
- ``mean_kl``: mean over positions of KL(P_ref || P_cand) of the next-token distributions
  (computed in float64 from the logits);
- ``top1_agreement``: share of positions whose argmax agrees (``last_top1_agreement``: the
  last prompt position only, i.e. the first generated token);
- ``greedy_identical``: share of prompts whose greedy continuation of ``max_new_tokens``
  tokens (each model with its own tokenizer and generation config) is the same text.

Precision: both models are loaded in the dtype of the exported down_proj tensors
(override with ``dtype``). That is the fair comparison: a bfloat16 export is
meant to replace the bfloat16 original, whose hook steering also computes in
bfloat16 (multiplier applied in float32, rounded once to bfloat16). Exported
columns are ``round(W * m)`` and hook steering feeds ``round(x * m)``; the two
agree exactly for m in {0, -1, 2, 0.5, ...} (powers of two) and differ by one
rounding otherwise, hence the default tolerances: float32 must match to 1e-4 in
every logit with identical greedy text; bfloat16/float16 must agree on the top-1
token at >= 99% of positions with mean KL <= 1e-3.

:class:`VerifyReport` (metrics, tolerances, pass/fail with reasons, per-prompt
details, ``render()``) is shared with the GGUF verifier; the helpers
:func:`logit_metrics`, :class:`MetricAccumulator` and :meth:`Tolerances.check`
work on any pair of logit tensors.
"""

from __future__ import annotations

import logging
import math
import time
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field

from . import __version__
from .errors import CnaError
from .options import PromptOptions

log = logging.getLogger(__name__)

DEFAULT_PROMPT_FILES = ("prompts/refusal-harmful.txt", "prompts/refusal-benign.txt")
DEFAULT_LIMIT = 16
DEFAULT_MAX_NEW_TOKENS = 16

# Default tolerances by compared dtype (the brief of issue #3; each is overridable by a flag).
FP32_MAX_LOGIT_DELTA = 1e-4
HALF_MIN_TOP1 = 0.99
HALF_MAX_KL = 1e-3


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
    ok: bool | None = Field(None, description="None: informative only")


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
    reasons: list[str] = Field(default_factory=list, description="why it failed (empty when passed)")
    failed_metrics: list[str] = Field(default_factory=list, description="metrics outside tolerance")
    checks: list[Check] = Field(default_factory=list, description="relative criteria, shown in the table")
    notes: list[str] = Field(default_factory=list)
    prompts: list[PromptDetail] = Field(default_factory=list)

    @classmethod
    def build(cls, metrics: Mapping[str, float], tolerances: Tolerances, extra_reasons: Sequence[str] = (), **kw: Any) -> "VerifyReport":
        failures = tolerances.failures(metrics)
        reasons = list(extra_reasons) + list(failures.values())
        return cls(metrics=dict(metrics), tolerances=tolerances, passed=not reasons, reasons=reasons,
                   failed_metrics=list(failures), **kw)

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
            lines.append(f"{label:<34}{f'{same}/{n_prompts}':>14}  {self.tolerances.describe('greedy_identical'):<12}{ok('greedy_identical'):>4}")
        for c in self.checks:
            lines.append(f"{c.label:<34}{c.value:>14}  {c.tolerance:<12}{'' if c.ok is None else 'yes' if c.ok else 'no':>4}")
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
        lines.append("result       PASSED" if self.passed else "result       FAILED: " + "; ".join(self.reasons))
        return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3e}"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2%}"


# -- metrics on logits ------------------------------------------------------------------


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


# -- prompts ------------------------------------------------------------------------------


def recipes_dir() -> Path:
    """The bundled recipes: packaged inside the wheel (cna_export/recipes) or beside the source tree."""
    packaged = resources.files("cna_export").joinpath("recipes")
    if packaged.is_dir():
        return Path(str(packaged))
    repo = Path(__file__).resolve().parent.parent / "recipes"
    if repo.is_dir():
        return repo
    raise CnaError("the bundled recipes are missing; pass --prompts FILE")


def verification_prompts(
    files: Sequence[str | Path] | None = None,
    limit: int | None = DEFAULT_LIMIT,
    field: str | None = None,
    column: str | None = None,
) -> tuple[list[str], dict[str, Any]]:
    """Prompts from ``files`` (default: the refusal recipe's harmful and benign sets), taken round-robin
    across files so each set is represented, capped at ``limit``; plus their provenance."""
    from .prompts import load_prompts

    paths = [Path(f) for f in files] if files else [recipes_dir() / f for f in DEFAULT_PROMPT_FILES]
    sets = [load_prompts(p, field=field, column=column) for p in paths]
    out: list[str] = []
    depth = max(len(s.texts) for s in sets)
    for i in range(depth):
        for s in sets:
            if i < len(s.texts):
                out.append(s.texts[i])
    if limit is not None:
        out = out[:limit]
    info = {"prompt_files": {s.path: s.sha256 for s in sets}, "prompts_used": len(out)}
    return out, info


# -- options ------------------------------------------------------------------------------


class VerifyOptions(PromptOptions):
    """Verification settings."""

    limit: int = Field(DEFAULT_LIMIT, gt=0, description="compare at most this many prompts")
    max_new_tokens: int = Field(DEFAULT_MAX_NEW_TOKENS, ge=0, description="greedy tokens generated and compared per prompt (0: skip)")
    dtype: str = Field("auto", description="dtype both models run in; auto: the exported down_proj dtype")
    max_logit_delta: float | None = Field(None, ge=0, description=f"tolerance on max |delta logit| (default {FP32_MAX_LOGIT_DELTA:g} for float32)")
    max_kl: float | None = Field(None, ge=0, description=f"tolerance on mean KL (default {HALF_MAX_KL:g} for bf16/fp16)")
    min_top1: float | None = Field(None, ge=0, le=1, description=f"minimum top-1 agreement (default {HALF_MIN_TOP1:g} for bf16/fp16)")
    identical_greedy: bool | None = Field(None, description="require identical greedy text (default: on for float32)")

    def tolerances(self, dtype: str) -> Tolerances:
        return Tolerances.for_dtype(dtype).override(
            max_abs_logit_delta=self.max_logit_delta,
            max_mean_kl=self.max_kl,
            min_top1_agreement=self.min_top1,
            identical_greedy=self.identical_greedy,
        )


# -- the comparison -----------------------------------------------------------------------


def compare_steered(
    reference: Any,
    candidate: Any,
    multipliers: Mapping[tuple[int, int], float] | None,
    prompts: Sequence[str],
    opts: VerifyOptions,
    tolerances: Tolerances,
    reference_name: str,
    candidate_name: str,
    settings: Mapping[str, Any] | None = None,
    extra_reasons: Sequence[str] = (),
    notes: Sequence[str] = (),
    progress: bool = False,
) -> VerifyReport:
    """Compare ``reference`` (a LoadedModel, hook-steered with ``multipliers``) with ``candidate`` (unsteered)."""
    import torch

    from .generation import generate
    from .prompts import batches, render
    from .steering import steer

    reasons = list(extra_reasons)
    t0 = time.perf_counter()
    texts_ref = render(reference.tokenizer, prompts, opts.chat_template, opts.system_prompt)
    texts_cand = render(candidate.tokenizer, prompts, opts.chat_template, opts.system_prompt)
    if texts_ref != texts_cand:
        reasons.append("the chat templates render the prompts differently")
    args = dict(batch_size=opts.batch_size, chat_template=opts.chat_template, max_length=opts.max_length)
    ref_batches = list(batches(reference.tokenizer, texts_ref, device=reference.input_device, **args))
    cand_batches = list(batches(candidate.tokenizer, texts_cand, device=candidate.input_device, **args))
    same_tokens = len(ref_batches) == len(cand_batches) and all(
        a.indices == b.indices and torch.equal(a.input_ids.cpu(), b.input_ids.cpu()) for a, b in zip(ref_batches, cand_batches)
    )
    if not same_tokens:
        reasons.append("the tokenizers tokenise the prompts differently (logits compared on the reference's tokens)")

    acc = MetricAccumulator()
    details: dict[int, dict[str, Any]] = {}
    steering = multipliers or {}
    iterator: Any = ref_batches
    if progress:
        from tqdm import tqdm

        iterator = tqdm(ref_batches, desc="verify", unit="batch")
    for b in iterator:
        feed = dict(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids)
        with torch.inference_mode():
            with steer(reference.model, reference.arch, steering):
                ref_logits = reference.model(**feed).logits
            cand_feed = {k: v.to(candidate.input_device) for k, v in feed.items()}
            cand_logits = candidate.model(**cand_feed).logits
        mask = b.attention_mask.bool().cpu()
        for row, i in enumerate(b.indices):
            keep = mask[row]
            per = logit_metrics(ref_logits[row].cpu()[keep], cand_logits[row].cpu()[keep])
            details[i] = acc.add(per)
        del ref_logits, cand_logits
    metrics = acc.metrics()
    seconds = {"logits": time.perf_counter() - t0}

    t0 = time.perf_counter()
    greedy_ref: list[str] | None = None
    greedy_cand: list[str] | None = None
    if opts.max_new_tokens > 0:
        gen = dict(max_new_tokens=opts.max_new_tokens, chat_template=opts.chat_template,
                   system_prompt=opts.system_prompt, batch_size=opts.batch_size)
        with steer(reference.model, reference.arch, steering):
            greedy_ref = generate(reference, prompts, **gen)
        greedy_cand = generate(candidate, prompts, **gen)
        same = [a == b for a, b in zip(greedy_ref, greedy_cand)]
        metrics["greedy_identical"] = sum(same) / len(same)
        metrics["max_new_tokens"] = float(opts.max_new_tokens)
        seconds["generate"] = time.perf_counter() - t0

    per_prompt = []
    for i, prompt in enumerate(prompts):
        d = details[i]
        per_prompt.append(PromptDetail(
            prompt=prompt,
            positions=d["positions"],
            max_abs_logit_delta=d["max_abs_logit_delta"],
            mean_kl=d["mean_kl"],
            top1_agreement=d["top1_agreement"],
            last_top1_agree=d["last_top1_agree"],
            greedy_reference=greedy_ref[i] if greedy_ref is not None else None,
            greedy_candidate=greedy_cand[i] if greedy_cand is not None else None,
            greedy_identical=(greedy_ref[i] == greedy_cand[i]) if greedy_ref is not None and greedy_cand is not None else None,
        ))
    dtype = str(reference.dtype).removeprefix("torch.")
    all_settings = {"limit": opts.limit, "max_new_tokens": opts.max_new_tokens, "batch_size": opts.batch_size,
                    "chat_template": opts.chat_template, "system_prompt": opts.system_prompt,
                    "multipliers": len(steering), **(settings or {})}
    return VerifyReport.build(
        metrics, tolerances, extra_reasons=reasons, reference=reference_name, candidate=candidate_name,
        dtype=dtype, positions="all", settings=all_settings, notes=list(notes), prompts=per_prompt, seconds=seconds,
    )


def exported_dtype(exported: Path) -> str:
    """dtype of the exported down_proj tensors (from the safetensors headers, nothing loaded)."""
    from transformers import AutoConfig

    from .architectures import arch_for_config
    from .io.safetensors import Checkpoint

    try:
        config = AutoConfig.from_pretrained(str(exported))
    except (OSError, ValueError, KeyError) as e:
        raise CnaError(f"cannot read the config of {exported}: {str(e).splitlines()[0]}") from None
    arch = arch_for_config(config)
    ckpt = Checkpoint.open(exported)
    name = ckpt.first_present(arch.checkpoint_down_names(0))
    if name is None:
        raise CnaError(f"{exported} has no down_proj weight for layer 0 (looked for {arch.checkpoint_down_names(0)[0]})")
    return ckpt.info(name).dtype


def verify_export(
    original: str | Any,
    exported: str | Path,
    opts: VerifyOptions | None = None,
    prompt_files: Sequence[str | Path] | None = None,
    model_options: Mapping[str, Any] | None = None,
    manifest: Any = None,
    reference_name: str | None = None,
    candidate_name: str | None = None,
    progress: bool = False,
) -> VerifyReport:
    """Verify a safetensors export against hook steering of ``original`` (a model spec or a LoadedModel).

    The circuit and multipliers come from the export's ``cna_manifest.json`` (or ``manifest``). A
    LoadedModel passed as ``original`` is cast in place to the comparison dtype.
    """
    import torch

    from .fold import tensor_sha256
    from .manifest import ExportManifest
    from .models import load_model, resolve_dtype

    opts = opts or VerifyOptions()
    mopts = dict(model_options or {})
    mopts.pop("dtype", None)
    exported = Path(exported)
    if not exported.is_dir():
        raise CnaError(f"exported model folder not found: {exported}")
    manifest = manifest or ExportManifest.load(exported)
    if manifest.format != "safetensors":
        raise CnaError(f"{exported} is a {manifest.format} export; this verifies safetensors exports")
    dtype = exported_dtype(exported) if opts.dtype == "auto" else str(resolve_dtype(opts.dtype, None)).removeprefix("torch.")
    prompts, prompt_info = verification_prompts(prompt_files, opts.limit, opts.field, opts.column)

    t0 = time.perf_counter()
    if isinstance(original, str):
        ref = load_model(original, dtype=dtype, **mopts)
        ref_name = reference_name or original
    else:
        ref = original
        ref_name = reference_name or ref.source.spec
        ref.model.to(getattr(torch, dtype))
    cand = load_model(str(exported), dtype=dtype, **mopts)
    load_seconds = time.perf_counter() - t0

    circuit = manifest.circuit
    circuit.check_fits(ref.identity(with_fingerprint=False))
    reasons: list[str] = []
    notes: list[str] = []
    # Is --original really the model the export was made from? Exact when compared in the export's dtype.
    touched = {t.name: t for t in manifest.tensors if t.axis == "column"}
    checked = 0
    for layer in sorted(circuit.layer_counts()):
        t = next((touched[n] for n in ref.arch.checkpoint_down_names(layer) if n in touched), None)
        if t is None or t.dtype != dtype:
            continue
        w = ref.down_proj(layer).weight
        if w.device.type == "meta":
            continue
        checked += 1
        if tensor_sha256(w) != t.sha256_before:
            reasons.append(f"the original's layer {layer} down_proj is not the tensor the export was made from "
                           f"(sha256 differs from the manifest); is --original the export's source?")
            break
    if not checked:
        notes.append(f"source tensors not compared by hash (compared in {dtype}, exported as "
                     f"{manifest.tensors[0].dtype if manifest.tensors else 'unknown'})")

    settings = {**prompt_info, "source": manifest.source}
    report = compare_steered(
        ref, cand, manifest.multiplier_map(), prompts, opts, opts.tolerances(dtype),
        reference_name=f"{ref_name} + hook steering ({len(manifest.multipliers)} neurons)",
        candidate_name=candidate_name or str(exported), settings=settings, extra_reasons=reasons, notes=notes,
        progress=progress,
    )
    report.seconds = {"load": load_seconds, **report.seconds}
    del cand
    return report
