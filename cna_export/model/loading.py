"""Model loading: a Hugging Face folder, a Hub id, or a ``.gguf`` file (dequantised by transformers).

Loading is plain ``from_pretrained``: users with a network get the Hub, and a
GGUF file goes through transformers' ``gguf_file`` support. Large models are
spread by accelerate through ``device_map``; cna-export has no sharding code of
its own. Pickled weights (``.bin``/``.pt``) are never loaded unless the user
passes ``allow_pickle``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..core.architectures import ArchSpec, arch_for_config
from ..core.circuit import ModelIdentity, MoeIdentity
from ..core.errors import CnaError
from ..core.experts import Layout
from ..core.fingerprint import SCHEME, fingerprint_layers, rehash_while_alive
from ..core.progress import bar as progress_bar
from ..core.progress import wanted
from ..io.sources import ModelSource, resolve_source  # noqa: F401  (re-exported: model specs)

log = logging.getLogger(__name__)

DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


def resolve_dtype(dtype: str | None, device_map: str | None) -> Any:
    """``auto`` means float32 on CPU (fast and exact there) and the checkpoint's dtype with a device map."""
    import torch

    if dtype in (None, "auto"):
        return "auto" if device_map else torch.float32
    try:
        return getattr(torch, DTYPES[dtype.lower()])
    except KeyError:
        raise CnaError(f"unknown dtype '{dtype}' (choose auto, float32, bfloat16 or float16)") from None


