"""Evaluation: refusal, over-refusal, output quality and drift, for one model or a sweep.

Owns the generation backends (``backends``: transformers with hooks, llama.cpp on an exported
GGUF), refusal judges (``judge``), metrics (``metrics``), the evaluator and JBB data
(``evaluator``), sweeps and the CAA baseline (``sweep``) and the eval/tune jobs (``jobs``).
"""
