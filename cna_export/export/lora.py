"""Export a circuit as an exact LoRA adapter (PEFT folder) instead of a steered checkpoint.

Scaling columns ``S`` of a layer's down_proj weight ``W`` (``[hidden, intermediate]``) by ``m`` is a
rank-``|S|`` update: ``W' = W + B A`` with

* ``A`` (``[r, intermediate]``): one one-hot row per circuit neuron of the layer (it *selects* the
  neuron activations ``x[S]``), and
* ``B`` (``[hidden, r]``): the change of the selected columns, ``W'[:, S] - W[:, S]``.

``W'`` is exactly what the safetensors export writes (:func:`cna_export.export.fold.scale_stored`:
``W[:, j] * m`` in float32, rounded once to the weight's dtype); ``B`` is that difference, taken
in float64 (exact) and rounded once to the adapter dtype (float32 by default), nudged to a neighbour
where that is what merging needs (:mod:`cna_export.export.lora_factors`), so PEFT's ``merge_and_unload``
reproduces the safetensors export, and PEFT's runtime ``W x + B (A x)`` equals hook steering up to
float32 summation order. The factors are computed in numpy on the weights as stored (bfloat16 as its
bits, :mod:`cna_export.io.float_bits`): an export never imports torch.

The adapter targets the down_proj modules of the circuit's layers only, with the rank of each
layer in ``rank_pattern`` and ``alpha == rank`` (``alpha_pattern``) so PEFT's scale ``alpha / r``
is exactly 1. The down projection is a separate module in every supported architecture, fused
gate_up ones (phi3) included, so nothing is refused for that.

The base is read without loading a model: a safetensors folder (or Hub snapshot) one down_proj
tensor at a time, memory-mapped; a GGUF file (``.gguf`` / ``bundled:NAME``) by dequantising its ``ffn_down``
tensors (bit-identical to what transformers loads from it). The export itself needs no ``peft``.

:mod:`cna_export.export.gguf_lora` writes the same factors as a llama.cpp LoRA GGUF.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..core.atomic import atomic_dir
from ..core.circuit import Circuit, ModelIdentity
from ..core.errors import CnaError
from ..core.formats import LoraFormat
from ..core.manifest import MANIFEST_FILE, SHARD_METADATA_KEY, ExportManifest, TouchedTensor, multipliers_list
from ..core.progress import bar as progress_bar
from ..core.version import __version__
from ..io import float_bits
from ..io.sources import local_folder
from ..io.tensor_bytes import sha256_array
from ..model.steering import group_by_layer
from .card import CARD_FILE, lora_model_card
from .lora_factors import lora_factors, merged_sha256
from .plan import StagedExport, run_check
from .request import ExportRequest, MultiplierSpec, request_for

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
LORA_DTYPES = ("float32", "float16", "bfloat16", "auto")


# -- the plan -----------------------------------------------------------------------------------


@dataclass
class LoraLayer:
    """One steered layer: where its down_proj lives and its factors."""

    layer: int
    module: str  # the down_proj module's name in the transformers model (what PEFT targets)
    tensor: str  # the base's tensor name (checkpoint name, or GGUF name for GGUF bases)
    file: str | None  # the shard holding it (safetensors bases)
    indices: list[int]
    multipliers: list[float]
    a: np.ndarray  # [rank, intermediate], stored as the plan's dtype (io.float_bits)
    b: np.ndarray  # [hidden, rank]
    touched: TouchedTensor

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass
class LoraPlan:
    """A circuit resolved against its base: identity checked, factors computed, nothing written."""

    spec: str
    kind: str  # hf | hub | gguf
    path: Path | None  # the folder / GGUF file read
    identity: ModelIdentity
    arch: Any  # ArchSpec
    mults: dict[tuple[int, int], float]
    layers: list[LoraLayer]
    notes: list[str] = field(default_factory=list)
    gguf_arch: str | None = None  # general.architecture of a GGUF base
    reader: Any = None  # the GGUF reader of a GGUF base
    dtype: str = "float32"  # the factors' type (a torch dtype name)

    @property
    def max_rank(self) -> int:
        return max(layer.rank for layer in self.layers)


def module_name(arch: Any, layer: int) -> str:
    """The down_proj module of ``layer`` as transformers names it (``model.layers.3.mlp.down_proj``)."""
    return f"{arch.layers}.{layer}.{arch.mlp}.{arch.down_proj}"


def _factor_dtype(dtype: str, base: str) -> str:
    """The factors' type: ``dtype`` (:data:`LORA_DTYPES`), ``auto`` being the base's float dtype."""
    if dtype not in LORA_DTYPES:
        raise CnaError(f"adapter dtype must be one of {', '.join(LORA_DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        return base if float_bits.storage_dtype(base) is not None else "float32"
    return dtype


@dataclass
class _Base:
    """The base an adapter is computed for, opened for reading: a GGUF file or a safetensors checkpoint."""

    path: Path
    identity: ModelIdentity
    arch: Any  # ArchSpec
    reader: Any = None  # a GGUF base's reader
    gguf_arch: str | None = None  # general.architecture of a GGUF base
    ckpt: Any = None  # a safetensors base's checkpoint
    down_names: list[str] = field(default_factory=list)  # its down_proj tensor of each layer


def _open_base(request: ExportRequest, trust_remote_code: bool) -> _Base:
    from ..io import gguf as G
    from ..io.identity import checkpoint_identity, gguf_identity

    source = request.source
    if source.kind == "gguf":
        assert source.path is not None
        reader = G.open_gguf(source.path)
        identity = gguf_identity(reader, source.spec, fingerprint=bool(request.circuit.model.fingerprint))
        return _Base(source.path, identity, G.gguf_arch(reader), reader=reader,
                     gguf_arch=str(G.field_value(reader, "general.architecture")))
    folder = local_folder(source)
    if not any(folder.glob("*.safetensors")):
        raise CnaError(f"LoRA export reads safetensors (or GGUF) weights; {request.model} has none "
                       "(convert it first, e.g. with a safetensors export at multiplier 1)")
    identity, arch, ckpt, down_names = checkpoint_identity(
        folder, source.spec, "hub" if source.kind == "hub" else "hf", trust_remote_code)
    return _Base(folder, identity, arch, ckpt=ckpt, down_names=down_names)


def _check_range(grouped: Mapping[int, tuple[list[int], list[float]]], identity: ModelIdentity) -> None:
    for layer, (idx, _ms) in grouped.items():
        if layer >= identity.num_layers:
            raise CnaError(f"circuit neuron layer {layer} is out of range (the model has {identity.num_layers} layers)")
        if max(idx) >= identity.intermediate_size:
            raise CnaError(f"circuit neuron {max(idx)} is out of range in layer {layer} "
                           f"({identity.intermediate_size} neurons)")


@dataclass(frozen=True)
class _Weight:
    """A layer's down_proj weight as stored (a GGUF base's dequantised to float32) and what the manifest says of it."""

    values: np.ndarray  # [hidden, intermediate]
    dtype: str  # the type its arithmetic is done in (a torch dtype name)
    stored_as: str  # the manifest's dtype: the checkpoint's type, or the GGUF tensor type (Q4_K, ...)
    name: str
    file: str | None
    sha256: str  # of the tensor as stored


def _base_weight(base: _Base, layer: int) -> _Weight:
    from ..io import gguf as G
    from ..io.quants import dequantize_rows

    if base.reader is not None:
        down, _ = G.ffn_tensors(base.reader, base.arch, layer)
        w = np.ascontiguousarray(dequantize_rows(down.data, down.tensor_type))
        return _Weight(w, "float32", G.type_name(down), down.name, None, G.sha256_array(down.data))
    name = base.down_names[layer]
    try:
        w, dtype = base.ckpt.read_stored(name)
    except KeyError as e:
        raise CnaError(f"{name}: {float_bits.not_foldable(str(e.args[0]))}") from None
    if w.ndim != 2:
        raise CnaError(f"{name}: a LoRA adapter steers 2-D down_proj weights, this one has shape {list(w.shape)}")
    return _Weight(w, dtype, dtype, name, base.ckpt.weight_map[name], sha256_array(w))


def _layer(base: _Base, layer: int, idx: list[int], ms: list[float], rank: int | None, dtype: str) -> LoraLayer:
    """One layer's factors, from its down_proj weight."""
    w = _base_weight(base, layer)
    a, b = lora_factors(np.asarray(w.values[:, idx]), w.dtype, idx, ms, w.values.shape[1], rank=rank, out=dtype)
    touched = TouchedTensor(name=w.name, dtype=w.stored_as, shape=list(w.values.shape), sha256_before=w.sha256,
                            sha256_after=merged_sha256(w.values, w.dtype, idx, b, dtype), axis="column",
                            indices=list(idx), file=w.file)
    return LoraLayer(layer, module_name(base.arch, layer), w.name, w.file, list(idx), list(ms), a, b, touched)


