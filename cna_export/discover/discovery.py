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

Implementation: batched forward passes of the decoder stack only (no LM head),
left padding with attention masks and position ids counted over real tokens,
forward pre-hooks on down_proj that keep only the last token, and streaming
per-neuron statistics (float64 sums and sums of squares, top-k membership
counts), so memory does not grow with the number of prompts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..core.circuit import Circuit, Neuron, UniversalNeuron
from ..core.errors import CnaError
from ..core.progress import bar as progress_bar
from ..model.loading import LoadedModel
from ..core.settings import DiscoverOptions
from ..model.prompts import PromptSet, batches, render

log = logging.getLogger(__name__)


@dataclass
class RunningStats:
    """Per-neuron streaming mean/variance over prompts, one row per layer (float64)."""

    num_layers: int
    width: int
    count: int = 0
    total: np.ndarray = field(init=False)
    total_sq: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.total = np.zeros((self.num_layers, self.width), dtype=np.float64)
        self.total_sq = np.zeros((self.num_layers, self.width), dtype=np.float64)

    def add(self, layer: int, acts: np.ndarray, rows: Sequence[int] = ()) -> None:
        self.total[layer] += acts.sum(axis=0)
        self.total_sq[layer] += np.square(acts).sum(axis=0)

    @property
    def mean(self) -> np.ndarray:
        if self.count == 0:
            raise CnaError("a prompt set produced no activations")
        return self.total / self.count

    @property
    def var(self) -> np.ndarray:
        m = self.mean
        return np.maximum(self.total_sq / self.count - m * m, 0.0)


@dataclass
class TopKCounts:
    """How often each neuron is in its layer's top-k by |activation| (universal-neuron detection)."""

    num_layers: int
    width: int
    k: int
    count: int = 0
    hits: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.hits = np.zeros((self.num_layers, self.width), dtype=np.int64)

    def add(self, layer: int, acts: np.ndarray, rows: Sequence[int] = ()) -> None:
        k = min(self.k, self.width)
        top = np.argpartition(-np.abs(acts), k - 1, axis=1)[:, :k]
        np.add.at(self.hits[layer], top.ravel(), 1)

    @property
    def frequency(self) -> np.ndarray:
        return self.hits / max(self.count, 1)


@dataclass
class CaptureReport:
    prompts: int
    tokens: int
    seconds: float

    @property
    def prompts_per_second(self) -> float:
        return self.prompts / self.seconds if self.seconds else float("inf")


Sink = Callable[[int, np.ndarray, Sequence[int]], None]
"""Receives (layer, last-token activations [batch, neurons] as float64, prompt indices of the rows)."""


