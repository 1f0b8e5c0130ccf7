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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.circuit import Circuit, Neuron, UniversalNeuron, neuron_fields
from ..core.errors import CnaError
from ..core.progress import bar as progress_bar
from ..core.settings import DiscoverOptions, PromptOptions
from ..model.batching import resolve_batch_size
from ..model.loading import LoadedModel
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
    routing: dict[int, list[float]] | None = None  # MoE layer -> share of prompts routed to each expert
    batches: list[int] = field(default_factory=list)  # prompts in each batch (--batch-size auto varies them)

    @property
    def prompts_per_second(self) -> float:
        return self.prompts / self.seconds if self.seconds else float("inf")


Sink = Callable[[int, np.ndarray, Sequence[int]], None]
"""Receives (layer, last-token activations [batch, neurons] as float64, prompt indices of the rows)."""


def pool(x: Any, mask: Any, capture: str = "last", k: int = 1, reduce: str = "mean") -> Any:
    """``[batch, seq, d]`` -> ``[batch, d]`` at the captured position of left-padded rows: the last
    token, or the mean (``reduce="sum"``: the sum) over the last ``k`` real tokens."""
    if capture == "last" or mask is None:
        return x[:, -1, :]
    if capture != "mean-last-k":
        raise CnaError(f"unknown capture '{capture}' (choose last or mean-last-k)")
    k = min(k, x.shape[1])
    w = mask[:, -k:].to(x.dtype)
    total = (x[:, -k:, :] * w[..., None]).sum(dim=1)
    if reduce == "sum":
        return total
    return total / w.sum(dim=1, keepdim=True).clamp(min=1)


