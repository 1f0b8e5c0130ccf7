"""Export a steered GGUF: fold circuit multipliers into an existing GGUF file, exactly.

For gated MLPs a neuron's activation is ``act(gate x) * (up x + b)``, so
multiplying row ``j`` of ``blk.L.ffn_up.weight`` (and ``ffn_up.bias[j]``) by
``m`` multiplies neuron ``j`` by ``m``. In a GGUF file that row is a whole
number of quant blocks, and :mod:`cna_export.io.quants` scales each block
through its fp16 scale fields, leaving every quant byte alone (exact for 0 and
-1, one fp16 rounding otherwise). ``fold="down"`` scales columns of
``blk.L.ffn_down.weight`` instead, for float tensors only. Fused gate_up
tensors (phi3) take the up half's row, ``ArchSpec.up_row``.

Two ways to write the result:

* default: a new file through gguf-py's ``GGUFWriter``: every KV pair kept in
  order with its type, ``general.name`` marked as steered, a ``cna.manifest``
  KV added (the :class:`~cna_export.core.manifest.ExportManifest` JSON), every
  untouched tensor's bytes copied from the source's memory map;
* ``fast_copy``: a byte copy of the source with the touched rows patched in
  place through ``np.memmap``; the header is not changed and the manifest goes
  to a side file ``<out>.cna_manifest.json``.

Either way the output appears atomically, nothing is overwritten without
``overwrite``, and an Ollama Modelfile named after it (``<name>.Modelfile``) is
written beside it, published in the same step (:mod:`cna_export.export.publish`).
"""

from __future__ import annotations

import logging
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..core.circuit import ModelIdentity
from ..core.errors import CnaError
from ..core.formats import GGUFFormat
from ..core.manifest import (
    GGUF_KEY,
    STEERED_SUFFIX,
    ExportManifest,
    TouchedTensor,
    multipliers_list,
    side_manifest_path,
)
from ..io import gguf as G
from ..io.identity import gguf_fingerprint, gguf_identity, known_gguf_fingerprint
from ..io.quants import ScaleReport
from ..io.sources import ModelSource, resolve_source
from .card import modelfile_path, render_modelfile
from .plan import StagedExport, plan_patches, run_check
from .publish import publish_together, write_text
from .request import ExportRequest, MultiplierSpec, request_for

log = logging.getLogger(__name__)

PASS1_WORKERS = 2
"""Touched tensors hashed (before and after patching) at once."""


@dataclass
class GGUFExportResult:
    """What :func:`export_gguf` wrote."""

    out: Path
    manifest: ExportManifest
    manifest_path: Path | None
    modelfile: Path | None
    reports: dict[str, ScaleReport]
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    fast_copy: bool = False
    verification: Any = None  # a VerifyReport when the export was verified before it was written

    @property
    def n_neurons(self) -> int:
        return len(self.manifest.multipliers)


def gguf_path(source: ModelSource) -> Path:
    """The file of a GGUF source (a .gguf file or ``bundled:NAME``); any other source is refused."""
    if source.kind != "gguf" or source.path is None:
        raise CnaError(f"GGUF export needs a .gguf model file (or bundled:NAME), got {source.spec}")
    return source.path


def resolve_gguf_model(spec: str | Path) -> Path:
    """Path of a GGUF model given as a file or ``bundled:NAME``; anything else is refused."""
    return gguf_path(resolve_source(spec))


def steered_name(name: str | None, fallback: str) -> str:
    base = name or fallback
    return base if base.endswith(STEERED_SUFFIX) else base + STEERED_SUFFIX


def export_gguf(model: str | Path, circuit: Any, out: str | Path, multiplier: float | None = None,
                multipliers: MultiplierSpec = None, **settings: Any) -> GGUFExportResult:
    """Fold ``circuit`` (a :class:`~cna_export.core.circuit.Circuit` or its file) into GGUF ``model``: one
    ``multiplier``, per-neuron ``multipliers`` (a map or a JSON file), or the circuit's own.

    ``settings``: ``overwrite``, ``force``, ``check``, ``progress`` (:class:`ExportRequest`) and the fields
    of :class:`~cna_export.core.formats.GGUFFormat` (``fold``, ``fast_copy``, ``modelfile``). See
    :func:`write_gguf`.
    """
    settings = dict(settings, multiplier=multiplier, multipliers=multipliers)
    return write_gguf(*request_for(GGUFFormat, model, circuit, out, settings))


def write_gguf(request: ExportRequest, options: GGUFFormat) -> GGUFExportResult:
    """Write the GGUF export of ``request``.

    Raises :class:`CnaError` (before writing anything) for a circuit that does not
    fit, an unsupported tensor type, or an existing output without ``overwrite``. A circuit found
    on other weights (fingerprint) is refused too: at once when the fingerprint cache knows the
    file, else once it is hashed (beside the copy with ``fast_copy``; nothing is left behind).
    A ``check`` (see :mod:`cna_export.export.plan`) runs on the written file before it is moved
    into place; when it fails, :class:`VerificationFailed` (with ``.report``) is raised and nothing
    is left behind. :func:`cna_export.pipeline.export` passes the verification as that check.
    """
    job = _plan(request, options)
    try:
        return _export(job)
    finally:
        job.fingerprint.close()


