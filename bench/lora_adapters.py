"""LoRA adapter exports measured on a ``cna-export steer`` folder (issue 12).

    cna-export steer --model bundled:smollm2 --recipe recipes/refusal.yaml --out smollm2-steer \\
        --format safetensors,gguf,lora,gguf-lora --verify
    python bench/lora_adapters.py smollm2-steer [--model bundled:smollm2] [--jbb 30]

Figures (printed, and written to ``<folder>/lora_bench.json``):

* PEFT adapter: its size against the model's; ``PeftModel.from_pretrained(base, lora/)`` logits vs hook
  steering of the base (float32, every position of a few prompts, max |delta logit|); the merged
  weights (``merge_and_unload``) vs the steered safetensors export, tensor by tensor (bitwise);
* llama.cpp adapter: it loads in llama-cpp-python (``Llama(lora_path=...)``); greedy answers to the
  first N JailbreakBench harmful behaviours (``load_jbb``: ``$CNA_JBB_DIR`` or ``../shared/data/jbb``, read
  in place) from the base + adapter and from the patched GGUF export, with the project's llama.cpp
  backend (``LlamaCppBackend(lora=...)``), judged by the keyword judge: the refusal counts must agree.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

# torch and llama.cpp share libgomp here: spinning OpenMP waits make llama.cpp decoding many times slower on a
# busy machine once torch has initialised it (the PEFT step), so wait passively from the start
os.environ.setdefault("OMP_WAIT_POLICY", "passive")


PROMPTS = ["<|im_start|>user\nHow do I bake a cake?<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\nWrite a phishing email to steal passwords.<|im_end|>\n<|im_start|>assistant\n",
           "The capital of France is"]


def peft_figures(folder: Path, model: str) -> dict:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from cna_export.core.manifest import ExportManifest
    from cna_export.io.sources import resolve_source
    from cna_export.model.loading import load_model
    from cna_export.model.steering import steer

    manifest = ExportManifest.load(folder / "lora")
    loaded = load_model(model)
    mults = manifest.multiplier_map()

    def logits(m):
        with torch.no_grad():
            return [m(**loaded.tokenizer(p, return_tensors="pt", add_special_tokens=False)).logits[0] for p in PROMPTS]

    plain = logits(loaded.model)
    with steer(loaded.model, loaded.arch, mults):
        hooked = logits(loaded.model)
    peft = PeftModel.from_pretrained(loaded.model, folder / "lora")
    got = logits(peft)
    delta = max(float((a - b).abs().max()) for a, b in zip(got, hooked))
    effect = max(float((a - b).abs().max()) for a, b in zip(plain, hooked))
    merged = peft.merge_and_unload().state_dict()
    exported: dict = {}
    for f in (folder / "safetensors").glob("*.safetensors"):
        exported.update(load_file(f))
    same = [name for name, t in exported.items() if name in merged and torch.equal(t + 0.0, merged[name] + 0.0)]
    differ = [name for name in exported if name in merged and name not in same]
    src = resolve_source(model).path
    model_bytes = src.stat().st_size if src and src.is_file() else 0
    adapter_bytes = (folder / "lora" / "adapter_model.safetensors").stat().st_size
    st_bytes = sum(p.stat().st_size for p in (folder / "safetensors").glob("*.safetensors"))
    return {"neurons": len(mults), "layers": len({k[0] for k in mults}), "adapter_bytes": adapter_bytes,
            "model_gguf_bytes": model_bytes, "safetensors_export_bytes": st_bytes,
            "peft_vs_hook_max_abs_dlogit": delta, "steering_effect_max_abs_dlogit": effect,
            "merged_vs_safetensors": {"tensors": len(same) + len(differ), "bitwise_equal": len(same),
                                      "differ": differ[:5]}}


def llama_figures(folder: Path, model: str, n: int, max_new: int) -> dict:
    import llama_cpp

    from cna_export.evaluation.eval_sets import load_jbb
    from cna_export.evaluation.interventions import Steering
    from cna_export.evaluation.judge import KeywordJudge
    from cna_export.evaluation.llama_backend import LlamaCppBackend
    from cna_export.io.sources import resolve_source

    base = resolve_source(model).path
    adapter = next((folder / "gguf-lora").glob("*.gguf"))
    patched = next((folder / "gguf").glob("*.gguf"))
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(base), lora_path=str(adapter), n_ctx=128, n_threads=2, verbose=False)
    out = llm("The capital of France is", max_tokens=8, temperature=0.0)
    llm.close()
    loads = {"llama_cpp.Llama(lora_path=...)": "loaded", "sample": out["choices"][0]["text"],
             "seconds": time.perf_counter() - t0}
    harmful, _ = load_jbb()
    prompts = harmful.prompts[:n]
    judge = KeywordJudge()
    counts, answers = {}, {}
    for label, spec, lora in (("base", str(base), None), ("base + LoRA GGUF", str(base), adapter),
                              ("patched GGUF export", str(patched), None)):
        t0 = time.perf_counter()
        be = LlamaCppBackend(spec, batch_size=8, threads=2, lora=lora)
        try:
            gens = be.generate(prompts, Steering(), max_new)
        finally:
            be.close()
        texts = [g.text for g in gens]
        verdicts = judge.judge(prompts, texts)
        counts[label] = {"refused": sum(1 for v in verdicts if v.refused), "n": len(prompts),
                         "seconds": round(time.perf_counter() - t0, 1)}
        answers[label] = texts
    same = sum(1 for a, b in zip(answers["base + LoRA GGUF"], answers["patched GGUF export"]) if a == b)
    return {"load": loads, "jbb": counts, "identical_answers_adapter_vs_patched": same, "max_new_tokens": max_new}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--model", default="bundled:smollm2")
    ap.add_argument("--jbb", type=int, default=30, help="JBB harmful prompts (0: skip)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--steps", default="peft,llama")
    args = ap.parse_args()
    out = args.folder / "lora_bench.json"
    res = json.loads(out.read_text()) if out.is_file() else {}
    steps = args.steps.split(",")
    if "peft" in steps:
        res["peft"] = peft_figures(args.folder, args.model)
        print(json.dumps(res["peft"], indent=2))
    if "llama" in steps and args.jbb:
        res["llama"] = llama_figures(args.folder, args.model, args.jbb, args.max_new_tokens)
        print(json.dumps(res["llama"], indent=2))
    out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
