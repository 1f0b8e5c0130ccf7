"""``audit --base``: how much of the base's refusal circuit (discovered with the refusal recipe, or given
with ``--circuit``) the neurons recovered from the suspect cover, and where they rank."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..core.circuit import neuron_key
from ..core.errors import CnaError
from ..core.settings.audit import AuditSettings
from ..io.weights import open_weights
from .refusal_direction import default_recipe
from .report import CircuitOverlap, Ranks

Recovered = Mapping[tuple[int, ...], float]  # (layer, index) or (layer, expert, index) -> multiplier


def refusal_overlap(base_spec: str, recovered: Recovered, settings: AuditSettings, progress: bool = False
                    ) -> CircuitOverlap:
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
    return _overlap(ref_set, recovered, source, same_size, ranks)


def _overlap(ref_set: set[tuple[int, ...]], recovered: Recovered, source: str, same_size: int | None,
             ranks: Ranks | None) -> CircuitOverlap:
    K = len(ref_set)
    steered = ref_set & set(recovered)
    ablated = {k for k in steered if recovered[k] == 0.0}
    share = (same_size / len(recovered)) if (same_size is not None and recovered) else (
        len(steered) / min(len(recovered), K) if recovered and K else 0.0)
    text = f"{len(ablated)} of {K} refusal-circuit neurons ablated, {len(steered)} of {K} steered ({source})"
    if same_size is not None:
        text += (f"; {same_size} of the {len(recovered)} recovered neurons are in the base's top-{len(recovered)} "
                 "refusal ranking")
    if ranks:
        text += f" (median rank {ranks.median})"
    return CircuitOverlap(source=source, circuit_size=K, steered=len(steered), ablated=len(ablated),
                          recovered=len(recovered), same_size_overlap=same_size, ranks=ranks, refusal_share=share,
                          is_refusal_circuit=bool(recovered) and share >= 0.5, summary=text)


def base_statistics(base_spec: str, settings: AuditSettings, progress: bool = False) -> tuple[Any, str]:
    """The base's discovery statistics for the refusal recipe, and where they came from.

    With ``settings.stats`` naming an existing file, that file is read (no model load, no forward
    passes) after checking that it was computed on the base's weights (fingerprint) and with the
    recipe's prompt sets (sha256) and settings; otherwise the statistics are computed with the
    recipe (the base loaded in transformers, once its tokenizer was seen to have the chat template the
    recipe needs) and, with ``settings.stats``, saved there for the next audit against the same base.
    """
    from ..core.recipe import load_recipe
    from ..core.settings.base import ModelOptions, build
    from ..core.settings.discover import DiscoverOptions
    from ..evaluation.saved_stats import compute_stats, load_stats, save_stats
    from ..model.loading import load_model
    from .refusal_direction import require_chat_template

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
            return replace(saved, options=opts), (f"discovered on the base with {recipe_path} (statistics read from "
                                                  f"{stats_path})")
        if not settings.overwrite:
            raise CnaError(f"--stats {stats_path} {problem}; pass --overwrite to recompute it, or another file")
    mopts = build(ModelOptions, recipe)
    require_chat_template(base_spec, opts.chat_template, opts.system_prompt, mopts.trust_remote_code)
    loaded = load_model(base_spec, **mopts.model_dump())
    saved = compute_stats(loaded, opts, progress=progress)
    del loaded
    if stats_path is not None:
        save_stats(stats_path, saved, overwrite=settings.overwrite)  # an existing file got here only with --overwrite
    return saved, f"discovered on the base with {recipe_path}"


def _stats_mismatch(saved: Any, base_id: Any, opts: Any) -> str | None:
    """Why saved statistics cannot stand for this base and recipe (None: they can)."""
    from ..model.prompts import load_prompts

    if base_id.differs_from(saved.identity.fingerprint):
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


def _ranks(stats: Any, opts: Any, recovered: Recovered) -> Ranks:
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
    return Ranks(median=int(np.median(rs)) if rs else None, best=rs[0] if rs else None, worst=rs[-1] if rs else None,
                 of=int(allowed.sum()))
