"""The statistics of the GGUF behaviour check: intervals over prompts, a paired test on top-1 flips, and a
three-way decision (pass, fail, undecided) with a stated false-alarm rate.

Positions within a prompt are correlated (one prompt's logits share its whole prefix), so every
interval comes from the prompts, not the positions: a paired bootstrap over prompts (the same prompts
resampled for every quantity, :func:`bootstrap_draws`) gives the standard error of a ratio of sums
(mean KL, flip rates, the steering slope), and the interval is ``estimate +- t x se`` with Student's t
at ``prompts - 1`` degrees of freedom (heavier tails than the bootstrap's own percentiles, which are
too narrow on 16 prompts).

Each criterion has a tolerance, an acceptable region for its quantity (:class:`Criterion`). It

* **fails** only when its interval at the strict level ``alpha`` lies wholly outside the region: an
  export whose true value is acceptable fails with probability at most ``alpha``;
* **passes** when its interval at the level ``MISS`` lies wholly inside the region: an export whose
  true value sits just outside the tolerance passes with probability at most ``MISS``;
* is **undecided** otherwise: the prompts were too few to tell (the caller widens the prompt set).

``alpha`` is the family-wise false-alarm rate split over every criterion and every look at the data
(Bonferroni, :class:`LookPlan`), so an exact export fails the behaviour check with probability at most
:data:`FALSE_ALARM` however many criteria are checked and however often the prompt set is widened.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

FALSE_ALARM = 0.01
"""Family-wise false-alarm rate: the most an exact export may fail the behaviour check, over every
criterion and every look (each widening of the prompt set)."""
MISS = 0.05
"""Per criterion: the most an export just outside a tolerance may pass it (the pass side's level)."""
CRITERIA = 4
"""The behavioural criteria that can fail: mean KL, top-1 flips, the steering slope, closer to steered."""
RESAMPLES = 2000
"""Bootstrap resamples of the prompts (fixed seed: the same data gives the same verdict)."""
SEED = 0

Verdict = Literal["pass", "fail", "undecided"]


@dataclass(frozen=True)
class LookPlan:
    """The prompt counts at which the data is looked at: ``start``, doubled until ``cap`` (or the prompts
    available) is reached. The false-alarm rate is split over every planned look."""

    sizes: tuple[int, ...]

    @classmethod
    def make(cls, start: int, cap: int, available: int) -> "LookPlan":
        end = max(1, min(max(start, cap), available))
        sizes = [max(1, min(start, end))]
        while sizes[-1] < end:
            sizes.append(min(2 * sizes[-1], end))
        return cls(tuple(sizes))

    @property
    def alpha(self) -> float:
        """The false-alarm rate of one criterion at one look."""
        return FALSE_ALARM / (CRITERIA * len(self.sizes))


def bootstrap_weights(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """``[resamples, n]`` counts: how often each of ``n`` prompts is drawn in each bootstrap resample."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def bootstrap_draws(num: Sequence[float], den: Sequence[float], weights: np.ndarray) -> np.ndarray:
    """The ratio ``sum(num) / sum(den)`` over each resample of the prompts (``weights`` from
    :func:`bootstrap_weights`); resamples whose denominator is 0 are left out."""
    n, d = weights @ np.asarray(num, dtype=np.float64), weights @ np.asarray(den, dtype=np.float64)
    keep = d > 0
    return n[keep] / d[keep]


@dataclass(frozen=True)
class Estimate:
    """A ratio of sums over prompts, its bootstrap standard error and the prompts it rests on."""

    value: float
    se: float
    prompts: int

    def interval(self, level: float) -> tuple[float, float]:
        """The interval leaving ``level`` in each tail (unbounded without a standard error)."""
        if self.prompts < 2 or not math.isfinite(self.se) or not math.isfinite(self.value):
            return -math.inf, math.inf
        from scipy.stats import t

        half = float(t.ppf(1 - level, self.prompts - 1)) * self.se
        return self.value - half, self.value + half


def ratio_estimate(num: Sequence[float], den: Sequence[float], weights: np.ndarray | None = None) -> Estimate:
    """``sum(num) / sum(den)`` with its paired-bootstrap standard error over the prompts (one entry each)."""
    num_a, den_a = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if not den_a.size or den_a.sum() <= 0:
        return Estimate(math.nan, math.nan, int(den_a.size))
    value = float(num_a.sum() / den_a.sum())
    if den_a.size < 2:
        return Estimate(value, math.nan, 1)
    w = bootstrap_weights(den_a.size) if weights is None else weights
    draws = bootstrap_draws(num_a, den_a, w)
    se = float(draws.std(ddof=1)) if draws.size > 1 else math.nan
    return Estimate(value, se, int(den_a.size))


@dataclass(frozen=True)
class Criterion:
    """An acceptable region ``[low, high]`` for a quantity (either end may be infinite)."""

    low: float = -math.inf
    high: float = math.inf

    def decide(self, est: Estimate, alpha: float, miss: float = MISS) -> "Decision":
        """Fail when the ``alpha``-interval misses the region, pass when the ``miss``-interval lies inside it.

        A one-sided region spends all of ``alpha`` on its one side; a two-sided one half on each."""
        sides = int(math.isfinite(self.low)) + int(math.isfinite(self.high))
        strict = est.interval(alpha / max(sides, 1))
        loose = est.interval(miss)
        if strict[0] > self.high or strict[1] < self.low:
            verdict: Verdict = "fail"
        elif self.low <= loose[0] and loose[1] <= self.high:
            verdict = "pass"
        else:
            verdict = "undecided"
        return Decision(est, strict, loose, verdict)


@dataclass(frozen=True)
class Decision:
    """One criterion's verdict, with the intervals it was made on."""

    estimate: Estimate
    strict: tuple[float, float]  # at alpha (what a failure needs to exclude)
    loose: tuple[float, float]  # at MISS (what a pass needs inside the tolerance)
    verdict: Verdict


def mcnemar_greater(b: int, c: int) -> float:
    """Exact one-sided McNemar p-value: of ``b + c`` discordant positions, ``b`` went one way (e.g. the
    steered pair flipped where the floor pair did not) and ``c`` the other; the chance of ``b`` or more
    under equal flip rates (an exact binomial test at 1/2; 1.0 with no discordant position)."""
    if b + c == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(int(b), int(b + c), 0.5, alternative="greater").pvalue)


def overall(verdicts: Sequence[Verdict]) -> Verdict:
    """Fail when any criterion fails, pass when all pass, else undecided."""
    if "fail" in verdicts:
        return "fail"
    return "pass" if all(v == "pass" for v in verdicts) else "undecided"
