"""GGUF behaviour check: the export in llama.cpp against hook steering in transformers, relative to the unsteered
noise floor (the verdict: :mod:`cna_export.verification.gguf_judge`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..core.errors import CnaError
from ..core.progress import bar as progress_bar
from ..core.settings.verify import GGUFVerifyOptions, VerifyOptions
from ..io.llama import llama_logits  # noqa: F401  (re-exported: the verification's llama.cpp logits)
from .gguf_judge import BehaviourResult, confident_agreement  # noqa: F401  (part of this API)
from .gguf_judge import judge as _judge
from .report import MetricAccumulator, logit_metrics
from .stats import LookPlan


def token_ids(tokenizer: Any, prompts: Sequence[str], opts: VerifyOptions) -> list[list[int]]:
    """Token ids of each prompt, rendered as :func:`cna_export.model.prompts.render` does (one user turn)."""
    from ..model.prompts import render

    texts = render(tokenizer, prompts, opts.chat_template, opts.system_prompt)
    ids = tokenizer(texts, add_special_tokens=not opts.chat_template)["input_ids"]
    out = []
    for i, seq in enumerate(ids):
        if opts.max_length:
            seq = seq[-opts.max_length :]
        if not seq:
            raise CnaError(f"prompt {i + 1} tokenised to nothing")
        out.append([int(t) for t in seq])
    return out


def top1_margin(logits: Any) -> np.ndarray:
    """Per position: log P(top-1) - log P(top-2) of a ``[positions, vocab]`` logit tensor (nats)."""
    import torch

    top = torch.log_softmax(logits.to(torch.float64), dim=-1).topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]).numpy()


def fresh_positions(ids: Sequence[Sequence[int]]) -> list[int]:
    """For each prompt, the first position whose token prefix no earlier prompt shares.

    A causal model computes identical logits for identical prefixes, so a chat template's
    shared system prompt would otherwise be counted once per prompt (on Qwen that is half of
    every prompt) and one noisy position would weigh as much as sixteen. The last position
    is always kept.
    """
    starts = []
    for i, seq in enumerate(ids):
        shared = 0
        for prev in ids[:i]:
            n = 0
            for a, b in zip(seq, prev, strict=False):
                if a != b:
                    break
                n += 1
            shared = max(shared, n)
        starts.append(min(shared, len(seq) - 1))
    return starts


class _Comparisons:
    """Running figures of the five comparisons, prompt by prompt (and per prompt, for the intervals)."""

    PAIRS = ("steered", "floor", "export_vs_plain", "effect_hf", "effect_llama")

    def __init__(self) -> None:
        self.acc = {k: MetricAccumulator() for k in self.PAIRS}
        self.details: list[dict[str, Any]] = []
        self.margins: dict[str, list[np.ndarray]] = {"floor": [], "steered": []}
        self.agree: dict[str, list[np.ndarray]] = {"floor": [], "steered": []}
        self.kl_sums: dict[str, list[float]] = {k: [] for k in self.PAIRS}
        self.positions: list[int] = []
        self.notes: list[str] = []
        self.slope_terms: list[tuple[float, float]] = []

    def add(self, plain: Any, hooked: Any, src: Any, exp: Any, start: int = 0) -> None:
        """One prompt: transformers plain/hooked and llama.cpp source/export logits, ``[positions, vocab]``;
        positions before ``start`` repeat an earlier prompt's (a shared prefix) and are not counted again."""
        plain, hooked, src, exp = plain[start:], hooked[start:], src[start:], exp[start:]
        v = min(plain.shape[-1], src.shape[-1])
        if plain.shape[-1] != src.shape[-1] and not self.notes:
            self.notes.append(f"vocabularies differ (transformers {plain.shape[-1]}, llama.cpp {src.shape[-1]}): "
                              f"compared on the first {v} tokens")  # fmt: skip
        plain, hooked, src, exp = plain[:, :v], hooked[:, :v], src[:, :v], exp[:, :v]
        per = {"steered": logit_metrics(hooked, exp), "floor": logit_metrics(plain, src),
               "export_vs_plain": logit_metrics(plain, exp), "effect_hf": logit_metrics(plain, hooked),
               "effect_llama": logit_metrics(src, exp)}  # fmt: skip
        self.details.append(self.acc["steered"].add(per["steered"]))
        for k in self.PAIRS[1:]:
            self.acc[k].add(per[k])
        for k in self.PAIRS:
            self.kl_sums[k].append(float(per[k]["kl"].sum()))
        self.positions.append(int(plain.shape[0]))
        self.margins["floor"].append(top1_margin(plain))
        self.margins["steered"].append(top1_margin(hooked))
        self.agree["floor"].append(per["floor"]["top1"].numpy())
        self.agree["steered"].append(per["steered"]["top1"].numpy())
        self.slope_terms.append(effect_slope_terms(plain, hooked, src, exp))

    def flips(self, min_margin: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per prompt, over the positions where both references are confident (margin >= ``min_margin``):
        how many, top-1 flips of the steered pair not of the floor pair (b), and of the floor pair not of
        the steered pair (c)."""
        n, b, c = [], [], []
        m, a = self.margins, self.agree
        for fm, sm, fa, sa in zip(m["floor"], m["steered"], a["floor"], a["steered"], strict=True):
            keep = (fm >= min_margin) & (sm >= min_margin)
            s_flip, f_flip = (sa[keep] < 0.5), (fa[keep] < 0.5)
            n.append(int(keep.sum()))
            b.append(int(np.sum(s_flip & ~f_flip)))
            c.append(int(np.sum(f_flip & ~s_flip)))
        return np.array(n, dtype=np.float64), np.array(b, dtype=np.float64), np.array(c, dtype=np.float64)


def effect_slope_terms(plain: Any, hooked: Any, src: Any, exp: Any) -> tuple[float, float]:
    """Numerator and denominator of the steering-reproduction slope for one prompt.

    a = log p_hooked - log p_plain (transformers' steering effect), b = log p_export - log p_source
    (llama.cpp's), both centred under w = (p_plain + p_hooked) / 2 at each position; returns
    (sum w a b, sum w a a). Their ratio regresses llama.cpp's logit change on transformers': 1 when
    the export moves llama.cpp exactly as hook steering moves transformers, 0 when not at all, 0.9
    when a tenth of the steering is missing. Noise that is not along the steering direction
    averages out, so the slope is far sharper than a KL.
    """
    import torch

    lp = [torch.log_softmax(x.to(torch.float64), dim=-1) for x in (plain, hooked, src, exp)]
    w = 0.5 * (lp[0].exp() + lp[1].exp())
    a, b = lp[1] - lp[0], lp[3] - lp[2]
    a = a - (w * a).sum(-1, keepdim=True)
    b = b - (w * b).sum(-1, keepdim=True)
    return float((w * a * b).sum()), float((w * a * a).sum())


def steering_slope(terms: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """The reproduction slope over all prompts and its jackknife standard error over prompts (nan if undefined)."""
    num, den = np.array([t[0] for t in terms], dtype=np.float64), np.array([t[1] for t in terms], dtype=np.float64)
    if not den.size or den.sum() <= 0:
        return float("nan"), float("nan")
    slope = float(num.sum() / den.sum())
    n = len(num)
    if n < 2:
        return slope, float("nan")
    rest_den = den.sum() - den
    if np.any(rest_den <= 0):
        return slope, float("nan")
    jack = (num.sum() - num) / rest_den
    return slope, float(np.sqrt((n - 1) / n * np.sum((jack - jack.mean()) ** 2)))


def check_behaviour(
    loaded: Any,
    source_path: Path,
    exported_path: Path,
    multipliers: Any,
    prompts: Sequence[str],
    opts: GGUFVerifyOptions,
    progress: bool = False,
    adapter: bool = False,
    start: int | None = None,
    session: Any = None,
) -> BehaviourResult:
    """Steered pair (hooked transformers vs llama.cpp export) against the noise floor (plain vs llama.cpp source).
    ``adapter``: ``exported_path`` is a LoRA adapter GGUF, run in llama.cpp on top of ``source_path`` at scale 1.

    ``prompts`` is the pool: the first ``start`` (default: all) are compared, and while a criterion is
    undecided the set is doubled, up to the whole pool (:class:`~cna_export.verification.stats.LookPlan`)."""
    t0 = time.perf_counter()
    ids = token_ids(loaded.tokenizer, prompts, opts)
    plan = LookPlan.make(start or len(ids), len(ids), len(ids))
    starts = fresh_positions(ids)
    comp = _Comparisons()
    done, widened = 0, []
    for size in plan.sizes:
        _compare(loaded, source_path, exported_path, multipliers, ids[done:size], starts[done:size], opts, comp,
                 progress, adapter, session)  # fmt: skip
        done = size
        result = _judge(comp, opts, t0, plan)
        if result.verdict != "undecided":
            break
        widened.append(f"{size} prompts left {', '.join(c.label for c in result.checks if c.undecided)} undecided")
    if done > plan.sizes[0]:  # the looks before the last one, and what each left undecided
        result.notes.append("prompts widened: " + "; ".join(widened[: plan.sizes.index(done)]))
    return result


def _compare(loaded: Any, source_path: Path, exported_path: Path, multipliers: Any, ids: Sequence[list[int]],
             starts: Sequence[int], opts: GGUFVerifyOptions, comp: _Comparisons, progress: bool, adapter: bool,
             session: Any = None) -> None:
    """Run ``ids`` through llama.cpp (source, export) and transformers (plain, hooked); add them to ``comp``."""
    import torch

    ll_src = (session.llama_source_logits(source_path, ids, opts.threads) if session is not None
              else llama_logits(source_path, ids, opts.threads))
    ll_exp = (llama_logits(source_path, ids, opts.threads, lora=exported_path) if adapter
              else llama_logits(exported_path, ids, opts.threads))
    iterator: Any = progress_bar(progress, range(len(ids)), desc="verify", unit="prompt", leave=True)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(opts.threads)  # oversubscribed intra-op threads are many times slower
    try:
        for i in iterator:
            plain, hooked = _reference_logits(loaded, ids[i], multipliers, opts.threads, session)
            comp.add(plain, hooked, torch.from_numpy(ll_src[i]), torch.from_numpy(ll_exp[i]), starts[i])
    finally:
        torch.set_num_threads(torch_threads)


def _reference_logits(loaded: Any, ids: Sequence[int], multipliers: Any, threads: int, session: Any) -> tuple[Any, Any]:
    """Transformers' plain and hook-steered logits of one prompt, from ``session`` when it computed them."""
    if session is None:
        return plain_logits(loaded, ids), steered_logits(loaded, ids, multipliers)
    from .session import multipliers_key

    base = (id(loaded), threads, tuple(int(t) for t in ids))
    plain = session.cached(("plain", *base), lambda: plain_logits(loaded, ids))
    hooked = session.cached(("hooked", multipliers_key(multipliers), *base),
                            lambda: steered_logits(loaded, ids, multipliers))
    return plain, hooked


def plain_logits(loaded: Any, ids: Sequence[int]) -> Any:
    """Transformers' float32 logits ``[positions, vocab]`` of one token id sequence, unsteered."""
    import torch

    x = torch.tensor([list(ids)], dtype=torch.long, device=loaded.input_device)
    with torch.inference_mode():
        return loaded.model(input_ids=x).logits[0].float().cpu()


def steered_logits(loaded: Any, ids: Sequence[int], multipliers: Any) -> Any:
    """Transformers' float32 logits ``[positions, vocab]`` of one token id sequence under hook steering."""
    import torch

    from ..model.steering import steer

    x = torch.tensor([list(ids)], dtype=torch.long, device=loaded.input_device)
    with torch.inference_mode(), steer(loaded.model, loaded.arch, multipliers):
        return loaded.model(input_ids=x).logits[0].float().cpu()
