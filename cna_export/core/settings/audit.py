"""Settings of show, diff and audit: :class:`ShowOptions`, :class:`DiffOptions` and :class:`AuditSettings`."""

from __future__ import annotations

from typing import Literal

from ..outputs import InputFile, InputPath, OutputPath
from .base import Overwrite, _Options, opt

RANK1_SHARE = 0.95  # top singular value's share of a change's energy for a "rank-1" edit


class ShowOptions(_Options):
    """Listing"""

    top: int = opt(10, "list this many neurons (0: none)", ge=0)


class DiffOptions(Overwrite):
    """Comparison"""

    top: int = opt(20, "list this many changed tensors", ge=0)
    rank1_share: float = opt(RANK1_SHARE, "top singular value's share of a change's energy that makes it a rank-1 edit")
    rank_k: int = opt(4, "low-rank directional edits: rank counted from the top k singular values of a change",
                      ge=1, le=64)


class AuditSettings(Overwrite):
    """Audit"""

    base: InputPath = opt(
        None, "the model the suspect may have been made from (diff, refusal-circuit overlap, behaviour)")
    manifest: InputFile = opt(None, "check that exactly this export manifest's edits were made (no FILE: the "
                               "embedded one)", nargs="?", const="embedded", metavar="FILE")
    recipe: InputFile = opt(None, "discovery recipe for the base's refusal circuit and the harmful prompts "
                             "(default: the bundled recipes/refusal.yaml)")
    circuit: InputFile = opt(None, "the base's refusal circuit, already discovered (skips discovery)")
    stats: InputFile = opt(None, "the base's discovery statistics: read when FILE exists (checked against the base's "
                            "weights and the recipe), else computed and saved there, so later audits against the same "
                            "base skip discovery", metavar="FILE")
    discover: bool = opt(True, "skip the refusal-circuit overlap", flag="--no-discover")
    generate: bool = opt(True, "skip the behavioural check", flag="--no-generate")
    prompts: int = opt(8, "harmful prompts for the behavioural check", ge=1)
    max_new_tokens: int = opt(40, "greedy tokens per answer")
    backend: Literal["auto", "transformers", "llama.cpp"] = opt(
        "auto", "generation backend (auto: llama.cpp for GGUF files when installed)")
    threads: int | None = opt(None, "CPU threads for generation")
    batch_size: int = opt(8, "prompts per generation batch")
    zero_threshold: float = opt(1e-3, "base-free: flag weights with norm below this x the layer median", gt=0)
    direction_threshold: float = opt(1e-3, "base-free: list the layers whose writers' smallest eigenvalue is below "
                                     "this x the median (reported; the verdict uses the calibrated eigenvalue gap)",
                                     gt=0)
    rank1_share: float = opt(RANK1_SHARE, "as for diff")
    rank_k: int = opt(4, "as for diff", ge=1, le=64)
    refusal_direction: bool = opt(True, "skip the refusal directions (cosine with a directional edit; base-free "
                                  "depletion score)", flag="--no-refusal-direction")
    directions: InputFile = opt(None, "refusal directions (mean residual, harmful - benign, per layer) of the base "
                                 "(or, without a base, of the suspect): read when FILE exists (checked against the "
                                 "weights and the recipe's prompts), else computed and saved there", metavar="FILE")
    direction_prompts: int = opt(32, "harmful and benign prompts each for the refusal directions", ge=2)
    depletion_threshold: float = opt(0.05, "base-free, reported only: a window of layers' writers writing a "
                                     "direction below this x a typical direction (smallest / median eigenvalue)",
                                     gt=0)
    write_threshold: float = opt(0.8, "base-free, reported only: a window of layers' writers writing the suspect's "
                                 "own refusal direction below this x a typical direction's energy", gt=0)
    plot: OutputPath = opt(None, "write the directional edit's per-layer strength profile as a PNG", metavar="FILE")
    save_direction: OutputPath = opt(None, "write the directional edit's consensus direction (.npy or "
                                     ".safetensors)", metavar="FILE")
