"""Verify as a classifier (issue 21): how often does ``verify`` fail an exact export, and does it catch faults?

    python bench/verify_classifier.py                   # every case (hours on two busy cores; resumable)
    python bench/verify_classifier.py --only Q8_0       # the cases whose name contains Q8_0
    python bench/verify_classifier.py --table           # only rebuild the table from the rows already measured

**Exact exports** (false failures): the bundled SmolLM2-135M-Instruct Q4_1 GGUF, an F32 file made from it and
that F32 file re-quantised by llama.cpp's own quantiser (``io.llama.quantize_gguf``) to Q8_0, Q6_K, Q5_K_M,
Q4_K_M, Q4_0 and Q3_K_M; each exported as ``gguf`` and ``gguf-lora`` at multipliers 0, 0.2, 2 and -1, with
circuits of 10, 50, 200 and 500 neurons (the strongest of one 500-neuron refusal circuit found on SmolLM2),
plus ``safetensors`` and ``lora`` of the Q4_1 file. Each goes through ``cna_export.pipeline.export(...,
verify=True)`` with the ``verify`` defaults, as ``export --verify`` runs it: a VerificationFailed is a false
failure; an inconclusive verify (written, exit 7) is counted apart.

**Planted faults** (detection): a correct export, edited in place afterwards (a wrong row, the multiplier
0.2 written as 0.3, the fold on the gate or the down side, a transposed block, every index off by one, a
tenth of the neurons or a whole layer left out, the sign flipped, a tokenizer or rope KV changed, a
manifest that claims another multiplier; for adapters: alpha x2 and x0.5, lora_b x2, a layer zeroed, the
rank rows of lora_a permuted, two layers' factors swapped), then ``verify_gguf``: the table says whether the
tensor check, the behaviour check (run regardless) and the verdict caught it.

The unsteered logits (transformers plain, llama.cpp on the source) do not depend on the export: they are
computed once per source file and prompt and reused (the same numbers ``verify`` computes; each process
computes them once). Rows go to ``bench/out/verify_classifier/rows.jsonl`` as they are measured (a rerun
skips them), the table to ``bench/results/verify_classifier/`` (``table.md``, ``rows.json``) and stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import _verify_faults as faults  # noqa: E402
from bench._common import behaviour_figures, log  # noqa: E402

OUT = ROOT / "bench" / "out" / "verify_classifier"
RESULTS = ROOT / "bench" / "results" / "verify_classifier"
CIRCUIT = ROOT / "bench" / "out" / "smollm2-refusal-500.json"
QUANTS = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M")
MULTIPLIERS = (0.0, 0.2, 2.0, -1.0)
SIZES = (10, 50, 200, 500)


@dataclass
class Case:
    name: str
    source: str  # a key of sources()
    fmt: str  # gguf, gguf-lora, safetensors, lora
    multiplier: float
    size: int
    fault: str | None = None  # a key of faults.PLANTS


@dataclass
class Row:
    name: str
    kind: str  # exact, fault
    source: str
    fmt: str
    multiplier: float
    neurons: int
    fault: str
    verdict: str  # passed, inconclusive, failed
    tensors: str  # exact, caught, -
    behaviour: str  # pass, fail, undecided, -
    prompts: int
    seconds: float
    reasons: str
    failed_checks: list[str] = field(default_factory=list)  # the labels of the checks that failed
    behaviour_metrics: dict[str, float] = field(default_factory=dict)  # _common.BEHAVIOUR_KEYS of the report


def sources(threads: int) -> dict[str, Path]:
    """The GGUF files: SmolLM2's Q4_1, an F32 copy made by llama.cpp, and that copy re-quantised."""
    from cna_export.io.bundled import smollm2_path
    from cna_export.io.llama import quantize_gguf

    OUT.mkdir(parents=True, exist_ok=True)
    out = {"Q4_1": smollm2_path(), "F32": OUT / "smollm2-F32.gguf"}
    if not out["F32"].is_file():
        quantize_gguf(out["Q4_1"], OUT / "tmp-F32.gguf", "F32", threads, requantize=True).rename(out["F32"])
    for q in QUANTS:
        out[q] = OUT / f"smollm2-{q}.gguf"
        if not out[q].is_file():
            quantize_gguf(out["F32"], OUT / f"tmp-{q}.gguf", q, threads).rename(out[q])
    return out


