"""Export a steered safetensors checkpoint: fold a circuit's multipliers into down_proj columns.

``export_safetensors`` streams a Hugging Face checkpoint folder shard by shard:
shards holding a touched down_proj weight are written at the cost of a copy
(:mod:`cna_export.io.shard_patch`: the kernel copies the data section, the
touched tensors stream through one buffer with their columns scaled; every
other tensor, dtype and the shard's header metadata kept, our summary added
under ``cna_export``; fsynced); all other shards are copied byte for byte (or
hard-linked with ``link``); config, generation config, tokenizer, chat template and any
other files are copied; ``cna_manifest.json`` and a model card are added. The
whole folder is assembled beside the target and renamed into place only when
complete (and verified, with ``verify``), so a failure leaves nothing behind.

A ``.gguf`` file (or ``bundled:NAME``), pickled weights (with ``allow_pickle``)
or a Hub repo without safetensors is first loaded by transformers and written
as a safetensors folder with ``save_pretrained``; that folder is then folded
the same way.

The circuit is checked against the source: shapes from config.json and the
safetensors headers before anything is written, and the fingerprint (sha256 of
every layer's down_proj weight as float32, computed one memory-mapped tensor
at a time, equal to ``LoadedModel.fingerprint()``) from the fingerprint cache,
or hashed while the shards are written; a mismatch discards the staged output.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..core.architectures import ArchSpec
from ..core.atomic import atomic_dir, scratch_dir
from ..core.circuit import ModelIdentity
from ..core.errors import CnaError
from ..core.fingerprint import scheme_of
from ..core.formats import SafetensorsFormat
from ..core.manifest import MANIFEST_FILE, SHARD_METADATA_KEY, ExportManifest, TouchedTensor, multipliers_list
from ..core.progress import bar as progress_bar
from ..io import safetensors as st_io
from ..io import shard_patch
from ..io.identity import checkpoint_fingerprint, checkpoint_identity, known_checkpoint_fingerprint
from ..io.shard_patch import SlicePatch
from ..io.sources import local_folder, resolve_source
from ..model.loading import resolve_dtype
from .card import CARD_FILE, model_card
from .fold import scale_stored
from .plan import StagedExport, run_check
from .request import ExportRequest, MultiplierSpec, request_for
from .safetensors_plan import FoldPlan, plan_down, plan_up, shard_summary

log = logging.getLogger(__name__)

WORKERS = 2
"""Shards written at once: while the kernel copies one, another's touched tensors are hashed."""

# Weight files that are not part of the folded safetensors checkpoint: copying them would ship
# unsteered weights beside the steered ones, so they are left out (and listed in the manifest notes).
OTHER_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".safetensors", ".gguf", ".h5", ".msgpack", ".onnx", ".pkl")
SKIP_DIRS = (".git", ".cache", ".huggingface")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


@dataclass
class ExportResult:
    """What an export wrote."""

    out: Path
    manifest: ExportManifest
    source_folder: str  # the safetensors folder that was folded (a temporary one for converted sources)
    converted: bool = False
    rewritten_shards: list[str] = field(default_factory=list)
    copied_shards: list[str] = field(default_factory=list)
    linked: bool = False
    other_files: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    total_bytes: int = 0
    seconds: float = 0.0
    verification: Any = None  # the check's report when a check ran
    tensors: list[TouchedTensor] = field(default_factory=list, repr=False)  # the touched tensors, in file order


# -- inputs -------------------------------------------------------------------------------


def _has_safetensors(folder: Path) -> bool:
    return any(folder.glob("*.safetensors"))


def _has_pickle(folder: Path) -> bool:
    return any(p.suffix in PICKLE_SUFFIXES for p in folder.iterdir() if p.is_file())


# -- conversion of non-safetensors sources -----------------------------------------------


