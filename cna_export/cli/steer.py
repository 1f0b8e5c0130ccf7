"""Commands steer (discover, export every format, verify, push: one resumable job) and push."""

from __future__ import annotations

import argparse

from ..core.progress import wanted
from ..core.recipe import recipe_section
from ..core.settings.base import ModelOptions
from ..core.settings.export import ExportOptions, GGUFExportOptions, HubOptions, SteerOptions
from ..core.settings.verify import GGUFVerifyOptions
from .flags import add_flags, settings_of
from .paths import guard


def cmd_steer(ns: argparse.Namespace) -> int:
    import sys

    from ..steer import STATE_FILE, PreviewSettings, run_steer

    export_recipe = recipe_section(ns.recipe, "export")
    steer_recipe = recipe_section(ns.recipe, "steer")
    s: SteerOptions = settings_of(ns, SteerOptions, steer_recipe)
    eo: ExportOptions = settings_of(ns, ExportOptions, export_recipe)
    guard(ns, eo, overwrite=eo.overwrite, exists_ok=True, markers=(STATE_FILE,))  # a steer folder is resumed
    show = not ns.quiet
    preview = PreviewSettings(s.preview if s.preview_on else 0, s.preview_tokens, "preview" in s.model_fields_set)
    r = run_steer(
        ns.model, ns.out, recipe=ns.recipe, circuit=ns.circuit, formats=s.formats,
        export_options=eo,
        gguf_options=settings_of(ns, GGUFExportOptions, export_recipe),
        verify_options=settings_of(ns, GGUFVerifyOptions, export_recipe),
        model_options=settings_of(ns, ModelOptions), hub=settings_of(ns, HubOptions, steer_recipe), fresh=s.fresh,
        progress=wanted(ns.quiet), say=(lambda text: print(text, file=sys.stderr, flush=True)) if show else None,
        preview=preview,
    )
    if show:
        print(r.table())
        if r.preview is not None:
            print("\n".join(r.preview.lines()))
        if r.pushed is not None:
            print(f"pushed       {len(r.pushed.files)} files to {r.pushed.url}")
        print(f"done         {r.out} in {r.seconds:.1f}s (rerun the same command to reuse every unchanged step)")
    from ..verification.report import inconclusive_exit

    return inconclusive_exit([step.verification for step in r.steps])  # 7 when an inconclusive verify kept an export


def add_steer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF folder, Hub id, .gguf file, or bundled:smollm2")
    p.add_argument("--out", required=True, help="output folder (circuit.json, one entry per format, steer.json)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--recipe", help="YAML recipe: discovery settings (and export:/steer: sections)")
    g.add_argument("--circuit", help="an existing circuit manifest (skips discovery)")
    add_flags(p, SteerOptions)
    add_flags(p, ExportOptions)
    add_flags(p, GGUFExportOptions, skip=("format",))
    add_flags(p, GGUFVerifyOptions, skip=("dtype",))
    add_flags(p, HubOptions)
    add_flags(p, ModelOptions, only=("device_map", "allow_pickle", "trust_remote_code"), negatable=False)


def cmd_push(ns: argparse.Namespace) -> int:
    from ..pipeline import hub_token_for, push

    hub = HubOptions(push_to_hub=ns.repo_id, private=ns.private)
    token = hub_token_for(hub)
    r = push(ns.path, hub, token, recipe=ns.recipe_name)
    if not ns.quiet:
        for f in r.files:
            print(f"uploaded     {f}")
        print(f"pushed       {len(r.files)} files to {r.url} in one commit")
    return 0


def add_push_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="export folder, .gguf export or LoRA GGUF, or a steer output folder")
    p.add_argument("repo_id", help="Hub repo (OWNER/NAME), created if missing")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--recipe-name", help="recipe name for the card's tags (default: the circuit's, when recorded)")
