"""Architecture knowledge as data.

Everything cna-export needs to know about a model family (where its decoder
layers live, what its MLP projections are called in modules, in safetensors
checkpoints and in GGUF files, whether the MLP is gated or fuses gate and up)
lives in ``data/architectures.json``. This module validates that table once
(pydantic models :class:`ArchTable` / :class:`ArchEntry`, unknown keys and wrong
types refused), builds typed records from it and answers look-ups; there are no per-architecture if-chains
anywhere else in the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any, Dict, Literal, Optional, Tuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import CnaError


@dataclass(frozen=True)
class CheckpointNames:
    """Tensor-name templates in Hugging Face safetensors checkpoints (``{layer}`` is substituted)."""

    down: tuple[str, ...]
    up: tuple[str, ...]
    up_bias: tuple[str, ...]


@dataclass(frozen=True)
class GGUFNames:
    """llama.cpp tensor-name templates (``{layer}`` is substituted)."""

    arch: tuple[str, ...]
    down: str
    up: str
    gate: str | None
    up_bias: str | None


@dataclass(frozen=True)
class MoeSpec:
    """Where a mixture-of-experts layer keeps its experts (module paths relative to the layer's
    ``mlp``; tensor-name templates with ``{layer}`` and, for per-expert tensors, ``{expert}``)."""

    experts: str  # the fused experts module (3-D gate_up_proj [E, 2I, H] and down_proj [E, H, I])
    fused_down: str  # parameter names on that module
    fused_gate_up: str
    shared: str | None  # the shared expert(s), a gated MLP module, or None
    checkpoint_fused_down: tuple[str, ...]
    checkpoint_fused_gate_up: tuple[str, ...]
    checkpoint_expert_down: tuple[str, ...]
    checkpoint_expert_up: tuple[str, ...]
    checkpoint_shared_down: tuple[str, ...]
    checkpoint_shared_up: tuple[str, ...]
    gguf_down_exps: str
    gguf_up_exps: str
    gguf_gate_up_exps: str | None
    gguf_down_shexp: str | None
    gguf_up_shexp: str | None


@dataclass(frozen=True)
class ArchSpec:
    """Names and shape facts for one Hugging Face ``model_type``."""

    model_type: str
    hf_classes: tuple[str, ...]
    decoder: str
    layers: str
    mlp: str
    down_proj: str
    up_proj: str
    gate_proj: str | None
    gated: bool
    fused_gate_up: bool
    up_rows: str
    checkpoint: CheckpointNames
    gguf: GGUFNames
    moe: MoeSpec | None = None

    # -- module access -------------------------------------------------
    def decoder_module(self, model: Any) -> Any:
        """The decoder stack (embeddings + layers + final norm, no LM head)."""
        return _get_path(model, self.decoder)

    def layer_modules(self, model: Any) -> Any:
        return _get_path(model, self.layers)

    def mlp_module(self, model: Any, layer: int) -> Any:
        return _get_path(self.layer_modules(model)[layer], self.mlp)

    def down_proj_module(self, model: Any, layer: int) -> Any:
        mlp = self.mlp_module(model, layer)
        try:
            return getattr(mlp, self.down_proj)
        except AttributeError:
            raise CnaError(
                f"not supported yet: layer {layer} of this {self.model_type} model has no "
                f"'{self.mlp}.{self.down_proj}' module (MLP class {type(mlp).__name__})"
            ) from None

    def experts_module(self, model: Any, layer: int) -> Any | None:
        """The fused experts module of ``layer``, or None for a dense layer (or a dense architecture)."""
        if self.moe is None:
            return None
        mlp = self.mlp_module(model, layer)
        return getattr(mlp, self.moe.experts, None)

    def shared_module(self, model: Any, layer: int) -> Any | None:
        """The shared expert MLP of a MoE ``layer`` (None if the family or the layer has none)."""
        if self.moe is None or self.moe.shared is None or self.experts_module(model, layer) is None:
            return None
        shared = getattr(self.mlp_module(model, layer), self.moe.shared, None)
        down = getattr(shared, self.down_proj, None) if shared is not None else None
        if down is None or down.weight.shape[1] == 0:
            return None
        return shared

    def down_tensor_of(self, name: str) -> tuple[int, str, int | None] | None:
        """Which down projection a checkpoint tensor name is: ``(layer, kind, expert)`` with kind ``dense``,
        ``shared``, ``expert`` (per-expert layout, with its expert) or ``fused`` (3-D); None otherwise."""
        import re

        def match(templates: tuple[str, ...]) -> re.Match | None:
            for t in templates:
                pattern = re.escape(t).replace(r"\{layer\}", r"(?P<layer>\d+)")
                pattern = pattern.replace(r"\{expert\}", r"(?P<expert>\d+)")
                m = re.fullmatch(pattern, name)
                if m:
                    return m
            return None

        groups = [("dense", self.checkpoint.down)]
        if self.moe is not None:
            groups += [("shared", self.moe.checkpoint_shared_down), ("expert", self.moe.checkpoint_expert_down),
                       ("fused", self.moe.checkpoint_fused_down)]
        for kind, templates in groups:
            m = match(templates)
            if m:
                return int(m.group("layer")), kind, int(m.group("expert")) if kind == "expert" else None
        return None

    def up_row(self, neuron: int, intermediate_size: int) -> int:
        """Row of the (possibly fused) up projection that feeds neuron ``neuron``."""
        if self.up_rows == "second_half":
            return intermediate_size + neuron
        return neuron

    # -- checkpoint names ----------------------------------------------
    def checkpoint_down_names(self, layer: int) -> list[str]:
        return [t.format(layer=layer) for t in self.checkpoint.down]

    def checkpoint_up_names(self, layer: int) -> list[str]:
        return [t.format(layer=layer) for t in self.checkpoint.up]

    def gguf_down_name(self, layer: int) -> str:
        return self.gguf.down.format(layer=layer)

    def gguf_up_name(self, layer: int) -> str:
        return self.gguf.up.format(layer=layer)


def _get_path(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CnaError(
                f"not supported yet: model of class {type(obj).__name__} has no attribute "
                f"'{part}' (expected module path '{dotted}')"
            ) from None
    return obj


# ---------------------------------------------------------------------------
# The table file, validated
# ---------------------------------------------------------------------------

TABLE_FILE = "core/data/architectures.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _templates(names: tuple[str, ...] | str | None) -> tuple[str, ...] | str | None:
    for name in (names,) if isinstance(names, str) else (names or ()):
        if "{layer}" not in name:
            raise ValueError(f"tensor-name template '{name}' has no {{layer}}")
    return names


class CheckpointEntry(_Strict):
    """Safetensors tensor-name templates of one architecture."""

    down: Tuple[str, ...] = Field(min_length=1)
    up: Tuple[str, ...] = Field(min_length=1)
    up_bias: Tuple[str, ...] = ()

    _names = field_validator("down", "up", "up_bias")(_templates)


class GGUFEntry(_Strict):
    """llama.cpp tensor-name templates and ``general.architecture`` values of one architecture."""

    arch: Tuple[str, ...] = Field(min_length=1)
    down: str
    up: str
    gate: Optional[str] = None
    up_bias: Optional[str] = None

    _names = field_validator("down", "up", "gate", "up_bias")(_templates)


class MoeCheckpointEntry(_Strict):
    """Safetensors names of expert tensors: fused 3-D (``{layer}``) and per-expert (``{layer}``, ``{expert}``)."""

    fused_down: Tuple[str, ...] = Field(min_length=1)
    fused_gate_up: Tuple[str, ...] = Field(min_length=1)
    expert_down: Tuple[str, ...] = Field(min_length=1)
    expert_up: Tuple[str, ...] = Field(min_length=1)
    shared_down: Tuple[str, ...] = ()
    shared_up: Tuple[str, ...] = ()

    _names = field_validator("fused_down", "fused_gate_up", "expert_down", "expert_up", "shared_down",
                             "shared_up")(_templates)

    @field_validator("expert_down", "expert_up")
    @classmethod
    def _per_expert(cls, names: Tuple[str, ...]) -> Tuple[str, ...]:
        for name in names:
            if "{expert}" not in name:
                raise ValueError(f"per-expert tensor-name template '{name}' has no {{expert}}")
        return names


class MoeGGUFEntry(_Strict):
    """llama.cpp names of the 3-D expert tensors (``ne = [n_embd or n_ff, n_ff or n_embd, n_expert]``)."""

    down_exps: str
    up_exps: str
    gate_up_exps: Optional[str] = None
    down_shexp: Optional[str] = None
    up_shexp: Optional[str] = None

    _names = field_validator("down_exps", "up_exps", "gate_up_exps", "down_shexp", "up_shexp")(_templates)


class MoeEntry(_Strict):
    """The ``moe`` section of a mixture-of-experts family (see the table's ``_comment``)."""

    experts: str
    fused_down: str
    fused_gate_up: str
    shared: Optional[str]
    checkpoint: MoeCheckpointEntry
    gguf: MoeGGUFEntry

    @model_validator(mode="after")
    def _consistent(self) -> "MoeEntry":
        if (self.shared is None) != (not self.checkpoint.shared_down):
            raise ValueError("a shared expert module needs checkpoint.shared_down names, and only then")
        return self


class ArchEntry(_Strict):
    """One ``supported`` entry of the table (see the table's ``_comment``)."""

    hf_classes: Tuple[str, ...] = Field(min_length=1)
    decoder: str
    layers: str
    mlp: str
    down_proj: str
    up_proj: str
    gate_proj: Optional[str]
    gated: bool
    fused_gate_up: bool
    up_rows: Literal["plain", "second_half"]
    checkpoint: CheckpointEntry
    gguf: GGUFEntry
    moe: Optional[MoeEntry] = None

    @model_validator(mode="after")
    def _consistent(self) -> "ArchEntry":
        if (self.up_rows == "second_half") != self.fused_gate_up:
            raise ValueError("up_rows must be 'second_half' exactly when fused_gate_up is true")
        if self.gated and not self.fused_gate_up and self.gate_proj is None:
            raise ValueError("a gated MLP without fused gate_up needs gate_proj")
        return self


class ArchTable(_Strict):
    """The whole table: supported architectures by ``model_type``, and refused ones with the reason."""

    comment: str = Field("", alias="_comment")
    supported: Dict[str, ArchEntry] = Field(min_length=1)
    unsupported: Dict[str, str] = {}

    @model_validator(mode="after")
    def _disjoint(self) -> "ArchTable":
        both = sorted(set(self.supported) & set(self.unsupported))
        if both:
            raise ValueError(f"listed as both supported and unsupported: {', '.join(both)}")
        return self


def parse_table(text: str, where: str = TABLE_FILE) -> ArchTable:
    """Validate the JSON text of an architecture table; a :class:`CnaError` naming every problem if malformed."""
    try:
        return ArchTable.model_validate_json(text)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc']) or '(top level)'}: {err['msg']}" for err in e.errors()
        )
        raise CnaError(f"the architecture table {where} is malformed: {problems}") from None


