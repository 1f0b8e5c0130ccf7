"""A checkpoint's weights, tensor by tensor, under canonical names, as float arrays.

``open_weights(spec)`` opens a Hugging Face safetensors folder or a GGUF file
(``bundled:NAME`` too) without loading the model. Nothing is unpickled: a
folder with only ``.bin``/``.pt`` weights is refused. Each tensor is described
by a :class:`TensorEntry` and read on demand with :meth:`WeightSource.read`,
one tensor at a time, as a float32 array (float64 for float64 tensors) in
Hugging Face orientation:

* safetensors: the stored tensor converted to float32 (memory-mapped read);
* GGUF: dequantised with :func:`cna_export.io.quants.dequantize_rows`
  (gguf-py's dequantisers) and then brought into the Hugging Face convention
  by transformers' own GGUF tensor processors, exactly as transformers does
  when it loads a GGUF: llama-family ``attn_q``/``attn_k`` rows are
  un-permuted (llama.cpp's converter permutes them for its rope layout),
  Gemma norm weights get their ``+1`` removed. FFN tensors keep Hugging
  Face's neuron order, so neuron ``j`` is column ``j`` of ``down_proj`` and
  row ``j`` of ``up_proj`` in both formats.

Names: an entry's ``name`` is its Hugging Face name (``model.layers.3.mlp.down_proj.weight``);
for GGUF files it is found by mapping every parameter name of the matching
transformers architecture (built on the meta device, no memory) through
gguf-py's tensor name map (``gguf.get_tensor_name_map``), which is how both
llama.cpp's converter and transformers' GGUF loader name tensors. An entry's
``key`` is its llama.cpp name (``blk.3.ffn_down.weight``), found the same way
for safetensors folders; it pairs tensors across formats. ``role``
(``ffn_down``, ``attn_output``, ``token_embd``, ...) and ``layer`` come from
that llama.cpp name.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..core.architectures import ArchSpec
from ..core.errors import CnaError
from .quant_types import float_type

log = logging.getLogger(__name__)

_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")
# Files of an HF folder that hold weights (compared tensor by tensor, not as files) or are ours.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".pkl")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a checkpoint."""

    name: str  # canonical (Hugging Face) name when known, else the stored name
    stored: str  # name in the file
    key: str | None  # llama.cpp name ("blk.3.ffn_down.weight"), when known
    shape: tuple[int, ...]  # Hugging Face / numpy orientation
    storage: str  # torch dtype name (safetensors) or GGML type name (GGUF)
    role: str | None  # llama.cpp base name without block and suffix: ffn_down, attn_output, token_embd, ...
    layer: int | None
    suffix: str  # "weight", "bias" or ""

    @property
    def quantized(self) -> bool:
        return float_type(self.storage) is None

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


def split_suffix(name: str) -> tuple[str, str]:
    for suffix in ("weight", "bias"):
        if name.endswith("." + suffix):
            return name[: -len(suffix) - 1], suffix
    return name, ""


def parse_key(key: str | None) -> tuple[str | None, int | None]:
    """(role, layer) of a llama.cpp tensor name."""
    if key is None:
        return None, None
    module, _ = split_suffix(key)
    m = _BLK.match(module)
    if m:
        return m.group(2), int(m.group(1))
    return module, None


def _natural(entries: list[TensorEntry]) -> list[TensorEntry]:
    """Non-layer tensors first (file order), then layer by layer (file order within a layer)."""
    order = {e.stored: i for i, e in enumerate(entries)}
    return sorted(entries, key=lambda e: (-1 if e.layer is None else e.layer, order[e.stored]))


# ---------------------------------------------------------------------------
# llama.cpp <-> Hugging Face names (gguf-py's tensor name map)
# ---------------------------------------------------------------------------


def _model_arch(gguf_arch: str) -> Any:
    from gguf import MODEL_ARCH_NAMES

    for arch, name in MODEL_ARCH_NAMES.items():
        if name == gguf_arch:
            return arch
    raise CnaError(f"not supported yet: gguf-py does not know the GGUF architecture '{gguf_arch}'")