def circuit_for(src: Path, size: int):
    """The ``size`` strongest neurons of the 500-neuron circuit, as a circuit of ``src`` (its identity)."""
    from cna_export.core.circuit import Circuit
    from cna_export.io import gguf as G
    from cna_export.io.identity import gguf_identity

    if not CIRCUIT.is_file():
        import subprocess

        subprocess.run([sys.executable, "-m", "cna_export", "-q", "discover", "--model", "bundled:smollm2", "--recipe",
                        str(ROOT / "recipes" / "refusal.yaml"), "--top-k", "500", "--limit", "24", "--out",
                        str(CIRCUIT)], check=True)  # fmt: skip
    c = Circuit.load(CIRCUIT)
    neurons = sorted(c.neurons, key=lambda n: -abs(n.score))[:size]
    counts: dict[int, int] = {}
    for n in neurons:
        counts[n.layer] = counts.get(n.layer, 0) + 1
    return c.model_copy(update={"neurons": neurons, "per_layer_counts": counts,
                                "model": gguf_identity(G.open_gguf(src), str(src))})  # fmt: skip


def exact_cases() -> list[Case]:
    cases = []
    for i, src in enumerate(("Q4_1", "F32") + QUANTS):
        for fmt in ("gguf", "gguf-lora"):
            for j, m in enumerate(MULTIPLIERS):
                size = SIZES[(i + j + (fmt == "gguf-lora")) % len(SIZES)]
                cases.append(Case(f"{src} {fmt} x{m:g} {size}n", src, fmt, m, size))
    for fmt in ("safetensors", "lora"):
        for j, m in enumerate(MULTIPLIERS):
            size = SIZES[j]
            cases.append(Case(f"Q4_1 {fmt} x{m:g} {size}n", "Q4_1", fmt, m, size))
    return cases


def fault_cases() -> list[Case]:
    spec = [("wrong_row", "Q4_1", "gguf", 0.0, 50), ("wrong_row", "Q4_K_M", "gguf", 2.0, 200),
            ("multiplier_0.3_for_0.2", "Q8_0", "gguf", 0.2, 200), ("multiplier_0.3_for_0.2", "Q4_K_M", "gguf", 0.2, 50),
            ("fold_on_gate", "Q4_1", "gguf", 2.0, 50), ("fold_on_gate", "Q6_K", "gguf", -1.0, 200),
            ("fold_on_down_manifest_up", "F32", "gguf", 0.2, 50), ("transposed_block", "Q4_1", "gguf", 0.0, 50),
            ("transposed_block", "Q8_0", "gguf", 2.0, 200), ("index_off_by_one", "Q4_1", "gguf", 0.0, 200),
            ("index_off_by_one", "Q5_K_M", "gguf", 2.0, 50), ("tenth_left_out", "Q3_K_M", "gguf", 0.0, 200),
            ("layer_unsteered", "Q6_K", "gguf", 2.0, 50), ("sign_flipped", "F32", "gguf", 2.0, 50),
            ("tokenizer_kv", "Q4_1", "gguf", 0.0, 50), ("rope_base_kv", "Q4_0", "gguf", -1.0, 50),
            ("manifest_claims_0.3", "Q4_1", "gguf", 0.2, 50), ("adapter_alpha_x2", "Q4_1", "gguf-lora", 0.0, 50),
            ("adapter_alpha_x0.5", "Q6_K", "gguf-lora", 2.0, 50), ("lora_b_x2", "Q8_0", "gguf-lora", 0.2, 200),
            ("lora_layer_zeroed", "Q4_K_M", "gguf-lora", 2.0, 200),
            ("lora_a_rank_permuted", "Q5_K_M", "gguf-lora", -1.0, 50),
            ("lora_layers_swapped", "Q4_1", "gguf-lora", 0.0, 200)]  # fmt: skip
    return [Case(f"{f} ({src} {fmt} x{m:g} {size}n)", src, fmt, m, size, f) for f, src, fmt, m, size in spec]


