"""GGUF files: the one import for the other stages (``from ..io import gguf as G``).

Folding a circuit into a GGUF file changes a few rows of ``blk.N.ffn_up.weight`` (or columns of a
float ``blk.N.ffn_down.weight``) and nothing else. The work is split by job; this module gathers
their public names:

* reading (:mod:`.gguf_read`): :func:`open_gguf` opens a file memory-mapped with one-line errors;
  :func:`kv_fields`, :func:`field_value`, :func:`tensor_map`, :func:`type_name`, :func:`np_shape`;
* editing (:mod:`.gguf_patch`): :class:`TensorPatch`, one tensor's exact edit, and
  :func:`patch_in_place` (the ``--fast-copy`` path, through ``np.memmap``);
* writing (:mod:`.gguf_write`): :func:`write_patched` streams a patched copy through gguf-py's
  writer, whose internals sit behind :mod:`.gguf_py`;
* comparing (:mod:`.gguf_compare`): :func:`kv_differences` and :func:`tensor_differences`;
* the architecture's view of a file (:mod:`.gguf_arch`): :func:`gguf_arch`, :func:`num_layers`,
  :func:`ffn_tensors`, :func:`expert_ffn`, :func:`intermediate_size`;
* tensor bytes (:mod:`.tensor_bytes`): :func:`sha256_array`, :func:`arrays_equal_bytes`.

Quantised rows are scaled by :mod:`.quants` (the type records are in :mod:`.quant_types`); model
identities of files are in :mod:`.identity`. Modules inside ``io`` import the part they use.
"""

from __future__ import annotations

from .gguf_arch import expert_ffn, ffn_tensors, gguf_arch, intermediate_size, num_layers
from .gguf_compare import kv_differences, tensor_differences
from .gguf_patch import TensorPatch, patch_in_place
from .gguf_read import field_value, kv_fields, np_shape, open_gguf, tensor_map, type_name
from .gguf_write import write_patched
from .tensor_bytes import arrays_equal_bytes, sha256_array

__all__ = [
    "TensorPatch",
    "arrays_equal_bytes",
    "expert_ffn",
    "ffn_tensors",
    "field_value",
    "gguf_arch",
    "intermediate_size",
    "kv_differences",
    "kv_fields",
    "np_shape",
    "num_layers",
    "open_gguf",
    "patch_in_place",
    "sha256_array",
    "tensor_differences",
    "tensor_map",
    "type_name",
    "write_patched",
]
