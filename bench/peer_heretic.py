#!/usr/bin/env python
"""Peer baseline: heretic (directional ablation + Optuna TPE; PyPI heretic-llm, AGPL-3.0) on Qwen2.5-Coder-0.5B,
scored with our own eval (same judge, same held-out JBB pairs, same KL) next to the CNA strategies.

    python bench/peer_heretic.py --setup                 # venv bench/out/heretic/venv: torch==2.13.0 CPU + heretic-llm
    python bench/peer_heretic.py --run --trials 16       # heretic on the float32 base; the chosen trial saved merged
    python bench/peer_heretic.py --convert               # its edit put into the bundled Q4_K_M GGUF (ggml quantiser)
    python bench/peer_heretic.py --eval                  # held-out pairs, as bench/strategies.py's heldout step
    python bench/peer_heretic.py --all --trials 16       # the four in order; finished steps are skipped
    python bench/peer_heretic.py --eval --extra-trial 13 # also another trial of the front (the study is re-opened)

Licence boundary: heretic is AGPL. It is installed only into its own virtual environment created here and runs
only as a separate process, driven through its text menus; cna_export never imports it and nothing of it is
copied into this repository. Nothing here downloads anything but the venv's PyPI packages.

Protocol (the same inputs our own strategies get):

* model: the bundled Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF, dequantised to a float32 safetensors folder
  (heretic runs transformers);
* refusal-direction prompts: recipes/prompts/refusal-harmful.txt and refusal-benign.txt (ours, never JBB), the
  prompts our discovery uses;
* heretic's optimisation prompts: the 30-pair JBB tuning split (seed 0) that `bench/strategies.py` tunes on,
  written to a temporary folder for the run and deleted after it (JBB is read from ../shared/data/jbb, never
  copied into the repository); the held-out pairs are never shown to heretic;
* the chat template's default system prompt (Qwen's), as our eval renders it;
* a fixed trial budget (``--trials``; heretic's default is 200, which is days on this 2-core CPU), seed 0, everything
  else heretic's defaults (norm-preserving "full" row normalisation, rank-3 LoRA, its refusal markers);
* the trial: heretic leaves the choice to the user among its Pareto front (refusals, first-token KL on its
  evaluation prompts). We take the one with the fewest refusals at KL <= ``--max-kl`` (0.1, the efficacy goal's
  drift budget), else the lowest KL. The whole front is recorded in bench/out/heretic/run.json.

The merged model's changed tensors (heretic edits ``o_proj`` and ``down_proj``) replace theirs in the bundled
GGUF, each quantised by ggml to the type the shipped file has for it; every other tensor keeps its shipped bytes
(bench/gguf_rebuild.py ``splice_edit``), so the file differs from the bundled one only where heretic's edit is,
as the CNA rows' patched GGUFs do. It is evaluated against the bundled GGUF (one unsteered reference run, the
checkpoint as a condition on its own backend) with the settings of bench/strategies.py's heldout step, and the
result lands in bench/out/strategies/heldout/ where its report step picks it up.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

from bench import gguf_rebuild
from bench import strategies as st
from bench._common import ROOT, dequantised, log

OUT = ROOT / "bench" / "out" / "heretic"
VENV = OUT / "venv"
BASE = OUT / "base-f32"
RUN = OUT / "run"
MODEL = "bundled:qwen2.5-coder-0.5b"
HERETIC_VERSION = "1.4.0"
HELDOUT = ROOT / "bench" / "out" / "strategies" / "heldout"


def setup() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    if not (VENV / "bin" / "python").is_file():
        venv.create(VENV, with_pip=True)
    pip = [str(VENV / "bin" / "pip"), "install", "-q"]
    # torch first, pinned to the local CPU wheel: any other torch spec pulls GBs of CUDA packages
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + [f"heretic-llm=={HERETIC_VERSION}"], check=True)


def base_folder() -> Path:
    """The bundled GGUF dequantised to a float32 safetensors folder (once)."""
    return dequantised(MODEL, BASE)


def _prompt_lines(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _system_prompt() -> str:
    """The system prompt Qwen's chat template inserts when a conversation has none (what our eval renders)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_folder()))
    text = tok.apply_chat_template([{"role": "user", "content": "X"}], tokenize=False, add_generation_prompt=True)
    m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text, re.S)
    return m.group(1) if m else ""


