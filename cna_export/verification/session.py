"""One model, many verifications: what ``steer`` shares between the verifications of its formats.

Each format is still verified against the same reference with the same criteria; only the expensive
parts that do not depend on the export are done once:

* the reference model in transformers is loaded once per dtype (or adopted from discovery);
* the transformers logits of the verification prompts, unsteered and hook-steered, are computed once
  per prompt (per multipliers) and reused by every verification that asks for the same prompt;
* llama.cpp's logits of the source GGUF (the noise floor's other side) are computed once per chunk of
  prompts and reused by the GGUF and GGUF LoRA verifications;
* the hook-steered reference's batched logits and greedy answers (the safetensors and PEFT LoRA
  comparison) are computed once per prompt list and reused.

Cached values are the very tensors the first verification computed, so a reused value is exactly what a
fresh computation on the same machine gives. Caches are bounded by ``budget`` bytes: beyond it, values are
computed again instead of kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, Sequence

DEFAULT_BUDGET = 1 << 30  # bytes of cached logits (1 GiB)


def multipliers_key(multipliers: Mapping[tuple[int, int], float] | None) -> tuple:
    """A hashable identity of a multiplier map."""
    return tuple(sorted((multipliers or {}).items()))


def _nbytes(value: Any) -> int:
    if hasattr(value, "nbytes"):
        return int(value.nbytes)
    if hasattr(value, "element_size") and hasattr(value, "nelement"):
        return int(value.element_size() * value.nelement())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


@dataclass
class ReferenceRun:
    """The hook-steered reference of one batched comparison: per prompt index, its logits at the real
    positions, and the greedy answers (None when none were generated)."""

    logits: dict[int, Any]
    greedy: list[str] | None = None


@dataclass
class VerifySession:
    """Shared verification work of one ``steer`` run (see the module docstring).

    ``spec``: the source model; ``model_options``: how transformers loads it (less the dtype)."""

    spec: str
    model_options: dict[str, Any] = field(default_factory=dict)
    budget: int = DEFAULT_BUDGET
    models: dict[str, Any] = field(default_factory=dict)  # dtype -> LoadedModel
    load_seconds: float = 0.0
    hits: int = 0
    misses: int = 0
    _cache: dict[Hashable, Any] = field(default_factory=dict, repr=False)
    _used: int = 0

    def adopt(self, loaded: Any) -> None:
        """Use an already loaded model of ``spec`` (discovery's) as the reference in its dtype."""
        self.models[str(loaded.dtype).removeprefix("torch.")] = loaded

    def reference(self, dtype: str | None = None) -> Any:
        """The reference model of ``spec`` in ``dtype`` (None: the loader's default), loaded once."""
        import time

        from ..model.loading import load_model, resolve_dtype

        name = str(resolve_dtype(dtype or "auto", self.model_options.get("device_map"))).removeprefix("torch.")
        if name not in self.models:
            t0 = time.perf_counter()
            self.models[name] = load_model(self.spec, dtype=name, **self.model_options)
            self.load_seconds += time.perf_counter() - t0
        return self.models[name]

    def serves(self, spec: str | Path | Any) -> bool:
        """Whether ``spec`` (a model spec or a loaded model) names this session's model."""
        name = spec if isinstance(spec, (str, Path)) else getattr(getattr(spec, "source", None), "spec", None)
        return name is not None and str(name) == self.spec

    def cached(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """``compute()``'s value for ``key``, computed once while the budget allows keeping it."""
        if key in self._cache:
            self.hits += 1
            return self._cache[key]
        self.misses += 1
        value = compute()
        size = _nbytes(value)
        if self._used + size <= self.budget:
            self._cache[key] = value
            self._used += size
        return value

    def reference_run(self, key: Hashable) -> ReferenceRun | None:
        run = self._cache.get(("reference-run", key))
        if run is not None:
            self.hits += 1
        return run

    def keep_run(self, key: Hashable, run: ReferenceRun) -> None:
        size = sum(_nbytes(v) for v in run.logits.values())
        if self._used + size <= self.budget:
            self._cache[("reference-run", key)] = run
            self._used += size

    def forget(self) -> None:
        """Drop the cached logits (the models stay loaded)."""
        self._cache.clear()
        self._used = 0

    def llama_source_logits(self, path: Path, ids: Sequence[Sequence[int]], threads: int) -> list[Any]:
        """llama.cpp's logits of the source GGUF for ``ids`` (:func:`cna_export.io.llama.llama_logits`), once."""
        from ..io.llama import llama_logits

        key = ("llama", str(Path(path).resolve()), threads, tuple(tuple(int(t) for t in s) for s in ids))
        return self.cached(key, lambda: llama_logits(path, ids, threads))
