"""Metrics: distinct-4-gram quality (the paper's formula), KL divergence, intervals and paired tests."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from cna_export.evaluation.metrics import (
    distinct_ngram_fraction,
    kl_divergence,
    log_softmax,
    mcnemar_p,
    mean,
    ngrams,
    paired_flips,
    quality,
    wilson_interval,
)


def paper_quality(text: str, n: int = 4) -> float:
    """experiments/steering_comparison.py generation_quality, verbatim in substance."""
    words = text.split()
    if len(words) < n:
        return 1.0 - 0.0
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - (1.0 - len(set(grams)) / len(grams))


def test_distinct_ngram_math():
    assert distinct_ngram_fraction("a b c d".split()) == 1.0
    # abcd bcda cdab dabc abcd: 4 distinct of 5
    assert distinct_ngram_fraction("a b c d a b c d".split()) == pytest.approx(0.8)
    # six identical words: 3 identical 4-grams
    assert distinct_ngram_fraction(["x"] * 6) == pytest.approx(1 / 3)
    assert distinct_ngram_fraction("a b c".split()) == 1.0  # no 4-grams
    assert distinct_ngram_fraction([]) == 1.0
    assert distinct_ngram_fraction("a a b b".split(), n=2) == 1.0  # aa ab bb
    assert distinct_ngram_fraction("a b a b a".split(), n=2) == 0.5  # ab ba ab ba
    assert ngrams([1, 2, 3], 2) == [(1, 2), (2, 3)]
    with pytest.raises(ValueError):
        ngrams([1], 0)


def test_quality_uses_whitespace_words():
    assert quality("the cat sat on the mat") == 1.0
    assert quality("go go go go go go go go") == pytest.approx(1 / 5)
    # punctuation stays attached to words, newlines separate them
    assert quality("a b c d.\na b c d") == 1.0


def test_quality_equals_the_papers_formula():
    rng = random.Random(0)
    vocab = ["the", "a", "cat", "dog", "ran", "sat", "on", "mat"]
    for _ in range(200):
        text = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 40)))
        assert quality(text) == pytest.approx(paper_quality(text))


def test_log_softmax():
    x = np.array([[1.0, 2.0, 3.0], [1000.0, 1000.0, -1000.0]])
    lp = log_softmax(x)
    assert np.allclose(np.exp(lp).sum(-1), 1.0)
    assert np.allclose(log_softmax(x + 7.0), lp)
    assert lp[1, 0] == pytest.approx(math.log(0.5))


def test_kl_divergence_values():
    p = np.log(np.array([0.5, 0.5]))
    q = np.log(np.array([0.9, 0.1]))
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kl_divergence(p, q) == pytest.approx(expected)
    assert kl_divergence(p, p) == 0.0
    # zero reference probability contributes nothing
    with np.errstate(divide="ignore"):
        p0 = np.log(np.array([1.0, 0.0]))
    assert kl_divergence(p0, np.log(np.array([0.5, 0.5]))) == pytest.approx(math.log(2))
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 50))
    same = kl_divergence(log_softmax(logits), log_softmax(logits))
    assert same.shape == (5,) and np.all(same == 0.0)
    other = kl_divergence(log_softmax(logits), log_softmax(np.roll(logits, 1, axis=1)))
    assert np.all(other > 0)
    with pytest.raises(ValueError):
        kl_divergence(np.zeros(3), np.zeros(4))


def test_wilson_interval():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(1 - hi)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(51, 100)
    assert lo < 0.51 < hi and hi - lo < 0.2


def test_paired_flips_and_mcnemar():
    before = [True] * 10 + [False] * 10
    after = [False] * 10 + [False] * 10
    assert paired_flips(before, after) == (10, 0)
    assert mcnemar_p(before, after) == pytest.approx(2 / 1024)
    assert mcnemar_p(before, before) == 1.0
    assert paired_flips([True, False], [False, True]) == (1, 1)
    assert mcnemar_p([True, False], [False, True]) == 1.0
    with pytest.raises(ValueError):
        paired_flips([True], [])


def test_mean_skips_missing():
    assert mean([1.0, None, 3.0]) == 2.0
    assert mean([]) is None
