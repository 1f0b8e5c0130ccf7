#!/usr/bin/env python
"""Audit abliterated SmolLM2 checkpoints: four techniques x three formats x (with base, base-free).

    nice python bench/audit_abliteration.py            # writes bench/out/audit-abliteration/ and the table
                                                        # between the audit-abliteration markers of bench/README.md

The abliterations are our own implementations of the published math (cna_export/testing/abliterate.py), applied to the
bundled SmolLM2-135M-Instruct (Q4_1 GGUF) dequantised to a float32 safetensors folder (the base). The refusal
direction they remove is the base's own (recipes/refusal.yaml prompts, 32 harmful and 32 benign, mean residual
difference at the last prompt token), taken at layer LAYER. Each abliterated model is audited as

* the same format (a float32 safetensors folder, against the float32 base);
* GGUF Q8_0 and Q4_K_M (an F32 GGUF with the edited tensors, quantised by llama.cpp's own
  ``llama_model_quantize`` through llama-cpp-python), against the float32 safetensors base;

with ``--base`` (the diff and its low-rank directional analysis, cosine with the base's refusal direction)
and base-free (the scan plus the depletion score along the suspect's own refusal directions). Clean rows:
the base itself, and a fine-tune-like perturbation of every weight (1% of each tensor's rms, independent
noise). A sweep of plain rank-1 strengths on the writers (no embeddings) gives the smallest strength the
diff detects in Q8_0 and Q4_K_M against the float base. Behaviour (generation) is skipped (--no-generate).
"""

from __future__ import annotations

import os

# One BLAS thread: on a shared 2-core machine OpenBLAS's threads oversubscribe it (eigh of a 576 x 576 matrix
# measured 0.15 s with one thread, 2.8 s with two, at load average 9).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from bench import gguf_rebuild
from bench._common import ROOT, dequantised, log, splice
from cna_export.testing import abliterate as ab

OUT = ROOT / "bench" / "out" / "audit-abliteration"
README = ROOT / "bench" / "README.md"
START, END = "<!-- audit-abliteration:start -->", "<!-- audit-abliteration:end -->"
FTYPES = ("Q8_0", "Q4_K_M")  # the quantisations audited


def read_tensors(folder: Path) -> dict:
    from safetensors.numpy import load_file

    return dict(load_file(str(folder / "model.safetensors")))


def write_folder(base: Path, tensors: dict, out: Path) -> Path:
    from safetensors.numpy import save_file

    if (out / "model.safetensors").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    tmp.rename(out)
    return out


def write_f32_gguf(tensors: dict, path: Path) -> Path:
    """The bundled GGUF with the residual writers and embeddings of ``tensors`` in place (bench/gguf_rebuild.py)."""
    from cna_export.io.bundled import smollm2_path

    writers = ab.writers(tensors)
    edited = {n: a for n, a in tensors.items() if n in ab.EMBEDDINGS or n in writers}
    return gguf_rebuild.write_f32_gguf(smollm2_path(), edited, path)


def quantize(src: Path, out: Path, qtype: str) -> Path:
    return gguf_rebuild.quantize(src, out, qtype)


def ggufs(tensors: dict, stem: str, types=("Q8_0", "Q4_K_M")) -> dict[str, Path]:
    out = {q: OUT / f"{stem}.{q}.gguf" for q in types}
    if all(p.is_file() for p in out.values()):
        return out
    f32 = write_f32_gguf(tensors, OUT / f"{stem}.F32.gguf")
    for q, p in out.items():
        quantize(f32, p, q)
    f32.unlink()
    return out


