#!/usr/bin/env python
"""Scale benchmark: exports of a Llama-3-8B-shaped checkpoint against ``cp``, wall time and peak RSS.

    python bench/scale.py                      # make the checkpoints once, 3 rounds, table to stdout
    python bench/scale.py --repeats 1 --json bench/out/scale.json
    python bench/scale.py --clean              # delete the synthetic checkpoints (about 21 GB)

Synthetic checkpoints of the Llama-3-8B geometry (32 layers, hidden 4096, intermediate 14336,
32/8 attention heads, vocabulary 128256) with random weights, made once under
``~/.cache/cna-export/bench/scale`` (``--dir``):

* ``llama8b-bf16/``: bfloat16 safetensors in four shards of at most 5 GB (16.1 GB), with an index
  and a config.json, as Meta ships it. The shards are written by streaming each tensor's bytes
  after a header built from the safetensors format (``safetensors.numpy.save_file`` would hold a
  whole 5 GB shard in memory); ``safe_open`` reads every one of them back in the tests of this file.
* ``llama8b-q4k.gguf``: the same shape as a GGUF whose matrices are Q4_K blocks with random
  quants and sane fp16 scales (4.6 GB), written with gguf-py's ``GGUFWriter`` one tensor at a time.

The circuit is 0.1% of all MLP neurons (459), spread over all 32 layers, on the checkpoint's
fingerprint, in the scheme of the code that runs the bench (``circuit-<method hash>.json``: a before/after
comparison run from two copies of the code gives each its own circuit, as each would have discovered it).
When only GGUF variants run (``--only cp-gguf,export-gguf,...``), the safetensors folder is not made (16 GB)
and the circuit is made on the GGUF's own fingerprint instead (``circuit-gguf-<method hash>.json``).

Each variant runs in its own process under GNU ``/usr/bin/time`` (wall time and peak RSS), round-robin,
with ``sync`` before each run; outputs sit beside the sources (same file system) and are deleted after
each run:

    cp-st        cp -r llama8b-bf16 OUT
    cp-st-sync   the same, then sync OUT/* (the copy made durable, as an export is before it is published)
    export-st    cna-export export --model llama8b-bf16 --circuit C --multiplier 0 --out OUT
    export-st-up the same with --fold up (up_proj rows: a copy and the touched rows)
    cp-gguf      cp llama8b-q4k.gguf OUT
    cp-gguf-sync the same, then sync OUT
    export-gguf  cna-export export --model llama8b-q4k.gguf --format gguf ... (GGUFWriter, fold into ffn_up)
    fast-gguf    the same with --fast-copy

``--cache cold`` runs the exports without the fingerprint cache (``CNA_EXPORT_FINGERPRINT_CACHE=off``),
so that they hash every down projection and every touched tensor; ``--cache warm`` with a cache primed
before the first round by one export of each format (the usual case: the weights were fingerprinted when
the circuit was discovered or the first export was made); the default measures both.

``--source cached`` reads the source's files into the page cache before every run (untimed), so that
``cp`` runs at memory speed; ``--source cold`` evicts them (``posix_fadvise(POSIX_FADV_DONTNEED)`` on
each source file after ``sync``: no global cache drop), so that every run reads the disk; ``as-is``
(the default) leaves the page cache alone. ``fincore`` (util-linux), where installed, records how much
of the source was cached when each run started. Figures land in the JSON file and a Markdown table on
stdout; bench/README.md quotes them. ``--baseline DIR`` times the exports of another tree's ``cna_export``
(``git archive REV cna_export | tar -x -C DIR``) on the same checkpoints; run it alternately with this tree.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench._common import ROOT, child_env

GNU_TIME = "/usr/bin/time"

LAYERS, HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 32, 4096, 14336, 32, 8, 128256
HEAD_DIM = HIDDEN // HEADS
SHARD_BYTES = 5 * 10**9
FRACTION = 0.001
POOL_VALUES = 1 << 25  # 32 Mi random bf16 values reused (at random offsets) for every tensor


def tensors() -> list[tuple[str, tuple[int, ...]]]:
    """Hugging Face tensor names and shapes of the Llama-3-8B geometry, in checkpoint order."""
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (HIDDEN,)),
            (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.k_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
            (p + "self_attn.v_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
            (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
            (p + "post_attention_layernorm.weight", (HIDDEN,)),
            (p + "mlp.gate_proj.weight", (INTER, HIDDEN)),
            (p + "mlp.up_proj.weight", (INTER, HIDDEN)),
            (p + "mlp.down_proj.weight", (HIDDEN, INTER)),
        ]
    out += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    return out


def config() -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "vocab_size": VOCAB, "hidden_act": "silu",
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": 128009,
    }


def _pool(rng: np.random.Generator) -> np.ndarray:
    """Random N(0, 0.02) values as bfloat16 bit patterns (round to nearest even)."""
    x = (rng.standard_normal(POOL_VALUES, dtype=np.float32) * 0.02).view(np.uint32)
    return ((x + 0x7FFF + ((x >> 16) & 1)) >> 16).astype(np.uint16)


def _write_tensor_bytes(fh, pool: np.ndarray, n: int, rng: np.random.Generator, ones: bool) -> None:
    if ones:  # norm weights
        fh.write(np.full(n, 0x3F80, dtype=np.uint16).tobytes())
        return
    left = n
    while left:
        start = int(rng.integers(0, pool.size // 2))
        take = min(left, pool.size - start)
        fh.write(pool[start:start + take].tobytes())
        left -= take


def make_safetensors(folder: Path, rng: np.random.Generator) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=".llama8b.", dir=folder.parent))
    pool = _pool(rng)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors():
        nbytes = int(np.prod(shape)) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map = {}
    for k, group in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        off = 0
        for name, shape in group:
            n = int(np.prod(shape)) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(tmp / fname, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            for _, shape in group:
                _write_tensor_bytes(fh, pool, int(np.prod(shape)), rng, ones=len(shape) == 1)
        print(f"  wrote {fname}", flush=True)
    total = sum(int(np.prod(s)) * 2 for _, s in tensors())
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps(config(), indent=2))
    os.replace(tmp, folder)


def _q4k_pool(rng: np.random.Generator, blocks: int) -> np.ndarray:
    """Random Q4_K blocks (144 bytes: fp16 d, fp16 dmin, 12 bytes of 6-bit scales, 128 bytes of quants)."""
    raw = rng.integers(0, 256, size=(blocks, 144), dtype=np.uint8)
    d = (rng.uniform(2e-4, 2e-3, size=blocks)).astype(np.float16).view(np.uint8).reshape(blocks, 2)
    dmin = (rng.uniform(2e-4, 2e-3, size=blocks)).astype(np.float16).view(np.uint8).reshape(blocks, 2)
    raw[:, 0:2], raw[:, 2:4] = d, dmin
    return raw


def make_gguf(path: Path, rng: np.random.Generator) -> None:
    import gguf

    from cna_export.io.weights import hf_to_gguf_module

    def gguf_name(hf: str) -> str:
        """llama.cpp's name of the Hugging Face weight ``hf`` (gguf-py's tensor-name map)."""
        return hf_to_gguf_module("llama", LAYERS, hf.removesuffix(".weight")) + ".weight"

    tmp = path.with_name("." + path.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name("synthetic Llama-3-8B geometry (cna-export bench/scale.py)")
    w.add_block_count(LAYERS)
    w.add_context_length(8192)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    plan = []
    for hf, shape in tensors():
        name = gguf_name(hf)
        if len(shape) == 1:
            plan.append((name, shape, None))
            w.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
        else:
            rows, cols = shape
            nbytes = rows * (cols // 256) * 144
            plan.append((name, shape, nbytes))
            w.add_tensor_info(name, (rows, cols // 256 * 144), np.dtype(np.uint8), nbytes,
                              raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    pool = _q4k_pool(rng, 1 << 18)
    for _, shape, nbytes in plan:
        if nbytes is None:
            w.write_tensor_data(np.ones(shape, dtype=np.float32))
            continue
        rows, cols = shape
        per_row = cols // 256
        chunk_rows = max(1, pool.shape[0] // per_row)
        parts = []
        for r0 in range(0, rows, chunk_rows):
            n = min(chunk_rows, rows - r0)
            start = int(rng.integers(0, pool.shape[0] - n * per_row + 1))
            parts.append(pool[start:start + n * per_row].reshape(n, per_row * 144))
        w.write_tensor_data(np.concatenate(parts) if len(parts) > 1 else parts[0])
    w.close()
    os.replace(tmp, path)


def make_circuit(src: Path, out: Path, seed: int) -> int:
    """0.1% of all MLP neurons, spread evenly over the layers, on ``src``'s fingerprint (hashed once): a
    safetensors folder, or a GGUF file."""
    from cna_export.core.circuit import Circuit, Neuron

    if src.is_file():
        from cna_export.io.gguf import open_gguf
        from cna_export.io.identity import gguf_identity

        ident = gguf_identity(open_gguf(src), str(src))
    else:
        from cna_export.io.identity import checkpoint_identity

        ident, *_ = checkpoint_identity(src, str(src))
    rng = np.random.default_rng(seed)
    k = round(FRACTION * LAYERS * INTER)
    layers = np.arange(k) % LAYERS
    neurons = []
    for layer in range(LAYERS):
        n = int((layers == layer).sum())
        for idx in sorted(rng.choice(INTER, size=n, replace=False).tolist()):
            neurons.append(Neuron(layer=layer, index=int(idx), score=1.0))
    Circuit(model=ident, neurons=neurons, method={"name": "manual", "bench": "scale.py"}).save(out)
    return len(neurons)


# -- measuring ------------------------------------------------------------------------------------


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon"):
                out[key] = int(value.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def source_files(src: Path) -> list[Path]:
    return [src] if src.is_file() else sorted(f for f in src.rglob("*") if f.is_file())


def set_source_cache(src: Path, state: str) -> None:
    """Read ``src``'s files into the page cache (``cached``) or evict them (``cold``); ``as-is``: nothing."""
    if state == "cached":
        buf = bytearray(1 << 24)
        for f in source_files(src):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
    elif state == "cold":
        for f in source_files(src):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def cached_fraction(src: Path) -> float | None:
    """The share of ``src``'s bytes in the page cache (``fincore``), None where fincore is missing."""
    if shutil.which("fincore") is None:
        return None
    files = source_files(src)
    p = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE", *map(str, files)],
                       capture_output=True, text=True, check=False)
    try:
        rows = [tuple(int(x) for x in line.split()) for line in p.stdout.splitlines() if line.strip()]
        return round(sum(r for r, _ in rows) / max(sum(n for _, n in rows), 1), 3)
    except ValueError:
        return None


