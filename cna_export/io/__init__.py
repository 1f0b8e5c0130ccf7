"""Readers and writers: atomic outputs, safetensors, GGUF, quant block layouts."""
