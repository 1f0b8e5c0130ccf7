"""Batched greedy generation with transformers (left padding), used by ``generate``, verify and eval."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..core.numerics import log_softmax
from .batching import AUTO, memory_model
from .prompts import render


@dataclass
class Generation:
    """One greedy answer: text (special tokens dropped), generated ids, and whether it hit end-of-sequence."""

    text: str
    tokens: list[int]
    stopped: bool
    first_logprobs: np.ndarray | None = None  # [vocab] float32, log-probs of the first answer token


def _eos_ids(loaded: Any) -> set[int]:
    ids: set[int] = set()
    cfg = getattr(loaded.model, "generation_config", None)
    eos = getattr(cfg, "eos_token_id", None) if cfg is not None else None
    if eos is None:
        eos = loaded.tokenizer.eos_token_id
    if isinstance(eos, int):
        ids.add(eos)
    elif eos is not None:
        ids.update(int(e) for e in eos)
    return ids


def greedy_generate(
    loaded: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    chat_template: bool = True,
    system_prompt: str | None = None,
    batch_size: int | str = 8,
    first_logprobs: bool = False,
) -> list[Generation]:
    """Greedy continuations of ``prompts`` (in order), cut after the first end-of-sequence token, with
    their token ids and (``first_logprobs``) the log-probs of the first answer token. Steering hooks
    active around the call apply."""
    import torch

    tok = loaded.tokenizer
    texts = render(tok, prompts, chat_template, system_prompt)
    if batch_size == AUTO:  # one size for all: generation is not sorted by length (answers keep their order)
        longest = max((len(x) for x in tok(list(texts), add_special_tokens=not chat_template)["input_ids"]), default=1)
        batch_size = memory_model(loaded, logits=True, cache=True).fits(longest + max_new_tokens)
    eos = _eos_ids(loaded)
    old_side = tok.padding_side
    tok.padding_side = "left"
    out: list[Generation] = []
    try:
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=not chat_template)
            enc = {k: v.to(loaded.input_device) for k, v in enc.items()}
            with torch.inference_mode():
                res = loaded.model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=tok.pad_token_id,
                    return_dict_in_generate=True,
                    output_logits=first_logprobs,
                )
            new = res.sequences[:, enc["input_ids"].shape[1] :].tolist()
            for row, ids in enumerate(new):
                cut = len(ids)
                stopped = False
                for j, t in enumerate(ids):
                    if t in eos:
                        cut, stopped = j + 1, True
                        break
                ids = ids[:cut]
                lp = None
                if first_logprobs:
                    lp = log_softmax(res.logits[0][row].float().cpu().numpy()).astype(np.float32)
                text = tok.decode(ids, skip_special_tokens=True)
                out.append(Generation(text=text, tokens=[int(t) for t in ids], stopped=stopped, first_logprobs=lp))
    finally:
        tok.padding_side = old_side
    return out




def generate(
    loaded: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    chat_template: bool = True,
    system_prompt: str | None = None,
    batch_size: int | str = 8,
) -> list[str]:
    """The texts of :func:`greedy_generate` (special tokens dropped)."""
    gens = greedy_generate(loaded, prompts, max_new_tokens, chat_template, system_prompt, batch_size)
    return [g.text for g in gens]
