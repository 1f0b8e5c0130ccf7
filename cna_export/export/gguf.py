"""Export a steered GGUF: fold circuit multipliers into an existing GGUF file, exactly.

For gated MLPs a neuron's activation is ``act(gate x) * (up x + b)``, so
multiplying row ``j`` of ``blk.L.ffn_up.weight`` (and ``ffn_up.bias[j]``) by
``m`` multiplies neuron ``j`` by ``m``. In a GGUF file that row is a whole
number of quant blocks, and :mod:`cna_export.io.quants` scales each block
through its fp16 scale fields, leaving every quant byte alone (exact for 0 and
-1, one fp16 rounding otherwise). ``fold="down"`` scales columns of
``blk.L.ffn_down.weight`` instead, for float tensors only. Fused gate_up
tensors (phi3) take the up half's row, ``ArchSpec.up_row``.

Two ways to write the result, both at the cost of a copy: the kernel copies the
source's bytes (``copy_file_range``; a reflink where the file system can) and
only the touched rows pass through memory, while two threads hash the touched
tensors for the manifest (their hashes before come from the fingerprint cache
when it knows the file):

* default: a new file laid out as gguf-py's ``GGUFWriter`` lays it out: every KV
  pair kept in order, byte for byte, ``general.name`` marked as steered, a
  ``cna.manifest`` KV added (the :class:`~cna_export.core.manifest.ExportManifest`
  JSON); the data section is copied first and the header written last;
* ``fast_copy``: a byte copy of the source (a reflink where the file system can)
  with the touched rows written in place; the header is not changed and the
  manifest goes to a side file ``<out>.cna_manifest.json``.

The written file is checked by reading back its header and touched rows.

Either way the output appears atomically, nothing is overwritten without
``overwrite``, and an Ollama Modelfile named after it (``<name>.Modelfile``) is
written beside it, published in the same step (:mod:`cna_export.export.publish`).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.circuit import ModelIdentity
from ..core.errors import CnaError
from ..core.fingerprint import other_than, scheme_of
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
from ..io.filecopy import clone_file
from ..io.identity import gguf_fingerprint, gguf_identity, known_gguf_fingerprint
from ..io.scale_report import ScaleReport
from ..io.sources import ModelSource, resolve_source
from .card import modelfile_path, render_modelfile
from .plan import StagedExport, plan_patches, run_check
from .publish import publish_together, write_text
from .request import ExportRequest, MultiplierSpec, request_for

log = logging.getLogger(__name__)

PLACEHOLDER = "0" * 64
"""A touched tensor's hash in the draft manifest that sizes the header before the hashes are known."""


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
    file, else once it is hashed (beside the copy; nothing is left behind).
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
        scheme = scheme_of(request.circuit.model.fingerprint)  # the circuit's: never compared across schemes
        hit = known_gguf_fingerprint(reader, spec, scheme)
        if hit is not None:
            notes += self._check(hit)
        else:
            self.pending = self.pool.submit(gguf_fingerprint, reader, spec, scheme)

    def _check(self, fingerprint: str) -> list[str]:
        identity = self.identity.with_fingerprint(fingerprint)
        return self.request.circuit.check_fits(identity, force=self.request.force)

    def expected(self) -> list[str]:
        """The notes :meth:`checked` may return besides none, for sizing a header before it is known: with
        ``force``, a mismatch's note (its length does not depend on the fingerprint); else none (a mismatch
        without ``force`` is refused, not noted)."""
        if self.pending is None or not self.request.force:
            return []
        return self._check(other_than(self.request.circuit.model.fingerprint or ""))

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
    patched: dict[str, G.PatchedTensor]  # the bytes each edit rewrites, computed (and checked) before writing
    notes: list[str]
    fingerprint: _Fingerprint
    side: Path | None  # the side manifest (fast copy)
    modelfile: Path | None

    @property
    def outputs(self) -> list[Path]:
        return [p for p in (self.request.out, self.side, self.modelfile) if p is not None]

    @property
    def reports(self) -> dict[str, ScaleReport]:
        return {name: p.report for name, p in self.patched.items()}