@lru_cache(maxsize=1)
def _table() -> ArchTable:
    return parse_table(resources.files("cna_export").joinpath(TABLE_FILE).read_text("utf-8"))


def supported_model_types() -> list[str]:
    return sorted(_table().supported)


def _spec_from_entry(model_type: str, e: ArchEntry) -> ArchSpec:
    c, g = e.checkpoint, e.gguf
    moe = None
    if e.moe is not None:
        mc, mg = e.moe.checkpoint, e.moe.gguf
        moe = MoeSpec(
            experts=e.moe.experts, fused_down=e.moe.fused_down, fused_gate_up=e.moe.fused_gate_up, shared=e.moe.shared,
            checkpoint_fused_down=mc.fused_down, checkpoint_fused_gate_up=mc.fused_gate_up,
            checkpoint_expert_down=mc.expert_down, checkpoint_expert_up=mc.expert_up,
            checkpoint_shared_down=mc.shared_down, checkpoint_shared_up=mc.shared_up,
            gguf_down_exps=mg.down_exps, gguf_up_exps=mg.up_exps, gguf_gate_up_exps=mg.gate_up_exps,
            gguf_down_shexp=mg.down_shexp, gguf_up_shexp=mg.up_shexp,
        )
    return ArchSpec(
        model_type=model_type,
        hf_classes=e.hf_classes,
        decoder=e.decoder,
        layers=e.layers,
        mlp=e.mlp,
        down_proj=e.down_proj,
        up_proj=e.up_proj,
        gate_proj=e.gate_proj,
        gated=e.gated,
        fused_gate_up=e.fused_gate_up,
        up_rows=e.up_rows,
        checkpoint=CheckpointNames(c.down, c.up, c.up_bias),
        gguf=GGUFNames(g.arch, g.down, g.up, g.gate, g.up_bias),
        moe=moe,
    )


