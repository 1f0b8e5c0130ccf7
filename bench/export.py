"""Benchmark the streaming safetensors export against `cp -r` and a full transformers load + save.

The checkpoint is Qwen2.5-Coder-0.5B-Instruct (the bundled Q4_K_M GGUF, dequantised once to float32
safetensors in 4 shards) and the circuit is the refusal circuit CNA discovery finds on it
with the bundled recipe (top 0.1% = 117 neurons). Both are made once and cached (not in the repo):

    ~/.cache/cna-export/bench/qwen2.5-coder-0.5b-fp32/      the source checkpoint
    ~/.cache/cna-export/bench/qwen-refusal-circuit.json      the circuit

Each variant runs in its own subprocess under GNU ``/usr/bin/time``, which reports that process's
wall time and peak RSS (a child measured directly from this script would inherit this script's
high-water RSS through fork + exec; ``time`` forks from a small process). Variants run round-robin
(``--repeats`` times each) after the source has been read once into the page cache, with ``sync``
between runs; outputs go beside the source (same filesystem, so ``--link`` can hard-link) and are
deleted after each run. The source is about 2.5 GB (the GGUF's output matrix is kept untied).

    cp          cp -r SRC OUT
    export      cna-export export --model SRC --circuit C --multiplier 0 --out OUT
    export-link the same with --link (untouched shards hard-linked)
    hf-full     AutoModelForCausalLM.from_pretrained(SRC) in float32, scale the circuit's down_proj
                columns in place, save_pretrained(OUT) + tokenizer: what abliteration scripts do

Once, the export's output is compared tensor by tensor with hf-full's (they must be identical).

    python bench/export.py                  # 3 repeats; prints a Markdown table, writes JSON
    python bench/export.py --repeats 1 --json bench/out/export.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench._common import ROOT
from bench.scale import GNU_TIME, measure  # wall, CPU, peak RSS and anonymous memory
from cna_export.io import bundled

MODEL = "bundled:qwen2.5-coder-0.5b"
SHARDS = 4

HF_FULL = r"""
import json, sys, shutil
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

src, circuit, out, shard = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
neurons = json.loads(Path(circuit).read_text())["neurons"]
with torch.no_grad():
    for n in neurons:
        model.model.layers[n["layer"]].mlp.down_proj.weight[:, n["index"]] *= 0.0
model.save_pretrained(out, max_shard_size=shard)
AutoTokenizer.from_pretrained(src).save_pretrained(out)
"""


def cache_root() -> Path:
    return bundled.cache_dir() / "bench"


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def prepare_source(root: Path) -> tuple[Path, str]:
    """Dequantise the Qwen GGUF to float32 safetensors in 4 shards (once); return the folder and shard size."""
    src = root / "qwen2.5-coder-0.5b-fp32"
    stamp = src / "shard_size.txt"
    if stamp.is_file():
        return src, stamp.read_text().strip()
    from gguf import GGUFReader

    from cna_export.export.safetensors import convert_to_safetensors

    print(f"preparing {src} (once) ...", flush=True)
    # shard size: big enough for the largest tensor and a quarter of the model (float32) -> 4 shards
    sizes = [int(t.n_elements) * 4 for t in GGUFReader(str(bundled.resolve(MODEL))).tensors]
    shard_mb = math.ceil(max(max(sizes), sum(sizes) / SHARDS) * 1.01 / 1e6)
    shard = f"{shard_mb}MB"
    tmp = Path(tempfile.mkdtemp(prefix=".qwen-fp32.", dir=root))
    try:
        convert_to_safetensors(MODEL, tmp, dtype="float32", max_shard_size=shard)
        n = len(list(tmp.glob("*.safetensors")))
        if n != SHARDS:
            raise SystemExit(f"expected {SHARDS} shards with max_shard_size={shard}, got {n}")
        (tmp / "shard_size.txt").write_text(shard + "\n")
        os.replace(tmp, src)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return src, shard


def prepare_circuit(root: Path) -> Path:
    circuit = root / "qwen-refusal-circuit.json"
    if not circuit.is_file():
        print(f"discovering {circuit} (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "cna_export", "-q", "discover", "--model", MODEL,
                        "--recipe", str(ROOT / "recipes" / "refusal.yaml"), "--out", str(circuit)],
                       check=True, cwd=ROOT)
    return circuit


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def compare_outputs(a: Path, b: Path) -> int:
    """Every tensor of ``a`` equals ``b``'s, bit for bit; returns the number compared."""
    from cna_export.io.safetensors import Checkpoint
    from cna_export.io.tensor_bytes import tensor_sha256

    ca, cb = Checkpoint.open(a), Checkpoint.open(b)
    if set(ca.weight_map) != set(cb.weight_map):
        raise SystemExit(f"{a} and {b} hold different tensors")
    for name in ca.weight_map:
        if tensor_sha256(ca.read(name)) != tensor_sha256(cb.read(name)):
            raise SystemExit(f"{name} differs between the export and transformers' save_pretrained")
    return len(ca.weight_map)


