"""Bench helper: a GGUF of an edited checkpoint, built on a reference GGUF (its metadata, tokenizer, tensor order).

The edited Hugging Face tensors replace their llama.cpp counterparts (names from gguf-py's tensor-name map,
``cna_export.io.weights.hf_to_gguf_module``); every other tensor is the reference's, dequantised. The result is
an F32 GGUF that llama.cpp's own quantiser (``llama_model_quantize`` through llama-cpp-python) turns into Q8_0,
Q4_K_M, ... This is how the abliteration audit bench and the heretic peer bench put a dense edit (an abliterated
``o_proj`` / ``down_proj``) into the bundled GGUFs, whose tokenizers and hyper-parameters stay exactly as shipped.
Q/K rows are never among the edited tensors here, so llama's q/k row permutation does not arise.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

# llama.cpp file types (enum llama_ftype)
FTYPES = {"Q8_0": 7, "Q4_K_M": 15, "Q4_K_S": 14, "Q6_K": 18, "Q5_K_M": 17, "F16": 1}


def _open(reference: Path, edited_hf: dict[str, np.ndarray]) -> tuple:
    """The reference reader, its architecture, and ``edited_hf`` keyed by llama.cpp tensor name."""
    from cna_export.io.gguf import field_value, open_gguf
    from cna_export.io.weights import hf_to_gguf_module

    reader = open_gguf(reference)
    arch = str(field_value(reader, "general.architecture"))
    n_layers = int(field_value(reader, f"{arch}.block_count"))
    edited = {}
    for name, arr in edited_hf.items():
        module, suffix = name.rsplit(".", 1)
        key = hf_to_gguf_module(arch, n_layers, module)
        if key is None:
            raise SystemExit(f"no llama.cpp name for {name} ({arch})")
        edited[f"{key}.{suffix}"] = arr
    return reader, arch, edited


def _write(reader, arch: str, path: Path, tensors, skip_keys: tuple[str, ...] = ()) -> Path:
    """``reader``'s KVs (less ``skip_keys``) and the (name, data, raw dtype) ``tensors``, written to ``path``
    through a temporary sibling."""
    from gguf import GGUFWriter

    from cna_export.io.gguf import kv_fields

    tmp = path.with_name(path.name + ".tmp")
    writer = GGUFWriter(str(tmp), arch)
    writer.kv_data = [{}]
    for fld in kv_fields(reader):
        if fld.name in skip_keys:
            continue
        value, vtype, sub = fld.writer_value()
        writer.add_key_value(fld.name, value, vtype, sub_type=sub)
    for name, data, raw_dtype in tensors:
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(path)
    return path


def _edited_values(t, edited: dict) -> np.ndarray:
    """The edited float32 values for reference tensor ``t``, checked against its shape."""
    data = np.asarray(edited.pop(t.name), dtype=np.float32)
    want = tuple(int(d) for d in reversed(t.shape))
    if data.shape != want:
        raise SystemExit(f"{t.name}: edited shape {data.shape}, the reference has {want}")
    return data


def write_f32_gguf(reference: Path, edited_hf: dict[str, np.ndarray], path: Path) -> Path:
    """``reference``'s KVs and tensors as F32, with ``edited_hf`` (Hugging Face name -> array in HF
    orientation, which is gguf-py's numpy orientation for 2-D weights) in place of their counterparts."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    reader, arch, edited = _open(reference, edited_hf)
    names = {t.name for t in reader.tensors}
    if "output.weight" in edited and "output.weight" not in names:  # tied embeddings: lm_head is token_embd
        tied = edited.pop("output.weight")
        if "token_embd.weight" in edited and not np.array_equal(edited["token_embd.weight"], tied):
            raise SystemExit("lm_head and embed_tokens differ but the reference GGUF ties them")
        edited.setdefault("token_embd.weight", tied)

    def tensors():
        for t in reader.tensors:
            data = (_edited_values(t, edited) if t.name in edited
                    else np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32))
            yield t.name, np.ascontiguousarray(data), GGMLQuantizationType.F32
        if edited:
            raise SystemExit(f"edited tensors not in the reference GGUF: {sorted(edited)[:3]}")

    return _write(reader, arch, path, tensors(), skip_keys=("general.file_type",))


def quantize(src: Path, out: Path, qtype: str, threads: int = 2) -> Path:
    """``src`` (an F32 GGUF) quantised to ``qtype`` by llama.cpp (``llama_model_quantize``); kept if present."""
    import llama_cpp

    if out.is_file():
        return out
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[qtype]
    params.nthread = threads
    tmp = out.with_name(out.name + ".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize {qtype} failed ({rc})")
    tmp.rename(out)
    return out


def splice_edit(reference: Path, edited_hf: dict[str, np.ndarray], path: Path) -> Path:
    """``reference`` byte for byte, except the tensors named in ``edited_hf``, which are quantised to the very
    type each has in ``reference`` by ggml's own quantiser (``io.quants.quantize_rows``). Nothing else is
    re-quantised, so the file differs from the shipped one only where the edit is."""
    from cna_export.io.quants import quantize_rows

    reader, arch, edited = _open(reference, edited_hf)

    def tensors():
        for t in reader.tensors:
            if t.name in edited:
                values = _edited_values(t, edited)
                data = quantize_rows(values.reshape(-1, values.shape[-1]), t.tensor_type)
            else:
                data = np.asarray(t.data)
            yield t.name, data, t.tensor_type
        if edited:
            raise SystemExit(f"edited tensors not in the reference GGUF: {sorted(edited)[:3]}")

    return _write(reader, arch, path, tensors())
