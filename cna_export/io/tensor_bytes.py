"""Tensor bytes as stored: raw little-endian bytes, their sha256, and bit-exact comparison (torch tensors and
numpy arrays, memory-mapped ones included)."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

_HASH_CHUNK = 1 << 24


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The tensor's raw little-endian bytes in its own dtype (what safetensors stores)."""
    import torch

    t = t.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of :func:`tensor_bytes` (identical to hashing the tensor's bytes in a safetensors file)."""
    import torch

    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256()
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # buffer protocol: no extra copy
    return h.hexdigest()


def int_view(dtype: torch.dtype) -> torch.dtype:
    import torch

    size = torch.empty((), dtype=dtype).element_size()
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]


def bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when two tensors hold the same bits (shape and element size must agree)."""
    import torch

    if a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return bool(torch.equal(a.contiguous().view(int_view(a.dtype)), b.contiguous().view(int_view(b.dtype))))


def byte_view(arr: np.ndarray) -> np.ndarray:
    """A C-contiguous array seen as flat uint8 (no copy)."""
    import numpy as np

    return arr.reshape(-1).view(np.uint8)


def sha256_array(arr: np.ndarray) -> str:
    """sha256 of an array's bytes, streamed in chunks (works on memory maps without loading them)."""
    b = byte_view(arr)
    h = hashlib.sha256()
    for start in range(0, b.size, _HASH_CHUNK):
        h.update(b[start : start + _HASH_CHUNK])
    return h.hexdigest()


def arrays_equal_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two arrays hold identical bytes, compared chunk by chunk."""
    import numpy as np

    x, y = byte_view(a), byte_view(b)
    if x.size != y.size:
        return False
    for start in range(0, x.size, _HASH_CHUNK):
        if not np.array_equal(x[start : start + _HASH_CHUNK], y[start : start + _HASH_CHUNK]):
            return False
    return True
