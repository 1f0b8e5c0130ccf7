#!/usr/bin/env python
"""Benchmark: batched CNA capture vs the reference's one-prompt-per-forward loop.

Both capture the same thing (last-token down_proj inputs of every layer) on the same
model and prompts:

- reference: what NousResearch/neural-steering's ``discover_contrastive`` does: one
  prompt per forward pass of the full model (LM head included), hooks copying each
  layer's last-token activation to the CPU;
- cna-export: ``cna_export.discovery.cna.run_prompts``: left-padded batches, decoder stack
  only (no LM head), streaming statistics.

Also reports achieved GFLOP/s against the estimate 2 x decoder params x real tokens,
and a measured fp32 matmul peak of this machine, so we see how close to the compute
limit capture runs.

    python bench/discover.py                       # SmolLM2, bundled recipe prompts
    python bench/discover.py --model bundled:qwen2.5-coder-0.5b --batch-sizes 1,8,16
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from bench._common import ROOT
from cna_export.core.recipe import load_recipe
from cna_export.discovery.cna import RunningStats, run_prompts
from cna_export.model.loading import load_model
from cna_export.model.prompts import load_prompts, render, token_count


def reference_loop(loaded, texts):
    """The paper's loop: per prompt, full model forward, hooks copy last-token activations to CPU."""
    rendered = render(loaded.tokenizer, texts)
    layers = loaded.arch.layer_modules(loaded.model)
    all_acts = []
    start = time.perf_counter()
    for text in rendered:
        ids = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        acts = {}
        hooks = []
        for i in range(len(layers)):
            def hook(module, args, i=i, acts=acts):
                acts[i] = args[0][0, -1].detach().cpu()
            hooks.append(loaded.arch.down_proj_module(loaded.model, i).register_forward_pre_hook(hook))
        try:
            with torch.no_grad():
                loaded.model(ids)
        finally:
            for h in hooks:
                h.remove()
        all_acts.append(acts)
    seconds = time.perf_counter() - start
    stacked = np.stack([np.stack([a[i].double().numpy() for i in range(len(layers))]) for a in all_acts])
    return seconds, stacked


def batched(loaded, texts, batch_size):
    stats = RunningStats(loaded.num_layers, loaded.intermediate_size)
    report = run_prompts(loaded, texts, stats.add, batch_size=batch_size, chat_template=True, progress=False)
    stats.count = len(texts)
    return report.seconds, stats.mean, report.batches


def matmul_peak(n=2048, repeats=5):
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def decoder_params(loaded):
    decoder = loaded.arch.decoder_module(loaded.model)
    emb = loaded.model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in decoder.parameters()) - emb  # embeddings are a lookup, not FLOPs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled:smollm2")
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "refusal.yaml"))
    ap.add_argument("--limit", type=int, default=80, help="prompts per set (positive + negative are used)")
    ap.add_argument("--batch-sizes", default="8,16,32,auto", help="comma-separated; auto: --batch-size auto")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference loop (speed-ups vs batch 8)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "discover.json"))
    args = ap.parse_args()

    torch.manual_seed(0)
    recipe = load_recipe(args.recipe)
    texts = list(load_prompts(recipe["positive"], limit=args.limit).texts
                 + load_prompts(recipe["negative"], limit=args.limit).texts)
    t0 = time.perf_counter()
    loaded = load_model(args.model)
    load_s = time.perf_counter() - t0
    tokens = token_count(loaded.tokenizer, render(loaded.tokenizer, texts), chat_template=True)
    params = decoder_params(loaded)
    flops = 2 * params * tokens
    peak = matmul_peak()

    batched(loaded, texts[:4], 4)  # warm-up
    if args.no_reference:
        ref_s, ref_mean = batched(loaded, texts, 8)[:2]
        rows = [{"mode": "cna-export batched, batch 8 (reference row)", "batch": 8, "seconds": ref_s}]
    else:
        ref_s, ref_acts = reference_loop(loaded, texts)
        rows = [{"mode": "reference (1 prompt/forward, full model)", "batch": 1, "seconds": ref_s}]
        ref_mean = ref_acts.mean(axis=0)
    for bs in [x if x == "auto" else int(x) for x in args.batch_sizes.split(",")]:
        s, mean, sizes = batched(loaded, texts, bs)
        err = float(np.abs(mean - ref_mean).max() / np.abs(ref_mean).max())
        label = f"auto ({min(sizes)}-{max(sizes)})" if bs == "auto" else bs
        rows.append({"mode": "cna-export batched (decoder only)", "batch": label, "seconds": s,
                     "max_rel_diff_vs_reference": err, "batches": sizes})
    for r in rows:
        r["prompts_per_s"] = len(texts) / r["seconds"]
        r["speedup_vs_reference"] = ref_s / r["seconds"]
        r["gflops_per_s"] = flops / r["seconds"] / 1e9
        r["share_of_matmul_peak"] = r["gflops_per_s"] / peak
    result = {
        "model": args.model,
        "prompts": len(texts),
        "real_tokens": tokens,
        "decoder_params_excl_embeddings": params,
        "flop_estimate": flops,
        "fp32_matmul_peak_gflops": peak,
        "load_seconds": load_s,
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"model {args.model}: {len(texts)} prompts, {tokens} real tokens, {params / 1e6:.1f}M decoder params, "
          f"FLOP estimate {flops / 1e12:.3f} TFLOP, fp32 matmul peak {peak:.1f} GFLOP/s")
    print("| mode | batch | seconds | prompts/s | speed-up | GFLOP/s | share of matmul peak |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['batch']} | {r['seconds']:.2f} | {r['prompts_per_s']:.1f} | "
              f"{r['speedup_vs_reference']:.2f}x | {r['gflops_per_s']:.1f} | {r['share_of_matmul_peak']:.0%} |")
    for r in rows[1:]:
        print(f"batch {r['batch']}: max relative difference of the mean activations vs reference "
              f"{r['max_rel_diff_vs_reference']:.2e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