def measure(cmd: list[str], log: Path, env: dict | None = None, src: Path | None = None,
            source: str = "as-is") -> dict:
    """Wall time and peak RSS (GNU time) of ``cmd``, plus its peak anonymous memory: RSS counts the
    pages of memory-mapped files it reads (page cache the kernel can drop at any time), anonymous
    memory is what the process itself holds. /proc/PID/status is sampled every 20 ms. ``source``: the
    page-cache state of ``src`` to start from (:func:`set_source_cache`)."""
    stats = log.with_suffix(".time")
    subprocess.run(["sync"], check=False)
    if src is not None:
        set_source_cache(src, source)
    cached = cached_fraction(src) if src is not None else None
    load = os.getloadavg()[0]
    with open(log, "wb") as err:
        proc = subprocess.Popen([GNU_TIME, "-f", "%e %M %U %S", "-o", str(stats), *cmd], stdout=err,
                                stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        anon = 0
        child = None
        while proc.poll() is None:
            if child is None:
                kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
                try:
                    child = int(kids.read_text().split()[0])
                except (OSError, ValueError, IndexError):
                    child = None
            if child is not None:
                anon = max(anon, _status(child).get("RssAnon", 0))
            time.sleep(0.02)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}:\n{log.read_text()[-2000:]}")
    wall, rss_kib, user, system = stats.read_text().split()[-4:]
    return {"seconds": float(wall), "max_rss_mib": int(rss_kib) / 1024, "max_anon_mib": anon / 1024,
            "cpu_seconds": float(user) + float(system), "load_before": round(load, 2), "source_cached": cached}


