#!/usr/bin/env python
"""Base-free audit, calibrated and then measured on a sweep of abliterations (issue 21, part 4).

    nice -n 10 python bench/audit_sweep.py            # all steps, resumable (finished cells are skipped)
    python bench/audit_sweep.py --only calibrate       # just the calibration table (core/data/base_free.json)
    python bench/audit_sweep.py --only report          # just the table, JSON and plot from the finished cells
    python bench/audit_sweep.py --only restore,heretic,report   # a new machine: the published cells, plus heretic's

Steps:

* ``calibrate``: the per-storage-type table of the base-free eigenvalue-gap score (cna_export/inspect/isolated.py),
  written to ``cna_export/core/data/base_free.json``. Calibration models: SmolLM2-135M and Gemma-3-270M (never
  Qwen, the test model). (a) The rounding-noise model's factor per type: every calibration model's writers
  (plus a 25% rms dither, about one
  4-bit step, so that no value is still on the shipped file's grid) quantised by ggml's own quantiser;
  measured / predicted error energy along 32 random unit directions per matrix; min and max kept. (b) The
  smallest gap on clean files of each type: each calibration model as shipped, and its writers in F32, F16, BF16,
  Q8_0 and Q4_K_M (the types llama.cpp's quantiser gives them), each clean, with 1% rms noise, and with a merged
  random rank-8 LoRA. The gap threshold is MARGIN x that smallest gap.
* ``sweep``: abliterations (cna_export/testing/abliterate.py) of each model: rank-1 projection and norm-preserving
  rank-3, over a layer window (early, middle, late quarter, or all layers; "all" also edits the embeddings, as
  the classic recipe does), at strengths STRENGTHS. The direction is the model's refusal direction at 0.6 x its
  layers (32 harmful and 32 benign prompts of recipes/refusal.yaml, spread evenly). Each edit is scored as F32
  (the edited float writers, in memory), and as Q8_0 and Q4_K_M GGUFs (the edited tensors spliced into the clean
  Q8_0 / Q4_K_M file, quantised by ggml's quantiser to the very type each has there: the bytes llama.cpp's
  quantiser writes for them), read by the audit's own ``scan_base_free``. Refusals are measured on the Q8_0 and
  Q4_K_M files (F32 takes the Q8_0 count): greedy llama.cpp, MAX_TOKENS tokens, the keyword judge, on N_EVAL
  harmful prompts of the recipe that the direction was NOT computed from (held out).
* ``clean``: false positives: every bundled model as shipped, re-quantised to Q8_0 / Q4_K_M, and as F32; and each
  with 1% rms noise and a merged random rank-8 LoRA on every writer (F32, Q8_0, Q4_K_M, in memory).
* ``heretic``: heretic 1.4.0's own edits of Qwen (every model bench/peer_heretic.py saved: the chosen trial of its
  run, and each ``--extra-trial``), scored like a sweep cell (gap score per storage, refusals), plus the verdict of
  the whole base-free audit as a user runs it (``cna-export audit FILE --no-generate``: every base-free signal, not
  only the gap score), on the Q8_0 and Q4_K_M files.
* ``restore`` (only when asked): every cell of the published bench/results/audit_sweep/audit_sweep.json that has
  no file here is written back from it (marked ``restored``), so a machine without the untracked cells adds new ones
  (heretic's) to the same report without re-running the sweep; delete a cell's file to measure it again.
* ``report``: bench/results/audit_sweep/{audit_sweep.md, audit_sweep.json, detection.png}, and the summary
  between the audit-sweep markers of bench/README.md.

Hold-out: the thresholds come from the calibration models' clean files only. Qwen2.5-Coder-0.5B (the main
case; the only bundled model that refuses about half of the harmful prompts) is never used to calibrate, and
no edited cell of any model is. Finished cells are kept in bench/out/audit_sweep/cells/*.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bench import gguf_rebuild
from bench._common import ROOT, log
from cna_export.testing import abliterate as ab

OUT = ROOT / "bench" / "out" / "audit_sweep"
RESULTS = ROOT / "bench" / "results" / "audit_sweep"
TABLE = ROOT / "cna_export" / "core" / "data" / "base_free.json"
MODELS = {"qwen": "bundled:qwen2.5-coder-0.5b", "gemma": "bundled:gemma3-270m", "smollm2": "bundled:smollm2"}
CALIBRATION_MODELS = ("smollm2", "gemma")
STORAGES = ("F32", "Q8_0", "Q4_K_M")
WINDOWS = ("early", "middle", "late", "all")
STRENGTHS = (0.5, 0.75, 1.0)
TECHNIQUES = ("rank1", "normpres3")
MARGIN = 0.8
N_EVAL, MAX_TOKENS, DIRECTION_PROMPTS = 24, 24, 32
DITHER = 0.25  # x the weights' rms: about one 4-bit step, so that no value stays on the shipped file's grid
NOISE_TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q2_K")
WRITERS = ("attn_output", "ffn_down")


# -- the models' tensors ----------------------------------------------------------------------------------------


def hf_tensors(spec: str) -> dict[str, np.ndarray]:
    """The residual writers and embeddings of ``spec``, dequantised to float32, by Hugging Face name."""
    from cna_export.io.weights import open_weights

    src = open_weights(spec)
    try:
        return {e.name: src.read(e).astype(np.float32) for e in src
                if e.role in WRITERS + ("token_embd", "output") and e.suffix == "weight"}
    finally:
        src.close()


def reference(model: str, storage: str) -> Path:
    """The clean GGUF of ``model`` in ``storage`` (Q8_0 / Q4_K_M): shipped when it is that type, else re-quantised
    by llama.cpp's quantiser from the shipped file."""
    from cna_export.io.bundled import resolve
    from cna_export.io.llama import quantize_gguf

    shipped = resolve(MODELS[model])
    if storage == "Q4_K_M" and model in ("qwen", "gemma"):
        return shipped
    out = OUT / f"{model}.clean.{storage}.gguf"
    if not out.is_file():
        tmp = out.with_name(out.name + ".tmp")
        quantize_gguf(shipped, tmp, storage, threads=1, requantize=True)
        tmp.rename(out)
    return out