class Memo:
    """The unsteered logits of the current source (transformers plain, llama.cpp), and its loaded model."""

    def __init__(self) -> None:
        import cna_export.model.loading as loading
        import cna_export.verification.gguf_behaviour as B

        self.B, self.loading = B, loading
        self.real_llama, self.real_plain, self.real_load = B.llama_logits, B.plain_logits, loading.load_model
        self.source: Path | None = None
        self.llama: dict = {}
        self.plain: dict = {}
        self.models: dict = {}
        B.llama_logits, B.plain_logits, loading.load_model = self.llama_logits, self.plain_logits, self.load_model

    def use(self, source: Path) -> None:
        if source != self.source:
            self.source, self.llama, self.plain, self.models = source, {}, {}, {}

    def llama_logits(self, path, ids, threads=2, purpose="verifying a GGUF export", lora=None):
        if lora is not None or Path(path) != self.source:
            return self.real_llama(path, ids, threads, purpose, lora=lora)
        todo = [s for s in ids if tuple(s) not in self.llama]
        for s, x in zip(todo, self.real_llama(path, todo, threads, purpose) if todo else [], strict=True):
            self.llama[tuple(s)] = x
        return [self.llama[tuple(s)] for s in ids]

    def plain_logits(self, loaded, ids):
        key = (str(loaded.source.spec), tuple(ids))
        if key not in self.plain:
            self.plain[key] = self.real_plain(loaded, ids)
        return self.plain[key]

    def load_model(self, spec, **kw):
        if not str(spec).endswith(".gguf") or kw:
            return self.real_load(spec, **kw)
        if spec not in self.models:
            self.models[spec] = self.real_load(spec)
        return self.models[spec]


def _outcome(report) -> tuple[str, str, str]:
    """Verdict, tensor check (exact / caught / -) and behaviour (pass / fail / undecided / -) of a report."""
    tensors = "-"
    for c in report.checks:
        if c.label.startswith(("tensors and KV pairs exact", "adapter tensors exact")):
            tensors = "exact" if c.ok else "caught"
    rows = [c for c in report.checks if c.ok is not None or c.undecided]
    rows = [c for c in rows if not c.label.startswith(("tensors and KV", "adapter tensors"))]
    behaviour = "-" if not rows else "fail" if any(c.ok is False for c in rows) else \
        "undecided" if any(c.undecided for c in rows) else "pass"  # fmt: skip
    return report.verdict, tensors, behaviour


