"""Checkpoint formats: reading and writing files, no steering logic. Imports only ``core``.

Owns the safetensors reader and shard rewriter (``safetensors``), the GGUF reader and patching
writer (``gguf``) and its quant registry (``quants``), format-neutral weight sources for diff and
audit (``weights``), model identities read from files (``identity``), model specs and bundled
models (``sources``, ``bundled``), tensor bytes and hashes (``tensor_bytes``) and the llama.cpp
binding.
"""