def _has_pickle_only(path: Path) -> bool:
    names = {f.name for f in path.iterdir()}
    has_st = any(n.endswith(".safetensors") for n in names)
    has_pickle = any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    return has_pickle and not has_st


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer and its architecture spec."""

    model: Any
    tokenizer: Any
    arch: ArchSpec
    source: ModelSource
    # by scheme, computed once; not an init field, so a ``dataclasses.replace`` copy (another model) starts empty
    _fingerprints: dict[int, str] = field(default_factory=dict, init=False, repr=False)
    _layout: Layout | None = field(default=None, repr=False)

    @property
    def num_layers(self) -> int:
        return len(self.arch.layer_modules(self.model))

    def down_proj(self, layer: int) -> Any:
        return self.arch.down_proj_module(self.model, layer)

    def layout(self) -> Layout:
        """The neuron groups of every layer, read from the modules (experts where they exist)."""
        if self._layout is None:
            from .experts import check_experts, experts_shape

            moe_layers, shapes, shared, dense = [], set(), set(), set()
            for layer in range(self.num_layers):
                experts = self.arch.experts_module(self.model, layer)
                if experts is None:
                    dense.add(int(self.down_proj(layer).weight.shape[1]))
                    continue
                check_experts(experts, layer)
                moe_layers.append(layer)
                n, _, width = experts_shape(experts)
                shapes.add((n, width))
                sh = self.arch.shared_module(self.model, layer)
                shared.add(0 if sh is None else int(getattr(sh, self.arch.down_proj).weight.shape[1]))
            if len(shapes) > 1 or len(shared) > 1 or len(dense) > 1:
                raise CnaError("not supported yet: the layers of this model have different MLP or expert widths")
            if not moe_layers:
                self._layout = Layout(self.num_layers, dense.pop())
            else:
                (n, width), = shapes
                self._layout = Layout(self.num_layers, dense.pop() if dense else 0, n, width, shared.pop(),
                                      frozenset(moe_layers))
        return self._layout

    def down_parts(self, layer: int) -> list[Any]:
        """Layer ``layer``'s down projections, ``[hidden, width]`` each: the dense MLP's weight, or every
        routed expert's ``down_proj[e]`` in expert order, then the shared expert's."""
        layout = self.layout()
        if layer not in layout.moe_layers:
            return [self.down_proj(layer).weight]
        experts = self.arch.experts_module(self.model, layer)
        parts = [experts.down_proj[e] for e in range(layout.experts)]
        if layout.shared_width:
            parts.append(getattr(self.arch.shared_module(self.model, layer), self.arch.down_proj).weight)
        return parts

    def down_weight(self, layer: int) -> Any:
        """:meth:`down_parts` as one ``[hidden, neurons]`` matrix (flat neuron order)."""
        import torch

        parts = self.down_parts(layer)
        return parts[0] if len(parts) == 1 else torch.cat([p.detach() for p in parts], dim=1)

    @property
    def intermediate_size(self) -> int:
        """Neurons per layer (for MoE models: of the widest layer, all its experts together)."""
        return self.layout().max_width

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[1])

    @property
    def input_device(self) -> Any:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> Any:
        return self.down_weight(0).dtype

    def fingerprint(self, scheme: int | None = None) -> str | None:
        """The fingerprint of every layer's down_proj weight as fp32 (independent of the load dtype when lossless)
        in ``scheme`` (default: the current one; :mod:`cna_export.core.fingerprint`), computed once."""
        scheme = scheme or SCHEME
        if scheme in self._fingerprints:
            return self._fingerprints[scheme]
        layers = [self.down_parts(layer) for layer in range(self.num_layers)]
        if any(w.device.type == "meta" for parts in layers for w in parts):
            log.warning("down_proj weights are offloaded; the model fingerprint is not computed")
            return None
        self._fingerprints[scheme] = fingerprint_layers([functools.partial(_fp32_layer, p) for p in layers], scheme)
        return self._fingerprints[scheme]

    def identity(self, with_fingerprint: bool = True) -> ModelIdentity:
        layout = self.layout()
        moe = None
        if layout.is_moe:
            moe = MoeIdentity(num_experts=layout.experts, expert_intermediate_size=layout.expert_width,
                              shared_intermediate_size=layout.shared_width, moe_layers=sorted(layout.moe_layers),
                              dense_intermediate_size=layout.dense_width or None)
        return ModelIdentity(
            name=self.source.spec,
            architecture=self.arch.model_type,
            num_layers=self.num_layers,
            intermediate_size=self.intermediate_size,
            hidden_size=self.hidden_size,
            fingerprint=self.fingerprint() if with_fingerprint else None,
            source_format=self.source.kind,  # type: ignore[arg-type]
            dtype=str(self.dtype).removeprefix("torch."),
            moe=moe,
        ).rehash_with(rehash_while_alive(self, LoadedModel.fingerprint))


def _fp32_layer(parts: list[Any]) -> Iterator[Any]:
    """A layer's down projections as float32 numpy chunks, on the CPU (a fingerprint's layer)."""
    from ..io.safetensors import fp32_chunks

    for w in parts:
        yield from fp32_chunks(w.detach().to("cpu"))



def load_tokenizer(source: ModelSource, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    name, extra = source.load_args
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError, KeyError) as e:
        raise CnaError(f"cannot load the tokenizer of {source.spec}: {_first_line(e)}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # batched capture and generation pad on the left
        tok._cna_pad_from_eos = True
    return tok


def save_tokenizer(tok: Any, folder: str | Path) -> None:
    """Save ``tok`` as its checkpoint had it: without the pad token :func:`load_tokenizer` borrowed from EOS."""
    borrowed = getattr(tok, "_cna_pad_from_eos", False)
    if borrowed:
        tok.pad_token = None
    try:
        tok.save_pretrained(folder)
    finally:
        if borrowed:
            tok.pad_token = tok.eos_token


def load_model(
    spec: str,
    dtype: str | None = "auto",
    device_map: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: bool | None = None,
) -> LoadedModel:
    """Load a causal LM for capture and steering (eval mode, no grad needed).

    ``progress``: show transformers' bar while a GGUF is dequantised; None (the default) shows it on
    a terminal unless logging is quieter than warnings (:func:`cna_export.core.progress.wanted`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    source = resolve_source(spec)
    name, extra = source.load_args
    if source.kind == "hf" and source.path is not None and _has_pickle_only(source.path) and not allow_pickle:
        raise CnaError(
            f"model folder {spec} has only pickled weights (.bin/.pt); pass --allow-pickle to load them "
            "(unpickling can run arbitrary code)"
        )
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError, KeyError) as e:
        raise CnaError(f"cannot load the config of {spec}: {_first_line(e)}") from None
    arch = arch_for_config(config)
    kwargs: dict[str, Any] = dict(extra)
    kwargs["dtype"] = resolve_dtype(dtype, device_map)
    if device_map:
        kwargs["device_map"] = device_map
    if source.kind != "gguf":
        kwargs["use_safetensors"] = None if allow_pickle else True
    try:
        if progress is None:
            progress = wanted(quiet=not log.isEnabledFor(logging.WARNING))
        with _gguf_progress(source.kind == "gguf" and progress):
            model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise CnaError(f"cannot load model {spec}: {_first_line(e)}") from None
    model.eval()
    model.requires_grad_(False)
    tokenizer = load_tokenizer(source, trust_remote_code)
    loaded = LoadedModel(model=model, tokenizer=tokenizer, arch=arch, source=source)
    loaded.layout()  # fail early, with the reason, if the MLP is not what the table says
    return loaded


@contextlib.contextmanager
def _gguf_progress(show: bool) -> Iterator[None]:
    """transformers shows a tqdm bar while dequantising GGUF tensors: route it through
    :func:`cna_export.core.progress.bar`, shown only when ``show``."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(progress_bar, show, leave=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
