#!/usr/bin/env python
"""Start-up cost per command: wall and CPU time of the whole process, time spent importing, and
which heavy libraries each command imports.

    python bench/startup.py                 # 7 runs per command, medians, Markdown table
    python bench/startup.py --runs 3 --json bench/out/startup.json
    python bench/startup.py --baseline /tmp/old --only "export gguf,cp"   # against an older tree, alternating

Commands (on the bundled SmolLM2 GGUF, outputs in a temporary folder):

    --help               the top-level help
    export --help        one command's help
    argument error       ``export --multiplier abc`` (exit 2)
    show                 summarise a circuit
    export gguf          fold a 3-neuron circuit into the GGUF (GGUFWriter)
    export gguf fast     the same with --fast-copy
    export gguf-lora     the same neurons as a llama.cpp LoRA adapter GGUF
    diff gguf            the export against its source
    discover --help      a command whose work needs torch: its help must not import it
    cp                   ``cp`` of the GGUF file (not a cna-export command: the floor of an export)
    export safetensors   fold the same neurons into a bfloat16 safetensors folder of the model (made once
                         from the GGUF by transformers, kept in bench/out/startup/)
    cp -r                ``cp -rT`` of that folder
    export lora          the same neurons of that folder as a PEFT LoRA adapter folder

The exports write the Modelfile too (the default), as a user's would; the last lines compare the best
``export gguf`` with ``1.5 x cp + 0.3 s`` (issue 23's bound for a small export).

Each run is a fresh ``python -m cna_export`` process: wall time from this script, CPU time
(user + system) from ``resource.getrusage(RUSAGE_CHILDREN)``. One extra run per command with
``python -X importtime`` sums the top-level imports' cumulative time and lists the heavy modules
loaded (torch, transformers, safetensors, gguf, numpy, llama_cpp).

The processes run as a user's install runs: ``PYTHONDONTWRITEBYTECODE`` is removed from their environment
and every command runs once before the timed rounds, so each module is imported from its ``.pyc``. They run
in the temporary folder, so ``--baseline DIR`` (a folder holding another ``cna_export`` package, e.g. a
``git archive`` of an older commit) puts that package first on ``PYTHONPATH``; its rows ("(baseline)")
alternate with the current tree's in every round, so both see the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._common import child_env

HEAVY = ("torch", "transformers", "safetensors", "gguf", "numpy", "llama_cpp", "pydantic")


ST_FOLDER = Path(__file__).resolve().parent / "out" / "startup"
NEURONS = ((3, 5), (10, 100), (20, 7))


def commands(tmp: Path, model: str, circuit: Path, st: Path | None = None) -> dict[str, tuple[list[str], int]]:
    exp = ["export", "--model", model, "--circuit", str(circuit), "--multiplier", "0", "--format", "gguf",
           "--overwrite"]
    st_rows = {} if st is None else {
        "export safetensors": (["export", "--model", str(st), "--circuit", str(tmp / "c-st.json"), "--multiplier",
                                "0", "--format", "safetensors", "--overwrite", "--out", str(tmp / "st")], 0),
        "cp -r": (["cp", "-rT", "--", str(st), str(tmp / "cp-st")], 0),
        "export lora": (["export", "--model", str(st), "--circuit", str(tmp / "c-st.json"), "--multiplier", "0",
                         "--format", "lora", "--overwrite", "--out", str(tmp / "lora")], 0),
    }
    return {**st_rows,
        "--help": (["--help"], 0),
        "export --help": (["export", "--help"], 0),
        "argument error": (["export", "--multiplier", "abc"], 2),
        "show": (["show", str(circuit)], 0),
        "export gguf": (exp + ["--out", str(tmp / "w.gguf")], 0),
        "export gguf fast": (exp + ["--fast-copy", "--out", str(tmp / "f.gguf")], 0),
        "export gguf-lora": ([*exp[:-2], "gguf-lora", "--overwrite", "--out", str(tmp / "l.gguf")], 0),
        "diff gguf": (["diff", str(tmp / "w.gguf"), model], 0),
        "discover --help": (["discover", "--help"], 0),
        "cp": (["cp", model, str(tmp / "cp.gguf")], 0),
    }


def run_once(argv: list[str], want: int, cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cmd = argv if argv[0] == "cp" else [sys.executable, "-m", "cna_export", *argv]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != want:
        raise SystemExit(f"{argv} exited {p.returncode}, expected {want}:\n{p.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def import_profile(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, list[str]]:
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "cna_export", *argv], capture_output=True,
                       text=True, cwd=cwd, env=env)
    total = 0
    loaded = set()
    for line in p.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split(":", 1)[1].split("|")
        cumulative = cumulative.strip()
        if not cumulative.isdigit():
            continue
        top = name.startswith(" ") and not name.startswith("  ")  # top level: no indentation
        raw_name = name.strip()
        if raw_name.split(".")[0] in HEAVY:
            loaded.add(raw_name.split(".")[0])
        if top:
            total += int(cumulative)
    return total / 1e6, sorted(loaded)


Row = tuple[str, list[str], int, "Path | None"]
"""(row name, argv, exit code wanted, the folder of the package it runs: None for this tree)"""


def _rows(cmds: dict[str, tuple[list[str], int]], baseline: Path | None) -> list[Row]:
    """Every timed row; with a baseline, each cna-export command twice in a row, the baseline's first."""
    rows = []
    for name, (argv, want) in cmds.items():
        if baseline is not None and argv[0] != "cp":
            rows.append((f"{name} (baseline)", argv, want, baseline))
        rows.append((name, argv, want, None))
    return rows


