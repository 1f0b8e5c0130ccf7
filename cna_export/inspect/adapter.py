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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import CnaError
from ..core.multipliers import describe_multipliers

EXIT_CLEAN = 0  # audit's exit codes (docs/exit-codes.md); inspect.audit re-exports them
EXIT_MANIFEST_FAILED = 3
EXIT_STEERED = 4
EXIT_OTHER_CHANGES = 5

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
    kind: str
    path: Path
    weights: list[AdaptedWeight]
    manifest: Any = None
    where: str = ""
    notes: list[str] = field(default_factory=list)


def read_adapter(spec: str) -> Adapter:
    """The adapted weights of a PEFT folder or a LoRA GGUF, with the embedded manifest when there is one."""
    from ..core.manifest import MANIFEST_FILE, ExportManifest

    kind = adapter_kind(spec)
    p = Path(spec)
    weights: list[AdaptedWeight] = []
    if kind == "lora":
        from safetensors.numpy import load_file

        config = json.loads((p / "adapter_config.json").read_text("utf-8"))
        files = sorted(p.glob("adapter_model*.safetensors"))
        if not files:
            raise CnaError(f"{p} has no adapter_model.safetensors (pickled .bin adapters are not read)")
        tensors: dict[str, np.ndarray] = {}
        for f in files:
            tensors.update({k: v for k, v in _load_safetensors(f, load_file).items()})
        for key in sorted(tensors):
            if not key.endswith(".lora_A.weight"):
                continue
            module = key[: -len(".lora_A.weight")]
            bkey = module + ".lora_B.weight"
            if bkey not in tensors:
                raise CnaError(f"{p}: {key} has no lora_B")
            a, b = tensors[key], tensors[bkey]
            short = module.removeprefix("base_model.model.")
            r = int(a.shape[0])
            rank = _pattern(config.get("rank_pattern"), short, config.get("r", r))
            alpha = _pattern(config.get("alpha_pattern"), short, config.get("lora_alpha", rank))
            scale = alpha / (rank ** 0.5 if config.get("use_rslora") else rank)
            m = _LAYER.search(short)
            weights.append(AdaptedWeight(short + ".weight", int(m.group(1)) if m else None,
                                         short.endswith("down_proj"), a.astype(np.float32), b.astype(np.float32),
                                         float(scale), str(a.dtype)))
        others = [k for k in tensors if ".lora_" not in k]
        if others:
            weights.append(AdaptedWeight(others[0], None, False, np.zeros((0, 0)), np.zeros((0, 0)), 1.0, "?"))
        manifest = ExportManifest.load(p) if (p / MANIFEST_FILE).is_file() else None
        where = str(p / MANIFEST_FILE) if manifest else ""
    elif kind == "gguf_lora":
        from ..core.manifest import GGUF_KEY
        from ..io import gguf as G

        reader = G.open_gguf(p)
        alpha = G.field_value(reader, "adapter.lora.alpha") or 0.0
        tmap = G.tensor_map(reader)
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
            rank = int(a.shape[0])
            scale = float(alpha) / rank if alpha else 1.0
            m = _LAYER.search(base)
            weights.append(AdaptedWeight(base, int(m.group(1)) if m else None, ".ffn_down." in base, a, b, scale,
                                         G.type_name(at)))
        text = G.field_value(reader, GGUF_KEY)
        manifest = ExportManifest.from_json(text, source=f"{p} ({GGUF_KEY})") if text else None
        where = f"{GGUF_KEY} KV" if manifest else ""
    else:
        raise CnaError(f"{spec} is not a LoRA adapter (a PEFT folder or a LoRA GGUF)")
    return Adapter(kind, p, weights, manifest, where)


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


def recovered(adapter: Adapter, base_spec: str, rel_tol: float | None = None) -> dict[tuple[int, int], dict]:
    """For each changed down_proj column: the multiplier explaining it and whether it is a constant scaling."""
    from ..io.weights import open_weights

    src = open_weights(base_spec)
    out: dict[tuple[int, int], dict] = {}
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
                out[(w.layer, j)] = {"multiplier": m, "residual": resid, "scaling": resid <= tol, "tol": tol}
    finally:
        src.close()
    return out


