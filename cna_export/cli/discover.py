"""Commands discover, generate and show."""

from __future__ import annotations

import argparse

from ..core.settings.audit import ShowOptions
from ..core.settings.base import Force, ModelOptions, Multiplier, Overwrite, PromptOptions
from ..core.settings.discover import DiscoverOptions, GenerateOptions
from .flags import add_flags, settings_of
from .paths import guard

# -- discover -------------------------------------------------------------------------


def cmd_discover(ns: argparse.Namespace) -> int:
    from ..core.recipe import load_recipe  # here: show and generate need no recipe
    from ..pipeline import run_discover

    recipe = load_recipe(ns.recipe) if ns.recipe else {}
    opts: DiscoverOptions = settings_of(ns, DiscoverOptions, recipe)
    overwrite = settings_of(ns, Overwrite).overwrite
    guard(ns, opts, overwrite=overwrite)
    run = run_discover(ns.model, ns.out, opts, settings_of(ns, ModelOptions, recipe), overwrite=overwrite,
                       progress=not ns.quiet)
    if ns.quiet:
        return 0
    loaded, circuit, neutral = run.loaded, run.result.circuit, run.neutral
    reports = run.result.stats.reports
    total = sum(r.seconds for r in reports.values())
    prompts = sum(r.prompts for r in reports.values())
    print(f"model        {ns.model} ({loaded.arch.model_type}, {loaded.num_layers} layers x "
          f"{loaded.intermediate_size} neurons, loaded in {run.load_seconds:.1f}s)")
    print(f"prompts      {len(run.positive)} positive, {len(run.negative)} negative"
          + (f", {len(neutral)} neutral" if neutral else ""))
    sizes = [b for r in reports.values() for b in r.batches]
    batch = (f"batch auto: {min(sizes)}-{max(sizes)} prompts" if opts.batch_size == "auto" and sizes
             else f"batch {opts.batch_size}")
    print(f"capture      {prompts} prompts in {total:.1f}s ({prompts / total:.1f} prompts/s, {batch})")
    print(f"universal    {len(circuit.universal_neurons)} neurons excluded "
          f"(top-{opts.universal_top_k} on >= {opts.universal_threshold:.0%} of neutral prompts)"
          if neutral else "universal    no neutral set: filter not applied")
    print(f"circuit      {len(circuit.neurons)} neurons "
          f"({len(circuit.neurons) / circuit.model.total_neurons:.3%} of all)")
    print("per layer    " + " ".join(f"L{k}:{v}" for k, v in circuit.layer_counts().items()))
    print(f"wrote        {ns.out}")
    return 0


def add_discover_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF folder, Hub id, .gguf file, or bundled:smollm2")
    p.add_argument("--out", required=True, help="circuit manifest to write (JSON)")
    p.add_argument("--recipe", help="YAML recipe supplying these settings (CLI flags win)")
    add_flags(p, Overwrite)
    add_flags(p, DiscoverOptions)
    add_flags(p, ModelOptions)


# -- generate -------------------------------------------------------------------------


def cmd_generate(ns: argparse.Namespace) -> int:
    from ..pipeline import run_generate

    g: GenerateOptions = settings_of(ns, GenerateOptions)
    popts: PromptOptions = settings_of(ns, PromptOptions)
    m = settings_of(ns, Multiplier).multiplier
    base, steered = run_generate(
        ns.model, ns.prompt, ns.circuit, m, force=settings_of(ns, Force).force, compare=g.compare,
        model_options=settings_of(ns, ModelOptions), max_new_tokens=g.max_new_tokens, chat_template=popts.chat_template,
        system_prompt=popts.system_prompt, batch_size=popts.batch_size)
    for i, prompt in enumerate(ns.prompt):
        if len(ns.prompt) > 1 or base is not None:
            print(f"### prompt: {prompt}")
        if base is not None:
            print("--- unsteered ---")
            print(base[i])
            print(f"--- steered (x{m if m is not None else 'per-neuron'}) ---")
        print(steered[i])
    return 0


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="+", help="one or more prompts")
    p.add_argument("--model", required=True, help="HF folder, Hub id, .gguf file, or bundled:smollm2")
    p.add_argument("--circuit", help="circuit manifest (omit to generate unsteered)")
    add_flags(p, Multiplier)
    add_flags(p, GenerateOptions)
    add_flags(p, Force)
    add_flags(p, PromptOptions, skip=("field", "column", "max_length"))
    add_flags(p, ModelOptions)


# -- show -----------------------------------------------------------------------------


def cmd_show(ns: argparse.Namespace) -> int:
    from ..core.circuit import Circuit

    top = settings_of(ns, ShowOptions).top
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
    for n in c.neurons[:top]:
        where = "" if n.expert is None else ("shared " if n.expert == "shared" else f"E{n.expert} ")
        print(f"  L{n.layer:<3d} {where}#{n.index:<6d} score {n.score:+.4f}"
              + (f"  pos {n.positive_mean:+.4f} neg {n.negative_mean:+.4f}" if n.positive_mean is not None else "")
              + (f"  x{n.multiplier}" if n.multiplier is not None else ""))
    return 0


def add_show_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("circuit")
    add_flags(p, ShowOptions)
