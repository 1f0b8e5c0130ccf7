"""Faults planted in a correct export, in place, for ``bench/verify_classifier.py``.

Each ``PLANTS[name](out, src)`` edits the exported GGUF ``out`` (its bytes, through gguf-py's reader in
``r+`` mode: nothing moves in the file) using the export's own manifest and the source GGUF ``src``:
the tensor data, a KV pair, or the embedded manifest. Quantised rows are rescaled with
``io.quants.scale_rows`` (scale fields only), or dequantised, edited and re-quantised with ggml's own
quantiser (``io.quants.quantize_rows``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np


def _open(path: Path):
    import gguf

    return gguf.GGUFReader(path, "r+")


def _tensor(reader, name: str):
    for t in reader.tensors:
        if t.name == name:
            return t
    raise KeyError(name)


def _manifest(path: Path):
    from cna_export.export.gguf import read_gguf_manifest

    return read_gguf_manifest(path)[0]


def _by_layer(path: Path) -> dict[int, list[tuple[int, float]]]:
    """layer -> [(neuron index, multiplier)] of the export's manifest."""
    out: dict[int, list[tuple[int, float]]] = {}
    for (layer, index), m in sorted(_manifest(path).multiplier_map().items()):
        out.setdefault(layer, []).append((index, m))
    return out


def _rows(t) -> np.ndarray:
    """The tensor's data as rows (block types: uint8 bytes per row; floats: values per row)."""
    return t.data.reshape(-1, t.data.shape[-1])


def _scale(t, rows: list[int], factors: list[float] | float) -> None:
    from cna_export.io.quants import scale_rows

    data = _rows(t)
    scale_rows(data, t.tensor_type, rows, factors, out=data)


def _restore(t, src_t, rows: list[int]) -> None:
    _rows(t)[rows] = _rows(src_t)[rows]


def _requantise(t, rows: list[int], values: np.ndarray) -> None:
    from gguf import GGMLQuantizationType as T

    from cna_export.io.quants import quantize_rows

    if t.tensor_type in (T.F32, T.F16):
        _rows(t)[rows] = values.astype(_rows(t).dtype)
    else:
        _rows(t)[rows] = quantize_rows(values, t.tensor_type)


def _values(t, rows: list[int]) -> np.ndarray:
    from cna_export.io.quants import dequantize_rows

    return dequantize_rows(_rows(t), t.tensor_type, rows).astype(np.float32)


def wrong_row(out: Path, src: Path) -> None:
    """One neuron's steered ffn_up row swapped with its neighbour's."""
    layer, neurons = next(iter(_by_layer(out).items()))
    i = neurons[0][0]
    j = i + 1 if all(n != i + 1 for n, _ in neurons) else i - 1
    r = _open(out)
    rows = _rows(_tensor(r, f"blk.{layer}.ffn_up.weight"))
    rows[[i, j]] = rows[[j, i]].copy()


def multiplier_0_3_for_0_2(out: Path, src: Path) -> None:
    """Every steered row scaled by 1.5: 0.3 x source where the manifest says 0.2."""
    r = _open(out)
    for layer, neurons in _by_layer(out).items():
        _scale(_tensor(r, f"blk.{layer}.ffn_up.weight"), [i for i, _ in neurons], 1.5)


def _unfold_up(out: Path, src: Path):
    """The export's ffn_up rows put back to the source's; returns (export reader, source reader, by layer)."""
    r, s, by = _open(out), _open(src), _by_layer(out)
    for layer, neurons in by.items():
        name = f"blk.{layer}.ffn_up.weight"
        _restore(_tensor(r, name), _tensor(s, name), [i for i, _ in neurons])
    return r, s, by


def fold_on_gate(out: Path, src: Path) -> None:
    """The multipliers on ffn_gate rows (before the activation) instead of ffn_up rows."""
    r, _, by = _unfold_up(out, src)
    for layer, neurons in by.items():
        _scale(_tensor(r, f"blk.{layer}.ffn_gate.weight"), [i for i, _ in neurons], [m for _, m in neurons])


def fold_on_down_manifest_up(out: Path, src: Path) -> None:
    """The multipliers on ffn_down columns (float tensors) while the manifest says ffn_up rows: the same
    function, other bytes."""
    r, _, by = _unfold_up(out, src)
    for layer, neurons in by.items():
        down = _rows(_tensor(r, f"blk.{layer}.ffn_down.weight"))
        for i, m in neurons:
            down[:, i] = down[:, i] * m


def transposed_block(out: Path, src: Path) -> None:
    """A 32 x 32 block of one steered ffn_up tensor, at the first neuron's rows, transposed."""
    layer, neurons = next(iter(_by_layer(out).items()))
    t = _tensor(_open(out), f"blk.{layer}.ffn_up.weight")
    start = neurons[0][0] // 32 * 32
    rows = list(range(start, start + 32))
    values = _values(t, rows)
    values[:, :32] = values[:, :32].T.copy()
    _requantise(t, rows, values)


def index_off_by_one(out: Path, src: Path) -> None:
    """Every multiplier applied to neuron index + 1."""
    r, _, by = _unfold_up(out, src)
    for layer, neurons in by.items():
        t = _tensor(r, f"blk.{layer}.ffn_up.weight")
        _scale(t, [(i + 1) % _rows(t).shape[0] for i, _ in neurons], [m for _, m in neurons])


