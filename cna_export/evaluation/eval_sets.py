"""The prompt sets of an evaluation: JBB-Behaviors or custom files, and the seeded tuning split.

The harmful and benign sets default to JailbreakBench's JBB-Behaviors, read
from ``$CNA_JBB_DIR`` or ``<repo>/../shared/data/jbb`` (``harmful-behaviors.csv``
and ``benign-behaviors.csv``), else from the Hub dataset
``JailbreakBench/JBB-Behaviors`` (config ``behaviors``) through ``datasets``.
A benign prompt is the twin of the harmful prompt with the same index.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..core.errors import CnaError

JBB_ENV = "CNA_JBB_DIR"
JBB_FILES = {"harmful": "harmful-behaviors.csv", "benign": "benign-behaviors.csv"}
JBB_HUB = ("JailbreakBench/JBB-Behaviors", "behaviors")


# ---------------------------------------------------------------------------------------
# Prompt sets
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    index: int
    prompt: str
    category: str | None = None
    behavior: str | None = None


@dataclass
class EvalSet:
    name: str
    items: list[Item]
    source: str
    sha256: str | None = None

    @property
    def prompts(self) -> list[str]:
        return [it.prompt for it in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, indices: Sequence[int]) -> "EvalSet":
        keep = set(indices)
        return EvalSet(self.name, [it for it in self.items if it.index in keep], self.source, self.sha256)

    def head(self, n: int | None) -> "EvalSet":
        return self if n is None else EvalSet(self.name, self.items[:n], self.source, self.sha256)

    def info(self) -> dict:
        return {"source": self.source, "sha256": self.sha256, "count": len(self.items)}


def jbb_dir_candidates(explicit: str | Path | None = None) -> list[Path]:
    out: list[Path] = []
    if explicit:
        out.append(Path(explicit))
    if os.environ.get(JBB_ENV):
        out.append(Path(os.environ[JBB_ENV]))
    repo = Path(__file__).resolve().parents[2]
    out.append(repo.parent / "shared" / "data" / "jbb")
    out.append(Path.cwd().parent / "shared" / "data" / "jbb")
    return out


def _read_jbb_csv(path: Path, name: str) -> EvalSet:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CnaError(f"{path} is not UTF-8 text") from None
    reader = csv.DictReader(io.StringIO(text))
    fields = reader.fieldnames or []
    if "Goal" not in fields:
        raise CnaError(f"{path} has no 'Goal' column (found: {', '.join(fields) or 'none'})")
    items = []
    for n, row in enumerate(reader):
        try:
            index = int(row["Index"]) if row.get("Index") not in (None, "") else n
        except ValueError:
            raise CnaError(f"{path}: row {n + 1} has a non-integer Index") from None
        goal = (row.get("Goal") or "").strip()
        if goal:
            items.append(Item(index, goal, row.get("Category") or None, row.get("Behavior") or None))
    if not items:
        raise CnaError(f"{path} has no prompts")
    return EvalSet(name, items, str(path), hashlib.sha256(raw).hexdigest())


def load_jbb(jbb_dir: str | Path | None = None) -> tuple[EvalSet, EvalSet]:
    """JBB-Behaviors harmful and benign sets (same ``Index`` = matched pair)."""
    for d in jbb_dir_candidates(jbb_dir):
        files = {k: d / v for k, v in JBB_FILES.items()}
        if all(f.is_file() for f in files.values()):
            return _read_jbb_csv(files["harmful"], "harmful"), _read_jbb_csv(files["benign"], "benign")
        if jbb_dir and d == Path(jbb_dir):
            raise CnaError(f"--jbb-dir {jbb_dir} does not hold {' and '.join(JBB_FILES.values())}")
    return _load_jbb_hub()


def _load_jbb_hub() -> tuple[EvalSet, EvalSet]:
    try:
        import datasets
    except ImportError:
        raise CnaError(
            "JBB-Behaviors not found: set CNA_JBB_DIR (or --jbb-dir) to a folder with harmful-behaviors.csv and "
            "benign-behaviors.csv, or pip install 'cna-export[datasets]' to read "
            "JailbreakBench/JBB-Behaviors from the Hub"
        ) from None
    name, config = JBB_HUB
    out = []
    for split in ("harmful", "benign"):
        try:
            ds = datasets.load_dataset(name, config, split=split)
        except Exception as e:  # offline, missing, ... : one line for the user
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CnaError(
                f"cannot load the Hub dataset {name} ({config}/{split}): {first}; set CNA_JBB_DIR or --jbb-dir "
                "to local CSV files (offline?)"
            ) from None
        items = [
            Item(int(row.get("Index", n)), str(row["Goal"]).strip(), row.get("Category"), row.get("Behavior"))
            for n, row in enumerate(ds)
        ]
        out.append(EvalSet(split, items, f"hf://datasets/{name}/{config}/{split}", getattr(ds, "_fingerprint", None)))
    return out[0], out[1]


def load_eval_set(path: str | Path, name: str, field: str | None = None, column: str | None = None) -> EvalSet:
    """A custom prompt set (text, JSONL or CSV); items are numbered in file order (pairs match by position)."""
    from ..model.prompts import load_prompts

    ps = load_prompts(path, field=field, column=column)
    return EvalSet(name, [Item(i, p) for i, p in enumerate(ps.texts)], ps.path, ps.sha256)


def split_pairs(harmful: EvalSet, benign: EvalSet | None, tune_size: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Seeded split of the pair indices into (tuning, held-out); a benign twin follows its harmful prompt."""
    idx = [it.index for it in harmful.items]
    if benign is not None:
        twins = {it.index for it in benign.items}
        idx = [i for i in idx if i in twins] + [i for i in idx if i not in twins]
    if not 0 < tune_size < len(idx):
        raise CnaError(f"--tune-size must be between 1 and {len(idx) - 1} (the harmful set has {len(idx)} prompts)")
    order = sorted(idx)
    random.Random(seed).shuffle(order)
    tune = sorted(order[:tune_size])
    return tune, sorted(order[tune_size:])