class LastTokenCapture:
    """Forward pre-hooks on every layer's down_proj that hand the last token's input to a sink."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.sink: Sink | None = None
        self.rows: Sequence[int] = ()
        self._handles: list[Any] = []

    def __enter__(self) -> "LastTokenCapture":
        for layer in range(self.loaded.num_layers):
            down = self.loaded.down_proj(layer)

            def hook(module: Any, args: tuple, layer: int = layer) -> None:
                if self.sink is not None:
                    last = args[0][:, -1, :].detach().to("cpu").double().numpy()
                    self.sink(layer, last, self.rows)

            self._handles.append(down.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def run_prompts(
    loaded: LoadedModel,
    texts: Sequence[str],
    sink: Sink,
    batch_size: int,
    chat_template: bool,
    max_length: int | None = None,
    desc: str = "prompts",
    progress: bool = True,
    system_prompt: str | None = None,
) -> CaptureReport:
    """Run the decoder stack over ``texts`` in batches, feeding last-token down_proj inputs to ``sink``."""
    import torch

    rendered = render(loaded.tokenizer, texts, chat_template, system_prompt)
    decoder = loaded.arch.decoder_module(loaded.model)
    tokens = 0
    start = time.perf_counter()
    bar = progress_bar(progress, total=len(rendered), desc=desc, unit="prompt", leave=True)
    with LastTokenCapture(loaded) as cap, torch.inference_mode():
        cap.sink = sink
        for batch in batches(
            loaded.tokenizer, rendered, batch_size, chat_template, loaded.input_device, max_length
        ):
            cap.rows = batch.indices
            decoder(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            )
            tokens += int(batch.attention_mask.sum())
            bar.update(len(batch.indices))
    bar.close()
    return CaptureReport(len(rendered), tokens, time.perf_counter() - start)


@dataclass
class ContrastStats:
    """Everything discovery measures; circuits of any size are selected from it without new passes."""

    positive: RunningStats
    negative: RunningStats
    neutral: TopKCounts | None
    reports: dict[str, CaptureReport]

    def scores(self, method: str) -> np.ndarray:
        diff = self.positive.mean - self.negative.mean
        if method == "mean-diff":
            return diff
        if method == "standardized":
            pooled = np.sqrt(0.5 * (self.positive.var + self.negative.var))
            out = np.zeros_like(diff)
            np.divide(diff, pooled, out=out, where=pooled > 0)
            return out
        raise CnaError(f"unknown score '{method}' (choose mean-diff or standardized)")


def collect(
    loaded: LoadedModel,
    positive: PromptSet,
    negative: PromptSet,
    neutral: PromptSet | None,
    opts: DiscoverOptions,
    progress: bool = True,
) -> ContrastStats:
    """Run the three prompt sets and accumulate streaming statistics."""
    L, width = loaded.num_layers, loaded.intermediate_size
    pos, neg = RunningStats(L, width), RunningStats(L, width)
    reports: dict[str, CaptureReport] = {}
    common = dict(
        batch_size=opts.batch_size,
        chat_template=opts.chat_template,
        max_length=opts.max_length,
        progress=progress,
        system_prompt=opts.system_prompt,
    )
    for name, stats, prompts in (("positive", pos, positive), ("negative", neg, negative)):
        reports[name] = run_prompts(loaded, prompts.texts, stats.add, desc=name, **common)
        stats.count = len(prompts)
    topk = None
    if neutral is not None:
        topk = TopKCounts(L, width, opts.universal_top_k)
        reports["neutral"] = run_prompts(loaded, neutral.texts, topk.add, desc="neutral", **common)
        topk.count = len(neutral)
    return ContrastStats(pos, neg, topk, reports)


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
    scores = stats.scores(opts.score) if scores is None else scores
    allowed = np.ones_like(scores, dtype=bool)
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
    """Rank neurons by |score| over all layers, drop excluded layers, universal neurons and (with
    ``opts.sign``) the other sign, keep the top k."""
    scores = stats.scores(opts.score)
    L, width = scores.shape
    check_settings(opts, L)
    allowed = eligible(stats, opts, scores)
    universal: list[UniversalNeuron] = []
    if stats.neutral is not None:
        freq = stats.neutral.frequency
        for layer, index in zip(*np.nonzero(freq >= opts.universal_threshold)):
            universal.append(UniversalNeuron(layer=int(layer), index=int(index), frequency=float(freq[layer, index])))
    k = top_k if top_k is not None else circuit_size(opts, L * width)
    if k > int(allowed.sum()):
        raise CnaError(f"circuit size {k} exceeds the {int(allowed.sum())} neurons left after exclusions")
    flat = np.where(allowed, np.abs(scores), -1.0).ravel()
    order = np.argsort(-flat, kind="stable")[:k]  # ties: lower (layer, index) first
    pm, nm = stats.positive.mean, stats.negative.mean
    neurons = []
    for f in order:
        layer, index = divmod(int(f), width)
        neurons.append(
            Neuron(
                layer=layer,
                index=index,
                score=float(scores[layer, index]),
                positive_mean=float(pm[layer, index]),
                negative_mean=float(nm[layer, index]),
                multiplier=opts.multiplier,
            )
        )
    counts: dict[int, int] = {}
    for n in neurons:
        counts[n.layer] = counts.get(n.layer, 0) + 1
    method = {
        "name": "cna-contrastive",
        "activation": "down_proj input at the last prompt token",
        **opts.method_params(),
        "circuit_size": k,
        "total_neurons": L * width,
    }
    return Circuit(
        model=loaded.identity(),
        method=method,
        prompts={name: ps.info() for name, ps in prompt_sets.items()},
        neurons=neurons,
        universal_neurons=universal,
        per_layer_counts=dict(sorted(counts.items())),
    )


@dataclass
class DiscoveryResult:
    circuit: Circuit
    stats: ContrastStats


def discover(
    loaded: LoadedModel,
    positive: PromptSet,
    negative: PromptSet,
    neutral: PromptSet | None,
    opts: DiscoverOptions,
    progress: bool = True,
) -> DiscoveryResult:
    """Library entry point: collect statistics and select the circuit."""
    if len(positive) < 2 or len(negative) < 2:
        raise CnaError("discovery needs at least 2 positive and 2 negative prompts")
    check_settings(opts, loaded.num_layers)
    stats = collect(loaded, positive, negative, neutral, opts, progress)
    sets = {"positive": positive, "negative": negative}
    if neutral is not None:
        sets["neutral"] = neutral
    return DiscoveryResult(select(stats, loaded, opts, sets), stats)
