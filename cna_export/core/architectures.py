"""Architecture knowledge as data.

Everything cna-export needs to know about a model family (where its decoder
layers live, what its MLP projections are called in modules, in safetensors
checkpoints and in GGUF files, whether the MLP is gated or fuses gate and up)
lives in ``data/architectures.json``. This module only loads that table into
typed records and answers look-ups; there are no per-architecture if-chains
anywhere else in the package.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

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


@lru_cache(maxsize=1)
def _table() -> dict[str, Any]:
    text = resources.files("cna_export").joinpath("core/data/architectures.json").read_text("utf-8")
    return json.loads(text)


def supported_model_types() -> list[str]:
    return sorted(_table()["supported"])


def _spec_from_entry(model_type: str, e: dict[str, Any]) -> ArchSpec:
    c, g = e["checkpoint"], e["gguf"]
    return ArchSpec(
        model_type=model_type,
        hf_classes=tuple(e["hf_classes"]),
        decoder=e["decoder"],
        layers=e["layers"],
        mlp=e["mlp"],
        down_proj=e["down_proj"],
        up_proj=e["up_proj"],
        gate_proj=e["gate_proj"],
        gated=bool(e["gated"]),
        fused_gate_up=bool(e["fused_gate_up"]),
        up_rows=e["up_rows"],
        checkpoint=CheckpointNames(tuple(c["down"]), tuple(c["up"]), tuple(c.get("up_bias", []))),
        gguf=GGUFNames(tuple(g["arch"]), g["down"], g["up"], g.get("gate"), g.get("up_bias")),
    )


def get_arch(model_type: str) -> ArchSpec:
    """The spec for a Hugging Face ``model_type``; a clear error for anything else."""
    table = _table()
    if model_type in table["supported"]:
        return _spec_from_entry(model_type, table["supported"][model_type])
    if model_type in table["unsupported"]:
        raise CnaError(f"not supported yet: architecture '{model_type}' has a {table['unsupported'][model_type]}")
    raise CnaError(
        f"not supported yet: unknown architecture '{model_type}' "
        f"(supported: {', '.join(supported_model_types())})"
    )


def arch_for_gguf(gguf_arch: str) -> ArchSpec:
    """The spec whose GGUF ``general.architecture`` is ``gguf_arch`` (first match in table order)."""
    for model_type, e in _table()["supported"].items():
        if gguf_arch in e["gguf"]["arch"]:
            return _spec_from_entry(model_type, e)
    raise CnaError(
        f"not supported yet: GGUF architecture '{gguf_arch}' "
        f"(supported: {', '.join(sorted({a for e in _table()['supported'].values() for a in e['gguf']['arch']}))})"
    )


def arch_for_config(config: Any) -> ArchSpec:
    """Resolve the spec for a transformers config, rejecting MoE and non-gated MLPs with a reason."""
    model_type = getattr(config, "model_type", None)
    if not model_type:
        raise CnaError("not supported yet: the model config has no model_type")
    spec = get_arch(model_type)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("num_local_experts", "num_experts", "n_routed_experts"):
        if getattr(text, attr, None):
            raise CnaError(
                f"not supported yet: this {model_type} model has a mixture-of-experts MLP ({attr}="
                f"{getattr(text, attr)})"
            )
    return spec
