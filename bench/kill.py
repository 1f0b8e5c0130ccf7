#!/usr/bin/env python
"""SIGKILL an export at many points and list what it leaves in the output's folder (issue 23).

    python bench/kill.py                              # GGUF and safetensors of bundled SmolLM2, 9 points each
    python bench/kill.py --formats gguf --points 12 --json bench/out/kill.json

Each format is exported once uninterrupted in a child process (``python -c``) that reports when the
output's temporary is created and when it is published. Then, per point, a fresh child is killed with
SIGKILL: 0.05 s after it starts, at ``--points`` times spread evenly from the temporary's creation to its
publication (timed from the creation, as long as the uninterrupted run took), and after the run would
have exited. After each kill the output's folder is listed; then the next export to the same ``--out``
runs (``--overwrite`` where the killed one published) and the folder is listed again. A row passes when
the output is absent or whole after the kill, and the folder holds nothing but the output after the next
run.

Sources: the bundled GGUF (``--model``), and for safetensors that GGUF dequantised to a float32 folder
once (``bench._common.dequantised``, under ``--work``). The circuit is three neurons at multiplier 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench._common import dequantised, log

CHILD = r"""
import os, signal, sys, threading, time
t0 = time.perf_counter()
from pathlib import Path
import cna_export.core.atomic as A
args = sys.argv[1:]
out = Path(args[args.index("--out") + 1]).resolve()
orig_new, orig_publish = A._new_temp, A._publish
def mark(name, final):
    if Path(final) != out:
        return
    print(f"mark {name} {time.perf_counter() - t0:.4f}", file=sys.stderr, flush=True)
    if name == "temp" and os.environ.get("IN_WRITE"):
        threading.Timer(float(os.environ["IN_WRITE"]), os.kill, (os.getpid(), signal.SIGKILL)).start()
def _new_temp(final, *a, **k):
    temp = orig_new(final, *a, **k)
    mark("temp", final)
    return temp
def _publish(temp, final, *a, **k):
    orig_publish(temp, final, *a, **k)
    mark("published", final)
A._new_temp, A._publish = _new_temp, _publish
if os.environ.get("DELAY"):
    left = float(os.environ["DELAY"]) - (time.perf_counter() - t0)
    threading.Timer(left, os.kill, (os.getpid(), signal.SIGKILL)).start()