LAYER_MEMORY = 1 << 30
"""Bytes of float32 weights the layer threads of :func:`_layers` may hold at once."""


def _layers(base: _Base, grouped: Mapping[int, tuple[list[int], list[float]]], rank: int | None,
            dtype: str) -> list[LoraLayer]:
    """Every layer's factors, in layer order, on a few threads (numpy and hashlib release the GIL): as many as the
    CPUs allow (:func:`~cna_export.core.fingerprint.default_threads`) while their float32 weights fit in
    :data:`LAYER_MEMORY`."""
    from concurrent.futures import ThreadPoolExecutor

    from ..core.fingerprint import default_threads

    def one(job: tuple[int, tuple[list[int], list[float]]]) -> LoraLayer:
        layer, (idx, ms) = job
        return _layer(base, layer, idx, ms, rank, dtype)

    layer_bytes = 4 * base.identity.hidden_size * base.identity.intermediate_size
    n = max(1, min(default_threads(), len(grouped), LAYER_MEMORY // max(1, layer_bytes)))
    if n == 1:
        return [one(job) for job in grouped.items()]
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="cna-lora") as pool:
        return list(pool.map(one, grouped.items()))


def plan_lora(request: ExportRequest, dtype: str = "float32", pad_to_max_rank: bool = False,
              trust_remote_code: bool = False) -> LoraPlan:
    """Check the request's circuit against its base and compute every layer's factors (reads, never writes)."""
    base = _open_base(request, trust_remote_code)
    notes = list(request.circuit.check_fits(base.identity, force=request.force))
    for note in notes:
        log.warning(note)
    grouped = group_by_layer(request.multipliers)
    _check_range(grouped, base.identity)
    out_dtype = _factor_dtype(dtype, "float32" if base.reader is not None else str(base.identity.dtype))
    rank = max(len(idx) for idx, _ in grouped.values()) if pad_to_max_rank else None
    layers = _layers(base, grouped, rank, out_dtype)
    source = request.source
    return LoraPlan(source.spec, source.kind, base.path, base.identity, base.arch, dict(request.multipliers), layers,
                    notes, base.gguf_arch, base.reader, out_dtype)


# -- the PEFT folder ---------------------------------------------------------------------------


def adapter_config(plan: LoraPlan, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """``adapter_config.json``: a PEFT ``LoraConfig`` with one rank per layer and scale exactly 1.

    Only long-standing LoraConfig fields are written, so older PEFT versions read it too.
    """
    ranks = {layer.module: layer.rank for layer in plan.layers}
    r = max(ranks.values())
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or plan.spec,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": r,
        "target_modules": sorted(ranks),
        "rank_pattern": dict(sorted(ranks.items())),
        "alpha_pattern": dict(sorted(ranks.items())),  # alpha == rank: PEFT's scale alpha / r is exactly 1
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def adapter_tensors(plan: LoraPlan) -> dict[str, tuple[np.ndarray, str]]:
    """The adapter's tensors (as stored, with their type) under the names ``PeftModel.save_pretrained`` uses."""
    out: dict[str, tuple[np.ndarray, str]] = {}
    for layer in plan.layers:
        key = PEFT_PREFIX + layer.module
        out[f"{key}.lora_A.weight"] = (layer.a, plan.dtype)
        out[f"{key}.lora_B.weight"] = (layer.b, plan.dtype)
    return out


@dataclass
class LoraExportResult:
    """What :func:`export_lora` wrote."""

    out: Path
    manifest: ExportManifest
    ranks: dict[int, int]  # layer -> rank
    adapter_bytes: int = 0  # adapter_model.safetensors
    total_bytes: int = 0  # the whole folder
    seconds: float = 0.0
    verification: Any = None  # the check's report when a check ran


def _summary(plan: LoraPlan, circuit_sha: str) -> str:
    values = sorted(set(plan.mults.values()))
    return json.dumps({
        "tool": "cna-export", "version": __version__, "format": "lora", "fold": "down", "manifest": MANIFEST_FILE,
        "circuit_sha256": circuit_sha, "neurons": len(plan.mults),
        "multiplier": values[0] if len(values) == 1 else "per-neuron",
        "ranks": {layer.module: layer.rank for layer in plan.layers},
    }, separators=(",", ":"))


def lora_manifest(plan: LoraPlan, circuit: Circuit, fmt: str, notes: Sequence[str] = ()) -> ExportManifest:
    ranks = ", ".join(f"L{layer.layer}: {layer.rank}" for layer in plan.layers)
    return ExportManifest(
        format=fmt,  # type: ignore[arg-type]
        source=plan.spec,
        source_format="gguf" if plan.kind == "gguf" else ("hub" if plan.kind == "hub" else "hf"),
        fold="down",
        circuit=circuit,
        multipliers=multipliers_list(plan.mults),
        tensors=[layer.touched for layer in plan.layers],
        notes=list(plan.notes) + [
            f"LoRA adapter on the down_proj of {len(plan.layers)} layers (ranks {ranks}); A selects the circuit "
            "neurons, B holds the change of their down_proj columns; scale alpha / rank = 1",
            "tensors: the base's down_proj tensors the adapter applies to; sha256_before is the base tensor as "
            "stored, sha256_after the merged weight W + B A (float32 dequantised for a quantised GGUF base)",
            *notes,
        ],
    )


def export_lora(model: str | Path, circuit: Any, out: str | Path, multiplier: float | None = None,
                multipliers: MultiplierSpec = None, **settings: Any) -> LoraExportResult:
    """Write ``circuit`` (a :class:`~cna_export.core.circuit.Circuit` or its file; with ``multiplier``,
    per-neuron ``multipliers``, or its own) as a PEFT LoRA adapter folder for ``model``.

    ``settings``: ``overwrite``, ``force``, ``check``, ``progress`` (:class:`ExportRequest`) and the fields
    of :class:`~cna_export.core.formats.LoraFormat` (``dtype``, ``base_model_name_or_path``,
    ``trust_remote_code``). See :func:`write_lora`.
    """
    settings = dict(settings, multiplier=multiplier, multipliers=multipliers)
    return write_lora(*request_for(LoraFormat, model, circuit, out, settings))


def write_lora(request: ExportRequest, options: LoraFormat) -> LoraExportResult:
    """Write the PEFT LoRA adapter folder of ``request`` for its base (a safetensors folder, a Hub id, a
    ``.gguf`` file or ``bundled:NAME``).

    The folder holds ``adapter_config.json``, ``adapter_model.safetensors`` (A and B in ``dtype``:
    float32, float16, bfloat16, or auto = the base's dtype), ``cna_manifest.json`` and a model card.
    ``base_model_name_or_path`` goes into the config (default: the model as given). Everything is
    checked before anything is written; a ``check`` runs on the staged folder before it is renamed
    into place (see :mod:`cna_export.export.plan`).
    """
    out_path = request.claim()
    plan = plan_lora(request, options.dtype, trust_remote_code=options.trust_remote_code)
    manifest = lora_manifest(plan, request.circuit, "lora")
    result = LoraExportResult(out=out_path, manifest=manifest, ranks={layer.layer: layer.rank for layer in plan.layers})
    with atomic_dir(out_path, overwrite=request.overwrite, inputs=request.inputs) as tmp:
        _write_adapter(tmp, plan, adapter_config(plan, options.base_model_name_or_path), result, request.progress)
        result.adapter_bytes = (tmp / ADAPTER_WEIGHTS).stat().st_size
        result.total_bytes = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        if request.check is not None:  # a failed check raises: the staged folder is discarded
            result.verification = run_check(request.check, StagedExport(tmp, manifest, plan.spec, plan.spec, out_path))
            _write_docs(tmp, result)  # the manifest and card, now with the report
    result.seconds = request.seconds
    return result


def _write_docs(tmp: Path, result: LoraExportResult) -> None:
    (tmp / MANIFEST_FILE).write_text(result.manifest.to_json() + "\n", "utf-8")
    (tmp / CARD_FILE).write_text(lora_model_card(result.manifest, result.verification, result.ranks), "utf-8")


def _write_adapter(tmp: Path, plan: LoraPlan, config: dict[str, Any], result: LoraExportResult,
                   progress: bool) -> None:
    """The adapter's config, weights, manifest and card into the staging folder ``tmp``."""
    from ..io.safetensors import save_stored

    circuit_sha = hashlib.sha256(result.manifest.circuit.to_json().encode()).hexdigest()
    bar = progress_bar(progress, total=4, desc="lora", unit="file", leave=True)
    try:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", "utf-8")
        bar.update(1)
        save_stored(adapter_tensors(plan), tmp / ADAPTER_WEIGHTS,
                    metadata={"format": "pt", SHARD_METADATA_KEY: _summary(plan, circuit_sha)})
        bar.update(1)
        _write_docs(tmp, result)
        bar.update(2)
    except OSError as e:
        raise CnaError(f"cannot write {result.out}: {e.strerror or e}") from None
    finally:
        bar.close()
