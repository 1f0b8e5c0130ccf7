#!/usr/bin/env bash
# Install cna-export with its test and model extras.
# torch is pinned to the CPU build first: an unpinned torch pulls several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,models,llama,plots,tune]"
