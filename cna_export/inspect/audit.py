"""Audit a checkpoint: did someone strip the refusals out of it, and how?

``audit(suspect, settings)`` runs in one of three modes:

``manifest`` (``--manifest [FILE]``; the manifest may be embedded: ``cna_manifest.json``
    in a safetensors folder, the ``cna.manifest`` KV or side file of a GGUF)
    The suspect is compared with the model the export was made from (``--base``,
    else the manifest's ``source`` when it resolves on this machine): exactly the
    manifest's neurons must have changed, each by exactly its multiplier within the
    tolerance of the storage format, in the tensors its fold names, and nothing
    else (other tensors, GGUF KV pairs other than ``general.name`` and
    ``cna.manifest``, folder files other than the manifest and the model card). The
    touched tensors' sha256 are checked against the manifest as well.

``base`` (``--base BASE``)
    :func:`cna_export.inspect.diff.diff_sources` against the base, which recovers scaled
    neurons (with multipliers) and rank-1 directional edits; the overlap of the
    recovered neurons with the refusal circuit discovered on the base with the
    bundled recipe (``recipes/refusal.yaml``, or ``--recipe``/``--circuit``); and a
    short behavioural check (refusal rate on a few of the recipe's harmful prompts,
    base vs suspect, greedy, judged by the paper's keyword judge).

``base-free`` (no base)
    Signals readable from the suspect alone: ``down_proj`` columns, ``up_proj`` rows
    and ``gate_proj`` rows with (near-)zero norm (trained models have none: norms
    below ``zero_threshold`` x the layer's median are flagged); a residual direction
    that the residual-writing matrices annihilate (smallest eigenvalue of
    ``sum W W^T`` over ``o_proj`` and ``down_proj``, globally and per layer, far below
    the median eigenvalue); embedded provenance; and the behavioural check.

Exit codes (see ``docs/exit-codes.md``): 0 nothing found (or the manifest check
passed), 3 the manifest check failed, 4 steering edits found, 5 the weights differ
from the base but not by a recognised steering edit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..core.settings import AuditSettings  # noqa: F401  (part of this module's API)
from .diff import DiffReport, Expectation, diff_sources, layer_ranges, neuron_summary
from ..core.circuit import neuron_key
from ..core.errors import CnaError
from ..core.multipliers import describe_multipliers
from ..io.weights import WeightSource, open_weights

from .scan import scan_base_free

log = logging.getLogger(__name__)

from .adapter import EXIT_CLEAN, EXIT_MANIFEST_FAILED, EXIT_OTHER_CHANGES, EXIT_STEERED  # noqa: E402,F401

ALLOWED_KV_CHANGES = ("general.name", "cna.manifest")
ALLOWED_FILE_CHANGES = ("cna_manifest.json", "README.md")


@dataclass
class AuditReport:
    suspect: dict
    mode: str  # manifest | base | base-free
    verdict: str = ""
    exit_code: int = EXIT_CLEAN
    findings: list[str] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    diff: DiffReport | None = None
    manifest_check: dict | None = None
    circuit_overlap: dict | None = None
    behaviour: dict | None = None
    base_free: dict | None = None
    timings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "suspect": self.suspect,
            "mode": self.mode,
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "findings": self.findings,
            "provenance": self.provenance,
            "diff": self.diff.to_dict() if self.diff is not None else None,
            "manifest_check": self.manifest_check,
            "circuit_overlap": self.circuit_overlap,
            "behaviour": self.behaviour,
            "base_free": self.base_free,
            "timings": {k: round(v, 2) for k, v in self.timings.items()},
            "notes": self.notes,
        }

    def render(self) -> str:
        lines = [f"suspect      {self.suspect['description']}", f"mode         {self.mode}"]
        p = self.provenance
        if p.get("manifest"):
            m = p["manifest"]
            lines.append(f"provenance   {m['where']}: cna-export {m['tool_version']} {m['format']} export of "
                         f"{m['source']}, {m['neurons']} neurons, {m['multipliers']}")
        elif p.get("manifest_error"):
            lines.append(f"provenance   unreadable manifest: {p['manifest_error']}")
        for mark in p.get("marks", []):
            lines.append(f"provenance   {mark}")
        if self.diff is not None:
            lines.append("-- diff against " + self.diff.a["description"])
            lines += ["  " + x for x in self.diff.render(top=10).splitlines()[2:]]
            lr = self.diff.lowrank
            if lr is not None and lr.detected:
                lines.append(f"-- directional edit along one residual direction ({lr.kind}; per writer along the "
                             "consensus direction: strength = share of the projection removed, corr = projection "
                             "correlation, rho/z = concentration over noise, cos = own direction vs consensus)")
                lines += ["  " + x for x in lr.table().splitlines()]
                if lr.refusal:
                    lines.append(f"refusal dir  |cos| with the base's refusal direction: best {lr.refusal['best_cos']:.3f} "
                                 f"(layer {lr.refusal['best_layer']}), mean over the edited layers "
                                 f"{lr.refusal['edited_layers_mean_cos'] if lr.refusal['edited_layers_mean_cos'] is not None else float('nan'):.3f} "
                                 f"({lr.refusal['source']})")
        if self.manifest_check is not None:
            mc = self.manifest_check
            lines.append(f"manifest     {mc['where']}: {mc['expected_neurons']} neurons expected, "
                         f"{'passed' if mc['passed'] else 'FAILED'}")
            for prob in mc["problems"][:10]:
                lines.append(f"  problem    {prob}")
            if len(mc["problems"]) > 10:
                lines.append(f"  problem    ... {len(mc['problems']) - 10} more")
            for note in mc["notes"]:
                lines.append(f"  note       {note}")
        if self.circuit_overlap is not None:
            co = self.circuit_overlap
            lines.append(f"refusal      {co['summary']}")
        if self.base_free is not None:
            bf = self.base_free
            lines.append(f"zero norms   {bf['zeroed_total']} neurons with (near-)zero weights"
                         + (f" in layers {layer_ranges(bf['zeroed_layers'])}" if bf["zeroed_layers"] else "")
                         + f" (threshold {bf['zero_threshold']:g} x layer median)")
            g = bf["direction"]
            lines.append(f"direction    smallest/median eigenvalue of sum W W^T: {g['ratio']:.3e} (all writers), "
                         f"per layer min {g['layer_ratio_min']:.3e}; flagged layers: "
                         f"{layer_ranges(g['flagged_layers']) or 'none'} (threshold {bf['direction_threshold']:g})")
            dep = bf.get("depletion")
            if dep is not None:
                noise = ("rounding noise debiased" if dep["debiased"] else
                         f"no rounding-noise model for {', '.join(dep['not_debiased']) or 'its types'}")
                lines.append(f"depletion    layers {dep['window'][0]}-{dep['window'][1]} ({dep['writers']}): "
                             f"smallest/median eigenvalue of the summed Gram {dep['score']:.3f} (threshold "
                             f"{dep['threshold']:g}; {noise}), its direction |cos| {dep['alignment']:.2f} with the "
                             f"refusal direction of layer {dep['direction_layer']} (needs {dep['min_alignment']:g}; "
                             f"{dep['source']})")
                wr = dep["write"]
                lines.append(f"refusal write layers {wr['window'][0]}-{wr['window'][1]} ({wr['writers']}): the model's "
                             f"own refusal direction written at {wr['score']:.2f} x a typical direction's energy "
                             f"(threshold {wr['threshold']:g})")
        if self.behaviour is not None:
            b = self.behaviour
            lines.append(f"behaviour    {b['summary']}")
        for note in self.notes:
            lines.append(f"note         {note}")
        if self.timings:
            lines.append("time         " + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items()))
        lines.append(f"verdict      {self.verdict}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------
# Provenance
# ---------------------------------------------------------------------------


def provenance(src: WeightSource) -> tuple[dict, Any]:
    """What the checkpoint says about itself: an embedded export manifest, shard marks, a steered name."""
    out: dict[str, Any] = {"marks": []}
    manifest = None
    try:
        found = src.embedded_manifest()
    except CnaError as e:
        out["manifest_error"] = str(e)
        found = None
    if found is not None:
        manifest, where = found
        mults = manifest.multiplier_map()
        out["manifest"] = {
            "where": where,
            "tool_version": manifest.tool_version,
            "format": manifest.format,
            "source": manifest.source,
            "fold": manifest.fold,
            "neurons": len(mults),
            "multipliers": describe_multipliers(mults, "tally"),
        }
    if src.kind == "hf":
        for shard, text in getattr(src, "shard_marks", lambda: {})().items():
            out["marks"].append(f"shard {shard} carries a cna_export header entry: {text[:120]}")
    else:
        from ..core.manifest import STEERED_SUFFIX
        from ..io import gguf as G

        name = G.field_value(src.reader, "general.name")  # type: ignore[attr-defined]
        if isinstance(name, str) and name.endswith(STEERED_SUFFIX):
            out["marks"].append(f"general.name is '{name}'")
    return out, manifest


# ---------------------------------------------------------------------------
# Manifest check
# ---------------------------------------------------------------------------


def load_manifest(spec: str, suspect: WeightSource) -> tuple[Any, str]:
    from ..core.manifest import ExportManifest

    if spec == "embedded":
        found = suspect.embedded_manifest()
        if found is None:
            raise CnaError(f"{suspect.spec} has no embedded cna-export manifest; pass --manifest FILE")
        return found
    p = Path(spec)
    if p.is_dir() or p.is_file():
        return ExportManifest.load(p), str(p)
    raise CnaError(f"manifest not found: {spec}")


def expectation(manifest: Any, base: WeightSource) -> Expectation:
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


def check_manifest(manifest: Any, where: str, suspect: WeightSource, base: WeightSource, diff: DiffReport,
                   expect: Expectation) -> dict:
    """Exactly the manifest's neurons changed, by exactly its multipliers, and nothing else."""
    if any(len(k) == 3 for k in manifest.multiplier_map()):
        return _check_manifest_experts(manifest, where, suspect, base, diff)
    problems: list[str] = []
    notes: list[str] = []
    mults = {k: v for k, v in manifest.multiplier_map().items() if v != 1.0}
    same_format = suspect.kind == base.kind
    fold_layers = set(expect.slices)

    # every expected slice scaled by its multiplier
    for layer, slots in sorted(expect.slices.items()):
        for slot, m in sorted(slots.items()):
            ok = expect.results.get((layer, slot))
            if ok is None:
                problems.append(f"layer {layer}: the {expect.role} tensor was not found, so neuron slot {slot} is unchecked")
            elif not ok:
                got = diff.neurons.get((layer, _neuron_of(slot, layer, base, expect.role)))
                problems.append(f"neuron {layer}:{_neuron_of(slot, layer, base, expect.role)} is not scaled by x{m:g}"
                                + (f" (found x{got:g})" if got is not None else " (no constant scaling found)"))
    # nothing else changed
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
        allowed = t.layer in fold_layers and t.role == expect.role
        allowed_bias = t.layer in fold_layers and expect.role == "ffn_up" and t.role == "ffn_up" and t.scale_axis == "element"
        if not (allowed or allowed_bias):
            problems.append(f"tensor {t.name} changed (relative change {t.rel_change:.2e}) but the manifest does not touch it")
            continue
        if t.unexplained:
            problems.append(f"tensor {t.name} has {t.unexplained} changed slices that are not a constant scaling")
        wanted = {j for (l, j) in mults if l == t.layer}
        extra = sorted(set(t.scaled) - wanted)
        if extra:
            problems.append(f"tensor {t.name} scales {len(extra)} neurons the manifest does not list (e.g. {t.layer}:{extra[0]})")
    for layer in sorted(fold_layers):
        if not any(t.layer == layer and t.role == expect.role for t in diff.tensors):
            problems.append(f"layer {layer} has no {expect.role} tensor in one of the checkpoints")
    # metadata
    allowed_meta = ALLOWED_KV_CHANGES if suspect.kind == "gguf" else ALLOWED_FILE_CHANGES
    for m in diff.metadata_differences:
        if not any(f" {k} " in f" {m} " for k in allowed_meta):
            problems.append(f"metadata: {m}")
    if not same_format:
        notes.append("base and suspect are in different formats: metadata not compared, values compared within "
                     "the storage formats' tolerance")
    # hashes of the touched tensors
    if manifest.format == ("gguf" if suspect.kind == "gguf" else "safetensors"):
        entries = suspect.entries
        for tt in manifest.tensors:
            e = entries.get(tt.name)
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
    else:
        notes.append(f"the manifest describes a {manifest.format} export; the suspect's tensor hashes are not comparable")
    found_only = sorted(set(diff.neurons) - set(mults))
    if found_only and not any("does not list" in p for p in problems):
        problems.append(f"{len(found_only)} neurons are scaled in the suspect but not listed (e.g. {found_only[0][0]}:{found_only[0][1]})")
    return {
        "where": where,
        "passed": not problems,
        "expected_neurons": len(mults),
        "recovered_neurons": len(diff.neurons),
        "fold": manifest.fold,
        "problems": problems,
        "notes": notes,
    }


