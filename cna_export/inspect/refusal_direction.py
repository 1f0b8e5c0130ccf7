"""A model's refusal direction per layer, from the recipe's prompts, and a base-free abliteration score.

The refusal direction at layer ``l`` is the mean residual stream (the decoder layer's output) at the last
prompt token over harmful prompts minus the same mean over benign prompts (the recipe's positive and
negative sets, chat-templated as discovery renders them; ``limit`` prompts of each, evenly spread). It is
computed with discovery's own capture (:func:`cna_export.discovery.cna.run_prompts`, residual hook) and
cached in a versioned ``.npz`` (``--directions FILE``) that records the weights' fingerprint and the
prompt sets' sha256, like ``--stats``.

Base-free score (:func:`depletion_score`): directional ablation makes the writers (``o_proj``,
``down_proj``) of the edited layers write (almost) nothing along the ablated direction. Over each window
of consecutive layers (a quarter of the layers), the writers' Gram matrices ``W W^T``, each debiased by
the rounding noise its storage type explains and divided by its mean eigenvalue, are summed (o_proj and
down_proj together, and each alone); the score is the window's smallest eigenvalue over its median (how much less
the window writes along its weakest direction than along a typical one), and that direction's best
|cos| with the model's own refusal directions (one per layer, from the recipe's prompts) says whether it
is the refusal direction. A window scoring below ``threshold`` along a direction aligned at least
``min_alignment`` is marked.

These scores are *reported, never decisive*: they are measured along the suspect's own refusal directions,
which an ablation removes (a circular gate: the Q4_K_M abliteration of issue 21 was discarded by it). The
base-free verdict reads the weights alone (:mod:`cna_export.inspect.isolated`).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..core.errors import CnaError

SCHEMA = 1
DEPLETION_THRESHOLD = 0.05  # base-free: window's smallest / median eigenvalue below this ...
# ... along a direction with |cos| >= this with one of the model's own refusal directions. A random direction's
# best |cos| with L of them is about sqrt(2 ln(2L) / hidden): 0.14 for SmolLM2 (576, 30 layers), 0.11 for
# Qwen2.5-0.5B (896, 24). The ablated direction itself is only partly in the suspect's own refusal directions:
# the edited layers no longer write it, so only the layers before them carry it.
ALIGNMENT = 0.25
# base-free, second score: a window's writers write the model's own refusal direction (per layer) at this
# fraction of a typical direction's energy or less. Measured (bench/README.md, audit table): the smallest window
# mean over the three writer groups is 1.01 to 1.09 on every clean suspect (SmolLM2-135M and Qwen2.5-Coder-0.5B
# as shipped, a fine-tune-like perturbation, requantised copies; always a down_proj window; o_proj windows 1.2 to
# 1.3) and 0.51 to 0.59 on heretic 1.4.0's partial abliteration of Qwen2.5-Coder-0.5B (per-layer directions,
# strength 0.07-0.61; o_proj windows). A margin of 1.25x on the clean side, from two clean models: thin evidence.
WRITE_THRESHOLD = 0.8


@dataclass
class PromptSetInfo:
    """A prompt set the directions were measured on."""

    path: str
    sha256: str
    used: int  # prompts used, spread evenly over the set


class _Meta(BaseModel):
    """The ``meta`` entry of a refusal-directions file."""

    model_config = ConfigDict(populate_by_name=True)

    schema_version: int = Field(alias="schema")
    kind: str
    model: str
    fingerprint: str | None = None
    prompts: dict[str, PromptSetInfo]


KIND = "cna-export refusal directions"


@dataclass
class RefusalDirections:
    """Per-layer mean residuals (harmful, benign) at the last prompt token; typed and versioned."""

    schema: int
    model: str
    fingerprint: str | None
    prompts: dict[str, PromptSetInfo]  # harmful | benign -> the prompt set
    harmful_mean: np.ndarray  # [layers, hidden]
    benign_mean: np.ndarray

    @property
    def num_layers(self) -> int:
        return int(self.harmful_mean.shape[0])

    def directions(self) -> np.ndarray:
        """``[layers, hidden]`` unit refusal directions."""
        d = self.harmful_mean - self.benign_mean
        n = np.linalg.norm(d, axis=1, keepdims=True)
        return np.divide(d, n, out=np.zeros_like(d), where=n > 0)

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        from ..core.atomic import atomic_file

        meta = _Meta(schema_version=self.schema, kind=KIND, model=self.model, fingerprint=self.fingerprint,
                     prompts=self.prompts)
        buf = io.BytesIO()
        np.savez(buf, meta=np.array(meta.model_dump_json(by_alias=True)), harmful_mean=self.harmful_mean,
                 benign_mean=self.benign_mean)
        with atomic_file(Path(path), overwrite=overwrite) as fh:
            fh.write(buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> RefusalDirections:
        try:
            with np.load(Path(path), allow_pickle=False) as z:
                text = str(z["meta"])
                hm, bm = np.asarray(z["harmful_mean"]), np.asarray(z["benign_mean"])
        except (OSError, ValueError, KeyError) as e:
            raise CnaError(f"{path} is not a refusal-directions file ({type(e).__name__}: {str(e)[:80]})") from None
        try:
            meta = _Meta.model_validate_json(text)
        except ValidationError:
            meta = None
        if meta is None or meta.kind != KIND or meta.schema_version != SCHEMA:
            raise CnaError(f"{path} is not a refusal-directions file of schema {SCHEMA}")
        return cls(SCHEMA, meta.model, meta.fingerprint, meta.prompts, hm, bm)


def default_recipe() -> Path:
    """The bundled refusal recipe (``recipes/refusal.yaml``)."""
    from ..verification.prompts import recipes_dir

    return recipes_dir() / "refusal.yaml"


def _spread(texts: list[str], n: int) -> list[str]:
    if n >= len(texts):
        return list(texts)
    return [texts[round(i * (len(texts) - 1) / max(n - 1, 1))] for i in range(n)]


def _recipe_sets(recipe: str | Path | None, limit: int) -> tuple[Any, dict[str, list[str]], dict[str, PromptSetInfo]]:
    from ..core.recipe import load_recipe
    from ..core.settings.base import build
    from ..core.settings.discover import DiscoverOptions
    from ..model.prompts import load_prompts

    path = recipe or default_recipe()
    opts = build(DiscoverOptions, load_recipe(path))
    if not opts.positive or not opts.negative:
        raise CnaError(f"recipe {path} names no positive/negative prompt sets")
    sel = {"field": opts.field, "column": opts.column}
    sets = {"harmful": load_prompts(opts.positive, **sel), "benign": load_prompts(opts.negative, **sel)}
    texts = {k: _spread(list(ps.texts), limit) for k, ps in sets.items()}
    info = {k: PromptSetInfo(str(ps.path), ps.info().sha256, len(texts[k])) for k, ps in sets.items()}
    return opts, texts, info


def require_chat_template(spec: str, chat_template: bool, system_prompt: str | None = None,
                          trust_remote_code: bool = False) -> None:
    """Fail before a model is loaded when the prompts need a chat template its tokenizer lacks.

    The template is read where the tokenizer gets it: a GGUF's ``tokenizer.chat_template`` KV (which
    transformers maps to the tokenizer's), else the tokenizer itself (a folder's loads in well under a
    second, where loading the model can take a minute). The check is
    :func:`cna_export.model.prompts.render`'s own (it reads only ``chat_template``), with its one-line error."""
    from types import SimpleNamespace

    from ..io.sources import resolve_source
    from ..model.loading import load_tokenizer
    from ..model.prompts import render

    if not chat_template:
        return
    source = resolve_source(spec)
    if source.kind == "gguf" and source.path is not None:
        from ..io import gguf as G

        template = G.field_value(G.open_gguf(source.path), "tokenizer.chat_template")
    else:
        template = getattr(load_tokenizer(source, trust_remote_code), "chat_template", None)
    try:
        render(SimpleNamespace(chat_template=template), (), chat_template, system_prompt)
    except CnaError:  # render's advice names a discover/steer flag that audit does not have
        raise CnaError("this model's tokenizer has no chat template; for a base model, give a recipe with "
                       "'chat_template: false' (--recipe)") from None


