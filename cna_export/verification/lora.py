"""Verification of a PEFT LoRA adapter export: base + adapter must behave like hook steering of the base.

The reference is the base with the manifest's multipliers applied by hooks; the candidate is a
second copy of the base wrapped in ``PeftModel.from_pretrained(base, adapter)`` (needs ``peft``).
Same prompts, metrics and tolerances as :func:`cna_export.verification.safetensors.verify_export`.
Usable as an export ``check``: ``export_lora(..., check=lambda staged: verify_lora(staged.source,
staged.path, manifest=staged.manifest))``.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..core.errors import CnaError
from ..core.manifest import ExportManifest
from ..core.settings.verify import VerifyOptions
from .prompts import verification_prompts
from .report import VerifyReport
from .safetensors import compare_steered, export_manifest, loading_options, tolerances


def check_lora_base(spec: str, manifest: ExportManifest) -> bool:
    """Refuse (CnaError) a base whose steered down_proj tensors are not those the adapter was computed from
    (the manifest's ``sha256_before``). Returns False when the base is in another format than the one the
    adapter was computed from (names and bytes not comparable), True when checked."""
    from ..io import gguf as G
    from ..io.sources import local_folder, resolve_source
    from ..io.tensor_bytes import tensor_sha256
    from .gguf_lora import check_base

    source = resolve_source(spec)
    if (source.kind == "gguf") != (manifest.source_format == "gguf"):
        return False
    if source.kind == "gguf":
        assert source.path is not None
        check_base(G.open_gguf(source.path), manifest, source.path)
        return True
    from ..io.identity import checkpoint_identity

    _, _, ckpt, _ = checkpoint_identity(local_folder(source), spec, with_fingerprint=False)

    for tt in manifest.tensors:
        if tt.name not in ckpt.weight_map:
            raise CnaError(f"the adapter does not fit {spec}: it has no {tt.name} (an adapter for a different base?)")
        if tensor_sha256(ckpt.read(tt.name)) != tt.sha256_before:
            raise CnaError(f"the adapter was made for a different base: {spec}'s {tt.name} is not the tensor it was "
                           f"computed from (sha256_before); pass the base it was exported from ({manifest.source})")
    return True


def verify_lora(original: str | Any, adapter: str | Path, opts: VerifyOptions | None = None,
                prompt_files: Sequence[str | Path] | None = None, model_options: Mapping[str, Any] | None = None,
                manifest: ExportManifest | None = None, progress: bool = False, session: Any = None,
                name: str | Path | None = None) -> VerifyReport:
    """Verify the PEFT adapter folder ``adapter`` against hook steering of ``original`` (a spec or LoadedModel).
    ``name``: what the report calls the adapter (a staged export's final path; default: ``adapter``).
    ``session`` (:class:`~cna_export.verification.session.VerifySession` of ``original``): the reference is its
    model, the base under the adapter a copy of it (the same weights, not loaded again), and the hook-steered
    logits are shared with other verifications."""
    import torch

    from ..model.loading import load_model, resolve_dtype

    try:
        from peft import PeftModel
    except ImportError:
        raise CnaError("verifying a LoRA adapter needs peft: pip install 'cna-export[lora]'") from None
    opts = opts or VerifyOptions()
    mopts = loading_options(model_options)
    adapter = Path(adapter)
    manifest = export_manifest(adapter, manifest, "lora", "LoRA adapter folders")
    spec = original if isinstance(original, str) else original.source.spec
    check_lora_base(str(spec), manifest)
    dtype = "float32" if opts.dtype == "auto" else str(resolve_dtype(opts.dtype, None)).removeprefix("torch.")
    prompts, prompt_info = verification_prompts(prompt_files, opts.limit, opts.field, opts.column)
    t0 = time.perf_counter()
    spec = original if isinstance(original, str) else original.source.spec
    if session is not None and session.serves(original):
        ref = session.reference(dtype)
        base = dataclasses.replace(ref, model=copy.deepcopy(ref.model))
    else:
        ref = load_model(original, dtype=dtype, **mopts) if isinstance(original, str) else original
        if not isinstance(original, str):
            ref.model.to(getattr(torch, dtype))
        base = load_model(spec, dtype=dtype, **mopts)
    manifest.circuit.check_fits(ref.identity(with_fingerprint=False))
    cand = dataclasses.replace(base, model=PeftModel.from_pretrained(base.model, str(adapter)).eval())
    load_seconds = time.perf_counter() - t0
    report = compare_steered(
        ref, cand, manifest.multiplier_map(), prompts, opts, tolerances(opts, dtype),
        reference_name=f"{spec} + hook steering ({len(manifest.multipliers)} neurons)",
        candidate_name=f"{spec} + LoRA {name or adapter}", settings={**prompt_info, "source": manifest.source},
        progress=progress, session=session,
    )
    report.seconds = {"load": load_seconds, **report.seconds}
    return report
