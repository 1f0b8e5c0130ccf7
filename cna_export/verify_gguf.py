"""Verify a steered GGUF export: exact tensor checks, then behaviour in llama.cpp against hook steering.

Two independent checks, reported in one :class:`cna_export.verify.VerifyReport`:

1. **Tensors.** Every KV pair and every untouched tensor of the export is
   byte-identical to the source (``general.name`` and ``cna.manifest`` aside);
   the touched tensors hash to the manifest's before/after sha256; the
   dequantised touched rows (columns, bias elements) equal multiplier x the
   dequantised source rows: exactly for multipliers 0 and -1, within one
   rounding of the scale fields otherwise; their other rows are byte-identical.

2. **Behaviour.** The export in llama.cpp (llama-cpp-python, all-position
   logits) is compared with hook steering of the source in transformers (the
   source GGUF dequantised, :func:`cna_export.steering.steer`) on a prompt set,
   with identical token ids on both sides: the transformers tokenizer's ids,
   chat-templated as :func:`cna_export.prompts.render` does, fed to llama.cpp.
   Every position is compared once: a prefix shared with an earlier prompt (a
   chat template's system prompt) is not counted again (:func:`fresh_positions`).
   llama.cpp never matches transformers exactly (it quantises activations for
   quantised matmuls), so the unsteered pair (the source in llama.cpp vs
   transformers without hooks) gives the noise floor. The export passes when
   its discrepancy stays within that floor:

   * mean KL(transformers || llama.cpp) at most ``max_kl_ratio`` x the floor's
     plus ``max_effect_share`` x the steering effect (mean KL between hooked and
     plain transformers). The second term is there because the floor grows with
     steering: a steered model sits further from llama.cpp than the unsteered
     one, the more so the harder it is steered (correct exact exports measured
     1.03x to 1.31x the unsteered floor, an excess of 0.05% to 0.14% of the
     steering effect; an export at x0.1 instead of x0 is 0.6% to 1.8% off, one
     missing a tenth of its neurons 4.6% to 12%; ``bench/verify_sensitivity.py``).
   * top-1 agreement at most ``max_top1_drop`` below the floor's, counted where
     the transformers reference is not at a near-tie (top-1 minus top-2
     log-probability at least ``top1_min_margin``, 0.1 nats): near-ties flip
     under any numeric noise, and steering changes how many there are (ablating
     SmolLM2's refusal circuit makes gaps under 0.05 nats 3-4x more common),
     which moved raw top-1 agreement by 2 points on an export exactly as
     accurate as its source. ``top1_min_margin=0`` counts every position.
   * when steering moves transformers by more than the floor, llama.cpp's
     logit change (export vs source) must reproduce transformers' (hooked vs
     plain): their regression slope (:func:`effect_slope_terms`) within
     ``max_steering_error`` (3%) of 1, plus twice its jackknife standard error
     over prompts. Correct exports measure 0.998 to 1.006; multipliers off by
     0.1, missing neurons or the wrong neurons move it well away from 1.
   * when steering moves transformers by more than the floor, the export must
     also be closer to the hook-steered reference than to the unsteered model
     (so an export that forgot to steer cannot pass on noise alone).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pydantic import Field

from .errors import CnaError, VerificationFailed
from .gguf_export import STEERED_SUFFIX, plan_patches, read_gguf_manifest, resolve_gguf_model
from .io import gguf as G
from .io.quants import LAYOUTS, dequantize_rows
from .manifest import GGUF_KEY, ExportManifest
from .verify import Check, MetricAccumulator, PromptDetail, Tolerances, VerifyOptions, VerifyReport, logit_metrics, verification_prompts

log = logging.getLogger(__name__)

_ROUNDOFF = {"f16": 2.0**-11, "f16_iq1m": 2.0**-11, "bf16": 2.0**-8, "f32": 2.0**-24, "f64": 2.0**-53}


class GGUFVerifyOptions(VerifyOptions):
    """GGUF verification settings (llama.cpp against hook steering, relative to the noise floor)

    Extends :class:`cna_export.verify.VerifyOptions` (prompts, limit, absolute tolerances).
    """

    max_kl_ratio: float = Field(1.1, gt=0, description="GGUF: steered mean KL may be at most this x the unsteered noise floor")
    max_effect_share: float = Field(
        0.01, ge=0,
        description="GGUF: plus this share of the steering effect (transformers' mean KL between hooked and plain): "
        "the steered model sits further from llama.cpp than the unsteered one; 0: the noise floor alone",
    )  # fmt: skip
    max_top1_drop: float = Field(0.01, ge=0, le=1, description="GGUF: steered top-1 agreement may be at most this below the noise floor's")
    top1_min_margin: float = Field(
        0.1, ge=0,
        description="GGUF: count top-1 agreement where the reference's top-1/top-2 log-prob gap is at least this "
        "(nats; near-ties flip under any noise); 0: all positions",
    )  # fmt: skip
    max_steering_error: float = Field(
        0.03, ge=0,
        description="GGUF: llama.cpp must reproduce the hook-steering effect to within this share (regression slope "
        "of its logit change on transformers', plus twice its standard error)",
    )  # fmt: skip
    threads: int = Field(2, gt=0, description="GGUF: CPU threads for llama.cpp and the transformers reference")


@dataclass
class TensorCheck:
    """Result of the exact tensor check."""

    n_tensors: int
    n_identical: int
    touched: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


# ---------------------------------------------------------------------------
# Tensor check
# ---------------------------------------------------------------------------


def check_tensors(source: Any, exported: Any, manifest: ExportManifest) -> TensorCheck:
    """Exact comparison of the export with its source, driven by the manifest."""
    failures: list[str] = []
    header_changed = exported.get_field(GGUF_KEY) is not None
    ignore = ("general.name", GGUF_KEY) if header_changed else ()
    failures += [f"KV: {d}" for d in G.kv_differences(source, exported, ignore=ignore)]
    if header_changed:
        name = G.field_value(exported, "general.name", "")
        if not str(name).endswith(STEERED_SUFFIX):
            failures.append(f"general.name {name!r} is not marked as steered")

    spec = G.gguf_arch(source)
    plan = plan_patches(source, spec, manifest.multiplier_map(), manifest.fold)
    listed = {t.name: t for t in manifest.tensors}
    if set(plan) != set(listed):
        failures.append(
            f"manifest lists tensors {sorted(listed)} but its multipliers touch {sorted(plan)}"
        )
    untouched_diffs = G.tensor_differences(source, exported, ignore_data=plan.keys())
    failures += untouched_diffs
    n_untouched = sum(1 for t in source.tensors if t.name not in plan)
    n_identical = n_untouched - sum(1 for d in untouched_diffs if d.endswith("bytes differ"))

    src_t, exp_t = G.tensor_map(source), G.tensor_map(exported)
    touched: list[dict[str, Any]] = []
    for name, patch in plan.items():
        s, e = src_t.get(name), exp_t.get(name)
        if s is None or e is None or s.tensor_type != e.tensor_type or s.ne != e.ne:
            continue  # reported by tensor_differences
        rec = listed.get(name)
        if rec is not None:
            if G.sha256_array(s.data) != rec.sha256_before:
                failures.append(f"{name}: the source tensor is not the one the export was made from (sha256 differs)")
            if G.sha256_array(e.data) != rec.sha256_after:
                failures.append(f"{name}: the exported tensor does not match the manifest's sha256")
            if list(rec.indices) != list(patch.indices) or rec.axis != patch.axis:
                failures.append(f"{name}: manifest indices/axis differ from what the multipliers imply")
        result = _check_patch(s, e, patch)
        touched.append(result)
        failures += result.pop("failures")
    return TensorCheck(len(source.tensors), n_identical, touched, failures)


def _as_matrix(t: Any) -> np.ndarray:
    """Tensor data as (rows, row_bytes) uint8."""
    d = np.ascontiguousarray(t.data)
    return d.reshape(-1, d.shape[-1]).view(np.uint8) if d.ndim > 1 else d.reshape(1, -1).view(np.uint8)


def _check_patch(src: Any, exp: Any, patch: G.TensorPatch) -> dict[str, Any]:
    name, qtype = patch.name, src.tensor_type
    enc = LAYOUTS[qtype].scale_encoding if qtype in LAYOUTS else "f32"
    rtol = _ROUNDOFF[enc]
    idx = np.asarray(patch.indices, dtype=np.int64)
    mult = np.asarray(patch.multipliers, dtype=np.float64)
    failures: list[str] = []
    if patch.axis == "row":
        old = dequantize_rows(src.data, qtype, idx).astype(np.float64)
        new = dequantize_rows(exp.data, qtype, idx).astype(np.float64)
        sb, eb = _as_matrix(src), _as_matrix(exp)
        others = np.ones(sb.shape[0], dtype=bool)
        others[idx] = False
        if not np.array_equal(sb[others], eb[others]):
            failures.append(f"{name}: rows outside the circuit changed")
        m = mult[:, None]
    else:
        full_old = dequantize_rows(src.data, qtype).astype(np.float64)
        full_new = dequantize_rows(exp.data, qtype).astype(np.float64)
        if patch.axis == "element":
            full_old, full_new = full_old.reshape(-1, 1), full_new.reshape(-1, 1)
            old, new = full_old[idx], full_new[idx]
            keep_old, keep_new = np.delete(full_old, idx, axis=0), np.delete(full_new, idx, axis=0)
            m = mult[:, None]
        else:
            old, new = full_old[:, idx].T, full_new[:, idx].T
            keep_old, keep_new = np.delete(full_old, idx, axis=1), np.delete(full_new, idx, axis=1)
            m = mult[:, None]
        if not np.array_equal(keep_old, keep_new):
            failures.append(f"{name}: {'elements' if patch.axis == 'element' else 'columns'} outside the circuit changed")
    expected = m * old
    err = np.abs(new - expected)
    exact_rows = np.isin(mult, (0.0, -1.0))
    if np.any(exact_rows) and not np.array_equal(new[exact_rows], expected[exact_rows]):
        failures.append(f"{name}: {patch.axis}s with multiplier 0 or -1 are not exact")
    rowmax = np.abs(old).max(axis=1, keepdims=True) if old.size else old
    bound = rtol * np.abs(expected) + 4 * rtol * np.abs(m) * rowmax
    if not np.all(err <= bound):
        r = int(np.argwhere(err > bound)[0][0])
        failures.append(
            f"{name}: {patch.axis} {int(idx[r])} is off by {float(err[r].max()):.3g} "
            f"(more than one rounding of the scale fields)"
        )
    return {
        "name": name,
        "type": qtype.name,
        "axis": patch.axis,
        "count": int(idx.size),
        "exact": bool(np.array_equal(new, expected)),
        "max_abs_error": float(err.max()) if err.size else 0.0,
        "failures": failures,
    }


# ---------------------------------------------------------------------------
# Behaviour check
# ---------------------------------------------------------------------------


def token_ids(tokenizer: Any, prompts: Sequence[str], opts: VerifyOptions) -> list[list[int]]:
    """Token ids of each prompt, rendered as :func:`cna_export.prompts.render` does (one user turn)."""
    from .prompts import render

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


def llama_logits(path: str | Path, ids: Sequence[Sequence[int]], threads: int = 2) -> list[np.ndarray]:
    """All-position logits from llama.cpp for the given token ids (fed as they are: no BOS added)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise CnaError("verifying a GGUF export needs llama-cpp-python: pip install 'cna-export[llama]'") from None
    n_ctx = max(64, max(len(s) for s in ids) + 8)
    try:
        llm = Llama(
            model_path=str(path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
            verbose=False, seed=0, n_threads=threads, n_threads_batch=threads,
        )  # fmt: skip
    except (ValueError, RuntimeError) as e:
        raise CnaError(f"llama.cpp cannot load {path}: {str(e).splitlines()[0]}") from None
    out: list[np.ndarray] = []
    try:
        for seq in ids:
            llm.reset()
            llm.eval(seq)
            out.append(np.array(llm.scores[: len(seq)], dtype=np.float32))
    finally:
        llm.close()
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
) -> BehaviourResult:
    """Steered pair (hooked transformers vs llama.cpp export) against the noise floor (plain vs llama.cpp source)."""
    import torch

    from .steering import steer

    t0 = time.perf_counter()
    ids = token_ids(loaded.tokenizer, prompts, opts)
    ll_src = llama_logits(source_path, ids, opts.threads)
    ll_exp = llama_logits(exported_path, ids, opts.threads)
    comp = _Comparisons()
    starts = fresh_positions(ids)
    iterator: Any = range(len(ids))
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="verify", unit="prompt")
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


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def verify_gguf(
    original: str | Any | None,
    exported: str | Path,
    opts: GGUFVerifyOptions | None = None,
    prompt_files: Sequence[str | Path] | None = None,
    prompts: Sequence[str] | None = None,
    manifest: ExportManifest | None = None,
    behaviour: bool = True,
    progress: bool = False,
    raise_on_failure: bool = False,
) -> VerifyReport:
    """Check a steered GGUF against its source: tensors exactly, then behaviour (see the module docstring).

    ``original`` is the source (a .gguf path, ``bundled:NAME``, or an already loaded
    :class:`~cna_export.models.LoadedModel` of it); ``None`` takes the manifest's source.
    The manifest comes from the export's ``cna.manifest`` KV or side file, or ``manifest``.
    ``prompts`` (texts) override ``prompt_files`` (default: the refusal recipe's).
    """
    opts = opts or GGUFVerifyOptions()
    exp_path = Path(exported)
    if manifest is None:
        manifest, where = read_gguf_manifest(exp_path)
    else:
        where = "given manifest"
    if manifest.format != "gguf":
        raise CnaError(f"{exp_path} carries a {manifest.format} export manifest, not a GGUF one")
    loaded = None if original is None or isinstance(original, (str, Path)) else original
    if loaded is not None:
        src_spec = loaded.source.spec
        if loaded.source.kind != "gguf" or loaded.source.path is None:
            raise CnaError("the original of a GGUF export must be a GGUF model")
        src_path = loaded.source.path
    else:
        src_spec = str(original) if original is not None else manifest.source
        try:
            src_path = resolve_gguf_model(src_spec)
        except CnaError as e:
            raise CnaError(f"cannot use {src_spec} as the export's source ({e}); pass the source .gguf") from None
    if src_path.resolve() == exp_path.resolve():
        raise CnaError("the exported file and the original are the same file")

    t0 = time.perf_counter()
    src, exp = G.open_gguf(src_path), G.open_gguf(exp_path)
    tc = check_tensors(src, exp, manifest)
    del src, exp
    reasons = list(tc.failures)
    exact = sum(1 for t in tc.touched if t["exact"])
    worst = max((t["max_abs_error"] for t in tc.touched), default=0.0)
    notes = [
        f"tensors: {tc.n_identical}/{tc.n_tensors - len(tc.touched)} untouched tensors and every KV pair "
        f"byte-identical; {len(tc.touched)} touched tensors ({exact} exactly m x source, worst |error| {worst:.3g})"
        if tc.passed else f"tensor check: {len(tc.failures)} problems",
        f"manifest from {where}; fold {manifest.fold}",
    ]
    metrics: dict[str, float] = {
        "tensors": float(tc.n_tensors),
        "tensors_touched": float(len(tc.touched)),
        "tensors_identical": float(tc.n_identical),
        "tensor_max_abs_error": worst,
        "tensor_check_seconds": time.perf_counter() - t0,
    }
    details: list[dict[str, Any]] = []
    checks: list[Check] = [
        Check(label="tensors and KV pairs exact", value=f"all {tc.n_tensors}" if tc.passed else f"{len(tc.failures)} problems",
              tolerance="all", ok=tc.passed)
    ]
    prompt_list: list[str] = []
    settings: dict[str, Any] = {"source": src_spec, "source_file": str(src_path), "threads": opts.threads,
                                "max_kl_ratio": opts.max_kl_ratio, "max_effect_share": opts.max_effect_share,
                                "max_top1_drop": opts.max_top1_drop, "top1_min_margin": opts.top1_min_margin,
                                "max_steering_error": opts.max_steering_error}  # fmt: skip
    if behaviour:
        if prompts is not None:
            prompt_list = list(prompts)
            settings["prompts_used"] = len(prompt_list)
        else:
            prompt_list, info = verification_prompts(prompt_files, opts.limit, opts.field, opts.column)
            settings.update(info)
        if not prompt_list:
            raise CnaError("verify needs at least one prompt")
        if loaded is None:
            from .models import load_model

            loaded = load_model(src_spec)
        b = check_behaviour(loaded, src_path, exp_path, manifest.multiplier_map(), prompt_list, opts, progress)
        metrics.update(b.metrics)
        details = b.details
        reasons += b.reasons
        notes += b.notes
        checks += b.checks
        if opts.max_new_tokens:
            notes.append("greedy continuations are not compared for GGUF (llama.cpp and transformers diverge "
                         "within the noise floor)")  # fmt: skip
    else:
        notes.append("behaviour not checked (tensor check only)")
    tolerances = Tolerances().override(
        max_abs_logit_delta=opts.max_logit_delta, max_mean_kl=opts.max_kl, min_top1_agreement=opts.min_top1
    )
    report = VerifyReport.build(
        metrics, tolerances, extra_reasons=reasons,
        method="gguf: llama.cpp export vs transformers hook steering, relative to the unsteered noise floor",
        reference=f"{src_spec} in transformers + hook steering ({len(manifest.multipliers)} neurons)",
        candidate=f"{exp_path} in llama.cpp",
        dtype="float32 (transformers, dequantised GGUF) / llama.cpp native",
        positions="all distinct", settings=settings, notes=notes, checks=checks,
        prompts=[PromptDetail(prompt=p, **d) for p, d in zip(prompt_list, details)],
    )  # fmt: skip
    if raise_on_failure and not report.passed:
        err = VerificationFailed("GGUF verification failed: " + "; ".join(report.reasons[:3]))
        err.report = report  # type: ignore[attr-defined]
        raise err
    return report