def audit_adapter(suspect: str, settings: Any, report: Any, base_of: Any) -> Any:
    """Fill ``report`` (an :class:`~cna_export.inspect.audit.AuditReport`) for an adapter suspect.
    ``base_of(manifest)`` resolves the base of the manifest check when ``--base`` is not given."""
    from ..core.manifest import ExportManifest

    ad = read_adapter(suspect)
    downs = [w for w in ad.weights if w.is_down]
    other = [w.name for w in ad.weights if not w.is_down]
    report.suspect["description"] = (f"{'PEFT LoRA adapter' if ad.kind == 'lora' else 'llama.cpp LoRA adapter GGUF'} "
                                     f"{ad.path}: {len(ad.weights)} adapted weights")
    if ad.manifest is not None:
        m = ad.manifest
        report.provenance["manifest"] = {"where": ad.where, "tool_version": m.tool_version, "format": m.format,
                                         "source": m.source, "fold": m.fold, "neurons": len(m.multipliers),
                                         "multipliers": describe_multipliers(m.multiplier_map(), "phrase")}
    if settings.manifest:
        if settings.manifest == "embedded":
            if ad.manifest is None:
                raise CnaError(f"{suspect} has no embedded cna-export manifest; pass --manifest FILE")
            manifest, where = ad.manifest, ad.where
        else:
            if not Path(settings.manifest).exists():
                raise CnaError(f"manifest not found: {settings.manifest}")
            manifest, where = ExportManifest.load(settings.manifest), settings.manifest
        if manifest.format not in ("lora", "gguf_lora"):
            raise CnaError(f"the manifest describes a {manifest.format} export, not a LoRA adapter")
        base_spec = settings.base or base_of(manifest)
        if settings.base is None:
            report.notes.append(f"base taken from the manifest: {base_spec}")
        _check_base(base_spec, manifest)
        found = recovered(ad, base_spec)
        want = {k: v for k, v in manifest.multiplier_map().items() if v != 1.0}
        problems: list[str] = []
        for name in other:
            problems.append(f"the adapter changes {name}, which the manifest does not touch")
        for key, mult in sorted(want.items()):
            got = found.get(key)
            if got is None:
                problems.append(f"neuron {key[0]}:{key[1]} is not changed (the manifest scales it by x{mult:g})")
            elif not got["scaling"] or abs(got["multiplier"] - mult) > max(got["tol"], 1e-6) * max(1.0, abs(mult)):
                problems.append(f"neuron {key[0]}:{key[1]} is scaled by x{got['multiplier']:.6g} (residual "
                                f"{got['residual']:.2e}), the manifest says x{mult:g}")
        extra = sorted(set(found) - set(want))
        if extra:
            problems.append(f"{len(extra)} neurons are changed but not listed (e.g. {extra[0][0]}:{extra[0][1]})")
        report.manifest_check = {
            "where": where, "passed": not problems, "expected_neurons": len(want), "recovered_neurons": len(found),
            "fold": manifest.fold, "problems": problems,
            "notes": [(f"base {base_spec}: its down_proj tensors are those the adapter was computed from "
                       "(sha256_before)"), f"{len(downs)} adapted down_proj weights, {len(found)} changed columns"],
        }
        if problems:
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            report.verdict, report.exit_code = f"manifest check FAILED: {problems[0]}{more}", EXIT_MANIFEST_FAILED
        else:
            report.verdict = (f"manifest check passed: the adapter changes exactly the manifest's {len(want)} neurons, "
                              f"by its {describe_multipliers(list(want.values()), 'phrase')}, nothing else")
            report.exit_code = EXIT_CLEAN
        report.findings = [report.verdict]
        return report
    if settings.base:
        found = recovered(ad, settings.base)
        scaled = {k: round(v["multiplier"], 6) for k, v in found.items() if v["scaling"]}
        odd = len(found) - len(scaled)
        parts = []
        if scaled:
            parts.append(f"LoRA adapter with CNA neuron steering ({describe_multipliers(list(scaled.values()), 'action')}): "
                         f"{len(scaled)} neurons in layers {sorted({k[0] for k in scaled})}, "
                         f"{describe_multipliers(list(scaled.values()), 'phrase')}")
        if odd or other:
            parts.append(f"LoRA adapter changes {odd} down_proj columns and {len(other)} other weights that are not "
                         "neuron scalings")
        report.findings = parts
        report.exit_code = EXIT_STEERED if scaled else (EXIT_OTHER_CHANGES if parts else EXIT_CLEAN)
        report.verdict = "; ".join(parts) or "the adapter changes nothing"
        return report
    one_hot = all(_one_hot(w.a) for w in downs) and not other
    cols = sum(len(w.columns()) for w in downs)
    layers = sorted({w.layer for w in downs if w.layer is not None})
    if one_hot and cols:
        report.verdict = (f"LoRA adapter selecting {cols} single MLP neurons in the down_proj of layers {layers}: "
                          "CNA-style neuron steering (pass --base to recover the multipliers)")
        report.exit_code = EXIT_STEERED
    else:
        report.verdict = f"LoRA adapter on {len(ad.weights)} weights (not a neuron-selecting CNA adapter)"
        report.exit_code = EXIT_OTHER_CHANGES if ad.weights else EXIT_CLEAN
    report.findings = [report.verdict]
    return report


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
