#!/usr/bin/env python
"""Can neuron amplification harden selectively? A first-token proxy on the recipe's own prompts (issue 22).

    python bench/harden_selectivity.py            # gradients (once, cached), check, report
    python bench/harden_selectivity.py --steps check,report

Selective hardening needs an edit that raises refusal on harmful requests and leaves their benign twins alone.
For a multiplier ``m`` on neuron ``j`` applied at every position (what every export folds), the first-order change
of a prompt's behaviour score ``B`` (the refusal-minus-compliance log-probability gap of the first answer token,
docs/strategies.md) is ``(m - 1) dB/dm_j`` with ``dB/dm_j = sum_t a_jt dB/da_jt``. Step ``gradients`` measures
``dB/dm_j`` for every MLP neuron and every prompt of recipes/refusal.yaml (80 harmful, 80 benign twins, 120 neutral;
never JBB), with per-prompt multiplier parameters at 1 in one backward pass per batch. Supports are chosen on the
even-numbered prompts; step ``check`` scores them on the odd-numbered half (never used for the choice): the
first-order dB/dm summed over the support, then the real edit (hooks, x2 and x4) and the count of prompts whose
first token leans to refusal (``B > 0``), harmful and twin. Supports: the shipped hardening support (direction+
0.25%, 292 neurons), supports chosen for contrast (largest mean dB/dm on harmful minus that on twins), at 117
and 292 neurons, and (stop 34) boundary supports: each prompt's dB/dm weighted by how near the prompt is to turning
(sigma'(B)), twins penalised kappa times (:func:`boundary_effects`), 117 neurons.

Outputs: bench/out/harden_selectivity/ (not tracked) and the section of bench/README.md between the markers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from bench._common import ROOT, log, run_steps, splice

MODEL = "bundled:qwen2.5-coder-0.5b"
RECIPE = ROOT / "recipes" / "refusal.yaml"
STATS = ROOT / "bench" / "out" / "efficacy" / "stats.npz"  # bench/efficacy.py --steps stats
OUT = ROOT / "bench" / "out" / "harden_selectivity"
START, END = "<!-- harden-selectivity:start -->", "<!-- harden-selectivity:end -->"
HEADING = "## Selective hardening: a first-token proxy (`python bench/harden_selectivity.py`)\n\n"
MULTIPLIERS = (2.0, 4.0)
BOUNDARY_KAPPAS = (3.0, 10.0)
"""Twin weights of the boundary supports (stop 34): largest ``H - kappa max(T, 0)`` among neurons with ``H > 0``,
``H`` and ``T`` the boundary-weighted mean dB/dm of the harmful prompts and of the twins (:func:`boundary_effects`).
(Largest ``H - kappa T`` picked neurons that move both sets towards compliance: 0/40 refusing at x2.)"""


def _setup(threads: int):
    import torch

    from cna_export.core.recipe import load_recipe
    from cna_export.core.settings import DiscoverOptions, build
    from cna_export.discovery.scores import opening_token_ids
    from cna_export.model.loading import load_model
    from cna_export.model.prompts import load_prompts

    torch.set_num_threads(threads)
    loaded = load_model(MODEL)
    opts = build(DiscoverOptions, load_recipe(RECIPE))
    sets = {name: load_prompts(getattr(opts, name)).texts for name in ("positive", "negative", "neutral")}
    return loaded, opts, sets, opening_token_ids(loaded.tokenizer)


def _batches(loaded, opts, texts, size: int = 16):
    from cna_export.model.prompts import batches, render

    rendered = render(loaded.tokenizer, texts, opts.chat_template, opts.system_prompt)
    return batches(loaded.tokenizer, rendered, size, opts.chat_template, loaded.input_device, opts.max_length,
                   sort_by_length=False)  # prompt order kept: harmful i and twin i stay paired


def dmult(loaded, opts, ids, texts) -> tuple[np.ndarray, np.ndarray]:
    """``[prompts, layers, neurons]`` dB/dm at m = 1 (every position scaled) and each prompt's ``B``."""
    import torch

    from cna_export.discovery.scores import behaviour_score

    for p in loaded.model.parameters():
        p.requires_grad_(False)
    grads, gaps = [], []
    for b in _batches(loaded, opts, texts):
        scales, handles = [], []
        for layer in range(loaded.num_layers):
            down = loaded.down_proj(layer)
            s = torch.ones((b.input_ids.shape[0], 1, down.weight.shape[1]), requires_grad=True)
            scales.append(s)
            handles.append(down.register_forward_pre_hook(lambda m, a, s=s: ((a[0] * s).to(a[0].dtype), *a[1:])))
        try:
            with torch.enable_grad():
                out = loaded.model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                   position_ids=b.position_ids, use_cache=False, logits_to_keep=1)
                gap = behaviour_score(out.logits[:, -1, :], *ids)
                gap.sum().backward()
        finally:
            for h in handles:
                h.remove()
        grads.append(torch.stack([s.grad[:, 0, :] for s in scales], 1).numpy().astype(np.float32))
        gaps.append(gap.detach().numpy())
    return np.concatenate(grads), np.concatenate(gaps)


