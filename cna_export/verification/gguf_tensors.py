"""GGUF tensor check: KV pairs and untouched tensors byte-identical, touched rows exactly the multiplier
times the source."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.manifest import GGUF_KEY, STEERED_SUFFIX, ExportManifest
from ..export.gguf import plan_patches
from ..io import gguf as G
from ..io.quant_layouts import LAYOUTS
from ..io.quants import dequantize_rows

_ROUNDOFF = {"f16": 2.0**-11, "f16_iq1m": 2.0**-11, "bf16": 2.0**-8, "f32": 2.0**-24, "f64": 2.0**-53}


@dataclass
class TensorCheck:
    """Result of the exact tensor check."""

    n_tensors: int
    n_identical: int
    touched: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def check_tensors(source: Any, exported: Any, manifest: ExportManifest) -> TensorCheck:
    """Exact comparison of the export with its source, driven by the manifest."""
    failures: list[str] = []
    header_changed = exported.get_field(GGUF_KEY) is not None
    ignore = ("general.name", GGUF_KEY) if header_changed else ()
    failures += [f"KV: {d}" for d in G.kv_differences(source, exported, ignore=ignore)]
    if header_changed:
        name = G.field_value(exported, "general.name", "")
        if not str(name).endswith(STEERED_SUFFIX):
            failures.append(f"general.name {name!r} is not marked as steered")

    spec = G.gguf_arch(source)
    plan = plan_patches(source, spec, manifest.multiplier_map(), manifest.fold)
    listed = {t.name: t for t in manifest.tensors}
    if set(plan) != set(listed):
        failures.append(
            f"manifest lists tensors {sorted(listed)} but its multipliers touch {sorted(plan)}"
        )
    untouched_diffs = G.tensor_differences(source, exported, ignore_data=plan.keys())
    failures += untouched_diffs
    n_untouched = sum(1 for t in source.tensors if t.name not in plan)
    n_identical = n_untouched - sum(1 for d in untouched_diffs if d.endswith("bytes differ"))

    src_t, exp_t = G.tensor_map(source), G.tensor_map(exported)
    touched: list[dict[str, Any]] = []
    for name, patch in plan.items():
        s, e = src_t.get(name), exp_t.get(name)
        if s is None or e is None or s.tensor_type != e.tensor_type or s.ne != e.ne:
            continue  # reported by tensor_differences
        rec = listed.get(name)
        if rec is not None:
            if G.sha256_array(s.data) != rec.sha256_before:
                failures.append(f"{name}: the source tensor is not the one the export was made from (sha256 differs)")
            if G.sha256_array(e.data) != rec.sha256_after:
                failures.append(f"{name}: the exported tensor does not match the manifest's sha256")
            if list(rec.indices) != list(patch.indices) or rec.axis != patch.axis:
                failures.append(f"{name}: manifest indices/axis differ from what the multipliers imply")
        result = _check_patch(s, e, patch)
        touched.append(result)
        failures += result.pop("failures")
    return TensorCheck(len(source.tensors), n_identical, touched, failures)


def _as_matrix(t: Any) -> np.ndarray:
    """Tensor data as (rows, row_bytes) uint8."""
    d = np.ascontiguousarray(t.data)
    return d.reshape(-1, d.shape[-1]).view(np.uint8) if d.ndim > 1 else d.reshape(1, -1).view(np.uint8)


def _check_patch(src: Any, exp: Any, patch: G.TensorPatch) -> dict[str, Any]:
    name, qtype = patch.name, src.tensor_type
    enc = LAYOUTS[qtype].scale_encoding if qtype in LAYOUTS else "f32"
    rtol = _ROUNDOFF[enc]
    idx = np.asarray(patch.indices, dtype=np.int64)
    mult = np.asarray(patch.multipliers, dtype=np.float64)
    failures: list[str] = []
    if patch.axis == "row":
        old = dequantize_rows(src.data, qtype, idx).astype(np.float64)
        new = dequantize_rows(exp.data, qtype, idx).astype(np.float64)
        sb, eb = _as_matrix(src), _as_matrix(exp)
        others = np.ones(sb.shape[0], dtype=bool)
        others[idx] = False
        if not np.array_equal(sb[others], eb[others]):
            failures.append(f"{name}: rows outside the circuit changed")
        m = mult[:, None]
    else:
        full_old = dequantize_rows(src.data, qtype).astype(np.float64)
        full_new = dequantize_rows(exp.data, qtype).astype(np.float64)
        if len(src.ne) == 3 and patch.axis == "column":  # ffn_down_exps: columns e * n_ff + j of [n_embd, E * n_ff]
            n_ff, n_embd, n_exp = (int(x) for x in src.ne)
            full_old = full_old.reshape(n_exp, n_embd, n_ff).transpose(1, 0, 2).reshape(n_embd, -1)
            full_new = full_new.reshape(n_exp, n_embd, n_ff).transpose(1, 0, 2).reshape(n_embd, -1)
        if patch.axis == "element":
            full_old, full_new = full_old.reshape(-1, 1), full_new.reshape(-1, 1)
            old, new = full_old[idx], full_new[idx]
            keep_old, keep_new = np.delete(full_old, idx, axis=0), np.delete(full_new, idx, axis=0)
            m = mult[:, None]
        else:
            old, new = full_old[:, idx].T, full_new[:, idx].T
            keep_old, keep_new = np.delete(full_old, idx, axis=1), np.delete(full_new, idx, axis=1)
            m = mult[:, None]
        if not np.array_equal(keep_old, keep_new):
            what = "elements" if patch.axis == "element" else "columns"
            failures.append(f"{name}: {what} outside the circuit changed")
    expected = m * old
    err = np.abs(new - expected)
    exact_rows = np.isin(mult, (0.0, -1.0))
    if np.any(exact_rows) and not np.array_equal(new[exact_rows], expected[exact_rows]):
        failures.append(f"{name}: {patch.axis}s with multiplier 0 or -1 are not exact")
    rowmax = np.abs(old).max(axis=1, keepdims=True) if old.size else old
    bound = rtol * np.abs(expected) + 4 * rtol * np.abs(m) * rowmax
    if not np.all(err <= bound):
        r = int(np.argwhere(err > bound)[0][0])
        failures.append(
            f"{name}: {patch.axis} {int(idx[r])} is off by {float(err[r].max()):.3g} "
            f"(more than one rounding of the scale fields)"
        )
    return {
        "name": name,
        "type": qtype.name,
        "axis": patch.axis,
        "count": int(idx.size),
        "exact": bool(np.array_equal(new, expected)),
        "max_abs_error": float(err.max()) if err.size else 0.0,
        "failures": failures,
    }
