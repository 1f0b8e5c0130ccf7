"""GGUF behaviour check: the export in llama.cpp against hook steering in transformers, relative to the unsteered noise floor."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence
import numpy as np

from ..core.errors import CnaError
from ..core.progress import bar as progress_bar
from ..io.llama import llama_logits  # noqa: F401  (re-exported: the verification's llama.cpp logits)
from .report import Check, MetricAccumulator, logit_metrics
from ..core.settings import GGUFVerifyOptions, VerifyOptions  # noqa: F401  (GGUFVerifyOptions: part of this API)


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


def confident_agreement(margin: np.ndarray, agree: np.ndarray, min_margin: float) -> float:
    """Top-1 agreement over the positions whose reference margin is at least ``min_margin`` nats."""
    keep = margin >= min_margin
    return float(agree[keep].mean()) if np.any(keep) else 1.0


@dataclass
class BehaviourResult:
    metrics: dict[str, float]
    details: list[dict[str, Any]]
    reasons: list[str]
    notes: list[str]
    checks: list[Check] = field(default_factory=list)


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
            for a, b in zip(seq, prev):
                if a != b:
                    break
                n += 1
            shared = max(shared, n)
        starts.append(min(shared, len(seq) - 1))
    return starts


class _Comparisons:
    """Running figures of the five comparisons, prompt by prompt."""

    PAIRS = ("steered", "floor", "export_vs_plain", "effect_hf", "effect_llama")

    def __init__(self) -> None:
        self.acc = {k: MetricAccumulator() for k in self.PAIRS}
        self.details: list[dict[str, Any]] = []
        self.margins: dict[str, list[np.ndarray]] = {"floor": [], "steered": []}
        self.agree: dict[str, list[np.ndarray]] = {"floor": [], "steered": []}
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
        st, fl = logit_metrics(hooked, exp), logit_metrics(plain, src)
        self.details.append(self.acc["steered"].add(st))
        self.acc["floor"].add(fl)
        self.acc["export_vs_plain"].add(logit_metrics(plain, exp))
        self.acc["effect_hf"].add(logit_metrics(plain, hooked))
        self.acc["effect_llama"].add(logit_metrics(src, exp))
        self.margins["floor"].append(top1_margin(plain))
        self.margins["steered"].append(top1_margin(hooked))
        self.agree["floor"].append(fl["top1"].numpy())
        self.agree["steered"].append(st["top1"].numpy())
        self.slope_terms.append(effect_slope_terms(plain, hooked, src, exp))


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
) -> BehaviourResult:
    """Steered pair (hooked transformers vs llama.cpp export) against the noise floor (plain vs llama.cpp source).
    ``adapter``: ``exported_path`` is a LoRA adapter GGUF, run in llama.cpp on top of ``source_path`` at scale 1."""
    import torch

    from ..model.steering import steer

    t0 = time.perf_counter()
    ids = token_ids(loaded.tokenizer, prompts, opts)
    ll_src = llama_logits(source_path, ids, opts.threads)
    ll_exp = (llama_logits(source_path, ids, opts.threads, lora=exported_path) if adapter
              else llama_logits(exported_path, ids, opts.threads))
    comp = _Comparisons()
    starts = fresh_positions(ids)
    iterator: Any = progress_bar(progress, range(len(ids)), desc="verify", unit="prompt", leave=True)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(opts.threads)  # oversubscribed intra-op threads are many times slower
    try:
        for i in iterator:
            x = torch.tensor([ids[i]], dtype=torch.long, device=loaded.input_device)
            with torch.inference_mode():
                plain = loaded.model(input_ids=x).logits[0].float().cpu()
                with steer(loaded.model, loaded.arch, multipliers):
                    hooked = loaded.model(input_ids=x).logits[0].float().cpu()
            comp.add(plain, hooked, torch.from_numpy(ll_src[i]), torch.from_numpy(ll_exp[i]), starts[i])
    finally:
        torch.set_num_threads(torch_threads)
    return _judge(comp, opts, t0)


def _judge(comp: _Comparisons, opts: GGUFVerifyOptions, t0: float) -> BehaviourResult:
    """Metrics, pass/fail reasons and notes from the accumulated comparisons."""
    acc, margins, agree, notes, details = comp.acc, comp.margins, comp.agree, comp.notes, comp.details
    m = {k: a.metrics() for k, a in acc.items()}
    metrics = dict(m["steered"])
    for k in ("mean_kl", "max_kl", "top1_agreement", "max_abs_logit_delta"):
        metrics[f"floor_{k}"] = m["floor"][k]
    floor_kl, kl = m["floor"]["mean_kl"], m["steered"]["mean_kl"]
    metrics["kl_ratio"] = (kl / floor_kl) if floor_kl > 0 else (1.0 if kl == 0 else float("inf"))
    metrics["export_vs_unsteered_mean_kl"] = m["export_vs_plain"]["mean_kl"]
    metrics["steering_effect_mean_kl"] = m["effect_hf"]["mean_kl"]
    metrics["export_effect_mean_kl"] = m["effect_llama"]["mean_kl"]
    metrics["behaviour_seconds"] = time.perf_counter() - t0

    effect = metrics["steering_effect_mean_kl"]
    allowed = opts.max_kl_ratio * floor_kl + opts.max_effect_share * effect
    metrics["allowed_mean_kl"] = allowed
    metrics["excess_share_of_effect"] = (kl - floor_kl) / effect if effect > 0 else (0.0 if kl <= floor_kl else float("inf"))
    allowance = f"{opts.max_kl_ratio:g} x noise floor {floor_kl:.4g}" + (
        f" + {opts.max_effect_share:g} x steering effect {effect:.4g}" if opts.max_effect_share else ""
    )
    reasons: list[str] = []
    if not kl <= allowed:
        reasons.append(f"steered mean KL {kl:.4g} is above the allowed {allowed:.4g} ({allowance}); its excess over "
                       f"the floor is {metrics['excess_share_of_effect']:.2%} of the steering effect")  # fmt: skip
    raw_top1, raw_floor_top1 = m["steered"]["top1_agreement"], m["floor"]["top1_agreement"]
    fm, sm = np.concatenate(margins["floor"]), np.concatenate(margins["steered"])
    top1 = confident_agreement(sm, np.concatenate(agree["steered"]), opts.top1_min_margin)
    floor_top1 = confident_agreement(fm, np.concatenate(agree["floor"]), opts.top1_min_margin)
    metrics["confident_top1_agreement"] = top1
    metrics["floor_confident_top1_agreement"] = floor_top1
    metrics["confident_positions"] = float(np.sum(sm >= opts.top1_min_margin))
    metrics["floor_confident_positions"] = float(np.sum(fm >= opts.top1_min_margin))
    where = f"at positions with a reference margin >= {opts.top1_min_margin:g} nats" if opts.top1_min_margin else ""
    if top1 < floor_top1 - opts.max_top1_drop - 1e-12:
        reasons.append(f"steered top-1 agreement {top1:.2%} {where} is more than {opts.max_top1_drop:.2%} below "
                       f"the noise floor's {floor_top1:.2%}".replace("  ", " "))  # fmt: skip
    slope, slope_se = steering_slope(comp.slope_terms)
    metrics["steering_reproduced"], metrics["steering_reproduced_se"] = slope, slope_se
    slope_ok = True
    if effect > floor_kl:  # steering measurably moves the model: llama.cpp must move with it
        allowed_off = opts.max_steering_error + 2 * (slope_se if np.isfinite(slope_se) else 0.0)
        slope_ok = abs(slope - 1) <= allowed_off
        if not slope_ok:
            reasons.append(f"llama.cpp reproduces {slope:.1%} (+- {slope_se:.1%}) of the hook-steering effect; "
                           f"allowed 100% +- {opts.max_steering_error:.0%} (+ 2 standard errors)")  # fmt: skip
    if effect > floor_kl and not kl < metrics["export_vs_unsteered_mean_kl"]:
        reasons.append(f"the export is not closer to hook steering (mean KL {kl:.4g}) than to the unsteered "
                       f"model (mean KL {metrics['export_vs_unsteered_mean_kl']:.4g})")  # fmt: skip
    notes += [
        f"noise floor (llama.cpp source vs transformers, no steering): mean KL {floor_kl:.4g}, "
        f"top-1 {raw_floor_top1:.2%} (steered pair {raw_top1:.2%}), max |delta logit| "
        f"{m['floor']['max_abs_logit_delta']:.3g}",
        f"steered mean KL {kl:.4g} = {metrics['kl_ratio']:.3f}x the floor, excess {metrics['excess_share_of_effect']:.2%} "
        f"of the steering effect; allowed {allowed:.4g} ({allowance})",
        f"top-1 {top1:.2%} vs {floor_top1:.2%} {where} ({int(metrics['confident_positions'])} and "
        f"{int(metrics['floor_confident_positions'])} positions; at most -{opts.max_top1_drop:.2%})",
        f"steering reproduced: llama.cpp's logit change is {slope:.2%} (+- {slope_se:.2%}) of transformers' "
        f"(slope; at most {opts.max_steering_error:.0%} off"
        + ("" if effect > floor_kl else "; not checked: the steering effect is within the noise floor") + ")",
        f"steering moves transformers by mean KL {metrics['steering_effect_mean_kl']:.4g} and llama.cpp by "
        f"{metrics['export_effect_mean_kl']:.4g}; export vs unsteered transformers: mean KL "
        f"{metrics['export_vs_unsteered_mean_kl']:.4g}",
    ]
    checks = [
        Check(label="noise floor mean KL", value=f"{floor_kl:.3e}", tolerance="-"),
        Check(label="mean KL, allowed", value=f"{kl:.3e}", tolerance=f"<= {allowed:.3e}", ok=kl <= allowed),
        Check(label=f"top-1 agreement, margin >= {opts.top1_min_margin:g}", value=f"{top1:.2%}",
              tolerance=f">= {max(0.0, floor_top1 - opts.max_top1_drop):.2%}",
              ok=not top1 < floor_top1 - opts.max_top1_drop - 1e-12),
    ]  # fmt: skip
    if effect > floor_kl:
        checks += [
            Check(label="steering reproduced (slope)", value=f"{slope:.1%} +- {slope_se:.1%}",
                  tolerance=f"100% +- {opts.max_steering_error:.0%}", ok=slope_ok),
            Check(label="KL to steered / to unsteered", value=f"{kl / max(metrics['export_vs_unsteered_mean_kl'], 1e-300):.2%}",
                  tolerance="< 100%", ok=kl < metrics["export_vs_unsteered_mean_kl"]),
        ]  # fmt: skip
    return BehaviourResult(metrics, details, reasons, notes, checks)