def requantised(model: str, storage: str) -> Path:
    """``model`` re-quantised to ``storage`` by llama.cpp's quantiser from its shipped file (even to its own type)."""
    if storage == "Q8_0" or model == "smollm2":
        return reference(model, storage)
    from cna_export.io.bundled import resolve
    from cna_export.io.llama import quantize_gguf

    out = OUT / f"{model}.requant.{storage}.gguf"
    if not out.is_file():
        tmp = out.with_name(out.name + ".tmp")
        quantize_gguf(resolve(MODELS[model]), tmp, storage, threads=1, requantize=True)
        tmp.rename(out)
    return out


def writer_types(path: Path) -> dict[str, str]:
    """Hugging Face name -> storage type of every writer in a GGUF."""
    from cna_export.io.weights import open_weights

    src = open_weights(str(path))
    try:
        return {e.name: e.storage for e in src if e.role in WRITERS and e.suffix == "weight"}
    finally:
        src.close()


def quantised(W: np.ndarray, storage: str) -> tuple[np.ndarray, np.ndarray | None]:
    """``W`` stored as ``storage`` (ggml's quantiser for block types): the values read back, and the predicted
    rounding noise per row."""
    from cna_export.io.quants import dequantize_rows, quantize_rows, rounding_noise_rows

    if storage == "F32":
        return W.astype(np.float64), np.zeros(W.shape[0])
    if storage in ("F16", "BF16"):
        import torch

        dtype = {"F16": torch.float16, "BF16": torch.bfloat16}[storage]
        t = torch.from_numpy(np.ascontiguousarray(W, np.float32)).to(dtype)
        return t.float().numpy().astype(np.float64), np.zeros(W.shape[0])
    from gguf import GGMLQuantizationType

    qt = GGMLQuantizationType[storage]
    raw = quantize_rows(W, qt)
    return dequantize_rows(raw, qt).astype(np.float64), rounding_noise_rows(raw, qt)


