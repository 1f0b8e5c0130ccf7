"""Sweeps, the CAA baseline and tuning, on top of :mod:`cna_export.evaluation.evaluator`.

Conditions
    CNA circuits of several sizes x multipliers and CAA strengths, all from one set of discovery
    statistics (:mod:`cna_export.evaluation.saved_stats`, which also derives the CAA vectors), run
    against the unsteered baseline; their tables (CSV, markdown) and plots.

Tuning
    Grid over circuit size x multiplier on a tuning split of the harmful set:
    minimise refusals subject to quality >= ``quality_ratio`` x the unsteered
    model's quality on the same prompts and benign KL <= ``max_kl``; ties go to
    the smaller circuit, then the multiplier nearer 1, then the lower KL.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..core.circuit import Circuit
from ..core.errors import CnaError
from .evaluator import JUDGE_COLUMNS, METRIC_COLUMNS, Condition, ConditionResult, Evaluator, markdown_table
from .interventions import Steering
from .saved_stats import SavedStats

# ---------------------------------------------------------------------------------------
# Conditions
# ---------------------------------------------------------------------------------------


def fraction_label(fraction: float) -> str:
    return f"{100 * fraction:.3g}%"


def cna_conditions(
    saved: SavedStats, fractions: Sequence[float], multipliers: Sequence[float], force: bool = False
) -> list[Condition]:
    out = []
    for f in fractions:
        k = saved.size_for(f)
        circuit = saved.circuit(k)
        for m in multipliers:
            label = f"CNA {fraction_label(f)} ({k}) x{m:g}"
            info = {"method": "cna", "fraction": f, "neurons": k, "multiplier": m}
            out.append(Condition(label, Steering.cna(circuit, m, label=label, force=force), None, info))
    return out


def caa_conditions(saved: SavedStats, alphas: Sequence[float], layers: Sequence[int] | None = None) -> list[Condition]:
    out = []
    for a in alphas:
        label = f"CAA alpha={a:g}"
        n_layers = len(layers) if layers is not None else saved.identity.num_layers
        info = {"method": "caa", "alpha": a, "caa_layers": n_layers}
        out.append(Condition(label, Steering.caa(saved.caa, a, layers, label=label), None, info))
    return out


def parse_layers(text: str | None, num_layers: int) -> list[int] | None:
    """``all`` / None, or ``1-23`` / ``1,2,5`` style layer lists."""
    if text is None or text.strip().lower() == "all":
        return None
    out: set[int] = set()
    try:
        for part in text.replace(" ", "").split(","):
            if not part:
                continue
            if "-" in part:
                a, b = part.split("-", 1)
                lo = int(a)
                hi = int(b) if b else num_layers - 1
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
    except ValueError:
        raise CnaError(f"cannot read layer list '{text}' (use all, 1-23 or 1,2,5)") from None
    bad = [l for l in out if not 0 <= l < num_layers]
    if bad:
        raise CnaError(f"layer {bad[0]} is out of range (model has {num_layers} layers)")
    return sorted(out)


def run_conditions(ev: Evaluator, conditions: Sequence[Condition]) -> list[ConditionResult]:
    """Run the baseline then each condition; multiplier 1 (no change) reuses the baseline's answers."""
    base = ev.baseline()
    out = []
    for c in conditions:
        if c.info.get("method") == "cna" and c.info.get("multiplier") == 1:
            summary = {**base.summary, **c.info, "label": c.label, "identical_to": base.label,
                       "steering": c.steering.describe(), "seconds": 0.0}
            res = ConditionResult(c.label, summary, [], base.harmful_refused)
            ev.results.append(res)
            out.append(res)
            continue
        out.append(ev.run(c))
    return out


# ---------------------------------------------------------------------------------------
# Tables and plots
# ---------------------------------------------------------------------------------------

CSV_COLUMNS = [
    "label", "method", "fraction", "neurons", "multiplier", "alpha", "caa_layers", "harmful_n", "refused",
    "refusal_rate", "refusal_ci95", "benign_n", "over_refused", "over_refusal_rate", "quality_harmful",
    "quality_ratio", "quality_compliant", "quality_benign",
    "kl_last", "kl_gen", "refusals_removed", "refusals_added", "mcnemar_p",
    "generated_tokens", "seconds",
]


