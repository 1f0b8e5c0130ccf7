"""Export: fold a circuit's multipliers into weights and write a shippable checkpoint.

Owns the plan (``plan``: multipliers resolved once, GGUF tensor edits, the pre-rename check
hook), the fold math on tensors (``fold``), the safetensors exporter (``safetensors``), the GGUF
exporter (``gguf``) and what ships beside an export (``card``: model card and Ollama Modelfile).
Export never imports verification: :mod:`cna_export.pipeline` composes the two.
"""
