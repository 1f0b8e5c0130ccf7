"""Batched greedy generation with transformers (left padding), used by ``generate``, verify and eval."""

from __future__ import annotations

from typing import Any, Sequence

from .prompts import render


def generate(
    loaded: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    chat_template: bool = True,
    system_prompt: str | None = None,
    batch_size: int = 8,
    skip_special_tokens: bool = True,
) -> list[str]:
    """Greedy continuations of ``prompts`` (in order); steering hooks active around the call apply."""
    import torch

    tok = loaded.tokenizer
    texts = render(tok, prompts, chat_template, system_prompt)
    old_side = tok.padding_side
    tok.padding_side = "left"
    out: list[str] = []
    try:
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=not chat_template)
            enc = {k: v.to(loaded.input_device) for k, v in enc.items()}
            with torch.inference_mode():
                ids = loaded.model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=tok.pad_token_id,
                )
            new = ids[:, enc["input_ids"].shape[1] :]
            out.extend(tok.batch_decode(new, skip_special_tokens=skip_special_tokens))
    finally:
        tok.padding_side = old_side
    return out
