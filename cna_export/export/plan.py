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
        wanted = {(n.layer, n.index) for n in circuit.neurons}
        missing = wanted - set(multipliers)
        if missing:
            layer, index = sorted(missing)[0]
            raise CnaError(f"no multiplier for circuit neuron (layer {layer}, index {index})")
        return resolve_multipliers(circuit, per_neuron={k: multipliers[k] for k in sorted(wanted)})
    return resolve_multipliers(circuit, multiplier)


def plan_patches(reader: Any, spec: ArchSpec, mults: Mapping[tuple[int, int], float], fold: Fold) -> dict[str, G.TensorPatch]:
    """The tensor edits that fold ``mults`` into the file, checked before anything is written."""
    if fold not in ("up", "down"):
        raise CnaError(f"--fold must be up or down, got {fold!r}")
    if not spec.gated:
        raise CnaError(f"not supported yet: {spec.model_type} has a non-gated MLP")
    tensors = G.tensor_map(reader)
    n_layers = G.num_layers(reader)
    patches: dict[str, G.TensorPatch] = {}
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


class CheckReport(Protocol):
    """What a pre-rename check returns (a verification report)."""

    passed: bool
    reasons: list[str]

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
    if not report.passed:
        reasons = report.reasons if max_reasons is None else report.reasons[:max_reasons]
        err = VerificationFailed(f"export not written: verification failed: {'; '.join(reasons)}")
        err.report = report  # type: ignore[attr-defined]
        raise err
    return report
