"""Contrastive Neuron Attribution: find the MLP neurons that best separate two prompt sets.

Method (arXiv 2605.12290): the activation of neuron j in layer L is the j-th
input of ``mlp.down_proj`` (for gated MLPs ``act(gate x) * up x``) at the last
token of the chat-templated prompt. The score is mean(positive) - mean(negative)
(or that difference over the pooled standard deviation); neurons are ranked by
|score| over all layers and the top fraction of *all* MLP neurons forms the
circuit. Neurons that are in the per-layer top-k of |activation| on at least a
threshold share of a diverse neutral prompt set ("universal" neurons) are
excluded, as the paper prescribes (its released code forgets this step on the
contrastive path).

The capture (batched forward passes of the decoder stack, last-token hooks on down_proj, streaming
per-neuron statistics) is :mod:`cna_export.discovery.capture`; this module turns its statistics into a
circuit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.circuit import Circuit, Neuron, UniversalNeuron, neuron_fields
from ..core.errors import CnaError
from ..core.settings.discover import DiscoverOptions
from ..model.loading import LoadedModel
from ..model.prompts import PromptSet
from .capture import CaptureReport, RunningStats, TopKCounts, run_gradients, run_prompts

log = logging.getLogger(__name__)


@dataclass
class ContrastStats:
    """Everything discovery measures; circuits of any size and strategy are selected from it
    without new passes.

    Beyond the paper's per-neuron means: ``residual_positive``/``residual_negative`` (the decoder
    layers' outputs at the captured position, ``[layers, hidden]``), ``neutral_acts`` (activation
    sums on the neutral set, for drift), ``write_proj`` (``[layers, neurons, layers]``:
    ``W_down[l][:, j] · r̂_d`` for every direction layer ``d``), ``write_norm_sq`` (``‖W_down[l][:, j]‖²``)
    and ``grad_positive``/``grad_negative`` (means of ``∂B/∂a``, only when gradients were collected).
    """

    positive: RunningStats
    negative: RunningStats
    neutral: TopKCounts | None
    reports: dict[str, CaptureReport]
    residual_positive: RunningStats | None = None
    residual_negative: RunningStats | None = None
    neutral_acts: RunningStats | None = None
    write_proj: np.ndarray | None = None
    write_norm_sq: np.ndarray | None = None
    grad_positive: RunningStats | None = None
    grad_negative: RunningStats | None = None
    layout: Any = None  # core.experts.Layout of a MoE model (flat index <-> (layer, expert, index))
    routing: dict[int, list[float]] | None = None  # MoE layer -> share of prompts routed to each expert
    batches: list[int] = field(default_factory=list)  # prompts in each batch (--batch-size auto varies them)

    def scores(self, method: str, opts: DiscoverOptions | None = None) -> np.ndarray:
        """The ``[layers, neurons]`` scores of ``method`` (see :mod:`cna_export.discovery.scores`)."""
        from .scores import score

        return score(self, method, opts)

    def residual_directions(self) -> np.ndarray:
        """``[layers, hidden]`` unit vectors r̂_l = normalised mean_pos(h_l) - mean_neg(h_l)."""
        if self.residual_positive is None or self.residual_negative is None:
            raise CnaError("these statistics were collected without the residual stream")
        diff = self.residual_positive.mean - self.residual_negative.mean
        norm = np.linalg.norm(diff, axis=1, keepdims=True)
        return np.divide(diff, norm, out=np.zeros_like(diff), where=norm > 0)

    def add_weights(self, loaded: Any) -> None:
        """Project every neuron's write vector (down_proj column) on every layer's behaviour direction.

        Exact for architectures whose MLP output is added to the residual stream as is (Llama,
        Mistral, Qwen, Phi-3); Gemma 2/3 normalise the MLP output first, so there it is the
        direction of the pre-norm write."""
        dirs = self.residual_directions()  # [L, H]
        L = dirs.shape[0]
        width = self.positive.width
        self.write_proj = np.zeros((L, width, L))
        self.write_norm_sq = np.zeros((L, width))
        for layer in range(L):
            w = loaded.down_weight(layer).detach().to("cpu").double().numpy()  # [H, W] (MoE: all experts)
            self.write_proj[layer, : w.shape[1]] = w.T @ dirs.T
            self.write_norm_sq[layer, : w.shape[1]] = np.square(w).sum(axis=0)


def collect(
    loaded: LoadedModel,
    positive: PromptSet,
    negative: PromptSet,
    neutral: PromptSet | None,
    opts: DiscoverOptions,
    progress: bool = True,
    gradients: bool | None = None,
) -> ContrastStats:
    """Run the three prompt sets and accumulate streaming statistics (activations, residual stream,
    and with ``gradients`` (default: when ``opts.score`` is attribution) one forward and backward
    pass of the full model per batch of the positive and negative sets)."""
    L, width, hidden = loaded.num_layers, loaded.intermediate_size, loaded.hidden_size
    pos, neg = RunningStats(L, width), RunningStats(L, width)
    rpos, rneg = RunningStats(L, hidden), RunningStats(L, hidden)
    reports: dict[str, CaptureReport] = {}
    for name, stats, res, prompts in (("positive", pos, rpos, positive), ("negative", neg, rneg, negative)):
        reports[name] = run_prompts(loaded, prompts.texts, stats.add, opts, desc=name, progress=progress,
                                    residual_sink=res.add)
        stats.count = res.count = len(prompts)
    topk = neutral_acts = None
    if neutral is not None:
        topk = TopKCounts(L, width, opts.universal_top_k)
        neutral_acts = RunningStats(L, width)

        def both(layer: int, acts: np.ndarray, rows: Sequence[int]) -> None:
            topk.add(layer, acts, rows)  # type: ignore[union-attr]
            neutral_acts.add(layer, acts, rows)  # type: ignore[union-attr]

        reports["neutral"] = run_prompts(loaded, neutral.texts, both, opts, desc="neutral", progress=progress)
        topk.count = neutral_acts.count = len(neutral)
    out = ContrastStats(pos, neg, topk, reports, rpos, rneg, neutral_acts)
    if loaded.layout().is_moe:
        out.layout = loaded.layout()
        n = len(positive) + len(negative)
        out.routing = {layer: [(a * len(positive) + b * len(negative)) / n for a, b in
                               zip(reports["positive"].routing[layer], reports["negative"].routing[layer])]
                       for layer in sorted(reports["positive"].routing or {})}
    out.add_weights(loaded)
    if gradients if gradients is not None else opts.score == "attribution":
        gpos, gneg = RunningStats(L, width), RunningStats(L, width)
        for name, stats, prompts in (("positive", gpos, positive), ("negative", gneg, negative)):
            reports[f"gradients_{name}"] = run_gradients(loaded, prompts.texts, stats.add, opts,
                                                         desc=f"gradients ({name})", progress=progress)
            stats.count = len(prompts)
        out.grad_positive, out.grad_negative = gpos, gneg
    return out


def check_settings(opts: DiscoverOptions, num_layers: int) -> None:
    """Settings that can be checked against the model before any forward pass."""
    for layer in opts.exclude_layers:
        if not 0 <= layer < num_layers:
            raise CnaError(f"--exclude-layers: layer {layer} is out of range (model has {num_layers} layers)")


def circuit_size(opts: DiscoverOptions, total_neurons: int) -> int:
    if opts.top_k is not None:
        return opts.top_k
    return max(1, int(round(opts.top_fraction * total_neurons)))


def eligible(stats: ContrastStats, opts: DiscoverOptions, scores: np.ndarray | None = None) -> np.ndarray:
    """``[layers, neurons]`` mask of the neurons a circuit may contain: not in an excluded layer, not
    universal, and of the requested sign (``opts.sign``: both, or only positive/negative scores)."""
    scores = stats.scores(opts.score, opts) if scores is None else scores
    allowed = np.ones_like(scores, dtype=bool)
    if stats.layout is not None:  # MoE models: positions past a narrower layer's neurons are padding
        for layer in range(allowed.shape[0]):
            allowed[layer, stats.layout.width(layer):] = False
    allowed[list(opts.exclude_layers)] = False
    if stats.neutral is not None:
        allowed &= ~(stats.neutral.frequency >= opts.universal_threshold)
    if opts.sign == "positive":
        allowed &= scores > 0
    elif opts.sign == "negative":
        allowed &= scores < 0
    return allowed


def select(
    stats: ContrastStats,
    loaded: LoadedModel,
    opts: DiscoverOptions,
    prompt_sets: dict[str, PromptSet],
    top_k: int | None = None,
) -> Circuit:
    """Rank neurons over all layers (``opts.rank``: by |score|, or per expected benign drift), drop
    excluded layers, universal neurons and (with ``opts.sign``) the other sign, keep the top k; each
    neuron carries ``opts.multiplier`` or its own (``opts.multiplier_mode``)."""
    from .scores import neuron_multipliers, rank_key

    scores = stats.scores(opts.score, opts)
    L, width = scores.shape
    check_settings(opts, L)
    allowed = eligible(stats, opts, scores)
    universal: list[UniversalNeuron] = []
    layout = stats.layout
    if stats.neutral is not None:
        freq = stats.neutral.frequency
        for layer, index in zip(*np.nonzero(freq >= opts.universal_threshold)):
            if layout is not None and index >= layout.width(int(layer)):
                continue
            where = neuron_fields(layout.key(int(layer), int(index))) if layout is not None else {
                "layer": int(layer), "index": int(index)}
            universal.append(UniversalNeuron(**where, frequency=float(freq[layer, index])))
    total = layout.total if layout is not None else L * width
    k = top_k if top_k is not None else circuit_size(opts, total)
    if k > int(allowed.sum()):
        raise CnaError(f"circuit size {k} exceeds the {int(allowed.sum())} neurons left after exclusions")
    flat = np.where(allowed, rank_key(stats, scores, opts), -1.0).ravel()
    order = np.argsort(-flat, kind="stable")[:k]  # ties: lower (layer, index) first
    pm, nm = stats.positive.mean, stats.negative.mean
    per_neuron = neuron_multipliers(stats, opts)
    neurons = []
    for f in order:
        layer, index = divmod(int(f), width)
        where = neuron_fields(layout.key(layer, index)) if layout is not None else {"layer": layer, "index": index}
        neurons.append(
            Neuron(
                **where,
                score=float(scores[layer, index]),
                positive_mean=float(pm[layer, index]),
                negative_mean=float(nm[layer, index]),
                multiplier=opts.multiplier if per_neuron is None else float(per_neuron[layer, index]),
            )
        )
    counts: dict[int, int] = {}
    for n in neurons:
        counts[n.layer] = counts.get(n.layer, 0) + 1
    position = ("down_proj input at the last prompt token" if opts.capture == "last"
                else f"down_proj input averaged over the last {opts.capture_k} prompt tokens")
    method = {
        "name": "cna-contrastive",
        "activation": position,
        **opts.method_params(),
        "circuit_size": k,
        "total_neurons": total,
    }
    if layout is not None:
        method["expert_activation"] = ("routing weight x activation at the captured token, 0 when the token is "
                                       "not routed to the expert; shared experts: the plain activation")
    circuit = Circuit(
        model=loaded.identity(),
        method=method,
        prompts={name: ps.info() for name, ps in prompt_sets.items()},
        neurons=neurons,
        universal_neurons=universal,
        per_layer_counts=dict(sorted(counts.items())),
        routing_frequency=stats.routing or {},
    )
    if opts.multiplier_mode == "learned":  # fitted on the model and the prompts (discovery/learned.py)
        from .learned import learn_circuit

        circuit = learn_circuit(loaded, circuit, prompt_sets, opts)
    return circuit


@dataclass
class DiscoveryResult:
    circuit: Circuit
    stats: ContrastStats


def discover(loaded: LoadedModel, positive: PromptSet, negative: PromptSet, neutral: PromptSet | None,
             opts: DiscoverOptions, progress: bool = True) -> DiscoveryResult:
    """Library entry point: collect statistics and select the circuit."""
    if len(positive) < 2 or len(negative) < 2:
        raise CnaError("discovery needs at least 2 positive and 2 negative prompts")
    check_settings(opts, loaded.num_layers)
    stats = collect(loaded, positive, negative, neutral, opts, progress)
    sets = {"positive": positive, "negative": negative}
    if neutral is not None:
        sets["neutral"] = neutral
    return DiscoveryResult(select(stats, loaded, opts, sets), stats)
