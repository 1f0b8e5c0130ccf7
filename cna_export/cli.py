"""Command line: a thin layer over the library API.

Every sub-command parses flags (generated from the options models), calls one
library function and prints a summary. User errors end as one line on stderr
and a non-zero exit code; see ``docs/exit-codes.md``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from . import __version__
from .errors import NOTHING_FITS, CnaError
from .options import DiscoverOptions, ModelOptions, PromptOptions, add_flags, build, flags_of, load_recipe

log = logging.getLogger("cna_export")

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str) -> Callable:
    def deco(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = fn
        return fn

    return deco


# -- discover -------------------------------------------------------------------------


@command("discover")
def cmd_discover(ns: argparse.Namespace) -> int:
    from .discovery import discover
    from .io.atomic import check_output_path
    from .models import load_model
    from .prompts import load_prompts

    recipe = load_recipe(ns.recipe) if ns.recipe else {}
    opts: DiscoverOptions = build(DiscoverOptions, recipe, flags_of(ns, DiscoverOptions))
    mopts: ModelOptions = build(ModelOptions, recipe, flags_of(ns, ModelOptions))
    if not opts.positive or not opts.negative:
        raise CnaError("discover needs --positive and --negative prompt files (or a --recipe that names them)")
    check_output_path(Path(ns.out), ns.overwrite)
    sel = dict(field=opts.field, column=opts.column, limit=opts.limit)
    positive = load_prompts(opts.positive, **sel)
    negative = load_prompts(opts.negative, **sel)
    neutral = load_prompts(opts.neutral, limit=opts.limit) if opts.neutral else None
    t0 = time.perf_counter()
    loaded = load_model(ns.model, **mopts.model_dump())
    t_load = time.perf_counter() - t0
    result = discover(loaded, positive, negative, neutral, opts, progress=not ns.quiet)
    circuit = result.circuit
    circuit.save(ns.out, overwrite=ns.overwrite)
    if not ns.quiet:
        reports = result.stats.reports
        total = sum(r.seconds for r in reports.values())
        prompts = sum(r.prompts for r in reports.values())
        print(f"model        {ns.model} ({loaded.arch.model_type}, {loaded.num_layers} layers x "
              f"{loaded.intermediate_size} neurons, loaded in {t_load:.1f}s)")
        print(f"prompts      {len(positive)} positive, {len(negative)} negative"
              + (f", {len(neutral)} neutral" if neutral else ""))
        print(f"capture      {prompts} prompts in {total:.1f}s ({prompts / total:.1f} prompts/s, batch {opts.batch_size})")
        print(f"universal    {len(circuit.universal_neurons)} neurons excluded "
              f"(top-{opts.universal_top_k} on >= {opts.universal_threshold:.0%} of neutral prompts)"
              if neutral else "universal    no neutral set: filter not applied")
        print(f"circuit      {len(circuit.neurons)} neurons ({len(circuit.neurons) / (loaded.num_layers * loaded.intermediate_size):.3%} of all)")
        print("per layer    " + " ".join(f"L{k}:{v}" for k, v in circuit.layer_counts().items()))
        print(f"wrote        {ns.out}")
    return 0


def _discover_parser(sub: Any) -> None:
    p = sub.add_parser("discover", help="find a CNA circuit from two contrastive prompt sets")
    p.add_argument("--model", required=True, help="HF folder, Hub id, .gguf file, or bundled:smollm2")
    p.add_argument("--out", required=True, help="circuit manifest to write (JSON)")
    p.add_argument("--recipe", help="YAML recipe supplying these settings (CLI flags win)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_flags(p, DiscoverOptions)
    add_flags(p, ModelOptions)


# -- generate -------------------------------------------------------------------------


@command("generate")
def cmd_generate(ns: argparse.Namespace) -> int:
    from .circuit import Circuit, check_multiplier
    from .generation import generate
    from .models import load_model
    from .steering import steer_circuit

    circuit = Circuit.load(ns.circuit) if ns.circuit else None
    if circuit is None and ns.multiplier is not None:
        raise CnaError("--multiplier needs --circuit")
    if ns.multiplier is not None:
        check_multiplier(ns.multiplier)
    popts: PromptOptions = build(PromptOptions, flags_of(ns, PromptOptions))
    mopts: ModelOptions = build(ModelOptions, flags_of(ns, ModelOptions))
    loaded = load_model(ns.model, **mopts.model_dump())
    if circuit is not None:
        for note in circuit.check_fits(loaded.identity(), force=ns.force):
            log.warning(note)
    prompts = list(ns.prompt)
    gen = dict(max_new_tokens=ns.max_new_tokens, chat_template=popts.chat_template,
               system_prompt=popts.system_prompt, batch_size=popts.batch_size)
    with steer_circuit(loaded, circuit, ns.multiplier):
        steered = generate(loaded, prompts, **gen)
    base = generate(loaded, prompts, **gen) if ns.compare and circuit is not None else None
    for i, prompt in enumerate(prompts):
        if len(prompts) > 1 or base is not None:
            print(f"### prompt: {prompt}")
        if base is not None:
            print("--- unsteered ---")
            print(base[i])
            print(f"--- steered (x{ns.multiplier if ns.multiplier is not None else 'per-neuron'}) ---")
        print(steered[i])
    return 0


def _generate_parser(sub: Any) -> None:
    p = sub.add_parser("generate", help="greedy generation with hook steering, for a quick look")
    p.add_argument("prompt", nargs="+", help="one or more prompts")
    p.add_argument("--model", required=True, help="HF folder, Hub id, .gguf file, or bundled:smollm2")
    p.add_argument("--circuit", help="circuit manifest (omit to generate unsteered)")
    p.add_argument("--multiplier", type=float, help="multiplier for every circuit neuron (default: the circuit's own)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--compare", action="store_true", help="also print the unsteered continuation")
    p.add_argument("--force", action="store_true", help="apply a circuit found on different weights")
    add_flags(p, PromptOptions, skip=("field", "column", "max_length"))
    add_flags(p, ModelOptions)


# -- show -----------------------------------------------------------------------------


@command("show")
def cmd_show(ns: argparse.Namespace) -> int:
    from .circuit import Circuit

    c = Circuit.load(ns.circuit)
    m = c.model
    print(f"circuit      {ns.circuit} ({c.kind}, schema {c.schema_version}, cna-export {c.tool_version}, {c.created})")
    print(f"model        {m.name} ({m.architecture}, {m.num_layers} x {m.intermediate_size}, "
          f"fingerprint {(m.fingerprint or 'none')[:16]})")
    if c.method:
        print("method       " + ", ".join(f"{k}={v}" for k, v in c.method.items()))
    for name, ps in c.prompts.items():
        print(f"prompts      {name}: {ps.count} from {ps.path} (sha256 {ps.sha256[:12]})")
    print(f"neurons      {len(c.neurons)}; universal excluded: {len(c.universal_neurons)}")
    print("per layer    " + " ".join(f"L{k}:{v}" for k, v in c.layer_counts().items()))
    for n in c.neurons[: ns.top]:
        print(f"  L{n.layer:<3d} #{n.index:<6d} score {n.score:+.4f}"
              + (f"  pos {n.positive_mean:+.4f} neg {n.negative_mean:+.4f}" if n.positive_mean is not None else "")
              + (f"  x{n.multiplier}" if n.multiplier is not None else ""))
    return 0


def _show_parser(sub: Any) -> None:
    p = sub.add_parser("show", help="summarise a circuit manifest")
    p.add_argument("circuit")
    p.add_argument("--top", type=int, default=10, help="list this many neurons")


PARSERS = [_discover_parser, _generate_parser, _show_parser]


# -- export / verify (safetensors) ------------------------------------------------------


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@command("export")
def cmd_export(ns: argparse.Namespace) -> int:
    from .circuit import check_multiplier
    from .export import export_safetensors
    from .verify import VerifyOptions

    if _gguf_export_requested(ns):
        return _cmd_export_gguf(ns)
    if ns.fold == "up" or ns.fast_copy or ns.no_modelfile:
        raise CnaError("--fold up, --fast-copy and --no-modelfile apply to GGUF exports (--format gguf)")
    if ns.multiplier is not None:
        check_multiplier(ns.multiplier)
    vopts = build(VerifyOptions, flags_of(ns, VerifyOptions))
    r = export_safetensors(
        ns.model, ns.circuit, ns.out, multiplier=ns.multiplier, multipliers=ns.multipliers,
        overwrite=ns.overwrite, link=ns.link, force=ns.force, verify=ns.verify, verify_options=vopts,
        prompt_files=ns.prompts, dtype=ns.convert_dtype, max_shard_size=ns.max_shard_size,
        allow_pickle=ns.allow_pickle, trust_remote_code=ns.trust_remote_code,
        progress=not ns.quiet and sys.stderr.isatty(),
    )
    if not ns.quiet:
        m = r.manifest
        values = sorted({x.multiplier for x in m.multipliers})
        print(f"source       {ns.model}" + (" (converted to safetensors)" if r.converted else ""))
        print(f"circuit      {len(m.circuit.neurons)} neurons in {len(m.circuit.layer_counts())} layers; multiplier "
              + (f"{values[0]:g}" if len(values) == 1 else f"per-neuron ({values[0]:g} .. {values[-1]:g})"))
        print(f"shards       {len(r.rewritten_shards)} rewritten, {len(r.copied_shards)} "
              + ("hard-linked" if r.linked else "copied") + f"; {len(r.other_files)} other files copied")
        if r.left_out:
            print(f"left out     {', '.join(r.left_out)} (weights that would not carry the steering)")
        for note in m.notes:
            print(f"note         {note}")
        if r.verification is not None:
            print(r.verification.render())
        else:
            print("verify       not run (pass --verify, or run cna-export verify)")
        print(f"wrote        {r.out} ({_size(r.total_bytes)}) in {r.seconds:.1f}s")
    return 0


def _export_parser(sub: Any) -> None:
    from .verify import VerifyOptions

    p = sub.add_parser("export", help="fold a circuit into the weights and write a steered safetensors checkpoint or GGUF file")
    p.add_argument("--model", required=True, help="HF safetensors folder, Hub id, .gguf file, or bundled:smollm2")
    p.add_argument("--circuit", required=True, help="circuit manifest (JSON)")
    p.add_argument("--out", required=True, help="output folder (safetensors) or .gguf file (--format gguf), written atomically")
    p.add_argument("--multiplier", type=float, help="multiplier for every circuit neuron (default: the circuit's own)")
    p.add_argument("--multipliers", metavar="FILE", help='per-neuron multipliers: {"layer:index": m} or [{layer, index, multiplier}]')
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--link", action="store_true", help="hard-link untouched shards instead of copying them (same filesystem)")
    p.add_argument("--force", action="store_true", help="apply a circuit found on different weights")
    p.add_argument("--verify", action="store_true", help="verify against hook steering before writing (exit 3 and no output if it fails)")
    p.add_argument("--prompts", action="append", metavar="FILE", help="verification prompts (repeatable; default: the refusal recipe's)")
    p.add_argument("--dtype", dest="convert_dtype", default="auto",
                   help="dtype of a converted GGUF/pickled source: auto (float32 for GGUF), float32, bfloat16, float16")
    p.add_argument("--max-shard-size", help="shard size of a converted source, e.g. 2GB (default: transformers')")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickled .bin/.pt weights (can run arbitrary code)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint")
    add_flags(p, VerifyOptions, skip=("dtype",))
    _gguf_export_flags(p)


def _finish_verify(ns: argparse.Namespace, report: Any, t0: float) -> int:
    """Write ``--json``, print the report, exit 3 when it failed."""
    from .errors import VerificationFailed
    from .io.atomic import atomic_write_text

    if ns.json:
        atomic_write_text(Path(ns.json), report.to_json() + "\n", overwrite=ns.overwrite)
    if not ns.quiet:
        print(report.render(per_prompt=ns.per_prompt))
        print(f"time         {time.perf_counter() - t0:.1f}s" + (f"; wrote {ns.json}" if ns.json else ""))
    if not report.passed:
        raise VerificationFailed("verification failed: " + "; ".join(report.reasons))
    return 0


@command("verify")
def cmd_verify(ns: argparse.Namespace) -> int:
    from .io.atomic import check_output_path
    from .verify import VerifyOptions, verify_export

    if Path(ns.exported).suffix.lower() == ".gguf":
        return _cmd_verify_gguf(ns)
    vopts = build(VerifyOptions, flags_of(ns, VerifyOptions))
    mopts = build(ModelOptions, {k: v for k, v in flags_of(ns, ModelOptions).items() if k != "dtype"})
    if ns.json:
        check_output_path(Path(ns.json), ns.overwrite)
    t0 = time.perf_counter()
    report = verify_export(ns.original, ns.exported, vopts, prompt_files=ns.prompts,
                           model_options=mopts.model_dump(exclude={"dtype"}),
                           progress=not ns.quiet and sys.stderr.isatty())
    return _finish_verify(ns, report, t0)


def _verify_parser(sub: Any) -> None:
    from .verify import VerifyOptions

    p = sub.add_parser("verify", help="check an exported checkpoint against hook steering of the original")
    p.add_argument("--original", required=True, help="the model the export was made from (folder, .gguf, bundled:NAME)")
    p.add_argument("--exported", required=True, help="the exported folder (with cna_manifest.json)")
    p.add_argument("--prompts", action="append", metavar="FILE", help="prompt files (repeatable; default: the refusal recipe's)")
    p.add_argument("--json", metavar="FILE", help="also write the full report as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--per-prompt", action="store_true", help="print one line per prompt")
    add_flags(p, VerifyOptions)
    add_flags(p, ModelOptions, skip=("dtype",))
    _gguf_verify_flags(p)


PARSERS += [_export_parser, _verify_parser]


# -- export / verify (GGUF) -------------------------------------------------------------


def _gguf_export_requested(ns: argparse.Namespace) -> bool:
    return ns.format == "gguf" or (ns.format is None and str(ns.out).lower().endswith(".gguf"))


def _gguf_export_flags(p: argparse.ArgumentParser) -> None:
    from .verify import VerifyOptions
    from .verify_gguf import GGUFVerifyOptions

    g = p.add_argument_group("GGUF export")
    g.add_argument("--format", choices=["safetensors", "gguf"],
                   help="output format (default: gguf when --out ends in .gguf, else safetensors)")
    g.add_argument("--fold", choices=["up", "down"],
                   help="GGUF: scale ffn_up rows (default; any supported quant type) or ffn_down columns (float only)")
    g.add_argument("--fast-copy", action="store_true",
                   help="GGUF: copy the file and patch the touched rows in place; header unchanged, manifest in <out>.cna_manifest.json")
    g.add_argument("--no-modelfile", action="store_true", help="GGUF: do not write an Ollama Modelfile beside the output")
    add_flags(p, GGUFVerifyOptions, skip=tuple(VerifyOptions.model_fields))


def _gguf_verify_flags(p: argparse.ArgumentParser) -> None:
    from .verify import VerifyOptions
    from .verify_gguf import GGUFVerifyOptions

    add_flags(p, GGUFVerifyOptions, skip=tuple(VerifyOptions.model_fields))


def _cmd_export_gguf(ns: argparse.Namespace) -> int:
    from .circuit import check_multiplier
    from .gguf_export import export_gguf
    from .verify_gguf import GGUFVerifyOptions

    if ns.link or ns.max_shard_size:
        raise CnaError("--link and --max-shard-size apply to safetensors exports, not GGUF")
    if ns.multiplier is not None:
        check_multiplier(ns.multiplier)
    vopts = build(GGUFVerifyOptions, flags_of(ns, GGUFVerifyOptions))
    r = export_gguf(
        ns.model, ns.circuit, ns.out, multiplier=ns.multiplier, multipliers=ns.multipliers, fold=ns.fold or "up",
        fast_copy=ns.fast_copy, overwrite=ns.overwrite, force=ns.force, modelfile=not ns.no_modelfile,
        verify=ns.verify, verify_options=vopts, prompt_files=ns.prompts,
        progress=not ns.quiet and sys.stderr.isatty(),
    )
    if not ns.quiet:
        m = r.manifest
        values = sorted({x.multiplier for x in m.multipliers})
        types = sorted({t.dtype for t in m.tensors})
        print(f"source       {ns.model}")
        print(f"circuit      {len(m.multipliers)} neurons in {len({x.layer for x in m.multipliers})} layers; multiplier "
              + (f"{values[0]:g}" if len(values) == 1 else f"per-neuron ({values[0]:g} .. {values[-1]:g})"))
        print(f"folded       {len(m.tensors)} tensors ({', '.join(types)}), "
              + ("ffn_up rows" if m.fold == "up" else "ffn_down columns") + "; every other tensor and KV pair unchanged")
        for w in r.warnings:
            print(f"warning      {w}")
        print("manifest     " + (str(r.manifest_path) if r.manifest_path else f"cna.manifest KV in {r.out.name}"))
        if r.modelfile:
            print(f"ollama       {r.modelfile}")
        print(r.verification.render() if r.verification is not None
              else "verify       not run (pass --verify, or run cna-export verify)")
        print(f"wrote        {r.out} ({_size(r.out.stat().st_size)}) in {r.seconds:.1f}s"
              + (" (fast copy)" if r.fast_copy else ""))
    return 0


def _cmd_verify_gguf(ns: argparse.Namespace) -> int:
    from .io.atomic import check_output_path
    from .verify_gguf import GGUFVerifyOptions, verify_gguf

    vopts = build(GGUFVerifyOptions, flags_of(ns, GGUFVerifyOptions))
    if ns.json:
        check_output_path(Path(ns.json), ns.overwrite)
    t0 = time.perf_counter()
    report = verify_gguf(ns.original, ns.exported, vopts, prompt_files=ns.prompts,
                         progress=not ns.quiet and sys.stderr.isatty())
    return _finish_verify(ns, report, t0)


# -- eval / tune --------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None


def _eval_job(ns: argparse.Namespace) -> Any:
    from .eval_jobs import EvalJob
    from .evaluate import EvalSettings

    popts: PromptOptions = build(PromptOptions, flags_of(ns, PromptOptions))
    mopts: ModelOptions = build(ModelOptions, flags_of(ns, ModelOptions))
    settings = EvalSettings(max_new_tokens=ns.max_new_tokens, kl_tokens=ns.kl_tokens, judge=ns.judge,
                            benign=not ns.no_benign, benign_answers=not ns.benign_kl_only,
                            benign_max_new_tokens=ns.benign_max_new_tokens)
    return EvalJob(
        model=ns.model, out=ns.out, settings=settings, backend=ns.backend, circuit=getattr(ns, "circuit", None),
        multiplier=getattr(ns, "multiplier", None), force=ns.force, harmful=ns.harmful, benign=ns.benign,
        jbb_dir=ns.jbb_dir, field=popts.field, column=popts.column, limit=ns.limit, recipe=ns.recipe,
        stats=ns.stats, batch_size=popts.batch_size, threads=ns.threads, chat_template=popts.chat_template,
        system_prompt=popts.system_prompt, model_options=mopts.model_dump(), overwrite=ns.overwrite,
        quiet=ns.quiet, progress=not ns.quiet and sys.stderr.isatty(),
    )


@command("eval")
def cmd_eval(ns: argparse.Namespace) -> int:
    from .eval_jobs import run_eval_job

    job = _eval_job(ns)
    job.reference = ns.reference
    job.sweep_multipliers = ns.sweep_multipliers
    job.sweep_fractions = ns.sweep_fractions
    job.caa_alphas = ns.caa_alphas
    job.caa_layers = ns.caa_layers
    report = run_eval_job(job)
    if not ns.quiet:
        from .evaluate import markdown_table

        print(markdown_table(report["conditions"]), end="")
    return 0


def _eval_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF folder, Hub id, .gguf file, or bundled:NAME")
    p.add_argument("--out", required=True, help="output folder (summary.json, summary.md, generations.jsonl, ...)")
    p.add_argument("--backend", default="auto", choices=["auto", "transformers", "llama.cpp"],
                   help="auto: llama.cpp for a GGUF when llama-cpp-python is installed, else transformers")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--harmful", help="harmful prompt file (default: JBB-Behaviors harmful)")
    p.add_argument("--benign", help="benign prompt file, twins of --harmful by position (default: JBB benign)")
    p.add_argument("--jbb-dir", help="folder with JBB harmful-behaviors.csv / benign-behaviors.csv "
                   "(default: $CNA_JBB_DIR, then <repo>/../shared/data/jbb, then the Hub)")
    p.add_argument("--no-benign", action="store_true", help="skip the benign set (no over-refusal or KL)")
    p.add_argument("--benign-kl-only", action="store_true",
                   help="score benign prompts for KL only (no answers: no over-refusal or benign quality; much faster)")
    p.add_argument("--benign-max-new-tokens", type=int,
                   help="answer length on the benign set (default: --max-new-tokens)")
    p.add_argument("--limit", type=int, help="use the first N harmful prompts (and their twins)")
    p.add_argument("--max-new-tokens", type=int, default=150, help="greedy answer length (default: 150, as the paper)")
    p.add_argument("--kl-tokens", type=int, default=0,
                   help="also average KL over the first N tokens of the unsteered answer (default: 0, first token only)")
    p.add_argument("--judge", default="keyword", help="refusal judge: keyword (the paper's regex) or phrases")
    p.add_argument("--recipe", help="discovery recipe, for circuit sizes (--sweep-fractions) and CAA")
    p.add_argument("--stats", help="discovery statistics .npz: read if it exists, else computed from --recipe and saved")
    p.add_argument("--force", action="store_true", help="apply a circuit found on different weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_flags(p, PromptOptions, skip=("max_length",))
    add_flags(p, ModelOptions)


def _eval_parser(sub: Any) -> None:
    p = sub.add_parser("eval", help="refusal, over-refusal, quality and KL drift; multiplier/size sweeps; CAA baseline")
    _eval_common(p)
    p.add_argument("--circuit", help="circuit manifest to steer with")
    p.add_argument("--multiplier", type=float, help="multiplier for every circuit neuron (default: the circuit's own)")
    p.add_argument("--reference", help="evaluate --model (e.g. an export) against this unsteered model instead")
    p.add_argument("--sweep-multipliers", type=_floats, metavar="M,M,...", help="e.g. 1,0.5,0,-0.5,2")
    p.add_argument("--sweep-fractions", type=_floats, metavar="F,F,...",
                   help="circuit sizes as fractions of all MLP neurons (needs --recipe or --stats)")
    p.add_argument("--caa-alphas", type=_floats, metavar="A,A,...",
                   help="CAA baseline strengths (negative: against the positive set; needs --recipe or --stats)")
    p.add_argument("--caa-layers", help="layers CAA steers: all (default) or e.g. 1-23 (llama.cpp cannot steer layer 0)")


@command("tune")
def cmd_tune(ns: argparse.Namespace) -> int:
    from .eval_jobs import TuneJob, run_tune_job

    job = _eval_job(ns)
    if not ns.recipe and not ns.stats:
        raise CnaError("tune needs --recipe (discovery settings) or --stats from an earlier run")
    t = TuneJob(eval=job, fractions=ns.fractions, multipliers=ns.multipliers, tune_size=ns.tune_size, seed=ns.seed,
                quality_ratio=ns.quality_ratio, max_kl=None if ns.max_kl < 0 else ns.max_kl,
                kl_metric=ns.kl_metric, quality_metric=ns.quality_metric, heldout=not ns.no_heldout)
    report = run_tune_job(t)
    if report["chosen"] is None:
        print(f"cna-export: no configuration met the constraints; see {ns.out}/tune.md", file=sys.stderr)
        return NOTHING_FITS
    if not ns.quiet:
        ch = report["chosen"]
        print(f"chosen       top_k {ch['neurons']} ({100 * ch['fraction']:.3g}%), multiplier {ch['multiplier']:g}")
        print(f"recipe       {ns.out}/recipe.yaml")
    return 0


def _tune_parser(sub: Any) -> None:
    p = sub.add_parser("tune", help="choose circuit size and multiplier on a tuning split; check on the held-out split")
    _eval_common(p)
    p.add_argument("--fractions", type=_floats, default=[0.001, 0.0025, 0.005], metavar="F,F,...",
                   help="circuit sizes to try (default: 0.001,0.0025,0.005)")
    p.add_argument("--multipliers", type=_floats, default=[0.0, 0.5, -0.5], metavar="M,M,...",
                   help="multipliers to try (default: 0,0.5,-0.5)")
    p.add_argument("--tune-size", type=int, default=30, help="harmful prompts (and twins) in the tuning split (default: 30)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tuning/held-out split (default: 0)")
    p.add_argument("--quality-ratio", type=float, default=0.97,
                   help="keep quality >= this x the unsteered model's on the tuning prompts (default: 0.97)")
    p.add_argument("--max-kl", type=float, default=0.25, help="benign KL bound in nats; negative: none (default: 0.25)")
    p.add_argument("--kl-metric", default="kl_last", choices=["kl_last", "kl_gen"],
                   help="which KL the bound applies to (kl_gen needs --kl-tokens)")
    p.add_argument("--quality-metric", default="harmful", choices=["harmful", "compliant", "benign"],
                   help="quality the bound applies to: all harmful answers (default), the harmful answers not judged "
                   "refusals (a short refusal scores 1.0, so fewer refusals lower the mean), or benign answers")
    p.add_argument("--no-heldout", action="store_true", help="skip the held-out check")


PARSERS += [_eval_parser, _tune_parser]


# -- diff / audit ---------------------------------------------------------------------------


def _check_outputs(ns: argparse.Namespace, inputs: tuple[str | None, ...]) -> None:
    from .io.atomic import check_output_path
    from .models import resolve_source

    paths = tuple(p for p in (resolve_source(x).path for x in inputs if x) if p is not None)
    for out in (getattr(ns, "json", None), getattr(ns, "out_circuit", None)):
        if out:
            check_output_path(Path(out), ns.overwrite, paths)


def _write_json(path: str, data: dict, overwrite: bool) -> None:
    import json

    from .io.atomic import atomic_write_text

    atomic_write_text(Path(path), json.dumps(data, indent=2, default=str) + "\n", overwrite=overwrite)


@command("diff")
def cmd_diff(ns: argparse.Namespace) -> int:
    from .audit import write_recovered_circuit
    from .diff import diff_checkpoints

    if not 0 < ns.rank1_share <= 1:
        raise CnaError("--rank1-share must be in (0, 1]")
    _check_outputs(ns, (ns.a, ns.b))
    report = diff_checkpoints(ns.a, ns.b, rank1_share=ns.rank1_share, progress=not ns.quiet and sys.stderr.isatty())
    if ns.out_circuit:
        if not report.neurons:
            raise CnaError("no scaled neurons were found, so there is no circuit to write (--out-circuit)")
        write_recovered_circuit(report, ns.a, ns.out_circuit, overwrite=ns.overwrite)
    if ns.json:
        _write_json(ns.json, report.to_dict(), ns.overwrite)
    if not ns.quiet:
        print(report.render(top=ns.top))
        print(f"time         {report.seconds:.1f}s"
              + "".join(f"; wrote {p}" for p in (ns.out_circuit, ns.json) if p))
    return 0


def _diff_parser(sub: Any) -> None:
    p = sub.add_parser("diff", help="compare two checkpoints tensor by tensor; recover scaled neurons and directional edits")
    p.add_argument("a", help="the reference: HF safetensors folder, .gguf file or bundled:NAME")
    p.add_argument("b", help="the checkpoint to compare with it (any of the same kinds)")
    p.add_argument("--out-circuit", metavar="FILE", help="write the recovered neurons as a circuit manifest (kind recovered)")
    p.add_argument("--json", metavar="FILE", help="write the full comparison as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--top", type=int, default=20, help="list this many changed tensors (default: 20)")
    p.add_argument("--rank1-share", type=float, default=0.95,
                   help="top singular value's share of a change's energy that makes it a rank-1 edit (default: 0.95)")


@command("audit")
def cmd_audit(ns: argparse.Namespace) -> int:
    from .audit import AuditSettings, audit, write_recovered_circuit

    if ns.out_circuit and not (ns.base or ns.manifest):
        raise CnaError("--out-circuit needs --base (or --manifest): recovered neurons come from a comparison")
    _check_outputs(ns, (ns.suspect, ns.base))
    settings = AuditSettings(
        base=ns.base, manifest=ns.manifest, recipe=ns.recipe, circuit=ns.circuit, discover=not ns.no_discover,
        generate=not ns.no_generate, prompts=ns.prompts, max_new_tokens=ns.max_new_tokens, backend=ns.backend,
        threads=ns.threads, batch_size=ns.batch_size, zero_threshold=ns.zero_threshold,
        direction_threshold=ns.direction_threshold, rank1_share=ns.rank1_share,
    )
    report = audit(ns.suspect, settings, progress=not ns.quiet and sys.stderr.isatty())
    if ns.out_circuit:
        if report.diff is None or not report.diff.neurons:
            raise CnaError("no scaled neurons were found, so there is no circuit to write (--out-circuit)")
        write_recovered_circuit(report.diff, report.diff.a["spec"], ns.out_circuit, overwrite=ns.overwrite)
    if ns.json:
        _write_json(ns.json, report.to_dict(), ns.overwrite)
    if ns.quiet:
        print(report.verdict)
    else:
        print(report.render())
    return report.exit_code


def _audit_parser(sub: Any) -> None:
    p = sub.add_parser("audit", help="was this checkpoint steered? check a manifest, diff against a base, or scan alone",
                       description="Exit codes: 0 nothing found / manifest check passed, 2 bad input, "
                                   "3 manifest check failed, 4 steering edits found, 5 weights differ without steering structure.")
    p.add_argument("suspect", help="HF safetensors folder, .gguf file or bundled:NAME")
    p.add_argument("--base", help="the model the suspect may have been made from (diff, refusal-circuit overlap, behaviour)")
    p.add_argument("--manifest", nargs="?", const="embedded", metavar="FILE",
                   help="check that exactly this export manifest's edits were made (no FILE: the embedded one)")
    p.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    p.add_argument("--out-circuit", metavar="FILE", help="write the recovered neurons as a circuit manifest")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--recipe", help="discovery recipe for the base's refusal circuit and the harmful prompts "
                   "(default: the bundled recipes/refusal.yaml)")
    p.add_argument("--circuit", help="the base's refusal circuit, already discovered (skips discovery)")
    p.add_argument("--no-discover", action="store_true", help="skip the refusal-circuit overlap")
    p.add_argument("--no-generate", action="store_true", help="skip the behavioural check")
    p.add_argument("--prompts", type=int, default=8, help="harmful prompts for the behavioural check (default: 8)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="greedy tokens per answer (default: 40)")
    p.add_argument("--backend", default="auto", choices=["auto", "transformers", "llama.cpp"],
                   help="generation backend (auto: llama.cpp for GGUF files when installed)")
    p.add_argument("--threads", type=int, help="CPU threads for generation")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch (default: 8)")
    p.add_argument("--zero-threshold", type=float, default=1e-3,
                   help="base-free: flag weights with norm below this x the layer median (default: 1e-3)")
    p.add_argument("--direction-threshold", type=float, default=1e-3,
                   help="base-free: flag a residual direction whose eigenvalue is below this x the median (default: 1e-3)")
    p.add_argument("--rank1-share", type=float, default=0.95, help="as for diff (default: 0.95)")


PARSERS += [_diff_parser, _audit_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cna-export",
        description="Discover CNA neuron circuits, fold them into weights, export safetensors/GGUF, verify and audit.",
    )
    parser.add_argument("--version", action="version", version=f"cna-export {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summaries")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in PARSERS:
        add(sub)
    return parser


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING
    logging.basicConfig(level=level, format="cna-export: %(levelname)s: %(message)s", stream=sys.stderr)
    logging.captureWarnings(True)
    for noisy in ("transformers", "accelerate", "urllib3", "huggingface_hub", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR if not verbose else logging.INFO)
    if not verbose:
        warnings.filterwarnings("ignore", module="transformers")
        warnings.filterwarnings("ignore", module="torch")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    _setup_logging(ns.verbose, ns.quiet)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        if ns.quiet or not sys.stderr.isatty():
            transformers.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        pass
    try:
        return COMMANDS[ns.command](ns)
    except CnaError as e:
        report = getattr(e, "report", None)  # a failed export --verify carries its report table
        if report is not None and not ns.quiet:
            print(report.render())
        print(f"cna-export: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("cna-export: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("cna-export: error: out of memory (try a smaller --batch-size or --device-map auto)", file=sys.stderr)
        return 1