def tenth_left_out(out: Path, src: Path) -> None:
    """Every tenth steered row put back to the source's."""
    r, s, by = _open(out), _open(src), _by_layer(out)
    flat = [(layer, i) for layer, neurons in by.items() for i, _ in neurons][::10]
    for layer, i in flat:
        name = f"blk.{layer}.ffn_up.weight"
        _restore(_tensor(r, name), _tensor(s, name), [i])


def layer_unsteered(out: Path, src: Path) -> None:
    """The layer with the most steered neurons put back to the source's."""
    r, s, by = _open(out), _open(src), _by_layer(out)
    layer = max(by, key=lambda k: len(by[k]))
    name = f"blk.{layer}.ffn_up.weight"
    _restore(_tensor(r, name), _tensor(s, name), [i for i, _ in by[layer]])


def sign_flipped(out: Path, src: Path) -> None:
    """Every steered row negated: -m x source."""
    r = _open(out)
    for layer, neurons in _by_layer(out).items():
        _scale(_tensor(r, f"blk.{layer}.ffn_up.weight"), [i for i, _ in neurons], -1.0)


def tokenizer_kv(out: Path, src: Path) -> None:
    """Two tokenizer tokens of equal length swapped (tokenizer.ggml.tokens)."""
    f = _open(out).fields["tokenizer.ggml.tokens"]
    texts = {}
    for k in f.data[1000:4000]:
        b = bytes(f.parts[k])
        if len(b) in texts:
            a = f.parts[texts[len(b)]]
            tmp = np.array(a, copy=True)
            a[:] = f.parts[k]
            f.parts[k][:] = tmp
            return
        texts[len(b)] = k
    raise RuntimeError("no two tokens of equal length")


def _kv_scale(out: Path, key: str, factor: float) -> None:
    f = _open(out).fields[key]
    f.parts[f.data[0]][0] *= factor


def rope_base_kv(out: Path, src: Path) -> None:
    """llama.rope.freq_base halved."""
    _kv_scale(out, "llama.rope.freq_base", 0.5)


def manifest_claims_0_3(out: Path, src: Path) -> None:
    """The embedded manifest says multiplier 0.3 where the tensors hold 0.2 (same length: nothing moves)."""
    f = _open(out).fields["cna.manifest"]
    part = f.parts[f.data[0]]
    text = bytes(part).replace(b'"multiplier": 0.2', b'"multiplier": 0.3')
    if text == bytes(part):
        raise RuntimeError("no multiplier 0.2 in the manifest")
    part[:] = np.frombuffer(text, dtype=np.uint8)


def adapter_alpha_x2(out: Path, src: Path) -> None:
    _kv_scale(out, "adapter.lora.alpha", 2.0)


def adapter_alpha_x0_5(out: Path, src: Path) -> None:
    _kv_scale(out, "adapter.lora.alpha", 0.5)


def _lora(out: Path, which: str):
    r = _open(out)
    return r, [t for t in r.tensors if t.name.endswith(f".lora_{which}")]


def lora_b_x2(out: Path, src: Path) -> None:
    """Every lora_b doubled (the adapter's scale off by 2)."""
    _, ts = _lora(out, "b")
    for t in ts:
        t.data[...] = t.data * 2


def lora_layer_zeroed(out: Path, src: Path) -> None:
    """The first layer's lora_b zeroed (that layer not steered)."""
    _, ts = _lora(out, "b")
    ts[0].data[...] = 0


def lora_a_rank_permuted(out: Path, src: Path) -> None:
    """One layer's lora_a rank rows reversed (pairs A's rows with the wrong columns of B)."""
    _, ts = _lora(out, "a")
    t = max(ts, key=lambda x: np.abs(x.data).sum())
    t.data[...] = t.data[::-1].copy()


def lora_layers_swapped(out: Path, src: Path) -> None:
    """Two layers' lora_a and lora_b swapped (each layer's adapter applied to the other)."""
    r = _open(out)
    a = [t for t in r.tensors if t.name.endswith(".lora_a")]
    b = [t for t in r.tensors if t.name.endswith(".lora_b")]
    for ts in (a, b):
        tmp = np.array(ts[0].data, copy=True)
        ts[0].data[...] = ts[1].data
        ts[1].data[...] = tmp


PLANTS: dict[str, Callable[[Path, Path], None]] = {
    "wrong_row": wrong_row,
    "multiplier_0.3_for_0.2": multiplier_0_3_for_0_2,
    "fold_on_gate": fold_on_gate,
    "fold_on_down_manifest_up": fold_on_down_manifest_up,
    "transposed_block": transposed_block,
    "index_off_by_one": index_off_by_one,
    "tenth_left_out": tenth_left_out,
    "layer_unsteered": layer_unsteered,
    "sign_flipped": sign_flipped,
    "tokenizer_kv": tokenizer_kv,
    "rope_base_kv": rope_base_kv,
    "manifest_claims_0.3": manifest_claims_0_3,
    "adapter_alpha_x2": adapter_alpha_x2,
    "adapter_alpha_x0.5": adapter_alpha_x0_5,
    "lora_b_x2": lora_b_x2,
    "lora_layer_zeroed": lora_layer_zeroed,
    "lora_a_rank_permuted": lora_a_rank_permuted,
    "lora_layers_swapped": lora_layers_swapped,
}