class _Fingerprint:
    """The source's fingerprint checked against the circuit: from the fingerprint cache at once, else hashed
    on a thread beside the work (sha256 releases the GIL) and checked by :meth:`checked`."""

    def __init__(self, request: ExportRequest, reader: Any, spec: Any, identity: ModelIdentity, notes: list[str]):
        self.request, self.identity = request, identity
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cna-fingerprint")
        self.pending: Future | None = None
        if not request.circuit.model.fingerprint:
            return
        hit = known_gguf_fingerprint(reader, spec)
        if hit is not None:
            notes += self._check(hit)
        else:
            self.pending = self.pool.submit(gguf_fingerprint, reader, spec)

    def _check(self, fingerprint: str) -> list[str]:
        identity = self.identity.model_copy(update={"fingerprint": fingerprint})
        return self.request.circuit.check_fits(identity, force=self.request.force)

    def checked(self) -> list[str]:
        """The notes of the fingerprint check once it is hashed (logged); [] when it was done before."""
        if self.pending is None:
            return []
        got, self.pending = self.pending.result(), None
        more = self._check(got)
        for note in more:
            log.warning(note)
        return more

    def close(self) -> None:
        if self.pending is not None:
            self.pending.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class _Job:
    """A GGUF export planned: the request, the source opened, the tensor edits, the outputs claimed."""

    request: ExportRequest
    options: GGUFFormat
    src: Path
    reader: Any
    patches: dict[str, G.TensorPatch]
    notes: list[str]
    fingerprint: _Fingerprint
    side: Path | None  # the side manifest (fast copy)
    modelfile: Path | None

    @property
    def outputs(self) -> list[Path]:
        return [p for p in (self.request.out, self.side, self.modelfile) if p is not None]


def _plan(request: ExportRequest, options: GGUFFormat) -> _Job:
    """Check everything that can be checked before writing: source, outputs, circuit fit, tensor edits."""
    src = gguf_path(request.source)
    side = side_manifest_path(request.out) if options.fast_copy else None
    modelfile = modelfile_path(request.out) if options.modelfile else None
    for p in (request.out, side, modelfile):
        if p is not None:
            request.claim(p)
    reader = G.open_gguf(src)
    spec = G.gguf_arch(reader)
    identity = gguf_identity(reader, request.model, fingerprint=False)
    notes = list(request.circuit.check_fits(identity, force=request.force))  # shapes; the fingerprint once known
    patches = plan_patches(reader, spec, request.multipliers, options.fold)
    fingerprint = _Fingerprint(request, reader, spec, identity, notes)
    return _Job(request, options, src, reader, patches, notes, fingerprint, side, modelfile)


def _hash_patches(job: _Job) -> tuple[list[TouchedTensor], dict[str, ScaleReport]]:
    """Pass 1: each touched tensor's hashes before and after and its scale report, two tensors in memory
    at a time (sha256 releases the GIL: two threads hash on two cores)."""
    tensors = G.tensor_map(job.reader)
    reports: dict[str, ScaleReport] = {}

    def one(name: str) -> TouchedTensor:
        t, patch = tensors[name], job.patches[name]
        before = G.sha256_array(t.data)
        buf, reports[name] = patch.patched_copy(t.data)
        return TouchedTensor(name=name, dtype=G.type_name(t), shape=G.np_shape(t), sha256_before=before,
                             sha256_after=G.sha256_array(buf), axis=patch.axis, indices=list(patch.indices))

    with ThreadPoolExecutor(max_workers=PASS1_WORKERS, thread_name_prefix="cna-hash") as hashers:
        touched: list[TouchedTensor] = list(hashers.map(one, list(job.patches)))
    return touched, {name: reports[name] for name in job.patches}  # in plan order


def _manifest(job: _Job, touched: list[TouchedTensor], warnings: list[str]) -> ExportManifest:
    """The export manifest; a source that is itself an export is refused for a fast copy (its manifest would stay)."""
    src, notes, fast_copy = job.src, job.notes, job.options.fast_copy
    previous = G.field_value(job.reader, GGUF_KEY)
    if previous is not None and fast_copy:
        raise CnaError(
            f"{src} is itself a cna-export export (it has a {GGUF_KEY} KV), which --fast-copy would keep and "
            "which would then describe the wrong steering; export it without --fast-copy"
        )
    if previous is not None:
        notes.append(f"the source already carried a {GGUF_KEY} (an earlier cna-export export); it is replaced")
    notes.append(f"source file: {src}")
    if fast_copy:
        notes.append("fast copy: source bytes copied and touched rows patched in place; header unchanged")
    return ExportManifest(
        format="gguf", source=job.request.model, source_format="gguf", fold=job.options.fold,
        circuit=job.request.circuit, multipliers=multipliers_list(job.request.multipliers), tensors=touched,
        notes=notes + [f"warning: {w}" for w in warnings],
    )


