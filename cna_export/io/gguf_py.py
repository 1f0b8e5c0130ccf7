"""gguf-py's internals, in one place: what the package relies on beyond gguf-py's public API.

gguf-py (the ``gguf`` package, llama.cpp's Python library) gives the GGML constants and the quant
classes. The package uses their public calls directly; this module holds what is gguf-py's
implementation, not its API, so that a gguf-py release that changes it breaks here and nowhere else:
:func:`k_quant_sub_scales`, the unpacking of Q4_K/Q5_K's 6-bit sub-scales
(``gguf.quants.Q4_K.get_scale_min``).
(A patched GGUF copy no longer goes through ``GGUFWriter``: :mod:`cna_export.io.gguf_write` lays the file out
as it does, from the source's raw bytes.)

Verified with gguf 0.17.0, 0.17.1, 0.18.0 and 0.19.0; ``pyproject.toml`` allows those (``<0.20``).
"""

from __future__ import annotations

import numpy as np


def k_quant_sub_scales(scales: np.ndarray) -> np.ndarray:
    """The 6-bit sub-scales packed in Q4_K/Q5_K's ``scales[12]`` (``(n_blocks, 12)`` uint8 -> ``(n_blocks, 8)``)."""
    from gguf.quants import Q4_K

    sc, _ = Q4_K.get_scale_min(np.ascontiguousarray(scales))
    return sc.reshape(scales.shape[0], -1)
