"""Export a circuit as a llama.cpp LoRA adapter GGUF, applied on top of an unchanged GGUF base.

The factors are those of :mod:`cna_export.export.lora`, computed from the base's dequantised
``ffn_down`` tensors: ``A`` selects the circuit neurons of a layer, ``B`` holds the change of their
columns. llama.cpp's loader (``llama_adapter_lora_init``) pairs ``<tensor>.lora_a`` with
``<tensor>.lora_b`` and checks ``a.ne[0] == W.ne[0]`` (the intermediate size), ``b.ne[1] == W.ne[1]``
(hidden) and ``a.ne[1] == b.ne[0]`` (the rank): in numpy order ``lora_a`` is ``[rank, intermediate]``
and ``lora_b`` ``[hidden, rank]``, PEFT's own orientation. It computes
``W x + scale * B (A x)`` with ``scale = adapter_scale * alpha / rank``, ``rank = b.ne[0]`` per
tensor but a single ``adapter.lora.alpha`` per file (and ``scale = adapter_scale`` when alpha is
0 or missing).

Layers with different numbers of circuit neurons would therefore get different scales. Every
layer is padded to the largest rank ``R`` instead (zero rows of A, zero columns of B, which add
exactly nothing) and alpha is ``R``, so every tensor's scale is ``R / R = 1`` exactly, in llama.cpp
and in any other reader that follows the ``alpha / rank`` convention (Ollama). Folding
``rank / alpha`` into B would cost a rounding, and relying on ``alpha = 0`` meaning "scale 1" is a
llama.cpp detail other readers need not share; the padding costs ``(R - r) * (hidden +
intermediate)`` zeros per layer.

Written with gguf-py's ``GGUFWriter``: ``general.architecture`` (the base's), ``general.type =
adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``, ``general.name``, the export manifest
as ``cna.manifest`` (its ``base_file`` records the base: path, size, fingerprint); tensors
``blk.N.ffn_down.weight.lora_a`` / ``.lora_b`` in F32 (or F16). An Ollama Modelfile (``FROM <base>``,
``ADAPTER ./<file>``) named after it (``<name>.Modelfile``) is published with it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import CnaError
from ..core.formats import GGUFLoraFormat
from ..core.manifest import GGUF_KEY, BaseFile, ExportManifest
from ..io import gguf as G
from .card import modelfile_path, render_adapter_modelfile
from .lora import LoraPlan, lora_manifest, plan_lora
from .plan import StagedExport, run_check
from .publish import publish_together, write_text
from .request import ExportRequest, MultiplierSpec, request_for

log = logging.getLogger(__name__)


@dataclass
class GGUFLoraExportResult:
    """What :func:`export_gguf_lora` wrote."""

    out: Path
    base: Path
    manifest: ExportManifest
    modelfile: Path | None
    rank: int  # every tensor's rank (the largest layer's neuron count)
    alpha: float
    bytes: int = 0
    seconds: float = 0.0
    verification: Any = None


def export_gguf_lora(model: str | Path, circuit: Any, out: str | Path, multiplier: float | None = None,
                     multipliers: MultiplierSpec = None, **settings: Any) -> GGUFLoraExportResult:
    """Write ``circuit`` (a :class:`~cna_export.core.circuit.Circuit` or its file) as a llama.cpp LoRA adapter
    for the GGUF ``model`` (a ``.gguf`` file or ``bundled:NAME``).

    ``settings``: ``overwrite``, ``force``, ``check``, ``progress`` (:class:`ExportRequest`) and the fields
    of :class:`~cna_export.core.formats.GGUFLoraFormat` (``dtype``, ``modelfile``). See :func:`write_gguf_lora`.
    """
    settings = dict(settings, multiplier=multiplier, multipliers=multipliers)
    return write_gguf_lora(*request_for(GGUFLoraFormat, model, circuit, out, settings))


def write_gguf_lora(request: ExportRequest, options: GGUFLoraFormat) -> GGUFLoraExportResult:
    """Write the llama.cpp LoRA adapter of ``request`` for its GGUF base.

    Load it with ``llama_cpp.Llama(model_path=<base>, lora_path=<out>)`` or ``llama-cli -m <base>
    --lora <out>``. Everything is checked before anything is written; a ``check`` runs on the staged
    file before it is renamed into place.
    """
    source = request.source
    if source.kind != "gguf" or source.path is None:
        raise CnaError(f"a GGUF LoRA adapter is applied on top of a GGUF base; pass a .gguf model (or bundled:NAME), "
                       f"got {request.model}")
    base, out = source.path, request.out
    modelfile = modelfile_path(out) if options.modelfile else None
    for p in (out, modelfile):
        if p is not None:
            request.claim(p)
    plan = plan_lora(request, dtype="float32", pad_to_max_rank=True)
    rank = plan.max_rank
    manifest = lora_manifest(plan, request.circuit, "gguf_lora", notes=[
        f"llama.cpp adapter: every layer padded to rank {rank} with zeros, adapter.lora.alpha = {rank:g}, so the "
        "scale alpha / rank is exactly 1; apply it with scale 1",
    ])
    manifest.base_file = BaseFile(path=str(base), size=base.stat().st_size, fingerprint=plan.identity.fingerprint)
    report = None
    with publish_together([p for p in (out, modelfile) if p is not None], request.overwrite, request.inputs) as temps:
        _write_adapter(temps[0], plan, manifest, options.dtype, request.progress)
        _check_adapter(temps[0], plan, rank)
        if request.check is not None:
            report = run_check(request.check, StagedExport(temps[0], manifest, request.model, request.model, out),
                               max_reasons=3, record=False)
        if modelfile is not None:
            write_text(temps[1], render_adapter_modelfile(out, base, plan.reader, manifest))
    return GGUFLoraExportResult(out=out, base=base, manifest=manifest, modelfile=modelfile, rank=rank,
                                alpha=float(rank), bytes=out.stat().st_size, seconds=request.seconds,
                                verification=report)


def _write_adapter(tmp: Path, plan: LoraPlan, manifest: ExportManifest, dtype: str, progress: bool) -> None:
    """The adapter GGUF: the KVs llama.cpp requires, the manifest, each layer's A and B in ``dtype``."""
    import numpy as np
    from gguf import GGUFWriter
    from gguf.constants import GGUFType, Keys

    np_dtype = np.float32 if dtype == "F32" else np.float16
    base_name = G.field_value(plan.reader, "general.name") or Path(str(plan.path)).stem
    writer = GGUFWriter(str(tmp), plan.gguf_arch or "")
    writer.add_type(GGUFType.ADAPTER)
    writer.add_string(Keys.Adapter.TYPE, "lora")
    writer.add_float32(Keys.Adapter.LORA_ALPHA, float(plan.max_rank))
    writer.add_name(f"{base_name} CNA steering LoRA")
    writer.add_string(GGUF_KEY, manifest.to_json())
    for layer in plan.layers:
        a = layer.a.astype(np_dtype)  # the plan's factors are float32
        b = layer.b.astype(np_dtype)
        if dtype == "F16" and not np.isfinite(b).all():
            raise CnaError(f"layer {layer.layer}: B does not fit in F16; export with dtype F32")
        writer.add_tensor(f"{layer.tensor}.lora_a", np.ascontiguousarray(a))
        writer.add_tensor(f"{layer.tensor}.lora_b", np.ascontiguousarray(b))
    try:  # a write error becomes one line naming the output (core.atomic)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
    finally:
        writer.close()


