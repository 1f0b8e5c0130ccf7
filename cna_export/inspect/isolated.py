"""Base-free signal of a directional ablation: one residual direction that a window of layers writes far less
than the rest of its writers' spectrum, read from the weights alone (the suspect's refusal direction is never
used).

Directional ablation projects a direction ``r`` out of every residual writer it edits (``o_proj``,
``down_proj``: ``W' = W - lam r r^T W``), so what those writers write along ``r`` shrinks by ``(1 - lam)^2``.
In the writers' Gram matrix ``G = sum W W^T`` over a window of layers this is an eigenvalue pulled *below the
bulk* of the spectrum. A clean model's spectrum has a smooth lower edge: its smallest eigenvalue sits close to
the second (``lambda_1 / lambda_2`` 0.7 to 1 on the clean models measured), wherever the layers are; an ablated
window's smallest is isolated (0 to 0.5). The score is that ratio, which needs no base, no prompts, and no
absolute scale, and does not depend on where the edit sits.

Storage rounding writes noise in every direction, the ablated one included, and fills the isolated eigenvalue
back in. Each writer's Gram is therefore first debiased by the rounding noise its storage type explains
(``diag(sum_j step_ij^2 / 12)`` per hidden row, :meth:`WeightSource.rounding_noise`), scaled by the smallest
factor by which that noise model was measured to over-predict the quantiser's real error for that type (so a
clean file is never over-debiased into a false gap). Both numbers are per storage type and live as data in
``core/data/base_free.json`` (:func:`calibration`): the noise model's factor, and the gap threshold, which is
``margin`` x the smallest gap measured on clean files of that type (``bench/audit_sweep.py --calibrate``, on
models and perturbations that are not the benchmark's test cells). A window of mixed types takes the smallest
threshold of its types; a type that was never calibrated takes the smallest threshold of all.

Windows: the layers are cut into ``BLOCKS`` consecutive blocks; every block, every pair of neighbouring blocks
(a quarter of the layers) and all layers together are scored, for three writer groups (o_proj and down_proj
together, and each alone: re-quantisation can restore part of an edit in one kind of tensor only). A window
whose writers have fewer than ``MIN_COLUMNS`` x hidden columns in all is skipped (one square ``o_proj``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

BLOCKS = 8
GROUPS: dict[str, tuple[str, ...]] = {"o_proj + down_proj": ("attn_output", "ffn_down"), "o_proj": ("attn_output",),
                                      "down_proj": ("ffn_down",)}
MIN_COLUMNS = 2  # a window's writers need this many x hidden columns: a random matrix with as many columns as rows
# has near-zero eigenvalues of its own (Marchenko-Pastur's lower edge (1 - sqrt(H / C))^2 is 0 at C = H)
CALIBRATION_FILE = "core/data/base_free.json"
SCHEMA = 1


class TypeCalibration(BaseModel):
    """One storage type's calibration (``core/data/base_free.json``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    noise_low: float = Field(ge=0, description="smallest measured / predicted rounding-noise energy along a direction")
    noise_high: float = Field(ge=0, description="largest measured / predicted rounding-noise energy along a direction")
    clean_min_gap: float | None = Field(None, gt=0, description="smallest lambda_1 / lambda_2 over the windows of the "
                                        "clean calibration files holding this type (None: no clean file had it)")
    clean_windows: int = Field(0, ge=0, description="windows of clean files holding this type")
    gap_threshold: float | None = Field(None, gt=0, lt=1, description="margin x clean_min_gap")


