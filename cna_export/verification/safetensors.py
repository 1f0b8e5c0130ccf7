"""Verification: an exported checkpoint must behave like hook steering of the original.

The reference is the *original* model with the circuit's multipliers applied by
forward pre-hooks on down_proj (:func:`cna_export.model.steering.steer`, the paper's
intervention); the candidate is the *exported* model run plainly. Both see the
same tokenised, chat-templated prompts in the same left-padded batches, and the
next-token logits are compared at **every real (non-padding) position of every
prompt**, not only the last one, so a wrong column shows up wherever the neuron
fires:

- ``max_abs_logit_delta``: max over positions and vocabulary of |logit_ref - logit_cand|;
- ``mean_kl``: mean over positions of KL(P_ref || P_cand) of the next-token distributions
  (computed in float64 from the logits);
- ``top1_agreement``: share of positions whose argmax agrees (``last_top1_agreement``: the
  last prompt position only, i.e. the first generated token);
- ``greedy_identical``: share of prompts whose greedy continuation of ``max_new_tokens``
  tokens (each model with its own tokenizer and generation config) is the same text.

Precision: both models are loaded in the dtype of the exported down_proj tensors
(override with ``dtype``). That is the fair comparison: a bfloat16 export is
meant to replace the bfloat16 original, whose hook steering also computes in
bfloat16 (multiplier applied in float32, rounded once to bfloat16). Exported
columns are ``round(W * m)`` and hook steering feeds ``round(x * m)``; the two
agree exactly for m in {0, -1, 2, 0.5, ...} (powers of two) and differ by one
rounding otherwise, hence the default tolerances: float32 must match to 1e-4 in
every logit with identical greedy text; bfloat16/float16 must agree on the top-1
token at >= 99% of positions with mean KL <= 1e-3.

:class:`VerifyReport` (metrics, tolerances, pass/fail with reasons, per-prompt
details, ``render()``) is shared with the GGUF verifier; the helpers
:func:`logit_metrics`, :class:`MetricAccumulator` and :meth:`Tolerances.check`
work on any pair of logit tensors.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..core.errors import CnaError
from ..core.manifest import ExportManifest
from ..core.progress import bar as progress_bar
from ..core.settings.verify import VerifyOptions
from .prompts import verification_prompts
from .report import (
    MetricAccumulator,
    PromptDetail,
    Tolerances,
    VerifyReport,
    logit_metrics,
)
from .session import ReferenceRun

log = logging.getLogger(__name__)


# -- options ------------------------------------------------------------------------------


def tolerances(opts: VerifyOptions, dtype: str) -> Tolerances:
    """The pass criteria for ``dtype``: its defaults, with the tolerances ``opts`` gives."""
    return Tolerances.for_dtype(dtype).override(**opts.tolerance_overrides())


# -- the comparison -----------------------------------------------------------------------


def compare_steered(
    reference: Any,
    candidate: Any,
    multipliers: Mapping[tuple[int, int], float] | None,
    prompts: Sequence[str],
    opts: VerifyOptions,
    tolerances: Tolerances,
    reference_name: str,
    candidate_name: str,
    settings: Mapping[str, Any] | None = None,
    extra_reasons: Sequence[str] = (),
    notes: Sequence[str] = (),
    progress: bool = False,
    session: Any = None,
) -> VerifyReport:
    """Compare ``reference`` (a LoadedModel, hook-steered with ``multipliers``) with ``candidate`` (unsteered).
    ``session`` (:class:`~cna_export.verification.session.VerifySession`): the hook-steered reference's logits and
    greedy answers are taken from it when an earlier comparison on the same prompts computed them, else kept
    there."""
    import torch

    from ..model.batching import SHARE, resolve_batch_size
    from ..model.generation import generate
    from ..model.prompts import batches, render
    from ..model.steering import steer

    reasons = list(extra_reasons)
    t0 = time.perf_counter()
    texts_ref = render(reference.tokenizer, prompts, opts.chat_template, opts.system_prompt)
    texts_cand = render(candidate.tokenizer, prompts, opts.chat_template, opts.system_prompt)
    if texts_ref != texts_cand:
        reasons.append("the chat templates render the prompts differently")
    # one size rule for both models, so that their batches line up (two logits tensors live at once)
    size = resolve_batch_size(opts.batch_size, reference, logits=True, share=SHARE / 2)
    args = dict(batch_size=size, chat_template=opts.chat_template, max_length=opts.max_length)
    ref_batches = list(batches(reference.tokenizer, texts_ref, device=reference.input_device, **args))
    cand_batches = list(batches(candidate.tokenizer, texts_cand, device=candidate.input_device, **args))
    same_tokens = len(ref_batches) == len(cand_batches) and all(
        a.indices == b.indices and torch.equal(a.input_ids.cpu(), b.input_ids.cpu())
        for a, b in zip(ref_batches, cand_batches, strict=True)
    )
    if not same_tokens:
        reasons.append("the tokenizers tokenise the prompts differently (logits compared on the reference's tokens)")

    acc = MetricAccumulator()
    details: dict[int, dict[str, Any]] = {}
    steering = multipliers or {}
    layout = tuple((tuple(b.indices), tuple(b.input_ids.shape)) for b in ref_batches)
    key = _run_key(reference, steering, prompts, opts, layout)
    run: ReferenceRun | None = session.reference_run(key) if session is not None else None
    fresh = ReferenceRun(logits={}) if session is not None and run is None else None
    iterator: Any = progress_bar(progress, ref_batches, desc="verify", unit="batch", leave=True)
    for b in iterator:
        feed = dict(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids)
        with torch.inference_mode():
            ref_logits = None
            if run is None:
                with steer(reference.model, reference.arch, steering):
                    ref_logits = reference.model(**feed).logits
            cand_feed = {k: v.to(candidate.input_device) for k, v in feed.items()}
            cand_logits = candidate.model(**cand_feed).logits
        mask = b.attention_mask.bool().cpu()
        for row, i in enumerate(b.indices):
            keep = mask[row]
            ref_rows = run.logits[i] if run is not None else ref_logits[row].cpu()[keep]
            if fresh is not None:
                fresh.logits[i] = ref_rows
            per = logit_metrics(ref_rows, cand_logits[row].cpu()[keep])
            details[i] = acc.add(per)
        del ref_logits, cand_logits
    metrics = acc.metrics()
    seconds = {"logits": time.perf_counter() - t0}

    t0 = time.perf_counter()
    greedy_ref: list[str] | None = None
    greedy_cand: list[str] | None = None
    if opts.max_new_tokens > 0:
        gen = dict(max_new_tokens=opts.max_new_tokens, chat_template=opts.chat_template,
                   system_prompt=opts.system_prompt, batch_size=opts.batch_size)
        if run is not None and run.greedy is not None:
            greedy_ref = list(run.greedy)
        else:
            with steer(reference.model, reference.arch, steering):
                greedy_ref = generate(reference, prompts, **gen)
        greedy_cand = generate(candidate, prompts, **gen)
        same = [a == b for a, b in zip(greedy_ref, greedy_cand, strict=True)]
        metrics["greedy_identical"] = sum(same) / len(same)
        metrics["max_new_tokens"] = float(opts.max_new_tokens)
        seconds["generate"] = time.perf_counter() - t0
    if fresh is not None:
        fresh.greedy = greedy_ref
        session.keep_run(key, fresh)

    per_prompt = []
    for i, prompt in enumerate(prompts):
        d = details[i]
        per_prompt.append(PromptDetail(
            prompt=prompt,
            positions=d["positions"],
            max_abs_logit_delta=d["max_abs_logit_delta"],
            mean_kl=d["mean_kl"],
            top1_agreement=d["top1_agreement"],
            last_top1_agree=d["last_top1_agree"],
            greedy_reference=greedy_ref[i] if greedy_ref is not None else None,
            greedy_candidate=greedy_cand[i] if greedy_cand is not None else None,
            greedy_identical=(greedy_ref[i] == greedy_cand[i])
            if greedy_ref is not None and greedy_cand is not None else None,
        ))
    dtype = str(reference.dtype).removeprefix("torch.")
    all_settings = {"limit": opts.limit, "max_new_tokens": opts.max_new_tokens, "batch_size": opts.batch_size,
                    "chat_template": opts.chat_template, "system_prompt": opts.system_prompt,
                    "multipliers": len(steering), **(settings or {})}
    return VerifyReport.build(
        metrics, tolerances, extra_reasons=reasons, reference=reference_name, candidate=candidate_name,
        dtype=dtype, positions="all", settings=all_settings, notes=list(notes), prompts=per_prompt, seconds=seconds,
    )


def _run_key(reference: Any, steering: Mapping[tuple[int, int], float], prompts: Sequence[str], opts: VerifyOptions,
             layout: tuple) -> tuple:
    """What the hook-steered reference's batched logits and greedy answers depend on (``layout``: the batches'
    prompt indices and shapes)."""
    from .session import multipliers_key

    return (id(reference), str(reference.dtype), multipliers_key(steering), tuple(prompts), layout, opts.chat_template,
            opts.system_prompt, opts.max_length, opts.max_new_tokens, opts.batch_size)


def exported_dtype(exported: Path) -> str:
    """dtype of the exported down_proj tensors (from the safetensors headers, nothing loaded)."""
    from transformers import AutoConfig

    from ..core.architectures import arch_for_config
    from ..io.safetensors import Checkpoint

    try:
        config = AutoConfig.from_pretrained(str(exported))
    except (OSError, ValueError, KeyError) as e:
        raise CnaError(f"cannot read the config of {exported}: {str(e).splitlines()[0]}") from None
    arch = arch_for_config(config)
    ckpt = Checkpoint.open(exported)
    name = ckpt.first_present(arch.checkpoint_down_names(0))
    if name is None and arch.moe is not None:  # a MoE layer: its (first) expert down projection
        from ..io.identity import expert_tensors

        name = expert_tensors(ckpt, arch, 0).names()[0]
    if name is None:
        raise CnaError(f"{exported} has no down_proj weight for layer 0 "
                       f"(looked for {arch.checkpoint_down_names(0)[0]})")
    return ckpt.info(name).dtype


def _parameter(model: Any, name: str) -> Any:
    """The loaded model's parameter named as in the checkpoint, or None."""
    try:
        return model.get_parameter(name)
    except AttributeError:
        return None