def convert_to_safetensors(
    spec: str, folder: Path, dtype: str = "auto", max_shard_size: str | None = None, allow_pickle: bool = False,
    trust_remote_code: bool = False, loaded: Any = None, scheme: int | None = None,
) -> tuple[Any, ModelIdentity]:
    """Load ``spec`` (a .gguf file, ``bundled:NAME``, pickled weights) with transformers and write it to
    ``folder`` (which must exist) as a safetensors checkpoint with its tokenizer.

    The identity (fingerprint) is taken in float32 before any cast, so it matches a circuit discovered
    on the same source; the model is then cast to ``dtype`` (auto: float32 for GGUF, the config's
    dtype for pickled weights) and saved. Returns the loaded model (in ``dtype``) and that identity.
    ``loaded``: ``spec`` already loaded in float32 by the caller (:func:`shared_float32`), saved as it is
    instead of loading it again. ``scheme``: the fingerprint's scheme (default: the current one).
    """
    import torch

    from ..model.loading import load_model, save_tokenizer

    source = resolve_source(spec)
    saved_dtype = None
    if source.kind != "gguf" and dtype in (None, "auto"):
        from transformers import AutoConfig

        name, extra = source.load_args
        try:
            config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code, **extra)
            saved_dtype = getattr(config, "dtype", None)
        except (OSError, ValueError, KeyError):
            saved_dtype = None  # load_model below reports the problem
    if loaded is None:
        loaded = load_model(spec, dtype="float32", allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    identity = loaded.identity(with_fingerprint=False).with_fingerprint(loaded.fingerprint(scheme))
    if dtype in (None, "auto"):
        target = saved_dtype if isinstance(saved_dtype, torch.dtype) else torch.float32
    else:
        target = resolve_dtype(dtype, None)
    loaded.model.to(target)
    if source.kind == "gguf":
        _drop_gguf_quantizer(loaded.model)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    try:
        loaded.model.save_pretrained(folder, **kwargs)
        save_tokenizer(loaded.tokenizer, folder)
    except OSError as e:
        raise CnaError(f"cannot write the converted checkpoint: {e.strerror or e}") from None
    except ValueError as e:
        raise CnaError(f"cannot save {source.spec} as safetensors: {str(e).splitlines()[0]}") from None
    return loaded, identity


def shared_float32(request: ExportRequest, dtype: str | None) -> Any:
    """The caller's float32 model of a GGUF source (``request.reference``, ``steer``'s session) when the
    conversion would load exactly that and leave it in float32 (so the shared model is not cast); else None."""
    if request.reference is None or request.source.kind != "gguf" or dtype not in (None, "auto", "float32"):
        return None
    loaded = request.reference("float32")
    return loaded if str(getattr(loaded, "dtype", "")).removeprefix("torch.") == "float32" else None


def _drop_gguf_quantizer(model: Any) -> None:
    """A GGUF model that transformers dequantised keeps a GGUF quantizer that forbids ``save_pretrained``.

    When every weight is a plain float tensor the quantizer is vestigial and is removed (transformers'
    own ``remove_quantization_config``); weights still packed in GGUF blocks are dequantised first.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    packed = [name for name, m in model.named_modules() if "gguf" in type(m).__name__.lower()]
    if packed or any(not p.is_floating_point() for p in model.parameters()):
        try:
            model.dequantize()
        except (NotImplementedError, ValueError) as e:
            raise CnaError(f"cannot dequantise the GGUF weights for export ({str(e).splitlines()[0]})") from None
    else:
        quantizer.remove_quantization_config(model)


# -- planning and writing -----------------------------------------------------------------


def _fold_shard(plan: FoldPlan, file: str, dst: Path, summary: str) -> list[TouchedTensor]:
    """One shard at the cost of a copy (:func:`cna_export.io.shard_patch.patch_shard`): the kernel copies it and
    the touched down_proj columns are scaled on the way (or the touched up_proj rows written over the copy).
    Each touched tensor's sha256 before and after the fold comes from the fingerprint cache, else is computed on
    the way (or read back) and remembered there."""
    entries = plan.by_file[file]
    shard = plan.ckpt.path(file)
    patches = [SlicePatch(name, plan.axis, idx, ms) for name, (_layer, idx, ms) in entries.items()]
    known = {name: st_io.known_tensor_sha256(shard, name) for name in entries}
    keys = {name: st_io.tensor_hash_key(shard, name) for name in entries if known[name] is None}
    cold = frozenset(name for name, digest in known.items() if digest is None)
    fused = frozenset(name for name in entries if len(plan.ckpt.info(name).shape) != 2)
    stamp = st_io.tensor_hash_key(shard, "")
    done = shard_patch.patch_shard(shard, dst, patches, {SHARD_METADATA_KEY: summary}, scale_stored,
                                   hash_before=cold, hash_after=cold | fused)
    unchanged = stamp is not None and st_io.tensor_hash_key(shard, "") == stamp  # the shard, while it was read
    out = []
    for name, (_layer, idx, _ms) in entries.items():
        p = done[name]
        before = known[name]
        if before is None:
            before = p.sha256_before
            st_io.remember_tensor_sha256(shard, name, before, key=keys.get(name))
        out.append(TouchedTensor(name=name, dtype=p.dtype, shape=p.shape, sha256_before=before,
                                 sha256_after=_folded_sha256(shard, name, p, idx, dst, fused, unchanged, plan.axis),
                                 axis=plan.axis, indices=idx, file=file))
    return out


def _folded_sha256(shard: Path, name: str, p: shard_patch.PatchedTensor, idx: list[int], dst: Path,
                   fused: frozenset[str], unchanged: bool, axis: str) -> str:
    """sha256 of a folded 2-D weight, remembered in the fingerprint cache under what the fold changed, exactly:
    the columns (or rows) ``idx`` and their new bytes (every other byte is the source's, so with the shard
    unchanged the same key means the same tensor). Other shapes (fused expert tensors) are hashed every time."""
    if name in fused:
        return p.sha256_after  # type: ignore[return-value]
    h = hashlib.sha256(json.dumps([axis + "s", idx]).encode())
    h.update(p.edit)
    edit = h.hexdigest()
    hit = st_io.known_tensor_sha256(shard, name, edit)
    if hit is not None:
        return hit
    digest = p.sha256_after
    if digest is None:
        with open(dst, "rb") as fh:
            digest = shard_patch.region_sha256(fh.fileno(), p.offset, p.nbytes)
    if unchanged:
        st_io.remember_tensor_sha256(shard, name, digest, edit, key=st_io.tensor_hash_key(shard, name, edit))
    return digest


def _files(folder: Path) -> list[Path]:
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if rel.parts[0] in SKIP_DIRS or not p.is_file():
            continue
        out.append(rel)
    return out


# -- entry point --------------------------------------------------------------------------------


def export_safetensors(model: str | Path, circuit: Any, out: str | Path, multiplier: float | None = None,
                       multipliers: MultiplierSpec = None, **settings: Any) -> ExportResult:
    """Fold ``circuit`` (a :class:`~cna_export.core.circuit.Circuit` or its file; with ``multiplier``,
    per-neuron ``multipliers``, or its own) into a copy of ``model``.

    ``settings``: ``overwrite``, ``force``, ``check``, ``progress`` (:class:`ExportRequest`) and the fields
    of :class:`~cna_export.core.formats.SafetensorsFormat` (``link``, ``dtype``, ``max_shard_size``,
    ``allow_pickle``, ``trust_remote_code``). See :func:`write_safetensors`.
    """
    settings = dict(settings, multiplier=multiplier, multipliers=multipliers)
    return write_safetensors(*request_for(SafetensorsFormat, model, circuit, out, settings))


@dataclass
class _Source:
    """The safetensors folder that is folded: the source's own, or its conversion in a staging folder."""

    folder: Path
    identity: ModelIdentity
    arch: ArchSpec
    ckpt: st_io.Checkpoint
    down_names: list[str]
    converted: bool = False
    loaded: Any = None  # the converted model, kept as the check's reference
    fingerprint: Future | None = None  # the source's fingerprint, hashed beside the shard copies


def write_safetensors(request: ExportRequest, options: SafetensorsFormat) -> ExportResult:
    """Write the safetensors export of ``request``.

    ``request.model`` is a safetensors folder, a Hub id, a ``.gguf`` file or ``bundled:NAME``. ``dtype``
    and ``max_shard_size`` only apply when the source must be converted first (GGUF, pickles). A
    ``check`` (see :mod:`cna_export.export.plan`) runs on the staged folder before it is moved into
    place; when it fails, :class:`VerificationFailed` (with ``.report``) is raised and nothing is
    left behind. :func:`cna_export.pipeline.export` passes the verification as that check.
    """
    out_path = request.claim()
    src: _Source | None = None
    pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="cna-export")
    hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cna-fingerprint")  # beside both shard workers
    scratch = contextlib.ExitStack()  # the converted source's folder, removed at the end (or by a later run)
    try:
        src = _open_source(request, options, out_path, hasher, scratch)
        notes = request.circuit.check_fits(src.identity, force=request.force)  # shapes now; the fingerprint once hashed
        if src.fingerprint is not None and src.fingerprint.done():
            src.identity, src.fingerprint = _checked(request, src.identity, src.fingerprint, notes), None
        if (src.folder / MANIFEST_FILE).is_file():
            notes.append(f"the source is itself a cna-export export ({MANIFEST_FILE}): its steering stays in the "
                         "weights and this export's is applied on top (its manifest is replaced)")
        for note in notes:
            log.warning(note)
        plan = plan_up(src.ckpt, src.arch, src.identity, request.multipliers) if options.fold == "up" \
            else plan_down(src.ckpt, src.arch, src.identity, src.down_names, request.multipliers)
        result = ExportResult(out=out_path, manifest=None, source_folder=str(src.folder),  # type: ignore[arg-type]
                              converted=src.converted, linked=options.link and not src.converted)
        manifest = ExportManifest(
            format="safetensors", source=request.source.spec, source_format=src.identity.source_format, fold=plan.fold,
            circuit=request.circuit, multipliers=multipliers_list(request.multipliers), notes=list(notes),
        )
        with atomic_dir(out_path, overwrite=request.overwrite, inputs=request.inputs) as tmp:
            _assemble(request, src, plan, manifest, result, tmp, pool, link=options.link or src.converted)
        result.manifest = manifest
        result.seconds = request.seconds
        return result
    finally:
        if src is not None:
            src.loaded = None
            if src.fingerprint is not None:
                src.fingerprint.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        hasher.shutdown(wait=True, cancel_futures=True)
        scratch.close()