class Calibration(BaseModel):
    """The base-free calibration table: per storage type, the noise model's factor and the gap threshold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = Field(alias="schema", ge=SCHEMA, le=SCHEMA)
    generated_by: str
    margin: float = Field(gt=0, lt=1)
    calibration_models: list[str]
    types: dict[str, TypeCalibration] = Field(min_length=1)

    def threshold(self, storages: set[str]) -> tuple[float, list[str]]:
        """The gap threshold of a window holding these storage types (the smallest of theirs; the smallest of all for
        a type never calibrated), and the types that were never calibrated."""
        known = {t: c.gap_threshold for t, c in self.types.items() if c.gap_threshold is not None}
        missing = sorted(t for t in storages if t not in known)
        values = [known[t] for t in storages if t in known] + ([min(known.values())] if missing or not storages else [])
        return min(values), missing

    def noise_factor(self, storage: str) -> float:
        """How much of the predicted rounding noise to take out: the type's smallest measured factor; 0 for a type
        not in the table (nothing is taken out: over-debiasing could make a clean window's gap)."""
        t = self.types.get(storage)
        return t.noise_low if t is not None else 0.0


def build_calibration(noise_factors: dict[str, list[float]], clean_gaps: dict[str, list[float]], margin: float,
                      models: list[str], generated_by: str) -> Calibration:
    """The table from measurements: per type, the measured / predicted rounding-noise factors (float types: none,
    factor 1), and the gaps of every window of clean files holding that type (:func:`collect_gaps`); the
    threshold is ``margin`` x the smallest clean gap."""
    types = {}
    for t in sorted(set(clean_gaps) | set(noise_factors)):
        f = noise_factors.get(t) or [1.0]
        g = clean_gaps.get(t)
        types[t] = TypeCalibration(noise_low=round(float(min(f)), 3), noise_high=round(float(max(f)), 3),
                                   clean_min_gap=round(float(min(g)), 4) if g else None, clean_windows=len(g or ()),
                                   gap_threshold=round(margin * float(min(g)), 4) if g else None)
    return Calibration.model_validate({"schema": SCHEMA, "generated_by": generated_by, "margin": margin,
                                       "calibration_models": models, "types": types})


def collect_gaps(score: IsolatedDirection, into: dict[str, list[float]]) -> None:
    """Add a clean file's window gaps to ``into`` (storage type -> gaps of the windows holding it)."""
    for w in score.windows:
        for t in w.storages:
            into.setdefault(t, []).append(w.gap)


@lru_cache(maxsize=1)
def calibration() -> Calibration:
    """The packaged calibration table."""
    text = resources.files("cna_export").joinpath(CALIBRATION_FILE).read_text("utf-8")
    return Calibration.model_validate_json(text)


@dataclass
class WindowGap:
    """One writer group over one window of layers."""

    writers: str  # a key of GROUPS
    window: list[int]  # [first, last] layer
    gap: float  # debiased lambda_1 / lambda_2 of the window's summed Gram
    floor: float  # predicted rounding-noise energy taken out, as a share of lambda_2
    storages: list[str]
    threshold: float
    flagged: bool


@dataclass
class IsolatedDirection:
    """The base-free score: the smallest eigenvalue gap over every window and writer group, and its threshold."""

    score: float
    window: list[int]
    writers: str
    threshold: float
    flagged: bool
    flagged_windows: int
    uncalibrated: list[str]  # storage types missing from the calibration table
    windows: list[WindowGap] = field(default_factory=list)


class GramBlocks:
    """Per block of consecutive layers and writer role: ``sum W W^T`` minus the debiased rounding noise, and the
    storage types seen; fed one writer at a time (:meth:`add`), so only ``BLOCKS`` Grams per role are held."""

    def __init__(self, num_layers: int, hidden: int, table: Calibration | None = None):
        self.L, self.H = num_layers, hidden
        self.table = table or calibration()
        self.nb = min(BLOCKS, num_layers)
        self.bounds = [round(i * num_layers / self.nb) for i in range(self.nb + 1)]
        self.gram: dict[str, list[np.ndarray | None]] = {r: [None] * self.nb for r in GROUPS["o_proj + down_proj"]}
        self.noise: dict[str, list[np.ndarray | None]] = {r: [None] * self.nb for r in GROUPS["o_proj + down_proj"]}
        self.types: dict[str, list[set[str]]] = {r: [set() for _ in range(self.nb)] for r in self.gram}
        self.columns: dict[str, list[int]] = {r: [0] * self.nb for r in self.gram}

    def block(self, layer: int) -> int:
        return max(i for i in range(self.nb) if self.bounds[i] <= layer)

    def add(self, role: str, layer: int, gram: np.ndarray, noise: np.ndarray | None, storage: str,
            columns: int) -> None:
        """One writer's ``W W^T`` (hidden x hidden), its predicted rounding noise per hidden row (None: unknown), and
        its number of columns (inputs)."""
        if role not in self.gram or gram.shape != (self.H, self.H):
            return
        from ..io.quant_types import float_type

        storage = float_type(storage) or storage  # "float32" and "F32" are one type
        b = self.block(layer)
        n = np.zeros(self.H) if noise is None else self.table.noise_factor(storage) * np.asarray(noise, np.float64)
        self.gram[role][b] = gram if self.gram[role][b] is None else self.gram[role][b] + gram
        self.noise[role][b] = n if self.noise[role][b] is None else self.noise[role][b] + n
        self.types[role][b].add(storage)
        self.columns[role][b] += columns

    def windows(self) -> list[tuple[int, int]]:
        """Block ranges ``[a, b)``: every block, every pair of neighbours, and all blocks."""
        out = [(i, i + 1) for i in range(self.nb)] + [(i, i + 2) for i in range(self.nb - 1)]
        return out + ([(0, self.nb)] if self.nb > 2 else [])

    def score(self) -> IsolatedDirection | None:
        scores = [w for a, b in self.windows() for g in GROUPS if (w := self._window(g, a, b)) is not None]
        if not scores:
            return None
        hits = [w for w in scores if w.flagged]
        best = min(hits or scores, key=lambda w: w.gap / w.threshold)
        missing = sorted({t for w in scores for t in self.table.threshold(set(w.storages))[1]})
        return IsolatedDirection(score=best.gap, window=best.window, writers=best.writers, threshold=best.threshold,
                                 flagged=bool(hits), flagged_windows=len(hits), uncalibrated=missing, windows=scores)

    def _window(self, group: str, a: int, b: int) -> WindowGap | None:
        parts = [(self.gram[r][i], self.noise[r][i]) for r in GROUPS[group] for i in range(a, b)
                 if self.gram[r][i] is not None]
        if not parts or sum(self.columns[r][i] for r in GROUPS[group] for i in range(a, b)) < MIN_COLUMNS * self.H:
            return None
        storages = {t for r in GROUPS[group] for i in range(a, b) for t in self.types[r][i]}
        G = sum(g for g, _ in parts)
        noise = sum(n for _, n in parts)
        gap, floor = eigen_gap(G, noise)
        threshold, _ = self.table.threshold(storages)
        return WindowGap(writers=group, window=[self.bounds[a], self.bounds[b] - 1], gap=gap, floor=floor,
                         storages=sorted(storages), threshold=threshold, flagged=gap < threshold)


def eigen_gap(G: np.ndarray, noise: np.ndarray) -> tuple[float, float]:
    """``(lambda_1 / lambda_2, floor)`` of ``G - diag(noise)``, the smallest eigenvalue clamped at 0; ``floor``: the
    noise taken out along the weakest direction, as a share of ``lambda_2``."""
    from scipy.linalg import eigh

    A = G - np.diag(noise)
    w, V = eigh(A, subset_by_index=[0, 1])
    lam2 = float(w[1])
    if not lam2 > 0:
        return math.inf, 0.0
    return max(float(w[0]), 0.0) / lam2, float(V[:, 0] ** 2 @ noise) / lam2