def _export(job: _Job) -> GGUFExportResult:
    touched, reports = _hash_patches(job)
    warnings_ = [f"{name}: {msg}" for name, rep in reports.items() if (msg := rep.warning())]
    for w in warnings_:
        log.warning(w)
    if not job.options.fast_copy:  # the manifest goes into the header, written first: the fingerprint must be known
        job.notes[:0] = job.fingerprint.checked()
    manifest = _manifest(job, touched, warnings_)
    request = job.request
    with publish_together(job.outputs, request.overwrite, request.inputs) as temps:
        tmp, companions = temps[0], dict(zip([p for p in (job.side, job.modelfile) if p is not None], temps[1:]))
        patch_reports, where = _write(job, manifest, tmp)
        report = None
        if request.check is not None:
            staged = StagedExport(tmp, manifest, request.model, request.model, request.out)
            report = run_check(request.check, staged, max_reasons=3, record=False)
        if job.side is not None:
            write_text(companions[job.side], manifest.to_json() + "\n")
        if job.modelfile is not None:
            write_text(companions[job.modelfile], render_modelfile(request.out, job.reader, manifest, where))
    assert patch_reports.keys() == reports.keys()
    return GGUFExportResult(
        out=request.out, manifest=manifest, manifest_path=job.side, modelfile=job.modelfile, reports=reports,
        warnings=warnings_, seconds=request.seconds, fast_copy=job.options.fast_copy, verification=report,
    )


def _write(job: _Job, manifest: ExportManifest, tmp: Path) -> tuple[Mapping[str, ScaleReport], str]:
    """The patched GGUF into ``tmp``, checked by reading it back. Returns the patch reports and where the
    manifest lives (for the Modelfile)."""
    reader, src = job.reader, job.src
    if job.options.fast_copy:
        assert job.side is not None
        shutil.copyfile(src, tmp)
        patch_reports = G.patch_in_place(tmp, reader, job.patches)
        manifest.notes[:0] = job.fingerprint.checked()  # hashed during the copy: a mismatch discards it
        _check_written(reader, tmp, manifest, header_changed=False)
        return patch_reports, f"{job.side.name} (side file)"
    from gguf.constants import GGUFValueType

    old_name = G.field_value(reader, "general.name")
    patch_reports = G.write_patched(
        reader, tmp, job.patches,
        kv_replace={"general.name": (steered_name(old_name, src.stem), GGUFValueType.STRING)},
        kv_append=[(GGUF_KEY, manifest.to_json(), GGUFValueType.STRING)],
        progress=job.request.progress,
    )
    _check_written(reader, tmp, manifest, header_changed=True)
    return patch_reports, f"{GGUF_KEY} KV in {job.request.out.name}"


def _check_written(source: Any, path: Path, manifest: ExportManifest, header_changed: bool) -> None:
    """Re-read the written file: same KVs (bar the steering marks), same tensor layout, touched hashes as promised."""
    written = G.open_gguf(path)
    ignore = ("general.name", GGUF_KEY) if header_changed else ()
    problems = G.kv_differences(source, written, ignore=ignore)
    problems += G.tensor_differences(source, written, data=False)
    tensors = G.tensor_map(written)
    with ThreadPoolExecutor(max_workers=PASS1_WORKERS, thread_name_prefix="cna-hash") as hashers:
        got = list(hashers.map(lambda t: G.sha256_array(tensors[t.name].data), manifest.tensors))
    for t, digest in zip(manifest.tensors, got):
        if digest != t.sha256_after:
            problems.append(f"tensor {t.name} does not hold the patched bytes")
    if header_changed:
        text = G.field_value(written, GGUF_KEY)
        if text is None or ExportManifest.from_json(text).to_json() != manifest.to_json():
            problems.append(f"{GGUF_KEY} was not written back intact")
    del written
    if problems:
        raise CnaError(f"the written GGUF file failed its self-check: {problems[0]}")


def read_gguf_manifest(path: str | Path) -> tuple[ExportManifest, str]:
    """The export manifest of a steered GGUF: its ``cna.manifest`` KV, else ``<file>.cna_manifest.json``."""
    p = Path(path)
    reader = G.open_gguf(p)
    text = G.field_value(reader, GGUF_KEY)
    if text is not None:
        return ExportManifest.from_json(text, source=f"{p} ({GGUF_KEY})"), f"{GGUF_KEY} KV"
    side = side_manifest_path(p)
    if side.is_file():
        return ExportManifest.load(side), str(side)
    raise CnaError(f"{p} has no {GGUF_KEY} KV and no side manifest {side.name}: it is not a cna-export GGUF export")
