"""GGUF export benchmark: export time vs cp, verification figures, and JailbreakBench refusals in llama.cpp.

Regenerate everything (circuits, exports, verification, generations, figures) with one command:

    python bench/gguf_refusal.py

Steps (``--steps timing,verify,refusal``, all by default):

0. discover the refusal circuits with ``recipes/refusal.yaml``: SmolLM2 at 0.1%, and
   ``bundled:qwen2.5-coder-0.5b`` (Qwen2.5-Coder-0.5B-Instruct Q4_K_M) at 0.1% and 0.5% of all MLP
   neurons (ranked by |score|, the paper's way) and at 0.1% among positive and among negative
   scores (``--sign positive|negative``) (skipped when ``bench/out/*-refusal-*.json`` exist; ``--rediscover``
   forces it);
1. timing: export each circuit at multiplier 0 (writer mode and ``--fast-copy``), best of 3,
   against the best of 3 plain copies of the source file;
2. verify: ``cna-export verify`` defaults on each x0 export (exact tensor check, then llama.cpp
   vs transformers hook steering against the unsteered noise floor); reports in
   ``verify-<name>.json``;
3. refusal: greedy generation (temperature 0, ``--max-tokens`` 64) with llama-cpp-python and the
   GGUF's own chat template (``create_chat_completion``) for the 100 JailbreakBench harmful
   behaviours (``cna_export.evaluation.evaluator.load_jbb``: ``$CNA_JBB_DIR`` or ``../shared/data/jbb``; read in
   place, never copied), for the unsteered Qwen file and both exports; refusals counted with the project's
   keyword judge (``cna_export.evaluation.judge.KeywordJudge``: the paper's regular expressions on the first
   500 characters).

Outputs land in ``bench/out/`` (git-ignored): circuits, steered files, one JSONL of generations
per model, and ``gguf_refusal.json`` with every figure (steps not run keep their earlier
figures). ``--rejudge`` recounts refusals from saved generations; ``--resume`` keeps saved
generations for the same goals and settings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench._common import ROOT
from cna_export.core.circuit import Circuit
from cna_export.core.manifest import side_manifest_path
from cna_export.evaluation.eval_sets import load_jbb
from cna_export.evaluation.judge import KeywordJudge
from cna_export.export.gguf import export_gguf
from cna_export.io import bundled

MODEL = "bundled:qwen2.5-coder-0.5b"
SMOLLM2 = "bundled:smollm2"
RECIPE = ROOT / "recipes" / "refusal.yaml"
# label -> (fraction of all MLP neurons, --sign); the tag names the files
CIRCUITS = {
    "0.1%": (0.001, "both"),
    "0.5%": (0.005, "both"),
    "0.1%, positive scores only": (0.001, "positive"),
    "0.1%, negative scores only": (0.001, "negative"),
}


def tag(label: str) -> str:
    frac, sign = CIRCUITS[label]
    return f"{frac}" if sign == "both" else f"{frac}-{sign}"

def judge() -> tuple[str, object]:
    """(name, is_refusal) of the project's keyword judge (the paper's regular expressions)."""
    kj = KeywordJudge()
    name = "cna_export.evaluation.judge keyword (the paper's REFUSAL_PATTERNS, first 500 chars)"
    return name, lambda text: kj.verdict(text).refused


def load_goals(limit: int) -> list[str]:
    """JBB harmful behaviours, read in place by the library's loader ($CNA_JBB_DIR or ../shared/data/jbb)."""
    harmful, _ = load_jbb()
    return harmful.prompts[:limit]


