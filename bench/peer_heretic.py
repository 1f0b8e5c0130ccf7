#!/usr/bin/env python
"""Peer baseline: heretic (directional ablation + Optuna TPE; PyPI heretic-llm, AGPL-3.0) on Qwen2.5-Coder-0.5B.

    python bench/peer_heretic.py --setup          # venv in bench/out/heretic/venv + pip install heretic-llm
    python bench/peer_heretic.py --run            # dequantise the bundled GGUF, run heretic in its own process

Licence boundary: heretic is AGPL. It is installed only into its own virtual environment created here and
runs only as a separate process; cna_export never imports it and nothing of it is copied into this repo.

Status (CPU-only, no network but PyPI): NOT RUN for the published figures. heretic's default search is
200 trials, each generating answers for its harmful and harmless prompt sets and scoring KL, which on this
2-core machine would take days for a 0.5B model (one 150-token pass over 100 prompts takes several minutes
in llama.cpp, and heretic runs transformers). Its default prompt sets are Hugging Face datasets that this
machine cannot download; this script points it at local copies of the recipe's own prompt sets (never
JBB) saved with `datasets.save_to_disk` if its config accepts a local dataset path (heretic's dataset
loader is `datasets.load_dataset`, which takes a local folder). The published peer figure (94 -> 7
refusals at KL 0.05 on Qwen2-0.5B) is heretic's own, on its own prompts and judge; it is quoted in
docs/strategies.md as such, not re-measured.

After a run, the abliterated model (safetensors) can be evaluated with the same JBB protocol as the other
rows: convert it to GGUF (llama.cpp's convert_hf_to_gguf.py, Q4_K_M) and run
`cna-export eval --model <gguf> --backend llama.cpp` on the held-out pairs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out" / "heretic"
VENV = OUT / "venv"


def setup() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    if not (VENV / "bin" / "python").is_file():
        venv.create(VENV, with_pip=True)
    subprocess.run([str(VENV / "bin" / "pip"), "install", "heretic-llm"], check=True)


def dequantised_model() -> Path:
    """The bundled Qwen GGUF as a float32 Hugging Face folder (once), for heretic's transformers loader."""
    sys.path.insert(0, str(ROOT))
    from cna_export.model.loading import load_model, save_tokenizer

    target = OUT / "qwen2.5-coder-0.5b-f32"
    if not (target / "config.json").is_file():
        loaded = load_model("bundled:qwen2.5-coder-0.5b")
        loaded.model.save_pretrained(target)
        save_tokenizer(loaded.tokenizer, target)
    return target


def local_prompts() -> tuple[Path, Path]:
    """The recipe's harmful and benign prompt sets as local datasets (heretic reads datasets, not text files)."""
    import datasets

    out = []
    for name in ("refusal-harmful", "refusal-benign"):
        path = OUT / "prompts" / name
        if not path.is_dir():
            texts = [l.strip() for l in (ROOT / "recipes" / "prompts" / f"{name}.txt").read_text().splitlines()
                     if l.strip() and not l.startswith("#")]
            datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(path))
        out.append(path)
    return out[0], out[1]


def run(trials: int) -> None:
    model = dequantised_model()
    bad, good = local_prompts()
    config = OUT / "config.toml"
    config.write_text(
        f'model = "{model}"\n'
        'device_map = "cpu"\n'
        f"n_trials = {trials}\n"
        f"n_startup_trials = {max(1, trials // 3)}\n"
        f'[bad_prompts]\ndataset = "{bad}"\nsplit = "train"\ncolumn = "text"\n'
        f'[good_prompts]\ndataset = "{good}"\nsplit = "train"\ncolumn = "text"\n'
    )
    exe = VENV / "bin" / "heretic"
    if not exe.is_file():
        raise SystemExit("heretic is not installed: run with --setup first")
    subprocess.run([str(exe), "--model", str(model)], cwd=OUT, check=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setup", action="store_true")
    p.add_argument("--run", action="store_true")
    p.add_argument("--trials", type=int, default=20)
    a = p.parse_args()
    if a.setup:
        setup()
    if a.run:
        run(a.trials)
    if not (a.setup or a.run):
        p.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
