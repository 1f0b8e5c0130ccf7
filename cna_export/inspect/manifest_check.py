"""``audit --manifest``: exactly the manifest's neurons changed, each by exactly its multiplier within the
storage format's tolerance, in the tensors its fold names, and nothing else; and what an embedded manifest
says about the checkpoint (provenance)."""

from __future__ import annotations

import math
from pathlib import Path

from ..core.errors import CnaError
from ..core.manifest import ExportManifest
from ..core.multipliers import describe_multipliers
from ..io.weights import WeightSource
from .compare import Expectation
from .diff_report import DiffReport
from .report import ManifestCheck, ManifestSummary, Provenance

ALLOWED_KV_CHANGES = ("general.name", "cna.manifest")
ALLOWED_FILE_CHANGES = ("cna_manifest.json", "README.md")


def manifest_summary(manifest: ExportManifest, where: str, style: str) -> ManifestSummary:
    """What a manifest claims, for the report (``style``: how its multipliers are written)."""
    return ManifestSummary(where=where, tool_version=manifest.tool_version, format=manifest.format,
                           source=manifest.source, fold=manifest.fold, neurons=len(manifest.multipliers),
                           multipliers=describe_multipliers(manifest.multiplier_map(), style))


def provenance(src: WeightSource) -> tuple[Provenance, ExportManifest | None]:
    """What the checkpoint says about itself: an embedded export manifest, shard marks, a steered name."""
    out = Provenance()
    manifest = None
    try:
        found = src.embedded_manifest()
    except CnaError as e:
        out.manifest_error = str(e)
        found = None
    if found is not None:
        manifest, where = found
        out.manifest = manifest_summary(manifest, where, "tally")
    out.marks = _marks(src)
    return out, manifest


def _marks(src: WeightSource) -> list[str]:
    if src.kind == "hf":
        return [f"shard {shard} carries a cna_export header entry: {text[:120]}"
                for shard, text in getattr(src, "shard_marks", lambda: {})().items()]
    from ..core.manifest import STEERED_SUFFIX
    from ..io import gguf as G

    name = G.field_value(src.reader, "general.name")  # type: ignore[attr-defined]
    return [f"general.name is '{name}'"] if isinstance(name, str) and name.endswith(STEERED_SUFFIX) else []


def load_manifest(spec: str, suspect: WeightSource) -> tuple[ExportManifest, str]:
    """The manifest ``--manifest`` names (``embedded``: the suspect's own) and where it was read."""
    if spec == "embedded":
        found = suspect.embedded_manifest()
        if found is None:
            raise CnaError(f"{suspect.spec} has no embedded cna-export manifest; pass --manifest FILE")
        return found
    p = Path(spec)
    if p.is_dir() or p.is_file():
        return ExportManifest.load(p), str(p)
    raise CnaError(f"manifest not found: {spec}")


def manifest_base(manifest: ExportManifest) -> str:
    """The model a manifest's export was made from, when it is on this machine: a GGUF adapter's recorded
    base file first (still there with its recorded size), else the manifest's source."""
    from ..io.sources import resolve_source

    local = manifest.base_file.local() if manifest.base_file is not None else None
    if local is not None:
        return str(local)
    try:
        src = resolve_source(manifest.source)
        if src.kind == "hub" or src.path is None:
            raise CnaError("not local")
    except CnaError:
        raise CnaError(f"the manifest check needs the model the export was made from ({manifest.source}, not found "
                       "on this machine); pass --base") from None
    return manifest.source


def expectation(manifest: ExportManifest, base: WeightSource) -> Expectation:
    """The slices the manifest's fold must have scaled, in the base's tensors."""
    role = "ffn_down" if manifest.fold == "down" else "ffn_up"
    slices: dict[int, dict[int, float]] = {}
    for key, m in manifest.multiplier_map().items():
        if m == 1.0 or len(key) == 3:  # expert neurons: checked by _check_manifest_experts
            continue
        layer, index = key
        if layer >= base.num_layers:
            raise CnaError(f"the manifest names layer {layer}; the base has {base.num_layers} layers")
        down = base.find("ffn_down", layer)
        n_ff = int(down.shape[1]) if down is not None else 0
        if index >= n_ff:
            raise CnaError(f"the manifest names neuron {index} of layer {layer}; the base has {n_ff} neurons per layer")
        slot = index if role == "ffn_down" else base.arch.up_row(index, n_ff)
        slices.setdefault(layer, {})[slot] = float(m)
    return Expectation(role=role, slices=slices)


