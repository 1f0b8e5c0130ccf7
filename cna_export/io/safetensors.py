"""Safetensors checkpoints on disk: which tensor is in which shard, reading single tensors, rewriting shards.

Everything goes through the ``safetensors`` library: ``safe_open`` memory-maps a
shard and hands out single tensors lazily, so reading a tensor (or hashing the
down_proj weights of a whole model) costs only that tensor's pages, and
``save_file`` writes a shard straight from the tensors' memory. A rewritten
shard therefore peaks near the size of that one shard, never the model.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping


from ..core.errors import CnaError
from ..core.atomic import public_mode

INDEX_SUFFIX = ".safetensors.index.json"

# safetensors header dtype -> torch dtype name
DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]


class Checkpoint:
    """A Hugging Face safetensors checkpoint folder: one ``model.safetensors`` or shards with an index.

    ``weight_map`` maps every tensor name to the shard file (relative to the folder) that holds it.
    Nothing is loaded; tensors are read one at a time with :meth:`read`.
    """

    def __init__(self, folder: Path, weight_map: dict[str, str], index_file: str | None):
        self.folder = folder
        self.weight_map = weight_map
        self.index_file = index_file
        self.files = sorted(set(weight_map.values()))

    # -- construction -----------------------------------------------------------
    @classmethod
    def open(cls, folder: str | Path) -> "Checkpoint":
        folder = Path(folder)
        indexes = sorted(folder.glob("*" + INDEX_SUFFIX))
        if len(indexes) > 1:
            names = ", ".join(p.name for p in indexes)
            raise CnaError(f"checkpoint {folder} has several safetensors indexes ({names}); keep one")
        if indexes:
            return cls._from_index(folder, indexes[0])
        shards = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
        if not shards:
            raise CnaError(f"checkpoint {folder} has no safetensors weights")
        weight_map: dict[str, str] = {}
        for shard in shards:
            for name in _header(shard):
                if name in weight_map:
                    raise CnaError(
                        f"checkpoint {folder}: tensor {_shown(name)} is in both {weight_map[name]} and {shard.name} "
                        "and there is no index saying which one counts"
                    )
                weight_map[name] = shard.name
        return cls(folder, weight_map, None)

    @classmethod
    def _from_index(cls, folder: Path, index: Path) -> "Checkpoint":
        try:
            data = json.loads(index.read_text("utf-8"))
            weight_map = data["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (KeyError, TypeError, ValueError, UnicodeDecodeError, RecursionError, MemoryError, OSError):
            raise CnaError(f"safetensors index {index} is not valid (expected JSON with a weight_map)") from None
        if not weight_map:
            raise CnaError(f"safetensors index {index} lists no tensors")
        for file in weight_map.values():
            if (not isinstance(file, str) or not file or "\0" in file or Path(file).is_absolute()
                    or ".." in Path(file).parts):
                raise CnaError(f"safetensors index {index} names an invalid shard path {file!r}"[:300])
        for file in sorted(set(weight_map.values())):
            if not (folder / file).is_file():
                raise CnaError(f"checkpoint {folder} is incomplete: the index names shard {_shown(file)}, which is missing")
        by_file: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            by_file.setdefault(file, []).append(name)
        for file, names in by_file.items():
            present = set(_header(folder / file))
            absent = [n for n in names if n not in present]
            if absent:
                raise CnaError(f"checkpoint {folder}: the index puts {_shown(absent[0])} in {_shown(file)}, but that shard has no such tensor")
        return cls(folder, weight_map, index.name)

    # -- look-ups -----------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def path(self, file: str) -> Path:
        return self.folder / file

    def first_present(self, candidates: Iterable[str]) -> str | None:
        for name in candidates:
            if name in self.weight_map:
                return name
        return None

    def info(self, name: str) -> TensorInfo:
        from safetensors import safe_open

        file = self.weight_map[name]
        with safe_open(self.path(file), framework="pt") as f:
            sl = f.get_slice(name)
            raw = sl.get_dtype()
            shape = tuple(int(x) for x in sl.get_shape())
        return TensorInfo(name, file, DTYPE_NAMES.get(raw, raw.lower()), shape)

    def read(self, name: str):
        """One tensor (memory-mapped, copy-on-write: modifying it never touches the file)."""
        from safetensors import safe_open

        with safe_open(self.path(self.weight_map[name]), framework="pt") as f:
            return f.get_tensor(name)

    def metadata(self, file: str) -> dict[str, str]:
        from safetensors import safe_open

        with safe_open(self.path(file), framework="pt") as f:
            return dict(f.metadata() or {})

    def tensors_in(self, file: str) -> list[str]:
        return sorted(n for n, f in self.weight_map.items() if f == file)

    def total_bytes(self) -> int:
        return sum(self.path(f).stat().st_size for f in self.files)


def _shown(name: str) -> str:
    """A shard or tensor name for a one-line message: as is when printable, else quoted with escapes."""
    return name if name.isprintable() else repr(name)


def _header(path: Path) -> list[str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise CnaError(f"cannot read safetensors file {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def fp32_fingerprint(ckpt: Checkpoint, names: Iterable[str]) -> str:
    """sha256 over the named tensors converted to float32, little-endian, in the order given.

    With the down_proj weights in layer order this equals ``LoadedModel.fingerprint()`` of the same
    weights, without loading the model: one memory-mapped tensor at a time.
    """
    import torch

    from ..core.fingerprint import fingerprint

    return fingerprint(ckpt.read(name).to(torch.float32).numpy() for name in names)


def rewrite_shard(src: Path, dst: Path, replacements: Mapping[str, object], metadata: Mapping[str, str]) -> None:
    """Write shard ``src`` to ``dst`` with some tensors replaced and ``metadata`` merged into its header.

    Every other tensor is written from the memory-mapped source unchanged (same dtype, shape and
    bytes); existing header metadata (e.g. ``{"format": "pt"}``) is kept.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(src, framework="pt") as f:
        names = list(f.keys())
        meta = dict(f.metadata() or {})
        tensors = {}
        for name in names:
            t = replacements.get(name)
            if t is None:
                tensors[name] = f.get_tensor(name)
                continue
            sl = f.get_slice(name)
            orig_dtype = DTYPE_NAMES.get(sl.get_dtype(), sl.get_dtype())
            if str(t.dtype).removeprefix("torch.") != orig_dtype or list(t.shape) != list(sl.get_shape()):
                raise ValueError(f"replacement for {name} changes its dtype or shape")
            tensors[name] = t.contiguous()
    missing = set(replacements) - set(names)
    if missing:
        raise ValueError(f"{src.name} has no tensor {sorted(missing)[0]}")
    meta.update(metadata)
    save_file(tensors, dst, metadata=meta)
    public_mode(dst)  # the writer creates a private file; a model shard is not


def copy_file(src: Path, dst: Path, link: bool = False) -> None:
    """Byte-for-byte copy (the kernel's copy_file_range/sendfile where available), or a hard link."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(src, dst)
            return
        except OSError as e:
            if e.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise CnaError(
                    f"cannot hard-link {src.name} into the output ({os.strerror(e.errno)}); "
                    "the output must be on the same filesystem as the input, or drop --link"
                ) from None
            raise
    shutil.copyfile(src, dst)
