"""Base-free scan: signs of steering visible in a checkpoint alone, without the model it came from.

Two signals, per layer: MLP neurons whose weights were zeroed (a CNA ablation leaves a down_proj
column or up_proj row at exactly zero), and a residual direction that the residual-writing tensors
no longer write (directional ablation projects one direction out of them, which shows as an
eigenvalue of their Gram matrix collapsing towards zero)."""

from __future__ import annotations

import math

import numpy as np

from ..core.errors import CnaError
from ..core.progress import bar as progress_bar
from ..io.weights import WeightSource


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


def scan_base_free(src: WeightSource, zero_threshold: float = 1e-3, direction_threshold: float = 1e-3,
                   progress: bool = False) -> dict:
    """Zeroed neurons and annihilated residual directions, from the suspect alone (one layer at a time)."""
    hidden = src.hidden_size
    G_all = np.zeros((hidden, hidden), dtype=np.float64)
    zeroed: dict[int, dict[int, list[str]]] = {}
    layer_stats: list[dict] = []
    flagged: list[tuple[int, np.ndarray]] = []
    bar = progress_bar(progress, total=src.num_layers, desc="scan", unit="layer")
    for layer in range(src.num_layers):
        down_e = src.find("ffn_down", layer)
        if down_e is None:
            raise CnaError(f"{src.spec} has no down_proj weight in layer {layer}")
        down = src.read(down_e).astype(np.float64)
        n_ff = down.shape[1]
        hits: dict[int, list[str]] = {}
        _flag(np.linalg.norm(down, axis=0), zero_threshold, "down_proj column", hits)
        G = down @ down.T
        del down
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
            O = src.read(o_e).astype(np.float64)
            G += O @ O.T
            del O
        ratio, med = _eig_ratio(G)
        if ratio < direction_threshold:
            flagged.append((layer, bottom_eigenvector(G, med)))
        G_all += G
        if hits:
            zeroed[layer] = hits
        layer_stats.append({"layer": layer, "eig_ratio": ratio, "zeroed": len(hits)})
        bar.update(1)
    bar.close()
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
        flagged_layers = [l for (l, _), c in zip(flagged, cos) if c >= 0.9]
        consistency = min(cos) if cos else None
        for role in ("token_embd", "output"):
            e = src.find(role, None)
            if e is not None and len(e.shape) == 2 and e.shape[1] == hidden:
                emb[role] = _energy_along(src.read(e), r)
    total = sum(len(h) for h in zeroed.values())
    return {
        "zero_threshold": zero_threshold,
        "direction_threshold": direction_threshold,
        "zeroed_total": total,
        "zeroed_layers": sorted(zeroed),
        "zeroed": [{"layer": l, "index": j, "where": w} for l, h in sorted(zeroed.items()) for j, w in sorted(h.items())],
        "direction": {
            "ratio": ratio_all,
            "layer_ratio_min": min(x["eig_ratio"] for x in layer_stats) if layer_stats else math.inf,
            "flagged_layers": flagged_layers,
            "consistency": consistency,
            "direction": [float(x) for x in r] if r is not None else None,
            "embedding_energy_along_direction": emb,
        },
        "layers": layer_stats,
    }


def _flag(norms: np.ndarray, threshold: float, what: str, hits: dict[int, list[str]]) -> None:
    med = float(np.median(norms))
    if not med > 0:
        return
    for j in np.nonzero(norms < threshold * med)[0]:
        hits.setdefault(int(j), []).append(what)
