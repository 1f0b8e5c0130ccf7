"""The behaviour preview record: what a steered export does to prompts discovery never saw, measured.

``steer`` holds back prompts of each recipe set from discovery, answers them greedily with the unsteered
model and with the exported model, and keeps the figures here: refusals before and after (keyword
judge) on the recipe's positive set, over-refusal before and after on its negative set, the first
answer token's KL(unsteered || exported), and one answer side by side. ``steer.json`` stores it
(``preview``), the steer folder's model card shows it, and ``steer`` prints it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

PREVIEW_SCHEMA_VERSION = 1


class PreviewSet(BaseModel):
    """One held-out prompt set, answered before and after steering."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["positive", "negative"]
    file: str
    prompts: int = Field(ge=0)
    refusals_before: int = Field(ge=0)
    refusals_after: int = Field(ge=0)
    first_token_kl: float = Field(ge=0)
    """Mean over the prompts of KL(unsteered || exported) of the first answer token's distribution (nats)."""


class PreviewAnswer(BaseModel):
    """One held-out prompt answered by both models."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    before: str
    after: str
    refused_before: bool
    refused_after: bool


class BehaviourPreview(BaseModel):
    """The preview of one ``steer`` run (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = PREVIEW_SCHEMA_VERSION
    judge: str = "keyword"
    unsteered: str
    """What answered before: the runtime and the model (``llama.cpp: model.gguf``)."""
    steered: str
    """What answered after: the runtime and the export (``llama.cpp: gguf/model-steered.gguf``)."""
    max_new_tokens: int = Field(gt=0)
    positive: PreviewSet
    negative: PreviewSet
    example: PreviewAnswer
    seconds: float = Field(ge=0)

    def lines(self, width: int = 100) -> list[str]:
        """The preview as ``steer`` prints it."""
        p, n, e = self.positive, self.negative, self.example
        return [
            f"behaviour preview: {p.prompts} + {n.prompts} prompts held out of discovery, greedy, "
            f"{self.max_new_tokens} tokens, {self.judge} judge; before: {self.unsteered}; after: {self.steered}",
            f"  refusals       {p.refusals_before}/{p.prompts} -> {p.refusals_after}/{p.prompts}   ({p.file})",
            f"  over-refusals  {n.refusals_before}/{n.prompts} -> {n.refusals_after}/{n.prompts}   ({n.file})",
            f"  first-token KL {p.first_token_kl:.3f} nats ({p.role} set), {n.first_token_kl:.3f} ({n.role} set)",
            f"  prompt: {_clip(e.prompt, width)}",
            f"  before{' (refuses)' if e.refused_before else ''}: {_clip(e.before, width)}",
            f"  after{' (refuses)' if e.refused_after else ''}:  {_clip(e.after, width)}",
        ]

    def card_lines(self) -> list[str]:
        """The model card's "Behaviour" section (Markdown)."""
        p, n, e = self.positive, self.negative, self.example
        return [
            "## Behaviour (measured)", "",
            f"{p.prompts} prompts of the recipe's positive set and {n.prompts} of its negative set, held out of "
            f"discovery, answered greedily ({self.max_new_tokens} tokens) by the unsteered model ({self.unsteered}) "
            f"and by this export ({self.steered}); refusals by the {self.judge} judge.", "",
            "| | before | after |", "|---|---|---|",
            f"| refusals ({p.file}) | {p.refusals_before}/{p.prompts} | {p.refusals_after}/{p.prompts} |",
            f"| over-refusals ({n.file}) | {n.refusals_before}/{n.prompts} | {n.refusals_after}/{n.prompts} |",
            f"| first-token KL vs unsteered, {p.role} / {n.role} set (nats) | 0 | {p.first_token_kl:.4f} / "
            f"{n.first_token_kl:.4f} |",
            "",
            "One held-out prompt, answered before and after:", "",
            _quote(e.prompt), "",
            f"**Before**{' (refuses)' if e.refused_before else ''}:", "", _quote(e.before), "",
            f"**After**{' (refuses)' if e.refused_after else ''}:", "", _quote(e.after), "",
        ]


def _clip(text: str, width: int) -> str:
    one = " ".join(text.split())
    return one if len(one) <= width else one[: width - 3] + "..."


def _quote(text: str) -> str:
    return "> " + (" ".join(text.split()) or "(empty)")
