"""Verification: does an export behave exactly like hook steering of its source?

Separate checks: ``safetensors`` (logits of the export vs hook steering in transformers),
``gguf_tensors`` (the GGUF file's bytes: untouched tensors identical, touched rows exactly the
multiplier times the source) and ``gguf_behaviour`` (llama.cpp vs hook steering relative to the
noise floor), combined for GGUF files in ``gguf``; ``report`` renders the result and ``prompts``
picks the prompt set; ``session`` lets several verifications of one source (``steer``) share the loaded
reference and the logits that do not depend on the export.
"""
