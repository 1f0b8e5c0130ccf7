"""Command verify (safetensors and GGUF)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..core.progress import wanted
from ..core.settings.base import ModelOptions
from ..core.settings.verify import GGUFVerifyOptions, VerifyRunOptions
from .flags import add_flags, settings_of
from .paths import guard


def cmd_verify(ns: argparse.Namespace) -> int:
    from ..core.atomic import atomic_write_text
    from ..core.errors import VerificationFailed
    from ..pipeline import verify

    run: VerifyRunOptions = settings_of(ns, VerifyRunOptions)
    guard(ns, run, overwrite=run.overwrite)
    t0 = time.perf_counter()
    report = verify(ns.original, ns.exported, settings_of(ns, GGUFVerifyOptions), prompt_files=run.prompts,
                    model_options=settings_of(ns, ModelOptions), progress=wanted(ns.quiet), reference=ns.reference)
    if ns.json:
        atomic_write_text(Path(ns.json), report.to_json() + "\n", overwrite=run.overwrite)
    if not ns.quiet:
        print(report.render(per_prompt=run.per_prompt))
        print(f"time         {time.perf_counter() - t0:.1f}s" + (f"; wrote {ns.json}" if ns.json else ""))
    if report.verdict == "inconclusive":  # not a failure: the tensors are exact, the prompts too few to decide
        from ..verification.report import inconclusive_exit

        return inconclusive_exit([report], "nothing changed")
    if not report.passed:
        raise VerificationFailed("verification failed: " + "; ".join(report.reasons))
    return 0


def add_verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--original", required=True, help="the model the export was made from (folder, .gguf, bundled:NAME)")
    p.add_argument("--exported", required=True, help="the exported folder (with cna_manifest.json)")
    p.add_argument("--json", metavar="FILE", help="also write the full report as JSON")
    p.add_argument("--reference", metavar="HF_MODEL",
                   help="GGUF exports: a Hugging Face model with the source's weights, run in transformers with hook "
                        "steering instead of the source GGUF (for families whose GGUF transformers cannot load: "
                        "Mixtral, OLMoE, DeepSeek)")
    add_flags(p, VerifyRunOptions)
    add_flags(p, GGUFVerifyOptions)
    add_flags(p, ModelOptions, skip=("dtype",))
