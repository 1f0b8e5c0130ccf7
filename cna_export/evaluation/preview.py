"""The behaviour preview of ``steer``: held-out prompts answered by the unsteered model and by the export.

The prompts are the last ``n`` of each of the recipe's two sets, which discovery did not see
(:func:`hold_out`). Both models answer greedily; the keyword judge counts refusals on the positive set
(refusals) and on the negative set (over-refusals); the first answer token's KL(unsteered || exported) is
averaged per set. The export is run where it runs: a GGUF (or a GGUF LoRA on its base) in llama.cpp against
the source GGUF in llama.cpp, a safetensors folder (or a PEFT adapter on a copy of the base) in transformers
against the source in transformers. The result is a :class:`~cna_export.core.preview.BehaviourPreview`.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np

from ..core.errors import CnaError
from ..core.preview import BehaviourPreview, PreviewAnswer, PreviewSet

Target = Literal["gguf", "gguf-lora", "safetensors", "lora"]
PREFERENCE: tuple[Target, ...] = ("gguf", "gguf-lora", "safetensors", "lora")
"""Which export answers when several were written: llama.cpp first (what most people run), then transformers."""


@dataclass(frozen=True)
class HeldOut:
    """The held-out prompts of the recipe's positive and negative sets (and their files' names)."""

    positive: tuple[str, ...]
    negative: tuple[str, ...]
    positive_file: str
    negative_file: str


@dataclass(frozen=True)
class PreviewRun:
    """How to run the preview: the source model, the export that answers, and the generation settings."""

    model: str
    target: Target
    path: Path
    max_new_tokens: int
    chat_template: bool = True
    system_prompt: str | None = None
    threads: int | None = None


def split_held_out(texts: Sequence[str], n: int, what: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(kept, held)``: the last ``n`` prompts held out, the others kept; at least 2 must be kept."""
    if len(texts) < n + 2:
        raise CnaError(f"--preview {n} holds back {n} prompts of the {what} set, which has only {len(texts)}: "
                       "pass a smaller --preview N or --no-preview")
    return tuple(texts[:-n]), tuple(texts[-n:])


def choose_target(written: dict[str, Path]) -> tuple[Target, Path]:
    """The export that answers (see :data:`PREFERENCE`) among ``written`` (format -> output)."""
    for t in PREFERENCE:
        if t in written:
            return t, written[t]
    raise CnaError("the preview needs an export to answer with")


def _backends(run: PreviewRun, reference: Callable[[], Any]) -> tuple[Any, Any, str, str]:
    """(before, after, their descriptions); ``reference()`` gives the loaded source model (transformers)."""
    from .backends import TransformersBackend
    from .llama_backend import LlamaCppBackend

    common = dict(chat_template=run.chat_template, system_prompt=run.system_prompt)
    if run.target in ("gguf", "gguf-lora"):
        before = LlamaCppBackend(run.model, threads=run.threads, **common)  # type: ignore[arg-type]
        src = before.path.name
        if run.target == "gguf":
            after = LlamaCppBackend(str(run.path), threads=run.threads, **common)  # type: ignore[arg-type]
            return before, after, f"llama.cpp: {src}", f"llama.cpp: {run.path.name}"
        after = LlamaCppBackend(run.model, threads=run.threads, lora=run.path, **common)  # type: ignore[arg-type]
        return before, after, f"llama.cpp: {src}", f"llama.cpp: {src} + LoRA {run.path.name}"
    ref = reference()
    before = TransformersBackend(ref, batch_size=8, **common)  # type: ignore[arg-type]
    if run.target == "safetensors":
        from ..model.loading import load_model

        cand = load_model(str(run.path), dtype=str(ref.dtype).removeprefix("torch."))
        return before, TransformersBackend(cand, batch_size=8, **common), f"transformers: {run.model}", \
            f"transformers: {run.path.name}"  # type: ignore[arg-type]
    try:
        from peft import PeftModel
    except ImportError:
        raise CnaError("the preview of a LoRA adapter needs peft: pip install 'cna-export[lora]'") from None
    base = copy.deepcopy(ref.model)
    cand = dataclasses.replace(ref, model=PeftModel.from_pretrained(base, str(run.path)).eval())
    return before, TransformersBackend(cand, batch_size=8, **common), f"transformers: {run.model}", \
        f"transformers: {run.model} + LoRA {run.path.name}"  # type: ignore[arg-type]


