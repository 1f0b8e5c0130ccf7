"""Prompt sets: plain text (one prompt per line), JSONL (``field``) or CSV (``column``).

Prompts are rendered the way the paper does: a single user turn through the
tokenizer's chat template with ``add_generation_prompt=True``, or raw text for
base models (``chat_template=False``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..core.circuit import PromptSetInfo
from ..core.errors import CnaError

FIELD_CANDIDATES = ("prompt", "goal", "Goal", "text", "instruction", "question")


@dataclass(frozen=True)
class PromptSet:
    texts: tuple[str, ...]
    path: str
    sha256: str
    selector: str | None = None

    def info(self) -> PromptSetInfo:
        return PromptSetInfo(path=self.path, sha256=self.sha256, count=len(self.texts), selector=self.selector)

    def __len__(self) -> int:
        return len(self.texts)


def _pick(keys: Sequence[str], wanted: str | None, what: str, path: Path) -> str:
    if wanted is not None:
        if wanted not in keys:
            raise CnaError(f"{path}: no {what} '{wanted}' (found: {', '.join(keys) or 'none'})")
        return wanted
    for c in FIELD_CANDIDATES:
        if c in keys:
            return c
    flag = "--field" if what == "field" else "--column"
    raise CnaError(f"{path}: cannot tell which {what} holds the prompt; pass {flag} (found: {', '.join(keys)})")


def load_prompts(
    path: str | Path,
    field: str | None = None,
    column: str | None = None,
    limit: int | None = None,
) -> PromptSet:
    """Read a prompt set; the sha256 covers the file's bytes so the manifest pins exactly what was used."""
    p = Path(path)
    if not p.is_file():
        raise CnaError(f"prompt file not found: {p}")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CnaError(f"prompt file {p} is not UTF-8 text") from None
    suffix = p.suffix.lower()
    selector: str | None = None
    if suffix in (".jsonl", ".ndjson"):
        prompts: list[str] = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CnaError(f"{p}:{n}: not valid JSON ({e.msg})") from None
            if isinstance(row, str):
                prompts.append(row)
                continue
            if not isinstance(row, dict):
                raise CnaError(f"{p}:{n}: expected a JSON object or string")
            selector = selector or _pick(list(row), field, "field", p)
            value = row.get(selector)
            if not isinstance(value, str):
                raise CnaError(f"{p}:{n}: field '{selector}' is missing or not a string")
            prompts.append(value)
    elif suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",")
        if not reader.fieldnames:
            raise CnaError(f"{p}: empty CSV file")
        selector = _pick(list(reader.fieldnames), column, "column", p)
        prompts = [row[selector] for row in reader if (row.get(selector) or "").strip()]
    else:
        prompts = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    prompts = [s.strip() for s in prompts]
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise CnaError(f"prompt file {p} has no prompts")
    return PromptSet(tuple(prompts), str(p), hashlib.sha256(raw).hexdigest(), selector)


def render(tokenizer: Any, prompts: Sequence[str], chat_template: bool = True, system: str | None = None) -> list[str]:
    """Apply the chat template (one user turn, generation prompt) or return the raw prompts."""
    if not chat_template:
        return list(prompts)
    if not getattr(tokenizer, "chat_template", None):
        raise CnaError("this model's tokenizer has no chat template; pass --no-chat-template for base models")
    out = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
        out.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return out


@dataclass
class Batch:
    indices: list[int]
    input_ids: Any
    attention_mask: Any
    position_ids: Any


def batches(
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int | Callable[[int], int],
    chat_template: bool,
    device: Any = "cpu",
    max_length: int | None = None,
    sort_by_length: bool = True,
) -> Iterator[Batch]:
    """Tokenise and yield left-padded batches (longest-first so padding stays small).

    With left padding, the last real token of every row sits at position -1.
    Position ids count real tokens only, so a padded row sees the same positions
    as it would alone. Over-long prompts are cut from the left, keeping the end.
    ``batch_size`` may be a function of the padded width (``--batch-size auto``, see
    :mod:`cna_export.model.batching`): each batch is then as large as that width allows.
    """
    import torch

    if not callable(batch_size) and batch_size < 1:
        raise CnaError("batch size must be at least 1")
    enc = tokenizer(list(texts), add_special_tokens=not chat_template)["input_ids"]
    if max_length:
        enc = [ids[-max_length:] for ids in enc]
    order = list(range(len(enc)))
    if sort_by_length:
        order.sort(key=lambda i: (-len(enc[i]), i))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    start = 0
    while start < len(order):
        if callable(batch_size):
            size = max(1, batch_size(len(enc[order[start]])))
            width = max(len(enc[i]) for i in order[start : start + size])
            while size > 1 and batch_size(width) < size:  # unsorted: a longer prompt further on
                size = max(1, batch_size(width))
                width = max(len(enc[i]) for i in order[start : start + size])
        else:
            size = batch_size
        idx = order[start : start + size]
        start += len(idx)
        width = max(len(enc[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            seq = enc[i]
            if not seq:
                raise CnaError("a prompt tokenised to nothing")
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        yield Batch(idx, ids.to(device), mask.to(device), pos.to(device))


def token_count(tokenizer: Any, texts: Sequence[str], chat_template: bool) -> int:
    return sum(len(x) for x in tokenizer(list(texts), add_special_tokens=not chat_template)["input_ids"])
