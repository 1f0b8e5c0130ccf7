"""Model identities read from checkpoint files, without loading a model.

:func:`checkpoint_identity` reads a safetensors folder (config.json and the tensor headers) and
:func:`gguf_identity` a GGUF file. Both fingerprint the down projection weights with
:func:`cna_export.core.fingerprint.fingerprint_layers` (schemes 2 and 3: a layer per thread, a chunk at a time),
so the identities equal ``LoadedModel.identity()`` of the same weights. Fingerprints of files are
remembered in the fingerprint cache (:mod:`cna_export.io.fpcache`, keyed by the scheme too), so the same
weights are hashed once. Each identity can hash its weights again in another scheme
(:meth:`~cna_export.core.circuit.ModelIdentity.fingerprint_in`: a circuit with a scheme-1 fingerprint is
checked in scheme 1).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ..core.architectures import MOE_CONFIG_KEYS, ArchSpec, arch_for_config
from ..core.circuit import ModelIdentity, MoeIdentity
from ..core.errors import CnaError
from ..core.experts import SHARED
from ..core.fingerprint import SCHEME, fingerprint_layers, rehash_while_alive
from . import fpcache
from .config_json import plain_config
from .gguf_arch import expert_ffn, ffn_tensors, gguf_arch, intermediate_size, num_layers
from .gguf_read import type_name

if TYPE_CHECKING:
    import numpy as np

    from .safetensors import Checkpoint


def checkpoint_identity(
    folder: Path, name: str, source_format: str = "hf", trust_remote_code: bool = False, with_fingerprint: bool = True,
) -> tuple[ModelIdentity, ArchSpec, Checkpoint, list[str]]:
    """Identity of a safetensors checkpoint without loading the model.

    Shapes come from config.json and the safetensors headers; the fingerprint is the sha256 of every
    layer's down_proj weight as float32 little-endian bytes in layer order (= ``LoadedModel.fingerprint()``).
    Returns the identity, the architecture spec, the checkpoint and the down_proj tensor name of each layer.
    """
    config = plain_config(folder) or _auto_config(folder, name, trust_remote_code)
    arch = arch_for_config(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_layers = getattr(text, "num_hidden_layers", None)
    if not num_layers:
        raise CnaError(f"the config of {name} has no num_hidden_layers")
    from .safetensors import Checkpoint, DownNames  # lazily: a GGUF export never reads a safetensors checkpoint

    ckpt = Checkpoint.open(folder)
    if arch.moe is not None and any(getattr(text, a, None) for a in MOE_CONFIG_KEYS):
        return _moe_checkpoint_identity(ckpt, arch, text, num_layers, name, source_format, with_fingerprint)
    names: list[str] = []
    for layer in range(num_layers):
        found = ckpt.first_present(arch.checkpoint_down_names(layer))
        if found is None:
            raise CnaError(
                f"checkpoint {name} has no down_proj weight for layer {layer} "
                f"(looked for {', '.join(arch.checkpoint_down_names(layer))})"
            )
        names.append(found)
    first = ckpt.info(names[0])
    if len(first.shape) != 2:
        raise CnaError(f"{names[0]} in {name} has shape {list(first.shape)}; expected a 2-D down_proj weight")
    hidden, intermediate = first.shape
    for n in names[1:]:
        info = ckpt.info(n)
        if info.shape != first.shape:
            raise CnaError(f"{n} in {name} has shape {list(info.shape)}, unlike layer 0's {list(first.shape)}")
    want = (getattr(text, "hidden_size", hidden), getattr(text, "intermediate_size", intermediate))
    if isinstance(want[1], int) and (hidden, intermediate) != want:
        raise CnaError(
            f"checkpoint {name} is inconsistent: down_proj is {hidden} x {intermediate} but config.json says "
            f"hidden {want[0]}, intermediate {want[1]}"
        )
    names = DownNames(names)
    identity = ModelIdentity(
        name=name,
        architecture=arch.model_type,
        num_layers=num_layers,
        intermediate_size=intermediate,
        hidden_size=hidden,
        fingerprint=checkpoint_fingerprint(ckpt, names) if with_fingerprint else None,
        source_format=source_format,  # type: ignore[arg-type]
        dtype=first.dtype,
    )
    return identity.rehash_with(_checkpoint_rehash(ckpt, names)), arch, ckpt, names


def _auto_config(folder: Path, name: str, trust_remote_code: bool) -> Any:
    """The config as transformers reads it (class defaults, custom code, nested text configs)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise CnaError(f"cannot read the config of {name}: {str(e).strip().splitlines()[0]}") from None