class LastTokenCapture:
    """Forward pre-hooks on every layer's down_proj that hand the captured position's input to a sink
    (and, with ``residual_sink``, forward hooks handing each decoder layer's output there).

    ``capture``/``k``: the last token (the paper) or the mean over the last ``k`` prompt tokens; the
    batch's attention mask (``self.mask``) says which trailing positions are real.
    """

    def __init__(self, loaded: LoadedModel, capture: str = "last", k: int = 1,
                 residual_sink: Sink | None = None):
        self.loaded = loaded
        self.sink: Sink | None = None
        self.residual_sink = residual_sink
        self.rows: Sequence[int] = ()
        self.mask: Any = None
        self.capture, self.k = capture, k
        self._handles: list[Any] = []
        self.width = 0
        self._experts: Any = None
        self.routing: dict[int, np.ndarray] = {}  # MoE layer -> prompts routed to each expert (last token)

    def _pool(self, x: Any, pad: bool = False) -> np.ndarray:
        out = pool(x.detach(), self.mask, self.capture, self.k).to("cpu").double().numpy()
        if pad and out.shape[1] < self.width:  # a narrower layer of a MoE model (DeepSeek's dense first layers)
            out = np.pad(out, ((0, 0), (0, self.width - out.shape[1])))
        return out

    def __enter__(self) -> LastTokenCapture:
        from .experts import ExpertCapture

        layers = self.loaded.arch.layer_modules(self.loaded.model)
        layout = self.loaded.layout()
        self.width = layout.max_width
        if layout.is_moe:
            self._experts = ExpertCapture(self, pool)
            self._experts.__enter__()
        for layer in range(self.loaded.num_layers):

            def hook(module: Any, args: tuple, layer: int = layer) -> None:
                if self.sink is not None:
                    self.sink(layer, self._pool(args[0], pad=True), self.rows)

            if layer not in layout.moe_layers:  # MoE layers: captured by ExpertCapture
                self._handles.append(self.loaded.down_proj(layer).register_forward_pre_hook(hook))
            if self.residual_sink is not None:

                def out_hook(module: Any, args: tuple, output: Any, layer: int = layer) -> None:
                    h = output[0] if isinstance(output, (tuple, list)) else output
                    self.residual_sink(layer, self._pool(h), self.rows)  # type: ignore[misc]

                self._handles.append(layers[layer].register_forward_hook(out_hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._experts is not None:
            self._experts.__exit__(*exc)
            self._experts = None


def prompt_options(opts: PromptOptions | None, settings: dict[str, Any]) -> PromptOptions:
    """``opts``, or (a call without it) ``settings`` as :class:`DiscoverOptions` fields (``batch_size``,
    ``chat_template``, ``max_length``, ``system_prompt``, ``capture``, ``capture_k``)."""
    if opts is not None and settings:
        raise TypeError(f"give the prompt options or their fields, not both ({', '.join(settings)})")
    return opts if opts is not None else DiscoverOptions(**settings)


@dataclass
class _Prompts:
    """Prompts ready to run: their options, the captured position (``capture``, ``k``), the rendered texts."""

    opts: PromptOptions
    capture: str
    k: int
    rendered: list[str]


def _prepare(loaded: LoadedModel, texts: Sequence[str], opts: PromptOptions | None,
             settings: dict[str, Any]) -> _Prompts:
    """The options (:func:`prompt_options`), the captured position (discovery's settings, else the last
    token) and the texts rendered with the chat template."""
    opts = prompt_options(opts, settings)
    capture, k = (opts.capture, opts.capture_k) if isinstance(opts, DiscoverOptions) else ("last", 1)
    return _Prompts(opts, capture, k, render(loaded.tokenizer, texts, opts.chat_template, opts.system_prompt))


def run_prompts(
    loaded: LoadedModel,
    texts: Sequence[str],
    sink: Sink,
    opts: PromptOptions | None = None,
    *,
    desc: str = "prompts",
    progress: bool = True,
    residual_sink: Sink | None = None,
    **settings: Any,
) -> CaptureReport:
    """Run the decoder stack over ``texts`` in batches, feeding the captured position's down_proj
    inputs to ``sink`` (and each layer's output to ``residual_sink``). ``opts``: how the prompts are
    rendered and batched and, for :class:`DiscoverOptions`, the captured position (see :func:`prompt_options`)."""
    import torch

    run = _prepare(loaded, texts, opts, settings)
    rendered, opts = run.rendered, run.opts
    decoder = loaded.arch.decoder_module(loaded.model)
    tokens = 0
    sizes: list[int] = []
    start = time.perf_counter()
    bar = progress_bar(progress, total=len(rendered), desc=desc, unit="prompt", leave=True)
    with LastTokenCapture(loaded, run.capture, run.k, residual_sink) as cap, torch.inference_mode():
        cap.sink = sink
        size = resolve_batch_size(opts.batch_size, loaded)
        for batch in batches(loaded.tokenizer, rendered, size, opts.chat_template, loaded.input_device,
                             opts.max_length):
            sizes.append(len(batch.indices))
            cap.rows = batch.indices
            cap.mask = batch.attention_mask
            decoder(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            )
            tokens += int(batch.attention_mask.sum())
            bar.update(len(batch.indices))
    bar.close()
    routing = {layer: (hits / max(len(rendered), 1)).tolist() for layer, hits in sorted(cap.routing.items())}
    return CaptureReport(len(rendered), tokens, time.perf_counter() - start, routing or None, sizes)


def run_gradients(loaded: LoadedModel, texts: Sequence[str], sink: Sink, opts: PromptOptions | None = None, *,
                  desc: str = "gradients", progress: bool = True, **settings: Any) -> CaptureReport:
    """One forward and one backward pass of the full model per batch: ``sink`` receives
    ``∂B/∂a`` for every layer's down_proj input at the captured position (summed over the last
    ``k`` tokens for mean-last-k), where ``B`` is :func:`scores.behaviour_score` at the answer
    position (the last prompt token's next-token distribution). ``opts``: as for :func:`run_prompts`."""
    import torch

    from .scores import behaviour_score, opening_token_ids

    refusal_ids, compliance_ids = opening_token_ids(loaded.tokenizer)
    if loaded.layout().is_moe:
        raise CnaError("not supported yet: gradient scores (attribution) on a mixture-of-experts model; use a "
                       "forward-only score (--score direction, or --recipe recipes/refusal-direction.yaml)")
    run = _prepare(loaded, texts, opts, settings)
    rendered, opts, capture, capture_k = run.rendered, run.opts, run.capture, run.k
    model = loaded.model
    tokens = 0
    start = time.perf_counter()
    bar = progress_bar(progress, total=len(rendered), desc=desc, unit="prompt", leave=True)
    state: dict[str, Any] = {}
    handles = []
    sizes: list[int] = []

    def embed_hook(module: Any, args: tuple, output: Any) -> Any:
        return output.detach().requires_grad_(True)  # the graph starts here: no parameter gradients

    def make_pre(layer: int) -> Callable:
        def pre(module: Any, args: tuple) -> None:
            x = args[0]
            if not x.requires_grad:
                return
            rows, mask = state["rows"], state["mask"]

            def grad_hook(g: Any) -> None:
                sink(layer, pool(g, mask, capture, capture_k, reduce="sum").to("cpu").double().numpy(), rows)

            x.register_hook(grad_hook)

        return pre

    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        handles.append(model.get_input_embeddings().register_forward_hook(embed_hook))
        for layer in range(loaded.num_layers):
            handles.append(loaded.down_proj(layer).register_forward_pre_hook(make_pre(layer)))
        with torch.enable_grad():
            for batch in batches(loaded.tokenizer, rendered, resolve_batch_size(opts.batch_size, loaded, backward=True),
                                 opts.chat_template, loaded.input_device, opts.max_length):
                sizes.append(len(batch.indices))
                state["rows"], state["mask"] = batch.indices, batch.attention_mask
                out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            position_ids=batch.position_ids, use_cache=False, logits_to_keep=1)
                b = behaviour_score(out.logits[:, -1, :], refusal_ids, compliance_ids)
                b.sum().backward()
                tokens += int(batch.attention_mask.sum())
                bar.update(len(batch.indices))
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    bar.close()
    return CaptureReport(len(rendered), tokens, time.perf_counter() - start, batches=sizes)


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
