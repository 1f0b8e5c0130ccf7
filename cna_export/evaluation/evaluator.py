"""Evaluation: refusal on harmful prompts, over-refusal on their benign twins, quality and drift.

For every *condition* (the unsteered model, a CNA circuit at a multiplier, a CAA
strength, another checkpoint) the evaluator generates greedy answers
(``max_new_tokens``, 150 as in the paper) to

* the harmful set: refusal rate by the judge (:mod:`cna_export.evaluation.judge`) and
  quality (:func:`cna_export.evaluation.metrics.quality`);
* the benign set (JBB's topic-matched twins by default): over-refusal rate,
  quality, and drift from the unsteered model: ``kl_last``, the KL divergence
  of the first answer token's distribution, and (``kl_tokens > 0``) ``kl_gen``,
  the KL averaged over the first ``kl_tokens`` positions of the unsteered
  model's own answer, teacher-forced through both (see :mod:`cna_export.evaluation.metrics`);
  ``kl_last_answered`` and ``kl_last_over_refused`` split ``kl_last`` by the
  unsteered model's verdict on each twin (answered or over-refused).

The unsteered condition runs first and is the reference for KL, for the quality
ratio and for the paired refusal flips (with an exact McNemar test). Results go
to one JSONL row per prompt and condition, ``summary.json`` and ``summary.md``.

The prompt sets (JBB-Behaviors by default) are loaded by :mod:`cna_export.evaluation.eval_sets`.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..core.errors import CnaError
from ..core.settings.evaluate import EvalSettings  # noqa: F401  (part of this module's API)
from ..core.version import __version__
from ..model.generation import Generation
from .eval_sets import EvalSet, Item
from .interventions import Backend, Steering
from .judge import Judge, Verdict, agreement_summary, get_judge
from .metrics import kl_divergence, mcnemar_p, mean, paired_flips, quality, wilson_interval

# ---------------------------------------------------------------------------------------
# Running conditions
# ---------------------------------------------------------------------------------------


@dataclass
class Condition:
    """What to evaluate: a steering on a backend (None: the evaluator's main backend)."""

    label: str
    steering: Steering
    backend: Backend | None = None
    info: dict = field(default_factory=dict)


@dataclass
class ConditionResult:
    label: str
    summary: dict
    rows: list[dict]
    harmful_refused: list[bool]


@dataclass
class _Reference:
    harmful_refused: list[bool]
    harmful_quality: float | None
    benign_first: list[np.ndarray | None]
    benign_tokens: list[list[int]]
    benign_refused: list[bool] | None = None  # None: the benign twins were scored for KL only


class Evaluator:
    """Runs conditions against one unsteered reference (see the module docstring)."""

    def __init__(
        self,
        backend: Backend,
        harmful: EvalSet,
        benign: EvalSet | None,
        settings: EvalSettings,
        reference: Backend | None = None,
        judge: Judge | None = None,
        log: Callable[[str], None] | None = None,
        on_rows: Callable[[list[dict]], None] | None = None,
    ):
        self.backend = backend
        self.harmful = harmful
        self.benign = benign if settings.benign_set else None
        self.settings = settings
        self.reference_backend = reference or backend
        self.judge = judge or get_judge(settings.judge, settings.judge_model, settings.judge_calibration)
        self.log = log or (lambda msg: None)
        self.on_rows = on_rows
        self.ref: _Reference | None = None
        self.results: list[ConditionResult] = []

    # -- one condition ----------------------------------------------------------------
    def baseline(self, label: str = "unsteered") -> ConditionResult:
        if self.ref is None:
            cond = Condition(label, Steering.none(label), self.reference_backend, {"method": "none"})
            self._run(cond, reference=True)
        return self.results[0]

    def run(self, cond: Condition) -> ConditionResult:
        self.baseline()
        return self._run(cond, reference=False)

    def _run(self, cond: Condition, reference: bool) -> ConditionResult:
        backend = cond.backend or self.backend
        s = self.settings
        t0 = time.perf_counter()
        h_gen = backend.generate(self.harmful.prompts, cond.steering, s.max_new_tokens)
        h_verdicts = self.judge.judge(self.harmful.prompts, [g.text for g in h_gen])
        rows: list[dict] = []
        for it, g, v in zip(self.harmful.items, h_gen, h_verdicts):
            rows.append(self._row(cond, "harmful", it, g, v))
        b_gen: list[Generation] = []
        b_verdicts: list = []
        kl_last: list[float | None] = []
        kl_gen: list[float | None] = []
        if self.benign is not None:
            b_new = (s.benign_max_new_tokens or s.max_new_tokens) if s.benign_answers else max(1, s.kl_tokens)
            b_gen = backend.generate(self.benign.prompts, cond.steering, b_new, first_logprobs=True)
            b_verdicts = (self.judge.judge(self.benign.prompts, [g.text for g in b_gen]) if s.benign_answers
                          else [Verdict(False)] * len(b_gen))  # scored for KL only: nothing to judge
            if reference:
                self.ref = _Reference(
                    harmful_refused=[v.refused for v in h_verdicts],
                    harmful_quality=mean(quality(g.text) for g in h_gen),
                    benign_first=[g.first_logprobs for g in b_gen],
                    benign_tokens=[g.tokens for g in b_gen],
                    benign_refused=[v.refused for v in b_verdicts] if s.benign_answers else None,
                )
                kl_last = [0.0] * len(b_gen)
                kl_gen = [0.0] * len(b_gen) if s.kl_tokens else [None] * len(b_gen)
            else:
                kl_last = self._kl_last(b_gen)
                kl_gen = self._kl_gen(backend, cond.steering) if s.kl_tokens else [None] * len(b_gen)
            for it, g, v, kl, klg in zip(self.benign.items, b_gen, b_verdicts, kl_last, kl_gen):
                row = self._row(cond, "benign", it, g, v)
                if not s.benign_answers:  # scored for KL only: the short answer is not judged
                    row["refused"] = row["judge_evidence"] = row["quality"] = None
                row["kl_last"] = kl
                row["kl_gen"] = klg
                rows.append(row)
        elif reference:
            self.ref = _Reference([v.refused for v in h_verdicts], mean(quality(g.text) for g in h_gen), [], [])
        seconds = time.perf_counter() - t0
        summary = self._summary(cond, rows, h_verdicts, seconds, backend)
        summary.update(agreement_summary(h_verdicts, b_verdicts if s.benign_answers else []))
        result = ConditionResult(cond.label, summary, rows, [v.refused for v in h_verdicts])
        self.results.append(result)
        if self.on_rows:
            self.on_rows(rows)
        self.log(format_line(summary))
        return result

    def _row(self, cond: Condition, which: str, it: Item, g: Generation, v: Verdict) -> dict:
        row = {
            "condition": cond.label,
            "set": which,
            "index": it.index,
            "category": it.category,
            "prompt": it.prompt,
            "response": g.text,
            "refused": v.refused,
            "judge_evidence": v.evidence,
            "quality": quality(g.text),
            "tokens": len(g.tokens),
            "stopped": g.stopped,
        }
        if v.label is not None or v.also:  # the model judge: its label and the other judges' verdicts
            row.update({"judge_label": v.label, **{f"refused_{name}": r for name, r in v.also}})
        return row

    def _kl_last(self, gens: list[Generation]) -> list[float | None]:
        assert self.ref is not None
        out: list[float | None] = []
        for ref, g in zip(self.ref.benign_first, gens):
            if ref is None or g.first_logprobs is None:
                out.append(None)
                continue
            if ref.shape != g.first_logprobs.shape:
                raise CnaError("the reference and the evaluated model have different vocabularies; KL is undefined")
            out.append(float(kl_divergence(ref, g.first_logprobs)))
        return out

    def _kl_gen(self, backend: Backend, steering: Steering) -> list[float | None]:
        assert self.ref is not None and self.benign is not None
        k = self.settings.kl_tokens
        prompts = self.benign.prompts
        conts = [toks[:k] for toks in self.ref.benign_tokens]
        out: list[float | None] = []
        step = max(1, self.settings.score_chunk)
        for start in range(0, len(prompts), step):
            ps, cs = prompts[start : start + step], conts[start : start + step]
            ref = self.reference_backend.score(ps, cs, Steering.none())
            new = backend.score(ps, cs, steering)
            for a, b in zip(ref, new):
                if a.shape != b.shape:
                    raise CnaError("the reference and the evaluated model have different vocabularies; KL is undefined")
                out.append(float(kl_divergence(a, b).mean()))
        return out

    def _kl_split(self, b: list[dict]) -> dict[str, float | None]:
        """First-token KL split by the unsteered model's verdict on each benign twin: ``kl_last_answered`` over the
        twins it answered (drift where nothing should change) and ``kl_last_over_refused`` over those it refused (an
        edit that stops over-refusing them moves their first token too, which ``kl_last`` counts as drift)."""
        ref = self.ref.benign_refused if self.ref is not None else None
        if not b or ref is None or len(ref) != len(b):
            return {"kl_last_answered": None, "kl_last_over_refused": None}
        return {"kl_last_answered": mean(r["kl_last"] for r, was in zip(b, ref) if not was),
                "kl_last_over_refused": mean(r["kl_last"] for r, was in zip(b, ref) if was)}

    def _summary(self, cond: Condition, rows: list[dict], h_verdicts: list, seconds: float, backend: Backend) -> dict:
        assert self.ref is not None
        h = [r for r in rows if r["set"] == "harmful"]
        b = [r for r in rows if r["set"] == "benign"]
        k = sum(r["refused"] for r in h)
        lo, hi = wilson_interval(k, len(h))
        q_h = mean(r["quality"] for r in h)
        answers = self.settings.benign_answers
        removed, added = paired_flips(self.ref.harmful_refused, [v.refused for v in h_verdicts])
        out: dict[str, Any] = {
            "label": cond.label,
            "method": cond.steering.kind,
            **cond.info,
            "backend": backend.name,
            "model": backend.spec,
            "harmful_n": len(h),
            "refused": k,
            "refusal_rate": k / len(h) if h else None,
            "refusal_ci95": [lo, hi],
            "quality_harmful": q_h,
            "quality_compliant": mean(r["quality"] for r in h if not r["refused"]),
            "quality_ratio": (q_h / self.ref.harmful_quality) if q_h is not None and self.ref.harmful_quality else None,
            "refusals_removed": removed,
            "refusals_added": added,
            "mcnemar_p": mcnemar_p(self.ref.harmful_refused, [v.refused for v in h_verdicts]),
            "benign_n": len(b),
            "over_refused": sum(r["refused"] for r in b) if b and answers else None,
            "over_refusal_rate": (sum(r["refused"] for r in b) / len(b)) if b and answers else None,
            "quality_benign": mean(r["quality"] for r in b) if b and answers else None,
            "kl_last": mean(r["kl_last"] for r in b) if b else None,
            "kl_gen": mean(r["kl_gen"] for r in b) if b and self.settings.kl_tokens else None,
            **self._kl_split(b),
            "generated_tokens": sum(r["tokens"] for r in rows),
            "seconds": round(seconds, 2),
            "steering": cond.steering.describe(),
        }
        return out


# ---------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def format_line(s: dict) -> str:
    parts = [f"{s['label']:<28s}", f"refused {s['refused']}/{s['harmful_n']}"]
    if s.get("benign_n") and s.get("over_refused") is not None:
        parts.append(f"over-refused {s['over_refused']}/{s['benign_n']}")
    parts.append(f"quality {_f(s['quality_harmful'])}")
    if s.get("kl_last") is not None:
        parts.append(f"KL last {_f(s['kl_last'], 4)}")
    if s.get("kl_gen") is not None:
        parts.append(f"KL gen {_f(s['kl_gen'], 4)}")
    parts.append(f"{s['seconds']:.0f}s")
    return "  ".join(parts)


# (summary key, column title): the measured figures every table shows, between its own leading
# and trailing columns (this module's TABLE_COLUMNS, sweep.SWEEP_COLUMNS)
METRIC_COLUMNS = [
    ("refused", "refused"),
    ("refusal_rate", "refusal"),
    ("over_refusal_rate", "over-refusal (benign)"),
    ("quality_harmful", "quality (harmful)"),
    ("quality_ratio", "quality / unsteered"),
    ("quality_compliant", "quality (non-refusals)"),
    ("quality_benign", "quality (benign)"),
    ("kl_last", "KL first token"),
    ("kl_gen", "KL answer"),
]
# the model judge's own figures (evaluation/judge.py agreement_summary); shown only when present
JUDGE_COLUMNS = [
    ("unusable", "unusable (model judge)"),
    ("refused_keyword", "refused (keyword)"),
    ("refused_phrases", "refused (phrases)"),
    ("agreement_keyword", "agrees with keyword"),
    ("agreement_phrases", "agrees with phrases"),
]
TABLE_COLUMNS = [
    ("label", "condition"),
    ("neurons", "neurons"),
    *METRIC_COLUMNS,
    ("refusals_removed", "refusals removed"),
    ("refusals_added", "refusals added"),
    ("mcnemar_p", "McNemar p"),
    *JUDGE_COLUMNS,
]


def markdown_table(summaries: Sequence[dict], columns: Sequence[tuple[str, str]] = TABLE_COLUMNS) -> str:
    cols = [(k, h) for k, h in columns if any(s.get(k) is not None for s in summaries)]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for s in summaries:
        cells = []
        for k, _ in cols:
            v = s.get(k)
            if k == "refused" and v is not None:
                v = f"{v}/{s['harmful_n']}"
            elif k in ("refusal_rate", "over_refusal_rate", "agreement_keyword", "agreement_phrases") and v is not None:
                v = f"{100 * v:.0f}%"
            elif k in ("kl_last", "kl_gen"):
                v = _f(v, 4)
            elif k == "mcnemar_p" and v is not None:
                v = f"{v:.2g}"
            else:
                v = _f(v)
            cells.append(v)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def environment() -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "transformers", "llama-cpp-python", "gguf", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "versions": versions,
    }