def _circuit(model: str, spec: str, out: Path) -> None:
    from cna_export.core.circuit import Circuit, Neuron
    from cna_export.io.gguf import open_gguf
    from cna_export.io.identity import gguf_identity

    Circuit(model=gguf_identity(open_gguf(model), spec),
            neurons=[Neuron(layer=layer, index=i, score=1.0) for layer, i in NEURONS],
            method={"name": "manual"}).save(out)


def _safetensors_twin(model: str, spec: str, circuit: Path) -> Path:
    """A bfloat16 safetensors folder of the GGUF (as Hub checkpoints ship), made once, and a circuit of it."""
    from cna_export.core.circuit import Circuit, Neuron
    from cna_export.io.identity import checkpoint_identity

    folder = ST_FOLDER / (Path(model).stem + "-bf16")
    if not (folder / "config.json").is_file():
        from cna_export.export.safetensors import convert_to_safetensors

        folder.mkdir(parents=True, exist_ok=True)
        convert_to_safetensors(model, folder, dtype="bfloat16")
    Circuit(model=checkpoint_identity(folder, spec + " (bf16 safetensors)")[0],
            neurons=[Neuron(layer=layer, index=i, score=1.0) for layer, i in NEURONS],
            method={"name": "manual"}).save(circuit)
    return folder


def _measure(rows: list[Row], runs: int, tmp: Path) -> dict[str, dict]:
    results: dict[str, dict] = {}
    envs = {pkg: child_env(pkg) for _, _, _, pkg in rows}
    for _, argv, want, pkg in rows:  # warm-up: .pyc files written, page cache warm, the file the diff reads
        run_once(argv, want, tmp, envs[pkg])
    for _ in range(runs):  # round-robin: load changes hit every command alike
        for name, argv, want, pkg in rows:
            wall, cpu = run_once(argv, want, tmp, envs[pkg])
            results.setdefault(name, {"wall": [], "cpu": []})
            results[name]["wall"].append(wall)
            results[name]["cpu"].append(cpu)
    for name, argv, _, pkg in rows:
        found = import_profile(argv, tmp, envs[pkg]) if argv[0] != "cp" else (0.0, [])
        results[name]["imports_s"], results[name]["heavy"] = found
    return results


def _bound(results: dict[str, dict], row: str) -> str:
    cp, exp = min(results["cp"]["wall"]), min(results[row]["wall"])
    return (f"{row} (best) {exp:.3f} s; bound 1.5 x cp (best, {cp:.3f} s) + 0.3 s = {1.5 * cp + 0.3:.3f} s: "
            + ("met" if exp <= 1.5 * cp + 0.3 else "not met"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--model", default="bundled:smollm2")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--baseline", type=Path, default=None,
                    help="a folder holding another cna_export package, timed alternately with this tree")
    ap.add_argument("--only", default=None, help="comma-separated commands to time (default: all)")
    args = ap.parse_args()

    from cna_export.io.bundled import resolve

    model = str(resolve(args.model))
    with tempfile.TemporaryDirectory(prefix="cna-startup-") as d:
        tmp = Path(d)
        _circuit(model, args.model, tmp / "c.json")
        want = [x.strip() for x in args.only.split(",")] if args.only else None
        st = None if want and not {"export safetensors", "cp -r"} & set(want) else \
            _safetensors_twin(model, args.model, tmp / "c-st.json")
        cmds = commands(tmp, model, tmp / "c.json", st)
        if args.only:
            wanted = [x.strip() for x in args.only.split(",")]
            cmds = {k: v for k, v in cmds.items() if k in wanted or (k == "export gguf" and "diff gguf" in wanted)}
        results = _measure(_rows(cmds, args.baseline.resolve() if args.baseline else None), args.runs, tmp)
    load = os.getloadavg()
    print(f"{args.runs} runs per command; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
          f"on {os.cpu_count()} cores")
    print("\n| command | wall (median) | wall (best) | CPU (median) | CPU (best) | imports | heavy modules imported |\n"
          "|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {statistics.median(r['wall']):.3f} s | {min(r['wall']):.3f} s | "
              f"{statistics.median(r['cpu']):.3f} s | {min(r['cpu']):.3f} s | {r['imports_s']:.2f} s | "
              f"{', '.join(r['heavy']) or '-'} |")
    if "cp" in results:
        for row in ("export gguf (baseline)", "export gguf"):
            if row in results:
                print("\n" + _bound(results, row))
    if "cp -r" in results:
        cp = statistics.median(results["cp -r"]["wall"])
        for row in ("export safetensors (baseline)", "export safetensors"):
            if row in results:
                print(f"\n{row}: {statistics.median(results[row]['wall']) / cp:.2f} x cp -r (medians)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"load": load, "results": results}, indent=2))


if __name__ == "__main__":
    main()
