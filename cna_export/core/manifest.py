"""Export manifests: what an exported checkpoint was steered with, tensor by tensor.

Written as ``cna_manifest.json`` beside a safetensors export, as the ``cna.manifest``
KV of a GGUF export (or a side file in ``--fast-copy`` mode). It embeds the circuit
manifest, the multiplier of every touched neuron, how the multipliers were folded,
the sha256 of each touched tensor before and after, and the verification result.
``verify`` and ``audit`` read it back.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .circuit import Circuit, ExpertLabel, neuron_fields
from .errors import CnaError
from .experts import make_key, parse_expert
from .records import validate_record
from .text import parse_json, read_text
from .version import __version__

EXPORT_SCHEMA_VERSION = 2
READABLE_EXPORT_SCHEMAS = (1, 2)  # schema 1: a GGUF LoRA adapter's base only as a "base file: PATH" note
LEGACY_BASE_NOTE = "base file: "
MANIFEST_FILE = "cna_manifest.json"
GGUF_KEY = "cna.manifest"
SHARD_METADATA_KEY = "cna_export"  # safetensors header key holding an export's summary
SIDE_MANIFEST_SUFFIX = ".cna_manifest.json"  # a --fast-copy GGUF export's manifest lives beside it
STEERED_SUFFIX = " (CNA-steered)"  # appended to general.name of a GGUF export


def side_manifest_path(out: str | Path) -> Path:
    """Where a GGUF export written with ``--fast-copy`` keeps its manifest."""
    out = Path(out)
    return out.with_name(out.name + SIDE_MANIFEST_SUFFIX)


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NeuronMultiplier(_Record):
    layer: int = Field(ge=0)
    expert: ExpertLabel = Field(default=None, description="expert neurons: routed expert number or \"shared\"")
    index: int = Field(ge=0)
    multiplier: float

    def key(self) -> tuple[int, ...]:
        return make_key(self.layer, self.index, parse_expert(self.expert))


class TouchedTensor(_Record):
    name: str = Field(description="tensor name in the exported file")
    dtype: str
    shape: list[int]
    sha256_before: str
    sha256_after: str
    axis: Literal["column", "row", "element"] = Field(
        description="what was scaled: down_proj columns, up_proj rows, bias elements")
    indices: list[int] = Field(description="the scaled columns/rows/elements")
    file: str | None = Field(default=None, description="shard file holding the tensor (safetensors)")

    @field_validator("file")
    @classmethod
    def _inside_the_folder(cls, v: str | None) -> str | None:
        """A shard is named relative to the export folder: absolute paths and ``..`` are refused."""
        if v is not None:
            parts = PurePosixPath(v.replace("\\", "/")).parts
            if not v or v.startswith(("/", "\\")) or PureWindowsPath(v).drive or ".." in parts or "\0" in v:
                raise ValueError(f"shard file {v!r} is not a plain path inside the export folder")
        return v


class BaseFile(_Record):
    """The base file a llama.cpp LoRA adapter (``gguf_lora``) was computed from."""

    path: str = Field(description="the base GGUF, resolved, when the adapter was written")
    size: int | None = Field(default=None, ge=0, description="its size in bytes (None: recorded by schema 1)")
    fingerprint: str | None = Field(default=None, description="sha256 over its down_proj weights (None: not "
                                    "computed, the circuit carried none, or recorded by schema 1)")

    @property
    def name(self) -> str:
        return Path(self.path).name

    def local(self) -> Path | None:
        """The file when it is still on this machine with the recorded size, else None."""
        p = Path(self.path)
        if not p.is_file() or (self.size is not None and p.stat().st_size != self.size):
            return None
        return p


class ExportManifest(_Record):
    schema_version: Literal[1, 2] = EXPORT_SCHEMA_VERSION
    tool: str = "cna-export"
    tool_version: str = __version__
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    format: Literal["safetensors", "gguf", "lora", "gguf_lora"] = Field(
        description="safetensors / gguf: a steered checkpoint; lora: a PEFT adapter folder; gguf_lora: a llama.cpp "
        "LoRA GGUF"
    )
    source: str = Field(description="the checkpoint the export was made from, as given")
    source_format: Literal["hf", "gguf", "hub"]
    fold: Literal["down", "up"] = Field(description="down: down_proj columns; up: up_proj rows (+ bias)")
    circuit: Circuit
    multipliers: list[NeuronMultiplier]
    tensors: list[TouchedTensor] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    verification: dict | None = None
    base_file: BaseFile | None = Field(default=None, description="gguf_lora: the base file it was computed from")

    def multiplier_map(self) -> dict[tuple[int, ...], float]:
        return {m.key(): m.multiplier for m in self.multipliers}

    def to_json(self) -> str:
        """The manifest as JSON (``base_file`` only where there is one: adapters)."""
        return self.model_dump_json(indent=2, exclude={"base_file"} if self.base_file is None else None)

    @classmethod
    def from_json(cls, text: str, source: str = "export manifest") -> "ExportManifest":
        data = parse_json(text, source)
        if not isinstance(data, dict) or "circuit" not in data:
            raise CnaError(f"{source} is not a cna-export export manifest")
        manifest = validate_record(cls, data, source, "export", EXPORT_SCHEMA_VERSION, READABLE_EXPORT_SCHEMAS)
        if manifest.schema_version == 1 and manifest.format == "gguf_lora" and manifest.base_file is None:
            manifest.base_file = _legacy_base_file(manifest.notes)
        return manifest

    @classmethod
    def load(cls, path: str | Path) -> "ExportManifest":
        p = Path(path)
        if p.is_dir():
            p = p / MANIFEST_FILE
        if not p.is_file():
            raise CnaError(f"export manifest not found: {p}")
        return cls.from_json(read_text(p, "export manifest"), source=str(p))


def _legacy_base_file(notes: list[str]) -> BaseFile | None:
    """A schema 1 adapter's base, recorded only as the note ``base file: PATH`` (read here, once)."""
    for note in notes:
        if note.startswith(LEGACY_BASE_NOTE):
            return BaseFile(path=note.removeprefix(LEGACY_BASE_NOTE))
    return None


def multipliers_list(mults: dict[tuple[int, ...], float]) -> list[NeuronMultiplier]:
    return [NeuronMultiplier(**neuron_fields(k), multiplier=m) for k, m in sorted(mults.items())]
