"""Abliteration as other tools ship it, written for the audit's tests and benches from the published math
(never from any tool's code): the refusal direction, and four ways to remove it from the residual writers.

Conventions (Hugging Face tensors): ``o_proj``/``down_proj`` weights are ``[hidden, in]``; their column
``j`` is a *write vector* (what input ``j`` adds to the residual stream). The embeddings and ``lm_head`` are
``[vocab, hidden]``; their rows are the write (read) vectors.

* :func:`rank1` -- directional ablation (Arditi et al. 2024, "Refusal in LLMs is mediated by a single
  direction"): ``W' = W - lam r r^T W`` on every writer, ``E' = E - lam E r r^T`` on the embeddings.
* :func:`weighted` -- per-layer strength from a weight kernel: peak ``max_weight`` at layer
  ``peak``, falling linearly to ``min_weight`` at ``distance`` layers away and zero beyond (the kernel that
  heretic's documentation describes); the direction is the refusal direction at a fractional layer index,
  interpolated linearly between the two neighbouring layers' directions, as that documentation describes.
* :func:`norm_preserving` -- project, then put every write vector back to its old norm
  (``w_j' = |w_j| P w_j / |P w_j|``, our reading of "norm-preserving" / "row normalisation" for the
  ``[hidden, in]`` orientation, where the per-input write vectors are the columns); with ``rank=k``
  the change is then truncated to its top ``k`` singular components, as a merged rank-k LoRA ships it.
* :func:`biprojected` -- the refusal direction orthogonalised against the harmless mean
  (``r' = r - (r . m_hat) m_hat``, ``m`` the mean harmless residual at the layer), then norm-preserving
  ablation with ``r'`` (our reading of "norm-preserving biprojected abliteration").
"""

from __future__ import annotations

import re

import numpy as np

_LAYER = re.compile(r"layers\.(\d+)\.(self_attn\.o_proj|mlp\.down_proj)\.weight$")
EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")


def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def writers(tensors: dict) -> dict[str, int]:
    """Name -> layer of every o_proj/down_proj weight."""
    out = {}
    for name in tensors:
        m = _LAYER.search(name)
        if m:
            out[name] = int(m.group(1))
    return out


def _project_cols(W: np.ndarray, r: np.ndarray, lam: float) -> np.ndarray:
    W = W.astype(np.float64)
    return W - lam * np.outer(r, r @ W)


def _project_rows(E: np.ndarray, r: np.ndarray, lam: float) -> np.ndarray:
    E = E.astype(np.float64)
    return E - lam * np.outer(E @ r, r)


