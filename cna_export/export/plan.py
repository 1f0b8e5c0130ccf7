"""The export plan: multipliers resolved once, the GGUF tensor edits, and the pre-rename check.

Both exporters resolve their multipliers here (one value for every neuron, a per-neuron map or
file, or the circuit's own), so safetensors, GGUF and every later format agree on what a circuit
and a multiplier mean. An exporter assembles its output in a staging location and, before the
final rename, hands it to an optional ``check`` (a :class:`StagedExport` in, a report out):
export never imports verification; :mod:`cna_export.pipeline` composes the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Protocol

from ..core.architectures import ArchSpec
from ..core.circuit import Circuit, load_multipliers_file
from ..core.errors import CnaError, VerificationFailed
from ..core.experts import SHARED, describe, group_multipliers, is_expert_key
from ..core.manifest import ExportManifest
from ..io import gguf as G
from ..model.steering import group_by_layer, resolve_multipliers

Fold = Literal["up", "down"]


def resolve_export_multipliers(
    circuit: Circuit,
    multiplier: float | None = None,
    multipliers: Mapping[tuple[int, int], float] | str | Path | None = None,
) -> dict[tuple[int, int], float]:
    """One multiplier for every neuron, a per-neuron file or map, or the circuit's own multipliers."""
    if multiplier is not None and multipliers is not None:
        raise CnaError("give either --multiplier or --multipliers, not both")
    if isinstance(multipliers, (str, Path)):
        return load_multipliers_file(multipliers, circuit)
    if multipliers is not None:
        wanted = set(circuit.keys())
        missing = wanted - set(multipliers)
        if missing:
            raise CnaError(f"no multiplier for circuit neuron {describe(sorted(missing)[0])}")
        return resolve_multipliers(circuit, per_neuron={k: multipliers[k] for k in sorted(wanted)})
    return resolve_multipliers(circuit, multiplier)


def plan_patches(reader: Any, spec: ArchSpec, mults: Mapping[tuple[int, int], float],
                 fold: Fold) -> dict[str, G.TensorPatch]:
    """The tensor edits that fold ``mults`` into the file, checked before anything is written."""
    if fold not in ("up", "down"):
        raise CnaError(f"--fold must be up or down, got {fold!r}")
    if not spec.gated:
        raise CnaError(f"not supported yet: {spec.model_type} has a non-gated MLP")
    tensors = G.tensor_map(reader)
    n_layers = G.num_layers(reader)
    patches: dict[str, G.TensorPatch] = {}
    expert_keys = {k: m for k, m in mults.items() if is_expert_key(k)}
    if expert_keys:
        _plan_expert_patches(reader, spec, expert_keys, fold, n_layers, patches)
        mults = {k: m for k, m in mults.items() if not is_expert_key(k)}
    for layer, (idx, ms) in group_by_layer(mults).items():
        if layer >= n_layers:
            raise CnaError(f"circuit neuron layer {layer} is out of range (the GGUF file has {n_layers} layers)")
        down, up = G.ffn_tensors(reader, spec, layer)
        n_ff = G.intermediate_size(down)
        if max(idx) >= n_ff:
            raise CnaError(f"circuit neuron {max(idx)} is out of range in layer {layer} ({n_ff} neurons)")
        if fold == "down":
            patch = G.TensorPatch(down.name, down.tensor_type, "column", list(idx), list(ms), G.np_shape(down))
            patch.check()
            patches[down.name] = patch
            continue
        up_rows = int(up.ne[1])
        expected = 2 * n_ff if spec.fused_gate_up else n_ff
        if up_rows != expected:
            raise CnaError(
                f"{up.name} has {up_rows} rows but layer {layer} has {n_ff} neurons (expected {expected} rows)"
            )
        rows = [spec.up_row(j, n_ff) for j in idx]
        patch = G.TensorPatch(up.name, up.tensor_type, "row", rows, list(ms), G.np_shape(up))
        patch.check()
        patches[up.name] = patch
        bias_name = spec.gguf.up_bias.format(layer=layer) if spec.gguf.up_bias else None
        bias = tensors.get(bias_name) if bias_name else None
        if bias is not None:
            if int(bias.n_elements) != up_rows:
                raise CnaError(f"{bias.name} has {bias.n_elements} elements, expected {up_rows}")
            bpatch = G.TensorPatch(bias.name, bias.tensor_type, "element", rows, list(ms), G.np_shape(bias))
            bpatch.check()
            patches[bias.name] = bpatch
    if not patches:
        raise CnaError("the circuit has no neurons: nothing to export")
    return patches