def compute_directions(spec: str, recipe: str | Path | None = None, limit: int = 32, progress: bool = False
                       ) -> RefusalDirections:
    """Load ``spec`` in transformers and measure its per-layer mean residuals on the recipe's prompts."""
    from ..discovery.cna import RunningStats, run_prompts
    from ..model.loading import load_model

    opts, texts, info = _recipe_sets(recipe, limit)
    require_chat_template(spec, opts.chat_template, opts.system_prompt)
    loaded = load_model(spec)
    try:
        fp = loaded.identity().fingerprint
    except Exception:  # noqa: BLE001 - identity is informative here, not required
        fp = None
    means = {}
    for name, ts in texts.items():
        rs = RunningStats(loaded.num_layers, loaded.hidden_size)
        run_prompts(loaded, ts, lambda *a: None, batch_size=opts.batch_size, chat_template=opts.chat_template,
                    max_length=opts.max_length, desc=f"refusal direction ({name})", progress=progress,
                    system_prompt=opts.system_prompt, residual_sink=rs.add)
        rs.count = len(ts)
        means[name] = rs.mean
    del loaded
    return RefusalDirections(SCHEMA, spec, fp, info, means["harmful"], means["benign"])


def refusal_directions(spec: str, recipe: str | Path | None, cache: str | None, limit: int = 32,
                       overwrite: bool = False, progress: bool = False) -> tuple[RefusalDirections, str]:
    """The refusal directions of ``spec``: read from ``cache`` when it fits, else computed (and saved there)."""
    path = Path(cache) if cache else None
    if path is not None and path.is_file():
        rd = RefusalDirections.load(path)
        problem = _mismatch(rd, spec, recipe, limit)
        if problem is None:
            return rd, f"refusal directions read from {path}"
        if not overwrite:
            raise CnaError(f"--directions {path} {problem}; pass --overwrite to recompute it, or another file")
    rd = compute_directions(spec, recipe, limit, progress)
    if path is not None:
        rd.save(path, overwrite=overwrite)
    return rd, f"refusal directions of {spec} from the recipe's prompts ({limit} harmful, {limit} benign)"