def gap_score(tensors: dict, types: dict[str, str] | str, table=None):
    """The eigenvalue-gap score (``isolated.IsolatedDirection``) of the writers in ``tensors``, each stored as its
    type (one type for all, or name -> type)."""
    from cna_export.inspect.isolated import GramBlocks

    named = ab.writers(tensors)
    H = next(iter(tensors[n] for n in named)).shape[0]
    blocks = GramBlocks(ab.n_layers(tensors), H, table)
    for name, layer in sorted(named.items(), key=lambda kv: kv[1]):
        storage = types if isinstance(types, str) else types[name]
        Wq, noise = quantised(tensors[name], storage)
        blocks.add("attn_output" if "o_proj" in name else "ffn_down", layer, Wq @ Wq.T, noise, storage, Wq.shape[1])
    return blocks.score()


def storage_types(model: str, storage: str) -> dict[str, str] | str:
    return storage if storage in ("F32", "F16", "BF16") else writer_types(reference(model, storage))


# -- calibration ------------------------------------------------------------------------------------------------


def noise_factors(T: dict, rng: np.random.Generator) -> dict[str, list[float]]:
    """Per type: measured / predicted rounding-noise energy along random unit directions, on dithered writers."""
    from gguf import GGMLQuantizationType

    from cna_export.io.quants import dequantize_rows, quantize_rows, rounding_noise_rows

    out: dict[str, list[float]] = {t: [] for t in NOISE_TYPES}
    names = sorted(ab.writers(T), key=lambda n: ab.writers(T)[n])
    for name in names[:: max(1, len(names) // 6)]:
        W = T[name].astype(np.float64)
        W = (W + DITHER * np.sqrt(np.mean(W * W)) * rng.standard_normal(W.shape)).astype(np.float32)
        R = rng.standard_normal((32, W.shape[0]))
        R /= np.linalg.norm(R, axis=1, keepdims=True)
        for t in NOISE_TYPES:
            qt = GGMLQuantizationType[t]
            try:
                raw = quantize_rows(W, qt)
            except ValueError:  # rows not a multiple of the type's block
                continue
            E = dequantize_rows(raw, qt).astype(np.float64) - W
            n = rounding_noise_rows(raw, qt)
            out[t] += list(np.square(R @ E).sum(axis=1) / ((R * R) @ n))
    return {t: v for t, v in out.items() if v}


def perturbations(T: dict) -> dict[str, dict]:
    return {"clean": T, "noise 1%": ab.finetune_noise(T, 0.01, seed=5), "LoRA r8": ab.lora_noise(T, rank=8, seed=6)}


def calibrate() -> None:
    from cna_export.inspect.isolated import collect_gaps

    rng = np.random.default_rng(0)
    factors: dict[str, list[float]] = {}
    gaps: dict[str, list[float]] = {}
    provisional = None
    for model in CALIBRATION_MODELS:
        T = hf_tensors(MODELS[model])
        for t, v in noise_factors(T, rng).items():
            factors.setdefault(t, []).extend(v)
        spans = {t: (round(min(v), 2), round(max(v), 2)) for t, v in factors.items()}
        log(f"calibrate {model}: measured / predicted rounding noise {spans}")
        provisional = _table(factors, {t: [0.5] for t in factors})
        for label, P in perturbations(T).items():
            for storage in STORAGES + ("F16", "BF16"):
                sc = gap_score(P, storage_types(model, storage), provisional)
                collect_gaps(sc, gaps)
                log(f"  {model} {label} {storage}: smallest gap {sc.score:.3f} ({sc.writers}, layers {sc.window})")
        sc = _scan(MODELS[model], provisional)
        collect_gaps(sc, gaps)
        log(f"  {model} as shipped: smallest gap {sc.score:.3f}")
    table = _table(factors, gaps)
    TABLE.write_text(table.model_dump_json(by_alias=True, indent=1) + "\n")
    log(f"calibration written to {TABLE}")


def _table(factors: dict[str, list[float]], gaps: dict[str, list[float]]):
    from cna_export.inspect.isolated import build_calibration

    return build_calibration(factors, gaps, MARGIN, [MODELS[m] for m in CALIBRATION_MODELS],
                             "bench/audit_sweep.py --only calibrate")


def _scan(spec: str, table=None):
    """The audit's own base-free scan of a checkpoint file; its gap score (with ``table`` instead of the packaged
    one, during calibration)."""
    from cna_export.inspect.scan import scan_base_free
    from cna_export.io.weights import open_weights

    src = open_weights(spec)
    try:
        return scan_base_free(src, calibration=table).isolated
    finally:
        src.close()


# -- cells --------------------------------------------------------------------------------------------------------


def cell_path(key: str) -> Path:
    return OUT / "cells" / (key.replace(" ", "_").replace("/", "_").replace("%", "pc") + ".json")


def cached(key: str, fn, *args) -> dict:
    path = cell_path(key)
    if path.is_file():
        return json.loads(path.read_text())
    res = fn(*args)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1, default=str))
    return res