def _check_adapter(path: Path, plan: Any, rank: int) -> None:
    """Re-read the written adapter: the KVs llama.cpp requires and every tensor pair in the loader's shapes."""
    written = G.open_gguf(path)
    problems = []
    for key, want in (("general.type", "adapter"), ("adapter.type", "lora"),
                      ("general.architecture", plan.gguf_arch)):
        if G.field_value(written, key) != want:
            problems.append(f"{key} is {G.field_value(written, key)!r}, expected {want!r}")
    tensors = G.tensor_map(written)
    base = G.tensor_map(plan.reader)
    for layer in plan.layers:
        w = base[layer.tensor]
        a, b = tensors.get(f"{layer.tensor}.lora_a"), tensors.get(f"{layer.tensor}.lora_b")
        if a is None or b is None:
            problems.append(f"{layer.tensor}: lora_a / lora_b missing")
            continue
        if not (int(a.ne[0]) == int(w.ne[0]) and int(b.ne[1]) == int(w.ne[1]) and int(a.ne[1]) == int(b.ne[0]) == rank):
            problems.append(f"{layer.tensor}: adapter shapes {list(a.ne)} / {list(b.ne)} do not fit {list(w.ne)}")
    del written
    if problems:
        raise CnaError(f"the written LoRA GGUF failed its self-check: {problems[0]}")


def read_gguf_lora_manifest(path: str | Path) -> ExportManifest:
    """The export manifest of a GGUF LoRA adapter written by :func:`export_gguf_lora`."""
    reader = G.open_gguf(Path(path))
    if G.field_value(reader, "general.type") != "adapter":
        raise CnaError(f"{path} is not a GGUF adapter (general.type is not 'adapter')")
    text = G.field_value(reader, GGUF_KEY)
    if text is None:
        raise CnaError(f"{path} has no {GGUF_KEY} KV: it is not a cna-export LoRA adapter")
    return ExportManifest.from_json(text, source=f"{path} ({GGUF_KEY})")