def _renorm_cols(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    n_old = np.linalg.norm(old.astype(np.float64), axis=0)
    n_new = np.linalg.norm(new, axis=0)
    return new * np.divide(n_old, n_new, out=np.ones_like(n_new), where=n_new > 0)[None, :]


def _renorm_rows(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    return _renorm_cols(new.T, old.T).T


def _truncate(delta: np.ndarray, rank: int | None) -> np.ndarray:
    if rank is None:
        return delta
    U, s, Vt = np.linalg.svd(delta, full_matrices=False)
    return (U[:, :rank] * s[:rank]) @ Vt[:rank]


def _apply(tensors: dict, per_layer: dict[int, tuple[np.ndarray, float]], emb: tuple[np.ndarray, float] | None,
           norm: bool, rank: int | None) -> dict:
    """New dict: writers of ``per_layer`` (layer -> (r, lam)) and, with ``emb``, the embeddings edited."""
    out = dict(tensors)
    for name, layer in writers(tensors).items():
        if layer not in per_layer:
            continue
        r, lam = per_layer[layer]
        W = tensors[name]
        new = _project_cols(W, r, lam)
        if norm:
            new = _renorm_cols(new, W)
        new = W.astype(np.float64) + _truncate(new - W.astype(np.float64), rank)
        out[name] = new.astype(W.dtype)
    if emb is not None:
        r, lam = emb
        for name in EMBEDDINGS:
            if name in tensors:
                E = tensors[name]
                new = _project_rows(E, r, lam)
                if norm:
                    new = _renorm_rows(new, E)
                out[name] = (E.astype(np.float64) + _truncate(new - E.astype(np.float64), rank)).astype(E.dtype)
    return out


def n_layers(tensors: dict) -> int:
    return max(writers(tensors).values()) + 1


def rank1(tensors: dict, r: np.ndarray, lam: float = 1.0, layers=None, embeddings: bool = True) -> dict:
    r = unit(r)
    L = n_layers(tensors)
    per = {l: (r, lam) for l in (range(L) if layers is None else layers)}
    return _apply(tensors, per, (r, lam) if embeddings else None, norm=False, rank=None)


def kernel(L: int, peak: float, max_weight: float, min_weight: float, distance: float) -> np.ndarray:
    """Per-layer weight: max_weight at ``peak``, linear to min_weight at ``distance`` away, 0 beyond."""
    x = np.abs(np.arange(L) - peak)
    w = max_weight + (min_weight - max_weight) * x / max(distance, 1e-9)
    return np.where(x <= distance, w, 0.0)


def interpolated(directions: np.ndarray, index: float) -> np.ndarray:
    """The refusal direction at a fractional layer index (linear between the neighbouring layers)."""
    lo = int(np.floor(index))
    hi = min(lo + 1, directions.shape[0] - 1)
    t = index - lo
    return unit((1 - t) * directions[lo] + t * directions[hi])


def weighted(tensors: dict, directions: np.ndarray, index: float, peak: float, max_weight: float = 1.2,
             min_weight: float = 0.6, distance: float = 4.0) -> dict:
    """Per-layer strength from :func:`kernel`, one direction interpolated at ``index``."""
    L = n_layers(tensors)
    r = interpolated(directions, index)
    w = kernel(L, peak, max_weight, min_weight, distance)
    return _apply(tensors, {l: (r, float(w[l])) for l in range(L) if w[l] > 0}, None, norm=False, rank=None)


def norm_preserving(tensors: dict, r: np.ndarray, lam: float = 1.0, layers=None, rank: int | None = 3) -> dict:
    r = unit(r)
    L = n_layers(tensors)
    per = {l: (r, lam) for l in (range(L) if layers is None else layers)}
    return _apply(tensors, per, None, norm=True, rank=rank)


def biprojected(tensors: dict, r: np.ndarray, harmless_mean: np.ndarray, lam: float = 1.0, layers=None) -> dict:
    m = unit(harmless_mean)
    r = unit(r)
    return norm_preserving(tensors, r - (r @ m) * m, lam, layers, rank=None)


def finetune_noise(tensors: dict, scale: float = 0.01, seed: int = 0) -> dict:
    """A fine-tune-like change: every 2-D weight plus independent noise of ``scale`` x its rms."""
    rng = np.random.default_rng(seed)
    out = dict(tensors)
    for name, W in tensors.items():
        if W.ndim == 2:
            w = W.astype(np.float64)
            out[name] = (w + scale * np.sqrt(np.mean(w * w)) * rng.standard_normal(w.shape)).astype(W.dtype)
    return out


def lora_noise(tensors: dict, rank: int = 2, scale: float = 0.05, seed: int = 0) -> dict:
    """A LoRA-like fine-tune: every writer plus its own random rank-``rank`` change (independent directions)."""
    rng = np.random.default_rng(seed)
    out = dict(tensors)
    for name in writers(tensors):
        W = tensors[name].astype(np.float64)
        Bm = rng.standard_normal((W.shape[0], rank))
        Am = rng.standard_normal((rank, W.shape[1]))
        d = Bm @ Am
        out[name] = (W + scale * np.linalg.norm(W) / np.linalg.norm(d) * d).astype(tensors[name].dtype)
    return out


TECHNIQUES = ("rank1", "weighted", "norm-preserving", "biprojected")
