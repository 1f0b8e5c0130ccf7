"""Export: fold a circuit's multipliers into weights and write a shippable checkpoint or adapter.

Owns the request (``request``: one export's inputs, the circuit loaded and its multipliers resolved
once), the plan (``plan``: multiplier resolution, GGUF tensor edits, the pre-rename check hook), the
fold math on tensors (``fold``), the exporters (``safetensors``, ``gguf``, ``lora``, ``gguf_lora``;
each takes an :class:`~cna_export.export.request.ExportRequest` and its format's options from
:mod:`cna_export.core.formats`), what ships beside an export (``card``: model card and Ollama
Modelfile; ``publish``: a file and its companions renamed into place together) and the Hub upload
(``hub``). Export never imports verification: :mod:`cna_export.pipeline` composes the two.
"""
