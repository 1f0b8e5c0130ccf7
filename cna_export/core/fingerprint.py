"""The model fingerprint: one definition for loaded models, safetensors folders and GGUF files.

A fingerprint is the sha256 over every layer's down projection weight as float32 little-endian
bytes, in layer order, each in the Hugging Face layout ``[hidden, intermediate]`` (what
transformers holds after loading, also after dequantising a GGUF). Readers feed the weights one
layer at a time, so no reader holds more than one layer in memory.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable

FINGERPRINT_METHOD = "sha256(fp32 little-endian down_proj weights, layer order)"


def fingerprint(down_weights: Iterable[Any]) -> str:
    """The fingerprint of down projection weights given in layer order (numpy arrays or anything
    ``np.asarray`` takes; torch tensors must already be on the CPU in float32)."""
    import numpy as np  # here: importing the method name (circuits, the cache) must not cost numpy's import

    h = hashlib.sha256()
    for w in down_weights:
        h.update(np.ascontiguousarray(np.asarray(w), dtype="<f4"))
    return h.hexdigest()