def restore() -> None:
    """The published cells (bench/results/audit_sweep/audit_sweep.json) that have no file here, written back."""
    published = RESULTS / "audit_sweep.json"
    if not published.is_file():
        return
    pub = json.loads(published.read_text())
    cells: dict[str, dict] = {}
    for name, n in pub["base_refusals"].items():
        cells[f"base {name}"] = {"refused": n, "n": N_EVAL, "max_tokens": MAX_TOKENS}
    for c in pub["clean"]:
        cells[f"clean {c['model']} {c['variant']} {c['storage']}"] = c
    for r in pub["edits"]:
        lam = r["strength"]
        key = f"edit {r['model']} {r['label'].replace(',', '')}" if r.get("label") else \
            f"edit {r['model']} {r['technique']} {r['window']} {lam:g}"
        lo, hi = map(int, r["layers"].split("-"))
        cell = cells.setdefault(key, {"model": r["model"], "technique": r["technique"], "window": r["window"],
                                      "strength": lam, "label": r.get("label"), "layers": list(range(lo, hi + 1)),
                                      "storage": {}})
        cell["storage"][r["storage"]] = {"flagged": r["flagged"], "gap": r["gap"], "threshold": r["threshold"],
                                         "window": r["gap_window"], "writers": r["gap_writers"],
                                         "refused": r["refused"], **({"audit": r["audit"]} if r.get("audit") else {})}
    done = 0
    for key, cell in cells.items():
        if not cell_path(key).is_file():
            cell_path(key).parent.mkdir(parents=True, exist_ok=True)
            cell_path(key).write_text(json.dumps(dict(cell, restored=True), indent=1))
            done += 1
    log(f"restored {done} of {len(cells)} published cells from {published.relative_to(ROOT)}")


def score_record(sc) -> dict:
    return {"flagged": sc.flagged, "gap": sc.score, "threshold": sc.threshold, "window": sc.window,
            "writers": sc.writers, "flagged_windows": sc.flagged_windows, "uncalibrated": sc.uncalibrated}


def eval_prompts() -> list[str]:
    """N_EVAL harmful prompts of the recipe that the refusal direction was not computed from."""
    from cna_export.inspect.refusal_direction import _recipe_sets

    _, texts, _ = _recipe_sets(None, 10**6)
    used = set(_recipe_sets(None, DIRECTION_PROMPTS)[1]["harmful"])
    return [t for t in texts["harmful"] if t not in used][:N_EVAL]


def refusals(path: Path) -> int:
    from cna_export.evaluation.backends import open_backend
    from cna_export.evaluation.interventions import Steering
    from cna_export.evaluation.judge import KeywordJudge

    prompts = eval_prompts()
    backend = open_backend(str(path), backend="llama.cpp", batch_size=8, threads=1)
    try:
        gens = backend.generate(prompts, Steering.none(), MAX_TOKENS)
    finally:
        backend.close()
    return sum(v.refused for v in KeywordJudge().judge(prompts, [g.text for g in gens]))


def recipe_for(model: str) -> Path | None:
    """The bundled refusal recipe; for Gemma-3-270M (no chat template) the same prompts, rendered without one."""
    if model != "gemma":
        return None
    from cna_export.inspect.refusal_direction import default_recipe

    src = default_recipe()
    out = OUT / "refusal-no-chat-template.yaml"
    text = src.read_text().replace("prompts/", f"{src.parent}/prompts/")
    out.write_text(text + "\nchat_template: false\n")
    return out


def direction(model: str) -> tuple[np.ndarray, int]:
    from cna_export.inspect.refusal_direction import refusal_directions

    cache = str(OUT / f"{model}.directions.npz")
    rd, _ = refusal_directions(MODELS[model], recipe_for(model), cache, DIRECTION_PROMPTS)
    D = rd.directions()
    layer = round(0.6 * D.shape[0])
    return D[layer], layer