def machine() -> dict:
    import safetensors
    import torch
    import transformers

    mem = next((l.split()[1] for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")), "?")
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(int(mem) / 2**20, 1) if mem != "?" else None,
        "os": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "safetensors": safetensors.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=None, help="cache folder (default ~/.cache/cna-export/bench)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here as well")
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    root = args.cache or cache_root()
    root.mkdir(parents=True, exist_ok=True)
    if args.prepare:
        prepare_source(root)
        return
    if not Path(GNU_TIME).is_file():
        raise SystemExit(f"needs GNU time at {GNU_TIME} (apt-get install time)")
    # the one-off conversion loads the model: do it in a child so this process stays small
    subprocess.run([sys.executable, __file__, "--prepare", "--cache", str(root)], check=True)
    src, shard = prepare_source(root)
    circuit = prepare_circuit(root)
    n_neurons = len(json.loads(circuit.read_text())["neurons"])
    size = _dir_bytes(src)
    free = shutil.disk_usage(root).free
    if free < 3 * size:
        raise SystemExit(f"need about {_gb(3 * size)} free beside {src}, have {_gb(free)}")

    # read the source once so every variant starts from the page cache
    for f in sorted(src.iterdir()):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass

    py = [sys.executable]
    variants = {
        "cp": lambda out: ["cp", "-r", str(src), str(out)],
        "export": lambda out: py + ["-m", "cna_export", "export", "--model", str(src), "--circuit", str(circuit),
                                    "--multiplier", "0", "--out", str(out)],
        "export-link": lambda out: py + ["-m", "cna_export", "export", "--model", str(src), "--circuit",
                                         str(circuit), "--multiplier", "0", "--out", str(out), "--link"],
        "hf-full": lambda out: py + ["-c", HF_FULL, str(src), str(circuit), str(out), shard],
    }
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    compared = None
    for rep in range(args.repeats):
        for name, cmd in variants.items():
            out = root / f"out-{name}"
            shutil.rmtree(out, ignore_errors=True)
            r = measure(cmd(out), root / f"{name}.log")  # syncs first
            r["output_bytes"] = _dir_bytes(out)
            inner = re.search(r"^wrote .* in ([0-9.]+)s$", (root / f"{name}.log").read_text(), re.M)
            if inner:  # the export's own time, without interpreter start-up and imports
                r["export_seconds"] = float(inner.group(1))
            runs[name].append(r)
            inner_text = f", {r['export_seconds']:.2f} s inside" if "export_seconds" in r else ""
            print(f"[{rep + 1}/{args.repeats}] {name:<12} {r['seconds']:7.2f} s  {r['max_rss_mib']:8.1f} MiB  "
                  f"(load {r['load_before']:.1f}{inner_text})", flush=True)
            if name == "hf-full" and compared is None:  # the first export's output was kept for this
                compared = compare_outputs(root / "out-export", out)
                print(f"             export == hf-full: {compared} tensors identical", flush=True)
                shutil.rmtree(root / "out-export", ignore_errors=True)
            if not (name == "export" and compared is None):
                shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(root / "out-export", ignore_errors=True)

    summary = {}
    for name, rs in runs.items():
        summary[name] = {
            "seconds_median": statistics.median(r["seconds"] for r in rs),
            "seconds_all": [round(r["seconds"], 3) for r in rs],
            "max_rss_mib": max(r["max_rss_mib"] for r in rs),
            "output_bytes": rs[0]["output_bytes"],
        }
        if all("export_seconds" in r for r in rs):
            summary[name]["export_seconds_median"] = statistics.median(r["export_seconds"] for r in rs)
    ex, cp, hf, ln = (summary[k] for k in ("export", "cp", "hf-full", "export-link"))
    ratios = {
        "export_vs_cp_time": ex["seconds_median"] / cp["seconds_median"],
        "export_vs_hf_time": ex["seconds_median"] / hf["seconds_median"],
        "export_vs_hf_rss": ex["max_rss_mib"] / hf["max_rss_mib"],
        "export_link_vs_cp_time": ln["seconds_median"] / cp["seconds_median"],
    }
    result = {
        "machine": machine(), "model": MODEL, "source": str(src), "source_bytes": size, "shards": SHARDS,
        "shard_size": shard, "circuit_neurons": n_neurons, "repeats": args.repeats, "variants": summary,
        "ratios": ratios, "identical_tensors_export_vs_hf": compared,
    }
    print()
    print(f"source: {MODEL} as float32 safetensors, {SHARDS} shards, {_gb(size)}; circuit {n_neurons} neurons, "
          "multiplier 0")
    print("| variant | wall time (median of %d) | peak RSS | output |" % args.repeats)
    print("|---|---|---|---|")
    for name, s in summary.items():
        inner = f" ({s['export_seconds_median']:.2f} s after start-up)" if "export_seconds_median" in s else ""
        print(f"| {name} | {s['seconds_median']:.2f} s{inner} | {s['max_rss_mib']:.0f} MiB | "
              f"{_gb(s['output_bytes'])} |")
    print()
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    text = json.dumps(result, indent=2)
    (root / "bench-export.json").write_text(text + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
