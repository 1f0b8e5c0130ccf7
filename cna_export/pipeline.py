"""Stages composed: export with its verification run on the staged output before it is published.

Export and verification do not know each other: an exporter takes an optional ``check``
(:data:`cna_export.export.plan.ExportCheck`) that it runs on the staged folder or file before the
final rename, and this module builds that check from the verification stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .core.circuit import Circuit, ModelIdentity
from .core.errors import CnaError
from .core.formats import FORMAT_OPTIONS, Format, FormatOptions, export_format, format_options
from .core.settings.base import ModelOptions
from .core.settings.export import ExportOptions, GGUFExportOptions, HubOptions
from .core.settings.verify import GGUFVerifyOptions, VerifyOptions
from .export.plan import CheckReport, ExportCheck, StagedExport
from .export.request import ExportRequest, MultiplierSpec

if TYPE_CHECKING:
    from .core.preview import BehaviourPreview
    from .core.settings.discover import DiscoverOptions
    from .discovery.cna import DiscoveryResult
    from .evaluation.preview import HeldOut
    from .export.gguf import GGUFExportResult
    from .export.gguf_lora import GGUFLoraExportResult
    from .export.hub import PushResult
    from .export.lora import LoraExportResult
    from .export.safetensors import ExportResult
    from .model.loading import LoadedModel
    from .model.prompts import PromptSet
    from .verification.session import VerifySession

    Written = ExportResult | GGUFExportResult | LoraExportResult | GGUFLoraExportResult
    """What an exporter returns (each has ``out``, ``manifest``, ``seconds`` and ``verification``)."""

def _transformers_opts(opts: GGUFVerifyOptions) -> VerifyOptions:
    """The transformers-side verification settings (``VerifyOptions``) of a ``GGUFVerifyOptions``."""
    return VerifyOptions(**opts.model_dump(include=set(VerifyOptions.model_fields)))


def _gguf_opts(opts: VerifyOptions | None) -> GGUFVerifyOptions:
    """``opts`` as ``GGUFVerifyOptions`` (defaults for the llama.cpp-only settings)."""
    if isinstance(opts, GGUFVerifyOptions):
        return opts
    return GGUFVerifyOptions(**(opts.model_dump() if opts is not None else {}))


def lora_check(
    opts: VerifyOptions | None = None, prompt_files: Sequence[str | Path] | None = None,
    model_options: Mapping[str, Any] | None = None, progress: bool = False, session: VerifySession | None = None,
) -> ExportCheck:
    """Verification of a staged PEFT LoRA adapter folder: base + adapter against hook steering of the base."""
    from .verification.lora import verify_lora

    def check(staged: StagedExport) -> CheckReport:
        return verify_lora(staged.source, staged.path, opts, prompt_files=prompt_files, model_options=model_options,
                           manifest=staged.manifest, progress=progress, session=session, name=staged.out)

    return check


def safetensors_check(
    opts: VerifyOptions | None = None, prompt_files: Sequence[str | Path] | None = None,
    model_options: Mapping[str, Any] | None = None, progress: bool = False, session: VerifySession | None = None,
) -> ExportCheck:
    """Verification of a staged safetensors export against hook steering of its source."""
    from .verification.safetensors import verify_export

    def check(staged: StagedExport) -> CheckReport:
        return verify_export(staged.source, staged.path, opts=opts, prompt_files=prompt_files,
                             model_options=model_options, manifest=staged.manifest,
                             reference_name=staged.source_name, candidate_name=str(staged.out), progress=progress,
                             session=session)

    return check


def gguf_check(
    opts: VerifyOptions | None = None, prompt_files: Sequence[str | Path] | None = None, progress: bool = False,
    session: VerifySession | None = None,
) -> ExportCheck:
    """Verification of a staged GGUF export or LoRA GGUF (tensors exactly, then behaviour in llama.cpp)."""
    from .verification.gguf import verify_gguf

    gopts = _gguf_opts(opts)

    def check(staged: StagedExport) -> CheckReport:
        return verify_gguf(staged.source, staged.path, gopts, prompt_files=prompt_files, manifest=staged.manifest,
                           progress=progress, session=session, name=staged.out)

    return check


def export_check(options: FormatOptions, verify_options: VerifyOptions | None = None,
                 prompt_files: Sequence[str | Path] | None = None, progress: bool = False,
                 session: VerifySession | None = None) -> ExportCheck:
    """The verification run on a staged export of ``options.format`` before it is published; ``session``
    shares the reference model and the logits that do not depend on the export between several checks."""
    if options.format in ("gguf", "gguf-lora"):
        return gguf_check(verify_options, prompt_files, progress=progress, session=session)
    vopts = _transformers_opts(_gguf_opts(verify_options))
    if options.format == "lora":
        return lora_check(vopts, prompt_files, {"trust_remote_code": options.trust_remote_code}, progress, session)
    model_options = {"allow_pickle": options.allow_pickle, "trust_remote_code": options.trust_remote_code}
    return safetensors_check(vopts, prompt_files, model_options, progress, session)


def write_export(request: ExportRequest, options: FormatOptions) -> Written:
    """Write ``request`` in the format ``options`` names (the exporter's result)."""
    if options.format == "lora":
        from .export.lora import write_lora

        return write_lora(request, options)
    if options.format == "gguf-lora":
        from .export.gguf_lora import write_gguf_lora

        return write_gguf_lora(request, options)
    if options.format == "gguf":
        from .export.gguf import write_gguf

        return write_gguf(request, options)
    from .export.safetensors import write_safetensors

    return write_safetensors(request, options)


def export(
    model: str | Path, circuit: Circuit | str | Path, out: str | Path, *, format: Format | None = None,
    verify: bool = False, verify_options: VerifyOptions | None = None,
    prompt_files: Sequence[str | Path] | None = None, **settings: Any,
) -> Written:
    """Export ``circuit`` folded into ``model`` (see :func:`export_format`), verified before it is written
    when ``verify`` is set. ``settings``: the request's (``multiplier``, ``multipliers``, ``overwrite``,
    ``force``, ``progress``) and the fields of the format's options (:mod:`cna_export.core.formats`)."""
    import dataclasses

    from .export.request import request_for

    request, options = request_for(FORMAT_OPTIONS[export_format(out, format)], model, circuit, out, settings)
    if verify:
        check = export_check(options, verify_options, prompt_files, request.progress)
        request = dataclasses.replace(request, check=check)
    return write_export(request, options)


def run_export(
    model: str | Path, circuit: str | Path, out: str | Path, options: ExportOptions,
    gguf: GGUFExportOptions | None = None, verify_options: GGUFVerifyOptions | None = None,
    model_options: ModelOptions | None = None, progress: bool = False, *, strict: bool = True,
    session: VerifySession | None = None,
) -> tuple[Format, Written]:
    """The ``export`` job: the settings models turned into the format's options
    (:func:`cna_export.core.formats.format_options`: with ``strict``, flags of another format are
    refused; ``steer`` leaves them out) and one :class:`ExportRequest`, verified with ``options.verify``.
    ``session``: shared verification work (``steer``). Returns the format written and the exporter's result."""
    g = gguf or GGUFExportOptions()
    fmt = export_format(out, g.format)
    fopts = format_options(fmt, out, options, g, model_options or ModelOptions(), strict=strict)
    multipliers: MultiplierSpec = options.multipliers
    check = export_check(fopts, verify_options or GGUFVerifyOptions(), options.prompts, progress, session) \
        if options.verify else None
    reference = session.reference if session is not None and session.serves(model) else None
    request = ExportRequest.build(model, circuit, out, multiplier=options.multiplier, multipliers=multipliers,
                                  overwrite=options.overwrite, force=options.force, check=check, progress=progress,
                                  reference=reference)
    return fmt, write_export(request, fopts)


def verify(
    original: str | Path, exported: str | Path, opts: VerifyOptions | None = None,
    prompt_files: Sequence[str | Path] | None = None, model_options: ModelOptions | None = None,
    progress: bool = False, reference: str | Path | None = None,
) -> CheckReport:
    """Verify an export against hook steering of ``original``: a ``.gguf`` file in llama.cpp
    (:func:`cna_export.verification.gguf.verify_gguf`), else a safetensors folder
    (:func:`cna_export.verification.safetensors.verify_export`). ``opts``: ``GGUFVerifyOptions``.
    ``reference`` (GGUF exports only): the Hugging Face model that transformers runs with hook steering
    instead of the source GGUF (for families whose GGUF files transformers cannot load)."""
    if reference is not None and Path(exported).suffix.lower() != ".gguf":
        raise CnaError("--reference applies to GGUF exports only")

    gopts = _gguf_opts(opts)
    mopts = (model_options or ModelOptions()).model_dump(exclude={"dtype"})
    if (Path(exported) / "adapter_config.json").is_file():
        from .verification.lora import verify_lora

        return verify_lora(str(original), exported, _transformers_opts(gopts), prompt_files=prompt_files,
                           model_options=mopts, progress=progress)
    if Path(exported).suffix.lower() == ".gguf":
        from .verification.gguf import verify_gguf

        return verify_gguf(original, exported, gopts, prompt_files=prompt_files, progress=progress,
                           reference=reference)
    from .verification.safetensors import verify_export

    return verify_export(original, exported, _transformers_opts(gopts), prompt_files=prompt_files,
                         model_options=mopts, progress=progress)


def hub_token_for(hub: HubOptions | None) -> str | None:
    """The Hub token when ``hub`` asks for a push, checked before any work: a missing token, a malformed
    repo id or ``--private`` without a push is a one-line error. None without a push."""
    if hub is not None and hub.private and not hub.push_to_hub:
        raise CnaError("--private applies to the Hub repo that --push-to-hub creates; pass --push-to-hub REPO_ID")
    if hub is None or not hub.push_to_hub:
        return None
    from .export.hub import check_repo_id, hub_token

    check_repo_id(hub.push_to_hub)
    return hub_token()


def push(path: str | Path, hub: HubOptions, token: str | None = None, recipe: str | None = None) -> PushResult:
    """Upload an export (folder or GGUF file, or a ``steer`` folder) to ``hub.push_to_hub`` in one commit
    (:func:`cna_export.export.hub.push_export`)."""
    from .export.hub import push_export

    assert hub.push_to_hub is not None
    return push_export(path, hub.push_to_hub, private=hub.private, token=token, recipe=recipe)


@dataclass
class DiscoverRun:
    """What :func:`run_discover` did."""

    result: DiscoveryResult
    loaded: LoadedModel
    positive: PromptSet
    negative: PromptSet
    neutral: PromptSet | None
    load_seconds: float


def run_discover(model: str | Path, out: str | Path, opts: DiscoverOptions, model_options: ModelOptions | None = None,
                 overwrite: bool = False, progress: bool = False, hold_back: int = 0) -> DiscoverRun:
    """The ``discover`` job: read the prompt sets, load ``model``, find the circuit and save it to ``out``.
    ``hold_back``: the last N prompts of the positive and negative sets are left out (:func:`discovery_prompts`)."""
    import time

    from .core.atomic import check_output_path
    from .discovery.cna import discover
    from .model.loading import load_model
    from .model.prompts import load_prompts

    if not opts.positive or not opts.negative:
        raise CnaError("discover needs --positive and --negative prompt files (or a --recipe that names them)")
    check_output_path(Path(out), overwrite)
    positive, negative, _ = discovery_prompts(opts, hold_back)
    neutral = load_prompts(opts.neutral, limit=opts.limit) if opts.neutral else None
    t0 = time.perf_counter()
    loaded = load_model(model, **(model_options or ModelOptions()).model_dump())
    load_seconds = time.perf_counter() - t0
    result = discover(loaded, positive, negative, neutral, opts, progress=progress)
    result.circuit.save(out, overwrite=overwrite)
    return DiscoverRun(result, loaded, positive, negative, neutral, load_seconds)


def discovery_prompts(opts: DiscoverOptions, hold_back: int = 0) -> tuple[PromptSet, PromptSet, HeldOut | None]:
    """The positive and negative sets discovery reads, less the last ``hold_back`` prompts of each (before
    ``limit``), which are returned as the held-out prompts of ``steer``'s preview (None when nothing is held)."""
    import dataclasses

    from .evaluation.preview import HeldOut, split_held_out
    from .model.prompts import load_prompts

    if not opts.positive or not opts.negative:
        raise CnaError("discover needs --positive and --negative prompt files (or a --recipe that names them)")
    sets = [load_prompts(p, field=opts.field, column=opts.column) for p in (opts.positive, opts.negative)]
    held: list[tuple[str, ...]] = []
    if hold_back:
        for i, (s, what) in enumerate(zip(sets, ("positive", "negative"), strict=True)):
            kept, out = split_held_out(s.texts, hold_back, what)
            sets[i] = dataclasses.replace(s, texts=kept)
            held.append(out)
    if opts.limit is not None:
        sets = [dataclasses.replace(s, texts=s.texts[: opts.limit]) for s in sets]
    ho = HeldOut(held[0], held[1], Path(opts.positive).name, Path(opts.negative).name) if held else None
    return sets[0], sets[1], ho


def preview_prompts(opts: DiscoverOptions, n: int, required: bool) -> tuple[HeldOut | None, str | None]:
    """The last ``n`` prompts of each recipe set, held out for ``steer``'s preview, and None; or None and why
    not, when a set has fewer than twice ``n`` prompts and the preview was not asked for (``required``: then
    too few prompts is a :class:`CnaError`)."""
    from .model.prompts import load_prompts

    if not required and opts.positive and opts.negative:
        for what in ("positive", "negative"):
            count = len(load_prompts(getattr(opts, what), field=opts.field, column=opts.column))
            if count < 2 * n:
                return None, f"the {what} set has {count} prompts, fewer than twice the {n} it would hold out"
    return discovery_prompts(opts, n)[2], None


def write_steer_card(out: Path, model: str, preview: BehaviourPreview) -> Path:
    """A ``steer`` folder's model card (``README.md``): the measured behaviour, then each export's summary and
    verification, with the front matter a Hub push uses."""
    from .core.atomic import atomic_write_text
    from .export.card import CARD_FILE, steer_card_body
    from .export.hub import Upload, collect, render_card

    found = collect(out)
    text = render_card(Upload(manifests=found.manifests, card_body=steer_card_body(model, preview, found.manifests)))
    atomic_write_text(out / CARD_FILE, text, overwrite=True)
    return out / CARD_FILE


def _files_identity(model: str | Path, trust_remote_code: bool) -> ModelIdentity | None:
    """The shapes of a local model read from its files (config.json and safetensors headers, or the GGUF
    header) without loading it; None where they cannot be read that way (a Hub id, pickled weights)."""
    from .io.sources import resolve_source

    source = resolve_source(model)
    if source.path is None:
        return None
    if source.kind == "gguf":
        from .io import gguf as G
        from .io.identity import gguf_identity

        return gguf_identity(G.open_gguf(source.path), source.spec, fingerprint=False)
    if not any(source.path.glob("*.safetensors")):
        return None
    from .io.identity import checkpoint_identity

    return checkpoint_identity(source.path, source.spec, trust_remote_code=trust_remote_code,
                               with_fingerprint=False)[0]


def run_generate(model: str | Path, prompts: Sequence[str], circuit: str | Path | None = None,
                 multiplier: float | None = None, *, force: bool = False, compare: bool = False,
                 model_options: ModelOptions | None = None, **gen: Any) -> tuple[list[str] | None, list[str]]:
    """The ``generate`` job: greedy answers to ``prompts`` with ``circuit`` hook-steered (and, with
    ``compare``, unsteered ones too). Returns ``(unsteered or None, steered)``; ``gen``: options
    of :func:`cna_export.model.generation.generate`. A circuit that does not fit the model's shapes is
    refused before the weights are loaded."""
    import logging

    from .model.generation import generate
    from .model.loading import load_model
    from .model.steering import steer_circuit

    mopts = model_options or ModelOptions()
    c = Circuit.load(circuit) if circuit else None
    if c is None and multiplier is not None:
        raise CnaError("--multiplier needs --circuit")
    shapes = _files_identity(model, mopts.trust_remote_code) if c is not None else None
    if c is not None and shapes is not None:
        c.check_fits(shapes, force=force)  # shapes only (no fingerprint): before the weights are loaded
    loaded = load_model(model, **mopts.model_dump())
    if c is not None:
        for note in c.check_fits(loaded.identity(), force=force):
            logging.getLogger("cna_export").warning(note)
    prompts = list(prompts)
    with steer_circuit(loaded, c, multiplier):
        steered = generate(loaded, prompts, **gen)
    base = generate(loaded, prompts, **gen) if compare and c is not None else None
    return base, steered
