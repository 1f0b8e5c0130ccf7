"""Checkpoint formats: reading and writing files, no steering logic. Imports only ``core``.

Owns the safetensors reader and shard rewriter (``safetensors``); GGUF files (``gguf``, the one
import for the other stages, over ``gguf_read``, ``gguf_patch``, ``gguf_write``, ``gguf_compare``
and ``gguf_arch``, with gguf-py's internals behind ``gguf_py``); the GGML type records
(``quant_types``, bound to gguf-py's types in ``quant_layouts``) and exact row scaling,
dequantisation and quantisation (``quants``); format-neutral weight sources for diff and audit
(``weights``); model identities read from files (``identity``); model specs and bundled models
(``sources``, ``bundled``); tensor bytes and hashes (``tensor_bytes``); and the llama.cpp binding
(``llama``: llama-cpp-python and ggml's C library, the only place that calls them).
"""
