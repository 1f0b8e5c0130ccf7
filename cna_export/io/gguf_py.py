"""gguf-py's internals, in one place: what the package relies on beyond gguf-py's public API.

gguf-py (the ``gguf`` package, llama.cpp's Python library) gives the GGML constants and the quant
classes. The package uses their public calls directly; this module holds what is gguf-py's
implementation, not its API, so that a gguf-py release that changes it breaks here and nowhere else:
:func:`k_quant_sub_scales`, the unpacking of Q4_K/Q5_K's 6-bit sub-scales
(``gguf.quants.Q4_K.get_scale_min``); :func:`gguf_constants`, gguf-py's ``gguf.constants`` without the rest of
the package; :func:`quant_shape_to_byte_shape`, as ``gguf.quants`` has it.
(A patched GGUF copy no longer goes through ``GGUFWriter``: :mod:`cna_export.io.gguf_write` lays the file out
as it does, from the source's raw bytes.)

Verified with gguf 0.17.0, 0.17.1, 0.18.0 and 0.19.0; ``pyproject.toml`` allows those (``<0.20``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import numpy as np


def gguf_constants() -> ModuleType:
    """gguf-py's ``gguf.constants`` (GGML type ids and block sizes, value types, keys).

    ``import gguf.constants`` runs the package's ``__init__``, which imports its reader, writer, metadata
    and YAML (about 35 ms of CPU, a tenth of a small export's start-up) for a module that imports nothing
    of its own package. So it is loaded by itself, from the installed package's folder, under its own name
    ``gguf.constants``: a later ``import gguf`` or ``from gguf.constants import ...`` gets the same module
    (the same enum classes). Where that fails (a packaging without ``constants.py`` beside ``__init__.py``),
    the usual import is used."""
    mod = sys.modules.get("gguf.constants")
    if mod is not None:
        return mod
    try:
        spec = importlib.util.find_spec("gguf")  # locates the package without running it
        folder = Path((spec.submodule_search_locations or [])[0]) if spec is not None else None
        own = importlib.util.spec_from_file_location("gguf.constants", folder / "constants.py") if folder else None
        if own is None or own.loader is None:
            raise ImportError("gguf.constants not found")
        mod = importlib.util.module_from_spec(own)
        sys.modules["gguf.constants"] = mod
        own.loader.exec_module(mod)
        return mod
    except (ImportError, OSError, IndexError):
        sys.modules.pop("gguf.constants", None)
    import gguf.constants

    return gguf.constants


def quant_shape_to_byte_shape(shape: Sequence[int], quant_type: Any) -> tuple[int, ...]:
    """A quantised tensor's shape (rows, elements per row) as bytes: ``gguf.quants.quant_shape_to_byte_shape``."""
    block_size, type_size = gguf_constants().GGML_QUANT_SIZES[quant_type]
    if shape[-1] % block_size != 0:
        raise ValueError(f"Quantized tensor row size ({shape[-1]}) is not a multiple of {quant_type.name} block size "
                         f"({block_size})")
    return (*shape[:-1], shape[-1] // block_size * type_size)


def k_quant_sub_scales(scales: np.ndarray) -> np.ndarray:
    """The 6-bit sub-scales packed in Q4_K/Q5_K's ``scales[12]`` (``(n_blocks, 12)`` uint8 -> ``(n_blocks, 8)``)."""
    import numpy as np
    from gguf.quants import Q4_K

    sc, _ = Q4_K.get_scale_min(np.ascontiguousarray(scales))
    return sc.reshape(scales.shape[0], -1)
