"""Verify a steered GGUF export: exact tensor checks, then behaviour in llama.cpp against hook steering.

Two independent checks, reported in one :class:`cna_export.verification.safetensors.VerifyReport`:

1. **Tensors.** Every KV pair and every untouched tensor of the export is
   byte-identical to the source (``general.name`` and ``cna.manifest`` aside);
   the touched tensors hash to the manifest's before/after sha256; the
   dequantised touched rows (columns, bias elements) equal multiplier x the
   dequantised source rows: exactly for multipliers 0 and -1, within one
   rounding of the scale fields otherwise; their other rows are byte-identical.

2. **Behaviour.** The export in llama.cpp (llama-cpp-python, all-position
   logits) is compared with hook steering of the source in transformers (the
   source GGUF dequantised, :func:`cna_export.model.steering.steer`) on a prompt set,
   with identical token ids on both sides: the transformers tokenizer's ids,
   chat-templated as :func:`cna_export.model.prompts.render` does, fed to llama.cpp.
   Every position is compared once: a prefix shared with an earlier prompt (a
   chat template's system prompt) is not counted again (:func:`fresh_positions`).
   llama.cpp never matches transformers exactly (it quantises activations for
   quantised matmuls), so the unsteered pair (the source in llama.cpp vs
   transformers without hooks) gives the noise floor. Each criterion below is
   decided on an interval over prompts (:mod:`cna_export.verification.gguf_judge`,
   ``docs/verify.md``): it fails only when the interval lies beyond its tolerance
   (an exact export fails with probability at most 1%), passes when it lies inside,
   and otherwise the prompts are widened up to ``max_prompts``; still undecided, the
   verdict is inconclusive (not a failure: exit 7, an export is written):

   * mean KL(transformers || llama.cpp) at most ``max_kl_ratio`` x the floor's
     plus ``max_effect_share`` x the steering effect (mean KL between hooked and
     plain transformers). The second term is there because the floor grows with
     steering: a steered model sits further from llama.cpp than the unsteered
     one, the more so the harder it is steered (correct exact exports measured
     1.03x to 1.31x the unsteered floor, an excess of 0.05% to 0.14% of the
     steering effect; an export at x0.1 instead of x0 is 0.6% to 1.8% off, one
     missing a tenth of its neurons 4.6% to 12%; ``bench/verify_sensitivity.py``).
   * top-1 flip rate at most ``max_top1_drop`` above the floor's (paired), counted where
     the transformers reference is not at a near-tie (top-1 minus top-2
     log-probability at least ``top1_min_margin``, 0.1 nats): near-ties flip
     under any numeric noise, and steering changes how many there are (ablating
     SmolLM2's refusal circuit makes gaps under 0.05 nats 3-4x more common),
     which moved raw top-1 agreement by 2 points on an export exactly as
     accurate as its source. ``top1_min_margin=0`` counts every position.
   * when steering moves transformers by more than the floor, llama.cpp's
     logit change (export vs source) must reproduce transformers' (hooked vs
     plain): their regression slope (:func:`effect_slope_terms`) within
     ``max_steering_error`` (3%) + ``steering_noise_share`` (0.05) x sqrt(floor / effect) of 1.
     Correct exports measure 0.98 to 1.02 where the effect is 20x the floor or more, and 0.97 to
     1.032 where it is 1.3-2.2x the floor (Gemma 3, SmolLM2 edits of 10 neurons at x0.2); multipliers
     off by 0.1, missing neurons or the wrong neurons move it well away from 1.
   * when steering moves transformers by more than the floor, the export must
     also be closer to the hook-steered reference than to the unsteered model
     (so an export that forgot to steer cannot pass on noise alone).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

from ..core.errors import CnaError, VerificationFailed
from ..core.manifest import ExportManifest
from ..core.settings.verify import GGUFVerifyOptions
from ..export.gguf import read_gguf_manifest, resolve_gguf_model
from ..io import gguf as G
from .gguf_behaviour import check_behaviour
from .gguf_tensors import check_tensors
from .prompts import verification_prompts
from .report import Check, PromptDetail, Tolerances, VerifyReport

log = logging.getLogger(__name__)


def _adapter_base(manifest: ExportManifest) -> str:
    """The base of a GGUF LoRA adapter: the base file its export recorded when it is still there, else its source."""
    found = manifest.base_file.local() if manifest.base_file is not None else None
    return str(found) if found is not None else manifest.source


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
    reference: str | Any | None = None,
    session: Any = None,
    name: str | Path | None = None,
) -> VerifyReport:
    """Check a steered GGUF against its source: tensors exactly, then behaviour (see the module docstring).

    ``reference``: the model transformers runs with hook steering for the behaviour check, when not the
    source GGUF itself (a Hugging Face folder or :class:`LoadedModel` holding the same weights, for the
    families whose GGUF files transformers cannot load, e.g. Mixtral and OLMoE).

    ``original`` is the source (a .gguf path, ``bundled:NAME``, or an already loaded
    :class:`~cna_export.model.loading.LoadedModel` of it); ``None`` takes the manifest's source.
    The manifest comes from the export's ``cna.manifest`` KV or side file, or ``manifest``.
    ``prompts`` (texts) override ``prompt_files`` (default: the refusal recipe's). ``session``
    (:class:`~cna_export.verification.session.VerifySession`): the reference model and the logits that do
    not depend on the export, shared with other verifications of the same source. ``name``: what the report
    calls the export (a staged export's final path, not the unnamed temporary it is read from; default: ``exported``).
    """
    opts = opts or GGUFVerifyOptions()
    exp_path = Path(exported)
    if manifest is None:
        manifest, where = read_gguf_manifest(exp_path)
    else:
        where = "given manifest"
    if manifest.format not in ("gguf", "gguf_lora"):
        raise CnaError(f"{exp_path} carries a {manifest.format} export manifest, not a GGUF one")
    adapter = manifest.format == "gguf_lora"
    if original is None and adapter:
        original = _adapter_base(manifest)
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
    if adapter:
        from .gguf_lora import check_adapter_tensors, check_base

        check_base(src, manifest, src_path)  # the wrong base is bad input (exit 2), not a failed export
        ac = check_adapter_tensors(src, exp, manifest)
        del src, exp
        reasons = list(ac.failures)
        notes = [
            f"adapter: base {src_path.name}'s steered ffn_down tensors hash to the manifest's sha256_before; "
            f"{ac.exact}/{len(manifest.tensors)} lora_a/lora_b pairs equal the factors recomputed from the base, "
            f"rank {ac.rank}, alpha {ac.alpha:g} (scale 1)" if ac.passed
            else f"adapter check: {len(ac.failures)} problems",
            f"manifest from {where}; LoRA on ffn_down, applied at scale 1 in llama.cpp",
        ]
        metrics: dict[str, float] = {"tensors": float(ac.tensors), "adapter_rank": float(ac.rank),
                                     "adapter_alpha": ac.alpha, "tensor_check_seconds": time.perf_counter() - t0}
        checks: list[Check] = [
            Check(label="adapter tensors exact, scale 1", value=f"all {ac.tensors}" if ac.passed
                  else f"{len(ac.failures)} problems", tolerance="all", ok=ac.passed)
        ]
    else:
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
        metrics = {
            "tensors": float(tc.n_tensors),
            "tensors_touched": float(len(tc.touched)),
            "tensors_identical": float(tc.n_identical),
            "tensor_max_abs_error": worst,
            "tensor_check_seconds": time.perf_counter() - t0,
        }
        checks = [
            Check(label="tensors and KV pairs exact",
                  value=f"all {tc.n_tensors}" if tc.passed else f"{len(tc.failures)} problems",
                  tolerance="all", ok=tc.passed)
        ]
    details: list[dict[str, Any]] = []
    undecided: list[str] = []  # what the behaviour check's prompts could not decide
    prompt_list: list[str] = []
    settings: dict[str, Any] = {"source": src_spec, "source_file": str(src_path), "threads": opts.threads,
                                "max_kl_ratio": opts.max_kl_ratio, "max_effect_share": opts.max_effect_share,
                                "max_top1_drop": opts.max_top1_drop, "top1_min_margin": opts.top1_min_margin,
                                "max_steering_error": opts.max_steering_error,
                                "steering_noise_share": opts.steering_noise_share,
                                "max_prompts": opts.max_prompts}  # fmt: skip
    if behaviour:
        if prompts is not None:
            prompt_list = list(prompts)
            settings["prompts_used"] = len(prompt_list)
        else:
            prompt_list, info = verification_prompts(prompt_files, max(opts.limit, opts.max_prompts), opts.field,
                                                     opts.column)  # the pool the behaviour check widens into
            settings.update(info)
        if not prompt_list:
            raise CnaError("verify needs at least one prompt")
        if reference is not None:
            from ..model.loading import load_model

            loaded = load_model(str(reference)) if isinstance(reference, (str, Path)) else reference
            settings["reference"] = loaded.source.spec
        if loaded is None and session is not None and session.serves(src_spec):
            loaded = session.reference()
        if loaded is None:
            from ..model.loading import load_model

            loaded = load_model(src_spec)
        start = opts.limit if prompts is None else None
        pool = prompt_list[: start or len(prompt_list)] if reasons else prompt_list  # tensors failed: no widening
        b = check_behaviour(loaded, src_path, exp_path, manifest.multiplier_map(), pool, opts, progress,
                            adapter=adapter, start=start, session=session)
        metrics.update(b.metrics)
        details, undecided = b.details, b.undecided
        settings["prompts_used"] = len(details)
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
        metrics, tolerances, extra_reasons=reasons, undecided=undecided,
        method="gguf: llama.cpp export vs transformers hook steering, relative to the unsteered noise floor",
        reference=f"{src_spec} in transformers + hook steering ({len(manifest.multipliers)} neurons)",
        candidate=(f"{src_path.name} + LoRA " if adapter else "") + f"{name or exp_path} in llama.cpp",
        dtype="float32 (transformers, dequantised GGUF) / llama.cpp native",
        positions="all distinct", settings=settings, notes=notes, checks=checks,
        prompts=[PromptDetail(prompt=p, **d)
                 for p, d in zip(prompt_list, details, strict=False)],  # of the pool, the prompts compared
    )  # fmt: skip
    if raise_on_failure and not report.publishable:
        err = VerificationFailed("GGUF verification failed: " + "; ".join(report.reasons[:3]))
        err.report = report  # type: ignore[attr-defined]
        raise err
    return report
