"""gguf-py's internals, in one place: what the package relies on beyond gguf-py's public API.

gguf-py (the ``gguf`` package, llama.cpp's Python library) gives the GGML constants, the quant
classes and ``GGUFWriter``. The package uses their public calls directly; this module holds the
few things that are gguf-py's implementation, not its API, so that a gguf-py release that changes
them breaks here and nowhere else:

* :class:`CopyWriter`, a ``GGUFWriter`` for an exact copy of a file: it starts without the
  ``general.architecture`` KV pair the constructor adds (``kv_data``), takes the source's data
  alignment (``data_alignment``), passes strings as raw ``bytes`` (``_pack_val`` writes bytes as
  they are, so strings that are not valid UTF-8 round-trip), and hands out its open output file
  (``fout``) so that the data section can be copied by the kernel;
* :func:`k_quant_sub_scales`, the unpacking of Q4_K/Q5_K's 6-bit sub-scales
  (``gguf.quants.Q4_K.get_scale_min``).

Verified with gguf 0.17.0, 0.17.1, 0.18.0 and 0.19.0; ``pyproject.toml`` allows those (``<0.20``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np


class CopyWriter:
    """One GGUF file written through ``GGUFWriter``: KV pairs and tensor infos added in file order
    (nothing else), the data ``alignment`` of the source, then the header and the tensor data."""

    def __init__(self, alignment: int) -> None:
        from gguf import GGUFWriter

        self._w = GGUFWriter(None, "")
        self._w.kv_data = [{}]  # drop the architecture KV the constructor adds: every KV comes from the caller
        self._w.data_alignment = alignment

    @property
    def alignment(self) -> int:
        return int(self._w.data_alignment)

    def add_kv(self, key: str, value: Any, vtype: Any, sub_type: Any = None) -> None:
        """One KV pair (strings may be ``bytes``, written as they are)."""
        self._w.add_key_value(key, value, vtype, sub_type=sub_type)

    def add_tensor_info(self, name: str, shape: Sequence[int], dtype: np.dtype, nbytes: int, ggml_type: Any) -> None:
        """One tensor's info; ``shape`` and ``dtype`` as gguf.GGUFReader gives the tensor's data."""
        self._w.add_tensor_info(name, shape, dtype, nbytes, raw_dtype=ggml_type)

    def write_header(self, path: Path) -> None:
        """Create ``path`` and write the header, the KV pairs and the tensor infos."""
        self._w.write_header_to_file(path=Path(path))
        self._w.write_kv_data_to_file()
        self._w.write_ti_data_to_file()

    def write_tensor(self, data: np.ndarray) -> None:
        """The next tensor's data (in tensor-info order), padded to the alignment."""
        self._w.write_tensor_data(data)

    def fileno(self) -> int:
        """The output file's descriptor, everything written so far flushed to it (the caller may write
        through it, and must leave its offset at the end of what it wrote)."""
        assert self._w.fout is not None
        fout = self._w.fout[0]
        fout.flush()
        return fout.fileno()

    def sync(self) -> None:
        """Flush and fsync the output."""
        self._w.flush()
        assert self._w.fout is not None
        for fh in self._w.fout:
            os.fsync(fh.fileno())

    def close(self) -> None:
        self._w.close()


def k_quant_sub_scales(scales: np.ndarray) -> np.ndarray:
    """The 6-bit sub-scales packed in Q4_K/Q5_K's ``scales[12]`` (``(n_blocks, 12)`` uint8 -> ``(n_blocks, 8)``)."""
    from gguf.quants import Q4_K

    sc, _ = Q4_K.get_scale_min(np.ascontiguousarray(scales))
    return sc.reshape(scales.shape[0], -1)
