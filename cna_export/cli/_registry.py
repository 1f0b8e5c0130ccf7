"""The sub-commands: a static table, so that a command line imports only the module of the command it runs.

Each command lives in one module of ``cna_export.cli`` (:attr:`Command.module`), which defines its handler
``cmd_<name>(ns) -> int`` and ``add_<name>_arguments(parser)``, the flags of its parser. The one-line help
(what ``cna-export --help`` lists) and the description stay here: the top-level help and argument errors
need no command module, and ``cna-export export ...`` imports ``cli.export`` alone.
"""

from __future__ import annotations

import argparse
import importlib
from types import ModuleType
from typing import Callable, NamedTuple

Handler = Callable[[argparse.Namespace], int]


class Command(NamedTuple):
    """One sub-command: its name, the ``cli`` module that implements it, its help line and description (a named
    tuple, not a dataclass: ``dataclasses`` costs ``--help`` 5-10 ms of imports)."""

    name: str
    module: str
    help: str
    description: str | None = None

    def load(self) -> ModuleType:
        return importlib.import_module(f"{__package__}.{self.module}")

    def handler(self) -> Handler:
        return getattr(self.load(), f"cmd_{self.name}")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        getattr(self.load(), f"add_{self.name}_arguments")(parser)


TABLE: tuple[Command, ...] = (  # in the order --help lists them
    Command("discover", "discover", "find a CNA circuit from two contrastive prompt sets"),
    Command("generate", "discover", "greedy generation with hook steering, for a quick look"),
    Command("show", "discover", "summarise a circuit manifest"),
    Command("export", "export", "fold a circuit into the weights (safetensors, GGUF) or write it as a LoRA adapter "
            "(PEFT folder, llama.cpp GGUF)"),
    Command("verify", "verify", "check an exported checkpoint against hook steering of the original"),
    Command("steer", "steer", "discover a circuit and export it in every format, verified: one resumable job",
            "discover (or --circuit) -> export each --format -> verify each (--verify) -> push (--push-to-hub) -> "
            "one summary table. Rerunning reuses every step whose inputs are unchanged."),
    Command("push", "steer", "upload an export (folder or .gguf, or a steer folder) to the Hugging Face Hub"),
    Command("eval", "evaluate", "refusal, over-refusal, quality and KL drift; multiplier/size sweeps; CAA baseline"),
    Command("tune", "evaluate", "choose circuit size and multiplier on a tuning split; check on the held-out split"),
    Command("diff", "audit", "compare two checkpoints tensor by tensor; recover scaled neurons and directional edits"),
    Command("audit", "audit", "was this checkpoint steered? check a manifest, diff against a base, or scan alone",
            "Exit codes: 0 nothing found / manifest check passed, 2 bad input, 3 manifest check failed, 4 steering "
            "edits found, 5 weights differ without steering structure."),
)
BY_NAME: dict[str, Command] = {c.name: c for c in TABLE}


class _Handlers(dict):
    """Name -> handler; a command's handler is looked up in its module on first use (the module is imported
    then). An entry set here (a test's stand-in) is used instead."""

    def __missing__(self, name: str) -> Handler:
        return BY_NAME[name].handler()


COMMANDS: dict[str, Handler] = _Handlers()
