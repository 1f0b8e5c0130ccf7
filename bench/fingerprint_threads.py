#!/usr/bin/env python
"""The fingerprint alone, scheme 1 (one sha256) against scheme 2 (a sha256 per layer) and scheme 3 (a BLAKE3 per
layer) on 1 and 2 threads, on a GGUF's down projections (dequantised a chunk at a time, the fingerprint cache not
involved); round-robin.

    python bench/fingerprint_threads.py                       # bundled Qwen2.5-Coder-0.5B, 5 rounds
    python bench/fingerprint_threads.py --model FILE.gguf --rounds 3 --threads 1,2,4
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bundled:qwen2.5-coder-0.5b")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", default="1,2")
    a = ap.parse_args()

    from cna_export.core.fingerprint import fingerprint_layers
    from cna_export.io import identity
    from cna_export.io.bundled import resolve
    from cna_export.io.gguf import open_gguf
    from cna_export.io.gguf_arch import gguf_arch, num_layers

    reader = open_gguf(str(resolve(a.model)))
    spec = gguf_arch(reader)
    layers = [functools.partial(identity._gguf_layer, reader, identity._layer_downs(reader, spec, layer))
              for layer in range(num_layers(reader))]
    variants = [("scheme 1", 1, None)] + [(f"scheme {s}, {t} thread(s)", s, int(t))
                                          for s in (2, 3) for t in a.threads.split(",")]
    fingerprint_layers(layers, 1)  # the file in the page cache
    times: dict[str, list[tuple[float, float]]] = {}
    for _ in range(a.rounds):
        for name, scheme, threads in variants:
            wall, cpu = time.perf_counter(), time.process_time()
            fingerprint_layers(layers, scheme, threads)
            times.setdefault(name, []).append((time.perf_counter() - wall, time.process_time() - cpu))
    print(f"{a.model}: {len(layers)} layers; load average {os.getloadavg()[0]:.2f}")
    base = statistics.median(w for w, _ in times["scheme 1"])
    for name, v in times.items():
        med = statistics.median(w for w, _ in v)
        print(f"{name:24s} wall median {med:.3f} s  best {min(w for w, _ in v):.3f} s  "
              f"CPU median {statistics.median(c for _, c in v):.3f} s  {base / med:.2f}x scheme 1")


if __name__ == "__main__":
    main()
