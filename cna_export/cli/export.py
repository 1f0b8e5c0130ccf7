"""Command export (safetensors, GGUF, PEFT LoRA adapter, llama.cpp LoRA adapter GGUF)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..core.errors import CnaError
from ..core.progress import wanted
from ..core.settings.base import ModelOptions
from ..core.settings.export import ExportOptions, GGUFExportOptions, HubOptions
from ..core.settings.verify import GGUFVerifyOptions
from ._errors import one_line
from .flags import add_flags, settings_of
from .paths import guard


def size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _multiplier_line(values: list[float]) -> str:
    return f"{values[0]:g}" if len(values) == 1 else f"per-neuron ({values[0]:g} .. {values[-1]:g})"


def cmd_export(ns: argparse.Namespace) -> int:
    from ..pipeline import hub_token_for, run_export

    hub: HubOptions = settings_of(ns, HubOptions)
    eo: ExportOptions = settings_of(ns, ExportOptions)
    guard(ns, eo, overwrite=eo.overwrite)
    token = hub_token_for(hub)  # a missing token fails here, before any work
    fmt, r = run_export(ns.model, ns.circuit, ns.out, eo, settings_of(ns, GGUFExportOptions),
                        settings_of(ns, GGUFVerifyOptions), settings_of(ns, ModelOptions), progress=wanted(ns.quiet))
    if not ns.quiet:
        print_export(ns.model, fmt, r)
    if hub.push_to_hub:
        pushed = _push(r.out, hub, token)
        if not ns.quiet:
            print(f"pushed       {len(pushed.files)} files to {pushed.url}")
    if r.verification is None:  # not verified: nothing can be inconclusive (and verification is not imported)
        return 0
    from ..verification.report import inconclusive_exit

    return inconclusive_exit([r.verification])  # 7 when an inconclusive verify let the export be written


def _push(out: Path, hub: HubOptions, token: str | None) -> Any:
    """Push a written export; a failed push (offline, refused by the Hub) is one line saying the export is kept."""
    from ..pipeline import push

    try:
        return push(out, hub, token)
    except Exception as e:
        line = str(e) if isinstance(e, CnaError) else one_line(e)
        if line is None:
            raise
        raise CnaError(f"{line}; the export is written to {out}: push it later with "
                       f"`cna-export push {out} {hub.push_to_hub}`") from None


def print_export(model: str, fmt: str, r: Any) -> None:
    """The summary of one export (what ``export`` prints)."""
    m = r.manifest
    values = sorted({x.multiplier for x in m.multipliers})
    if fmt in ("lora", "gguf-lora"):
        print(f"base         {model}")
        print(f"circuit      {len(m.multipliers)} neurons in {len({x.layer for x in m.multipliers})} layers; "
              f"multiplier {_multiplier_line(values)}")
        if fmt == "lora":
            ranks = " ".join(f"L{k}:{v}" for k, v in sorted(r.ranks.items()))
            print(f"adapter      PEFT LoRA on down_proj, ranks {ranks}, alpha = rank (scale 1); "
                  f"adapter_model.safetensors {size(r.adapter_bytes)}")
        else:
            print(f"adapter      llama.cpp LoRA on ffn_down, rank {r.rank} (padded), alpha {r.alpha:g} (scale 1)")
            if r.modelfile:
                print(f"ollama       {r.modelfile} (FROM the base, ADAPTER ./{r.out.name})")
        print(r.verification.render() if r.verification is not None
              else "verify       not run (pass --verify, or run cna-export verify)")
        total = r.total_bytes if fmt == "lora" else r.bytes
        print(f"wrote        {r.out} ({size(total)}) in {r.seconds:.1f}s")
        return
    if fmt == "gguf":
        print(f"source       {model}")
        print(f"circuit      {len(m.multipliers)} neurons in {len({x.layer for x in m.multipliers})} layers; "
              f"multiplier {_multiplier_line(values)}")
        dtypes = ", ".join(sorted({t.dtype for t in m.tensors}))
        axis = "ffn_up rows" if m.fold == "up" else "ffn_down columns"
        print(f"folded       {len(m.tensors)} tensors ({dtypes}), {axis}; every other tensor and KV pair unchanged")
        for w in r.warnings:
            print(f"warning      {w}")
        print("manifest     " + (str(r.manifest_path) if r.manifest_path else f"cna.manifest KV in {r.out.name}"))
        if r.modelfile:
            print(f"ollama       {r.modelfile}")
    else:
        print(f"source       {model}" + (" (converted to safetensors)" if r.converted else ""))
        print(f"circuit      {len(m.circuit.neurons)} neurons in {len(m.circuit.layer_counts())} layers; multiplier "
              + _multiplier_line(values))
        print(f"shards       {len(r.rewritten_shards)} rewritten, {len(r.copied_shards)} "
              + ("hard-linked" if r.linked else "copied") + f"; {len(r.other_files)} other files copied")
        if r.left_out:
            print(f"left out     {', '.join(r.left_out)} (weights that would not carry the steering)")
        for note in m.notes:
            print(f"note         {note}")
    print(r.verification.render() if r.verification is not None
          else "verify       not run (pass --verify, or run cna-export verify)")
    total = r.out.stat().st_size if fmt == "gguf" else r.total_bytes
    fast = " (fast copy)" if getattr(r, "fast_copy", False) else ""
    print(f"wrote        {r.out} ({size(total)}) in {r.seconds:.1f}s{fast}")


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF safetensors folder, Hub id, .gguf file, or bundled:smollm2")
    p.add_argument("--circuit", required=True, help="circuit manifest (JSON)")
    p.add_argument("--out", required=True, help="output folder (safetensors, lora) or .gguf file (gguf, gguf-lora), "
                   "written atomically")
    add_flags(p, ExportOptions)
    add_flags(p, ModelOptions, only=("allow_pickle", "trust_remote_code"), negatable=False)
    add_flags(p, GGUFVerifyOptions, skip=("dtype",))
    add_flags(p, GGUFExportOptions)
    add_flags(p, HubOptions)