@lru_cache(maxsize=None)
def get_arch(model_type: str) -> ArchSpec:
    """The spec for a Hugging Face ``model_type``; a clear error for anything else."""
    table = _table()
    if model_type in table.supported:
        return _spec_from_entry(model_type, table.supported[model_type])
    if model_type in table.unsupported:
        raise CnaError(f"not supported yet: architecture '{model_type}' has a {table.unsupported[model_type]}")
    raise CnaError(
        f"not supported yet: unknown architecture '{model_type}' "
        f"(supported: {', '.join(supported_model_types())})"
    )


def arch_for_gguf(gguf_arch: str, moe: bool = False) -> ArchSpec:
    """The spec whose GGUF ``general.architecture`` is ``gguf_arch`` (first match in table order; with
    ``moe``, the first one with a mixture-of-experts section: llama.cpp writes Mixtral as ``llama``)."""
    table = _table()
    for model_type, e in table.supported.items():
        if gguf_arch in e.gguf.arch and (e.moe is not None or not moe):
            return get_arch(model_type)
    if moe and any(gguf_arch in e.gguf.arch for e in table.supported.values()):
        raise CnaError(f"not supported yet: GGUF architecture '{gguf_arch}' with expert tensors (ffn_*_exps)")
    raise CnaError(
        f"not supported yet: GGUF architecture '{gguf_arch}' "
        f"(supported: {', '.join(sorted({a for e in table.supported.values() for a in e.gguf.arch}))})"
    )


MOE_CONFIG_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
"""transformers config attributes that announce a mixture-of-experts MLP (any of them non-zero)."""


def arch_for_config(config: Any) -> ArchSpec:
    """Resolve the spec for a transformers config, rejecting MoE models of families without a ``moe``
    section (and non-gated MLPs) with a reason."""
    model_type = getattr(config, "model_type", None)
    if not model_type:
        raise CnaError("not supported yet: the model config has no model_type")
    spec = get_arch(model_type)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in MOE_CONFIG_KEYS:
        if getattr(text, attr, None) and spec.moe is None:
            raise CnaError(
                f"not supported yet: this {model_type} model has a mixture-of-experts MLP ({attr}="
                f"{getattr(text, attr)})"
            )
    return spec