def run_case(case: Case, srcs: dict[str, Path], memo: Memo, threads: int) -> Row:
    from cna_export.core.errors import VerificationFailed
    from cna_export.core.settings import GGUFVerifyOptions
    from cna_export.pipeline import export
    from cna_export.verification.gguf import verify_gguf

    src = srcs[case.source]
    memo.use(src)
    opts = GGUFVerifyOptions(threads=threads)
    suffix = ".gguf" if case.fmt.startswith("gguf") else ""
    out = OUT / "exports" / (case.name.replace(" ", "_").replace("(", "").replace(")", "") + suffix)
    out.parent.mkdir(parents=True, exist_ok=True)
    fmt_opts = {"modelfile": False} if case.fmt.startswith("gguf") else {}
    t0 = time.perf_counter()
    if case.fault is None:
        try:
            report = export(str(src), circuit_for(src, case.size), out, format=case.fmt, verify=True,
                            verify_options=opts, multiplier=case.multiplier, overwrite=True, **fmt_opts).verification
        except VerificationFailed as e:
            report = e.report  # type: ignore[attr-defined]
    else:
        export(str(src), circuit_for(src, case.size), out, format=case.fmt, multiplier=case.multiplier,
               overwrite=True, **fmt_opts)  # fmt: skip
        faults.PLANTS[case.fault](out, src)
        report = verify_gguf(str(src), out, opts)
    verdict, tensors, behaviour = _outcome(report)
    _remove(out)
    widened = [n for n in report.notes if n.startswith("prompts widened")]
    return Row(case.name, "fault" if case.fault else "exact", case.source, case.fmt, case.multiplier, case.size,
               case.fault or "", verdict, tensors, behaviour, int(report.metrics.get("prompts", 0)),
               round(time.perf_counter() - t0, 1), "; ".join(report.reasons + report.undecided + widened)[:300],
               [c.label for c in report.checks if c.ok is False], behaviour_figures(report.metrics))


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _upper(k: int, n: int, level: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound of a rate, k events in n."""
    from scipy.stats import beta

    return 1.0 if k >= n else float(beta.ppf(level, k + 1, n - k))


def table(rows: list[Row]) -> str:
    """The markdown table: false failures, inconclusive exports, faults caught, claimed vs measured rate."""
    from cna_export.verification.stats import FALSE_ALARM

    exact = [r for r in rows if r.kind == "exact"]
    gguf = [r for r in exact if r.fmt.startswith("gguf")]
    fault = [r for r in rows if r.kind == "fault"]
    ff = sum(r.verdict == "failed" for r in exact)
    ff_b = sum(r.behaviour == "fail" for r in gguf)
    lines = [
        "| | N | verify FAILED (exit 3) | inconclusive (written, exit 7) | passed |",
        "|---|---|---|---|---|",
        f"| exact exports | {len(exact)} | {ff} false failures | {sum(r.verdict == 'inconclusive' for r in exact)} "
        f"| {sum(r.verdict == 'passed' for r in exact)} |",
        f"| planted faults | {len(fault)} | {sum(r.verdict == 'failed' for r in fault)} caught "
        f"(tensor check {sum(r.tensors == 'caught' for r in fault)}, behaviour check "
        f"{sum(r.behaviour == 'fail' for r in fault)}) | {sum(r.verdict == 'inconclusive' for r in fault)} "
        f"| {sum(r.verdict == 'passed' for r in fault)} missed |",
        "",
        f"Behaviour check false-alarm rate (an exact GGUF export failed on behaviour): claimed at most "
        f"{FALSE_ALARM:.0%}; measured {ff_b}/{len(gguf)}"
        + (f" (95% upper bound {_upper(ff_b, len(gguf)):.1%})" if gguf else "") + ". Prompts the exact GGUF "
        "exports needed: " + ", ".join(f"{n} for {sum(r.prompts == n for r in gguf)}"
                                       for n in sorted({r.prompts for r in gguf})) + ".",
        "",
        "| case | verdict | tensors | behaviour | prompts | seconds | reasons |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in exact + fault:
        lines.append(f"| {r.name} | {r.verdict} | {r.tensors} | {r.behaviour} | {r.prompts} | {r.seconds:.0f} | "
                     f"{r.reasons[:140].replace('|', '/')} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", help="run only the cases whose name contains this (repeatable)")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp and torch threads (default 1: busy cores)")
    ap.add_argument("--table", action="store_true", help="rebuild the table from the rows measured, run nothing")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    done_file = OUT / "rows.jsonl"
    rows = [Row(**json.loads(line)) for line in done_file.read_text().splitlines()] if done_file.is_file() else []
    if not args.table:
        import torch

        torch.set_num_threads(args.threads)
        srcs, memo, done = sources(args.threads), Memo(), {r.name for r in rows}
        cases = [c for c in exact_cases() + fault_cases()
                 if c.name not in done and (not args.only or any(o in c.name for o in args.only))]
        # one source at a time (its unsteered logits are reused), the transformers formats last
        cases.sort(key=lambda c: (not c.fmt.startswith("gguf"), list(srcs).index(c.source)))
        for i, case in enumerate(cases, 1):
            row = run_case(case, srcs, memo, args.threads)
            rows.append(row)
            with done_file.open("a") as fh:
                fh.write(json.dumps(asdict(row)) + "\n")
            log(f"{i}/{len(cases)} {row.name}: {row.verdict} (tensors {row.tensors}, behaviour {row.behaviour}, "
                f"{row.prompts} prompts, {row.seconds:.0f}s) {row.reasons[:200]}")  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = table(rows)
    (RESULTS / "table.md").write_text(text + "\n")
    (RESULTS / "rows.json").write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