from cna_export.cli import main
rc = main(args)
sys.stdout.flush(); sys.stderr.flush()
os._exit(rc)
"""


@dataclass
class Row:
    format: str
    kill_at: str
    outcome: str  # killed before publication / published, then killed / completed
    left_after_kill: list[str]
    left_after_next_run: list[str]
    output_whole: bool | None  # None: no output after the kill
    passed: bool


def child(argv: list[str], **env: str) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, timeout=900,
                       env={**os.environ, **env})
    return p.returncode, p.stderr


def export_argv(src: Path | str, circuit: Path, fmt: str, out: Path, *extra: str) -> list[str]:
    return ["export", "--model", str(src), "--circuit", str(circuit), "--multiplier", "0", "--format", fmt,
            "--out", str(out), *(["--no-modelfile"] if fmt == "gguf" else []), *extra]


def whole(fmt: str, out: Path) -> bool:
    """The output reads back completely: every tensor of every shard, or the GGUF with its manifest."""
    import numpy as np

    try:
        if fmt == "gguf":
            from cna_export.export.gguf import read_gguf_manifest
            from cna_export.io.gguf import open_gguf

            for t in open_gguf(out).tensors:
                hashlib.sha256(np.ascontiguousarray(t.data)).digest()
            return bool(read_gguf_manifest(out)[0].multiplier_map())
        from cna_export.io.safetensors import Checkpoint

        ckpt = Checkpoint.open(out)
        for name in ckpt.weight_map:
            ckpt.read(name)
        return True
    except Exception:  # noqa: BLE001 - any failure to read back means "not whole"
        return False


def others(folder: Path, out: Path) -> list[str]:
    return sorted(set(os.listdir(folder)) - {out.name})


def one_point(fmt: str, src: Path | str, circuit: Path, folder: Path, label: str, env: dict[str, str]) -> Row:
    out = folder / ("out.gguf" if fmt == "gguf" else "out")
    folder.mkdir(parents=True)
    rc, err = child(export_argv(src, circuit, fmt, out), **env)
    if rc not in (0, -signal.SIGKILL):
        raise SystemExit(f"{fmt} at {label}: exit {rc}\n{err[-2000:]}")
    left = others(folder, out)
    ok = whole(fmt, out) if out.exists() else None
    outcome = "completed" if rc == 0 else "published, then killed" if out.exists() else "killed before publication"
    extra = ["--overwrite"] if out.exists() else []
    nrc, nerr = child(export_argv(src, circuit, fmt, out, *extra))
    if nrc != 0:
        raise SystemExit(f"{fmt} next run after {label}: exit {nrc}\n{nerr[-2000:]}")
    after = others(folder, out)
    passed = ok is not False and after == [] and (fmt != "gguf" or left == [])
    return Row(fmt, label, outcome, left, after, ok, passed)


def timing(fmt: str, src: Path | str, circuit: Path, folder: Path) -> tuple[float, float, float]:
    """(temporary created, published, child exited), seconds after the child started, of one whole run."""
    folder.mkdir(parents=True)
    start = time.perf_counter()
    rc, err = child(export_argv(src, circuit, fmt, folder / ("out.gguf" if fmt == "gguf" else "out")))
    total = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"{fmt}: uninterrupted export failed (exit {rc})\n{err[-2000:]}")
    marks = dict(line.split()[1:] for line in err.splitlines() if line.startswith("mark "))
    return float(marks["temp"]), float(marks["published"]), total


def circuit_file(model: str, path: Path) -> Path:
    from cna_export.core.circuit import Circuit, Neuron
    from cna_export.io.gguf import open_gguf
    from cna_export.io.identity import gguf_identity
    from cna_export.io.sources import resolve_source

    ident = gguf_identity(open_gguf(resolve_source(model).path), model, fingerprint=False)
    Circuit(model=ident, neurons=[Neuron(layer=layer, index=i, score=1.0) for layer, i in ((3, 5), (10, 100), (20, 7))],
            method={"name": "manual"}).save(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bundled:smollm2")
    ap.add_argument("--formats", default="gguf,safetensors")
    ap.add_argument("--points", type=int, default=7, help="kill points inside the write (plus 0.05 s and after exit)")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "cna-export" / "bench" / "kill")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="cna-kill-") as d:
        tmp = Path(d)
        circuit = circuit_file(args.model, tmp / "circuit.json")
        for fmt in args.formats.split(","):
            src = args.model if fmt == "gguf" else dequantised(args.model, args.work / "fp32")
            write, published, total = timing(fmt, src, circuit, tmp / f"{fmt}-timing")
            log(f"{fmt}: temporary at {write:.2f} s, published at {published:.2f} s, exit at {total:.2f} s")
            fractions = [i / max(args.points - 1, 1) for i in range(args.points)]
            points = [("0.05 s", {"DELAY": "0.05"})]
            points += [(f"write + {f:.2f} x {published - write:.3f} s", {"IN_WRITE": f"{f * (published - write):.4f}"})
                       for f in fractions]
            points.append((f"{3 * total:.1f} s (after exit)", {"DELAY": f"{3 * total:.3f}"}))
            for i, (label, env) in enumerate(points):
                rows.append(one_point(fmt, src, circuit, tmp / f"{fmt}-{i}", label, env))
                log(f"{fmt} {label}: {rows[-1].outcome}, left {rows[-1].left_after_kill}")
    print("\n| format | kill at | outcome | left after the kill | left after the next run | output whole | pass |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        whole_txt = "-" if r.output_whole is None else "yes" if r.output_whole else "NO"
        print(f"| {r.format} | {r.kill_at} | {r.outcome} | {', '.join(r.left_after_kill) or 'nothing'} | "
              f"{', '.join(r.left_after_next_run) or 'nothing'} | {whole_txt} | {'yes' if r.passed else 'NO'} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    if not all(r.passed for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