def _checkpoint_key(ckpt: Checkpoint, down_names: list[str], scheme: int) -> tuple[str, list[str], str]:
    """The fingerprint cache's (kind, files, extra) for these down projections of ``ckpt`` (extra: the names,
    and for scheme 2 how many each layer has where that is not one each)."""
    files = sorted({str(ckpt.path(ckpt.weight_map[n])) for n in down_names})
    per_layer = getattr(down_names, "per_layer", None)
    grouped = scheme != 1 and per_layer is not None and any(n != 1 for n in per_layer)
    return "safetensors", files, json.dumps([list(down_names), list(per_layer)] if grouped else list(down_names))


def checkpoint_fingerprint(ckpt: Checkpoint, down_names: list[str], scheme: int | None = None) -> str:
    """:func:`fp32_fingerprint` of the down projections (``down_names`` as :func:`checkpoint_identity` gives them,
    a :class:`~.safetensors.DownNames`) in ``scheme`` (default: the current one), through the fingerprint
    cache (:mod:`.fpcache`)."""
    from .safetensors import fp32_fingerprint

    scheme = scheme or SCHEME
    kind, files, extra = _checkpoint_key(ckpt, down_names, scheme)
    return fpcache.cached(kind, files, lambda: fp32_fingerprint(ckpt, down_names, scheme), extra=extra, scheme=scheme)


def known_checkpoint_fingerprint(ckpt: Checkpoint, down_names: list[str], scheme: int | None = None) -> str | None:
    """The cached :func:`checkpoint_fingerprint`, or None (nothing is hashed)."""
    scheme = scheme or SCHEME
    kind, files, extra = _checkpoint_key(ckpt, down_names, scheme)
    return fpcache.lookup(kind, files, extra=extra, scheme=scheme)


def _checkpoint_rehash(ckpt: Checkpoint, down_names: list[str]):
    """How an identity of this checkpoint computes its fingerprint in another scheme."""
    return lambda scheme: checkpoint_fingerprint(ckpt, down_names, scheme)


@dataclass(frozen=True)
class ExpertTensors:
    """Where one layer's down projections live in a safetensors checkpoint.

    ``groups`` maps an expert (None for a dense layer, :data:`~cna_export.core.experts.SHARED` for the
    shared group) to ``(tensor name, expert slot)``: the slot is the expert's index in a fused 3-D
    ``[experts, hidden, width]`` tensor, or None for a 2-D ``[hidden, width]`` tensor (per-expert layout).
    """

    layer: int
    layout: str  # "dense", "fused" or "per-expert"
    groups: dict[int | None, tuple[str, int | None]]

    def names(self) -> list[str]:
        """The distinct tensor names in group order (the fingerprint's order)."""
        out: list[str] = []
        for name, _ in self.groups.values():
            if name not in out:
                out.append(name)
        return out


def expert_tensors(ckpt: Checkpoint, arch: ArchSpec, layer: int) -> ExpertTensors:
    """The down projection tensors of ``layer``: fused, per-expert, or a dense MLP's (no experts)."""
    moe = arch.moe
    assert moe is not None
    shared = ckpt.first_present(t.format(layer=layer) for t in moe.checkpoint_shared_down)
    fused = ckpt.first_present(t.format(layer=layer) for t in moe.checkpoint_fused_down)
    groups: dict[int | None, tuple[str, int | None]] = {}
    if fused is not None:
        shape = ckpt.info(fused).shape
        if len(shape) != 3:
            raise CnaError(f"{fused} has shape {list(shape)}; expected [experts, hidden, width]")
        groups = {e: (fused, e) for e in range(shape[0])}
        kind = "fused"
    else:
        e = 0
        while True:
            found = ckpt.first_present(t.format(layer=layer, expert=e) for t in moe.checkpoint_expert_down)
            if found is None:
                break
            groups[e] = (found, None)
            e += 1
        kind = "per-expert"
    if not groups:
        dense = ckpt.first_present(arch.checkpoint_down_names(layer))
        if dense is None:
            raise CnaError(f"the checkpoint has neither expert nor MLP down projections for layer {layer}")
        return ExpertTensors(layer, "dense", {None: (dense, None)})
    if shared is not None and ckpt.info(shared).shape[-1] > 0:
        groups[SHARED] = (shared, None)
    return ExpertTensors(layer, kind, groups)


