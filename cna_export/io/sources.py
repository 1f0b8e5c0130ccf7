"""Where a model spec points: ``bundled:NAME``, a ``.gguf`` file, a local folder, or a Hub id.

Every stage that opens a checkpoint (the io readers too) resolves specs here, so ``bundled:``
names and path rules mean the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import CnaError
from . import bundled


@dataclass
class ModelSource:
    """Where a model comes from: ``kind`` is hf (local folder), gguf (local file) or hub (an id)."""

    spec: str
    kind: str
    path: Path | None

    @property
    def load_args(self) -> tuple[str, dict[str, Any]]:
        if self.kind == "gguf":
            assert self.path is not None
            return str(self.path.parent), {"gguf_file": self.path.name}
        return (str(self.path) if self.path else self.spec), {}


def resolve_source(spec: str | Path) -> ModelSource:
    """Where a model spec points: ``bundled:NAME``, a .gguf file, a folder, or a Hub id."""
    spec = str(spec)
    if spec.startswith(bundled.PREFIX):
        return ModelSource(spec, "gguf", bundled.resolve(spec).resolve())
    p = Path(spec).expanduser()
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return ModelSource(spec, "gguf", p.resolve())
        raise CnaError(f"model {spec} is a file but not a .gguf file; pass a model folder, a .gguf file or a Hub id")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise CnaError(f"model folder {spec} has no config.json")
        return ModelSource(spec, "hf", p.resolve())
    if spec.lower().endswith(".gguf") or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise CnaError(f"model not found: {spec}")
    return ModelSource(spec, "hub", None)


def hub_folder(repo_id: str) -> Path:
    """A local snapshot of a Hub repo (from the cache when offline), without pickles or GGUF files."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, ignore_patterns=["*.bin", "*.pt", "*.pth", "*.gguf", "*.h5",
                                                                "*.msgpack", "*.onnx", "original/*"]))
    except Exception as e:  # the hub client raises many types; all mean "not available"
        why = str(e).strip().splitlines()[0]
        raise CnaError(f"cannot get model {repo_id} from the Hugging Face Hub: {why}") from None


def local_folder(source: ModelSource) -> Path:
    """The local folder of a Hugging Face model source: the folder itself, or a Hub snapshot."""
    if source.kind == "hub":
        return hub_folder(source.spec)
    if source.path is None:
        raise CnaError(f"model {source.spec} has no local path")
    return source.path
