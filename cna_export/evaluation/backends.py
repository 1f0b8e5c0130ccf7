"""Evaluation backends: greedy generation and next-token log-probabilities, steered or not.

Two backends implement the same small interface (:class:`Backend`):

``transformers`` (:class:`TransformersBackend`)
    Any model :func:`cna_export.model.loading.load_model` loads (HF folder, Hub id,
    dequantised GGUF, an exported steered folder). CNA steering is the hook
    steering of :mod:`cna_export.model.steering`; CAA adds ``alpha * v[layer]`` to the
    output of every layer's ``down_proj`` at every position (the paper's
    ``steer_caa``). Batched greedy generation with left padding
    (:func:`cna_export.model.generation.greedy_generate`).

``llama.cpp`` (:class:`LlamaCppBackend`)
    A GGUF file through llama-cpp-python's C API (:mod:`cna_export.io.llama`), much faster on CPU. Several
    prompts are decoded together (one KV sequence each, one ``llama_decode``
    per step), greedy (argmax of the logits). CNA steering needs steered
    weights: the circuit is folded into a temporary copy of the GGUF with
    :func:`cna_export.export.gguf.export_gguf` (``fast_copy``) and that file is
    loaded. CAA uses llama.cpp control vectors, which are added to the output
    of layers 1..L-1 (llama.cpp has no control vector for layer 0); for
    architectures without a norm after the MLP this is exactly the hook CAA on
    those layers. Prompts are rendered with the GGUF's own chat template
    (``tokenizer.chat_template``) through transformers' Jinja renderer, so both
    backends see the same prompt text.

Both backends return, per prompt, the generated text and token ids and (on
request) the log-probabilities of the first answer token, and can score a given
continuation (teacher forcing) for KL drift.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol, Sequence

import numpy as np

from ..core.circuit import Circuit, check_multiplier
from ..core.errors import CnaError
from ..core.multipliers import describe_multipliers
from ..io.llama import LlamaContext, LlamaLora, LlamaModel, llama_available
from ..model.generation import Generation, greedy_generate
from .metrics import log_softmax

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# What to do to the model
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Steering:
    """An intervention: nothing, CNA (scale circuit neurons) or CAA (add per-layer vectors).

    ``vectors`` (CAA) is ``[num_layers, hidden]``; ``layers`` restricts which
    layers receive their vector (None: all).
    """

    kind: str = "none"
    label: str = "unsteered"
    circuit: Circuit | None = None
    multipliers: Mapping[tuple[int, int], float] | None = None
    multiplier: float | None = None
    vectors: np.ndarray | None = None
    alpha: float = 0.0
    layers: tuple[int, ...] | None = None
    force: bool = False
    info: dict = field(default_factory=dict)

    @staticmethod
    def none(label: str = "unsteered") -> "Steering":
        return Steering(kind="none", label=label)

    @staticmethod
    def cna(
        circuit: Circuit,
        multiplier: float | None = None,
        per_neuron: Mapping[tuple[int, int], float] | None = None,
        label: str | None = None,
        force: bool = False,
        info: dict | None = None,
    ) -> "Steering":
        from ..model.steering import resolve_multipliers

        mults = resolve_multipliers(circuit, multiplier, per_neuron)
        if not mults:
            raise CnaError("the circuit has no neurons to steer")
        name = label or f"CNA {len(mults)} neurons {describe_multipliers(mults, 'counts')}"
        return Steering(kind="cna", label=name, circuit=circuit, multipliers=dict(mults), multiplier=multiplier,
                        force=force, info=dict(info or {}))

    @staticmethod
    def caa(
        vectors: np.ndarray,
        alpha: float,
        layers: Sequence[int] | None = None,
        label: str | None = None,
        info: dict | None = None,
    ) -> "Steering":
        v = np.asarray(vectors, dtype=np.float64)
        if v.ndim != 2:
            raise CnaError("CAA vectors must be [layers, hidden]")
        alpha = check_multiplier(alpha)
        if layers is not None:
            bad = [l for l in layers if not 0 <= l < v.shape[0]]
            if bad:
                raise CnaError(f"CAA layer {bad[0]} is out of range (model has {v.shape[0]} layers)")
        name = label or f"CAA alpha={alpha:g}"
        return Steering(kind="caa", label=name, vectors=v, alpha=alpha,
                        layers=tuple(sorted(set(layers))) if layers is not None else None, info=dict(info or {}))

    def caa_layers(self) -> list[int]:
        assert self.vectors is not None
        return list(self.layers) if self.layers is not None else list(range(self.vectors.shape[0]))

    def describe(self) -> dict:
        out: dict[str, Any] = {"kind": self.kind, "label": self.label}
        if self.kind == "cna":
            assert self.multipliers is not None
            out["neurons"] = len(self.multipliers)
            out["multiplier"] = self.multiplier
            layers: dict[int, int] = {}
            for (layer, _), _m in self.multipliers.items():
                layers[layer] = layers.get(layer, 0) + 1
            out["per_layer_counts"] = dict(sorted(layers.items()))
        elif self.kind == "caa":
            out["alpha"] = self.alpha
            out["layers"] = self.caa_layers()
        out.update(self.info)
        return out


# ---------------------------------------------------------------------------------------
# Interface
# ---------------------------------------------------------------------------------------


class Backend(Protocol):
    name: str
    spec: str

    def generate(
        self, prompts: Sequence[str], steering: Steering, max_new_tokens: int, first_logprobs: bool = False
    ) -> list[Generation]: ...

    def score(self, prompts: Sequence[str], continuations: Sequence[Sequence[int]],
              steering: Steering) -> list[np.ndarray]:
        """Per prompt, log-probs [max(1, len(cont)), vocab] at the last prompt position and after each
        continuation token but the last (teacher forcing)."""
        ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def caa_hooks(model: Any, arch: Any, vectors: np.ndarray, alpha: float, layers: Sequence[int]) -> Iterator[None]:
    """Add ``alpha * vectors[layer]`` to the output of ``down_proj`` at every position (the paper's steer_caa)."""
    import torch

    handles = []
    try:
        for layer in layers:
            down = arch.down_proj_module(model, layer)
            v = torch.tensor(np.asarray(vectors[layer]) * alpha, dtype=torch.float32)

            def hook(module: Any, args: tuple, output: Any, v: Any = v) -> Any:
                return (output.float() + v.to(output.device)).to(output.dtype)

            handles.append(down.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


class TransformersBackend:
    """Hook steering on a transformers model (see the module docstring)."""

    name = "transformers"

    def __init__(
        self,
        loaded: Any,
        spec: str | None = None,
        batch_size: int = 8,
        chat_template: bool = True,
        system_prompt: str | None = None,
    ):
        self.loaded = loaded
        self.spec = spec or loaded.source.spec
        self.batch_size = batch_size
        self.chat_template = chat_template
        self.system_prompt = system_prompt

    @contextlib.contextmanager
    def steered(self, steering: Steering) -> Iterator[None]:
        from ..model.steering import steer

        if steering.kind == "none":
            yield
        elif steering.kind == "cna":
            assert steering.multipliers is not None
            if steering.circuit is not None:
                for note in steering.circuit.check_fits(self.loaded.identity(), force=steering.force):
                    log.warning(note)
            with steer(self.loaded.model, self.loaded.arch, steering.multipliers):
                yield
        elif steering.kind == "caa":
            assert steering.vectors is not None
            if steering.vectors.shape != (self.loaded.num_layers, self.loaded.hidden_size):
                raise CnaError(
                    f"CAA vectors are {steering.vectors.shape[0]} x {steering.vectors.shape[1]}, the model is "
                    f"{self.loaded.num_layers} layers x hidden {self.loaded.hidden_size}"
                )
            with caa_hooks(self.loaded.model, self.loaded.arch, steering.vectors, steering.alpha,
                           steering.caa_layers()):
                yield
        else:
            raise CnaError(f"unknown steering kind '{steering.kind}'")

    def generate(
        self, prompts: Sequence[str], steering: Steering, max_new_tokens: int, first_logprobs: bool = False
    ) -> list[Generation]:
        with self.steered(steering):
            return greedy_generate(
                self.loaded, prompts, max_new_tokens, self.chat_template, self.system_prompt, self.batch_size,
                first_logprobs,
            )

    def prompt_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        from ..model.prompts import render

        texts = render(self.loaded.tokenizer, prompts, self.chat_template, self.system_prompt)
        return self.loaded.tokenizer(texts, add_special_tokens=not self.chat_template)["input_ids"]

    def score(self, prompts: Sequence[str], continuations: Sequence[Sequence[int]],
              steering: Steering) -> list[np.ndarray]:
        import torch

        if len(prompts) != len(continuations):
            raise ValueError("one continuation per prompt")
        ids = self.prompt_ids(prompts)
        out: list[np.ndarray] = []
        with self.steered(steering), torch.inference_mode():
            for p_ids, cont in zip(ids, continuations):
                seq = list(p_ids) + list(cont[:-1])
                x = torch.tensor([seq], dtype=torch.long, device=self.loaded.input_device)
                logits = self.loaded.model(input_ids=x, use_cache=False).logits[0]
                rows = logits[len(p_ids) - 1 : len(seq)].float().cpu().numpy()
                out.append(log_softmax(rows))
        return out

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------
# llama.cpp
# ---------------------------------------------------------------------------------------

def _has_post_ffn_norm(path: Path) -> bool:
    try:
        from gguf import GGUFReader
    except ImportError:  # pragma: no cover - gguf is a dependency
        return False
    reader = GGUFReader(str(path))
    return any("post_ffw_norm" in t.name or "ffn_post_norm" in t.name for t in reader.tensors)


class LlamaCppBackend:
    """Batched greedy decoding of a GGUF in llama.cpp (see the module docstring)."""

    name = "llama.cpp"

    def __init__(
        self,
        spec: str,
        batch_size: int = 8,
        threads: int | None = None,
        chat_template: bool = True,
        system_prompt: str | None = None,
        tmp_dir: str | Path | None = None,
        lora: str | Path | None = None,
    ):
        from ..io.sources import resolve_source

        source = resolve_source(spec)
        if source.kind != "gguf" or source.path is None:
            raise CnaError(f"the llama.cpp backend needs a .gguf file (got {spec})")
        self.lora_path = Path(lora) if lora else None  # a LoRA adapter GGUF applied to the base at scale 1
        self.spec = spec
        self.path = source.path
        self.batch_size = batch_size
        self.threads = threads or max(1, os.cpu_count() or 1)
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        self.tmp_dir = Path(tmp_dir) if tmp_dir else None
        self.base = LlamaModel(self.path, purpose="the llama.cpp backend")
        self._lora = LlamaLora(self.base, self.lora_path) if self.lora_path else None
        self._template = self.base.meta("tokenizer.chat_template") if chat_template else None
        if chat_template and not self._template:
            raise CnaError(f"{spec} has no chat template (tokenizer.chat_template); pass --no-chat-template for base "
                           "models")
        self._steered: tuple[Any, LlamaModel, Path] | None = None
        self._post_norm: bool | None = None

    # -- prompts -----------------------------------------------------------------------
    def render(self, prompts: Sequence[str]) -> list[str]:
        if not self.chat_template:
            return list(prompts)
        from transformers.utils.chat_template_utils import render_jinja_template

        bos, eos = self.base.bos(), self.base.eos()
        special = dict(
            bos_token=self.base.token_text(bos) if bos >= 0 else "",
            eos_token=self.base.token_text(eos) if eos >= 0 else "",
        )
        convs = []
        for p in prompts:
            msgs = [{"role": "user", "content": p}]
            if self.system_prompt:
                msgs.insert(0, {"role": "system", "content": self.system_prompt})
            convs.append(msgs)
        try:
            rendered, _ = render_jinja_template(
                conversations=convs, chat_template=self._template, add_generation_prompt=True, **special
            )
        except Exception as e:  # jinja errors from an untrusted template
            raise CnaError(f"cannot render the chat template of {self.spec}: {e}") from None
        return list(rendered)

    def prompt_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        ids = [self.base.tokenize(t, add_special=not self.chat_template) for t in self.render(prompts)]
        if any(not x for x in ids):
            raise CnaError("a prompt tokenised to nothing")
        return ids

    # -- steering ----------------------------------------------------------------------
    def _model_for(self, steering: Steering) -> LlamaModel:
        if steering.kind in ("none", "caa"):
            return self.base
        if steering.kind != "cna":
            raise CnaError(f"unknown steering kind '{steering.kind}'")
        key = (tuple(sorted((steering.multipliers or {}).items())),)
        if self._steered is not None and self._steered[0] == key:
            return self._steered[1]
        self._drop_steered()
        try:
            from ..export.gguf import export_gguf
        except ImportError:
            raise CnaError(
                "CNA steering in llama.cpp needs a steered GGUF, and this cna-export has no GGUF export "
                "(cna_export.export.gguf); use --backend transformers (hook steering) instead"
            ) from None
        assert steering.circuit is not None and steering.multipliers is not None
        tmp = Path(tempfile.mkdtemp(prefix="cna-eval-", dir=self.tmp_dir))
        try:
            out = tmp / "steered.gguf"
            import inspect

            params = inspect.signature(export_gguf).parameters
            if steering.multiplier is not None:
                how: dict[str, Any] = {"multiplier": steering.multiplier}
            else:
                how = {"multipliers" if "multipliers" in params else "per_neuron": dict(steering.multipliers)}
            export_gguf(str(self.path), steering.circuit, out, fast_copy=True, modelfile=False, force=steering.force,
                        **how)
            lm = LlamaModel(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._steered = (key, lm, tmp)
        return lm

    def _drop_steered(self) -> None:
        if self._steered is not None:
            _, lm, tmp = self._steered
            lm.close()
            shutil.rmtree(tmp, ignore_errors=True)
            self._steered = None

    def _control_vector(self, steering: Steering) -> np.ndarray | None:
        if steering.kind != "caa":
            return None
        assert steering.vectors is not None
        v = steering.vectors
        if v.shape != (self.base.n_layer, self.base.n_embd):
            raise CnaError(f"CAA vectors are {v.shape[0]} x {v.shape[1]}, the GGUF is "
                           f"{self.base.n_layer} layers x {self.base.n_embd}")
        if self._post_norm is None:
            self._post_norm = _has_post_ffn_norm(self.path)
        if self._post_norm:
            raise CnaError("CAA in llama.cpp adds to the layer output, which differs from the MLP output for "
                           "models with a norm after the MLP (Gemma); use --backend transformers")
        layers = steering.caa_layers()
        if 0 in layers and np.any(v[0] != 0):
            raise CnaError("llama.cpp control vectors cannot steer layer 0; exclude it (CAA layers 1..L-1) "
                           "or use --backend transformers")
        data = np.zeros((self.base.n_layer - 1, self.base.n_embd), dtype=np.float32)
        for layer in layers:
            if layer >= 1:
                data[layer - 1] = v[layer] * steering.alpha
        return data

    # -- generation --------------------------------------------------------------------
    def generate(
        self, prompts: Sequence[str], steering: Steering, max_new_tokens: int, first_logprobs: bool = False
    ) -> list[Generation]:
        lm = self._model_for(steering)
        cvec = self._control_vector(steering)
        ids = self.prompt_ids(prompts)
        out: list[Generation] = []
        for start in range(0, len(ids), self.batch_size):
            out.extend(self._generate_chunk(lm, ids[start : start + self.batch_size], cvec, max_new_tokens,
                                            first_logprobs))
        return out

    def _generate_chunk(
        self, lm: LlamaModel, prompts: list[list[int]], cvec: np.ndarray | None, max_new: int, want_first: bool
    ) -> list[Generation]:
        n = len(prompts)
        longest = max(len(p) for p in prompts)
        total = sum(len(p) for p in prompts)
        ctx = LlamaContext(lm, n, _round_up(longest + max_new + 1, 256), min(total, 2048), self.threads)
        try:
            if self._lora is not None and lm is self.base:
                ctx.set_lora(self._lora, 1.0)
            if cvec is not None:
                ctx.set_control_vector(cvec)
            items = []
            last_item: dict[int, int] = {}
            for s, p in enumerate(prompts):
                for j, t in enumerate(p):
                    if j == len(p) - 1:
                        last_item[s] = len(items)
                    items.append((t, j, s, j == len(p) - 1))
            got = ctx.decode(items)
            logits_of = {s: got[last_item[s]] for s in range(n)}
            tokens: list[list[int]] = [[] for _ in range(n)]
            stopped = [False] * n
            firsts: list[np.ndarray | None] = [None] * n
            active = list(range(n))
            while active and max_new > 0:
                nxt = {}
                for s in active:
                    logits = logits_of[s]
                    if want_first and not tokens[s]:
                        firsts[s] = log_softmax(logits).astype(np.float32)
                    nxt[s] = int(np.argmax(logits))
                still = []
                for s in active:
                    tokens[s].append(nxt[s])
                    if lm.is_eog(nxt[s]):
                        stopped[s] = True
                    elif len(tokens[s]) < max_new:
                        still.append(s)
                active = still
                if not active:
                    break
                step = [(nxt[s], len(prompts[s]) + len(tokens[s]) - 1, s, True) for s in active]
                got = ctx.decode(step)
                logits_of = {s: got[i] for i, s in enumerate(active)}
        finally:
            ctx.close()
        return [Generation(text=lm.detokenize(tokens[s]), tokens=tokens[s], stopped=stopped[s],
                           first_logprobs=firsts[s]) for s in range(n)]

    def score(self, prompts: Sequence[str], continuations: Sequence[Sequence[int]],
              steering: Steering) -> list[np.ndarray]:
        if len(prompts) != len(continuations):
            raise ValueError("one continuation per prompt")
        lm = self._model_for(steering)
        cvec = self._control_vector(steering)
        ids = self.prompt_ids(prompts)
        out: list[np.ndarray] = []
        for p, cont in zip(ids, continuations):
            seq = list(p) + list(cont[:-1])
            first = len(p) - 1
            ctx = LlamaContext(lm, 1, _round_up(len(seq) + 1, 256), min(len(seq), 2048), self.threads)
            try:
                if cvec is not None:
                    ctx.set_control_vector(cvec)
                got = ctx.decode([(t, j, 0, j >= first) for j, t in enumerate(seq)])
                logits = np.stack([got[j] for j in range(first, len(seq))])
            finally:
                ctx.close()
            out.append(log_softmax(logits))
        return out

    def close(self) -> None:
        self._drop_steered()
        if self._lora is not None:
            self._lora.close()
            self._lora = None
        self.base.close()


def _round_up(n: int, k: int) -> int:
    return ((n + k - 1) // k) * k


# ---------------------------------------------------------------------------------------
# Choosing a backend
# ---------------------------------------------------------------------------------------

BACKENDS = ("auto", "transformers", "llama.cpp")


def choose_backend(spec: str, backend: str = "auto") -> str:
    """``auto``: llama.cpp for a GGUF when llama-cpp-python is installed, else transformers."""
    from ..io.sources import resolve_source

    if backend not in BACKENDS:
        raise CnaError(f"unknown backend '{backend}' (choose: {', '.join(BACKENDS)})")
    if backend != "auto":
        return backend
    source = resolve_source(spec)
    if source.kind == "gguf" and llama_available():
        return "llama.cpp"
    return "transformers"


def open_backend(
    spec: str,
    backend: str = "auto",
    batch_size: int | str = 8,
    threads: int | None = None,
    chat_template: bool = True,
    system_prompt: str | None = None,
    model_options: Mapping[str, Any] | None = None,
    loaded: Any = None,
) -> Backend:
    """Open ``spec`` with the chosen backend (an already loaded transformers model may be passed in)."""
    kind = choose_backend(spec, backend)
    if kind == "llama.cpp":
        # llama.cpp decodes the batch's sequences in one context sized for them: "auto" keeps 8
        return LlamaCppBackend(spec, batch_size=8 if batch_size == "auto" else int(batch_size), threads=threads,
                               chat_template=chat_template, system_prompt=system_prompt)
    if loaded is None:
        from ..model.loading import load_model

        loaded = load_model(spec, **dict(model_options or {}))
    if threads:
        import torch

        torch.set_num_threads(threads)
    return TransformersBackend(loaded, spec=spec, batch_size=batch_size, chat_template=chat_template,
                               system_prompt=system_prompt)
