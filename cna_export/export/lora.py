"""Export a circuit as an exact LoRA adapter (PEFT folder) instead of a steered checkpoint.

Scaling columns ``S`` of a layer's down_proj weight ``W`` (``[hidden, intermediate]``) by ``m`` is a
rank-``|S|`` update: ``W' = W + B A`` with

* ``A`` (``[r, intermediate]``): one one-hot row per circuit neuron of the layer (it *selects* the
  neuron activations ``x[S]``), and
* ``B`` (``[hidden, r]``): the change of the selected columns, ``W'[:, S] - W[:, S]``.

``W'`` is exactly what the safetensors export writes (:func:`cna_export.export.fold.scale_columns`:
``W[:, j] * m`` in float32, rounded once to the weight's dtype); ``B`` is that difference, taken
in float64 (exact) and rounded once to the adapter dtype (float32 by default). For a float32 base
the rounding is exact whenever ``W'[:, j] - W[:, j]`` is representable (every m in {0, -1, 2, 0.5},
and in practice nearly always), so PEFT's ``merge_and_unload`` reproduces the safetensors export,
and PEFT's runtime ``W x + B (A x)`` equals hook steering up to float32 summation order.

The adapter targets the down_proj modules of the circuit's layers only, with the rank of each
layer in ``rank_pattern`` and ``alpha == rank`` (``alpha_pattern``) so PEFT's scale ``alpha / r``
is exactly 1. The down projection is a separate module in every supported architecture, fused
gate_up ones (phi3) included, so nothing is refused for that.

The base is read without loading a model: a safetensors folder (or Hub snapshot) one down_proj
tensor at a time; a GGUF file (``.gguf`` / ``bundled:NAME``) by dequantising its ``ffn_down``
tensors (bit-identical to what transformers loads from it). The export itself needs no ``peft``.

:mod:`cna_export.export.gguf_lora` writes the same factors as a llama.cpp LoRA GGUF.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..core.atomic import atomic_dir, check_output_path
from ..core.circuit import Circuit, ModelIdentity
from ..core.errors import CnaError
from ..core.manifest import MANIFEST_FILE, SHARD_METADATA_KEY, ExportManifest, TouchedTensor, multipliers_list
from ..core.progress import bar as progress_bar
from ..core.version import __version__
from ..io.sources import local_folder, resolve_source
from ..io.tensor_bytes import tensor_sha256
from ..model.steering import group_by_layer
from .card import CARD_FILE, lora_model_card
from .fold import scale_columns
from .plan import ExportCheck, StagedExport, resolve_export_multipliers, run_check

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
LORA_DTYPES = ("float32", "float16", "bfloat16", "auto")


# -- the factors ------------------------------------------------------------------------------


def lora_factors(
    weight: "torch.Tensor", indices: Sequence[int], multipliers: Sequence[float], rank: int | None = None,
    dtype: "torch.dtype | None" = None,
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """``(A, B)`` with ``weight + B @ A`` = ``weight`` with columns ``indices`` scaled by ``multipliers``.

    ``A`` is ``[rank, intermediate]`` (row ``i`` one-hot at ``indices[i]``), ``B`` is ``[hidden, rank]``
    (column ``i`` = the folded column minus the original, computed in float64 and rounded once to
    ``dtype``, float32 by default). ``rank`` larger than ``len(indices)`` pads with zero rows of A and
    zero columns of B, which add exactly nothing.
    """
    import torch

    idx = [int(i) for i in indices]
    r = len(idx) if rank is None else int(rank)
    if r < len(idx):
        raise ValueError(f"rank {r} is smaller than the {len(idx)} neurons to steer")
    dtype = dtype or torch.float32
    target = scale_columns(weight, idx, list(multipliers))  # the safetensors export's column, rounded once
    sel = torch.tensor(idx, dtype=torch.long)
    cols = weight.index_select(1, sel)
    want = target.index_select(1, sel)
    delta = (want.to(torch.float64) - cols.to(torch.float64)).to(dtype)
    # W + round(delta) need not round back to the folded column (delta may need more bits than the
    # dtype has); where a neighbouring value of delta does, take it, so merging gives the export exactly.
    for _ in range(2):
        off = _merge(cols, delta) != want
        if not bool(off.any()):
            break
        for direction in (float("inf"), float("-inf")):
            step = torch.nextafter(delta, torch.full_like(delta, direction))
            fixed = off & (_merge(cols, step) == want)
            delta = torch.where(fixed, step, delta)
            off = off & ~fixed
    a = torch.zeros((r, weight.shape[1]), dtype=dtype)
    a[torch.arange(len(idx)), sel] = 1
    b = torch.zeros((weight.shape[0], r), dtype=dtype)
    b[:, : len(idx)] = delta
    return a, b


def _merge(cols: "torch.Tensor", delta: "torch.Tensor") -> "torch.Tensor":
    """``cols + delta`` the way :func:`merged_weight` adds a column of B (one-hot A multiplies by exactly 1)."""
    ct = torch_dtype_for_merge(cols)
    return (cols.to(ct) + delta.to(ct)).to(cols.dtype)


def merged_weight(weight: "torch.Tensor", a: "torch.Tensor", b: "torch.Tensor") -> "torch.Tensor":
    """``weight + B @ A`` as PEFT's merge computes it for scale 1 (in the adapter dtype, cast back once)."""
    delta = b.to(torch_dtype_for_merge(weight)) @ a.to(torch_dtype_for_merge(weight))
    return (weight.to(delta.dtype) + delta).to(weight.dtype)


