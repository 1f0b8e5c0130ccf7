"""Per-neuron scores, drift-aware ranking and per-neuron multipliers for CNA circuits.

Every function here works on the streaming statistics of :mod:`cna_export.discovery.cna`
(``ContrastStats``): means over prompts at the captured position, never per-prompt arrays,
so a circuit of any strategy is reselected from saved statistics without new passes.

Notation (layer ``l``, neuron ``j``; "captured position": the last prompt token, or the mean
over the last ``k`` prompt tokens, see ``DiscoverOptions.capture``):

* ``a_j``: the neuron's activation, the j-th input of ``mlp.down_proj`` (``act(gate x) * up x``).
* ``Δ_j = mean_pos(a_j) - mean_neg(a_j)``: the paper's mean difference.
* ``h_l``: the residual stream (the decoder layer's output) at the captured position;
  ``r̂_l = (mean_pos(h_l) - mean_neg(h_l)) / ‖·‖``: the behaviour direction at layer ``l``.
* ``w_j = W_down[l][:, j]``: what neuron ``j`` writes into the residual stream per unit activation.
* ``g_j = ∂B/∂a_j``: the gradient of the behaviour score ``B`` (refusal-vs-compliance
  log-probability gap of the first answer token, see :data:`REFUSAL_OPENINGS`) w.r.t. the
  activation at the captured position.

Scores (``DiscoverOptions.score``; positive = the neuron pushes towards the positive set's behaviour):

``mean-diff`` (the paper)      ``Δ_j``
``standardized``               ``Δ_j / sqrt((var_pos(a_j) + var_neg(a_j)) / 2)``
``direction``                  ``Δ_j · (w_j · r̂_d)``, ``d = l`` (``direction_layer: own``) or a fixed layer
``attribution``                ``Δ_j · mean_pos(g_j)``: first-order estimate of how much ``B`` falls when the
                               neuron's activation on the positive prompts is patched to the negative mean

Ranking (``DiscoverOptions.rank``):

``score`` (the paper)          ``|score_j|``
``per-drift``                  ``|score_j| / sqrt(D_j + ε)``, ``D_j = E_benign[a_j²] · ‖w_j‖²`` (the expected
                               squared size of what the neuron writes on the negative and neutral prompts,
                               i.e. the residual change that ablating it causes where it should change
                               nothing), ``ε = drift_floor · median(D)``; neurons silent on benign prompts
                               rank first. Both numerator and ``sqrt(D)`` scale linearly with the edit, so
                               the key is dimensionless.

Multipliers (``DiscoverOptions.multiplier_mode``):

``constant``                   every neuron gets ``multiplier`` (the paper: 0)
``mean-match``                 ``m_j = clip(mean_neg(a_j) / mean_pos(a_j), lo, hi)``, moved towards 1 by
                               ``multiplier_strength`` ``t``: ``m_j = 1 + t (m_j - 1)``; scaling neuron ``j``
                               by ``m_j`` puts its positive-set mean on its negative-set mean (``t = 1``)
                               and leaves it where it was (``t = 0``). One scalar per neuron: every export
                               folds it exactly.
``learned``                    one scalar per circuit neuron fitted by gradient descent on the model and the
                               recipe's prompts (behaviour loss + λ KL on benign answers + L1 on ``m - 1``);
                               :mod:`cna_export.discovery.learned`, called by ``select``, not from statistics
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..core.errors import CnaError

# First tokens of typical refusal and compliance answers (the behaviour score of ``attribution``).
REFUSAL_OPENINGS = ("I'm sorry", "I cannot", "I can't", "I apologize", "Sorry", "As an AI", "Unfortunately", "No")
COMPLIANCE_OPENINGS = ("Sure", "Here", "Certainly", "Of course", "To", "Step", "1.", "Absolutely", "Creating", "The")

SCORES = ("mean-diff", "standardized", "direction", "attribution")
RANKS = ("score", "per-drift")
MULTIPLIER_MODES = ("constant", "mean-match", "learned")


def _need(stats: Any, attr: str, what: str) -> Any:
    v = getattr(stats, attr, None)
    if v is None:
        raise CnaError(f"the '{what}' needs statistics these were collected without ({attr}); rerun discovery")
    return v


def mean_diff(stats: Any, opts: Any = None) -> np.ndarray:
    """``Δ_j = mean_pos(a_j) - mean_neg(a_j)`` (the paper's score)."""
    return stats.positive.mean - stats.negative.mean


def standardized(stats: Any, opts: Any = None) -> np.ndarray:
    """``Δ_j / sqrt((var_pos + var_neg) / 2)`` (0 where both variances vanish)."""
    diff = mean_diff(stats)
    pooled = np.sqrt(0.5 * (stats.positive.var + stats.negative.var))
    out = np.zeros_like(diff)
    np.divide(diff, pooled, out=out, where=pooled > 0)
    return out


def direction_layer_index(opts: Any, num_layers: int) -> int | None:
    """None for ``own`` (each neuron's layer), else the chosen layer (negative counts from the end)."""
    d = getattr(opts, "direction_layer", "own") if opts is not None else "own"
    if d in (None, "own"):
        return None
    layer = int(d)
    if layer < 0:
        layer += num_layers
    if not 0 <= layer < num_layers:
        raise CnaError(f"direction_layer {d} is out of range (model has {num_layers} layers)")
    return layer


def direction(stats: Any, opts: Any = None) -> np.ndarray:
    """``Δ_j · (w_j · r̂_d)``: the neuron's mean-difference contribution along the behaviour direction
    of the residual stream at its own layer's output (``d = l``) or at a chosen layer ``d``."""
    proj = _need(stats, "write_proj", "direction score")  # [L, W, L]: w_j · r̂_d for every d
    L = proj.shape[0]
    d = direction_layer_index(opts, L)
    if d is None:
        along = proj[np.arange(L), :, np.arange(L)]  # [L, W]: each layer's own direction
    else:
        along = proj[:, :, d]
    return mean_diff(stats) * along


def attribution(stats: Any, opts: Any = None) -> np.ndarray:
    """``Δ_j · mean_pos(∂B/∂a_j)``: attribution patching of the behaviour score ``B`` (refusal minus
    compliance first-token log-probability gap) from the positive to the negative mean activation."""
    grads = _need(stats, "grad_positive", "attribution score")
    return mean_diff(stats) * grads.mean


SCORE_FUNCTIONS: dict[str, Callable[[Any, Any], np.ndarray]] = {
    "mean-diff": mean_diff,
    "standardized": standardized,
    "direction": direction,
    "attribution": attribution,
}


def score(stats: Any, method: str, opts: Any = None) -> np.ndarray:
    """The ``[layers, neurons]`` score matrix of ``method`` (see the module docstring)."""
    try:
        fn = SCORE_FUNCTIONS[method]
    except KeyError:
        raise CnaError(f"unknown score '{method}' (choose {', '.join(SCORES)})") from None
    return fn(stats, opts)


def benign_drift(stats: Any) -> np.ndarray:
    """``D_j = E[a_j²] · ‖w_j‖²`` over the negative and (when collected) neutral prompts."""
    norms = _need(stats, "write_norm_sq", "per-drift ranking")
    sq = stats.negative.total_sq.copy()
    n = stats.negative.count
    neutral_acts = getattr(stats, "neutral_acts", None)
    if neutral_acts is not None and neutral_acts.count:
        sq = sq + neutral_acts.total_sq
        n += neutral_acts.count
    return sq / max(n, 1) * norms


def rank_key(stats: Any, scores: np.ndarray, opts: Any) -> np.ndarray:
    """What the circuit is ranked by (higher first): ``|score|`` or ``|score| / sqrt(D + ε)``."""
    rank = getattr(opts, "rank", "score")
    if rank == "score":
        return np.abs(scores)
    if rank == "per-drift":
        drift = benign_drift(stats)
        floor = float(getattr(opts, "drift_floor", 0.1)) * float(np.median(drift))
        return np.abs(scores) / np.sqrt(drift + max(floor, 1e-30))
    raise CnaError(f"unknown rank '{rank}' (choose {', '.join(RANKS)})")


def neuron_multipliers(stats: Any, opts: Any) -> np.ndarray | None:
    """``[layers, neurons]`` multipliers of ``opts.multiplier_mode``, or None for ``constant`` (the circuit
    then carries ``opts.multiplier``) and ``learned`` (fitted later, from there, by
    :func:`cna_export.discovery.learned.learn_circuit`)."""
    mode = getattr(opts, "multiplier_mode", "constant")
    if mode in ("constant", "learned"):
        return None
    if mode == "mean-match":
        lo, hi = opts.mean_match_range
        pm, nm = stats.positive.mean, stats.negative.mean
        ratio = np.full_like(pm, 1.0)
        np.divide(nm, pm, out=ratio, where=np.abs(pm) > 1e-12)
        m = np.clip(ratio, lo, hi)
        t = float(opts.multiplier_strength)
        return 1.0 + t * (m - 1.0)
    raise CnaError(f"unknown multiplier mode '{mode}' (choose {', '.join(MULTIPLIER_MODES)})")


# ---------------------------------------------------------------------------------------
# Behaviour score for attribution
# ---------------------------------------------------------------------------------------


def opening_token_ids(tokenizer: Any, refusal: tuple[str, ...] = REFUSAL_OPENINGS,
                      compliance: tuple[str, ...] = COMPLIANCE_OPENINGS) -> tuple[list[int], list[int]]:
    """First token of each opening (as the answer's first word); tokens in both lists are dropped."""

    def first(texts: tuple[str, ...]) -> list[int]:
        out: list[int] = []
        for t in texts:
            ids = tokenizer(t, add_special_tokens=False)["input_ids"]
            if ids and ids[0] not in out:
                out.append(int(ids[0]))
        return out

    r, c = first(refusal), first(compliance)
    both = set(r) & set(c)
    r = [i for i in r if i not in both]
    c = [i for i in c if i not in both]
    if not r or not c:
        raise CnaError("the refusal and compliance openings share every first token; cannot score attribution")
    return r, c


def behaviour_score(logits: Any, refusal_ids: list[int], compliance_ids: list[int]) -> Any:
    """``B = logsumexp(log p[refusal]) - logsumexp(log p[compliance])`` per row of ``[batch, vocab]`` logits."""
    import torch

    lp = torch.log_softmax(logits.float(), dim=-1)
    return torch.logsumexp(lp[:, refusal_ids], dim=-1) - torch.logsumexp(lp[:, compliance_ids], dim=-1)
