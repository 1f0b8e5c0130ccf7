"""Commands export and verify (safetensors and GGUF)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ..core.errors import CnaError
from ..core.settings import ModelOptions, add_flags, build, flags_of
from ._registry import PARSERS, command


# -- export / verify (safetensors) ------------------------------------------------------


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@command("export")
def cmd_export(ns: argparse.Namespace) -> int:
    from ..core.circuit import check_multiplier
    from ..pipeline import export
    from ..verify.safetensors import VerifyOptions

    if _gguf_export_requested(ns):
        return _cmd_export_gguf(ns)
    if ns.fold == "up" or ns.fast_copy or ns.no_modelfile:
        raise CnaError("--fold up, --fast-copy and --no-modelfile apply to GGUF exports (--format gguf)")
    if ns.multiplier is not None:
        check_multiplier(ns.multiplier)
    vopts = build(VerifyOptions, flags_of(ns, VerifyOptions))
    r = export(
        ns.model, ns.circuit, ns.out, format="safetensors", multiplier=ns.multiplier, multipliers=ns.multipliers,
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
    from ..verify.safetensors import VerifyOptions

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
    from ..core.errors import VerificationFailed
    from ..core.atomic import atomic_write_text

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
    from ..core.atomic import check_output_path
    from ..verify.safetensors import VerifyOptions, verify_export

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
    from ..verify.safetensors import VerifyOptions

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
    from ..verify.safetensors import VerifyOptions
    from ..verify.gguf import GGUFVerifyOptions

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
    from ..verify.safetensors import VerifyOptions
    from ..verify.gguf import GGUFVerifyOptions

    add_flags(p, GGUFVerifyOptions, skip=tuple(VerifyOptions.model_fields))


def _cmd_export_gguf(ns: argparse.Namespace) -> int:
    from ..core.circuit import check_multiplier
    from ..pipeline import export
    from ..verify.gguf import GGUFVerifyOptions

    if ns.link or ns.max_shard_size:
        raise CnaError("--link and --max-shard-size apply to safetensors exports, not GGUF")
    if ns.multiplier is not None:
        check_multiplier(ns.multiplier)
    vopts = build(GGUFVerifyOptions, flags_of(ns, GGUFVerifyOptions))
    r = export(
        ns.model, ns.circuit, ns.out, format="gguf", multiplier=ns.multiplier, multipliers=ns.multipliers, fold=ns.fold or "up",
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
    from ..core.atomic import check_output_path
    from ..verify.gguf import GGUFVerifyOptions, verify_gguf

    vopts = build(GGUFVerifyOptions, flags_of(ns, GGUFVerifyOptions))
    if ns.json:
        check_output_path(Path(ns.json), ns.overwrite)
    t0 = time.perf_counter()
    report = verify_gguf(ns.original, ns.exported, vopts, prompt_files=ns.prompts,
                         progress=not ns.quiet and sys.stderr.isatty())
    return _finish_verify(ns, report, t0)
