"""Evaluation: refusal, over-refusal, output quality and drift, for one model or a sweep.

Owns the steering record and backend interface (``interventions``), the generation backends
(``backends``: transformers with hooks; ``llama_backend``: llama.cpp on an exported GGUF), refusal
judges (``judge``), metrics (``metrics``), the prompt sets and JBB data (``eval_sets``), the evaluator
(``evaluator``), discovery statistics and CAA vectors (``saved_stats``), sweeps and the CAA baseline
(``sweep``), the tuning search (``search``) and the eval and tune jobs (``jobs``, ``tune_job``).
"""
