"""Audit a LoRA adapter (PEFT folder or llama.cpp LoRA GGUF): which neurons does it change, and how?

A LoRA adds ``scale * B A`` to a weight. A CNA adapter (``export --format lora|gguf-lora``) adds it to
down_proj only, and its change of column ``j`` is ``(m - 1) * W[:, j]``: neuron ``j`` scaled by ``m``.
:func:`adapter_edits` reads every adapted weight's change and, given the base, recovers for each
changed column the multiplier ``m`` that explains it (least squares) and whether it does so exactly
(a constant scaling, within the adapter dtype's rounding).

``audit`` modes on an adapter:

* ``--manifest [FILE]``: the base is ``--base``, else the one the manifest names. The base must be
  the one the adapter was computed from (the manifest's ``sha256_before``; otherwise a one-line
  error, exit 2). Passes (exit 0) when the adapter changes exactly the manifest's neurons, each by
  its multiplier, and nothing else (no other module, layer or column); else exit 3.
* ``--base``: recovered neurons and multipliers (exit 4 when they are constant scalings, 5 otherwise).
* no base: the adapter's shape alone: adapted modules, and whether A selects single neurons (exit 4).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.errors import CnaError
from ..core.settings.audit import AuditSettings
from .report import ManifestCheck, Provenance
from .verdict import AdapterDiff, AdapterShape, ManifestResult

if TYPE_CHECKING:
    from ..core.manifest import ExportManifest

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|blk)\.(\d+)\.")


def adapter_kind(spec: str) -> str | None:
    """``lora`` for a PEFT adapter folder, ``gguf_lora`` for a GGUF whose ``general.type`` is adapter, else None."""
    p = Path(spec)
    if p.is_dir() and (p / "adapter_config.json").is_file():
        return "lora"
    if p.is_file() and p.suffix.lower() == ".gguf":
        from ..io import gguf as G

        try:
            if G.field_value(G.open_gguf(p), "general.type") == "adapter":
                return "gguf_lora"
        except CnaError:
            return None
    return None


@dataclass
class AdaptedWeight:
    """One adapted weight: its layer, whether it is a down projection, and ``scale * B A`` (HF orientation)."""

    name: str
    layer: int | None
    is_down: bool
    a: np.ndarray  # [rank, in]
    b: np.ndarray  # [out, rank]
    scale: float
    dtype: str

    def columns(self) -> list[int]:
        """The input columns the update changes (those A reads with a nonzero effect)."""
        eff = self.b @ self.a  # [out, in]
        return [int(j) for j in np.flatnonzero(np.any(eff != 0, axis=0))]

    def column(self, j: int) -> np.ndarray:
        return self.scale * (self.b.astype(np.float64) @ self.a[:, j].astype(np.float64))


@dataclass
class Adapter:
    kind: str  # lora | gguf_lora
    spec: str
    path: Path
    weights: list[AdaptedWeight]
    manifest: ExportManifest | None = None
    where: str = ""  # where the embedded manifest was read


def read_adapter(spec: str) -> Adapter:
    """The adapted weights of a PEFT folder or a LoRA GGUF, with the embedded manifest when there is one."""
    kind = adapter_kind(spec)
    p = Path(spec)
    if kind == "lora":
        return Adapter(kind, spec, p, *_read_peft(p))
    if kind == "gguf_lora":
        return Adapter(kind, spec, p, *_read_gguf_lora(p))
    raise CnaError(f"{spec} is not a LoRA adapter (a PEFT folder or a LoRA GGUF)")


def _read_peft(p: Path) -> tuple[list[AdaptedWeight], ExportManifest | None, str]:
    """A PEFT adapter folder: its adapted weights (scale from ``adapter_config.json``) and its manifest."""
    from safetensors.numpy import load_file

    from ..core.manifest import MANIFEST_FILE, ExportManifest

    config = json.loads((p / "adapter_config.json").read_text("utf-8"))  # PEFT's format
    files = sorted(p.glob("adapter_model*.safetensors"))
    if not files:
        raise CnaError(f"{p} has no adapter_model.safetensors (pickled .bin adapters are not read)")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        tensors.update(_load_safetensors(f, load_file))
    weights: list[AdaptedWeight] = []
    for key in sorted(tensors):
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        bkey = module + ".lora_B.weight"
        if bkey not in tensors:
            raise CnaError(f"{p}: {key} has no lora_B")
        a, b = tensors[key], tensors[bkey]
        short = module.removeprefix("base_model.model.")
        rank = _pattern(config.get("rank_pattern"), short, config.get("r", int(a.shape[0])))
        alpha = _pattern(config.get("alpha_pattern"), short, config.get("lora_alpha", rank))
        scale = alpha / (rank ** 0.5 if config.get("use_rslora") else rank)
        m = _LAYER.search(short)
        weights.append(AdaptedWeight(short + ".weight", int(m.group(1)) if m else None, short.endswith("down_proj"),
                                     a.astype(np.float32), b.astype(np.float32), float(scale), str(a.dtype)))
    others = [k for k in tensors if ".lora_" not in k]
    if others:
        weights.append(AdaptedWeight(others[0], None, False, np.zeros((0, 0)), np.zeros((0, 0)), 1.0, "?"))
    manifest = ExportManifest.load(p) if (p / MANIFEST_FILE).is_file() else None
    return weights, manifest, str(p / MANIFEST_FILE) if manifest else ""


def _read_gguf_lora(p: Path) -> tuple[list[AdaptedWeight], ExportManifest | None, str]:
    """A llama.cpp LoRA GGUF: its adapted weights (scale alpha / rank) and its manifest KV."""
    from ..core.manifest import GGUF_KEY, ExportManifest
    from ..io import gguf as G

    reader = G.open_gguf(p)
    alpha = G.field_value(reader, "adapter.lora.alpha") or 0.0
    tmap = G.tensor_map(reader)
    weights: list[AdaptedWeight] = []
    for name in sorted(tmap):
        if not name.endswith(".lora_a"):
            continue
        base = name[: -len(".lora_a")]
        bt = tmap.get(base + ".lora_b")
        if bt is None:
            raise CnaError(f"{p}: {name} has no lora_b")
        at = tmap[name]
        a = np.asarray(at.data).reshape(G.np_shape(at)).astype(np.float32)
        b = np.asarray(bt.data).reshape(G.np_shape(bt)).astype(np.float32)
        scale = float(alpha) / int(a.shape[0]) if alpha else 1.0
        m = _LAYER.search(base)
        weights.append(AdaptedWeight(base, int(m.group(1)) if m else None, ".ffn_down." in base, a, b, scale,
                                     G.type_name(at)))
    text = G.field_value(reader, GGUF_KEY)
    manifest = ExportManifest.from_json(text, source=f"{p} ({GGUF_KEY})") if text else None
    return weights, manifest, f"{GGUF_KEY} KV" if manifest else ""


def _load_safetensors(f: Path, load_file: Any) -> dict[str, np.ndarray]:
    try:
        return load_file(str(f))
    except (TypeError, ValueError):  # bfloat16 has no numpy dtype
        from safetensors.torch import load_file as load_torch

        return {k: v.float().numpy() for k, v in load_torch(str(f)).items()}


def _pattern(pattern: Any, module: str, default: Any) -> float:
    if isinstance(pattern, dict):
        for key, value in pattern.items():
            if module == key or module.endswith("." + key) or re.search(key, module):
                return float(value)
    return float(default)


@dataclass
class ColumnFit:
    """How a changed down_proj column fits a neuron scaling of the base's column."""

    multiplier: float  # least squares
    residual: float  # relative to the column's norm
    scaling: bool  # a constant scaling within the adapter dtype's rounding
    tol: float