def check_manifest(manifest: ExportManifest, where: str, suspect: WeightSource, base: WeightSource,
                   diff: DiffReport, expect: Expectation) -> ManifestCheck:
    """Exactly the manifest's neurons changed, by exactly its multipliers, and nothing else."""
    if any(len(k) == 3 for k in manifest.multiplier_map()):
        return _check_manifest_experts(manifest, where, suspect, base, diff)
    notes: list[str] = []
    mults = {k: v for k, v in manifest.multiplier_map().items() if v != 1.0}
    same_format = suspect.kind == base.kind
    problems = _scaling_problems(expect, diff, base)
    problems += _change_problems(diff, expect, mults, same_format, notes)
    problems += _metadata_problems(diff, suspect.kind, same_format=True)
    if not same_format:
        notes.append("base and suspect are in different formats: metadata not compared, values compared within "
                     "the storage formats' tolerance")
    problems += _hash_problems(manifest, suspect, base, notes)
    found_only = sorted(set(diff.neurons) - set(mults))
    if found_only and not any("does not list" in p for p in problems):
        problems.append(f"{len(found_only)} neurons are scaled in the suspect but not listed (e.g. "
                        f"{found_only[0][0]}:{found_only[0][1]})")
    return ManifestCheck(where=where, passed=not problems, expected_neurons=len(mults),
                         recovered_neurons=len(diff.neurons), fold=manifest.fold, problems=problems, notes=notes)


def _scaling_problems(expect: Expectation, diff: DiffReport, base: WeightSource) -> list[str]:
    """Every expected slice scaled by its multiplier."""
    problems = []
    for layer, slots in sorted(expect.slices.items()):
        for slot, m in sorted(slots.items()):
            ok = expect.results.get((layer, slot))
            if ok is None:
                problems.append(f"layer {layer}: the {expect.role} tensor was not found, so neuron slot {slot} is "
                                "unchecked")
            elif not ok:
                neuron = _neuron_of(slot, layer, base, expect.role)
                got = diff.neurons.get((layer, neuron))
                problems.append(f"neuron {layer}:{neuron} is not scaled by x{m:g}"
                                + (f" (found x{got:g})" if got is not None else " (no constant scaling found)"))
    return problems


def _change_problems(diff: DiffReport, expect: Expectation, mults: dict, same_format: bool,
                     notes: list[str]) -> list[str]:
    """Nothing changed but the fold's tensors in the manifest's layers, and in them only its neurons."""
    problems = []
    fold_layers = set(expect.slices)
    for t in diff.tensors:
        if not t.differs:
            continue
        if t.status in ("only_a", "only_b", "shape_mismatch"):
            msg = f"tensor {t.name} " + {"only_a": "is missing from the suspect", "only_b": "was added",
                                          "shape_mismatch": f"changed shape {t.shape_a} -> {t.shape_b}"}[t.status]
            if same_format or t.status == "shape_mismatch":
                problems.append(msg)
            else:
                notes.append(msg + " (tensor sets differ between the two formats)")
            continue
        if not (t.layer in fold_layers and t.role == expect.role):  # (an up bias has the up role too)
            problems.append(f"tensor {t.name} changed (relative change {t.rel_change:.2e}) but the manifest does "
                            "not touch it")
            continue
        if t.unexplained:
            problems.append(f"tensor {t.name} has {t.unexplained} changed slices that are not a constant scaling")
        extra = sorted(set(t.scaled) - {j for (layer, j) in mults if layer == t.layer})
        if extra:
            problems.append(f"tensor {t.name} scales {len(extra)} neurons the manifest does not list (e.g. "
                            f"{t.layer}:{extra[0]})")
    for layer in sorted(fold_layers):
        if not any(t.layer == layer and t.role == expect.role for t in diff.tensors):
            problems.append(f"layer {layer} has no {expect.role} tensor in one of the checkpoints")
    return problems