def _plan(request: ExportRequest, options: GGUFFormat) -> _Job:
    """Check everything that can be checked before writing: source, outputs, circuit fit, tensor edits."""
    src = gguf_path(request.source)
    side = side_manifest_path(request.out) if options.fast_copy else None
    modelfile = modelfile_path(request.out) if options.modelfile else None
    for p in (request.out, side, modelfile):
        if p is not None:
            request.claim(p)
    reader = G.open_gguf(src)
    if options.fast_copy and G.field_value(reader, GGUF_KEY) is not None:
        raise CnaError(
            f"{src} is itself a cna-export export (it has a {GGUF_KEY} KV), which --fast-copy would keep and "
            "which would then describe the wrong steering; export it without --fast-copy"
        )
    spec = G.gguf_arch(reader)
    identity = gguf_identity(reader, request.model, fingerprint=False)
    notes = list(request.circuit.check_fits(identity, force=request.force))  # shapes; the fingerprint once known
    patches = plan_patches(reader, spec, request.multipliers, options.fold)
    patched = G.patch_spans(reader, patches)
    fingerprint = _Fingerprint(request, reader, spec, identity, notes)
    return _Job(request, options, src, reader, patches, patched, notes, fingerprint, side, modelfile)


class _Hashes:
    """Each touched tensor's sha256 before and after its edit: from the fingerprint cache where it knows the file
    (and, after, the same edit of it), the rest computed while the copy is written
    (:func:`cna_export.io.gguf.write_data`) and remembered in the cache."""

    def __init__(self, job: _Job) -> None:
        self.job = job
        self.known, self.stamps = G.known_hashes(job.src, job.patched)
        self.got: dict[str, tuple[str, str]] = {}

    def record(self, got: dict[str, tuple[str, str]]) -> None:
        self.got = got
        G.remember_hashes(self.job.src, self.job.patched, got, self.stamps)

    def touched(self, placeholder: bool = False) -> list[TouchedTensor]:
        """The manifest's touched tensors in plan order; with ``placeholder`` before their hashes are known."""
        tensors = G.tensor_map(self.job.reader)
        out = []
        for name, patch in self.job.patches.items():
            before, after = (PLACEHOLDER, PLACEHOLDER) if placeholder else self.got[name]
            t = tensors[name]
            out.append(TouchedTensor(name=name, dtype=G.type_name(t), shape=G.np_shape(t), sha256_before=before,
                                     sha256_after=after, axis=patch.axis, indices=list(patch.indices)))
        return out


def _manifest(job: _Job, touched: list[TouchedTensor], warnings: list[str], first: list[str]) -> ExportManifest:
    """The export manifest; ``first``: the notes of a fingerprint check that ended late."""
    notes = first + job.notes
    if G.field_value(job.reader, GGUF_KEY) is not None:
        notes.append(f"the source already carried a {GGUF_KEY} (an earlier cna-export export); it is replaced")
    notes.append(f"source file: {job.src}")
    if job.options.fast_copy:
        notes.append("fast copy: source bytes copied and touched rows patched in place; header unchanged")
    return ExportManifest(
        format="gguf", source=job.request.model, source_format="gguf", fold=job.options.fold,
        circuit=job.request.circuit, multipliers=multipliers_list(job.request.multipliers), tensors=touched,
        notes=notes + [f"warning: {w}" for w in warnings],
    )


def _export(job: _Job) -> GGUFExportResult:
    reports = job.reports
    warnings_ = [f"{name}: {msg}" for name, rep in reports.items() if (msg := rep.warning())]
    for w in warnings_:
        log.warning(w)
    request = job.request
    hashes = _Hashes(job)
    with publish_together(job.outputs, request.overwrite, request.inputs) as temps:
        extra = [p for p in (job.side, job.modelfile) if p is not None]
        tmp, companions = temps[0], dict(zip(extra, temps[1:], strict=True))
        manifest, where = _write(job, hashes, warnings_, tmp)
        report = None
        if request.check is not None:
            staged = StagedExport(tmp, manifest, request.model, request.model, request.out)
            report = run_check(request.check, staged, max_reasons=3, record=False)
        if job.side is not None:
            write_text(companions[job.side], manifest.to_json() + "\n")
        if job.modelfile is not None:
            write_text(companions[job.modelfile], render_modelfile(request.out, job.reader, manifest, where))
    return GGUFExportResult(
        out=request.out, manifest=manifest, manifest_path=job.side, modelfile=job.modelfile, reports=reports,
        warnings=warnings_, seconds=request.seconds, fast_copy=job.options.fast_copy, verification=report,
    )


