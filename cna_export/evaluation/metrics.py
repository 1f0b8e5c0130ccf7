"""Evaluation metrics: refusal rates with confidence intervals, output quality, and drift (KL).

Quality
    The paper's ``generation_quality`` (experiments/steering_comparison.py):
    ``1 - ngram_repetition_ratio`` with n = 4 over **whitespace-separated words**
    (``text.split()``), i.e. the fraction of distinct word 4-grams::

        quality = |set(4-grams)| / |4-grams|

    A text with fewer than 4 words has no 4-grams and scores 1.0 (the paper's
    repetition ratio is 0 there). Words, not tokenizer tokens, keep the score
    independent of the tokenizer and identical to the paper's. Per-prompt
    scores are averaged.

Drift
    ``KL(P_reference || P_steered)`` in nats between next-token distributions
    (full vocabulary, float64), averaged over prompts. ``kl_last`` compares the
    distributions at the last prompt position (the first answer token);
    ``kl_gen`` teacher-forces the reference model's own greedy answer and
    averages over the last prompt position and the next positions of that
    answer (per prompt first, then over prompts). The evaluation computes
    both on the benign prompts.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

from ..core.numerics import kl_divergence, log_softmax  # noqa: F401  (part of the metrics API)


def words(text: str) -> list[str]:
    return text.split()


def ngrams(items: Sequence, n: int) -> list[tuple]:
    if n < 1:
        raise ValueError("n must be at least 1")
    return [tuple(items[i : i + n]) for i in range(len(items) - n + 1)]


def distinct_ngram_fraction(items: Sequence, n: int = 4) -> float:
    """Unique n-grams / total n-grams; 1.0 when there are no n-grams."""
    grams = ngrams(items, n)
    if not grams:
        return 1.0
    return len(set(grams)) / len(grams)


def quality(text: str, n: int = 4) -> float:
    """The paper's output quality: distinct word n-gram fraction (1 - repetition ratio)."""
    return distinct_ngram_fraction(words(text), n)


def mean(values: Iterable[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion k/n (sensible for small n and k near 0 or n)."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_flips(before: Sequence[bool], after: Sequence[bool]) -> tuple[int, int]:
    """(refused before and not after, not refused before and refused after) over matched prompts."""
    if len(before) != len(after):
        raise ValueError("paired results must have the same length")
    down = sum(1 for b, a in zip(before, after) if b and not a)
    up = sum(1 for b, a in zip(before, after) if a and not b)
    return down, up


def mcnemar_p(before: Sequence[bool], after: Sequence[bool]) -> float:
    """Exact two-sided McNemar p-value for a paired change in refusal (binomial on the discordant pairs)."""
    b, c = paired_flips(before, after)
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def agreement(a: Sequence[bool], b: Sequence[bool]) -> float | None:
    """The share of matched items on which two judges agree (None for no items)."""
    if len(a) != len(b):
        raise ValueError("paired results must have the same length")
    return sum(x == y for x, y in zip(a, b)) / len(a) if a else None