def _check_manifest_experts(manifest: Any, where: str, suspect: WeightSource, base: WeightSource,
                            diff: DiffReport) -> dict:
    """:func:`check_manifest` for a mixture-of-experts export: the neurons the diff recovers, as
    (layer, expert, index), are exactly the manifest's with its multipliers (within the fold's
    rounding), only the manifest's tensors changed, and their bytes are the recorded ones."""
    import math

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
    allowed_meta = ALLOWED_KV_CHANGES if suspect.kind == "gguf" else ALLOWED_FILE_CHANGES
    problems += [f"metadata: {m}" for m in diff.metadata_differences
                 if same_format and not any(f" {k} " in f" {m} " for k in allowed_meta)]
    if same_format and manifest.format == ("gguf" if suspect.kind == "gguf" else "safetensors"):
        for tt in manifest.tensors:
            e = suspect.entries.get(tt.name)
            if e is None or suspect.sha256(e) != tt.sha256_after:
                problems.append(f"tensor {tt.name} does not hold the bytes the manifest recorded (sha256_after)")
    return {"where": where, "passed": not problems, "expected_neurons": len(mults),
            "recovered_neurons": len(diff.neurons), "fold": manifest.fold, "problems": problems,
            "notes": ["mixture-of-experts export: checked neuron by neuron as (layer, expert, index)"]}


