"""Discovery statistics and the CAA vectors, computed once and kept in one ``.npz`` file for sweeps and tuning.

Discovery statistics
    :func:`cna_export.discovery.cna.collect` measures everything CNA needs once;
    circuits of any size come from :func:`cna_export.discovery.cna.select` without
    new forward passes. :func:`compute_stats` adds the CAA vectors and
    :func:`save_stats` / :func:`load_stats` keep both in one ``.npz`` (float64
    sums, counts, top-k hits, the model identity, the discovery options and the
    prompt-set hashes), so sweeps and tuning never re-run discovery.

CAA baseline (the paper's ``compute_mlp_control_vector`` + ``steer_caa``)
    ``v[L] = mean(MLP output | positive) - mean(MLP output | negative)`` at the
    last prompt token of each layer ``L``, added as ``alpha * v[L]`` to the MLP
    (``down_proj``) output at every position. The MLP output is
    ``down_proj(a)`` for the activations ``a`` CNA already averages, and
    ``down_proj`` is linear, so ``v[L] = W_down[L] @ (mean_pos[L] - mean_neg[L])``
    exactly (a bias cancels in the difference): the CAA vectors come from the
    same statistics, no extra passes. ``alpha < 0`` pushes towards the negative
    (benign) set, i.e. against refusal.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.circuit import Circuit, ModelIdentity, PromptSetInfo
from ..core.errors import CnaError
from ..core.settings.discover import DiscoverOptions
from ..discovery.cna import CaptureReport, ContrastStats, RunningStats, TopKCounts, collect, select

STATS_FORMAT = "cna-export contrast stats v1"


# ---------------------------------------------------------------------------------------
# Statistics files
# ---------------------------------------------------------------------------------------


class _IdentityOnly:
    """What :func:`select` needs of a model when the statistics come from a file: its identity."""

    def __init__(self, identity: ModelIdentity):
        self._identity = identity

    def identity(self, with_fingerprint: bool = True) -> ModelIdentity:
        return self._identity


class _InfoOnly:
    def __init__(self, info: PromptSetInfo):
        self._info = info

    def info(self) -> PromptSetInfo:
        return self._info


@dataclass
class SavedStats:
    """Discovery statistics plus CAA vectors, the model identity and the options that produced them.

    ``loaded`` (:meth:`attach`) and ``prompt_sets``: the model and the prompts themselves, which learned
    multipliers (``multiplier_mode: learned``) train on; every other strategy needs the statistics alone.
    """

    stats: ContrastStats
    identity: ModelIdentity
    options: DiscoverOptions
    prompts: dict[str, PromptSetInfo]
    caa: np.ndarray  # [layers, hidden] float64
    loaded: Any = field(default=None, repr=False, compare=False)
    prompt_sets: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    _learned: dict[str, Circuit] = field(default_factory=dict, repr=False, compare=False)

    def attach(self, loaded: Any) -> "SavedStats":
        """Keep ``loaded`` (the transformers model these statistics were computed on) for learned multipliers."""
        if loaded.identity().differs_from(self.identity.fingerprint):
            raise CnaError("learned multipliers: the model differs from the one the statistics were computed on")
        self.loaded = loaded
        return self

    def _sets(self) -> dict[str, Any]:
        """The prompt sets, read again from the options' files when the statistics came from a file."""
        from ..model.prompts import load_prompts

        if self.prompt_sets is None:
            o = self.options
            sets = {}
            for name, info in self.prompts.items():
                ps = load_prompts(getattr(o, name), field=o.field if name != "neutral" else None,
                                  column=o.column if name != "neutral" else None, limit=o.limit)
                if ps.sha256 != info.sha256:
                    raise CnaError(f"learned multipliers: the {name} prompts ({ps.path}) changed since the statistics "
                                   "were computed; recompute them")
                sets[name] = ps
            self.prompt_sets = sets
        return self.prompt_sets

    @property
    def total_neurons(self) -> int:
        return self.identity.num_layers * self.identity.intermediate_size

    def size_for(self, fraction: float) -> int:
        if not 0 < fraction <= 1:
            raise CnaError(f"circuit fraction must be in (0, 1], got {fraction}")
        return max(1, int(round(fraction * self.total_neurons)))

    def circuit(self, top_k: int, **strategy: Any) -> Circuit:
        """The circuit of ``top_k`` neurons; ``strategy``: DiscoverOptions fields to override (score,
        sign, rank, multiplier_mode, ...), validated."""
        opts = self.options.model_copy(update={"top_k": top_k})
        if strategy:
            opts = DiscoverOptions.model_validate({**opts.model_dump(), **strategy})
        if opts.multiplier_mode == "learned":
            return self._learned_circuit(top_k, opts)
        sets = {name: _InfoOnly(info) for name, info in self.prompts.items()}
        return select(self.stats, _IdentityOnly(self.identity), opts, sets, top_k=top_k)  # type: ignore[arg-type]

    def _learned_circuit(self, top_k: int, opts: DiscoverOptions) -> Circuit:
        """Trained once per setting (a search may ask for the same point again)."""
        key = json.dumps([top_k, opts.model_dump()], sort_keys=True, default=str)
        if key not in self._learned:
            if self.loaded is None:
                raise CnaError("learned multipliers need the model (transformers) beside the statistics")
            self._learned[key] = select(self.stats, self.loaded, opts, self._sets(), top_k=top_k)
        return self._learned[key]


