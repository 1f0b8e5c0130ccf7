"""Stages composed: export with its verification run on the staged output before it is published.

Export and verification do not know each other: an exporter takes an optional ``check``
(:data:`cna_export.export.plan.ExportCheck`) that it runs on the staged folder or file before the
final rename, and this module builds that check from the verification stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from .core.circuit import Circuit
from .export.plan import ExportCheck, StagedExport

Format = Literal["safetensors", "gguf", "lora", "gguf-lora"]


def export_format(out: str | Path, format: Format | None = None) -> Format:
    """The output format: as given, else GGUF when ``out`` ends in ``.gguf``, else safetensors."""
    if format is not None:
        return format
    return "gguf" if str(out).lower().endswith(".gguf") else "safetensors"


def _transformers_opts(opts: Any) -> Any:
    """The transformers-side verification settings (``VerifyOptions``) of a ``GGUFVerifyOptions``."""
    from .core.settings import VerifyOptions

    return VerifyOptions(**opts.model_dump(include=set(VerifyOptions.model_fields)))


def _gguf_opts(opts: Any) -> Any:
    """``opts`` as ``GGUFVerifyOptions`` (defaults for the llama.cpp-only settings)."""
    from .core.settings import GGUFVerifyOptions

    if isinstance(opts, GGUFVerifyOptions):
        return opts
    return GGUFVerifyOptions(**(opts.model_dump() if opts is not None else {}))


def lora_check(
    opts: Any = None, prompt_files: Sequence[str | Path] | None = None,
    model_options: Mapping[str, Any] | None = None, progress: bool = False,
) -> ExportCheck:
    """Verification of a staged PEFT LoRA adapter folder: base + adapter against hook steering of the base."""
    from .verification.lora import verify_lora

    def check(staged: StagedExport) -> Any:
        return verify_lora(staged.source, staged.path, opts, prompt_files=prompt_files, model_options=model_options,
                           manifest=staged.manifest, progress=progress)

    return check


def safetensors_check(
    opts: Any = None, prompt_files: Sequence[str | Path] | None = None,
    model_options: Mapping[str, Any] | None = None, progress: bool = False,
) -> ExportCheck:
    """Verification of a staged safetensors export against hook steering of its source."""
    from .verification.safetensors import verify_export

    def check(staged: StagedExport) -> Any:
        return verify_export(staged.source, staged.path, opts=opts, prompt_files=prompt_files,
                             model_options=model_options, manifest=staged.manifest,
                             reference_name=staged.source_name, candidate_name=str(staged.out), progress=progress)

    return check


def gguf_check(
    opts: Any = None, prompt_files: Sequence[str | Path] | None = None, progress: bool = False,
) -> ExportCheck:
    """Verification of a staged GGUF export or LoRA GGUF (tensors exactly, then behaviour in llama.cpp)."""
    from .verification.gguf import verify_gguf

    gopts = _gguf_opts(opts)

    def check(staged: StagedExport) -> Any:
        return verify_gguf(staged.source, staged.path, gopts, prompt_files=prompt_files, manifest=staged.manifest,
                           progress=progress)

    return check


def export(
    model: str | Path,
    circuit: Circuit | str | Path,
    out: str | Path,
    *,
    format: Format | None = None,
    verify: bool = False,
    verify_options: Any = None,
    prompt_files: Sequence[str | Path] | None = None,
    progress: bool = False,
    **options: Any,
) -> Any:
    """Export ``circuit`` folded into ``model`` as safetensors or GGUF (see :func:`export_format`),
    verified before it is written when ``verify`` is set. ``options`` go to
    :func:`cna_export.export.safetensors.export_safetensors`, :func:`cna_export.export.gguf.export_gguf`,
    :func:`cna_export.export.lora.export_lora` (``format="lora"``) or
    :func:`cna_export.export.gguf_lora.export_gguf_lora` (``format="gguf-lora"``)."""
    fmt = export_format(out, format)
    if fmt == "lora":
        from .export.lora import export_lora

        model_options = {k: options[k] for k in ("trust_remote_code",) if k in options}
        check = lora_check(verify_options, prompt_files, model_options, progress) if verify else None
        return export_lora(model, circuit, out, check=check, progress=progress, **options)
    if fmt == "gguf-lora":
        from .export.gguf_lora import export_gguf_lora

        check = gguf_check(verify_options, prompt_files, progress=progress) if verify else None
        return export_gguf_lora(model, circuit, out, check=check, progress=progress, **options)
    if fmt == "gguf":
        from .export.gguf import export_gguf

        check = gguf_check(verify_options, prompt_files, progress=progress) if verify else None
        return export_gguf(model, circuit, out, check=check, progress=progress, **options)
    from .export.safetensors import export_safetensors

    model_options = {k: options[k] for k in ("allow_pickle", "trust_remote_code") if k in options}
    check = safetensors_check(verify_options, prompt_files, model_options, progress) if verify else None
    return export_safetensors(model, circuit, out, check=check, progress=progress, **options)


def run_export(
    model: str | Path, circuit: str | Path, out: str | Path, options: Any, gguf: Any = None, verify_options: Any = None,
    model_options: Any = None, progress: bool = False,
) -> tuple[Format, Any]:
    """The ``export`` job: :func:`export` with its settings models (``options``:
    :class:`~cna_export.core.settings.ExportOptions`, ``gguf``: ``GGUFExportOptions``, ``verify_options``:
    ``GGUFVerifyOptions``, ``model_options``: ``ModelOptions``); flags of the other format are refused.
    Returns the format written and the exporter's result."""
    from .core.errors import CnaError
    from .core.settings import GGUFExportOptions, GGUFVerifyOptions, ModelOptions

    o, g = options, gguf or GGUFExportOptions()
    vopts = verify_options or GGUFVerifyOptions()
    mopts = model_options or ModelOptions()
    fmt = export_format(out, g.format)
    common = dict(multiplier=o.multiplier, multipliers=o.multipliers, overwrite=o.overwrite, force=o.force,
                  verify=o.verify, prompt_files=o.prompts, progress=progress)
    if g.adapter_dtype != "auto" and fmt not in ("lora", "gguf-lora"):
        raise CnaError("--adapter-dtype applies to LoRA exports (--format lora or gguf-lora)")
    if fmt in ("lora", "gguf-lora"):
        what = "a LoRA adapter"
        if o.link or o.max_shard_size or o.convert_dtype != "auto":
            raise CnaError(f"--link, --max-shard-size and --dtype apply to safetensors exports, not {what} "
                           "(--adapter-dtype sets the adapter's dtype)")
        if g.fold == "up" or g.fast_copy:
            raise CnaError(f"--fold up and --fast-copy apply to GGUF exports; {what} always acts on down_proj")
        if mopts.allow_pickle:
            raise CnaError(f"{what} is computed from safetensors or GGUF weights; --allow-pickle does not apply "
                           "(convert the checkpoint with a safetensors export first)")
        if fmt == "lora":
            if str(out).lower().endswith(".gguf"):
                raise CnaError(f"--format lora writes a PEFT adapter folder, not {out}; use --format gguf-lora for a "
                               "llama.cpp adapter")
            if not g.modelfile:
                raise CnaError("--no-modelfile applies to GGUF exports")
            dtype = "float32" if g.adapter_dtype == "auto" else g.adapter_dtype
            return fmt, export(model, circuit, out, format=fmt, dtype=dtype, trust_remote_code=mopts.trust_remote_code,
                               verify_options=_transformers_opts(vopts), **common)
        if not str(out).lower().endswith(".gguf"):
            raise CnaError(f"--format gguf-lora writes a .gguf adapter file; --out {out} does not end in .gguf")
        dtypes = {"auto": "F32", "float32": "F32", "float16": "F16"}
        if g.adapter_dtype not in dtypes:
            raise CnaError("a llama.cpp LoRA adapter is float32 or float16 (--adapter-dtype)")
        return fmt, export(model, circuit, out, format=fmt, dtype=dtypes[g.adapter_dtype], modelfile=g.modelfile,
                           verify_options=vopts, **common)
    if fmt == "gguf":
        if o.link or o.max_shard_size:
            raise CnaError("--link and --max-shard-size apply to safetensors exports, not GGUF")
        return fmt, export(model, circuit, out, format=fmt, fold=g.fold or "up", fast_copy=g.fast_copy,
                           modelfile=g.modelfile, verify_options=vopts, **common)
    if g.fold == "up" or g.fast_copy or not g.modelfile:
        raise CnaError("--fold up, --fast-copy and --no-modelfile apply to GGUF exports (--format gguf)")
    return fmt, export(model, circuit, out, format=fmt, link=o.link, dtype=o.convert_dtype,
                       max_shard_size=o.max_shard_size, allow_pickle=mopts.allow_pickle,
                       trust_remote_code=mopts.trust_remote_code, verify_options=_transformers_opts(vopts), **common)


