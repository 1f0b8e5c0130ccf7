"""Base-free scan: signs of steering visible in a checkpoint alone, without the model it came from.

Two signals, per layer: MLP neurons whose weights were zeroed (a CNA ablation leaves a down_proj
column or up_proj row at exactly zero), and a residual direction that the residual-writing tensors
no longer write (directional ablation projects one direction out of them, which shows as an
eigenvalue of their Gram matrix collapsing towards zero)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..core.errors import CnaError
from ..core.progress import bar as progress_bar
from ..io.weights import WeightSource
from .isolated import Calibration, GramBlocks, IsolatedDirection


def _eig_ratio(G: np.ndarray) -> tuple[float, float]:
    """(smallest / median eigenvalue, median eigenvalue) of a PSD matrix."""
    w = np.linalg.eigvalsh(G)
    med = float(np.median(w))
    return (max(float(w[0]), 0.0) / med if med > 0 else math.inf), med


def bottom_eigenvector(G: np.ndarray, median: float, iterations: int = 4) -> np.ndarray:
    """Unit eigenvector of the smallest eigenvalue of a PSD matrix (shifted inverse iteration).

    Used only when that eigenvalue is far below the median, where inverse iteration converges at once.
    """
    n = G.shape[0]
    A = G + (1e-9 * median if median > 0 else 1e-12) * np.eye(n)
    x = np.ones(n) / math.sqrt(n)
    for _ in range(iterations):
        try:
            y = np.linalg.solve(A, x)
        except np.linalg.LinAlgError:
            y = np.linalg.lstsq(A, x, rcond=None)[0]
        x = y / np.linalg.norm(y)
    return x * (1.0 if x[np.argmax(np.abs(x))] >= 0 else -1.0)


def _energy_along(W: np.ndarray, r: np.ndarray) -> float:
    """|W r|^2 relative to the average direction's energy (|W|_F^2 / hidden), for W [*, hidden], in chunks."""
    along = 0.0
    total = 0.0
    step = max(1, (1 << 22) // max(W.shape[1], 1))
    for s in range(0, W.shape[0], step):
        blk = W[s : s + step].astype(np.float64)
        along += float(np.square(blk @ r).sum())
        total += float(np.square(blk).sum())
    return along * W.shape[1] / total if total > 0 else math.inf


@dataclass
class ZeroedNeuron:
    layer: int
    index: int
    where: list[str]  # which weights are zero: down_proj column, up_proj row, gate_proj row


@dataclass
class LayerScan:
    layer: int
    eig_ratio: float  # smallest / median eigenvalue of the layer's writers' Gram
    zeroed: int


@dataclass
class DirectionScan:
    """The residual direction the writers write least (globally, and the layers that annihilate it)."""

    ratio: float  # smallest / median eigenvalue of sum W W^T over every writer
    layer_ratio_min: float
    flagged_layers: list[int]
    consistency: float | None  # smallest |cos| of a flagged layer's own direction with it
    direction: list[float] | None
    embedding_energy_along_direction: dict[str, float]


@dataclass
class BaseFreeScan:
    """Zeroed neurons and annihilated residual directions, from the suspect's weights alone."""

    zero_threshold: float
    direction_threshold: float
    zeroed_total: int
    zeroed_layers: list[int]
    zeroed: list[ZeroedNeuron]
    direction: DirectionScan
    layers: list[LayerScan]
    isolated: IsolatedDirection | None = None  # the calibrated eigenvalue-gap score (inspect/isolated.py)


@dataclass
class _LayerGram:
    """One layer's writers: ``sum W W^T`` over o_proj and down_proj, and its zeroed neurons."""

    gram: np.ndarray
    hits: dict[int, list[str]]


def scan_base_free(src: WeightSource, zero_threshold: float = 1e-3, direction_threshold: float = 1e-3,
                   progress: bool = False, calibration: Calibration | None = None) -> BaseFreeScan:
    """Zeroed neurons, annihilated residual directions and the eigenvalue-gap score (``calibration``: another
    table than the packaged one), from the suspect alone (one layer at a time)."""
    G_all = np.zeros((src.hidden_size, src.hidden_size), dtype=np.float64)
    zeroed: dict[int, dict[int, list[str]]] = {}
    layer_stats: list[LayerScan] = []
    flagged: list[tuple[int, np.ndarray]] = []
    blocks = GramBlocks(src.num_layers, src.hidden_size, calibration)
    bar = progress_bar(progress, total=src.num_layers, desc="scan", unit="layer")
    for layer in range(src.num_layers):
        lg = _layer_gram(src, layer, zero_threshold, blocks)
        ratio, med = _eig_ratio(lg.gram)
        if ratio < direction_threshold:
            flagged.append((layer, bottom_eigenvector(lg.gram, med)))
        G_all += lg.gram
        if lg.hits:
            zeroed[layer] = lg.hits
        layer_stats.append(LayerScan(layer=layer, eig_ratio=ratio, zeroed=len(lg.hits)))
        bar.update(1)
    bar.close()
    return BaseFreeScan(
        zero_threshold=zero_threshold,
        direction_threshold=direction_threshold,
        zeroed_total=sum(len(h) for h in zeroed.values()),
        zeroed_layers=sorted(zeroed),
        zeroed=[ZeroedNeuron(layer, j, w) for layer, h in sorted(zeroed.items()) for j, w in sorted(h.items())],
        direction=_direction_scan(src, G_all, flagged, layer_stats, direction_threshold),
        layers=layer_stats,
        isolated=blocks.score(),
    )


def _layer_gram(src: WeightSource, layer: int, zero_threshold: float, blocks: GramBlocks) -> _LayerGram:
    """The layer's writers' Gram matrix, and its MLP neurons whose weights are (near) zero; each writer's own Gram
    and rounding noise go to ``blocks`` (the eigenvalue-gap score)."""
    down_e = src.find("ffn_down", layer)
    if down_e is None:
        raise CnaError(f"{src.spec} has no down_proj weight in layer {layer}")
    down = src.read(down_e).astype(np.float64)
    n_ff = down.shape[1]
    hits: dict[int, list[str]] = {}
    _flag(np.linalg.norm(down, axis=0), zero_threshold, "down_proj column", hits)
    G = down @ down.T
    del down
    blocks.add("ffn_down", layer, G, src.rounding_noise(down_e), down_e.storage, n_ff)
    for role, what in (("ffn_up", "up_proj row"), ("ffn_gate", "gate_proj row")):
        e = src.find(role, layer)
        if e is None:
            continue
        rows = np.linalg.norm(src.read(e).astype(np.float64), axis=1)
        if role == "ffn_up" and src.arch.fused_gate_up and rows.size == 2 * n_ff:
            _flag(rows[:n_ff], zero_threshold, "gate_proj row", hits)
            rows = rows[n_ff:]
        _flag(rows, zero_threshold, what, hits)
    o_e = src.find("attn_output", layer)
    if o_e is not None:
        o_proj = src.read(o_e).astype(np.float64)
        G_o = o_proj @ o_proj.T
        blocks.add("attn_output", layer, G_o, src.rounding_noise(o_e), o_e.storage, o_proj.shape[1])
        del o_proj
        G = G + G_o
    return _LayerGram(G, hits)


def _direction_scan(src: WeightSource, G_all: np.ndarray, flagged: list[tuple[int, np.ndarray]],
                    layer_stats: list[LayerScan], direction_threshold: float) -> DirectionScan:
    """The weakest written direction over all writers, the layers that share it, and the embeddings along it."""
    ratio_all, med_all = _eig_ratio(G_all)
    r = None
    if ratio_all < direction_threshold:
        r = bottom_eigenvector(G_all, med_all)
    elif flagged:
        r = flagged[0][1]
    flagged_layers: list[int] = []
    consistency = None
    emb: dict[str, float] = {}
    if r is not None:
        cos = [abs(float(np.dot(r, v))) for _, v in flagged]
        flagged_layers = [layer for (layer, _), c in zip(flagged, cos, strict=True) if c >= 0.9]
        consistency = min(cos) if cos else None
        for role in ("token_embd", "output"):
            e = src.find(role, None)
            if e is not None and len(e.shape) == 2 and e.shape[1] == src.hidden_size:
                emb[role] = _energy_along(src.read(e), r)
    return DirectionScan(
        ratio=ratio_all,
        layer_ratio_min=min(x.eig_ratio for x in layer_stats) if layer_stats else math.inf,
        flagged_layers=flagged_layers,
        consistency=consistency,
        direction=[float(x) for x in r] if r is not None else None,
        embedding_energy_along_direction=emb,
    )


def _flag(norms: np.ndarray, threshold: float, what: str, hits: dict[int, list[str]]) -> None:
    med = float(np.median(norms))
    if not med > 0:
        return
    for j in np.nonzero(norms < threshold * med)[0]:
        hits.setdefault(int(j), []).append(what)
