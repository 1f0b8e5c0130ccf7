"""The llama.cpp evaluation backend: batched greedy decoding of a GGUF, steered or not.

A GGUF file through llama-cpp-python's C API (:mod:`cna_export.io.llama`), much faster on CPU. Several
prompts are decoded together (one KV sequence each, one ``llama_decode``
per step), greedy (argmax of the logits). CNA steering needs steered
weights: the circuit is folded into a temporary copy of the GGUF with
:func:`cna_export.export.gguf.export_gguf` (``fast_copy``) and that file is
loaded. CAA uses llama.cpp control vectors, which are added to the output
of layers 1..L-1 (llama.cpp has no control vector for layer 0); for
architectures without a norm after the MLP this is exactly the hook CAA on
those layers. Prompts are rendered with the GGUF's own chat template
(``tokenizer.chat_template``) through transformers' Jinja renderer, so it sees
the same prompt text as the transformers backend (:mod:`cna_export.evaluation.backends`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..core.errors import CnaError
from ..io.llama import LlamaContext, LlamaLora, LlamaModel
from ..model.generation import Generation
from .interventions import Steering
from .metrics import log_softmax


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