def _bytes(p: Path) -> int:
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _rm(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path.home() / ".cache" / "cna-export" / "bench" / "scale")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated variants to run (default: all)")
    ap.add_argument("--cache", choices=["both", "cold", "warm"], default="both",
                    help="fingerprint cache state for the exports")
    ap.add_argument("--source", choices=["as-is", "cached", "cold"], default="as-is",
                    help="page-cache state of the source files when each run starts")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--clean", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baseline", type=Path, default=None,
                    help="a folder holding another cna_export package, whose exports are timed instead of this tree's")
    args = ap.parse_args()

    root: Path = args.dir
    st, gg, circuit = root / "llama8b-bf16", root / "llama8b-q4k.gguf", root / "circuit.json"
    if args.clean:
        shutil.rmtree(root, ignore_errors=True)
        return
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    t = time.perf_counter()
    wanted = [v for v in args.only.split(",") if v]
    gguf_only = bool(wanted) and all("gguf" in v for v in wanted)  # no safetensors folder (16 GB) needed
    if not st.is_dir() and not gguf_only:
        print(f"writing {st} (once) ...", flush=True)
        make_safetensors(st, rng)
    if not gg.is_file() and (not wanted or any("gguf" in v for v in wanted)):  # safetensors runs do without it
        print(f"writing {gg} (once) ...", flush=True)
        make_gguf(gg, rng)
    from cna_export.core.fingerprint import FINGERPRINT_METHOD

    tag = hashlib.sha256(FINGERPRINT_METHOD.encode()).hexdigest()[:8]  # each scheme's circuit, as its code makes it
    circuit = root / (f"circuit-gguf-{tag}.json" if gguf_only else f"circuit-{tag}.json")
    if not circuit.is_file():
        print(f"making {circuit} (once; hashes the down projections) ...", flush=True)
        make_circuit(gg if gguf_only else st, circuit, args.seed)
    print(f"checkpoints ready in {time.perf_counter() - t:.0f}s", flush=True)
    if not Path(GNU_TIME).is_file():
        raise SystemExit(f"needs GNU time at {GNU_TIME}")
    need = 1.1 * max(_bytes(st) if st.exists() else 0, _bytes(gg) if gg.exists() else 0)
    if shutil.disk_usage(root).free < need:
        raise SystemExit(f"need {need / 1e9:.1f} GB free beside {root}")

    py = [sys.executable, "-m", "cna_export"]
    exp = ["export", "--circuit", str(circuit), "--multiplier", "0"]
    variants = {
        "cp-st": (lambda o: ["cp", "-r", str(st), str(o)], None),
        "cp-st-sync": (lambda o: ["sh", "-c", 'cp -r "$0" "$1" && sync "$1"/*', str(st), str(o)], None),
        "export-st": (lambda o: py + exp + ["--model", str(st), "--out", str(o)], "st"),
        "export-st-up": (lambda o: py + exp + ["--model", str(st), "--fold", "up", "--out", str(o)], "st"),
        "cp-gguf": (lambda o: ["cp", str(gg), str(o)], None),
        "cp-gguf-sync": (lambda o: ["sh", "-c", 'cp "$0" "$1" && sync "$1"', str(gg), str(o)], None),
        "export-gguf": (lambda o: py + exp + ["--model", str(gg), "--format", "gguf", "--out", str(o), "--force",
                                          "--no-modelfile"], "gguf"),
        "fast-gguf": (lambda o: py + exp + ["--model", str(gg), "--format", "gguf", "--fast-copy", "--out",
                                            str(o), "--force", "--no-modelfile"], "gguf"),
    }
    only = [v for v in args.only.split(",") if v] or list(variants)
    states = {"both": ["cold", "warm"], "cold": ["cold"], "warm": ["warm"]}[args.cache]
    runs = []
    for name in only:
        kind = variants[name][1]
        runs += [(name, None)] if kind is None else [(name, s) for s in states]
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    base_env = child_env(args.baseline)  # refuses a baseline the children would not import
    warm_cache = root / "fp-cache"
    if "warm" in states:  # the warm runs find the fingerprints (and the touched tensors' hashes) in the cache
        print("priming the fingerprint cache (one export of each format) ...", flush=True)
        env = dict(base_env, CNA_EXPORT_FINGERPRINT_CACHE=str(warm_cache))
        for name in [n for n in ("export-st", "export-st-up", "export-gguf") if n in only]:
            out = root / f"prime-{name}"
            _rm(out)
            subprocess.run(variants[name][0](out), check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
            _rm(out)
    results: dict[str, list[dict]] = {}
    for rep in range(args.repeats):
        for name, state in runs:
            label = name if state is None else f"{name} ({state})"
            suffix = ".gguf" if "gguf" in name else ""
            out = root / f"out-{name}{suffix}"
            _rm(out)
            _rm(out.with_name(out.name + ".cna_manifest.json"))
            env = dict(base_env)
            if state == "cold":
                env["CNA_EXPORT_FINGERPRINT_CACHE"] = "off"
            elif state == "warm":
                env["CNA_EXPORT_FINGERPRINT_CACHE"] = str(warm_cache)
            src = gg if "gguf" in name else st
            r = measure(variants[name][0](out), logs / f"{name}-{state}-{rep}.log", env, src, args.source)
            r["bytes"] = _bytes(out)
            results.setdefault(label, []).append(r)
            print(f"  {label}: {r['seconds']:.2f}s (CPU {r['cpu_seconds']:.1f}s), RSS {r['max_rss_mib']:.0f} MiB, "
                  f"anonymous {r['max_anon_mib']:.0f} MiB (load {r['load_before']}, source cached "
                  f"{r['source_cached']})", flush=True)
            _rm(out)
            _rm(out.with_name(out.name + ".cna_manifest.json"))

    def med(label: str, key: str) -> float:
        return statistics.median(r[key] for r in results[label])

    def best(label: str) -> float:
        return min(r["seconds"] for r in results[label])

    rows = []
    for label in results:
        base = "cp-gguf" if "gguf" in label else "cp-st"
        ratio = med(label, "seconds") / med(base, "seconds") if base in results else float("nan")
        durable = best(label) / best(base + "-sync") if base + "-sync" in results else float("nan")
        fastest = best(label) / best(base) if base in results else float("nan")
        rows.append(f"| {label} | {med(label, 'seconds'):.2f} s | {ratio:.2f}x | {fastest:.2f}x | "
                    f"{durable:.2f}x | {med(label, 'cpu_seconds'):.1f} s | "
                    f"{med(label, 'max_rss_mib'):.0f} MiB | "
                    f"{med(label, 'max_anon_mib'):.0f} MiB | "
                    f"{results[label][0]['bytes'] / 1e9:.2f} GB | "
                    + " / ".join(f"{r['seconds']:.2f}" for r in results[label]) + " |")
    print(f"\nsource {args.source}; load average at the end {' / '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("\n| variant | wall (median) | x cp (medians) | x cp (best) | x cp+sync (best) | CPU time | peak RSS | "
          "peak anonymous | output | all runs (s) |\n|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "os": platform.platform()},
            "source": args.source, "tree": str(args.baseline or ROOT), "results": results}, indent=2))


if __name__ == "__main__":
    main()