def first_token_kl(before: Sequence[Any], after: Sequence[Any]) -> float:
    """Mean over prompts of KL(before || after) of the first answer token (log-prob rows, the shorter vocab)."""
    kls = []
    for a, b in zip(before, after, strict=True):
        if a is None or b is None:
            continue
        v = min(a.shape[-1], b.shape[-1])
        p, q = np.asarray(a[:v], dtype=np.float64), np.asarray(b[:v], dtype=np.float64)
        kls.append(float(np.sum(np.exp(p) * (p - q))))
    return max(float(np.mean(kls)), 0.0) if kls else 0.0


def _answer(backends: tuple[Any, Any], prompts: Sequence[str], max_new: int) -> tuple[list[Any], list[Any]]:
    from .interventions import Steering

    return [b.generate(list(prompts), Steering.none(), max_new, first_logprobs=True) for b in backends]  # type: ignore


def _set(role: Literal["positive", "negative"], file: str, prompts: Sequence[str], before: list[Any],
         after: list[Any], judge: Any) -> tuple[PreviewSet, list[Any], list[Any]]:
    vb = judge.judge(prompts, [g.text for g in before])
    va = judge.judge(prompts, [g.text for g in after])
    kl = first_token_kl([g.first_logprobs for g in before], [g.first_logprobs for g in after])
    return PreviewSet(role=role, file=file, prompts=len(prompts), refusals_before=sum(v.refused for v in vb),
                      refusals_after=sum(v.refused for v in va), first_token_kl=kl), vb, va


def _example(prompts: Sequence[str], before: list[Any], after: list[Any], vb: list[Any],
             va: list[Any]) -> PreviewAnswer:
    """A prompt whose refusal the steering removed, the one whose refusal comes earliest in its answer (else
    one whose verdict changed, else the first)."""
    def opens(i: int) -> int:
        found = before[i].text.find(vb[i].evidence or "")
        return found if found >= 0 else len(before[i].text)

    n = range(len(prompts))
    removed = sorted((i for i in n if vb[i].refused and not va[i].refused), key=opens)
    i = (removed or [i for i in n if vb[i].refused != va[i].refused] or [0])[0]
    return PreviewAnswer(prompt=prompts[i], before=before[i].text, after=after[i].text,
                         refused_before=vb[i].refused, refused_after=va[i].refused)


def run_preview(run: PreviewRun, held: HeldOut, reference: Callable[[], Any]) -> BehaviourPreview:
    """Answer ``held`` with the unsteered model and the export ``run`` names; the figures of the preview."""
    from .judge import get_judge

    t0 = time.perf_counter()
    before_b, after_b, before_name, after_name = _backends(run, reference)
    try:
        pos = _answer((before_b, after_b), held.positive, run.max_new_tokens)
        neg = _answer((before_b, after_b), held.negative, run.max_new_tokens)
    finally:
        for b in (before_b, after_b):
            b.close()
    judge = get_judge("keyword")
    p_set, rb, ra = _set("positive", held.positive_file, held.positive, *pos, judge)
    n_set, _, _ = _set("negative", held.negative_file, held.negative, *neg, judge)
    return BehaviourPreview(judge=judge.name, unsteered=before_name, steered=after_name,
                            max_new_tokens=run.max_new_tokens, positive=p_set, negative=n_set,
                            example=_example(held.positive, *pos, rb, ra), seconds=time.perf_counter() - t0)