def _moe_checkpoint_identity(ckpt: Checkpoint, arch: ArchSpec, text: Any, num_layers: int, name: str,
                             source_format: str, with_fingerprint: bool):
    """:func:`checkpoint_identity` of a mixture-of-experts checkpoint (either weight layout); the names
    returned are every down projection tensor in layer and group order (the fingerprint's input)."""
    from .safetensors import DownNames

    names: list[str] = []
    per_layer: list[int] = []
    moe_layers, shapes, shared_w, dense_w, hidden = [], set(), set(), set(), set()
    dtype = None
    for layer in range(num_layers):
        t = expert_tensors(ckpt, arch, layer)
        names.extend(t.names())
        per_layer.append(len(t.names()))
        for expert, (tensor, _slot) in t.groups.items():
            shape = ckpt.info(tensor).shape
            dtype = dtype or ckpt.info(tensor).dtype
            h, w = shape[-2], shape[-1]
            hidden.add(h)
            if expert is None:
                dense_w.add(w)
            elif expert == SHARED:
                shared_w.add(w)
            else:
                shapes.add(w)
        if t.layout != "dense":
            moe_layers.append(layer)
            shapes.add(("experts", sum(1 for e in t.groups if e is not None and e != SHARED)))
            if SHARED not in t.groups:
                shared_w.add(0)
    if len(hidden) != 1 or len(shapes) != 2 or len(shared_w) > 1 or len(dense_w) > 1:
        raise CnaError(f"not supported yet: the layers of {name} have different MLP or expert shapes")
    n_experts = next(x[1] for x in shapes if isinstance(x, tuple))
    width = next(x for x in shapes if not isinstance(x, tuple))
    moe = MoeIdentity(num_experts=n_experts, expert_intermediate_size=width,
                      shared_intermediate_size=shared_w.pop() if shared_w else 0, moe_layers=moe_layers,
                      dense_intermediate_size=dense_w.pop() if dense_w else None)
    identity = ModelIdentity(
        name=name, architecture=arch.model_type, num_layers=num_layers,
        intermediate_size=1, hidden_size=hidden.pop(), source_format=source_format,  # type: ignore[arg-type]
        dtype=dtype, moe=moe,
    )
    names = DownNames(names, per_layer)
    identity = identity.model_copy(update={"intermediate_size": identity.layout().max_width})
    identity = identity.with_fingerprint(checkpoint_fingerprint(ckpt, names) if with_fingerprint else None)
    return identity.rehash_with(_checkpoint_rehash(ckpt, names)), arch, ckpt, names


FINGERPRINT_CHUNK = 1 << 24
"""Bytes of float32 dequantised (and hashed) at a time per fingerprint thread, at least one row."""


