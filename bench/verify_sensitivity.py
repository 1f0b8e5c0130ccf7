"""How sharp is GGUF verification? Correct and deliberately wrong exports, judged against one circuit.

    python bench/verify_sensitivity.py                       # SmolLM2-135M-Instruct Q4_1
    python bench/verify_sensitivity.py --model bundled:qwen2.5-coder-0.5b \
        --circuit bench/out/qwen-refusal-0.005.json

The circuit (default: ``bench/out/smollm2-refusal-0.001.json``, discovered with
``recipes/refusal.yaml`` when missing) is exported at multiplier 0, correctly, and in several wrong
ways: a multiplier of 0.1 or 0.5 instead of 0, one neuron (the strongest) or a tenth of the neurons
left out, every index shifted by one (the wrong neurons), the unsteered source. Each file is then
judged by ``cna_export.verification.gguf.check_behaviour`` against hook steering of the *correct*
multipliers (circuit x0), with the ``cna-export verify`` defaults (16 recipe prompts). The tensor
check is not involved here: the point is what the behaviour check alone can tell apart.

The table (stdout, and ``bench/out/verify_sensitivity-<model>.json``) gives, per export: mean KL to
the hook-steered reference, its ratio to the unsteered noise floor, its excess over the floor as a
share of the steering effect, confident top-1 agreement, and the verdict under the defaults.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._common import ROOT
from cna_export.core.circuit import Circuit
from cna_export.core.settings import GGUFVerifyOptions
from cna_export.export.gguf import export_gguf
from cna_export.model.loading import load_model
from cna_export.verification.gguf_behaviour import check_behaviour
from cna_export.verification.prompts import verification_prompts

OUT = ROOT / "bench" / "out"


def variants(circuit: Circuit, n_neurons: int, seed: int = 0) -> dict[str, tuple[Circuit, dict | None]]:
    """The exports to judge: (circuit, multipliers) per name; ``None`` multipliers = the unsteered source."""
    keys = [(n.layer, n.index) for n in circuit.neurons]
    strongest = max(circuit.neurons, key=lambda n: abs(n.score))
    rng = random.Random(seed)
    tenth = set(rng.sample(keys, max(1, len(keys) // 10)))
    shifted = circuit.model_copy(
        update={"neurons": [n.model_copy(update={"index": (n.index + 1) % n_neurons}) for n in circuit.neurons]}
    )
    return {
        "correct (x0)": (circuit, {k: 0.0 for k in keys}),
        "x0.1 instead of x0": (circuit, {k: 0.1 for k in keys}),
        "x0.5 instead of x0": (circuit, {k: 0.5 for k in keys}),
        "strongest neuron left out": (circuit, {k: 1.0 if k == (strongest.layer, strongest.index) else 0.0
                                                for k in keys}),
        f"a tenth left out ({len(tenth)} neurons)": (circuit, {k: 1.0 if k in tenth else 0.0 for k in keys}),
        "indices shifted by one": (shifted, {(n.layer, n.index): 0.0 for n in shifted.neurons}),
        "unsteered source": (circuit, None),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled:smollm2")
    ap.add_argument("--circuit", type=Path, default=OUT / "smollm2-refusal-0.001.json")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.circuit.exists():
        subprocess.run([sys.executable, "-m", "cna_export", "discover", "--model", args.model, "--recipe",
                        str(ROOT / "recipes" / "refusal.yaml"), "--out", str(args.circuit)], check=True)  # fmt: skip
    circuit = Circuit.load(args.circuit)
    loaded = load_model(args.model)
    opts = GGUFVerifyOptions(threads=args.threads)
    prompts, _ = verification_prompts(None, opts.limit, opts.field, opts.column)
    reference = {(n.layer, n.index): 0.0 for n in circuit.neurons}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (circ, mults) in variants(circuit, loaded.intermediate_size).items():
            if mults is None:
                path = loaded.source.path
            else:
                path = Path(tmp) / f"v{len(rows)}.gguf"
                export_gguf(loaded.source.path, circ, path, multipliers=mults, modelfile=False, force=True)
            t0 = time.perf_counter()
            b = check_behaviour(loaded, loaded.source.path, path, reference, prompts, opts)
            m = b.metrics
            row = {
                "export": name,
                "mean_kl": m["mean_kl"],
                "floor_mean_kl": m["floor_mean_kl"],
                "kl_ratio": m["kl_ratio"],
                "excess_share_of_effect": m["excess_share_of_effect"],
                "steering_effect_mean_kl": m["steering_effect_mean_kl"],
                "allowed_mean_kl": m["allowed_mean_kl"],
                "steering_reproduced": m["steering_reproduced"],
                "steering_reproduced_se": m["steering_reproduced_se"],
                "confident_top1_agreement": m["confident_top1_agreement"],
                "floor_confident_top1_agreement": m["floor_confident_top1_agreement"],
                "passed": not b.reasons,
                "reasons": b.reasons,
                "seconds": time.perf_counter() - t0,
            }
            rows.append(row)
            print(f"{name}: {'pass' if row['passed'] else 'FAIL'} ratio {row['kl_ratio']:.3f} "
                  f"excess {row['excess_share_of_effect']:.2%} slope {row['steering_reproduced']:.4f}",
                  flush=True)
    tag = args.model.split(":")[-1].replace("/", "_")
    (OUT / f"verify_sensitivity-{tag}.json").write_text(json.dumps(
        {"model": args.model, "circuit": str(args.circuit), "neurons": len(circuit.neurons), "prompts": len(prompts),
         "defaults": {"max_kl_ratio": opts.max_kl_ratio, "max_effect_share": opts.max_effect_share,
                      "max_top1_drop": opts.max_top1_drop}, "rows": rows}, indent=2))  # fmt: skip
    print(f"\n{args.model}, {len(circuit.neurons)}-neuron circuit, reference = hook steering x0, "
          f"noise floor mean KL {rows[0]['floor_mean_kl']:.4g}, "
          f"steering effect {rows[0]['steering_effect_mean_kl']:.4g}\n")
    print("| export | mean KL to hooks | x floor | excess / steering effect | steering reproduced | "
          "confident top-1 (floor) | verdict |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['export']} | {r['mean_kl']:.4g} | {r['kl_ratio']:.2f} | {r['excess_share_of_effect']:.2%} | "
              f"{r['steering_reproduced']:.1%} +- {r['steering_reproduced_se']:.1%} | "
              f"{r['confident_top1_agreement']:.2%} ({r['floor_confident_top1_agreement']:.2%}) | "
              f"{'pass' if r['passed'] else '**fail**'} |")  # fmt: skip


if __name__ == "__main__":
    main()