def _metadata_problems(diff: DiffReport, suspect_kind: str, same_format: bool) -> list[str]:
    """Metadata differences other than the export's own (its name and manifest)."""
    allowed = ALLOWED_KV_CHANGES if suspect_kind == "gguf" else ALLOWED_FILE_CHANGES
    return [f"metadata: {m}" for m in diff.metadata_differences
            if same_format and not any(f" {k} " in f" {m} " for k in allowed)]


def _hash_problems(manifest: ExportManifest, suspect: WeightSource, base: WeightSource, notes: list[str]) -> list[str]:
    """The touched tensors hold the bytes the manifest recorded (after; and before, in the base)."""
    if manifest.format != ("gguf" if suspect.kind == "gguf" else "safetensors"):
        notes.append(f"the manifest describes a {manifest.format} export; the suspect's tensor hashes are not "
                     "comparable")
        return []
    problems = []
    for tt in manifest.tensors:
        e = suspect.entries.get(tt.name)
        if e is None:
            problems.append(f"the manifest's tensor {tt.name} is not in the suspect")
        elif suspect.sha256(e) != tt.sha256_after:
            problems.append(f"tensor {tt.name} does not hold the bytes the manifest recorded (sha256_after)")
    base_format = "gguf" if base.kind == "gguf" else "hf"
    if base.kind == suspect.kind and (manifest.source_format == base_format or
                                     (base_format == "hf" and manifest.source_format == "hub")):
        for tt in manifest.tensors:
            e = base.entries.get(tt.name)
            if e is not None and base.sha256(e) != tt.sha256_before:
                problems.append(f"the base's {tt.name} is not the tensor the export was made from (sha256_before)")
    else:
        notes.append("sha256_before not checked: the base is not in the format the export was folded in")
    return problems


def _check_manifest_experts(manifest: ExportManifest, where: str, suspect: WeightSource, base: WeightSource,
                            diff: DiffReport) -> ManifestCheck:
    """:func:`check_manifest` for a mixture-of-experts export: the neurons the diff recovers, as
    (layer, expert, index), are exactly the manifest's with its multipliers (within the fold's
    rounding), only the manifest's tensors changed, and their bytes are the recorded ones."""
    from ..core.experts import format_key

    problems: list[str] = []
    mults = {k: v for k, v in manifest.multiplier_map().items() if v != 1.0}
    for key, m in sorted(mults.items()):
        got = diff.neurons.get(key)
        if got is None or not math.isclose(got, m, rel_tol=2e-3, abs_tol=1e-6):
            problems.append(f"neuron {format_key(key)} is not scaled by x{m:g}"
                            + (f" (found x{got:g})" if got is not None else " (no constant scaling found)"))
    extra = sorted(set(diff.neurons) - set(mults))
    if extra:
        problems.append(f"{len(extra)} neurons are scaled in the suspect but not listed (e.g. {format_key(extra[0])})")
    listed = {t.name for t in manifest.tensors}
    same_format = suspect.kind == base.kind
    for t in diff.tensors:
        if not t.differs:
            continue
        if same_format and t.name not in listed:
            problems.append(f"tensor {t.name} changed but the manifest does not touch it")
        elif t.unexplained:
            problems.append(f"tensor {t.name} has {t.unexplained} changed slices that are not a constant scaling")
    problems += _metadata_problems(diff, suspect.kind, same_format)
    if same_format and manifest.format == ("gguf" if suspect.kind == "gguf" else "safetensors"):
        for tt in manifest.tensors:
            e = suspect.entries.get(tt.name)
            if e is None or suspect.sha256(e) != tt.sha256_after:
                problems.append(f"tensor {tt.name} does not hold the bytes the manifest recorded (sha256_after)")
    return ManifestCheck(where=where, passed=not problems, expected_neurons=len(mults),
                         recovered_neurons=len(diff.neurons), fold=manifest.fold, problems=problems,
                         notes=["mixture-of-experts export: checked neuron by neuron as (layer, expert, index)"])


def _neuron_of(slot: int, layer: int, base: WeightSource, role: str) -> int:
    if role == "ffn_up" and base.arch.fused_gate_up:
        down = base.find("ffn_down", layer)
        n_ff = int(down.shape[1]) if down is not None else 0
        return slot - n_ff if slot >= n_ff else slot
    return slot