def run_audit(suspect: Path, base: Path | None, directions: Path, generate: bool = False) -> dict:
    from cna_export.inspect.audit import AuditSettings, audit

    s = AuditSettings(base=str(base) if base else None, generate=generate, discover=False, directions=str(directions))
    t0 = time.perf_counter()
    rep = audit(str(suspect), s)
    wall = time.perf_counter() - t0
    out = {"exit": rep.exit_code, "verdict": rep.verdict, "wall": wall}
    if rep.behaviour is not None:
        out["behaviour"] = {k: f"{m.refused}/{m.n}" for k, m in rep.behaviour.models.items()}
        out["behaviour_summary"] = rep.behaviour.summary
    lr = rep.diff.lowrank if rep.diff is not None else None
    if lr is not None:
        out["lowrank"] = {"detected": lr.detected, "spike": lr.spike, "null": lr.null_spike, "kind": lr.kind,
                          "layers": lr.layers, "profile": lr.profile(),
                          "refusal": asdict(lr.refusal) if lr.refusal is not None else None}
    if rep.base_free is not None:
        out["depletion"] = asdict(d) if (d := rep.base_free.depletion) else None
        out["eig_ratio"] = rep.base_free.scan.direction.ratio
        iso = rep.base_free.scan.isolated
        if iso is not None:
            out["gap"] = {"score": iso.score, "threshold": iso.threshold, "window": iso.window, "writers": iso.writers}
    return out


def profile_text(r: dict) -> tuple[str, str]:
    lr = r.get("lowrank")
    if lr and lr["detected"]:
        from cna_export.inspect.abliteration import layer_ranges

        prof = lr["profile"]
        vals = " ".join(f"{v:.2f}" for _, v in sorted(prof.items(), key=lambda kv: int(kv[0])))
        cos = lr["refusal"]["best_cos"] if lr.get("refusal") else None
        return f"{layer_ranges(lr['layers'])}: {vals}", (f"{cos:.2f}" if cos is not None else "-")
    if lr:
        return f"none (hollow spike {lr['spike']:.0f} vs permuted {lr['null']:.0f})", "-"
    dep = r.get("depletion")
    gap = r.get("gap")
    gap_text = (f"eigenvalue gap {gap['score']:.3f} (threshold {gap['threshold']:.3f}) in layers {gap['window'][0]}-"
                f"{gap['window'][1]} ({gap['writers']}); " if gap else "")
    if dep:
        return gap_text + (f"depletion {dep['score']:.3f} in layers {dep['window'][0]}-{dep['window'][1]} "
                f"({dep.get('writers', 'o_proj + down_proj')}), |cos| "
                f"{dep['alignment']:.2f} with own refusal dir. L{dep['direction_layer']}; eigenvalue ratio "
                f"{r['eig_ratio']:.2g}" + (f"; refusal write {dep['write']['score']:.2f} in layers "
                                            f"{dep['write']['window'][0]}-{dep['write']['window'][1]} "
                                            f"({dep['write']['writers']})" if dep.get("write") else "")), "-"
    return "-", "-"


def cached(key: str, fn, *args, **kwargs) -> dict:
    """One row's result ``fn(*args, **kwargs)``, computed once (bench/out/audit-abliteration/rows/KEY.json)."""
    path = OUT / "rows" / (key.replace("/", "_").replace(" ", "_").replace("|", "__") + ".json")
    if path.is_file():
        return json.loads(path.read_text())
    res = fn(*args, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2, default=str))
    return res


def not_computed(key: str) -> dict:
    """The table step reads rows computed by the earlier steps; a missing one stops it."""
    raise SystemExit(f"row {key} not computed")