def _open_source(request: ExportRequest, options: SafetensorsFormat, out_path: Path, pool: ThreadPoolExecutor,
                 scratch: contextlib.ExitStack) -> _Source:
    """The folder to fold and its identity; a GGUF or pickled source is converted into a scratch folder
    beside the output (:func:`cna_export.core.atomic.scratch_dir`, closed by the caller's ``scratch``)."""
    source, model, o = request.source, request.model, options
    folder = local_folder(source)
    if source.kind != "gguf" and _has_safetensors(folder):
        identity, arch, ckpt, down_names = checkpoint_identity(
            folder, source.spec, "hub" if source.kind == "hub" else "hf", o.trust_remote_code, with_fingerprint=False)
        fingerprint = pending_fingerprint(ckpt, down_names, pool, circuit_scheme(request))
        return _Source(folder, identity, arch, ckpt, down_names, fingerprint=fingerprint)
    if source.kind != "gguf" and not _has_pickle(folder):
        raise CnaError(f"model {model} has no safetensors (or other) weights")
    if source.kind != "gguf" and not o.allow_pickle:
        raise CnaError(
            f"model {model} has only pickled weights (.bin/.pt); pass --allow-pickle to load and convert them "
            "(unpickling can run arbitrary code)"
        )
    folder = scratch.enter_context(scratch_dir(out_path))
    loaded, identity = convert_to_safetensors(source.spec, folder, o.dtype, o.max_shard_size, o.allow_pickle,
                                              o.trust_remote_code, shared_float32(request, o.dtype),
                                              circuit_scheme(request))
    if request.check is None:
        loaded = None
        gc.collect()
    _, arch, ckpt, down_names = checkpoint_identity(
        folder, source.spec, source.kind, o.trust_remote_code, with_fingerprint=False)
    return _Source(folder, identity, arch, ckpt, down_names, converted=True, loaded=loaded)