def caa_vectors(loaded: Any, stats: ContrastStats) -> np.ndarray:
    """Per-layer mean MLP-output difference at the last token: ``W_down @ (mean_pos - mean_neg)``."""
    diff = stats.positive.mean - stats.negative.mean
    out = np.zeros((loaded.num_layers, loaded.hidden_size), dtype=np.float64)
    for layer in range(loaded.num_layers):
        w = loaded.down_proj(layer).weight.detach().to("cpu").double().numpy()
        out[layer] = w @ diff[layer]
    return out


def compute_stats(loaded: Any, opts: DiscoverOptions, progress: bool = True,
                  gradients: bool | None = None) -> SavedStats:
    """Run discovery's statistics pass (positive, negative, neutral; with ``gradients`` the
    attribution backward passes too) and derive the CAA vectors."""
    from ..model.prompts import load_prompts

    if not opts.positive or not opts.negative:
        raise CnaError("discovery statistics need a recipe (or options) naming positive and negative prompt files")
    sel = dict(field=opts.field, column=opts.column, limit=opts.limit)
    positive = load_prompts(opts.positive, **sel)
    negative = load_prompts(opts.negative, **sel)
    neutral = load_prompts(opts.neutral, limit=opts.limit) if opts.neutral else None
    if len(positive) < 2 or len(negative) < 2:
        raise CnaError("discovery needs at least 2 positive and 2 negative prompts")
    stats = collect(loaded, positive, negative, neutral, opts, progress, gradients=gradients)
    sets = {"positive": positive, "negative": negative, **({"neutral": neutral} if neutral is not None else {})}
    return SavedStats(stats, loaded.identity(), opts, {k: v.info() for k, v in sets.items()},
                      caa_vectors(loaded, stats), loaded, sets)


def save_stats(path: str | Path, saved: SavedStats, overwrite: bool = False) -> None:
    from ..core.atomic import atomic_file

    s = saved.stats
    arrays: dict[str, np.ndarray] = {
        "positive_total": s.positive.total,
        "positive_total_sq": s.positive.total_sq,
        "positive_count": np.array(s.positive.count),
        "negative_total": s.negative.total,
        "negative_total_sq": s.negative.total_sq,
        "negative_count": np.array(s.negative.count),
        "caa": saved.caa,
    }
    for name in ("residual_positive", "residual_negative", "neutral_acts", "grad_positive", "grad_negative"):
        r = getattr(s, name)
        if r is not None:  # the strategy statistics (v1 files without them still load)
            arrays[f"{name}_total"] = r.total
            arrays[f"{name}_total_sq"] = r.total_sq
            arrays[f"{name}_count"] = np.array(r.count)
    if s.write_proj is not None:
        arrays["write_proj"] = s.write_proj.astype(np.float32)
        arrays["write_norm_sq"] = s.write_norm_sq
    if s.neutral is not None:
        arrays["neutral_hits"] = s.neutral.hits
        arrays["neutral_count"] = np.array(s.neutral.count)
        arrays["neutral_k"] = np.array(s.neutral.k)
    meta = {
        "format": STATS_FORMAT,
        "identity": saved.identity.model_dump(),
        "options": saved.options.model_dump(),
        "prompts": {k: v.model_dump() for k, v in saved.prompts.items()},
        "reports": {k: vars(r) for k, r in s.reports.items()},
    }
    arrays["meta"] = np.array(json.dumps(meta))
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    with atomic_file(Path(path), overwrite=overwrite) as fh:
        fh.write(buf.getvalue())


def load_stats(path: str | Path) -> SavedStats:
    p = Path(path)
    if not p.is_file():
        raise CnaError(f"statistics file not found: {p}")
    try:
        with np.load(p, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        meta = json.loads(str(data["meta"]))
    except (OSError, ValueError, KeyError) as e:
        raise CnaError(f"{p} is not a cna-export statistics file: {str(e).splitlines()[0] if str(e) else e}") from None
    if meta.get("format") != STATS_FORMAT:
        raise CnaError(f"{p} is not a cna-export statistics file (format {meta.get('format')!r})")
    try:
        identity = ModelIdentity.model_validate(meta["identity"])
        opts = DiscoverOptions.model_validate(meta["options"])
        prompts = {k: PromptSetInfo.model_validate(v) for k, v in meta["prompts"].items()}
    except Exception as e:
        raise CnaError(f"{p} has invalid metadata: {str(e).splitlines()[0]}") from None
    L, W = identity.num_layers, identity.intermediate_size

    def running(prefix: str, width: int = W) -> RunningStats:
        r = RunningStats(L, width)
        r.total = data[f"{prefix}_total"]
        r.total_sq = data[f"{prefix}_total_sq"]
        r.count = int(data[f"{prefix}_count"])
        if r.total.shape != (L, width):
            raise CnaError(f"{p}: {prefix} statistics have shape {r.total.shape}, expected {(L, width)}")
        return r

    def optional(prefix: str, width: int = W) -> RunningStats | None:
        return running(prefix, width) if f"{prefix}_total" in data else None

    neutral = None
    if "neutral_hits" in data:
        neutral = TopKCounts(L, W, int(data["neutral_k"]))
        neutral.hits = data["neutral_hits"]
        neutral.count = int(data["neutral_count"])
    reports = {k: CaptureReport(**v) for k, v in meta.get("reports", {}).items()}
    H = identity.hidden_size
    stats = ContrastStats(
        running("positive"), running("negative"), neutral, reports,
        optional("residual_positive", H), optional("residual_negative", H), optional("neutral_acts"),
        data["write_proj"].astype(np.float64) if "write_proj" in data else None,
        data.get("write_norm_sq"), optional("grad_positive"), optional("grad_negative"),
    )
    return SavedStats(stats, identity, opts, prompts, data["caa"])
