"""What several benchmarks share: the repository root, a timestamped log line, a bundled model dequantised to a
float32 safetensors folder, the splice of a generated section into a Markdown file, and a step runner."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, TextIO

ROOT = Path(__file__).resolve().parent.parent


def log(msg: str, file: TextIO | None = None) -> None:
    """``msg`` after the wall-clock time (``[HH:MM:SS]``), flushed; on stdout unless ``file`` is given."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=file or sys.stdout, flush=True)


def child_env(baseline: Path | None = None) -> dict[str, str]:
    """The environment of a timed process: .pyc files written and read (as in a user's install); with
    ``baseline``, that folder's ``cna_export`` imported instead of this tree's, also when the child runs
    ``python -m`` in this repository (``PYTHONSAFEPATH``: the working directory is not put first on sys.path).
    Refuses (SystemExit) when the child would import another package than the one asked for."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    want = (baseline or ROOT).resolve() / "cna_export"
    if baseline is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(baseline), *filter(None, [env.get("PYTHONPATH")])])
        env["PYTHONSAFEPATH"] = "1"
    got = subprocess.run([sys.executable, "-c", "import cna_export; print(cna_export.__file__)"], cwd=ROOT, env=env,
                         capture_output=True, text=True).stdout.strip()
    if not got or Path(got).resolve().parent != want:
        raise SystemExit(f"a child process would import cna_export from {got or '(nowhere)'}, not {want}"
                         + (" (--baseline needs Python 3.11 or later)" if sys.version_info < (3, 11) else ""))
    return env


def dequantised(model: str, out: Path) -> Path:
    """``model`` (a bundled GGUF) dequantised to a float32 safetensors folder ``out``, converted once: the folder
    is written beside ``out`` and renamed into place, so an existing ``out`` is complete."""
    if (out / "config.json").is_file():
        return out
    from cna_export.export.safetensors import convert_to_safetensors

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    convert_to_safetensors(model, tmp, dtype="float32")
    tmp.rename(out)
    return out


def splice(text: str, start: str, end: str, section: str, heading: str = "") -> str:
    """``text`` with the part from marker ``start`` to marker ``end`` (both included) replaced by ``section``
    (which carries both markers); without the markers, ``heading`` and ``section`` are appended after a blank
    line."""
    if start in text and end in text:
        return text[: text.index(start)] + section + text[text.index(end) + len(end):]
    return text.rstrip("\n") + "\n\n" + heading + section + "\n"


# the GGUF behaviour check's figures a bench records per verify (calibrating its tolerances on real files)
BEHAVIOUR_KEYS = ("prompts", "floor_mean_kl", "steering_effect_mean_kl", "mean_kl", "allowed_mean_kl",
                  "steering_reproduced", "steering_reproduced_se", "noise_to_effect", "slope_tolerance",
                  "top1_flip_excess", "top1_mcnemar_p")


def behaviour_figures(metrics: dict) -> dict[str, float]:
    """The finite :data:`BEHAVIOUR_KEYS` of a verification report's metrics (empty where no behaviour check ran)."""
    import math

    return {k: float(v) for k in BEHAVIOUR_KEYS
            if isinstance(v := metrics.get(k), (int, float)) and math.isfinite(v)}


def run_steps(names: str, steps: dict[str, Callable[[Any], None]], args: Any) -> int:
    """Run the comma-separated ``names`` of ``steps`` in order, each with ``args``; an unknown name exits first."""
    order = [n for n in names.split(",") if n]
    unknown = [n for n in order if n not in steps]
    if unknown:
        raise SystemExit(f"unknown step {unknown[0]} (choose from {list(steps)})")
    for name in order:
        steps[name](args)
    return 0