def _assemble(request: ExportRequest, src: _Source, plan: FoldPlan, manifest: ExportManifest, result: ExportResult,
              tmp: Path, pool: ThreadPoolExecutor, link: bool) -> None:
    """The export in the staging folder ``tmp``: shards, other files, manifest and card; then the fingerprint
    check (when it was still hashing) and the ``check``."""
    circuit_sha = hashlib.sha256(request.circuit.to_json().encode()).hexdigest()
    try:
        _write(plan, src.folder, tmp, result, circuit_sha, request.multipliers, pool, link=link,
               progress=request.progress)
    except OSError as e:
        raise CnaError(f"cannot write {result.out}: {e.strerror or e}") from None
    if src.fingerprint is not None:  # hashed while the shards were written: a mismatch discards them
        more: list[str] = []
        src.identity, src.fingerprint = _checked(request, src.identity, src.fingerprint, more), None
        for note in more:
            log.warning(note)
        manifest.notes.extend(more)
    _finish(tmp, manifest, result)
    if request.check is None:
        return
    original: Any = src.loaded if src.loaded is not None else str(src.folder)
    try:
        result.verification = run_check(request.check, StagedExport(tmp, manifest, original, request.source.spec,
                                                                     result.out))
    finally:  # the failed report is written too, for the error message's table
        if manifest.verification is not None:
            (tmp / MANIFEST_FILE).write_text(manifest.to_json() + "\n", "utf-8")
            (tmp / CARD_FILE).write_text(model_card(manifest, result.verification), "utf-8")