def _mismatch(rd: RefusalDirections, spec: str, recipe: str | Path | None, limit: int) -> str | None:
    from ..io.weights import open_weights

    src = open_weights(spec)
    try:
        ident = src.identity(fingerprint=True)
        other_weights = ident.differs_from(rd.fingerprint)  # in the saved fingerprint's scheme, while open
    finally:
        src.close()
    if other_weights:
        return f"was computed on other weights ({rd.model})"
    if rd.harmful_mean.shape != (ident.num_layers, ident.hidden_size):
        return f"has the shape of another model ({rd.model})"
    _, _, info = _recipe_sets(recipe, limit)
    for k, v in info.items():
        have = rd.prompts.get(k)
        if have is None or have.sha256 != v.sha256 or have.used != v.used:
            return f"was computed with other {k} prompts than the recipe's"
    return None


# -- base-free depletion scores ---------------------------------------------------------------------------


WRITER_GROUPS = {"o_proj + down_proj": ("attn_output", "ffn_down"), "o_proj": ("attn_output",),
                 "down_proj": ("ffn_down",)}


@dataclass
class WindowScore:
    """One writer group over one window of layers."""

    writers: str  # a key of WRITER_GROUPS
    window: list[int]  # [first, last] layer
    ratio: float  # smallest / median eigenvalue of the summed, normalised Gram
    alignment: float  # best |cos| of the weakest direction with the model's own refusal directions
    direction_layer: int  # ... with the refusal direction of this layer
    write: float  # mean energy along each layer's own refusal direction (1: a typical direction)


@dataclass
class WriteDeficit:
    """The window that writes the model's own refusal direction least."""

    score: float
    window: list[int]
    writers: str
    threshold: float
    flagged: bool
    per_layer: dict[str, list[float | None]]  # writer role -> energy along that layer's refusal direction


@dataclass
class Depletion:
    """The base-free depletion scores (:func:`depletion_score`); ``source`` says where the directions came from."""

    score: float
    window: list[int]
    writers: str
    alignment: float
    direction_layer: int
    window_size: int
    threshold: float
    min_alignment: float
    flagged: bool  # the ratio or the write score flagged a window
    ratio_flagged: bool
    write: WriteDeficit
    debiased: bool  # every writer's rounding noise was taken out
    not_debiased: list[str]  # storage types without a rounding-noise model
    windows: list[WindowScore]
    source: str | None = None


