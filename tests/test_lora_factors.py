"""The numpy LoRA factors (export/lora_factors.py) give torch's bits: A, B and the merged weight's hash equal those
of the torch implementation they replaced (kept here as the oracle), for every base and adapter type; and a LoRA
export (PEFT folder or llama.cpp GGUF) runs without importing torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cna_export.export.fold import scale_columns
from cna_export.export.lora_factors import lora_factors, merged_sha256, next_toward
from cna_export.io import float_bits as fb
from cna_export.io.tensor_bytes import tensor_sha256

TYPES = ["float64", "float32", "float16", "bfloat16"]


# -- the oracle: the torch implementation before the port ------------------------------------------------------


def _ct(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _oracle_merge(cols, delta):
    return (cols.to(_ct(cols.dtype)) + delta.to(_ct(cols.dtype))).to(cols.dtype)


def oracle_factors(weight, indices, multipliers, rank, dtype):
    idx = [int(i) for i in indices]
    target = scale_columns(weight, idx, list(multipliers))
    sel = torch.tensor(idx, dtype=torch.long)
    cols, want = weight.index_select(1, sel), target.index_select(1, sel)
    delta = (want.to(torch.float64) - cols.to(torch.float64)).to(dtype)
    for _ in range(2):
        off = _oracle_merge(cols, delta) != want
        if not bool(off.any()):
            break
        for direction in (float("inf"), float("-inf")):
            step = torch.nextafter(delta, torch.full_like(delta, direction))
            fixed = off & (_oracle_merge(cols, step) == want)
            delta = torch.where(fixed, step, delta)
            off = off & ~fixed
    a = torch.zeros((rank, weight.shape[1]), dtype=dtype)
    a[torch.arange(len(idx)), sel] = 1
    b = torch.zeros((weight.shape[0], rank), dtype=dtype)
    b[:, : len(idx)] = delta
    return a, b


def oracle_merged(weight, a, b):
    ct = _ct(weight.dtype)
    return (weight.to(ct) + b.to(ct) @ a.to(ct)).to(weight.dtype)


# -- helpers -----------------------------------------------------------------------------------------------------


def _stored(t: torch.Tensor) -> np.ndarray:
    """A torch tensor as io.float_bits stores it."""
    name = str(t.dtype).removeprefix("torch.")
    if name == "bfloat16":
        return t.contiguous().view(torch.int16).numpy().view(np.uint16)
    return t.contiguous().numpy()


def _same(stored: np.ndarray, t: torch.Tensor) -> bool:
    return stored.dtype == _stored(t).dtype and stored.tobytes() == _stored(t).tobytes()


def _finite_weight(rng: np.random.Generator, rows: int, width: int, name: str) -> torch.Tensor:
    """Random finite weights of type ``name``, with zeros of both signs and tiny (subnormal) values mixed in."""
    w = rng.standard_normal((rows, width)) * rng.choice([1e-3, 1.0, 30.0], size=(rows, width))
    w[rng.random((rows, width)) < 0.05] = 0.0
    w[rng.random((rows, width)) < 0.05] = -0.0
    tiny = {"float16": 1e-6, "bfloat16": 1e-39, "float32": 1e-40, "float64": 1e-310}[name]
    mask = rng.random((rows, width)) < 0.05
    w[mask] = tiny * rng.standard_normal(int(mask.sum()))
    return torch.from_numpy(w).to(getattr(torch, name))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=st.sampled_from(TYPES), out=st.sampled_from(TYPES), seed=st.integers(0, 2**32 - 1),
       pad=st.integers(0, 2), data=st.data())
def test_factors_and_merged_hash_equal_the_torch_implementation(base, out, seed, pad, data):
    rng = np.random.default_rng(seed)
    rows, width = data.draw(st.integers(2, 12)), data.draw(st.integers(1, 20))  # 1 row: torch takes another kernel
    k = data.draw(st.integers(1, width))
    idx = sorted(rng.choice(width, size=k, replace=False).tolist())
    mults = data.draw(st.lists(st.one_of(st.sampled_from([0.0, -1.0, 2.0, 0.5, 1.0, 1e-3]),
                                         st.floats(-8, 8, allow_nan=False, width=32)), min_size=k, max_size=k))
    weight = _finite_weight(rng, rows, width, base)
    a_t, b_t = oracle_factors(weight, idx, mults, k + pad, getattr(torch, out))
    w = _stored(weight)
    a, b = lora_factors(w[:, idx], base, idx, mults, width, rank=k + pad, out=out)
    assert _same(a, a_t) and _same(b, b_t)
    if np.isfinite(fb.widen(b, out)).all():  # the oracle's matmul turns 0 x inf into NaN across a whole row
        assert merged_sha256(w, base, idx, b, out) == tensor_sha256(oracle_merged(weight, a_t, b_t))


@pytest.mark.parametrize("name", TYPES)
def test_next_toward_is_torch_nextafter(name):
    """Every neighbour, both ways, of zeros, subnormals, extremes, infinities and random values."""
    dtype = getattr(torch, name)
    info = torch.finfo(dtype)
    special = [0.0, -0.0, info.tiny, -info.tiny, info.max, -info.max, float("inf"), float("-inf"), 1.0, -1.0,
               info.smallest_normal / 2 if name != "float64" else 5e-324]
    values = torch.cat([torch.tensor(special, dtype=torch.float64).to(dtype),
                        torch.randn(2000, dtype=torch.float64).mul(10.0).to(dtype)])
    for direction in (float("inf"), float("-inf")):
        want = torch.nextafter(values, torch.full_like(values, direction))
        assert _same(next_toward(_stored(values), name, direction), want), direction


def test_rank_below_the_neurons_is_refused():
    with pytest.raises(ValueError, match="rank 1 is smaller than the 2 neurons"):
        lora_factors(np.ones((3, 2), np.float32), "float32", [0, 1], [0.0, 0.0], 4, rank=1)


# -- whole exports, without torch ------------------------------------------------------------------------------


def _run_without_torch(argv: list[str]) -> None:
    import os

    from test_scale_io import assert_runs_without

    assert_runs_without(argv, env=dict(os.environ, CNA_EXPORT_FINGERPRINT_CACHE="off"))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_peft_lora_export_never_imports_torch(dtype, export_sources, tmp_path):
    """A LoRA export of a bfloat16 checkpoint runs without torch or transformers and writes the factors of the
    torch implementation, in the adapter type asked for."""
    from conftest import PLANTED, planted_circuit
    from safetensors.torch import load_file

    from cna_export.io.safetensors import Checkpoint

    src = export_sources[("llama", "bfloat16", True)]
    circuit = tmp_path / "c.json"
    planted_circuit(src, own=True).save(circuit)
    out = tmp_path / "ad"
    _run_without_torch(["export", "--model", str(src), "--circuit", str(circuit), "--format", "lora",
                        "--adapter-dtype", dtype, "--out", str(out)])
    adapter, ckpt = load_file(out / "adapter_model.safetensors"), Checkpoint.open(src)
    for layer in sorted({layer for layer, _ in PLANTED}):
        idx = [j for (l, j) in sorted(PLANTED) if l == layer]
        weight = ckpt.read(f"model.layers.{layer}.mlp.down_proj.weight")
        a, b = oracle_factors(weight, idx, [PLANTED[layer, j] for j in idx], len(idx),
                              getattr(torch, dtype))
        key = f"base_model.model.model.layers.{layer}.mlp.down_proj"
        assert torch.equal(adapter[f"{key}.lora_A.weight"], a) and adapter[f"{key}.lora_A.weight"].dtype == a.dtype
        bits = torch.int16 if dtype == "bfloat16" else torch.int32
        assert torch.equal(adapter[f"{key}.lora_B.weight"].view(bits), b.view(bits))


def test_a_gguf_lora_export_never_imports_torch(tmp_path):
    """The llama.cpp adapter of the bundled SmolLM2 GGUF (its ffn_down dequantised, factors in numpy)."""
    from cna_export.core.circuit import Circuit, Neuron
    from cna_export.io.bundled import resolve
    from cna_export.io.gguf import open_gguf
    from cna_export.io.identity import gguf_identity

    src = str(resolve("bundled:smollm2"))
    circuit = tmp_path / "c.json"
    Circuit(model=gguf_identity(open_gguf(src), "bundled:smollm2"), method={"name": "manual"},
            neurons=[Neuron(layer=3, index=5, score=1.0), Neuron(layer=20, index=7, score=1.0)]).save(circuit)
    out = tmp_path / "a.gguf"
    _run_without_torch(["export", "--model", src, "--circuit", str(circuit), "--multiplier", "0", "--format",
                        "gguf-lora", "--out", str(out)])
    from cna_export.verification.gguf import verify_gguf

    rep = verify_gguf(src, out, behaviour=False)  # the tensor check: the factors recomputed from the base
    assert rep.passed and rep.metrics["adapter_rank"] == 1, rep.reasons
    from cna_export.core.manifest import ExportManifest
    from cna_export.io import gguf as G

    manifest = ExportManifest.from_json(G.field_value(G.open_gguf(out), "cna.manifest"))
    base = G.tensor_map(G.open_gguf(src))
    assert [t.dtype for t in manifest.tensors] == [G.type_name(base[t.name]) for t in manifest.tensors]  # Q4_1...
    assert [t.sha256_before for t in manifest.tensors] == [G.sha256_array(base[t.name].data) for t in manifest.tensors]


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
@pytest.mark.parametrize("zero", [0.0, -0.0])
def test_plus_zero_on_the_bits_is_the_float_sum(name, zero):
    """Every 16-bit pattern (NaNs, infinities, both zeros, subnormals) plus a zero: the bit path equals widening,
    adding in float32 and rounding back (io.float_bits)."""
    from cna_export.export.lora_factors import plus_zero, to_type

    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(fb.STORAGE[name]).reshape(256, 256)
    rows = np.full((256, 1), zero, np.float32)
    with np.errstate(invalid="ignore"):  # signalling NaNs
        want = to_type(fb.widen(every, name, np.dtype(np.float32)) + rows, name)
    assert plus_zero(every, name, rows).view(np.uint16).tobytes() == want.view(np.uint16).tobytes()
    assert plus_zero(every, name, np.float32(zero)).view(np.uint16).tobytes() == want.view(np.uint16).tobytes()
