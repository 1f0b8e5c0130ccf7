"""Capture for CNA: batched forward (and backward) passes over chat-templated prompts that keep, per layer,
the last token's input of ``mlp.down_proj`` and stream per-neuron statistics (float64 sums and sums of
squares, top-k membership counts), so memory does not grow with the number of prompts.

Implementation: the decoder stack only (no LM head), left padding with attention masks and position ids
counted over real tokens, forward pre-hooks on down_proj that keep only the last token.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.errors import CnaError
from ..core.progress import bar as progress_bar
from ..core.settings.base import PromptOptions
from ..core.settings.discover import DiscoverOptions
from ..model.batching import resolve_batch_size
from ..model.loading import LoadedModel
from ..model.prompts import batches, render

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