def step_gradients(a) -> None:
    path = OUT / "dmult.npz"
    if path.is_file():
        return
    t0 = time.time()
    loaded, opts, sets, ids = _setup(a.threads)
    arrays = {}
    for name, texts in sets.items():
        arrays[name], arrays[f"gap_{name}"] = dmult(loaded, opts, ids, texts)
        log(f"[gradients] {name}: {len(texts)} prompts ({time.time() - t0:.0f} s)", sys.stderr)
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    (OUT / "gradients.json").write_text(json.dumps({"seconds": round(time.time() - t0, 1)}) + "\n")


def supports(z, width: int) -> dict[str, np.ndarray]:
    """Flat neuron indices (layer * width + index) of each support; contrast supports from the even half."""
    from cna_export.evaluation.saved_stats import load_stats

    pos = z["positive"].reshape(len(z["positive"]), -1)[::2].mean(0)
    neg = z["negative"].reshape(len(z["negative"]), -1)[::2].mean(0)
    shipped = load_stats(STATS).circuit(292, score="direction", sign="positive")
    out = {"direction+ 0.25% (shipped harden-refusal.yaml support)": np.array(
        [n.layer * width + n.index for n in shipped.neurons])}
    for k in (117, 292):
        out[f"contrast {k}: largest mean dB/dm harmful - twin"] = np.argsort(-(pos - neg))[:k]
    harm, twin = boundary_effects(z, "positive"), boundary_effects(z, "negative")
    for kappa in BOUNDARY_KAPPAS:  # twins moved towards compliance are not rewarded: that also moves harmful ones
        score = np.where(harm > 0, harm - kappa * np.maximum(twin, 0.0), -np.inf)
        out[f"boundary 117, kappa {kappa:g}: largest H - {kappa:g} max(T, 0), H > 0"] = np.argsort(-score)[:117]
    return out


def boundary_effects(z, name: str) -> np.ndarray:
    """Each neuron's dB/dm averaged over the even-numbered prompts of a set, each prompt weighted by how near its
    unsteered B is to the refusal boundary (sigma'(B) = sigma(B) (1 - sigma(B))): a first-order count of the prompts
    that an amplification turns, where the plain mean also counts prompts far from turning either way."""
    g = z[name].reshape(len(z[name]), -1)[::2]
    s = 1.0 / (1.0 + np.exp(-z[f"gap_{name}"][::2].astype(np.float64)))
    w = s * (1.0 - s)
    return (w[:, None] * g).sum(0) / w.sum()


