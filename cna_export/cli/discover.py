"""Commands discover, generate and show."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..core.errors import CnaError
from ..core.settings import DiscoverOptions, ModelOptions, PromptOptions, add_flags, build, flags_of, load_recipe
from ._registry import PARSERS, command, log


# -- discover -------------------------------------------------------------------------


@command("discover")
def cmd_discover(ns: argparse.Namespace) -> int:
    from ..discover.discovery import discover
    from ..core.atomic import check_output_path
    from ..model.loading import load_model
    from ..model.prompts import load_prompts

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
    from ..core.circuit import Circuit, check_multiplier
    from ..model.generation import generate
    from ..model.loading import load_model
    from ..model.steering import steer_circuit

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
    from ..core.circuit import Circuit

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


PARSERS += [_discover_parser, _generate_parser, _show_parser]