def verify(
    original: str | Path, exported: str | Path, opts: Any = None, prompt_files: Sequence[str | Path] | None = None,
    model_options: Any = None, progress: bool = False, reference: str | Path | None = None,
) -> Any:
    """Verify an export against hook steering of ``original``: a ``.gguf`` file in llama.cpp
    (:func:`cna_export.verification.gguf.verify_gguf`), else a safetensors folder
    (:func:`cna_export.verification.safetensors.verify_export`). ``opts``: ``GGUFVerifyOptions``.
    ``reference`` (GGUF exports only): the Hugging Face model that transformers runs with hook steering
    instead of the source GGUF (for families whose GGUF files transformers cannot load)."""
    from .core.errors import CnaError
    from .core.settings import GGUFVerifyOptions, ModelOptions

    if reference is not None and Path(exported).suffix.lower() != ".gguf":
        raise CnaError("--reference applies to GGUF exports only")

    opts = opts or GGUFVerifyOptions()
    mopts = model_options or ModelOptions()
    if (Path(exported) / "adapter_config.json").is_file():
        from .verification.lora import verify_lora

        return verify_lora(str(original), exported, _transformers_opts(opts), prompt_files=prompt_files,
                           model_options=mopts.model_dump(exclude={"dtype"}), progress=progress)
    if Path(exported).suffix.lower() == ".gguf":
        from .verification.gguf import verify_gguf

        return verify_gguf(original, exported, _gguf_opts(opts), prompt_files=prompt_files, progress=progress,
                           reference=reference)
    from .verification.safetensors import verify_export

    return verify_export(original, exported, _transformers_opts(opts), prompt_files=prompt_files,
                         model_options=mopts.model_dump(exclude={"dtype"}), progress=progress)