def _moe_source_tensor(ref: Any, name: str) -> Any:
    """The loaded model's tensor holding checkpoint tensor ``name`` of a MoE model (a per-expert tensor is
    one slice of transformers' fused 3-D parameter, byte for byte), or None."""
    found = ref.arch.down_tensor_of(name)
    if found is None:
        return None
    layer, kind, expert = found
    if kind == "dense":
        return ref.down_proj(layer).weight
    if kind == "shared":
        shared = ref.arch.shared_module(ref.model, layer)
        return None if shared is None else getattr(shared, ref.arch.down_proj).weight
    experts = ref.arch.experts_module(ref.model, layer)
    if experts is None:
        return None
    return experts.down_proj if kind == "fused" else experts.down_proj[expert].contiguous()


def export_manifest(path: Path, manifest: ExportManifest | None, fmt: str, what: str) -> ExportManifest:
    """The export manifest of ``path`` (or ``manifest`` when given), refused unless of format ``fmt``."""
    manifest = manifest or ExportManifest.load(path)
    if manifest.format != fmt:
        raise CnaError(f"{path} is a {manifest.format} export; this verifies {what}")
    return manifest


def loading_options(model_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """How to load both models, less the dtype (both run in the comparison dtype)."""
    return {k: v for k, v in (model_options or {}).items() if k != "dtype"}


def verify_export(
    original: str | Any,
    exported: str | Path,
    opts: VerifyOptions | None = None,
    prompt_files: Sequence[str | Path] | None = None,
    model_options: Mapping[str, Any] | None = None,
    manifest: ExportManifest | None = None,
    reference_name: str | None = None,
    candidate_name: str | None = None,
    progress: bool = False,
    session: Any = None,
) -> VerifyReport:
    """Verify a safetensors export against hook steering of ``original`` (a model spec or a LoadedModel).

    The circuit and multipliers come from the export's ``cna_manifest.json`` (or ``manifest``). A
    LoadedModel passed as ``original`` is cast in place to the comparison dtype. ``session``
    (:class:`~cna_export.verification.session.VerifySession` of ``original``): the reference is its model in
    the comparison dtype, and its hook-steered logits are shared with other verifications.
    """
    import torch

    from ..io.tensor_bytes import tensor_sha256
    from ..model.loading import load_model, resolve_dtype

    opts = opts or VerifyOptions()
    mopts = loading_options(model_options)
    exported = Path(exported)
    if not exported.is_dir():
        raise CnaError(f"exported model folder not found: {exported}")
    manifest = export_manifest(exported, manifest, "safetensors", "safetensors exports")
    dtype = exported_dtype(exported) if opts.dtype == "auto" \
        else str(resolve_dtype(opts.dtype, None)).removeprefix("torch.")
    prompts, prompt_info = verification_prompts(prompt_files, opts.limit, opts.field, opts.column)

    t0 = time.perf_counter()
    if session is not None and session.serves(original):
        ref = session.reference(dtype)
        ref_name = reference_name or session.spec
    elif isinstance(original, str):
        ref = load_model(original, dtype=dtype, **mopts)
        ref_name = reference_name or original
    else:
        ref = original
        ref_name = reference_name or ref.source.spec
        ref.model.to(getattr(torch, dtype))
    cand = load_model(str(exported), dtype=dtype, **mopts)
    load_seconds = time.perf_counter() - t0

    circuit = manifest.circuit
    circuit.check_fits(ref.identity(with_fingerprint=False))
    reasons: list[str] = []
    notes: list[str] = []
    # Is --original really the model the export was made from? Exact when compared in the export's dtype.
    def sources() -> Any:
        """(manifest record, the original's tensor, how to name it): MoE every touched tensor by its
        name, dense each circuit layer's down_proj."""
        if ref.layout().is_moe:
            for t in manifest.tensors:
                yield t, _moe_source_tensor(ref, t.name), t.name
            return
        touched = {t.name: t for t in manifest.tensors}
        for layer in sorted(circuit.layer_counts()):
            t = next((touched[n] for n in ref.arch.checkpoint_down_names(layer) if n in touched), None)
            if t is not None and t.axis == "column":
                yield t, ref.down_proj(layer).weight, f"layer {layer} down_proj"
            t = next((touched[n] for n in ref.arch.checkpoint_up_names(layer) if n in touched), None)
            if t is not None and t.axis == "row":  # the up fold: the model's parameter of the same name
                yield t, _parameter(ref.model, t.name), f"layer {layer} up_proj"

    checked = 0
    for t, w, what in sources():
        if w is None or t.dtype != dtype or w.device.type == "meta":
            continue
        checked += 1
        if tensor_sha256(w) != t.sha256_before:
            reasons.append(f"the original's {what} is not the tensor the export was made from "
                           f"(sha256 differs from the manifest); is --original the export's source?")
            break
    if not checked:
        notes.append(f"source tensors not compared by hash (compared in {dtype}, exported as "
                     f"{manifest.tensors[0].dtype if manifest.tensors else 'unknown'})")

    settings = {**prompt_info, "source": manifest.source}
    report = compare_steered(
        ref, cand, manifest.multiplier_map(), prompts, opts, tolerances(opts, dtype),
        reference_name=f"{ref_name} + hook steering ({len(manifest.multipliers)} neurons)",
        candidate_name=candidate_name or str(exported), settings=settings, extra_reasons=reasons, notes=notes,
        progress=progress, session=session,
    )
    report.seconds = {"load": load_seconds, **report.seconds}
    del cand
    return report
