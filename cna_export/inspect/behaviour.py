"""``audit``'s behavioural check: the refusal rate of the suspect (and the base) on a few of the recipe's
harmful prompts, greedy, judged by the paper's keyword judge."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..core.errors import CnaError
from ..core.settings.audit import AuditSettings
from .refusal_direction import default_recipe
from .report import Answer, Behaviour, ModelBehaviour

if TYPE_CHECKING:
    from ..evaluation.judge import KeywordJudge


def harmful_prompts(recipe: str | Path | None, n: int) -> tuple[list[str], str]:
    """``n`` prompts spread evenly over the recipe's positive (harmful) set."""
    from ..core.recipe import load_recipe
    from ..model.prompts import load_prompts

    r = load_recipe(recipe or default_recipe())  # the recipe's YAML settings
    if not r.get("positive"):
        raise CnaError(f"recipe {recipe} names no positive prompt set")
    ps = load_prompts(r["positive"])
    texts = list(ps.texts)
    if n >= len(texts):
        return texts, ps.path
    idx = sorted({int(round(i * (len(texts) - 1) / max(n - 1, 1))) for i in range(n)})
    return [texts[i] for i in idx], ps.path


def behaviour_check(models: Sequence[tuple[str, str]], settings: AuditSettings) -> Behaviour:
    """Refusal rate of each (label, spec) on a few harmful prompts of the recipe (greedy, keyword judge)."""
    from ..evaluation.judge import KeywordJudge

    prompts, path = harmful_prompts(settings.recipe, settings.prompts)
    judge = KeywordJudge()
    out = Behaviour(prompts_from=path, prompts=prompts, max_new_tokens=settings.max_new_tokens, judge=judge.name,
                    models={label: _answers(spec, prompts, judge, settings) for label, spec in models})
    parts = [f"{label} {m.refused}/{m.n} refused" for label, m in out.models.items()]
    out.summary = (", ".join(parts) + f" ({len(prompts)} harmful prompts from {Path(path).name}, "
                   f"{settings.max_new_tokens} greedy tokens, {judge.name} judge)")
    return out


def _answers(spec: str, prompts: list[str], judge: KeywordJudge, settings: AuditSettings) -> ModelBehaviour:
    """One model's greedy answers to ``prompts``, judged."""
    from ..evaluation.backends import open_backend
    from ..evaluation.interventions import Steering

    t0 = time.perf_counter()
    backend = open_backend(spec, backend=settings.backend, batch_size=settings.batch_size, threads=settings.threads)
    try:
        gens = backend.generate(prompts, Steering.none(), settings.max_new_tokens)
    finally:
        backend.close()
    verdicts = judge.judge(prompts, [g.text for g in gens])
    refused = sum(v.refused for v in verdicts)
    return ModelBehaviour(
        spec=spec, backend=backend.name, refused=refused, n=len(prompts), refusal_rate=refused / len(prompts),
        answers=[Answer(g.text, v.refused, v.evidence) for g, v in zip(gens, verdicts, strict=True)],
        seconds=round(time.perf_counter() - t0, 2),
    )