def _neuron_of(slot: int, layer: int, base: WeightSource, role: str) -> int:
    if role == "ffn_up" and base.arch.fused_gate_up:
        down = base.find("ffn_down", layer)
        n_ff = int(down.shape[1]) if down is not None else 0
        return slot - n_ff if slot >= n_ff else slot
    return slot


# ---------------------------------------------------------------------------
# Base-free signals
# ---------------------------------------------------------------------------












# ---------------------------------------------------------------------------
# Refusal circuit of the base, behaviour
# ---------------------------------------------------------------------------


def default_recipe() -> Path:
    from ..verification.prompts import recipes_dir

    return recipes_dir() / "refusal.yaml"


def harmful_prompts(recipe: str | Path | None, n: int) -> tuple[list[str], str]:
    """``n`` prompts spread evenly over the recipe's positive (harmful) set."""
    from ..core.settings import load_recipe
    from ..model.prompts import load_prompts

    r = load_recipe(recipe or default_recipe())
    if not r.get("positive"):
        raise CnaError(f"recipe {recipe} names no positive prompt set")
    ps = load_prompts(r["positive"])
    texts = list(ps.texts)
    if n >= len(texts):
        return texts, ps.path
    idx = sorted({int(round(i * (len(texts) - 1) / max(n - 1, 1))) for i in range(n)})
    return [texts[i] for i in idx], ps.path


