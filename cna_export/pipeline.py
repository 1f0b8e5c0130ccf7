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

Format = Literal["safetensors", "gguf"]


def export_format(out: str | Path, format: Format | None = None) -> Format:
    """The output format: as given, else GGUF when ``out`` ends in ``.gguf``, else safetensors."""
    if format is not None:
        return format
    return "gguf" if str(out).lower().endswith(".gguf") else "safetensors"


def safetensors_check(
    opts: Any = None, prompt_files: Sequence[str | Path] | None = None,
    model_options: Mapping[str, Any] | None = None, progress: bool = False,
) -> ExportCheck:
    """Verification of a staged safetensors export against hook steering of its source."""
    from .verify.safetensors import verify_export

    def check(staged: StagedExport) -> Any:
        return verify_export(staged.source, staged.path, opts=opts, prompt_files=prompt_files,
                             model_options=model_options, manifest=staged.manifest,
                             reference_name=staged.source_name, candidate_name=str(staged.out), progress=progress)

    return check


def gguf_check(
    opts: Any = None, prompt_files: Sequence[str | Path] | None = None, loaded: Any = None, progress: bool = False,
) -> ExportCheck:
    """Verification of a staged GGUF export (tensors exactly, then behaviour in llama.cpp); ``loaded``
    is an already loaded transformers model of the source, to save loading it again."""
    from .verify.gguf import GGUFVerifyOptions, verify_gguf

    gopts = opts if isinstance(opts, GGUFVerifyOptions) else GGUFVerifyOptions(
        **(opts.model_dump() if opts is not None else {}))

    def check(staged: StagedExport) -> Any:
        return verify_gguf(loaded if loaded is not None else staged.source, staged.path, gopts,
                           prompt_files=prompt_files, manifest=staged.manifest, progress=progress)

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
    :func:`cna_export.export.safetensors.export_safetensors` or :func:`cna_export.export.gguf.export_gguf`."""
    if export_format(out, format) == "gguf":
        from .export.gguf import export_gguf

        check = gguf_check(verify_options, prompt_files, progress=progress) if verify else None
        return export_gguf(model, circuit, out, check=check, progress=progress, **options)
    from .export.safetensors import export_safetensors

    model_options = {k: options[k] for k in ("allow_pickle", "trust_remote_code") if k in options}
    check = safetensors_check(verify_options, prompt_files, model_options, progress) if verify else None
    return export_safetensors(model, circuit, out, check=check, progress=progress, **options)