def circuit_scheme(request: ExportRequest) -> int | None:
    """The scheme of the circuit's fingerprint (the source is hashed in it: never compared across schemes), or
    None when the circuit carries none."""
    fp = request.circuit.model.fingerprint
    return scheme_of(fp) if fp else None


def pending_fingerprint(ckpt: st_io.Checkpoint, down_names: Sequence[str], pool: ThreadPoolExecutor,
                        scheme: int | None) -> Future | None:
    """The checkpoint's fingerprint in ``scheme`` (None: none needed): from the fingerprint cache at once, else
    hashed on ``pool`` (sha256 and the float32 conversion release the GIL, so it runs beside the shard copies)."""
    if scheme is None:
        return None
    fut: Future = Future()
    hit = known_checkpoint_fingerprint(ckpt, down_names, scheme)  # type: ignore[arg-type]
    if hit is not None:
        fut.set_result(hit)
        return fut
    return pool.submit(checkpoint_fingerprint, ckpt, down_names, scheme)


def _checked(request: ExportRequest, identity: ModelIdentity, fingerprint: Future, notes: list[str]) -> ModelIdentity:
    identity = identity.with_fingerprint(fingerprint.result())
    notes.extend(request.circuit.check_fits(identity, force=request.force))
    return identity


def _write(
    plan: FoldPlan, folder: Path, tmp: Path, result: ExportResult, circuit_sha: str,
    mults: Mapping[tuple[int, int], float], pool: ThreadPoolExecutor, link: bool, progress: bool,
) -> None:
    """Every file of ``folder`` into ``tmp``: touched shards rewritten, the rest copied (or linked),
    several at a time on ``pool`` (the kernel copies while another shard is hashed)."""
    files = _files(folder)
    shards = set(plan.ckpt.files)
    bar = progress_bar(progress, total=len(files), desc="export", unit="file", leave=True)
    jobs: list[tuple[str, str, Future]] = []
    try:
        for rel in files:
            key = rel.as_posix()
            src, dst = folder / rel, tmp / rel
            if key in plan.by_file:
                summary = shard_summary(circuit_sha, mults, plan.by_file[key], plan.fold)
                dst.parent.mkdir(parents=True, exist_ok=True)
                jobs.append(("rewritten", key, pool.submit(_fold_shard, plan, key, dst, summary)))
            elif key in shards:
                jobs.append(("copied", key, pool.submit(st_io.copy_file, src, dst, link)))
            elif key in (MANIFEST_FILE, CARD_FILE):
                bar.update(1)  # replaced by ours
            elif src.suffix.lower() in OTHER_WEIGHT_SUFFIXES:
                result.left_out.append(key)
                bar.update(1)
            else:
                jobs.append(("other", key, pool.submit(st_io.copy_file, src, dst)))
        for kind, key, job in jobs:
            done = job.result()
            if kind == "rewritten":
                result.tensors.extend(done)
                result.rewritten_shards.append(key)
            elif kind == "copied":
                result.copied_shards.append(key)
            else:
                result.other_files.append(key)
            bar.update(1)
    finally:
        for _, _, job in jobs:
            job.cancel()
        wait([j for _, _, j in jobs])  # nothing keeps writing into a folder that is being removed
        bar.close()


def _finish(tmp: Path, manifest: ExportManifest, result: ExportResult) -> None:
    manifest.tensors.extend(result.tensors)
    if result.left_out:
        manifest.notes.append("not copied (weights outside the folded safetensors checkpoint, which would not carry "
                              "the steering): " + ", ".join(result.left_out))
    (tmp / MANIFEST_FILE).write_text(manifest.to_json() + "\n", "utf-8")
    (tmp / CARD_FILE).write_text(model_card(manifest), "utf-8")
    result.total_bytes = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
