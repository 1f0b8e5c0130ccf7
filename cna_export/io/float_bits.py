"""Float tensors as stored, in numpy: the storage dtype of each safetensors float type and exact conversions
to and from the float type arithmetic is done in, without torch.

numpy has no bfloat16, so a bfloat16 tensor is held as its ``uint16`` bit patterns. The conversions give the
same bits as torch's (``tensor.to(torch.float32)``, ``tensor.to(torch.bfloat16)``, ...):

* widening (bfloat16 and float16 to float32, anything to float64) is exact;
* narrowing rounds to nearest, ties to even, once.

NaNs come out as torch's vectorised CPU kernels give them (its scalar fallback differs, so torch's own NaN bits
depend on where an element lies): float16 to float32 and back keep the sign and the top of the payload and set
the quiet bit, and float32 to bfloat16 turns every NaN into ``0xFFFF``.

Types outside this table (float8, integers) have no numpy form here: the fingerprint reads them with torch, and
the fold refuses them.
"""

from __future__ import annotations

from typing import Final

import numpy as np

STORAGE: Final[dict[str, np.dtype]] = {
    "float64": np.dtype("<f8"),
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
}
"""torch dtype name -> the numpy dtype its stored elements are read as."""

_BF16_NAN: Final = np.uint16(0xFFFF)
_QUIET: Final = np.uint32(0x00400000)


def storage_dtype(name: str) -> np.dtype | None:
    """The numpy dtype that holds elements of float type ``name`` as stored, None for other types."""
    return STORAGE.get(name)


def not_foldable(name: str) -> str:
    """The one-line reason a tensor of type ``name`` (a torch dtype name) cannot have multipliers folded in."""
    why = ("float64, float32, float16 and bfloat16 can be folded" if name.startswith(("float", "bfloat"))
           else "not floating point")
    return f"cannot fold a multiplier into a {name} tensor ({why})"


def compute_dtype(name: str) -> np.dtype:
    """The float type a multiplication of ``name`` elements is done in: float64 for float64, else float32."""
    return np.dtype(np.float64) if name == "float64" else np.dtype(np.float32)


def widen(stored: np.ndarray, name: str, to: np.dtype | None = None) -> np.ndarray:
    """Stored elements of float type ``name`` as ``to`` (default: :func:`compute_dtype`); exact unless ``to``
    is narrower than ``name`` (then rounded to nearest even)."""
    to = np.dtype(to) if to is not None else compute_dtype(name)
    if name == "bfloat16":
        wide = (stored.astype(np.uint32) << 16).view(np.float32)
        return wide if to == np.float32 else wide.astype(to)
    wide = stored.astype(to, copy=False)
    if name == "float16" and to == np.float32:
        bits = wide.view(np.uint32)
        np.bitwise_or(bits, _QUIET, out=bits, where=np.isnan(wide))
    return wide


def narrow(values: np.ndarray, name: str) -> np.ndarray:
    """float32 or float64 ``values`` rounded once (to nearest, ties to even) to the storage form of ``name``."""
    if name == "float16" and values.dtype == np.float32:
        out = values.astype(STORAGE[name]).view(np.uint16)
        bits = np.ascontiguousarray(values).view(np.uint32)  # a NaN: its sign, quiet, the top of its payload
        nan = (((bits >> 16) & 0x8000) | 0x7E00 | ((bits >> 13) & 0x3FF)).astype(np.uint16)
        return np.where(np.isnan(values), nan, out).view(STORAGE[name])
    if name != "bfloat16":
        return values.astype(STORAGE[name])
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + (((bits >> 16) & 1) + np.uint32(0x7FFF))) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), _BF16_NAN, rounded)