def refusal_overlap(base_spec: str, recovered: Mapping[tuple[int, int], float], settings: AuditSettings,
                    progress: bool = False) -> dict:
    """How many of the base's refusal-circuit neurons the suspect steers (and ablates)."""
    from ..core.circuit import Circuit

    ranks = None
    same_size = None
    if settings.circuit:
        ref = Circuit.load(settings.circuit)
        source = f"circuit {settings.circuit}"
    else:
        from ..discovery.cna import circuit_size, eligible

        saved, source = base_statistics(base_spec, settings, progress)
        opts = saved.options
        ref = saved.circuit(circuit_size(opts, saved.total_neurons))
        if recovered:
            same = saved.circuit(min(len(recovered), int(eligible(saved.stats, opts).sum())))
            same_size = len({neuron_key(n) for n in same.neurons} & set(recovered))
            ranks = _ranks(saved.stats, opts, recovered)
    ref_set = {neuron_key(n) for n in ref.neurons}  # (layer, index), or (layer, expert, index) for MoE
    K = len(ref_set)
    steered = ref_set & set(recovered)
    ablated = {k for k in steered if recovered[k] == 0.0}
    out = {
        "source": source,
        "circuit_size": K,
        "steered": len(steered),
        "ablated": len(ablated),
        "recovered": len(recovered),
        "same_size_overlap": same_size,
        "ranks": ranks,
    }
    base_share = (same_size / len(recovered)) if (same_size is not None and recovered) else (
        len(steered) / min(len(recovered), K) if recovered and K else 0.0)
    out["refusal_share"] = base_share
    out["is_refusal_circuit"] = bool(recovered) and base_share >= 0.5
    text = f"{len(ablated)} of {K} refusal-circuit neurons ablated, {len(steered)} of {K} steered ({source})"
    if same_size is not None:
        text += f"; {same_size} of the {len(recovered)} recovered neurons are in the base's top-{len(recovered)} refusal ranking"
    if ranks:
        text += f" (median rank {ranks['median']})"
    out["summary"] = text
    return out