def recovered(adapter: Adapter, base_spec: str, rel_tol: float | None = None) -> dict[tuple[int, int], ColumnFit]:
    """For each changed down_proj column: the multiplier explaining it and whether it is a constant scaling."""
    from ..io.weights import open_weights

    src = open_weights(base_spec)
    out: dict[tuple[int, int], ColumnFit] = {}
    try:
        for w in adapter.weights:
            if not w.is_down or w.layer is None:
                continue
            entry = src.find("ffn_down", w.layer)
            if entry is None:
                raise CnaError(f"the base {base_spec} has no down_proj in layer {w.layer}")
            base = src.read(entry).astype(np.float64)
            if base.shape[1] != w.a.shape[1] or base.shape[0] != w.b.shape[0]:
                raise CnaError(f"the adapter does not fit {base_spec}: layer {w.layer} down_proj is "
                               f"{list(base.shape)}, the adapter is for [{w.b.shape[0]}, {w.a.shape[1]}]")
            tol = rel_tol if rel_tol is not None else (1e-5 if w.dtype in ("float32", "F32") else 2e-3)
            for j in w.columns():
                col, d = base[:, j], w.column(j)
                nn = float(col @ col)
                m = 1.0 + float(d @ col) / nn if nn > 0 else float("nan")
                resid = float(np.linalg.norm(d - (m - 1.0) * col) / max(np.sqrt(nn), 1e-30))
                out[(w.layer, j)] = ColumnFit(multiplier=m, residual=resid, scaling=resid <= tol, tol=tol)
    finally:
        src.close()
    return out


def describe_adapter(ad: Adapter) -> str:
    kind = "PEFT LoRA adapter" if ad.kind == "lora" else "llama.cpp LoRA adapter GGUF"
    return f"{kind} {ad.path}: {len(ad.weights)} adapted weights"


