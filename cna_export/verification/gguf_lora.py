"""Tensor check of a llama.cpp LoRA adapter GGUF (``export --format gguf-lora``) against its base.

The byte-identity check of a patched GGUF does not apply (the adapter holds only A and B). Instead:

* the base is the one the adapter was made from: each steered ``ffn_down`` tensor of the base hashes
  to the manifest's ``sha256_before`` (otherwise :class:`CnaError`: an adapter on the wrong base is
  bad input, not a failed export);
* the header is what llama.cpp needs: ``general.type = adapter``, ``adapter.type = lora``, the base's
  ``general.architecture``, ``adapter.lora.alpha`` equal to every tensor pair's rank (scale 1);
* the tensors are exactly ``<ffn_down>.lora_a`` / ``.lora_b`` of the manifest's tensors, and equal the
  factors recomputed from the base (:func:`cna_export.export.lora_factors.lora_factors`, in the file's dtype),
  and the merged weight ``W + B A`` hashes to the manifest's ``sha256_after``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import CnaError
from ..core.manifest import ExportManifest
from ..io import gguf as G


@dataclass
class AdapterCheck:
    failures: list[str] = field(default_factory=list)
    rank: int = 0
    alpha: float = 0.0
    tensors: int = 0
    exact: int = 0

    @property
    def passed(self) -> bool:
        return not self.failures


def check_base(base: Any, manifest: ExportManifest, base_path: Path | str) -> None:
    """Refuse (CnaError) a base whose steered tensors are not those the adapter was made from."""
    tensors = G.tensor_map(base)
    for tt in manifest.tensors:
        t = tensors.get(tt.name)
        if t is None or G.np_shape(t) != list(tt.shape):
            raise CnaError(f"the adapter does not fit {Path(base_path).name}: it has no {tt.name} of shape {tt.shape} "
                           "(an adapter for a different base?)")
        if G.sha256_array(t.data) != tt.sha256_before:
            raise CnaError(f"the adapter was made for a different base: {Path(base_path).name}'s {tt.name} is not the "
                           f"tensor it was computed from (sha256_before); pass the base it was exported from "
                           f"({manifest.source})")


def check_adapter_tensors(base: Any, adapter: Any, manifest: ExportManifest) -> AdapterCheck:
    """See the module docstring; ``base`` and ``adapter`` are open GGUF readers."""
    res = AdapterCheck()
    f = res.failures
    for key, want in (("general.type", "adapter"), ("adapter.type", "lora"),
                      ("general.architecture", G.field_value(base, "general.architecture"))):
        got = G.field_value(adapter, key)
        if got != want:
            f.append(f"{key} is {got!r}, expected {want!r}")
    alpha = G.field_value(adapter, "adapter.lora.alpha")
    res.alpha = float(alpha) if isinstance(alpha, (int, float)) else 0.0
    tensors = G.tensor_map(adapter)
    want_names = {f"{tt.name}.lora_{ab}" for tt in manifest.tensors for ab in "ab"}
    extra = sorted(set(tensors) - want_names)
    if extra:
        f.append(f"the adapter holds tensors the manifest does not name: {', '.join(extra[:3])}")
    base_tensors = G.tensor_map(base)
    by_tensor: dict[str, dict[int, float]] = {}
    for (layer, index), m in manifest.multiplier_map().items():
        name = next((tt.name for tt in manifest.tensors if tt.name.startswith(f"blk.{layer}.")), None)
        if name is not None:
            by_tensor.setdefault(name, {})[index] = m
    for tt in manifest.tensors:
        a_t, b_t = tensors.get(f"{tt.name}.lora_a"), tensors.get(f"{tt.name}.lora_b")
        if a_t is None or b_t is None:
            f.append(f"{tt.name}: lora_a / lora_b missing")
            continue
        res.tensors += 2
        a = np.asarray(a_t.data).reshape(G.np_shape(a_t))
        b = np.asarray(b_t.data).reshape(G.np_shape(b_t))
        res.rank = max(res.rank, int(a.shape[0]))
        failure = _pair_failure(tt, a, b, base_tensors[tt.name], by_tensor.get(tt.name, {}), res.alpha)
        if failure is None:
            res.exact += 1
        else:
            f.append(failure)
    return res


def _pair_failure(tt: Any, a: np.ndarray, b: np.ndarray, w_t: Any, mults: dict[int, float],
                  alpha: float) -> str | None:
    """Why one tensor's ``lora_a`` / ``lora_b`` are not the factors of the manifest's multipliers (None: they are)."""
    from ..export.lora_factors import lora_factors, merged_sha256
    from ..io.quants import dequantize_rows

    name, rank, idx = tt.name, int(a.shape[0]), list(tt.indices)
    if b.shape[1] != rank:
        return f"{name}: lora_a rank {rank} and lora_b rank {b.shape[1]} differ"
    if alpha != rank:
        return f"{name}: rank {rank} but adapter.lora.alpha {alpha:g}: scale alpha / rank is not 1"
    if sorted(mults) != sorted(idx):
        return f"{name}: the manifest's indices and multipliers disagree"
    w = np.ascontiguousarray(dequantize_rows(w_t.data, w_t.tensor_type))
    want_a, want_b = lora_factors(w[:, idx], "float32", idx, [mults[i] for i in idx], w.shape[1], rank=rank)
    if a.dtype == np.float16:  # the file's dtype; the factors are computed in float32, as exported
        want_a, want_b = want_a.astype(np.float16), want_b.astype(np.float16)
    if a.dtype != want_a.dtype or not np.array_equal(a, want_a):
        return f"{name}.lora_a does not select exactly the manifest's {len(idx)} neurons"
    if b.dtype != want_b.dtype or b.shape != want_b.shape or not np.array_equal(b, want_b):
        worst = float(np.abs(b.astype(np.float64) - want_b.astype(np.float64)).max()) if b.shape == want_b.shape \
            else float("inf")
        return f"{name}.lora_b is not m x column - column for the manifest's multipliers (max |error| {worst:.3g})"
    if a.dtype == np.float32 and merged_sha256(w, "float32", idx, b, "float32") != tt.sha256_after:
        return f"{name}: the merged weight W + B A does not hash to the manifest's sha256_after"
    return None