def sweep_csv(summaries: Sequence[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    for s in summaries:
        row = []
        for k in CSV_COLUMNS:
            v = s.get(k)
            if k == "refusal_ci95" and v is not None:
                v = f"{v[0]:.4f}-{v[1]:.4f}"
            elif isinstance(v, float):
                v = f"{v:.6g}"
            row.append("" if v is None else v)
        w.writerow(row)
    return buf.getvalue()


SWEEP_COLUMNS = [
    ("label", "condition"),
    ("neurons", "neurons"),
    ("multiplier", "multiplier"),
    ("alpha", "CAA alpha"),
    *METRIC_COLUMNS,
    ("mcnemar_p", "McNemar p"),
    *JUDGE_COLUMNS,
]


def sweep_markdown(summaries: Sequence[dict]) -> str:
    return markdown_table(summaries, SWEEP_COLUMNS)


def _plt() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CnaError("plots need matplotlib (pip install 'cna-export[plots]')") from None
    return plt


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)


def plot_sweep(out_dir: Path, summaries: Sequence[dict], circuits: dict[str, Circuit] | None = None,
               num_layers: int | None = None, title: str = "") -> list[Path]:
    """refusal/quality vs multiplier (one line per circuit size), CAA vs alpha, trade-off, circuit layers."""
    plt = _plt()
    written: list[Path] = []
    base = next((s for s in summaries if s.get("method") == "none"), None)
    cna = [s for s in summaries if s.get("method") == "cna" and s.get("multiplier") is not None]
    caa = [s for s in summaries if s.get("method") == "caa"]
    by_size: dict[int, list[dict]] = {}
    for s in cna:
        by_size.setdefault(int(s["neurons"]), []).append(s)

    def finish(fig: Any, ax: Any, xlabel: str, ylabel: str, fname: str, grid: bool = True) -> None:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if grid:
            ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = out_dir / fname
        _save(fig, path)
        written.append(path)

    def line_plot(key: str, ylabel: str, fname: str, benign_key: str | None = None) -> None:
        fig, ax = plt.subplots(figsize=(6, 4))
        for k, rows in sorted(by_size.items()):
            if base is not None and not any(r["multiplier"] == 1 for r in rows):
                rows = rows + [{**base, "multiplier": 1.0, "fraction": rows[0].get("fraction")}]  # x1 = unsteered
            rows = sorted(rows, key=lambda r: r["multiplier"])
            frac = rows[0].get("fraction")
            name = f"{fraction_label(frac)} ({k} neurons)" if frac else f"{k} neurons"
            line = ax.plot([r["multiplier"] for r in rows], [r[key] for r in rows], marker="o", label=name)
            if benign_key and all(r.get(benign_key) is not None for r in rows):
                ax.plot([r["multiplier"] for r in rows], [r[benign_key] for r in rows], marker="x", linestyle=":",
                        color=line[0].get_color(), label=f"{name}, benign")
        if base is not None and base.get(key) is not None:
            ax.axhline(base[key], color="grey", linestyle="--", label="unsteered")
        if title:
            ax.set_title(title)
        finish(fig, ax, "multiplier on circuit neurons (1 = unchanged)", ylabel, fname)

    if by_size:
        line_plot("refusal_rate", "refusal rate (harmful)", "refusal_vs_multiplier.png", "over_refusal_rate")
        line_plot("quality_harmful", "quality (distinct word 4-grams)", "quality_vs_multiplier.png", "quality_benign")
    if caa:
        rows = sorted(caa, key=lambda r: r["alpha"])
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [r["alpha"] for r in rows]
        ax.plot(xs, [r["refusal_rate"] for r in rows], marker="o", label="refusal (harmful)")
        ax.plot(xs, [r["quality_harmful"] for r in rows], marker="s", label="quality (harmful)")
        if all(r.get("over_refusal_rate") is not None for r in rows):
            ax.plot(xs, [r["over_refusal_rate"] for r in rows], marker="x", linestyle=":",
                    label="over-refusal (benign)")
        finish(fig, ax, "CAA strength alpha (added alpha * mean MLP-output difference)", "rate / quality",
               "caa_vs_alpha.png")
    if cna or caa:
        fig, ax = plt.subplots(figsize=(6, 4))
        if cna:
            ax.scatter([s["quality_harmful"] for s in cna], [s["refusal_rate"] for s in cna], label="CNA", marker="o")
            for s in cna:
                ax.annotate(f"{s['neurons']}x{s['multiplier']:g}", (s["quality_harmful"], s["refusal_rate"]),
                            fontsize=6)
        if caa:
            ax.scatter([s["quality_harmful"] for s in caa], [s["refusal_rate"] for s in caa], label="CAA", marker="s")
            for s in caa:
                ax.annotate(f"a={s['alpha']:g}", (s["quality_harmful"], s["refusal_rate"]), fontsize=6)
        if base is not None:
            ax.scatter([base["quality_harmful"]], [base["refusal_rate"]], color="black", marker="*", s=120,
                       label="unsteered")
        finish(fig, ax, "quality (harmful answers)", "refusal rate", "tradeoff.png")
    with_kl = [x for x in cna + caa if x.get("kl_last") is not None]
    if with_kl:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, rows, marker in (("CNA", [x for x in with_kl if x["method"] == "cna"], "o"),
                                   ("CAA", [x for x in with_kl if x["method"] == "caa"], "s")):
            if not rows:
                continue
            ax.scatter([x["kl_last"] for x in rows], [x["refusal_rate"] for x in rows], label=name, marker=marker)
            for x in rows:
                tag = f"{x['neurons']}x{x['multiplier']:g}" if name == "CNA" else f"a={x['alpha']:g}"
                ax.annotate(tag, (x["kl_last"], x["refusal_rate"]), fontsize=6)
        if base is not None:
            ax.axhline(base["refusal_rate"], color="grey", linestyle="--", label="unsteered refusal")
        finish(fig, ax, "drift: KL(unsteered || steered), first answer token, benign prompts (nats)", "refusal rate",
               "tradeoff_kl.png")
    if circuits:
        L = num_layers or 1 + max(n.layer for c in circuits.values() for n in c.neurons)
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / max(1, len(circuits))
        for i, (name, c) in enumerate(circuits.items()):
            counts = np.zeros(L)
            for n in c.neurons:
                counts[n.layer] += 1
            ax.bar(np.arange(L) + i * width - 0.4 + width / 2, counts, width=width, label=name)
        ax.set_xticks(range(0, L, max(1, L // 12)))
        ax.set_title("where the circuit lives")
        finish(fig, ax, "layer", "circuit neurons", "circuit_layers.png", grid=False)
    return written


# ---------------------------------------------------------------------------------------
# Tuning
# ---------------------------------------------------------------------------------------


@dataclass
class TuneChoice:
    summary: dict | None
    feasible: list[dict]
    rejected: list[tuple[dict, str]]
    reference_quality: float | None


QUALITY_KEYS = {"harmful": "quality_harmful", "compliant": "quality_compliant", "benign": "quality_benign"}


def choose(summaries: Sequence[dict], baseline: dict, quality_ratio: float, max_kl: float | None,
           kl_key: str = "kl_last", quality_key: str = "quality_harmful") -> TuneChoice:
    """The feasible CNA condition with the fewest refusals (ties: fewer neurons, multiplier nearer 1, lower KL).

    ``quality_key``: ``quality_harmful`` (all harmful answers, the default), ``quality_compliant``
    (answers not judged refusals: free of the short-refusal confound) or ``quality_benign``.
    """
    ref_q = baseline.get(quality_key)
    feasible, rejected = [], []
    for s in summaries:
        if s.get("method") != "cna":
            continue
        q = s.get(quality_key)
        kl = s.get(kl_key)
        if ref_q is not None and q is not None and q < quality_ratio * ref_q:
            rejected.append((s, f"quality {q:.3f} < {quality_ratio:g} x {ref_q:.3f}"))
        elif max_kl is not None and kl is not None and kl > max_kl:
            rejected.append((s, f"{kl_key} {kl:.4f} > {max_kl:g}"))
        else:
            feasible.append(s)
    key = lambda s: (s["refused"], s["neurons"], abs(1 - s["multiplier"]), s.get(kl_key) or 0.0)  # noqa: E731
    best = min(feasible, key=key) if feasible else None
    return TuneChoice(best, feasible, rejected, ref_q)


def tuned_recipe_yaml(base_recipe: str | Path | None, out_dir: Path, choice: dict, saved: SavedStats,
                      notes: dict) -> str:
    """The base recipe plus ``top_k``/``top_fraction`` and ``multiplier`` (prompt paths made relative to out_dir)."""
    import yaml

    data: dict[str, Any] = {}
    if base_recipe is not None:
        data = yaml.safe_load(Path(base_recipe).read_text("utf-8")) or {}
        for key in ("positive", "negative", "neutral"):
            if isinstance(data.get(key), str):
                src = (Path(base_recipe).parent / data[key]).resolve()
                data[key] = os.path.relpath(src, out_dir.resolve())
    else:
        o = saved.options
        for key in ("positive", "negative", "neutral"):
            v = getattr(o, key)
            if v:
                data[key] = os.path.relpath(Path(v).resolve(), out_dir.resolve())
    data.pop("top_k", None)
    data.update(choice.get("overrides") or {})  # a searched strategy's discovery settings
    data["top_fraction"] = (float(choice["fraction"]) if choice.get("fraction")
                            else choice["neurons"] / saved.total_neurons)
    data["top_k"] = int(choice["neurons"])
    if choice.get("multiplier") is not None:
        data["multiplier"] = float(choice["multiplier"])
    elif choice.get("kl_weight") is None:  # per-neuron (mean-match) multipliers: discovery computes them
        data.pop("multiplier", None)
    # learned multipliers: discovery fits them again, from the recipe's multiplier as before
    data["tuned"] = notes
    header = ("# Tuned by cna-export tune: circuit size (top_k) and multiplier chosen on a tuning split.\n"
              "# 'tuned' records the objective, the constraints and the measured figures.\n")
    return header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
