"""A GGUF file seen through its architecture: the :class:`ArchSpec` of the file, its layer count, and
the MLP tensors of a layer (a dense layer's ffn_down/ffn_up, a mixture-of-experts layer's expert
tensors). Shapes are GGML ``ne`` here (``ne[0]`` first)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..core.errors import CnaError
from .gguf_read import field_value, tensor_map


def gguf_arch(reader: Any) -> Any:
    """The :class:`ArchSpec` for the file's ``general.architecture``."""
    from ..core.architectures import arch_for_gguf

    name = field_value(reader, "general.architecture")
    if not name:
        raise CnaError("GGUF file has no general.architecture")
    moe = any(t.name.endswith("_exps.weight") for t in reader.tensors)
    return arch_for_gguf(str(name), moe=moe)


def num_layers(reader: Any) -> int:
    arch = field_value(reader, "general.architecture", "")
    n = field_value(reader, f"{arch}.block_count")
    if n is None:
        raise CnaError(f"GGUF file has no {arch}.block_count")
    return int(n)


def ffn_tensors(reader: Any, spec: Any, layer: int) -> tuple[Any, Any]:
    """(ffn_down, ffn_up) of ``layer``, refusing files that lack them."""
    tensors = tensor_map(reader)
    down = tensors.get(spec.gguf_down_name(layer))
    up = tensors.get(spec.gguf_up_name(layer))
    for name, t in ((spec.gguf_down_name(layer), down), (spec.gguf_up_name(layer), up)):
        if t is None:
            raise CnaError(f"GGUF file has no tensor {name} (expected for a {spec.model_type} model)")
        if len(t.ne) != 2:
            raise CnaError(f"not supported yet: {name} has {len(t.ne)} dimensions (expected a 2-D MLP weight)")
    return down, up


@dataclass
class ExpertFFN:
    """One mixture-of-experts layer's expert tensors (llama.cpp ``ne``: down ``[n_ff, n_embd, n_expert]``,
    up ``[n_embd, n_ff, n_expert]``, or a fused gate_up ``[n_embd, 2 n_ff, n_expert]``, gate half first)."""

    layer: int
    down: Any
    up: Any
    fused_up: bool
    down_shexp: Any = None
    up_shexp: Any = None

    @property
    def experts(self) -> int:
        return int(self.down.ne[2])

    @property
    def width(self) -> int:
        return int(self.down.ne[0])

    @property
    def hidden(self) -> int:
        return int(self.down.ne[1])

    @property
    def shared_width(self) -> int:
        return int(self.down_shexp.ne[0]) if self.down_shexp is not None else 0


def expert_ffn(reader: Any, spec: Any, layer: int) -> ExpertFFN | None:
    """The expert tensors of ``layer``, or None for a dense layer (or a dense architecture)."""
    moe = spec.moe
    if moe is None:
        return None
    tensors = tensor_map(reader)
    down = tensors.get(moe.gguf_down_exps.format(layer=layer))
    if down is None:
        return None
    up = tensors.get(moe.gguf_up_exps.format(layer=layer))
    fused = False
    if up is None and moe.gguf_gate_up_exps:
        up, fused = tensors.get(moe.gguf_gate_up_exps.format(layer=layer)), True
    if up is None:
        raise CnaError(f"GGUF file has {down.name} but no {moe.gguf_up_exps.format(layer=layer)}")
    for t in (down, up):
        if len(t.ne) != 3:
            raise CnaError(f"not supported yet: {t.name} has {len(t.ne)} dimensions (expected [.., .., experts])")
    want_up = (int(down.ne[1]), (2 if fused else 1) * int(down.ne[0]), int(down.ne[2]))
    if tuple(int(x) for x in up.ne) != want_up:
        raise CnaError(f"{up.name} has shape {list(up.ne)}, expected {list(want_up)} for {down.name} {list(down.ne)}")
    out = ExpertFFN(layer, down, up, fused)
    if moe.gguf_down_shexp:
        out.down_shexp = tensors.get(moe.gguf_down_shexp.format(layer=layer))
        if out.down_shexp is not None:
            out.up_shexp = tensors.get((moe.gguf_up_shexp or "").format(layer=layer))
            if out.up_shexp is None:
                raise CnaError(f"GGUF file has {out.down_shexp.name} but no shared up projection")
    return out


def intermediate_size(down: Any) -> int:
    """Neurons of a layer: GGML ``ne[0]`` of its ffn_down (numpy columns)."""
    return int(down.ne[0])
