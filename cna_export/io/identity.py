"""Model identities read from checkpoint files, without loading a model.

:func:`checkpoint_identity` reads a safetensors folder (config.json and the tensor headers) and
:func:`gguf_identity` a GGUF file. Both fingerprint the down projection weights with
:func:`cna_export.core.fingerprint.fingerprint`, one layer at a time, so the identities equal
``LoadedModel.identity()`` of the same weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..core.architectures import ArchSpec, arch_for_config
from ..core.circuit import ModelIdentity
from ..core.errors import CnaError
from ..core.fingerprint import fingerprint
from .gguf import ffn_tensors, gguf_arch, intermediate_size, num_layers, type_name
from .quants import dequantize_rows
from .safetensors import Checkpoint, fp32_fingerprint


def checkpoint_identity(
    folder: Path, name: str, source_format: str = "hf", trust_remote_code: bool = False, with_fingerprint: bool = True,
) -> tuple[ModelIdentity, ArchSpec, Checkpoint, list[str]]:
    """Identity of a safetensors checkpoint without loading the model.

    Shapes come from config.json and the safetensors headers; the fingerprint is the sha256 of every
    layer's down_proj weight as float32 little-endian bytes in layer order (= ``LoadedModel.fingerprint()``).
    Returns the identity, the architecture spec, the checkpoint and the down_proj tensor name of each layer.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise CnaError(f"cannot read the config of {name}: {str(e).strip().splitlines()[0]}") from None
    arch = arch_for_config(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_layers = getattr(text, "num_hidden_layers", None)
    if not num_layers:
        raise CnaError(f"the config of {name} has no num_hidden_layers")
    ckpt = Checkpoint.open(folder)
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
    identity = ModelIdentity(
        name=name,
        architecture=arch.model_type,
        num_layers=num_layers,
        intermediate_size=intermediate,
        hidden_size=hidden,
        fingerprint=fp32_fingerprint(ckpt, names) if with_fingerprint else None,
        source_format=source_format,  # type: ignore[arg-type]
        dtype=first.dtype,
    )
    return identity, arch, ckpt, names


def gguf_fingerprint(reader: Any, spec: Any | None = None) -> str:
    """sha256 over every layer's ffn_down, dequantised to fp32, in layer order (as transformers loads it)."""
    spec = spec or gguf_arch(reader)

    def layers() -> Iterator[np.ndarray]:
        for layer in range(num_layers(reader)):
            down, _ = ffn_tensors(reader, spec, layer)
            yield dequantize_rows(down.data, down.tensor_type)

    return fingerprint(layers())


def gguf_identity(reader: Any, name: str, fingerprint: bool = True) -> Any:
    """A :class:`ModelIdentity` for a GGUF file (dimensions from layer 0's ffn_down)."""
    spec = gguf_arch(reader)
    n_layers = num_layers(reader)
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
    )
