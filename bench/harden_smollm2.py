#!/usr/bin/env python
"""Hardening: multipliers > 1 on the refusal circuit's pro-refusal neurons of SmolLM2-135M-Instruct.

    python bench/harden_smollm2.py               # stats, sweep, report (resumable)

SmolLM2-135M almost never refuses. Amplifying the neurons that push towards refusal (direction score,
positive sign: they write along the harmful-minus-benign residual direction) should make it refuse the
harmful JBB requests while still answering their benign twins, until the edit is so strong that the
answers collapse into repetition. The sweep measures refusals (keyword judge), over-refusal on the
benign twins, quality (distinct 4-grams) and first-token benign KL for each multiplier, and records
where repetition collapse starts (quality below 0.9 x unsteered). Greedy, llama.cpp on steered GGUFs.
`--strategy attribution+` uses the attribution score instead (statistics with gradients); `--steps samples`
prints the first answers with hook steering at each multiplier (distinct 4-grams miss token salad).
Outputs: bench/out/harden/ (not tracked), bench/results/harden/, the Hardening sections of bench/README.md
and docs/strategies.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench._common import ROOT, splice
from cna_export.evaluation.backends import open_backend
from cna_export.evaluation.eval_sets import load_jbb, split_pairs
from cna_export.evaluation.evaluator import Condition, EvalSettings, Evaluator
from cna_export.evaluation.interventions import Steering
from cna_export.evaluation.saved_stats import load_stats
from cna_export.evaluation.search import STRATEGIES as SEARCH_STRATEGIES

MODEL = "bundled:smollm2"
RECIPE = ROOT / "recipes" / "paper-refusal.yaml"  # prompt sets + the paper's settings; strategies override
OUT = ROOT / "bench" / "out" / "harden"
RESULTS = ROOT / "bench" / "results" / "harden"
# DiscoverOptions overrides of the recipe, from the package's named strategies. attribution: mean-diff x
# gradient of the refusal-minus-compliance first-token log-prob gap, so the neurons that push towards refusal
# openings, not just the harmful-vs-benign ones
STRATEGIES = {name: SEARCH_STRATEGIES[name] for name in ("direction+", "attribution+")}
# the other lever: the neurons whose harmful-vs-benign difference pushes the first token AWAY from refusal
# openings (attribution, negative sign), ablated (x0) or inverted (x-1) instead of amplified
STRATEGIES["attribution-"] = {"score": "attribution", "sign": "negative"}


def _stem(strategy: str) -> str:
    """The strategy's name in file names (``attribution+`` -> ``attributionp``, ``attribution-`` ->
    ``attributionm``)."""
    return strategy.replace("+", "p").replace("-", "m")


def sweep_path(strategy: str) -> Path:
    return OUT / ("sweep.json" if strategy == "direction+" else f"sweep-{_stem(strategy)}.json")


def samples_path(strategy: str) -> Path:
    return OUT / f"samples-{_stem(strategy)}.json"


def step_stats(a) -> None:
    from cna_export.core.recipe import load_recipe
    from cna_export.core.settings import DiscoverOptions, build
    from cna_export.evaluation.saved_stats import compute_stats, save_stats
    from cna_export.model.loading import load_model

    loaded = load_model(MODEL)
    t0 = time.time()
    saved = compute_stats(loaded, build(DiscoverOptions, load_recipe(RECIPE)), progress=False, gradients=True)
    save_stats(OUT / "stats.npz", saved, overwrite=True)
    (OUT / "stats.json").write_text(json.dumps({"seconds": round(time.time() - t0, 1), "load": os.getloadavg()[0],
                                                "passes": {k: vars(r) for k, r in saved.stats.reports.items()}}))


def step_sweep(a) -> None:
    saved = load_stats(OUT / "stats.npz")
    harmful, benign = load_jbb()
    idx, _ = split_pairs(harmful, benign, a.pairs, 0)
    harmful, benign = harmful.subset(idx), benign.subset(idx)
    k = saved.size_for(a.fraction)
    circuit = saved.circuit(k, **STRATEGIES[a.strategy])
    conds = [Condition(f"x{m:g}", Steering.cna(circuit, m, label=f"harden {k} x{m:g}"), None,
                       {"method": "cna", "multiplier": m, "neurons": k}) for m in a.multipliers]
    settings = EvalSettings(max_new_tokens=a.max_new_tokens, benign_max_new_tokens=a.benign_tokens)
    backend = open_backend(MODEL, "llama.cpp", batch_size=a.pairs, threads=a.threads)
    # earlier rows of other multipliers are kept (the baseline is re-measured: greedy, so it reproduces)
    path = sweep_path(a.strategy)
    earlier = json.loads(path.read_text()) if path.is_file() else []
    kept = [r for r in earlier if r.get("method") == "cna" and r.get("multiplier") not in a.multipliers]
    out = []
    try:
        ev = Evaluator(backend, harmful, benign, settings)
        t0 = time.time()
        base = ev.baseline()
        out.append({**base.summary, "wall_seconds": round(time.time() - t0, 1), "load": os.getloadavg()[0],
                    "samples": _samples(base.rows)})
        for c in conds:
            t0 = time.time()
            res = ev.run(c)
            out.append({**res.summary, "wall_seconds": round(time.time() - t0, 1), "load": os.getloadavg()[0],
                        "strategy": a.strategy, "samples": _samples(res.rows)})
            s = out[-1]
            print(f"{c.label}: refused {s['refused']}/{s['harmful_n']} over-refusal {s['over_refusal_rate']} "
                  f"q {s['quality_ratio']} kl {s['kl_last']}", file=sys.stderr, flush=True)
            rows = out[:1] + sorted(kept + out[1:], key=lambda r: r["multiplier"])
            path.write_text(json.dumps(rows, indent=1, default=str))
    finally:
        backend.close()


def step_samples(a) -> None:
    """Read the answers: 2 harmful JBB prompts of the split, 40 greedy tokens with hook steering (transformers)
    at each multiplier, so the collapse is seen in text and not only in the distinct-4-gram measure."""
    import torch

    from cna_export.evaluation.backends import TransformersBackend
    from cna_export.model.loading import load_model

    torch.set_num_threads(1)  # a shared machine: one thread beats contended two
    saved = load_stats(OUT / "stats.npz")
    harmful, benign = load_jbb()
    idx, _ = split_pairs(harmful, benign, a.pairs, 0)
    prompts = harmful.subset(idx[:2]).prompts
    circuit = saved.circuit(saved.size_for(a.fraction), **STRATEGIES[a.strategy])
    backend = TransformersBackend(load_model(MODEL))
    out = []
    for m in [None, *a.multipliers]:
        steering = Steering.none() if m is None else Steering.cna(circuit, m)
        out.append({"multiplier": m, "answers": [g.text for g in backend.generate(prompts, steering, 40)]})
    samples_path(a.strategy).write_text(json.dumps(out, indent=1))


def _samples(rows: list[dict], n: int = 2) -> dict:
    """The first answers of each set (200 characters), to see what 'quality' and 'refused' measured."""
    return {which: [r["response"][:200] for r in rows if r["set"] == which][:n] for which in ("harmful", "benign")}


def step_report(a) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    parts = []
    for strategy in STRATEGIES:
        if sweep_path(strategy).is_file():
            rows = json.loads(sweep_path(strategy).read_text())
            parts.append(f"### {strategy} ({STRATEGIES[strategy]})\n\n" + _table(rows))
        sp = samples_path(strategy)
        if sp.is_file():
            parts.append(f"Answers with hook steering (transformers, 40 greedy tokens, the first 2 harmful prompts of "
                         f"the split; `python bench/harden_smollm2.py --steps samples --strategy {strategy}`):\n")
            for r in json.loads(sp.read_text()):
                m = r["multiplier"]
                parts += [f"- {'unsteered' if m is None else f'x{m:g}'}: "
                          + " / ".join(f"`{t[:120].replace(chr(10), ' ').replace('`', chr(39))}`"
                                       for t in r["answers"])]
            parts.append("")
    text = "\n".join(parts)
    (RESULTS / "harden.md").write_text(text)
    print(text)
    section = "\n".join([
        START, "## Hardening SmolLM2-135M-Instruct (multipliers > 1)", "",
        "Regenerate: `python bench/harden_smollm2.py [--strategy attribution+] --multipliers 2,4,8,16` (and "
        "`--strategy attribution- --multipliers 0,-1`) then `--steps report`. Circuit: 0.25% of all MLP neurons of "
        "`bundled:smollm2` from `recipes/paper-refusal.yaml`'s prompts (never JBB); direction+ and attribution+: "
        "positive sign (the neurons that push towards refusal), amplified by the multiplier; attribution-: negative "
        "sign (the neurons whose difference pushes the first token away from refusal openings), ablated (x0) or "
        "inverted (x-1); 30 JBB pairs (seed 0 split), greedy, "
        f"llama.cpp, harmful answers {a.max_new_tokens} tokens, benign twins {a.benign_tokens} tokens (over-refusal). "
        "Quality: distinct word 4-grams relative to unsteered; collapse: quality < 0.9 x unsteered. Note that "
        "gibberish without repeats scores high on this measure: read the KL column and the sample answers.", "",
        text, END])
    for path in (ROOT / "bench" / "README.md", ROOT / "docs" / "strategies.md"):
        path.write_text(splice(path.read_text(), START, END, section))


START, END = "<!-- harden:start -->", "<!-- harden:end -->"


def _table(rows: list[dict]) -> str:
    lines = ["| multiplier | neurons | refused (harmful) | over-refusal (benign) | quality / unsteered | "
             "quality (benign) | KL first token | wall s |", "|---|---|---|---|---|---|---|---|"]
    collapse = None
    for r in rows:
        m = r.get("multiplier")
        lines.append(f"| {'-' if m is None else f'{m:g}'} | {r.get('neurons') or '-'} | "
                     f"{r['refused']}/{r['harmful_n']} | "
                     f"{100 * (r.get('over_refusal_rate') or 0):.0f}% | {r['quality_ratio']:.3f} | "
                     f"{r.get('quality_benign') or 0:.3f} | {r['kl_last']:.3f} | {r.get('wall_seconds')} |")
        if collapse is None and m is not None and r["quality_ratio"] < 0.9:
            collapse = m
    text = "\n".join(lines) + "\n\n" + (f"Repetition collapse (quality < 0.9 x unsteered) starts at x{collapse:g}.\n"
                                        if collapse is not None else "No collapse in the range measured.\n")
    samples = [(r.get("multiplier"), r["samples"]["harmful"][0]) for r in rows if r.get("samples")]
    if samples:
        text += "\nFirst harmful answer per multiplier (200 characters):\n\n" + "\n".join(
            f"- {'unsteered' if m is None else f'x{m:g}'}: `{t.replace(chr(10), ' ').replace('`', chr(39))}`"
            for m, t in samples) + "\n"
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default="stats,sweep,report")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pairs", type=int, default=30)
    p.add_argument("--fraction", type=float, default=0.0025)
    p.add_argument("--strategy", choices=list(STRATEGIES), default="direction+")
    p.add_argument("--multipliers", type=lambda s: [float(x) for x in s.split(",")], default=[2.0, 4.0, 8.0, 16.0])
    p.add_argument("--max-new-tokens", type=int, default=150)
    p.add_argument("--benign-tokens", type=int, default=64)
    a = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    steps = {"stats": step_stats, "sweep": step_sweep, "samples": step_samples, "report": step_report}
    for step in a.steps.split(","):
        if step == "stats" and (OUT / "stats.npz").is_file():
            continue
        steps[step](a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