def _write(job: _Job, hashes: _Hashes, warnings: list[str], tmp: Path) -> tuple[ExportManifest, str]:
    """The patched GGUF into ``tmp``, checked by reading it back. Returns the manifest and where it lives
    (for the Modelfile)."""
    fd = os.open(tmp, os.O_RDWR)
    try:
        if job.options.fast_copy:
            assert job.side is not None
            manifest = _write_fast(job, hashes, warnings, fd)
            where = f"{job.side.name} (side file)"
        else:
            manifest = _write_new(job, hashes, warnings, fd)
            where = f"{GGUF_KEY} KV in {job.request.out.name}"
    finally:
        os.close(fd)
    return manifest, where


def _write_fast(job: _Job, hashes: _Hashes, warnings: list[str], fd: int) -> ExportManifest:
    """A byte copy of the source (a reflink where the file system can), the touched rows written over it."""
    src_fd = os.open(job.src, os.O_RDONLY)
    try:
        os.ftruncate(fd, 0)
        cloned = clone_file(src_fd, fd, copy=False)
        size = os.fstat(src_fd).st_size
    finally:
        os.close(src_fd)
    log.debug("fast copy: %s %s", job.src, "reflinked" if cloned else "copied")
    hashes.record(G.write_data(job.reader, fd, None, job.patched, hashes.known, job.request.progress, cloned))
    os.fsync(fd)
    first = job.fingerprint.checked()  # hashed during the copy: a mismatch discards it
    manifest = _manifest(job, hashes.touched(), warnings, first)
    _refuse(G.check_written(fd, None, job.patched, size))
    return manifest


def _write_new(job: _Job, hashes: _Hashes, warnings: list[str], fd: int) -> ExportManifest:
    """The data section first (kernel copy; the touched tensors copied, patched and hashed in one pass) while the
    fingerprint is computed, then the header with the manifest. The header's size is fixed before the hashes
    (fixed length) and the fingerprint check are known: the manifest's JSON is padded with trailing spaces to the
    longer of its two likely texts (with ``--force``, with and without the mismatch note), so the data is written
    once; a check that ends otherwise (a note longer than expected) changes the header's size, and the data is
    then written again after it."""
    reader, src = job.reader, job.src
    name = steered_name(G.field_value(reader, "general.name"), src.stem)

    def header(manifest: ExportManifest, width: int = 0) -> G.Header:
        text = manifest.to_json()
        text += " " * (width - len(text.encode()))  # JSON allows trailing white space
        return G.build_header(reader, kv_replace={"general.name": (name, _STRING)},
                              kv_append=[(GGUF_KEY, text, _STRING)])

    likely = [_manifest(job, hashes.touched(placeholder=True), warnings, notes)
              for notes in ([], job.fingerprint.expected())]
    width = max(len(m.to_json().encode()) for m in likely)
    draft = header(likely[-1], width)
    hashes.record(G.write_data(reader, fd, draft, job.patched, hashes.known, job.request.progress))
    manifest = _manifest(job, hashes.touched(), warnings, job.fingerprint.checked())
    final = header(manifest, width)
    if len(final) != len(draft):
        G.write_data(reader, fd, final, job.patched, dict(hashes.got), job.request.progress)
    G.write_header(fd, final)
    os.fsync(fd)
    problems = G.check_written(fd, final, job.patched, final.size)
    text = final.string_value(GGUF_KEY)
    if text is None or ExportManifest.from_json(text).to_json() != manifest.to_json():
        problems.append(f"{GGUF_KEY} was not written intact")
    _refuse(problems)
    return manifest


_STRING = 8  # GGUFValueType.STRING


def _refuse(problems: list[str]) -> None:
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
