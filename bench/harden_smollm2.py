#!/usr/bin/env python
"""Hardening: multipliers > 1 on the refusal circuit's pro-refusal neurons of SmolLM2-135M-Instruct.

    python bench/harden_smollm2.py               # stats, sweep, report (resumable)

SmolLM2-135M almost never refuses. Amplifying the neurons that push towards refusal (direction score,
positive sign: they write along the harmful-minus-benign residual direction) should make it refuse the
harmful JBB requests while still answering their benign twins, until the edit is so strong that the
answers collapse into repetition. The sweep measures refusals (keyword judge), over-refusal on the
benign twins, quality (distinct 4-grams) and first-token benign KL for each multiplier, and records
where repetition collapse starts (quality below 0.9 x unsteered). Greedy, llama.cpp on steered GGUFs.
Outputs: bench/out/harden/ (not tracked), bench/results/harden/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cna_export.evaluation.backends import Steering, open_backend
from cna_export.evaluation.evaluator import Condition, EvalSettings, Evaluator, load_jbb, split_pairs
from cna_export.evaluation.sweep import load_stats

MODEL = "bundled:smollm2"
RECIPE = ROOT / "recipes" / "paper-refusal.yaml"  # prompt sets + the paper's settings; strategies override
OUT = ROOT / "bench" / "out" / "harden"
RESULTS = ROOT / "bench" / "results" / "harden"
STRATEGY = {"score": "direction", "sign": "positive"}


def step_stats(a) -> None:
    from cna_export.core.settings import DiscoverOptions, build, load_recipe
    from cna_export.evaluation.sweep import compute_stats, save_stats
    from cna_export.model.loading import load_model

    loaded = load_model(MODEL)
    saved = compute_stats(loaded, build(DiscoverOptions, load_recipe(RECIPE)), progress=False)
    save_stats(OUT / "stats.npz", saved, overwrite=True)


def step_sweep(a) -> None:
    saved = load_stats(OUT / "stats.npz")
    harmful, benign = load_jbb()
    idx, _ = split_pairs(harmful, benign, a.pairs, 0)
    harmful, benign = harmful.subset(idx), benign.subset(idx)
    k = saved.size_for(a.fraction)
    circuit = saved.circuit(k, **STRATEGY)
    conds = [Condition(f"x{m:g}", Steering.cna(circuit, m, label=f"harden {k} x{m:g}"), None,
                       {"method": "cna", "multiplier": m, "neurons": k}) for m in a.multipliers]
    settings = EvalSettings(max_new_tokens=a.max_new_tokens, benign_max_new_tokens=a.benign_tokens)
    backend = open_backend(MODEL, "llama.cpp", batch_size=a.pairs, threads=a.threads)
    out = []
    try:
        ev = Evaluator(backend, harmful, benign, settings)
        t0 = time.time()
        out.append({**ev.baseline().summary, "wall_seconds": round(time.time() - t0, 1)})
        for c in conds:
            t0 = time.time()
            out.append({**ev.run(c).summary, "wall_seconds": round(time.time() - t0, 1)})
            s = out[-1]
            print(f"{c.label}: refused {s['refused']}/{s['harmful_n']} over-refusal {s['over_refusal_rate']} "
                  f"q {s['quality_ratio']} kl {s['kl_last']}", file=sys.stderr, flush=True)
            (OUT / "sweep.json").write_text(json.dumps(out, indent=1, default=str))
    finally:
        backend.close()


def step_report(a) -> None:
    rows = json.loads((OUT / "sweep.json").read_text())
    base = rows[0]
    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = ["| multiplier | neurons | refused (harmful) | over-refusal (benign) | quality / unsteered | "
             "quality (benign) | KL first token | wall s |", "|---|---|---|---|---|---|---|---|"]
    collapse = None
    for r in rows:
        m = r.get("multiplier")
        lines.append(f"| {'-' if m is None else f'{m:g}'} | {r.get('neurons') or '-'} | {r['refused']}/{r['harmful_n']} | "
                     f"{100 * (r.get('over_refusal_rate') or 0):.0f}% | {r['quality_ratio']:.3f} | "
                     f"{r.get('quality_benign') or 0:.3f} | {r['kl_last']:.3f} | {r.get('wall_seconds')} |")
        if collapse is None and m is not None and r["quality_ratio"] < 0.9:
            collapse = m
    text = "\n".join(lines) + "\n\n" + (f"Repetition collapse (quality < 0.9 x unsteered) starts at x{collapse:g}.\n"
                                        if collapse is not None else "No collapse in the range measured.\n")
    (RESULTS / "harden.md").write_text(text)
    print(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default="stats,sweep,report")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pairs", type=int, default=30)
    p.add_argument("--fraction", type=float, default=0.0025)
    p.add_argument("--multipliers", type=lambda s: [float(x) for x in s.split(",")], default=[2.0, 4.0, 8.0, 16.0])
    p.add_argument("--max-new-tokens", type=int, default=150)
    p.add_argument("--benign-tokens", type=int, default=64)
    a = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    steps = {"stats": step_stats, "sweep": step_sweep, "report": step_report}
    for step in a.steps.split(","):
        if step == "stats" and (OUT / "stats.npz").is_file():
            continue
        steps[step](a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
