"""Log-probability arithmetic shared by generation, verification and evaluation."""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = np.asarray(logits, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def kl_divergence(logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
    """KL(P || Q) in nats per row, from log-probabilities (float64, vocab on the last axis).

    Tokens with zero reference probability contribute nothing; tiny negative
    values from rounding are clipped to 0.
    """
    logp = np.asarray(logp, dtype=np.float64)
    logq = np.asarray(logq, dtype=np.float64)
    if logp.shape != logq.shape:
        raise ValueError(f"distributions differ in shape: {logp.shape} vs {logq.shape}")
    p = np.exp(logp)
    diff = np.where(p > 0, logp - logq, 0.0)
    return np.maximum(np.sum(p * diff, axis=-1), 0.0)