def adapter_provenance(ad: Adapter) -> Provenance:
    """The adapter's embedded manifest (no marks are looked for in an adapter)."""
    from .manifest_check import manifest_summary

    summary = manifest_summary(ad.manifest, ad.where, "phrase") if ad.manifest is not None else None
    return Provenance(marks=None, manifest=summary)


def check_adapter_manifest(ad: Adapter, settings: AuditSettings, notes: list[str]) -> ManifestResult:
    """``--manifest``: the adapter changes exactly the manifest's neurons, each by its multiplier, nothing else."""
    from .manifest_check import manifest_base

    manifest, where = _adapter_manifest(ad, settings.manifest or "embedded")
    base_spec = settings.base or manifest_base(manifest)
    if settings.base is None:
        notes.append(f"base taken from the manifest: {base_spec}")
    _check_base(base_spec, manifest)
    found = recovered(ad, base_spec)
    want = {k: v for k, v in manifest.multiplier_map().items() if v != 1.0}
    problems = [f"the adapter changes {w.name}, which the manifest does not touch" for w in ad.weights if not w.is_down]
    for key, mult in sorted(want.items()):
        got = found.get(key)
        if got is None:
            problems.append(f"neuron {key[0]}:{key[1]} is not changed (the manifest scales it by x{mult:g})")
        elif not got.scaling or abs(got.multiplier - mult) > max(got.tol, 1e-6) * max(1.0, abs(mult)):
            problems.append(f"neuron {key[0]}:{key[1]} is scaled by x{got.multiplier:.6g} (residual "
                            f"{got.residual:.2e}), the manifest says x{mult:g}")
    extra = sorted(set(found) - set(want))
    if extra:
        problems.append(f"{len(extra)} neurons are changed but not listed (e.g. {extra[0][0]}:{extra[0][1]})")
    downs = sum(w.is_down for w in ad.weights)
    check = ManifestCheck(
        where=where, passed=not problems, expected_neurons=len(want), recovered_neurons=len(found),
        fold=manifest.fold, problems=problems,
        notes=[f"base {base_spec}: its down_proj tensors are those the adapter was computed from (sha256_before)",
               f"{downs} adapted down_proj weights, {len(found)} changed columns"])
    return ManifestResult(check=check, multipliers=list(want.values()), adapter=True)


def _adapter_manifest(ad: Adapter, spec: str) -> tuple[ExportManifest, str]:
    from ..core.manifest import ExportManifest

    if spec == "embedded":
        if ad.manifest is None:
            raise CnaError(f"{ad.spec} has no embedded cna-export manifest; pass --manifest FILE")
        manifest, where = ad.manifest, ad.where
    else:
        if not Path(spec).exists():
            raise CnaError(f"manifest not found: {spec}")
        manifest, where = ExportManifest.load(spec), spec
    if manifest.format not in ("lora", "gguf_lora"):
        raise CnaError(f"the manifest describes a {manifest.format} export, not a LoRA adapter")
    return manifest, where


def adapter_diff(ad: Adapter, base_spec: str) -> AdapterDiff:
    """``--base``: the neurons the adapter scales, and the changes that are no neuron scaling."""
    found = recovered(ad, base_spec)
    scaled = {k: round(v.multiplier, 6) for k, v in found.items() if v.scaling}
    return AdapterDiff(scaled=scaled, odd=len(found) - len(scaled), other=[w.name for w in ad.weights if not w.is_down])


def adapter_shape(ad: Adapter) -> AdapterShape:
    """No base: whether every adapted weight is a down_proj whose A selects single neurons."""
    downs = [w for w in ad.weights if w.is_down]
    return AdapterShape(one_hot=all(_one_hot(w.a) for w in downs) and len(downs) == len(ad.weights),
                        columns=sum(len(w.columns()) for w in downs),
                        layers=sorted({w.layer for w in downs if w.layer is not None}), weights=len(ad.weights))


def _one_hot(a: np.ndarray) -> bool:
    nz = a != 0
    return bool(np.all(nz.sum(axis=1) <= 1) and np.all(a[nz] == 1))


def _check_base(base_spec: str, manifest: Any) -> None:
    """The wrong base is bad input (CnaError, exit 2): its tensors must hash to the manifest's sha256_before."""
    from ..io.sources import resolve_source

    if manifest.format == "gguf_lora":
        from ..io import gguf as G
        from ..verification.gguf_lora import check_base

        src = resolve_source(base_spec)
        if src.kind != "gguf" or src.path is None:
            raise CnaError(f"a llama.cpp LoRA adapter applies to a GGUF base; {base_spec} is not one")
        check_base(G.open_gguf(src.path), manifest, src.path)
    else:
        from ..verification.lora import check_lora_base

        check_lora_base(base_spec, manifest)