def dequantised_chunks(reader: Any, tensor: Any) -> Iterator[np.ndarray]:
    """``tensor`` dequantised to float32 rows in file order, about 16 MiB of floats at a time, each chunk's rows
    read with ``preadv`` into one buffer: the caller holds one chunk and its floats (not the tensor, nor the
    pages of a memory map), whatever the model's size. Each chunk is valid until the next one is asked for."""
    import numpy as np

    from .quants import dequantize_rows

    data, path = tensor.data, getattr(reader, "path", None)
    if path is None:
        yield dequantize_rows(data, tensor.tensor_type)
        return
    n_rows = int(np.prod(data.shape[:-1], dtype=np.int64)) if data.ndim > 1 else 1
    row_bytes = int(tensor.n_bytes) // max(n_rows, 1)
    row_floats = 4 * int(tensor.n_elements) // max(n_rows, 1)
    per = max(1, FINGERPRINT_CHUNK // max(row_floats, 1))
    buf = bytearray(min(per, n_rows) * row_bytes)
    fd = os.open(path, os.O_RDONLY)
    try:
        for r0 in range(0, n_rows, per):
            k = min(per, n_rows - r0)
            got = os.preadv(fd, [memoryview(buf)[: k * row_bytes]], int(tensor.data_offset) + r0 * row_bytes)
            if got != k * row_bytes:
                raise CnaError(f"{path} ended inside tensor {tensor.name}")
            rows = np.frombuffer(buf, dtype=data.dtype, count=k * row_bytes // data.itemsize).reshape(k, -1)
            yield dequantize_rows(rows, tensor.tensor_type)
    finally:
        os.close(fd)


def _layer_downs(reader: Any, spec: Any, layer: int) -> list[Any]:
    """A layer's down projection tensors in the fingerprint's order: every expert's ``[hidden, width]`` in expert
    order (one fused tensor), then the shared expert's; a dense layer's ffn_down."""
    ffn = expert_ffn(reader, spec, layer)
    if ffn is None:
        return [ffn_tensors(reader, spec, layer)[0]]
    return [ffn.down] + ([ffn.down_shexp] if ffn.down_shexp is not None else [])


def _gguf_layer(reader: Any, tensors: list[Any]) -> Iterator[np.ndarray]:
    for tensor in tensors:
        yield from dequantised_chunks(reader, tensor)


def gguf_fingerprint(reader: Any, spec: Any | None = None, scheme: int | None = None,
                     threads: int | None = None) -> str:
    """The fingerprint of every layer's ffn_down dequantised to fp32 (as transformers loads it) in ``scheme``
    (default: the current one; schemes 2 and 3 on ``threads`` threads, a layer each), through the fingerprint cache
    (:mod:`.fpcache`) when the reader has a file path. Each tensor is read and dequantised a chunk of rows at a
    time (:func:`dequantised_chunks`)."""
    spec = spec or gguf_arch(reader)
    scheme = scheme or SCHEME
    layers = [functools.partial(_gguf_layer, reader, _layer_downs(reader, spec, layer))
              for layer in range(num_layers(reader))]
    path = getattr(reader, "path", None)
    if path is None:
        return fingerprint_layers(layers, scheme, threads)
    return fpcache.cached("gguf", [path], lambda: fingerprint_layers(layers, scheme, threads), extra=spec.model_type,
                          scheme=scheme)


def known_gguf_fingerprint(reader: Any, spec: Any | None = None, scheme: int | None = None) -> str | None:
    """The cached :func:`gguf_fingerprint`, or None (nothing is hashed)."""
    path = getattr(reader, "path", None)
    if path is None:
        return None
    return fpcache.lookup("gguf", [path], extra=(spec or gguf_arch(reader)).model_type, scheme=scheme or SCHEME)


def _gguf_rehash(reader: Any, spec: Any):
    """How an identity of this GGUF computes its fingerprint in another scheme (None once the reader is gone)."""
    return rehash_while_alive(reader, lambda alive, scheme: gguf_fingerprint(alive, spec, scheme))


def gguf_identity(reader: Any, name: str, fingerprint: bool = True) -> Any:
    """A :class:`ModelIdentity` for a GGUF file (dimensions from layer 0's ffn_down)."""
    spec = gguf_arch(reader)
    n_layers = num_layers(reader)
    ffns = [expert_ffn(reader, spec, layer) for layer in range(n_layers)] if spec.moe is not None else []
    if any(f is not None for f in ffns):
        return _moe_gguf_identity(reader, spec, name, ffns, fingerprint)
    down, _ = ffn_tensors(reader, spec, 0)
    return ModelIdentity(
        name=name,
        architecture=spec.model_type,
        num_layers=n_layers,
        intermediate_size=intermediate_size(down),
        hidden_size=int(down.ne[1]),
        fingerprint=gguf_fingerprint(reader, spec) if fingerprint else None,
        source_format="gguf",
        dtype=type_name(down),
    ).rehash_with(_gguf_rehash(reader, spec))


def _moe_gguf_identity(reader: Any, spec: ArchSpec, name: str, ffns: list, with_fingerprint: bool) -> ModelIdentity:
    """:func:`gguf_identity` of a mixture-of-experts GGUF (expert tensors ``ffn_*_exps``)."""
    moe_layers = [f.layer for f in ffns if f is not None]
    shapes = {(f.experts, f.width, f.hidden, f.shared_width) for f in ffns if f is not None}
    dense = {(intermediate_size(d), int(d.ne[1])) for layer, f in enumerate(ffns) if f is None
             for d in [ffn_tensors(reader, spec, layer)[0]]}
    if len(shapes) != 1 or len(dense) > 1 or (dense and next(iter(dense))[1] != next(iter(shapes))[2]):
        raise CnaError(f"not supported yet: the layers of {name} have different MLP or expert shapes")
    (n, width, hidden, shared), = shapes
    first = next(f for f in ffns if f is not None)
    ident = ModelIdentity(
        name=name, architecture=spec.model_type, num_layers=len(ffns), intermediate_size=1, hidden_size=hidden,
        source_format="gguf", dtype=type_name(first.down),
        moe=MoeIdentity(num_experts=n, expert_intermediate_size=width, shared_intermediate_size=shared,
                        moe_layers=moe_layers, dense_intermediate_size=next(iter(dense))[0] if dense else None),
    )
    ident = ident.model_copy(update={"intermediate_size": ident.layout().max_width})
    ident = ident.with_fingerprint(gguf_fingerprint(reader, spec) if with_fingerprint else None)
    return ident.rehash_with(_gguf_rehash(reader, spec))