def _toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid TOML basic string


class Driver:
    """Answers heretic's numbered menus (its notebook mode reads them from stdin) and records its output."""

    MENU = re.compile(r"^\[(\d+)\] (.*)$")
    TRIAL = re.compile(r"\[Trial\s+(\d+)\] Refusals:\s*(\d+)/(\d+), KL divergence: ([0-9.]+)")

    def __init__(self, max_kl: float, save_to: Path, logfile: Path, trial: int | None = None):
        self.max_kl, self.save_to, self.logfile, self.trial = max_kl, save_to, logfile, trial
        self.saved = False
        self.front: list[dict] = []
        self.choice: dict | None = None

    def answer(self, pending: str) -> str:
        lines = [ln.strip() for ln in pending.splitlines()]
        if lines and lines[-1].startswith("Path to the folder"):
            return str(self.save_to)
        menu = [(int(m.group(1)), m.group(2)) for m in map(self.MENU.match, lines) if m]
        titles = {t: i for i, t in menu}

        def pick(title: str) -> str:
            return str(titles[title])

        for resume in ("Continue the previous run", "Show the results from the previous run"):
            if resume in titles:
                return pick(resume)
        if "Save the model to a local folder" in titles:
            if not self.saved:
                self.saved = True
                return pick("Save the model to a local folder")
            return str(next(i for i, t in menu if t.startswith("Return to") or t.startswith("Exit")))
        trials = [(i, self.TRIAL.search(t)) for i, t in menu]
        trials = [(i, m) for i, m in trials if m]
        if trials:
            if self.saved:
                return pick("Exit program")
            self.front = [{"trial": int(m.group(1)), "refusals": int(m.group(2)), "n": int(m.group(3)),
                           "kl": float(m.group(4))} for _, m in trials]
            ok = [(i, f) for (i, _), f in zip(trials, self.front, strict=True) if f["kl"] <= self.max_kl]
            if self.trial is not None:  # a given trial of the front (--extra-trial)
                i, f = next(((i, f) for (i, _), f in zip(trials, self.front, strict=True) if f["trial"] == self.trial),
                            (None, None))
                if f is None:
                    raise RuntimeError(f"trial {self.trial} is not on heretic's Pareto front: {self.front}")
                self.choice = f
                return str(i)
            if ok:
                i, f = min(ok, key=lambda x: (x[1]["refusals"], x[1]["kl"]))
            else:
                i, f = min(zip((i for i, _ in trials), self.front, strict=True), key=lambda x: x[1]["kl"])
            self.choice = f
            return str(i)
        raise RuntimeError(f"unexpected heretic menu: {menu or lines[-3:]}")

    def run(self, cmd: list[str], cwd: Path, env: dict) -> int:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        pending = ""
        with self.logfile.open("a") as fh:
            while True:
                if not sel.select(timeout=1.0):
                    if proc.poll() is not None:
                        break
                    continue
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                text = chunk.decode("utf-8", "replace")
                fh.write(text)
                fh.flush()
                pending += text
                tail = pending.rstrip()
                if tail.endswith("Enter number:") or tail.endswith("Path to the folder::"):
                    try:
                        reply = self.answer(pending)
                    except Exception:
                        proc.kill()
                        raise
                    fh.write(f"<<< {reply}\n")
                    proc.stdin.write((reply + "\n").encode())
                    proc.stdin.flush()
                    pending = ""
                elif len(pending) > 200_000:
                    pending = pending[-100_000:]
        return proc.wait()


def _write_tune_prompts(bad: Path, good: Path) -> int:
    """The JBB tuning split of bench/strategies.py (harmful -> ``bad``, benign twins -> ``good``), one prompt per
    line, for heretic's evaluation; the number of pairs."""
    from cna_export.evaluation.eval_sets import load_jbb

    harmful, benign = load_jbb()
    tune_idx, _ = st.jbb_split()
    for path, es in ((bad, harmful), (good, benign)):
        path.write_text("\n".join(es.prompts[i].replace("\n", " ") for i in tune_idx) + "\n")
    return len(tune_idx)