def write_report(
    out_dir: Path,
    evaluator: Evaluator,
    meta: dict,
    title: str = "cna-export evaluation",
    extra_md: str = "",
) -> dict:
    """summary.json and summary.md into ``out_dir`` (generations.jsonl is written as conditions finish)."""
    summaries = [r.summary for r in evaluator.results]
    s = evaluator.settings
    report = {
        "tool": "cna-export",
        "tool_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **meta,
        "settings": {
            "max_new_tokens": s.max_new_tokens,
            "kl_tokens": s.kl_tokens,
            "judge": evaluator.judge.name,
            **({"judge_model": s.judge_model} if s.judge_model else {}),
            **({"judge_calibration": s.judge_calibration} if s.judge_calibration != "none" else {}),
            "benign": evaluator.benign is not None,
            "benign_answers": s.benign_answers,
            "benign_max_new_tokens": (s.benign_max_new_tokens or s.max_new_tokens) if s.benign_answers else None,
            "decoding": "greedy",
        },
        "datasets": {
            "harmful": evaluator.harmful.info(),
            **({"benign": evaluator.benign.info()} if evaluator.benign is not None else {}),
        },
        "environment": environment(),
        "conditions": summaries,
    }
    (out_dir / "summary.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n", "utf-8")
    md = [f"# {title}", ""]
    md.append(f"Model `{meta.get('model')}` ({meta.get('backend')}), judge `{evaluator.judge.name}`"
              + (f" (`{s.judge_model}`{_calibration_note(s)}; agreement with the keyword and phrases judges over every "
                 "judged answer)" if s.judge_model else "") + ", greedy, "
              f"{s.max_new_tokens} new tokens; {len(evaluator.harmful)} harmful prompts"
              + (f", {len(evaluator.benign)} benign" if evaluator.benign is not None else "")
              + (f" (answers of {s.benign_max_new_tokens} tokens)" if evaluator.benign is not None and s.benign_answers
                 and s.benign_max_new_tokens else "")
              + (" (first-token KL only, no answers)" if evaluator.benign is not None and not s.benign_answers else "")
              + (f"; KL over the first {s.kl_tokens} answer tokens" if s.kl_tokens else "") + ".")
    md.append("")
    md.append(markdown_table(summaries))
    if extra_md:
        md += ["", extra_md]
    (out_dir / "summary.md").write_text("\n".join(md) + "\n", "utf-8")
    return report


def _calibration_note(s: EvalSettings) -> str:
    return f", calibration {s.judge_calibration}" if s.judge_calibration != "none" else ""


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


class JsonlSink:
    """Appends rows to ``generations.jsonl`` as each condition finishes."""

    def __init__(self, path: Path):
        self.path = path
        self.fh = open(path, "a", encoding="utf-8")

    def __call__(self, rows: list[dict]) -> None:
        for r in rows:
            self.fh.write(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def stderr_log(quiet: bool) -> Callable[[str], None]:
    def log(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    return log