def _plan_expert_patches(reader: Any, spec: ArchSpec, mults: Mapping[tuple[int, ...], float], fold: Fold,
                         n_layers: int, patches: dict[str, G.TensorPatch]) -> None:
    """Expert neurons: row ``e * n_ff + j`` of ``ffn_up_exps`` (``e * 2 n_ff + n_ff + j`` of a fused
    ``ffn_gate_up_exps``) or column ``j`` of expert ``e`` in ``ffn_down_exps`` (float types only, flat
    index ``e * n_ff + j``); the shared expert's row ``j`` of ``ffn_up_shexp`` / column ``j`` of
    ``ffn_down_shexp``."""
    grouped: dict[tuple[str, str], tuple[Any, str, list[int], list[float]]] = {}
    for (layer, expert), (idx, ms) in group_multipliers(mults).items():
        where = describe((layer, expert, idx[0]))
        if layer >= n_layers:
            raise CnaError(f"circuit neuron {where} is out of range (the GGUF file has {n_layers} layers)")
        ffn = G.expert_ffn(reader, spec, layer)
        if ffn is None:
            raise CnaError(f"circuit neuron {where} names an expert, but layer {layer} of the GGUF file has no "
                           "expert tensors")
        if expert == SHARED:
            if ffn.down_shexp is None:
                raise CnaError(f"circuit neuron {where} names the shared expert, which the model lacks")
            width = ffn.shared_width
            if max(idx) >= width:
                raise CnaError(f"circuit neuron {describe((layer, expert, max(idx)))} is out of range "
                               f"({width} neurons)")
            tensor, flat = (ffn.down_shexp, list(idx)) if fold == "down" else (ffn.up_shexp, list(idx))
        else:
            if expert >= ffn.experts:
                raise CnaError(f"circuit neuron {where} names an expert the model lacks (layer {layer} has "
                               f"{ffn.experts} experts)")
            if max(idx) >= ffn.width:
                raise CnaError(f"circuit neuron {describe((layer, expert, max(idx)))} is out of range "
                               f"({ffn.width} neurons per expert)")
            if fold == "down":
                tensor, flat = ffn.down, [expert * ffn.width + j for j in idx]
            else:
                rows = 2 * ffn.width if ffn.fused_up else ffn.width
                tensor = ffn.up
                flat = [expert * rows + (ffn.width if ffn.fused_up else 0) + j for j in idx]
        axis = "column" if fold == "down" else "row"
        _, _, have_idx, have_ms = grouped.setdefault((tensor.name, axis), (tensor, axis, [], []))
        have_idx.extend(flat)
        have_ms.extend(ms)
    for (name, axis), (tensor, _, idx, ms) in sorted(grouped.items()):
        order = sorted(range(len(idx)), key=lambda i: idx[i])
        patch = G.TensorPatch(name, tensor.tensor_type, axis, [idx[i] for i in order], [ms[i] for i in order],
                              G.np_shape(tensor))
        patch.check()
        patches[name] = patch


class CheckReport(Protocol):
    """What a pre-rename check returns (a verification report)."""

    passed: bool
    reasons: list[str]

    @property
    def publishable(self) -> bool: ...  # passed, or inconclusive with exact tensors (never a failure)

    def summary(self) -> dict[str, Any]: ...

    def render(self) -> str: ...


@dataclass
class StagedExport:
    """An export assembled in its staging location, before the rename that publishes it."""

    path: Path  # the staged file or folder
    manifest: ExportManifest
    source: Any  # what to compare against: the source spec, or an already loaded model
    source_name: str
    out: Path  # where it will be published


ExportCheck = Callable[[StagedExport], CheckReport]


def run_check(check: ExportCheck, staged: StagedExport, max_reasons: int | None = None,
              record: bool = True) -> CheckReport:
    """Run ``check`` on a staged export; with ``record``, keep its summary in the manifest; raise
    :class:`VerificationFailed` (carrying ``.report``) when it did not pass, so nothing is published."""
    report = check(staged)
    if record:
        staged.manifest.verification = report.summary()
    if not report.publishable:
        reasons = report.reasons if max_reasons is None else report.reasons[:max_reasons]
        err = VerificationFailed(f"export not written: verification failed: {'; '.join(reasons)}")
        err.report = report  # type: ignore[attr-defined]
        raise err
    return report