def _drive(out: Path, logfile: Path, max_kl: float, trial: int | None = None) -> Driver:
    """Run heretic (config.toml or its stored study in RUN) through its menus; the chosen trial's merged model
    is saved to ``out`` (through ``out``.tmp)."""
    env = dict(os.environ, KAGGLE_KERNEL_RUN_TYPE="bench", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", NO_COLOR="1", TERM="dumb")
    env.pop("VIRTUAL_ENV", None)
    tmp = out.with_name(out.name + ".tmp")
    drv = Driver(max_kl, tmp, logfile, trial=trial)
    rc = drv.run([str(VENV / "bin" / "heretic")], RUN, env)
    if rc != 0 or not (tmp / "config.json").is_file():
        raise SystemExit(f"heretic exited {rc} without saving {out.name}; see {logfile}")
    tmp.rename(out)
    return drv


TUNE_DIR = Path(tempfile.gettempdir()) / "cna-heretic-jbb-tune"
"""Where the JBB tuning prompts exist while heretic runs (outside the repository, deleted after each run): a fixed
path, so an interrupted study, whose stored settings name these files, can be continued."""


def _config(model: Path, prompts: Path, trials: int, batch_size: int, system: str) -> str:
    spec = lambda path: f'dataset = {_toml_str(str(path))}\n'  # noqa: E731 (text file: every line)
    return (f"model = {_toml_str(str(model))}\n"
            'device_map = "cpu"\n'
            'dtypes = ["float32"]\n'
            f"batch_size = {batch_size}\n"
            f"n_trials = {trials}\n"
            f"n_startup_trials = {max(1, trials // 3)}\n"
            "seed = 0\n"
            'export_strategy = "merge"\n'
            f"system_prompt = {_toml_str(system)}\n"
            f"\n[good_prompts]\n{spec(prompts / 'benign.txt')}"
            f"\n[bad_prompts]\n{spec(prompts / 'harmful.txt')}"
            f"\n[good_evaluation_prompts]\n{spec(TUNE_DIR / 'good.txt')}"
            f"\n[bad_evaluation_prompts]\n{spec(TUNE_DIR / 'bad.txt')}")


def _resumable(config: str) -> bool:
    """Whether run/checkpoints holds a study heretic may continue: one begun with this very config.toml (an
    interrupted run resumes at its next trial; heretic re-reads its settings from the study)."""
    return (RUN / "checkpoints").is_dir() and any((RUN / "checkpoints").iterdir()) and \
        (RUN / "config.toml").is_file() and (RUN / "config.toml").read_text() == config


def run(trials: int, max_kl: float, batch_size: int) -> None:
    exe = VENV / "bin" / "heretic"
    if not exe.is_file():
        raise SystemExit("heretic is not installed: run with --setup first")
    if (RUN / "model" / "config.json").is_file():
        log(f"heretic model already saved: {RUN / 'model'}", sys.stderr)
        return
    model = base_folder()
    RUN.mkdir(parents=True, exist_ok=True)
    prompts = RUN / "prompts"
    prompts.mkdir(exist_ok=True)
    for name in ("harmful", "benign"):
        (prompts / f"{name}.txt").write_text(
            "\n".join(_prompt_lines(ROOT / "recipes" / "prompts" / f"refusal-{name}.txt")) + "\n")
    system = _system_prompt()
    config = _config(model, prompts, trials, batch_size, system)
    if not _resumable(config):  # another budget or setting: start from scratch
        shutil.rmtree(RUN / "checkpoints", ignore_errors=True)
        (RUN / "elapsed.json").unlink(missing_ok=True)
    (RUN / "config.toml").write_text(config)
    elapsed = json.loads((RUN / "elapsed.json").read_text())["seconds"] if (RUN / "elapsed.json").is_file() else 0.0
    t0 = time.time()
    shutil.rmtree(TUNE_DIR, ignore_errors=True)
    TUNE_DIR.mkdir(parents=True)
    try:  # JBB text exists only while heretic runs
        pairs = _write_tune_prompts(TUNE_DIR / "bad.txt", TUNE_DIR / "good.txt")
        drv = _drive(RUN / "model", RUN / "heretic.log", max_kl)
    finally:
        shutil.rmtree(TUNE_DIR, ignore_errors=True)
        elapsed += time.time() - t0
        (RUN / "elapsed.json").write_text(json.dumps({"seconds": round(elapsed, 1)}) + "\n")
    info = {"heretic": HERETIC_VERSION, "trials": trials, "max_kl": max_kl, "front": drv.front,
            "choice": drv.choice, "wall_seconds": round(elapsed, 1), "load": os.getloadavg()[0],
            "system_prompt": system, "tune_pairs": pairs}
    (RUN / "run.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"heretic: {trials} trials in {info['wall_seconds'] / 60:.1f} min; chose {drv.choice}", sys.stderr)


def _study_settings() -> dict:
    """The settings heretic stored with its finished study (the journal in run/checkpoints)."""
    for f in sorted((RUN / "checkpoints").glob("*")):
        for line in f.read_text().splitlines():
            if "bad_evaluation_prompts" not in line:
                continue
            stack = [json.loads(line)]
            while stack:
                x = stack.pop()
                if isinstance(x, dict):
                    stack.extend(x.values())
                elif isinstance(x, list):
                    stack.extend(x)
                elif isinstance(x, str) and "bad_evaluation_prompts" in x:
                    return json.loads(x)
    raise SystemExit(f"no finished heretic study in {RUN / 'checkpoints'}: run --run first")


def run_extra(trial: int) -> Path:
    """Save another trial of the finished study's front (no new trials): heretic re-opens the study with its
    stored settings, whose evaluation prompts are the run's temporary JBB files, recreated at the same paths for
    this call only."""
    out = RUN / f"model-t{trial}"
    if (out / "config.json").is_file():
        return out
    settings = _study_settings()
    files = {"bad": Path(settings["bad_evaluation_prompts"]["dataset"]),
             "good": Path(settings["good_evaluation_prompts"]["dataset"])}
    folder = files["bad"].parent
    if not str(folder).startswith(tempfile.gettempdir()) or folder.exists():
        raise SystemExit(f"heretic's study names evaluation prompts in {folder}; refusing to write there")
    folder.mkdir(parents=True)
    try:
        _write_tune_prompts(files["bad"], files["good"])
        drv = _drive(out, RUN / f"heretic-t{trial}.log", 0.0, trial=trial)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    info = json.loads((RUN / "run.json").read_text())
    info.setdefault("extra", {})[str(trial)] = drv.choice
    (RUN / "run.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def trial_gguf(trial: int) -> Path:
    """Another trial of the finished study's front as a GGUF (once): saved by :func:`run_extra`, its changed tensors
    spliced into the bundled file, each quantised by ggml to the type the shipped file has for it."""
    from cna_export.io.bundled import resolve

    path = RUN / f"heretic-t{trial}.Q4_K_M.gguf"
    if not path.is_file():
        gguf_rebuild.splice_edit(resolve(MODEL), changed_tensors(run_extra(trial)), path)
    return path


def changed_tensors(model_dir: Path) -> dict:
    """The tensors of ``model_dir`` (heretic's merged model) that differ from the float32 base."""
    import numpy as np
    from safetensors import safe_open

    def tensors(folder: Path) -> dict:
        res = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "np") as fh:
                for k in fh.keys():
                    res[k] = fh.get_tensor(k)
        return res

    base, edited = tensors(base_folder()), tensors(model_dir)
    changed = {}
    for k, v in edited.items():
        b = base.get(k)
        if b is None:
            raise SystemExit(f"heretic's model has a tensor the base lacks: {k}")
        if not np.array_equal(np.asarray(v, dtype=np.float32), b):
            changed[k] = np.asarray(v, dtype=np.float32)
    return changed


def convert() -> dict[str, Path]:
    """heretic's edit in the bundled GGUF: ``heretic.Q4_K_M.gguf`` is the shipped file byte for byte except the
    tensors heretic changed, each quantised to its shipped type by ggml (``gguf_rebuild.splice_edit``);
    ``heretic.Q8_0.gguf`` (for the audit bench) is an F32 copy quantised whole by llama.cpp."""
    from cna_export.io.bundled import resolve

    out = {"heretic": RUN / "heretic.Q4_K_M.gguf", "heretic-q8": RUN / "heretic.Q8_0.gguf"}
    if all(p.is_file() for p in out.values()):
        return out
    reference = resolve(MODEL)
    changed = changed_tensors(RUN / "model")
    log(f"heretic changed {len(changed)} tensors: "
        f"{sorted({re.sub(r'layers[.]([0-9]+)[.]', 'layers.N.', k) for k in changed})}", sys.stderr)
    (RUN / "changed.json").write_text(json.dumps(sorted(changed), indent=1) + "\n")
    if not out["heretic"].is_file():
        gguf_rebuild.splice_edit(reference, changed, out["heretic"])
    if not out["heretic-q8"].is_file():
        f32 = gguf_rebuild.write_f32_gguf(reference, changed, RUN / "heretic.F32.gguf")
        gguf_rebuild.quantize(f32, out["heretic-q8"], "Q8_0")
        f32.unlink()
    return out


def evaluate(a) -> None:
    """heretic's GGUF against the bundled one on the held-out pairs (bench/strategies.py's heldout settings)."""
    from cna_export.evaluation.backends import open_backend
    from cna_export.evaluation.eval_sets import load_jbb
    from cna_export.evaluation.evaluator import Condition, Evaluator
    from cna_export.evaluation.interventions import Steering

    paths = convert()
    info = json.loads((RUN / "run.json").read_text())
    ch = info["choice"]
    held = st.heldout_pairs(a)
    harmful, benign = load_jbb()
    harmful, benign = harmful.subset(held), benign.subset(held)
    settings = st.heldout_settings(a)
    HELDOUT.mkdir(parents=True, exist_ok=True)
    rows = {
        "heretic": (paths["heretic"], f"heretic {HERETIC_VERSION} ({info['trials']} trials, trial {ch['trial']})",
                    {"method": "peer", "strategy": "heretic", "peer": "heretic", "trials": info["trials"],
                     "trial": ch["trial"], "tune_refusals": ch["refusals"], "tune_kl": ch["kl"]}),
    }
    for t in getattr(a, "extra_trial", None) or []:
        path = trial_gguf(t)
        f = json.loads((RUN / "run.json").read_text())["extra"][str(t)]
        rows[f"t{t}"] = (path, f"heretic {HERETIC_VERSION} ({info['trials']} trials, trial {t})",
                         {"method": "peer", "strategy": "heretic", "peer": "heretic-extra", "trials": info["trials"],
                          "trial": t, "tune_refusals": f["refusals"], "tune_kl": f["kl"]})
    todo = {k: v for k, v in rows.items() if not (HELDOUT / f"{st.slug(v[1])}.json").is_file()}
    if not todo:
        return
    reference = open_backend(MODEL, "llama.cpp", batch_size=a.batch_size, threads=a.threads)
    try:  # one unsteered reference run; each checkpoint is a condition on its own backend
        ev = Evaluator(reference, harmful, benign, settings, log=lambda m: print(m, file=sys.stderr, flush=True))
        ev.baseline()
        for path, lab, extra in todo.values():
            backend = open_backend(str(path), "llama.cpp", batch_size=a.batch_size, threads=a.threads)
            try:
                t0 = time.time()
                res = ev.run(Condition(lab, Steering.none(lab), backend, extra))
                st.dump_result(HELDOUT / f"{st.slug(lab)}.json", res, time.time() - t0)
            finally:
                backend.close()
    finally:
        reference.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setup", action="store_true")
    p.add_argument("--run", action="store_true")
    p.add_argument("--convert", action="store_true")
    p.add_argument("--eval", action="store_true")
    p.add_argument("--all", action="store_true")
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--max-kl", type=float, default=0.1)
    p.add_argument("--extra-trial", type=int, action="append",
                   help="--eval: also save and score this trial of heretic's front (repeatable)")
    p.add_argument("--heretic-batch-size", type=int, default=16)
    st.add_protocol_args(p)  # the held-out settings of bench/strategies.py
    a = p.parse_args()
    if a.setup or a.all:
        if not (VENV / "bin" / "heretic").is_file() or a.setup:
            setup()
    if a.run or a.all:
        run(a.trials, a.max_kl, a.heretic_batch_size)
    if a.convert or a.all:
        convert()
    if a.eval or a.all:
        evaluate(a)
    if not (a.setup or a.run or a.convert or a.eval or a.all):
        p.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