def _leaning(loaded, opts, ids, texts, idx: np.ndarray, m: float, width: int) -> np.ndarray:
    """``B`` of each prompt with the neurons ``idx`` scaled by ``m`` at every position (the package's hook
    steering)."""
    import torch

    from cna_export.discovery.scores import behaviour_score
    from cna_export.model.steering import steer

    out = []
    with steer(loaded.model, loaded.arch, {(int(i) // width, int(i) % width): m for i in idx}), torch.no_grad():
        for b in _batches(loaded, opts, texts, 20):
            o = loaded.model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                             position_ids=b.position_ids, use_cache=False, logits_to_keep=1)
            out.append(behaviour_score(o.logits[:, -1, :], *ids).numpy())
    return np.concatenate(out)


def step_check(a) -> None:
    path = OUT / "check.json"
    if path.is_file():
        return
    z = np.load(OUT / "dmult.npz")
    width = z["positive"].shape[2]
    loaded, opts, sets, ids = _setup(a.threads)
    held = {"harmful": sets["positive"][1::2], "twin": sets["negative"][1::2]}
    grads = {"harmful": z["positive"].reshape(len(z["positive"]), -1)[1::2],
             "twin": z["negative"].reshape(len(z["negative"]), -1)[1::2]}
    base = {k: _leaning(loaded, opts, ids, t, np.array([], dtype=int), 1.0, width) for k, t in held.items()}
    rows = [{"support": "unsteered", "neurons": 0, "multiplier": 1.0,
             **{f"{k}_refusing": int((base[k] > 0).sum()) for k in held},
             **{f"{k}_gap": float(base[k].mean()) for k in held}, "n": len(held["harmful"])}]
    for name, idx in supports(z, width).items():
        first = {f"{k}_first_order": float(grads[k][:, idx].sum(1).mean()) for k in held}
        for m in MULTIPLIERS:
            gap = {k: _leaning(loaded, opts, ids, t, idx, m, width) for k, t in held.items()}
            rows.append({"support": name, "neurons": len(idx), "multiplier": m, **first,
                         **{f"{k}_refusing": int((gap[k] > 0).sum()) for k in held},
                         **{f"{k}_gap_change": float((gap[k] - base[k]).mean()) for k in held},
                         "n": len(held["harmful"])})
            log(f"[check] {rows[-1]}", sys.stderr)
    path.write_text(json.dumps(rows, indent=1) + "\n")


CIRCUITS = ROOT / "bench" / "results" / "efficacy" / "circuits"
"""Where step ``circuits`` writes the boundary supports as circuits (bench/efficacy.py rows harden-boundary-*)."""


def step_circuits(a) -> None:
    """Each boundary support as a circuit on the efficacy statistics' model (no multipliers: the efficacy rows set
    them), chosen on the even-numbered prompts as in ``check``."""
    from cna_export.core.circuit import Circuit, Neuron
    from cna_export.evaluation.saved_stats import load_stats

    z = np.load(OUT / "dmult.npz")
    width = z["positive"].shape[2]
    model = load_stats(STATS).circuit(1, score="direction", sign="positive").model
    CIRCUITS.mkdir(parents=True, exist_ok=True)
    for kappa in BOUNDARY_KAPPAS:
        idx = supports(z, width)[next(k for k in supports(z, width) if k.startswith(f"boundary 117, kappa {kappa:g}:"))]
        neurons = [Neuron(layer=int(i) // width, index=int(i) % width, score=1.0) for i in sorted(idx)]
        method = {"name": "boundary", "bench": "harden_selectivity.py", "kappa": kappa, "neurons": len(neurons),
                  "prompts": "recipes/refusal.yaml, even-numbered harmful and benign twins"}
        path = CIRCUITS / f"harden-boundary-k{kappa:g}.json"
        Circuit(model=model, neurons=neurons, method=method).save(path, overwrite=True)
        log(f"[circuits] {path.relative_to(ROOT)}: {len(neurons)} neurons", sys.stderr)


def step_report(a) -> None:
    rows = json.loads((OUT / "check.json").read_text())
    seconds = json.loads((OUT / "gradients.json").read_text())["seconds"]
    base = rows[0]
    head = ("| support | neurons | x | dB/dm harmful (first order) | dB/dm twin | harmful / twin (first order) | "
            "B change harmful | B change twin | harmful leaning to refusal | twins leaning to refusal | "
            "twins turned per harmful turned |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = (f"| unsteered | - | - | - | - | - | - | - | {base['harmful_refusing']}/{base['n']} | "
            f"{base['twin_refusing']}/{base['n']} | - |\n")
    for r in rows[1:]:
        dh, dt = r["harmful_refusing"] - base["harmful_refusing"], r["twin_refusing"] - base["twin_refusing"]
        body += (f"| {r['support']} | {r['neurons']} | {r['multiplier']:g} | {r['harmful_first_order']:+.2f} | "
                 f"{r['twin_first_order']:+.2f} | {r['harmful_first_order'] / r['twin_first_order']:.1f} | "
                 f"{r['harmful_gap_change']:+.2f} | {r['twin_gap_change']:+.2f} | {r['harmful_refusing']}/{r['n']} | "
                 f"{r['twin_refusing']}/{r['n']} | {f'{dt / dh:.2f}' if dh > 0 else '-'} |\n")
    text = "\n".join([
        START, "",
        f"Model `{MODEL}` (transformers, the bundled GGUF dequantised); recipes/refusal.yaml's prompts, never JBB. "
        "Supports chosen on the even-numbered harmful prompts and twins, scored on the odd-numbered 40 + 40. dB/dm: "
        "the first-order change of the first-token refusal-minus-compliance gap B per unit of (m - 1), summed over "
        "the support; B change: the real edit's mean change; leaning to refusal: B > 0 (a proxy for the opening "
        f"token; the held-out JBB figures are in \"Efficacy, round two\"). Unsteered mean B on the scored half: "
        f"harmful {base['harmful_gap']:+.2f}, twins {base['twin_gap']:+.2f}. Gradients: {seconds / 60:.1f} min.", "",
        head + body.rstrip(), "",
        "The boundary supports' held-out JBB figures (exported GGUF, greedy answers, keyword judge) are the rows "
        "harden-boundary-* of \"Efficacy, round two\": whether this proxy's selectivity carries over to JBB's twins "
        "is measured there, not here.", "", END])
    readme = ROOT / "bench" / "README.md"
    readme.write_text(splice(readme.read_text(), START, END, text, HEADING))
    log("report written", sys.stderr)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default="gradients,check,report")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    return run_steps(a.steps, {"gradients": step_gradients, "check": step_check, "circuits": step_circuits,
                               "report": step_report}, a)


if __name__ == "__main__":
    raise SystemExit(main())
