"""GGUF files: the one import for the other stages (``from ..io import gguf as G``).

Folding a circuit into a GGUF file changes a few rows of ``blk.N.ffn_up.weight`` (or columns of a
float ``blk.N.ffn_down.weight``) and nothing else. The work is split by job; this module gathers
their public names:

* reading (:mod:`.gguf_read`): :func:`open_gguf` opens a file memory-mapped with one-line errors;
  :func:`kv_fields`, :func:`field_value`, :func:`tensor_map`, :func:`type_name`, :func:`np_shape`;
* editing (:mod:`.gguf_patch`): :class:`TensorPatch`, one tensor's exact edit; :func:`patch_spans`, the
  bytes every edit rewrites (only the touched rows), :func:`touched_hashes`, a touched tensor's sha256
  before and after, and :func:`patch_in_place` (the ``--fast-copy`` path);
* writing (:mod:`.gguf_write`): :func:`build_header`, :func:`write_data`, :func:`write_header` and
  :func:`check_written` (a patched copy, its header composed from the source's raw KV bytes, its data
  copied by the kernel), composed by :func:`write_patched`;
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
from .gguf_patch import (
    PatchedTensor,
    TensorPatch,
    known_hashes,
    patch_in_place,
    patch_spans,
    remember_hashes,
    spans_written,
    touched_hashes,
    write_spans,
)
from .gguf_read import field_value, kv_fields, np_shape, open_gguf, tensor_map, type_name
from .gguf_write import Header, build_header, check_written, write_data, write_header, write_patched
from .tensor_bytes import arrays_equal_bytes, sha256_array

__all__ = [
    "Header",
    "PatchedTensor",
    "TensorPatch",
    "build_header",
    "check_written",
    "arrays_equal_bytes",
    "expert_ffn",
    "ffn_tensors",
    "field_value",
    "gguf_arch",
    "intermediate_size",
    "kv_differences",
    "known_hashes",
    "kv_fields",
    "np_shape",
    "num_layers",
    "open_gguf",
    "patch_in_place",
    "patch_spans",
    "remember_hashes",
    "sha256_array",
    "spans_written",
    "tensor_differences",
    "tensor_map",
    "touched_hashes",
    "type_name",
    "write_data",
    "write_header",
    "write_patched",
    "write_spans",
]