def depletion_score(src: Any, directions: np.ndarray, window: int | None = None,
                    threshold: float = DEPLETION_THRESHOLD, min_alignment: float = ALIGNMENT,
                    write_threshold: float = WRITE_THRESHOLD) -> Depletion:
    """Base-free: a residual direction that a window of layers' writers write far less than their spectrum
    predicts, and that lines up with the model's own refusal directions (``[layers, hidden]``, unit rows).

    Each writer's Gram ``W W^T`` is first debiased by the rounding noise its storage explains
    (``diag(sum_j step_ij^2 / 12)``, :meth:`WeightSource.rounding_noise`), so that a quantised suspect's noise
    floor does not fill the depleted direction back in. Windows are scored for three writer groups: o_proj and
    down_proj together, and each alone, because a re-quantisation can restore part of an edit in one kind of
    tensor only (a Q4_K ``down_proj`` re-quantised from a model that was already 4-bit snaps a sub-step edit
    back onto its old grid, while the Q5_0 ``o_proj`` keeps it). A window is flagged when its ratio is below
    ``threshold`` along a direction with ``|cos| >= min_alignment``; the reported window is the flagged one
    with the smallest ratio (else the smallest ratio of all).

    Second score (``write``): a partial ablation (strength well below 1, heretic's kernels) leaves no depleted
    eigen-direction, but the writers still write the refusal direction less. For each writer group and window,
    the mean over its layers of ``d_l^T G_l d_l / (tr G_l / H)`` (the debiased Gram along the model's own unit
    refusal direction of that layer, relative to a typical direction); below ``write_threshold`` is flagged.
    The smallest window mean is reported."""
    L, H = directions.shape
    D = directions.astype(np.float64)
    grams, undebiased = _writer_grams(src, L, H)
    # energy each writer puts along the model's own refusal direction of its layer (1: a typical direction)
    along = {role: [None if g is None else float(D[layer] @ g @ D[layer]) for layer, g in enumerate(gs)]
             for role, gs in grams.items()}
    w = min(window or max(2, L // 4), L)
    windows = _window_scores(grams, along, D, w)
    if not windows:
        raise CnaError(f"{src.spec} has no o_proj/down_proj weights of the hidden size {H}")
    hits = [x for x in windows if x.ratio < threshold and x.alignment >= min_alignment]
    best = min(hits or windows, key=lambda x: x.ratio)
    low = min(windows, key=lambda x: x.write)
    per_layer = {role: [None if v is None else round(v, 4) for v in vals] for role, vals in along.items()}
    write = WriteDeficit(score=low.write, window=low.window, writers=low.writers, threshold=write_threshold,
                         flagged=low.write < write_threshold, per_layer=per_layer)
    return Depletion(score=best.ratio, window=best.window, writers=best.writers, alignment=best.alignment,
                     direction_layer=best.direction_layer, window_size=w, threshold=threshold,
                     min_alignment=min_alignment, flagged=bool(hits) or write.flagged, ratio_flagged=bool(hits),
                     write=write, debiased=not undebiased, not_debiased=sorted(undebiased), windows=windows)


def _writer_grams(src: Any, L: int, H: int) -> tuple[dict[str, list[np.ndarray | None]], set[str]]:
    """Per layer, each writer's ``W W^T`` debiased by its rounding noise and scaled to mean eigenvalue 1
    (None where the layer has no such writer of the hidden size); and the storage types left undebiased."""
    grams: dict[str, list[np.ndarray | None]] = {"attn_output": [], "ffn_down": []}
    undebiased: set[str] = set()
    for layer in range(L):
        for role, out in grams.items():
            e = src.find(role, layer)
            if e is None or len(e.shape) != 2 or e.shape[0] != H:
                out.append(None)
                continue
            W = src.read(e).astype(np.float64)
            g = W @ W.T
            del W
            noise = src.rounding_noise(e)
            if noise is None:
                undebiased.add(str(e.storage))
            else:
                g[np.diag_indices_from(g)] -= noise
            tr = float(np.trace(g))
            out.append(g * (H / tr) if tr > 0 else None)
    return grams, undebiased


def _window_scores(grams: dict[str, list[np.ndarray | None]], along: dict[str, list[float | None]], D: np.ndarray,
                   w: int) -> list[WindowScore]:
    """Every writer group over every window of ``w`` consecutive layers."""
    L = D.shape[0]
    windows = []
    for group, roles in WRITER_GROUPS.items():
        for start in range(L - w + 1):
            parts = [g for r in roles for g in grams[r][start : start + w] if g is not None]
            if not parts:
                continue
            ev, V = np.linalg.eigh(sum(parts))
            med = float(np.median(ev))
            ratio = max(float(ev[0]), 0.0) / med if med > 0 else math.inf
            cos = np.abs(D @ V[:, 0])
            m = int(np.argmax(cos))
            write = float(np.mean([v for r in roles for v in along[r][start : start + w] if v is not None]))
            windows.append(WindowScore(writers=group, window=[start, start + w - 1], ratio=ratio,
                                       alignment=float(cos[m]), direction_layer=m, write=write))
    return windows
