"""Evaluation backends: greedy generation and next-token log-probabilities, steered or not.

Two backends implement the same small interface (:class:`Backend`):

``transformers`` (:class:`TransformersBackend`)
    Any model :func:`cna_export.model.loading.load_model` loads (HF folder, Hub id,
    dequantised GGUF, an exported steered folder). CNA steering is the hook
    steering of :mod:`cna_export.model.steering`; CAA adds ``alpha * v[layer]`` to the
    output of every layer's ``down_proj`` at every position (the paper's
    ``steer_caa``). Batched greedy generation with left padding
    (:func:`cna_export.model.generation.greedy_generate`).

``llama.cpp`` (:class:`cna_export.evaluation.llama_backend.LlamaCppBackend`)
    A GGUF file through llama-cpp-python's C API, much faster on CPU: several prompts decoded
    together, CNA through a temporarily exported steered GGUF, CAA through llama.cpp control
    vectors (see :mod:`cna_export.evaluation.llama_backend`).

The :class:`~cna_export.evaluation.interventions.Steering` record and the
:class:`~cna_export.evaluation.interventions.Backend` interface are in
:mod:`cna_export.evaluation.interventions`.

Both backends return, per prompt, the generated text and token ids and (on
request) the log-probabilities of the first answer token, and can score a given
continuation (teacher forcing) for KL drift.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from ..core.errors import CnaError
from ..io.llama import llama_available
from ..model.generation import Generation, greedy_generate
from .interventions import Backend, Steering
from .llama_backend import LlamaCppBackend
from .metrics import log_softmax

log = logging.getLogger(__name__)


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