def sweep_row(base: Path, gguf: Path, lam: float, qtype: str) -> dict:
    """The diff of one rank-1 sweep GGUF against the float base: detected or not, and what it recovered."""
    from cna_export.inspect.diff import diff_checkpoints

    t0 = time.perf_counter()
    rep = diff_checkpoints(str(base), str(gguf))
    lr = rep.lowrank
    prof = lr.profile() if lr is not None else {}
    return {"strength": lam, "format": qtype, "detected": bool(lr and lr.detected),
            "spike": lr.spike if lr else None, "null": lr.null_spike if lr else None,
            "flagged": len(lr.support()) if lr else 0,
            "median_strength": float(np.median(list(prof.values()))) if prof else None,
            "verdict": rep.verdict(), "wall": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", default="0.001,0.003,0.01,0.03,0.1,0.3",
                    help="rank-1 strengths for the detection-limit sweep")
    ap.add_argument("--layer", type=float, default=None, help="refusal-direction layer (default 0.6 x layers)")
    ap.add_argument("--only", default=None, help="comma-separated steps: rank1,weighted,normpres,biproj,finetune,"
                    "requant,clean,sweep (default: all, then the table)")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    steps = set(args.only.split(",")) if args.only else None
    t_all = time.perf_counter()
    base = dequantised("bundled:smollm2", OUT / "base")
    log(f"base {base}")
    from cna_export.inspect.refusal_direction import refusal_directions

    base_dirs_file = OUT / "base.directions.npz"
    rd, _ = refusal_directions(str(base), None, str(base_dirs_file), 32)
    D = rd.directions()
    L = D.shape[0]
    layer = args.layer if args.layer is not None else round(0.6 * L)
    r = D[int(layer)]
    T = read_tensors(base)
    techniques = {
        "rank1": ("rank-1 (all writers + embeddings, x1)", lambda: ab.rank1(T, r)),
        "weighted": (f"weighted kernel (peak 1.2 at L{layer:g}, min 0.6 at +-{L / 5:g} layers, interpolated direction)",
                     lambda: ab.weighted(T, D, layer - 0.5, peak=layer, max_weight=1.2, min_weight=0.6,
                                         distance=L / 5)),
        "normpres": ("norm-preserving rank-3 (x1, all writers)", lambda: ab.norm_preserving(T, r, 1.0, rank=3)),
        "biproj": ("biprojected norm-preserving (x1, all writers)",
                   lambda: ab.biprojected(T, r, rd.benign_mean[int(layer)])),
        "finetune": ("clean: fine-tune-like noise (1% rms, every weight)", lambda: ab.finetune_noise(T, 0.01)),
        "requant": ("clean: the base itself (re-quantised for the GGUF rows)", lambda: dict(T)),
    }
    formats = ("safetensors F32", "GGUF Q8_0", "GGUF Q4_K_M")
    rows = []
    for stem, (label, make) in techniques.items():
        if steps is None or stem in steps:
            log(f"{stem}: building")
            folder = OUT / stem
            if not (folder / "model.safetensors").is_file():
                write_folder(base, make(), folder)
            gg = ggufs(read_tensors(folder), stem)
            for fmt, suspect in zip(formats, (folder, gg["Q8_0"], gg["Q4_K_M"]), strict=True):
                for mode in ("base", "base-free"):
                    log(f"{stem} {fmt} {mode}")
                    dirs = base_dirs_file if mode == "base" else OUT / f"{suspect.name}.directions.npz"
                    res = cached(f"{stem}|{fmt}|{mode}", run_audit, suspect, base if mode == "base" else None, dirs)
                    log(f"  exit {res['exit']}: {res['verdict'][:160]} ({res['wall']:.0f}s)")
        for fmt in formats:
            for mode in ("base", "base-free"):
                rows.append((label, fmt, mode, f"{stem}|{fmt}|{mode}"))
    for spec in ("bundled:smollm2", "bundled:qwen2.5-coder-0.5b"):
        if steps is None or "clean" in steps:
            log(f"clean {spec} base-free")
            cached(f"{spec}|as shipped|base-free", run_audit, Path(spec), None,
                   OUT / f"{spec.split(':')[1]}.directions.npz")
        rows.append((f"clean: {spec}", "GGUF (as shipped)", "base-free", f"{spec}|as shipped|base-free"))
    # heretic itself (bench/peer_heretic.py --run --convert), when its output is on this machine
    her = ROOT / "bench" / "out" / "heretic"
    her_model, her_base = her / "run" / "model", her / "base-f32"
    if (her_model / "config.json").is_file() and (steps is None or "heretic" in steps):
        info = json.loads((her / "run" / "run.json").read_text())
        label = (f"heretic {info['heretic']} on Qwen2.5-Coder-0.5B (trial {info['choice']['trial']} of "
                 f"{info['trials']}, norm-preserving rank-3 default)")
        suspects = [("safetensors F32", her_model)] + [(f"GGUF {q}", her / "run" / f"heretic.{q}.gguf")
                                                        for q in FTYPES]
        qdirs = her / "base-f32.directions.npz"
        for fmt, suspect in suspects:
            if not suspect.exists():
                log(f"heretic {fmt}: {suspect} missing (run bench/peer_heretic.py --convert)")
                continue
            for mode in ("base", "base-free"):
                log(f"heretic {fmt} {mode}")
                dirs = qdirs if mode == "base" else her / "run" / f"{suspect.name}.directions.npz"
                res = cached(f"heretic|{fmt}|{mode}", run_audit, suspect, her_base if mode == "base" else None, dirs,
                             generate=(mode == "base"))
                log(f"  exit {res['exit']}: {res['verdict'][:160]} ({res['wall']:.0f}s)")
                rows.append((label, fmt, mode, f"heretic|{fmt}|{mode}"))
    # detection limit: plain rank-1 on the writers only, against the float base
    sweep_keys = []
    for lam in [float(x) for x in args.sweep.split(",") if x]:
        stem = f"sweep{lam:g}"
        keys = [f"sweep|{lam:g}|{q}" for q in FTYPES]
        sweep_keys += keys
        if steps is not None and "sweep" not in steps:
            continue
        if all((OUT / "rows" / (k.replace("|", "__") + ".json")).is_file() for k in keys):
            continue
        gg = ggufs(ab.rank1(T, r, lam, embeddings=False), stem)
        for q, p in gg.items():
            res = cached(f"sweep|{lam:g}|{q}", sweep_row, base, p, lam, q)
            log(f"sweep x{lam:g} {q}: {res}")
            p.unlink()
    if steps is not None:
        log(f"steps {sorted(steps)} done in {(time.perf_counter() - t_all) / 60:.1f} min")
        return
    table = ["| technique | suspect | audit | exit | verdict | recovered layers: strength profile (--base) / "
             "depletion score (base-free) | \\|cos\\| with the base's refusal dir. | refusals base -> suspect | wall |",
             "|---|---|---|---|---|---|---|---|---|"]
    walls = []
    for label, fmt, mode, key in rows:
        res = cached(key, not_computed, key)
        walls.append(res["wall"])
        prof, cos = profile_text(res)
        v = res["verdict"]
        if len(v) > 240:
            v = v[:237] + "..."
        v, prof = v.replace("|", "\\|"), prof.replace("|", "\\|")
        beh = " -> ".join(res["behaviour"].values()) if res.get("behaviour") else "-"
        table.append(f"| {label} | {fmt} | {'--base' if mode == 'base' else 'base-free'} | {res['exit']} | {v} | "
                     f"{prof} | {cos} | {beh} | {res['wall']:.0f} s |")
    table += ["", "Detection limit (plain rank-1 projection of every o_proj/down_proj at the given strength, "
              "embeddings untouched, GGUF against the float32 base; detected = the diff reports a directional edit):",
              "", "| strength | GGUF | detected | hollow spike / permuted | writers carrying the edit | "
              "median recovered strength |",
              "|---|---|---|---|---|---|"]
    for key in sweep_keys:
        sw = cached(key, not_computed, key)
        ms = f"{sw['median_strength']:.3f}" if sw["median_strength"] is not None else "-"
        table.append(f"| {sw['strength']:g} | {sw['format']} | {'yes' if sw['detected'] else 'no'} | "
                     f"{sw['spike']:.1f} / {sw['null']:.1f} | {sw['flagged']} | {ms} |")
    table += ["", f"The direction removed is the base's refusal direction at layer {layer:g} of {L} (32 harmful and 32 "
              f"benign prompts of recipes/refusal.yaml). Audit wall times (sum {sum(walls) / 60:.0f} min) were "
              "measured on 2 CPU cores shared with other jobs (heretic runs, evaluations; load average 3 to 16 over "
              "the rows), so they are upper bounds; base-free rows include loading the suspect in transformers for its "
              "refusal directions unless cached. `refusals base -> suspect`: the audit's behaviour check (8 harmful "
              "prompts of the recipe, 40 greedy tokens, keyword judge), run for the heretic rows with --base only "
              "(SmolLM2 refuses none of them, so its rows skip it). heretic's own direction prompts were the same "
              "recipe prompts (bench/peer_heretic.py), so its behaviour row is in-sample for heretic."]
    block = START + "\n" + "\n".join(table) + "\n" + END
    README.write_text(splice(README.read_text(), START, END, block,
                             heading="## Audit: abliterated SmolLM2 (bench/audit_abliteration.py)\n\n"))
    log("table written")


if __name__ == "__main__":
    main()