def torch_dtype_for_merge(weight: "torch.Tensor") -> "torch.dtype":
    import torch

    return torch.float64 if weight.dtype == torch.float64 else torch.float32


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
    a: Any  # torch.Tensor [rank, intermediate]
    b: Any  # torch.Tensor [hidden, rank]
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

    @property
    def max_rank(self) -> int:
        return max(layer.rank for layer in self.layers)


def module_name(arch: Any, layer: int) -> str:
    """The down_proj module of ``layer`` as transformers names it (``model.layers.3.mlp.down_proj``)."""
    return f"{arch.layers}.{layer}.{arch.mlp}.{arch.down_proj}"


def _torch_dtype(dtype: str, base: str) -> "torch.dtype":
    import torch

    if dtype not in LORA_DTYPES:
        raise CnaError(f"adapter dtype must be one of {', '.join(LORA_DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        dtype = base if base in ("float32", "float16", "bfloat16", "float64") else "float32"
    return getattr(torch, dtype)


def plan_lora(
    model: str | Path,
    circuit: Circuit,
    multiplier: float | None = None,
    multipliers: Mapping[tuple[int, int], float] | str | Path | None = None,
    force: bool = False,
    dtype: str = "float32",
    pad_to_max_rank: bool = False,
    trust_remote_code: bool = False,
) -> LoraPlan:
    """Check ``circuit`` against ``model`` and compute every layer's factors (reads, never writes)."""
    import numpy as np
    import torch

    from ..io import gguf as G
    from ..io.identity import checkpoint_identity, gguf_identity
    from ..io.quants import dequantize_rows

    mults = resolve_export_multipliers(circuit, multiplier, multipliers)
    if not mults:
        raise CnaError("the circuit has no neurons; nothing to export")
    source = resolve_source(model)
    grouped = group_by_layer(mults)
    reader = None
    gguf_arch_name = None
    if source.kind == "gguf":
        assert source.path is not None
        reader = G.open_gguf(source.path)
        arch = G.gguf_arch(reader)
        gguf_arch_name = str(G.field_value(reader, "general.architecture"))
        identity = gguf_identity(reader, source.spec, fingerprint=bool(circuit.model.fingerprint))
        folder = source.path
    else:
        folder = local_folder(source)
        if not any(folder.glob("*.safetensors")):
            raise CnaError(f"LoRA export reads safetensors (or GGUF) weights; {model} has none "
                           "(convert it first, e.g. with a safetensors export at multiplier 1)")
        identity, arch, ckpt, down_names = checkpoint_identity(
            folder, source.spec, "hub" if source.kind == "hub" else "hf", trust_remote_code)
    notes = list(circuit.check_fits(identity, force=force))
    for note in notes:
        log.warning(note)
    for layer, (idx, _ms) in grouped.items():
        if layer >= identity.num_layers:
            raise CnaError(f"circuit neuron layer {layer} is out of range (the model has {identity.num_layers} layers)")
        if max(idx) >= identity.intermediate_size:
            raise CnaError(f"circuit neuron {max(idx)} is out of range in layer {layer} "
                           f"({identity.intermediate_size} neurons)")
    out_dtype = _torch_dtype(dtype, "float32" if reader is not None else str(identity.dtype))
    rank = max(len(idx) for idx, _ in grouped.values()) if pad_to_max_rank else None

    layers: list[LoraLayer] = []
    for layer, (idx, ms) in grouped.items():
        if reader is not None:
            down, _ = G.ffn_tensors(reader, arch, layer)
            w = torch.from_numpy(np.ascontiguousarray(dequantize_rows(down.data, down.tensor_type)))
            name, file, base_dtype = down.name, None, G.type_name(down)
            before = G.sha256_array(down.data)
            shape = list(w.shape)
        else:
            name = down_names[layer]
            w = ckpt.read(name)
            file, base_dtype, before, shape = ckpt.weight_map[name], str(w.dtype).removeprefix("torch."), \
                tensor_sha256(w), list(w.shape)
        a, b = lora_factors(w, idx, ms, rank=rank, dtype=out_dtype)
        after = tensor_sha256(merged_weight(w, a, b))
        touched = TouchedTensor(name=name, dtype=base_dtype, shape=shape, sha256_before=before, sha256_after=after,
                                axis="column", indices=list(idx), file=file)
        layers.append(LoraLayer(layer, module_name(arch, layer), name, file, list(idx), list(ms), a, b, touched))
        del w
    return LoraPlan(source.spec, source.kind, folder, identity, arch, mults, layers, notes, gguf_arch_name, reader)


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


def adapter_tensors(plan: LoraPlan) -> dict[str, Any]:
    """The adapter's tensors under the names ``PeftModel.save_pretrained`` uses."""
    out: dict[str, Any] = {}
    for layer in plan.layers:
        key = PEFT_PREFIX + layer.module
        out[f"{key}.lora_A.weight"] = layer.a.contiguous()
        out[f"{key}.lora_B.weight"] = layer.b.contiguous()
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


def export_lora(
    model: str | Path,
    circuit: Circuit | str | Path,
    out: str | Path,
    multiplier: float | None = None,
    multipliers: Mapping[tuple[int, int], float] | str | Path | None = None,
    overwrite: bool = False,
    force: bool = False,
    check: ExportCheck | None = None,
    dtype: str = "float32",
    base_model_name_or_path: str | None = None,
    trust_remote_code: bool = False,
    progress: bool = False,
) -> LoraExportResult:
    """Write ``circuit`` (with ``multiplier``, per-neuron ``multipliers``, or its own) as a PEFT LoRA adapter
    folder for ``model`` (a safetensors folder, a Hub id, a ``.gguf`` file or ``bundled:NAME``).

    The folder holds ``adapter_config.json``, ``adapter_model.safetensors`` (A and B in ``dtype``:
    float32, float16, bfloat16, or auto = the base's dtype), ``cna_manifest.json`` and a model card.
    ``base_model_name_or_path`` goes into the config (default: ``model`` as given). Everything is
    checked before anything is written; a ``check`` runs on the staged folder before it is renamed
    into place (see :mod:`cna_export.export.plan`).
    """
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    circ = circuit if isinstance(circuit, Circuit) else Circuit.load(circuit)
    source = resolve_source(model)
    inputs = tuple(p for p in (source.path,) if p is not None)
    out_path = check_output_path(Path(out), overwrite, inputs)
    plan = plan_lora(model, circ, multiplier, multipliers, force=force, dtype=dtype,
                     trust_remote_code=trust_remote_code)
    import hashlib

    circuit_sha = hashlib.sha256(circ.to_json().encode()).hexdigest()
    manifest = lora_manifest(plan, circ, "lora")
    result = LoraExportResult(out=out_path, manifest=manifest, ranks={layer.layer: layer.rank for layer in plan.layers})
    config = adapter_config(plan, base_model_name_or_path)
    bar = progress_bar(progress, total=4, desc="lora", unit="file", leave=True)
    with atomic_dir(out_path, overwrite=overwrite, inputs=inputs) as tmp:
        try:
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", "utf-8")
            bar.update(1)
            save_file(adapter_tensors(plan), str(tmp / ADAPTER_WEIGHTS),
                      metadata={"format": "pt", SHARD_METADATA_KEY: _summary(plan, circuit_sha)})
            bar.update(1)
            (tmp / MANIFEST_FILE).write_text(manifest.to_json() + "\n", "utf-8")
            bar.update(1)
            (tmp / CARD_FILE).write_text(lora_model_card(manifest, ranks=result.ranks), "utf-8")
            bar.update(1)
        except OSError as e:
            raise CnaError(f"cannot write {out_path}: {e.strerror or e}") from None
        finally:
            bar.close()
        result.adapter_bytes = (tmp / ADAPTER_WEIGHTS).stat().st_size
        result.total_bytes = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        if check is not None:
            staged = StagedExport(tmp, manifest, plan.spec, plan.spec, out_path)
            try:
                result.verification = run_check(check, staged)
            finally:  # the failed report is written too, for the error message's table
                if manifest.verification is not None:
                    (tmp / MANIFEST_FILE).write_text(manifest.to_json() + "\n", "utf-8")
                    (tmp / CARD_FILE).write_text(lora_model_card(manifest, result.verification, result.ranks), "utf-8")
    result.seconds = time.perf_counter() - t0
    return result


def read_lora_config(folder: str | Path) -> dict[str, Any]:
    """The ``adapter_config.json`` of an adapter folder, checked to be a LoRA on down_proj modules."""
    p = Path(folder) / ADAPTER_CONFIG
    if not p.is_file():
        raise CnaError(f"{folder} is not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    try:
        config = json.loads(p.read_text("utf-8"))
    except json.JSONDecodeError as e:
        raise CnaError(f"{p} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise CnaError(f"{p} is not a LoRA adapter config")
    return config