def hub_token_for(hub: Any) -> str | None:
    """The Hub token when ``hub`` (:class:`~cna_export.core.settings.HubOptions`) asks for a push, checked
    before any work: a missing token or a malformed repo id is a one-line error. None without a push."""
    if hub is None or not hub.push_to_hub:
        return None
    from .export.hub import check_repo_id, hub_token

    check_repo_id(hub.push_to_hub)
    return hub_token()


def push(path: str | Path, hub: Any, token: str | None = None, recipe: str | None = None) -> Any:
    """Upload an export (folder or GGUF file, or a ``steer`` folder) to ``hub.push_to_hub`` in one commit
    (:func:`cna_export.export.hub.push_export`)."""
    from .export.hub import push_export

    return push_export(path, hub.push_to_hub, private=hub.private, token=token, recipe=recipe)


def run_discover(model: str | Path, out: str | Path, opts: Any, model_options: Any = None, overwrite: bool = False,
                 progress: bool = False) -> Any:
    """The ``discover`` job: read the prompt sets, load ``model``, find the circuit and save it to ``out``.
    ``opts``: :class:`~cna_export.core.settings.DiscoverOptions`. Returns a namespace with ``result``
    (the discovery result), ``loaded``, the prompt sets and ``load_seconds``."""
    import time
    from types import SimpleNamespace

    from .core.atomic import check_output_path
    from .core.errors import CnaError
    from .core.settings import ModelOptions
    from .discovery.cna import discover
    from .model.loading import load_model
    from .model.prompts import load_prompts

    if not opts.positive or not opts.negative:
        raise CnaError("discover needs --positive and --negative prompt files (or a --recipe that names them)")
    check_output_path(Path(out), overwrite)
    sel = dict(field=opts.field, column=opts.column, limit=opts.limit)
    positive = load_prompts(opts.positive, **sel)
    negative = load_prompts(opts.negative, **sel)
    neutral = load_prompts(opts.neutral, limit=opts.limit) if opts.neutral else None
    t0 = time.perf_counter()
    loaded = load_model(model, **(model_options or ModelOptions()).model_dump())
    load_seconds = time.perf_counter() - t0
    result = discover(loaded, positive, negative, neutral, opts, progress=progress)
    result.circuit.save(out, overwrite=overwrite)
    return SimpleNamespace(result=result, loaded=loaded, positive=positive, negative=negative, neutral=neutral,
                           load_seconds=load_seconds)


def run_generate(model: str | Path, prompts: Sequence[str], circuit: str | Path | None = None,
                 multiplier: float | None = None, *, force: bool = False, compare: bool = False,
                 model_options: Any = None, **gen: Any) -> tuple[list[str] | None, list[str]]:
    """The ``generate`` job: greedy answers to ``prompts`` with ``circuit`` hook-steered (and, with
    ``compare``, unsteered ones too). Returns ``(unsteered or None, steered)``; ``gen``: options
    of :func:`cna_export.model.generation.generate`."""
    import logging

    from .core.errors import CnaError
    from .core.settings import ModelOptions
    from .model.generation import generate
    from .model.loading import load_model
    from .model.steering import steer_circuit

    c = Circuit.load(circuit) if circuit else None
    if c is None and multiplier is not None:
        raise CnaError("--multiplier needs --circuit")
    loaded = load_model(model, **(model_options or ModelOptions()).model_dump())
    if c is not None:
        for note in c.check_fits(loaded.identity(), force=force):
            logging.getLogger("cna_export").warning(note)
    prompts = list(prompts)
    with steer_circuit(loaded, c, multiplier):
        steered = generate(loaded, prompts, **gen)
    base = generate(loaded, prompts, **gen) if compare and c is not None else None
    return base, steered
