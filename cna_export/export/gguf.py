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
``overwrite``, and an Ollama ``Modelfile`` is written beside it.
"""

from __future__ import annotations

import logging
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..core.circuit import Circuit
from ..core.errors import CnaError
from .plan import ExportCheck, Fold, StagedExport, plan_patches, resolve_export_multipliers, run_check
from ..io import gguf as G
from ..io.identity import gguf_fingerprint, gguf_identity, known_gguf_fingerprint
from ..core.atomic import atomic_path, atomic_write_text, check_output_path
from ..io.quants import ScaleReport
from ..core.manifest import STEERED_SUFFIX, GGUF_KEY, ExportManifest, TouchedTensor, multipliers_list, side_manifest_path

from .card import MODELFILE, render_modelfile, stop_tokens  # noqa: F401  (stop_tokens: part of this API)

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


def resolve_gguf_model(spec: str | Path) -> Path:
    """Path of a GGUF model given as a file or ``bundled:NAME``; anything else is refused."""
    from ..io.sources import resolve_source

    source = resolve_source(spec)
    if source.kind != "gguf" or source.path is None:
        raise CnaError(f"GGUF export needs a .gguf model file (or bundled:NAME), got {spec}")
    return source.path


def steered_name(name: str | None, fallback: str) -> str:
    base = name or fallback
    return base if base.endswith(STEERED_SUFFIX) else base + STEERED_SUFFIX


# ---------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------




# ---------------------------------------------------------------------------
# Ollama
# ---------------------------------------------------------------------------








# ---------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------


def export_gguf(
    model: str | Path,
    circuit: Circuit | str | Path,
    out: str | Path,
    multiplier: float | None = None,
    multipliers: Mapping[tuple[int, int], float] | str | Path | None = None,
    fold: Fold = "up",
    fast_copy: bool = False,
    overwrite: bool = False,
    force: bool = False,
    modelfile: bool = True,
    check: ExportCheck | None = None,
    progress: bool = False,
) -> GGUFExportResult:
    """Fold ``circuit`` into GGUF ``model``: one ``multiplier``, per-neuron ``multipliers`` (a map or a
    JSON file), or the circuit's own.

    Raises :class:`CnaError` (before writing anything) for a circuit that does not
    fit, an unsupported tensor type, or an existing output without ``overwrite``. A circuit found
    on other weights (fingerprint) is refused too: at once when the fingerprint cache knows the
    file, else once it is hashed (beside the copy with ``fast_copy``; nothing is left behind).
    A ``check`` (see :mod:`cna_export.export.plan`) runs on the written file before it is moved
    into place; when it fails, :class:`VerificationFailed` (with ``.report``) is raised and nothing
    is left behind. :func:`cna_export.pipeline.export` passes the verification as that check.
    """
    t0 = time.perf_counter()
    model = str(model)
    circuit = circuit if isinstance(circuit, Circuit) else Circuit.load(circuit)
    src = resolve_gguf_model(model)
    out = Path(out)
    side = side_manifest_path(out) if fast_copy else None
    modelfile_path = out.parent / MODELFILE if modelfile else None
    for p in (out, side, modelfile_path):
        if p is not None:
            check_output_path(p, overwrite, inputs=(src,))
    if len({p.resolve() for p in (out, side, modelfile_path) if p is not None}) != sum(
        p is not None for p in (out, side, modelfile_path)
    ):
        raise CnaError(f"output {out} collides with the {MODELFILE} written beside it; choose another name")

    reader = G.open_gguf(src)
    spec = G.gguf_arch(reader)
    identity = gguf_identity(reader, model, fingerprint=False)
    notes = list(circuit.check_fits(identity, force=force))  # shapes; the fingerprint once it is known
    mults = resolve_export_multipliers(circuit, multiplier, multipliers)
    patches = plan_patches(reader, spec, mults, fold)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cna-fingerprint")
    pending: Future | None = None
    if circuit.model.fingerprint:  # from the cache, else hashed beside the work below (it releases the GIL)
        hit = known_gguf_fingerprint(reader, spec)
        if hit is not None:
            notes += circuit.check_fits(identity.model_copy(update={"fingerprint": hit}), force=force)
        else:
            pending = pool.submit(gguf_fingerprint, reader, spec)

    def fingerprint_checked() -> list[str]:
        nonlocal pending
        if pending is None:
            return []
        got, pending = pending.result(), None
        more = circuit.check_fits(identity.model_copy(update={"fingerprint": got}), force=force)
        for note in more:
            log.warning(note)
        return more

    try:
        return _export(model, circuit, src, out, side, modelfile_path, reader, spec, mults, patches, notes, fold,
                       fast_copy, overwrite, check, progress, fingerprint_checked, t0)
    finally:
        if pending is not None:
            pending.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _export(model: str, circuit: Circuit, src: Path, out: Path, side: Path | None, modelfile_path: Path | None,
            reader: Any, spec: Any, mults: Mapping[tuple[int, int], float], patches: Any, notes: list[str], fold: Fold,
            fast_copy: bool, overwrite: bool, check: ExportCheck | None, progress: bool,
            fingerprint_checked: Any, t0: float) -> GGUFExportResult:

    # pass 1: hashes before/after and the scale reports, two tensors in memory at a time (sha256
    # releases the GIL: two threads hash on two cores)
    tensors = G.tensor_map(reader)
    reports: dict[str, ScaleReport] = {}

    def one(name: str) -> TouchedTensor:
        t, patch = tensors[name], patches[name]
        before = G.sha256_array(t.data)
        buf, reports[name] = patch.patched_copy(t.data)
        return TouchedTensor(name=name, dtype=G.type_name(t), shape=G.np_shape(t), sha256_before=before,
                             sha256_after=G.sha256_array(buf), axis=patch.axis, indices=list(patch.indices))

    with ThreadPoolExecutor(max_workers=PASS1_WORKERS, thread_name_prefix="cna-hash") as hashers:
        touched: list[TouchedTensor] = list(hashers.map(one, list(patches)))
    reports = {name: reports[name] for name in patches}  # in plan order
    warnings_: list[str] = []
    for name, rep in reports.items():
        msg = rep.warning()
        if msg:
            warnings_.append(f"{name}: {msg}")
    for w in warnings_:
        log.warning(w)

    if not fast_copy:  # the manifest goes into the header, written first: the fingerprint must be known now
        notes[:0] = fingerprint_checked()
    previous = G.field_value(reader, GGUF_KEY)
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
    manifest = ExportManifest(
        format="gguf",
        source=model,
        source_format="gguf",
        fold=fold,
        circuit=circuit,
        multipliers=multipliers_list(mults),
        tensors=touched,
        notes=notes + [f"warning: {w}" for w in warnings_],
    )

    def _verify(tmp: Path) -> Any:
        assert check is not None
        return run_check(check, StagedExport(tmp, manifest, model, model, out), max_reasons=3, record=False)

    if fast_copy:
        assert side is not None
        with atomic_path(out, overwrite=overwrite, inputs=(src,)) as tmp:
            shutil.copyfile(src, tmp)
            patch_reports = G.patch_in_place(tmp, reader, patches)
            manifest.notes[:0] = fingerprint_checked()  # hashed during the copy: a mismatch discards it
            _check_written(reader, tmp, manifest, header_changed=False)
            report = _verify(tmp) if check is not None else None
            atomic_write_text(side, manifest.to_json() + "\n", overwrite=overwrite)
        where = f"{side.name} (side file)"
    else:
        old_name = G.field_value(reader, "general.name")
        with atomic_path(out, overwrite=overwrite, inputs=(src,)) as tmp:
            from gguf.constants import GGUFValueType

            patch_reports = G.write_patched(
                reader,
                tmp,
                patches,
                kv_replace={"general.name": (steered_name(old_name, src.stem), GGUFValueType.STRING)},
                kv_append=[(GGUF_KEY, manifest.to_json(), GGUFValueType.STRING)],
                progress=progress,
            )
            _check_written(reader, tmp, manifest, header_changed=True)
            report = _verify(tmp) if check is not None else None
        where = f"{GGUF_KEY} KV in {out.name}"
    assert patch_reports.keys() == reports.keys()

    mf_path = None
    if modelfile_path is not None:
        atomic_write_text(modelfile_path, render_modelfile(out, reader, manifest, where), overwrite=overwrite)
        mf_path = modelfile_path
    return GGUFExportResult(
        out=out,
        manifest=manifest,
        manifest_path=side,
        modelfile=mf_path,
        reports=reports,
        warnings=warnings_,
        seconds=time.perf_counter() - t0,
        fast_copy=fast_copy,
        verification=report,
    )


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