def base_statistics(base_spec: str, settings: AuditSettings, progress: bool = False) -> tuple[Any, str]:
    """The base's discovery statistics for the refusal recipe, and where they came from.

    With ``settings.stats`` naming an existing file, that file is read (no model load, no forward
    passes) after checking that it was computed on the base's weights (fingerprint) and with the
    recipe's prompt sets (sha256) and settings; otherwise the statistics are computed with the
    recipe (the base loaded in transformers) and, with ``settings.stats``, saved there for the next
    audit against the same base.
    """
    from ..model.loading import load_model
    from ..core.settings import DiscoverOptions, ModelOptions, build, load_recipe
    from ..evaluation.sweep import compute_stats, load_stats, save_stats

    recipe_path = settings.recipe or default_recipe()
    recipe = load_recipe(recipe_path)
    opts = build(DiscoverOptions, recipe)
    if not opts.positive or not opts.negative:
        raise CnaError(f"recipe {recipe_path} names no positive/negative prompt sets")
    stats_path = Path(settings.stats) if settings.stats else None
    if stats_path is not None and stats_path.is_file():
        saved = load_stats(stats_path)
        src = open_weights(base_spec)
        try:
            base_id = src.identity(fingerprint=True)
        finally:
            src.close()
        problem = _stats_mismatch(saved, base_id, opts)
        if problem is None:  # selection settings (size, excluded layers) come from the recipe, not the file
            return replace(saved, options=opts), f"discovered on the base with {recipe_path} (statistics read from {stats_path})"
        if not settings.overwrite:
            raise CnaError(f"--stats {stats_path} {problem}; pass --overwrite to recompute it, or another file")
    mopts = build(ModelOptions, recipe)
    loaded = load_model(base_spec, **mopts.model_dump())
    saved = compute_stats(loaded, opts, progress=progress)
    del loaded
    if stats_path is not None:
        save_stats(stats_path, saved, overwrite=settings.overwrite)  # an existing file got here only with --overwrite
    return saved, f"discovered on the base with {recipe_path}"


def _stats_mismatch(saved: Any, base_id: Any, opts: Any) -> str | None:
    """Why saved statistics cannot stand for this base and recipe (None: they can)."""
    from ..model.prompts import load_prompts

    if saved.identity.fingerprint and base_id.fingerprint and saved.identity.fingerprint != base_id.fingerprint:
        return f"was computed on other weights ({saved.identity.name})"
    if (saved.identity.num_layers, saved.identity.intermediate_size) != (base_id.num_layers, base_id.intermediate_size):
        return f"has the shape of another model ({saved.identity.name})"
    sel = dict(field=opts.field, column=opts.column, limit=opts.limit)
    wanted = {"positive": load_prompts(opts.positive, **sel), "negative": load_prompts(opts.negative, **sel)}
    if opts.neutral:
        wanted["neutral"] = load_prompts(opts.neutral, limit=opts.limit)
    for name, ps in wanted.items():
        have = saved.prompts.get(name)
        if have is None or have.sha256 != ps.info().sha256:
            return f"was computed with other {name} prompts than the recipe's"
    keys = ("score", "universal_threshold", "universal_top_k", "chat_template", "system_prompt", "max_length")
    diffs = [k for k in keys if getattr(saved.options, k) != getattr(opts, k)]
    if diffs:
        return f"was computed with other settings ({', '.join(diffs)})"
    return None


