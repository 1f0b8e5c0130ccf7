"""Float tensors as stored, in numpy (io.float_bits) and the numpy fold (export.fold.scale_stored): the same bits
as torch, so that a safetensors export without torch writes what the torch fold writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cna_export.export.fold import scale_slices, scale_stored
from cna_export.io.float_bits import STORAGE, narrow, widen

NAMES = ["bfloat16", "float16", "float32", "float64"]
UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
INT = {2: (np.int16, torch.int16), 4: (np.int32, torch.int32), 8: (np.int64, torch.int64)}


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(UINT[a.dtype.itemsize])


def _torch(stored: np.ndarray, name: str) -> torch.Tensor:
    """The same bits as a torch tensor of type ``name``."""
    return torch.from_numpy(np.ascontiguousarray(stored).view(INT[stored.dtype.itemsize][0]).copy()).view(
        getattr(torch, name))


def _from_torch(t: torch.Tensor) -> np.ndarray:
    """A torch float tensor's bits as unsigned integers."""
    size = t.element_size()
    return t.contiguous().view(INT[size][1]).numpy().view(UINT[size])


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_widening_every_16_bit_pattern_gives_torchs_float32(name):
    """Every one of the 65536 patterns (NaNs, infinities, subnormals included) widens to torch's float32 bits."""
    stored = np.arange(1 << 16, dtype=np.uint16).view(STORAGE[name])
    assert np.array_equal(_bits(widen(stored, name)), _from_torch(_torch(stored, name).to(torch.float32)))


@pytest.mark.parametrize("name", ["bfloat16", "float16", "float32"])
def test_narrowing_random_float32_patterns_gives_torchs_bits(name):
    """Rounding float32 to each type (ties to even, overflow to infinity, NaNs) as torch's CPU kernel does."""
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 1 << 32, size=1 << 20, dtype=np.uint64).astype(np.uint32)
    bits[:8] = [0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0x3F808000, 0x3F818000, 0x00000001, 0x7FC00001, 0xFFC00000]
    values = bits.view(np.float32)
    want = _from_torch(torch.from_numpy(values.copy()).to(getattr(torch, name)))
    with np.errstate(over="ignore", invalid="ignore"):
        got = narrow(values, name)
    assert np.array_equal(_bits(got), want)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(NAMES), axis=st.sampled_from(["column", "row"]), seed=st.integers(0, 2**32 - 1),
       shape=st.tuples(st.integers(1, 9), st.integers(1, 9)),
       multipliers=st.lists(st.one_of(st.sampled_from([0.0, -1.0, 1.0, 2.0, 0.5]),
                                      st.floats(-1e4, 1e4, allow_nan=False, width=64)), min_size=9, max_size=9))
def test_the_numpy_fold_writes_the_torch_folds_bits(name, axis, seed, shape, multipliers):
    """scale_stored on gathered slices equals scale_slices of the tensor, bit for bit, for random stored bits."""
    rng = np.random.default_rng(seed)
    dtype = STORAGE[name]
    stored = rng.integers(0, 256, size=shape[0] * shape[1] * dtype.itemsize, dtype=np.uint8).view(dtype)
    stored = stored.reshape(shape)
    k = shape[1] if axis == "column" else shape[0]
    ms = multipliers[:k]
    with np.errstate(over="ignore", invalid="ignore"):
        got = scale_stored(stored, name, axis, ms)
    want = _from_torch(scale_slices(_torch(stored, name), axis, list(range(k)), ms))
    assert got.dtype == dtype and got.shape == stored.shape
    same = _bits(got) == want
    nan_both = np.isnan(widen(got, name)) & np.isnan(widen(want.view(dtype), name))
    assert np.all(same | nan_both)  # NaN bits: torch's own depend on the kernel (io.float_bits)


def test_the_numpy_fold_refuses_types_it_cannot_fold_exactly():
    from cna_export.core.errors import CnaError

    with pytest.raises(CnaError, match="float8_e4m3fn tensor"):
        scale_stored(np.zeros((2, 2), np.uint8), "float8_e4m3fn", "row", [0.0, 1.0])
