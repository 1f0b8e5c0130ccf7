"""Models in memory: loading with transformers, prompts, hook steering and generation.

Owns ``loading`` (``LoadedModel``, dtype rules, the pickle guard), ``prompts`` (prompt files,
chat-template rendering, batching), ``steering`` (multiplying neurons with forward hooks, the
reference every export is verified against) and ``generation`` (batched greedy generation).
"""