def _ranks(stats: Any, opts: Any, recovered: Mapping[tuple[int, int], float]) -> dict:
    """Ranks (1 = strongest) of the recovered neurons in the base's refusal ranking (discovery's own order)."""
    from ..discovery.cna import eligible

    scores = stats.scores(opts.score)
    allowed = eligible(stats, opts, scores)
    flat = np.where(allowed, np.abs(scores), -1.0).ravel()
    order = np.argsort(-flat, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(1, order.size + 1)
    width = scores.shape[1]
    layout = getattr(stats, "layout", None)  # MoE: (layer, expert, index) -> the layer's flat index
    flat_of = {k: (k[-1] if len(k) == 2 else layout.flat(k) if layout is not None else None) for k in recovered}
    rs = sorted(int(rank[k[0] * width + f]) for k, f in flat_of.items()
                if f is not None and k[0] < scores.shape[0] and f < width)
    return {"median": int(np.median(rs)) if rs else None, "best": rs[0] if rs else None, "worst": rs[-1] if rs else None,
            "of": int(allowed.sum())}


def behaviour_check(models: Sequence[tuple[str, str]], settings: AuditSettings, progress: bool = False) -> dict:
    """Refusal rate of each (label, spec) on a few harmful prompts of the recipe (greedy, keyword judge)."""
    from ..evaluation.backends import Steering, open_backend
    from ..evaluation.judge import KeywordJudge

    prompts, path = harmful_prompts(settings.recipe, settings.prompts)
    judge = KeywordJudge()
    out: dict[str, Any] = {"prompts_from": path, "prompts": prompts, "max_new_tokens": settings.max_new_tokens,
                           "judge": judge.name, "models": {}}
    for label, spec in models:
        t0 = time.perf_counter()
        backend = open_backend(spec, backend=settings.backend, batch_size=settings.batch_size, threads=settings.threads)
        try:
            gens = backend.generate(prompts, Steering.none(), settings.max_new_tokens)
        finally:
            backend.close()
        verdicts = judge.judge(prompts, [g.text for g in gens])
        out["models"][label] = {
            "spec": spec,
            "backend": backend.name,
            "refused": sum(v.refused for v in verdicts),
            "n": len(prompts),
            "refusal_rate": sum(v.refused for v in verdicts) / len(prompts),
            "answers": [{"text": g.text, "refused": v.refused, "evidence": v.evidence} for g, v in zip(gens, verdicts)],
            "seconds": round(time.perf_counter() - t0, 2),
        }
    parts = [f"{label} {m['refused']}/{m['n']} refused" for label, m in out["models"].items()]
    out["summary"] = ", ".join(parts) + f" ({len(prompts)} harmful prompts from {Path(path).name}, "\
        f"{settings.max_new_tokens} greedy tokens, {judge.name} judge)"
    return out


# ---------------------------------------------------------------------------
# The audit
# ---------------------------------------------------------------------------


def audit(suspect: str, settings: AuditSettings | None = None, progress: bool = False) -> AuditReport:
    """Library entry point (see the module docstring)."""
    s = settings or AuditSettings()
    if s.prompts < 1:
        raise CnaError("--prompts must be at least 1")
    if s.zero_threshold <= 0 or s.direction_threshold <= 0:
        raise CnaError("--zero-threshold and --direction-threshold must be positive")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    from .adapter import adapter_kind, audit_adapter

    if adapter_kind(suspect):  # a LoRA adapter: no weights of its own to diff (inspect/adapter.py)
        report = AuditReport(suspect={"spec": suspect, "description": suspect},
                             mode="manifest" if s.manifest else ("base" if s.base else "base-free"))
        audit_adapter(suspect, s, report, _manifest_base)
        report.timings = {"total": time.perf_counter() - t0}
        return report
    sus = open_weights(suspect)
    base: WeightSource | None = None
    try:
        prov, embedded = provenance(sus)
        mode = "manifest" if s.manifest else ("base" if s.base else "base-free")
        report = AuditReport(suspect={"spec": suspect, "description": sus.describe()}, mode=mode, provenance=prov)
        if s.manifest:
            manifest, where = load_manifest(s.manifest, sus)
            base_spec = s.base
            if base_spec is None:
                try:
                    from ..io.sources import resolve_source

                    src = resolve_source(manifest.source)
                    if src.kind == "hub" or src.path is None:
                        raise CnaError("not local")
                except CnaError:
                    raise CnaError(
                        f"the manifest check needs the model the export was made from ({manifest.source}, not found "
                        "on this machine); pass --base"
                    ) from None
                base_spec = manifest.source
                report.notes.append(f"base taken from the manifest's source: {base_spec}")
            base = open_weights(base_spec)
            expect = expectation(manifest, base)
            report.diff = diff_sources(base, sus, rank1_share=s.rank1_share, expect=expect, progress=progress)
            timings["diff"] = report.diff.seconds
            mc = check_manifest(manifest, where, sus, base, report.diff, expect)
            report.manifest_check = mc
            if mc["passed"]:
                vals = [m for m in manifest.multiplier_map().values() if m != 1.0]
                report.verdict = (f"manifest check passed: exactly the manifest's {mc['expected_neurons']} neurons changed, "
                                  f"by its {describe_multipliers(vals, 'phrase')}, nothing else")
                report.exit_code = EXIT_CLEAN
            else:
                more = f" (+{len(mc['problems']) - 1} more)" if len(mc["problems"]) > 1 else ""
                report.verdict = f"manifest check FAILED: {mc['problems'][0]}{more}"
                report.exit_code = EXIT_MANIFEST_FAILED
            report.findings = [report.verdict]
        elif s.base:
            base = open_weights(s.base)
            diff = diff_sources(base, sus, rank1_share=s.rank1_share, progress=progress, rank_k=s.rank_k)
            report.diff = diff
            timings["diff"] = diff.seconds
            base.close()
            base = None
            lr = diff.lowrank
            if lr is not None and lr.detected and s.refusal_direction:
                from .abliteration import refusal_cosines
                from .refusal_direction import refusal_directions

                t1 = time.perf_counter()
                rd, source = refusal_directions(s.base, s.recipe, s.directions, s.direction_prompts, s.overwrite,
                                                progress)
                lr.refusal = refusal_cosines(lr.direction, rd.directions(), lr.layers, source)
                timings["refusal direction"] = time.perf_counter() - t1
            findings = diff.findings()
            if diff.neurons and s.discover:
                t1 = time.perf_counter()
                try:
                    report.circuit_overlap = refusal_overlap(s.base, diff.neurons, s, progress=progress)
                except CnaError as e:  # the diff stands without the comparison (e.g. a gradient score on MoE)
                    if s.circuit or s.stats and Path(s.stats).is_file():
                        raise
                    report.notes.append(f"base's refusal circuit not compared ({e})")
                timings["refusal circuit"] = time.perf_counter() - t1
            if s.generate:
                t1 = time.perf_counter()
                report.behaviour = behaviour_check([("base", s.base), ("suspect", suspect)], s, progress=progress)
                timings["behaviour"] = time.perf_counter() - t1
            parts = []
            for f in findings:
                if f["kind"] == "cna":
                    vals = list(diff.neurons.values())
                    action = describe_multipliers(vals, "action")
                    co = report.circuit_overlap
                    if co is not None and co["is_refusal_circuit"]:
                        parts.append(f"refusal circuit {action}: CNA, {len(vals)} neurons, "
                                     f"{describe_multipliers(vals, 'phrase')} "
                                     f"({co['ablated'] if action == 'ablated' else co['steered']} of "
                                     f"{co['circuit_size']} refusal-circuit neurons)")
                    else:
                        extra = (f"; {co['steered']} of {co['circuit_size']} refusal-circuit neurons" if co else "")
                        parts.append(f"CNA neuron steering ({action}): {neuron_summary(diff.neurons)}{extra}")
                else:
                    parts.append(f["summary"])
            steered = any(f["kind"] in ("cna", "directional") for f in findings)
            report.findings = parts
            report.exit_code = EXIT_STEERED if steered else (EXIT_OTHER_CHANGES if findings else EXIT_CLEAN)
            report.verdict = "; ".join(parts) if parts else "no steering edits found (weights equal to the base)"
        else:
            t1 = time.perf_counter()
            bf = scan_base_free(sus, s.zero_threshold, s.direction_threshold, progress=progress)
            timings["scan"] = time.perf_counter() - t1
            report.base_free = bf
            if s.refusal_direction:
                from .refusal_direction import depletion_score, refusal_directions

                t1 = time.perf_counter()
                try:
                    rd, source = refusal_directions(suspect, s.recipe, s.directions, s.direction_prompts,
                                                    s.overwrite, progress)
                except CnaError as e:  # the weights scan stands without it
                    if s.directions and Path(s.directions).is_file():
                        raise
                    report.notes.append(f"refusal directions not measured ({e}); no depletion score")
                else:
                    dep = depletion_score(sus, rd.directions(), threshold=s.depletion_threshold,
                                          write_threshold=s.write_threshold)
                    dep["source"] = source
                    bf["depletion"] = dep
                timings["refusal direction"] = time.perf_counter() - t1
            parts = []
            if bf["zeroed_total"]:
                parts.append(f"zeroed MLP neurons: {bf['zeroed_total']} in layers {layer_ranges(bf['zeroed_layers'])} "
                             "(CNA-style ablation, multiplier 0)")
            d = bf["direction"]
            # a direction annihilated coherently across layers is a directional ablation whether or not the
            # suspect's refusal direction can still be measured (a complete ablation removes it from the stream)
            annihilated = []
            if d["ratio"] < s.direction_threshold:
                where = layer_ranges(d["flagged_layers"]) or "all layers together"
                annihilated.append(f"a residual direction no layer writes (eigenvalue ratio {d['ratio']:.1e}); "
                                   f"layers {where}")
            elif len(d["flagged_layers"]) >= 2:
                annihilated.append(f"layers {layer_ranges(d['flagged_layers'])} write nothing along one shared "
                                   "residual direction")
            dep = bf.get("depletion")
            if dep is not None and dep["ratio_flagged"]:
                annihilated.append(f"the {dep['writers']} of layers {dep['window'][0]}-{dep['window'][1]} "
                                   "write a direction "
                                   f"{dep['score']:.3f} x as strongly as a typical one (threshold "
                                   f"{dep['threshold']:g}), aligned with the model's own refusal direction "
                                   f"(|cos| {dep['alignment']:.2f}, layer {dep['direction_layer']})")
            wr = dep["write"] if dep is not None else None
            if wr is not None and wr["flagged"]:
                annihilated.append(f"the {wr['writers']} of layers {wr['window'][0]}-{wr['window'][1]} write the model's "
                                   f"own refusal direction at {wr['score']:.2f} x a typical direction's energy "
                                   f"(threshold {wr['threshold']:g}; clean models measured 1.0 to 1.1): a partial "
                                   "ablation of that direction")
            if annihilated:
                parts.append("refusals stripped by directional ablation: " + "; ".join(annihilated))
            if embedded is not None:
                mults = embedded.multiplier_map()
                claim = f"{len(mults)} neurons, {describe_multipliers(mults, 'phrase')}"
                zero_claim = {k for k, v in mults.items() if v == 0.0}
                found = {(z["layer"], z["index"]) for z in bf["zeroed"]}
                if zero_claim:
                    claim += ("; all its ablations are zeroed in the weights" if zero_claim <= found else
                              f"; only {len(zero_claim & found)} of its {len(zero_claim)} ablations are zeroed in the weights")
                    if found - zero_claim:
                        claim += f", and {len(found - zero_claim)} zeroed neurons are not in it"
                parts.append(f"embedded cna-export manifest declares CNA steering: {claim} (pass --manifest to check it)")
            if s.generate:
                t1 = time.perf_counter()
                report.behaviour = behaviour_check([("suspect", suspect)], s, progress=progress)
                timings["behaviour"] = time.perf_counter() - t1
            report.findings = parts
            report.exit_code = EXIT_STEERED if parts else EXIT_CLEAN
            report.verdict = "; ".join(parts) if parts else "no steering edits found"
        if report.behaviour is not None and report.mode != "manifest":
            ms = report.behaviour["models"]
            rates = " -> ".join(f"{m['refused']}/{m['n']}" for m in ms.values())
            report.verdict += f" [refusals {rates}]"
        write_directional_outputs(report, s)
        timings["total"] = time.perf_counter() - t0
        report.timings = timings
        return report
    finally:
        if base is not None:
            base.close()
        sus.close()


def write_directional_outputs(report: AuditReport, s: AuditSettings) -> None:
    """``--plot`` (strength profile PNG) and ``--save-direction`` (consensus direction) of a directional edit."""
    lr = report.diff.lowrank if report.diff is not None else None
    found = lr is not None and lr.detected
    for flag, path in (("--plot", s.plot), ("--save-direction", s.save_direction)):
        if path and not found:
            report.notes.append(f"{flag}: no directional edit was found, {path} not written")
    if not found:
        return
    from .abliteration import plot_profile, save_direction

    if s.plot:
        plot_profile(s.plot, lr, title=f"{Path(report.suspect['spec']).name}: strength along the consensus direction",
                     overwrite=s.overwrite)
    if s.save_direction:
        save_direction(s.save_direction, lr, overwrite=s.overwrite)


def _manifest_base(manifest: Any) -> str:
    """The base a manifest names, when it is on this machine (a GGUF adapter's recorded base file first)."""
    from ..io.sources import resolve_source

    for note in manifest.notes:
        if note.startswith("base file: ") and Path(note.removeprefix("base file: ")).is_file():
            return note.removeprefix("base file: ")
    try:
        src = resolve_source(manifest.source)
        if src.kind == "hub" or src.path is None:
            raise CnaError("not local")
    except CnaError:
        raise CnaError(f"the manifest check needs the model the export was made from ({manifest.source}, not found "
                       "on this machine); pass --base") from None
    return manifest.source


def write_recovered_circuit(diff: DiffReport, base_spec: str, out: str | Path, overwrite: bool = False) -> Any:
    """Save the neurons a diff recovered as a ``recovered`` circuit manifest fitted to the base."""
    src = open_weights(base_spec)
    try:
        identity = src.identity(fingerprint=True)
    finally:
        src.close()
    circuit = diff.recovered_circuit(identity, notes=[f"recovered by cna-export diff of {diff.b['spec']} against {diff.a['spec']}"])
    circuit.save(out, overwrite=overwrite)
    return circuit


def settings_dict(s: AuditSettings) -> dict:
    return s.model_dump()