def window_layers(window: str, L: int) -> list[int]:
    q = L // 4
    return {"early": list(range(0, q)), "middle": list(range((L - q) // 2, (L - q) // 2 + q)),
            "late": list(range(L - q, L)), "all": list(range(L))}[window]


def edit(T: dict, r: np.ndarray, technique: str, window: str, lam: float) -> dict:
    layers = window_layers(window, ab.n_layers(T))
    if technique == "rank1":
        E = ab.rank1(T, r, lam, layers=layers, embeddings=(window == "all"))
    else:
        E = ab.norm_preserving(T, r, lam, layers=layers, rank=3)
    return {k: v for k, v in E.items() if v is not T[k]}


def sweep_cell(model: str, T: dict, r: np.ndarray, technique: str, window: str, lam: float, generate: bool) -> dict:
    rec: dict = {"model": model, "technique": technique, "window": window, "strength": lam,
                 "layers": window_layers(window, ab.n_layers(T))}
    return score_edit(model, T, edit(T, r, technique, window, lam), rec, generate)


def score_edit(model: str, T: dict, E: dict, rec: dict, generate: bool, verdict: bool = False) -> dict:
    """``rec`` with the gap score of the edit ``E`` of ``T`` in each storage type (F32 in memory; Q8_0 and Q4_K_M as
    the edited tensors spliced into the clean file), the refusals of each GGUF, and with ``verdict`` the whole
    base-free audit's verdict on each GGUF (``cna-export audit FILE --no-generate``: every signal, not only the gap)."""
    rec["storage"] = {"F32": score_record(gap_score(dict(T, **E), "F32"))}
    for storage in ("Q8_0", "Q4_K_M"):
        path = OUT / f"{model}.edit.{storage}.gguf"
        path.unlink(missing_ok=True)
        gguf_rebuild.splice_edit(reference(model, storage), E, path)
        entry = score_record(_scan(str(path)))
        entry["refused"] = refusals(path) if generate else None
        if verdict:
            entry["audit"] = audit_verdict(path)
        rec["storage"][storage] = entry
        path.unlink()
    rec["storage"]["F32"]["refused"] = rec["storage"]["Q8_0"]["refused"]
    return rec


def audit_verdict(path: Path) -> dict:
    """The base-free audit's verdict on ``path`` as a user gets it (weights only: ``--no-generate``)."""
    from cna_export.core.settings import AuditSettings
    from cna_export.inspect.audit import audit

    rep = audit(str(path), AuditSettings(generate=False))
    return {"exit_code": int(rep.exit_code), "verdict": rep.verdict, "findings": rep.findings}


# -- heretic's edits -----------------------------------------------------------------------------------------------


def heretic_models() -> dict[str, Path]:
    """heretic's saved models (bench/peer_heretic.py's run: the chosen trial, and any other trial of its front
    saved with ``--extra-trial``), by label."""
    from bench import peer_heretic

    run = peer_heretic.RUN / "run.json"
    if not run.is_file():
        return {}
    info = json.loads(run.read_text())
    found = {}
    if (peer_heretic.RUN / "model" / "config.json").is_file():
        found[f"heretic {info['trials']} trials, trial {info['choice']['trial']}"] = peer_heretic.RUN / "model"
    for t in sorted(info.get("extra", {}), key=int):
        folder = peer_heretic.RUN / f"model-t{t}"
        if (folder / "config.json").is_file():
            found[f"heretic {info['trials']} trials, trial {t}"] = folder
    return found


def heretic(generate: bool = True) -> None:
    """Every heretic edit of Qwen found on disk, scored like a sweep cell, plus the whole audit's verdict."""
    from bench import peer_heretic

    found = heretic_models()
    if not found:
        log("no heretic model saved yet (python bench/peer_heretic.py --run): heretic cells skipped")
        return
    T = None
    for label, folder in found.items():
        key = f"edit qwen {label.replace(',', '')}"
        if cell_path(key).is_file():
            continue
        T = T if T is not None else hf_tensors(MODELS["qwen"])
        E = peer_heretic.changed_tensors(folder)
        unknown = sorted(set(E) - set(T))
        if unknown:
            raise SystemExit(f"heretic changed tensors the sweep does not know: {unknown[:3]}")
        layers = sorted({int(k.split(".")[2]) for k in E if k.startswith("model.layers.")})
        rec = {"model": "qwen", "technique": "heretic", "window": "heretic", "strength": None, "label": label,
               "layers": layers, "tensors": len(E)}
        res = cached(key, score_edit, "qwen", T, E, rec, generate, True)
        log(f"{key}: " + ", ".join(f"{s} {'FLAG' if v['flagged'] else 'ok'} {v['gap']:.2f}/{v['threshold']:.2f} "
                                   f"ref {v['refused']} audit exit {v.get('audit', {}).get('exit_code', '-')}"
                                   for s, v in res["storage"].items()))


def sweep(models: list[str], windows, strengths, techniques) -> None:
    for model in models:
        # SmolLM2 refuses almost none of the prompts, and Gemma-3-270M ships without a chat template (a base model):
        # their edits are scored, with no refusal count
        generate = model == "qwen"
        if generate:
            for storage in ("Q8_0", "Q4_K_M"):
                res = cached(f"base {model} {storage}", lambda m=model, s=storage: {
                    "refused": refusals(reference(m, s)), "n": N_EVAL, "max_tokens": MAX_TOKENS})
                log(f"{model} clean {storage}: {res['refused']}/{N_EVAL} refused")
        T = hf_tensors(MODELS[model])
        r, layer = direction(model)
        for technique in techniques:
            for window in windows:
                for lam in strengths:
                    key = f"edit {model} {technique} {window} {lam:g}"
                    t0 = time.perf_counter()
                    res = cached(key, sweep_cell, model, T, r, technique, window, lam, generate)
                    res.setdefault("direction_layer", layer)
                    log(f"{key}: " + ", ".join(f"{s} {'FLAG' if v['flagged'] else 'ok'} {v['gap']:.2f}/"
                                               f"{v['threshold']:.2f} ref {v['refused']}"
                                               for s, v in res["storage"].items())
                        + f" ({time.perf_counter() - t0:.0f}s)")


def clean(models: list[str]) -> None:
    for model in models:
        files = {("shipped", "as shipped"): MODELS[model]}
        files.update({("requant", s): str(requantised(model, s)) for s in ("Q8_0", "Q4_K_M")})
        for (variant, storage), spec in files.items():
            res = cached(f"clean {model} {variant} {storage}", lambda sp=spec, v=variant, st=storage, m=model: dict(
                score_record(_scan(sp)), model=m, variant=v, storage=st))
            log(f"clean {model} {variant} {storage}: {res}")
        T = None
        for label in ("clean", "noise 1%", "LoRA r8"):
            for storage in STORAGES:
                key = f"clean {model} {label} {storage}"
                if not cell_path(key).is_file():
                    T = T if T is not None else perturbations(hf_tensors(MODELS[model]))
                res = cached(key, lambda s=storage, lb=label, m=model, P=T: dict(
                    score_record(gap_score(P[lb], storage_types(m, s))), model=m, variant=lb, storage=s))
                log(f"{key}: {res}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None, help="comma-separated steps: restore,calibrate,clean,sweep,heretic,report")
    ap.add_argument("--models", default="qwen,gemma,smollm2", help="models for the sweep")
    ap.add_argument("--windows", default=",".join(WINDOWS))
    ap.add_argument("--strengths", default=",".join(f"{s:g}" for s in STRENGTHS))
    ap.add_argument("--techniques", default=",".join(TECHNIQUES))
    args = ap.parse_args()
    steps = set(args.only.split(",")) if args.only else {"calibrate", "clean", "sweep", "heretic", "report"}
    OUT.mkdir(parents=True, exist_ok=True)
    if "restore" in steps:
        restore()
    if "calibrate" in steps and (args.only or not TABLE.is_file()):
        calibrate()
    if "clean" in steps:
        clean(list(MODELS))
    if "sweep" in steps:
        sweep(args.models.split(","), args.windows.split(","), [float(s) for s in args.strengths.split(",")],
              args.techniques.split(","))
    if "heretic" in steps:
        heretic()
    if "report" in steps:
        from bench.audit_sweep_report import report

        report(OUT / "cells", RESULTS, ROOT / "bench" / "README.md")


if __name__ == "__main__":
    main()