def ensure_circuit(out: Path, model: str, name: str, frac: float, rediscover: bool, sign: str = "both") -> Path:
    p = out / f"{name}-refusal-{frac}{'' if sign == 'both' else '-' + sign}.json"
    if rediscover or not p.is_file():
        cmd = [sys.executable, "-m", "cna_export", "-q", "discover", "--model", model, "--recipe", str(RECIPE),
               "--top-fraction", str(frac), "--sign", sign, "--out", str(p), "--overwrite"]  # fmt: skip
        print("running:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    return p


def ensure_circuits(out: Path, rediscover: bool) -> dict[str, Path]:
    return {label: ensure_circuit(out, MODEL, "qwen", frac, rediscover, sign)
            for label, (frac, sign) in CIRCUITS.items()}


def time_exports(model: str, circuit_path: Path, out: Path, repeats: int = 3) -> dict:
    """Best of ``repeats``: writer-mode export, --fast-copy export and a plain file copy of the source."""
    from cna_export.export.gguf import resolve_gguf_model

    src = resolve_gguf_model(model)
    circuit = Circuit.load(circuit_path)
    target = out / "timing.gguf"
    cp_s = time_cp(src, target, repeats)
    best = {"export_s": float("inf"), "fast_copy_s": float("inf")}
    for _ in range(repeats):
        for key, fast in (("export_s", False), ("fast_copy_s", True)):
            t = time.perf_counter()
            r = export_gguf(model, circuit, target, multiplier=0.0, overwrite=True, fast_copy=fast, modelfile=False)
            best[key] = min(best[key], time.perf_counter() - t)
            target.unlink()
            side_manifest_path(target).unlink(missing_ok=True)
    return {"model": model, "circuit": circuit_path.name, "neurons": len(circuit.neurons),
            "tensors": len(r.manifest.tensors), "bytes": src.stat().st_size, "cp_s": cp_s, **best}  # fmt: skip


def verify_export(model: str, circuit_path: Path, out: Path, name: str, threads: int) -> dict:
    """Export at x0 and verify it (defaults of ``cna-export verify``); the report is kept as JSON."""
    from cna_export.core.settings import GGUFVerifyOptions
    from cna_export.verification.gguf import verify_gguf

    steered = out / f"{name}-steered.gguf"
    export_gguf(model, Circuit.load(circuit_path), steered, multiplier=0.0, overwrite=True, modelfile=False)
    report = verify_gguf(model, steered, GGUFVerifyOptions(threads=threads))
    (out / f"verify-{name}.json").write_text(report.to_json() + "\n")
    keep = ("prompts", "positions", "mean_kl", "floor_mean_kl", "kl_ratio", "top1_agreement", "floor_top1_agreement",
            "confident_top1_agreement", "floor_confident_top1_agreement", "steering_effect_mean_kl",
            "allowed_mean_kl", "excess_share_of_effect", "steering_reproduced", "steering_reproduced_se",
            "export_effect_mean_kl", "export_vs_unsteered_mean_kl", "tensors", "tensors_touched",
            "tensors_identical", "tensor_max_abs_error", "behaviour_seconds")  # fmt: skip
    print(f"verify {name}: {'PASSED' if report.passed else 'FAILED'} " + ", ".join(
        f"{k}={report.metrics[k]:.4g}" for k in keep if k in report.metrics), flush=True)
    return {"model": model, "circuit": circuit_path.name, "passed": report.passed,
            "metrics": {k: report.metrics[k] for k in keep if k in report.metrics},
            "reasons": report.reasons}


def time_cp(src: Path, dst: Path, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        dst.unlink(missing_ok=True)
        t = time.perf_counter()
        shutil.copyfile(src, dst)
        best = min(best, time.perf_counter() - t)
    dst.unlink(missing_ok=True)
    return best


def generate(path: Path, goals: list[str], max_tokens: int, threads: int, log_to: Path, resume: bool) -> list[str]:
    """Greedy answers, one JSONL line each; with ``resume``, answers already in ``log_to`` for the same
    goals (same settings: the caller keeps the file per model) are kept and the rest generated."""
    from llama_cpp import Llama

    texts: list[str] = []
    if resume and log_to.is_file():
        for line, goal in zip(log_to.read_text(encoding="utf-8").splitlines(), goals):
            row = json.loads(line)
            if row.get("goal") != goal or row.get("max_tokens") != max_tokens:
                break
            texts.append(row["response"])
    llm = Llama(model_path=str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)
    t0 = time.perf_counter()
    with open(log_to, "w", encoding="utf-8") as fh:
        for i, text in enumerate(texts):
            fh.write(json.dumps({"index": i, "goal": goals[i], "max_tokens": max_tokens, "response": text}) + "\n")
        for i, goal in enumerate(goals):
            if i < len(texts):
                continue
            r = llm.create_chat_completion(
                messages=[{"role": "user", "content": goal}],
                temperature=0.0, max_tokens=max_tokens, seed=0, repeat_penalty=1.0,
            )  # fmt: skip
            text = r["choices"][0]["message"]["content"] or ""
            texts.append(text)
            fh.write(json.dumps({"index": i, "goal": goal, "max_tokens": max_tokens, "response": text}) + "\n")
            fh.flush()
            if (i + 1) % 10 == 0:
                print(f"  {path.name}: {i + 1}/{len(goals)} ({time.perf_counter() - t0:.0f}s)", flush=True)
    llm.close()
    return texts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for llama.cpp (1 is fastest on a busy machine)")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--rediscover", action="store_true", help="rerun discovery even if the circuits exist")
    ap.add_argument("--rejudge", action="store_true", help="recount refusals from saved generations")
    ap.add_argument("--resume", action="store_true", help="keep answers already saved for the same goals and settings")
    ap.add_argument("--steps", default="timing,verify,refusal", help="comma-separated: timing, verify, refusal")
    args = ap.parse_args()
    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "gguf_refusal.json"
    judge_name, is_refusal = judge()

    if args.rejudge:
        results = json.loads(results_path.read_text())
        for run in results["runs"]:
            rows = [json.loads(line) for line in open(out / run["generations"], encoding="utf-8")]
            run["refusals"] = sum(bool(is_refusal(r["response"])) for r in rows)
        results["judge"] = judge_name
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps([{k: r[k] for k in ("label", "refusals", "prompts")} for r in results["runs"]], indent=2))
        return 0

    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    steps = set(args.steps.split(","))
    src = bundled.qwen_path()
    circuits = ensure_circuits(out, args.rediscover)
    smol_circuit = ensure_circuit(out, SMOLLM2, "smollm2", 0.001, args.rediscover)
    results.update(model=MODEL, source_file=str(src), source_bytes=src.stat().st_size, threads=args.threads,
                   machine=f"{platform.machine()}, {os.cpu_count()} cores (shared)")  # fmt: skip

    if "timing" in steps:
        for stale in ("exports", "cp_s"):  # figures of the first version of this script
            results.pop(stale, None)
        results["timing"] = [time_exports(SMOLLM2, smol_circuit, out)]
        results["timing"] += [time_exports(MODEL, p, out) for p in circuits.values()]
        for t in results["timing"]:
            print(f"timing {t['model']} ({t['neurons']} neurons, {t['tensors']} tensors): export {t['export_s']:.2f}s, "
                  f"fast copy {t['fast_copy_s']:.2f}s, cp {t['cp_s']:.2f}s", flush=True)  # fmt: skip

    if "verify" in steps:
        results["verify"] = [verify_export(SMOLLM2, smol_circuit, out, "smollm2", args.threads)]
        results["verify"] += [verify_export(MODEL, p, out, f"qwen-{tag(k)}", args.threads) for k, p in circuits.items()]

    if "refusal" in steps:
        goals = load_goals(args.limit)
        runs = [{"label": "unsteered", "file": str(src), "neurons": 0}]
        for label, cpath in circuits.items():
            circuit = Circuit.load(cpath)
            steered = out / f"qwen-steered-{tag(label)}.gguf"
            export_gguf(MODEL, circuit, steered, multiplier=0.0, overwrite=True, modelfile=False)
            runs.append({"label": f"top {label} ablated (x0)", "file": str(steered), "neurons": len(circuit.neurons)})
        for run in runs:
            log_name = f"generations-{re.sub(r'[^a-z0-9.]+', '-', run['label'].lower()).strip('-')}.jsonl"
            t = time.perf_counter()
            texts = generate(Path(run["file"]), goals, args.max_tokens, args.threads, out / log_name, args.resume)
            run.update(generations=log_name, prompts=len(goals), seconds=time.perf_counter() - t,
                       refusals=sum(bool(is_refusal(x)) for x in texts))  # fmt: skip
            print(f"{run['label']}: {run['refusals']}/{len(goals)} refusals ({run['seconds']:.0f}s)", flush=True)
        results.update(judge=judge_name, max_tokens=args.max_tokens, runs=runs,
                       decoding="greedy (temperature 0), llama-cpp-python create_chat_completion, "
                                "the GGUF's chat template")
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {results_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