@lru_cache(maxsize=16)
def _name_map(gguf_arch: str, n_layers: int) -> Any:
    from gguf import get_tensor_name_map

    return get_tensor_name_map(_model_arch(gguf_arch), n_layers)


def hf_to_gguf_module(gguf_arch: str, n_layers: int, module: str) -> str | None:
    """llama.cpp name of a Hugging Face module (``model.layers.0.mlp.down_proj`` -> ``blk.0.ffn_down``)."""
    nm = _name_map(gguf_arch, n_layers)
    candidates = [module]
    for prefix in ("model.language_model.", "language_model.model.", "language_model."):
        if module.startswith(prefix):
            candidates.append("model." + module[len(prefix):])
    for c in candidates:
        found = nm.get_type_and_name(c)
        if found is not None:
            return found[1]
    return None


@lru_cache(maxsize=16)
def gguf_to_hf_modules(model_type: str, gguf_arch: str, n_layers: int) -> dict[str, str]:
    """llama.cpp module name -> Hugging Face module name, from the parameter names of the transformers model.

    The model is built from a default config of ``model_type`` on the meta device (no memory is
    allocated), so the names are exactly those transformers gives the model it loads from a GGUF.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out: dict[str, str] = {}
    try:
        config = AutoConfig.for_model(model_type, num_hidden_layers=n_layers)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
        if "lm_head.weight" not in names:
            names.append("lm_head.weight")
    except Exception as e:  # any failure here only costs the nicer names
        log.debug("cannot build a %s skeleton for tensor names: %s", model_type, e)
        names = []
    for name in names:
        module, _ = split_suffix(name)
        g = hf_to_gguf_module(gguf_arch, n_layers, module)
        if g is not None and g not in out:
            out[g] = module
    return out


# ---------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------


class WeightSource:
    """A checkpoint opened for tensor-by-tensor reading (see the module docstring)."""

    kind: str  # "hf" or "gguf"
    spec: str
    path: Path
    arch: ArchSpec
    gguf_arch: str
    num_layers: int
    entries: dict[str, TensorEntry]  # by stored name, natural order

    # -- look-ups ------------------------------------------------------------
    def __iter__(self) -> Iterator[TensorEntry]:
        return iter(self.entries.values())

    def find(self, role: str, layer: int | None = None, suffix: str = "weight") -> TensorEntry | None:
        for e in self.entries.values():
            if e.role == role and e.layer == layer and e.suffix == suffix:
                return e
        return None

    @property
    def intermediate_size(self) -> int:
        down = self.find("ffn_down", 0)
        if down is None:
            raise CnaError(f"{self.spec} has no down_proj weight in layer 0")
        return int(down.shape[1])

    @property
    def hidden_size(self) -> int:
        down = self.find("ffn_down", 0)
        if down is None:  # a mixture-of-experts first layer: the embeddings say it
            emb = self.find("token_embd", None)
            if emb is not None and len(emb.shape) == 2:
                return int(emb.shape[1])
            raise CnaError(f"{self.spec} has no down_proj weight in layer 0")
        return int(down.shape[0])

    def describe(self) -> str:
        fmt = "GGUF" if self.kind == "gguf" else "safetensors"
        return f"{self.spec} ({fmt}, {self.arch.model_type}, {self.num_layers} layers)"

    # -- reading ---------------------------------------------------------------
    def read(self, entry: TensorEntry) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def rounding_noise(self, entry: TensorEntry) -> np.ndarray | None:
        """Expected squared rounding error per row of the stored matrix (``quants.rounding_noise_rows``):
        zeros for float storage, None where the storage type has no uniform-step model."""
        return np.zeros(int(entry.shape[0])) if float_type(entry.storage) is not None else None

    def raw(self, entry: TensorEntry) -> Any:  # pragma: no cover - abstract
        """The stored bytes (a memory-mapped array or tensor), for exact comparisons and hashes."""
        raise NotImplementedError

    def sha256(self, entry: TensorEntry) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def same_bytes(self, entry: TensorEntry, other: "WeightSource", other_entry: TensorEntry) -> bool | None:
        """Whether the two tensors hold identical bytes; None when that does not decide equality."""
        if other.kind != self.kind or entry.storage != other_entry.storage or entry.shape != other_entry.shape:
            return None
        return self._bytes_equal(entry, other, other_entry)

    def _bytes_equal(  # pragma: no cover - abstract
        self, entry: TensorEntry, other: WeightSource, other_entry: TensorEntry
    ) -> bool:
        raise NotImplementedError

    def rows_max_abs(self, entry: TensorEntry, values: np.ndarray) -> np.ndarray:
        """Per stored row (quantisation blocks run along the last axis), max |value|: shape [rows, 1]."""
        flat = values.reshape(-1, values.shape[-1]) if values.ndim > 1 else values.reshape(1, -1)
        return np.abs(flat).max(axis=1, keepdims=True)

    # -- metadata ----------------------------------------------------------------
    def embedded_manifest(self) -> tuple[Any, str] | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def metadata_differences(self, other: "WeightSource") -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def identity(self, fingerprint: bool = True) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        pass


class HFWeights(WeightSource):
    """A Hugging Face safetensors folder."""

    kind = "hf"

    def __init__(self, spec: str, folder: Path):
        from transformers import AutoConfig

        from ..core.architectures import arch_for_config
        from . import safetensors as st_io

        self.spec, self.path = spec, folder
        try:
            config = AutoConfig.from_pretrained(str(folder))
        except (OSError, ValueError, KeyError) as e:
            raise CnaError(f"cannot read the config of {spec}: {str(e).strip().splitlines()[0]}") from None
        self.config = config
        self.arch = arch_for_config(config)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        n = getattr(text, "num_hidden_layers", None)
        if not n:
            raise CnaError(f"the config of {spec} has no num_hidden_layers")
        self.num_layers = int(n)
        self.gguf_arch = self.arch.gguf.arch[0]
        self.ckpt = st_io.Checkpoint.open(folder)
        entries = []
        for name in self.ckpt.weight_map:
            info = self.ckpt.info(name)
            module, suffix = split_suffix(name)
            g = hf_to_gguf_module(self.gguf_arch, self.num_layers, module)
            key = f"{g}.{suffix}" if g and suffix else g
            role, layer = parse_key(key)
            entries.append(TensorEntry(name, name, key, tuple(info.shape), info.dtype, role, layer, suffix))
        self.entries = {e.stored: e for e in _natural(entries)}

    def read(self, entry: TensorEntry) -> np.ndarray:
        import torch

        t = self.ckpt.read(entry.stored)
        if not t.is_floating_point():
            return t.numpy().astype(np.float64)
        want = torch.float64 if t.dtype == torch.float64 else torch.float32
        return t.to(want).numpy()

    def raw(self, entry: TensorEntry) -> Any:
        return self.ckpt.read(entry.stored)

    def sha256(self, entry: TensorEntry) -> str:
        from .tensor_bytes import tensor_sha256

        return tensor_sha256(self.ckpt.read(entry.stored))

    def _bytes_equal(self, entry: TensorEntry, other: WeightSource, other_entry: TensorEntry) -> bool:
        from .tensor_bytes import bytes_equal

        return bytes_equal(self.raw(entry), other.raw(other_entry))

    def embedded_manifest(self) -> tuple[Any, str] | None:
        from ..core.manifest import MANIFEST_FILE, ExportManifest

        p = self.path / MANIFEST_FILE
        if not p.is_file():
            return None
        return ExportManifest.load(p), str(p)

    def shard_marks(self) -> dict[str, str]:
        """Per shard, the ``cna_export`` summary a cna-export export writes into the safetensors header."""
        from ..core.manifest import SHARD_METADATA_KEY

        out = {}
        for f in self.ckpt.files:
            v = self.ckpt.metadata(f).get(SHARD_METADATA_KEY)
            if v is not None:
                out[f] = v
        return out

    def files(self) -> dict[str, str]:
        """Non-weight files of the folder (config, tokenizer, chat template, ...) -> sha256."""
        out = {}
        for p in sorted(self.path.rglob("*")):
            rel = p.relative_to(self.path)
            if not p.is_file() or rel.parts[0] in (".git", ".cache", ".huggingface"):
                continue
            if p.name.endswith(WEIGHT_SUFFIXES) or p.name.endswith(".safetensors.index.json"):
                continue
            out[rel.as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
        return out

    def metadata_differences(self, other: WeightSource) -> list[str]:
        if not isinstance(other, HFWeights):
            return []
        mine, theirs = self.files(), other.files()
        out = [f"file {n} is missing" for n in sorted(set(mine) - set(theirs))]
        out += [f"file {n} was added" for n in sorted(set(theirs) - set(mine))]
        out += [f"file {n} differs" for n in sorted(set(mine) & set(theirs)) if mine[n] != theirs[n]]
        return out

    def identity(self, fingerprint: bool = True) -> Any:
        from .identity import checkpoint_identity

        return checkpoint_identity(self.path, self.spec, "hf", with_fingerprint=fingerprint)[0]


class GGUFWeights(WeightSource):
    """A GGUF file (read with cna-export's memory-mapped GGUF reader)."""

    kind = "gguf"

    def __init__(self, spec: str, path: Path, hf_layout: bool = True):
        """``hf_layout=False`` keeps llama.cpp's names and layout (no transformers, no torch): enough
        to compare two GGUF files with each other."""
        from . import gguf as G

        self.spec, self.path = spec, path
        self.reader = G.open_gguf(path)
        self.gguf_arch = str(G.field_value(self.reader, "general.architecture") or "")
        self.arch = G.gguf_arch(self.reader)
        self.num_layers = G.num_layers(self.reader)
        names = gguf_to_hf_modules(self.arch.model_type, self.gguf_arch, self.num_layers) if hf_layout else {}
        self._tensors = G.tensor_map(self.reader)
        entries = []
        for t in self.reader.tensors:
            module, suffix = split_suffix(t.name)
            hf = names.get(module)
            name = f"{hf}.{suffix}" if hf and suffix else (hf or t.name)
            role, layer = parse_key(t.name)
            entries.append(TensorEntry(name, t.name, t.name, tuple(G.np_shape(t)), G.type_name(t), role, layer, suffix))
        self.entries = {e.stored: e for e in _natural(entries)}
        self._processor = self._make_processor() if hf_layout else None

    def _make_processor(self) -> Any:
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        from . import gguf as G

        a = self.gguf_arch
        config = {
            "num_attention_heads": G.field_value(self.reader, f"{a}.attention.head_count"),
            "num_key_value_heads": G.field_value(self.reader, f"{a}.attention.head_count_kv"),
        }
        if isinstance(config["num_key_value_heads"], list):  # per-layer counts
            config["num_key_value_heads"] = max(config["num_key_value_heads"])
        if config["num_key_value_heads"] is None:
            config["num_key_value_heads"] = config["num_attention_heads"]
        return TENSOR_PROCESSORS.get(a, TensorProcessor)(config=config)

    def read(self, entry: TensorEntry) -> np.ndarray:
        from .quants import dequantize_rows

        t = self._tensors[entry.stored]
        if entry.storage in ("I8", "I16", "I32", "I64"):
            values = np.asarray(t.data, dtype=np.float64).reshape(entry.shape)
        else:
            values = dequantize_rows(t.data, t.tensor_type).reshape(entry.shape)
        if self._processor is None:
            return np.ascontiguousarray(values)
        processed = self._processor.process(weights=values, name=entry.stored).weights
        return np.ascontiguousarray(processed)

    def raw(self, entry: TensorEntry) -> Any:
        return self._tensors[entry.stored].data

    def rounding_noise(self, entry: TensorEntry) -> np.ndarray | None:
        from .quants import rounding_noise_rows

        t = self._tensors[entry.stored]
        noise = rounding_noise_rows(t.data, t.tensor_type)
        if noise is None or len(entry.shape) != 2 or noise.shape[0] != entry.shape[0]:
            return None
        return noise

    def sha256(self, entry: TensorEntry) -> str:
        from . import gguf as G

        return G.sha256_array(self._tensors[entry.stored].data)

    def _bytes_equal(self, entry: TensorEntry, other: WeightSource, other_entry: TensorEntry) -> bool:
        from . import gguf as G

        return G.arrays_equal_bytes(self.raw(entry), other.raw(other_entry))

    def embedded_manifest(self) -> tuple[Any, str] | None:
        from ..core.manifest import GGUF_KEY, ExportManifest, side_manifest_path
        from . import gguf as G

        text = G.field_value(self.reader, GGUF_KEY)
        if text is not None:
            return ExportManifest.from_json(str(text), source=f"{self.path.name} ({GGUF_KEY})"), f"{GGUF_KEY} KV"
        side = side_manifest_path(self.path)
        if side.is_file():
            return ExportManifest.load(side), str(side)
        return None

    def metadata_differences(self, other: WeightSource) -> list[str]:
        from . import gguf as G

        if not isinstance(other, GGUFWeights):
            return []
        return G.kv_differences(self.reader, other.reader)

    def identity(self, fingerprint: bool = True) -> Any:
        from .identity import gguf_identity

        return gguf_identity(self.reader, self.spec, fingerprint=fingerprint)

    def close(self) -> None:
        self._tensors = {}
        reader = getattr(self, "reader", None)
        if reader is not None:
            try:
                reader.mm.close()
            except (BufferError, ValueError):  # arrays still point into the map; the GC closes it
                pass


def open_weights(spec: str, hf_layout: bool = True) -> WeightSource:
    """Open a safetensors folder, a ``.gguf`` file or ``bundled:NAME`` for reading; one-line errors otherwise.

    ``hf_layout=False`` opens a GGUF file with llama.cpp's names and layout (see :class:`GGUFWeights`)."""
    from .sources import resolve_source

    source = resolve_source(spec)
    if source.kind == "hub" or source.path is None:
        raise CnaError(f"{spec} is not a local model folder or .gguf file (download it first)")
    if source.kind == "gguf":
        return GGUFWeights(spec, source.path, hf_layout=hf_layout)
    folder = source.path
    if not any(folder.glob("*.safetensors")):
        pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
        if pickles:
            raise CnaError(
                f"{spec} has only pickled weights ({pickles[0]}); cna-export compares safetensors and GGUF only "
                "and never unpickles (convert it with cna-export export --allow-pickle first)"
            )
        raise CnaError(f"{spec} has no safetensors weights")
    return HFWeights(spec, folder)


def pair_entries(a: WeightSource, b: WeightSource) -> list[tuple[str, TensorEntry | None, TensorEntry | None]]:
    """Align the tensors of two checkpoints: by stored name within a format, by llama.cpp name across formats.

    Returns (display name, entry in a or None, entry in b or None) in ``a``'s natural order, then
    ``b``'s leftovers. The display name is the Hugging Face name.
    """
    if a.kind == b.kind:
        ka = {e.stored: e for e in a}
        kb = {e.stored: e for e in b}
    else:
        ka = {(e.key or f"?{e.stored}"): e for e in a}
        kb = {(e.key or f"?{e.stored}"): e for e in b}
    out: list[tuple[str, TensorEntry | None, TensorEntry | None]] = []
    for k, ea in ka.items():
        eb = kb.get(k)
        name = ea.name if a.kind == "hf" or eb is None or b.kind != "hf" else eb.name
        out.append((name, ea, eb))
    for k, eb in kb.items():
        if k not in ka:
            out.append((eb.name, None, eb))
    return out
