"""Start-up: a command line imports only the module of the command it runs (``cli._registry``), and what it
prints (help, argument errors, version) is what the parser of every command prints."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from cna_export.cli import build_parser, main, wanted_commands
from cna_export.cli._registry import BY_NAME, TABLE

COMMANDS = [c.name for c in TABLE]

TOP_HELP = """\
usage: cna-export [-h] [--version] [-q] [-v] COMMAND ...

Discover CNA neuron circuits, fold them into weights, export safetensors/GGUF, verify and audit.

positional arguments:
  COMMAND
    discover     find a CNA circuit from two contrastive prompt sets
    generate     greedy generation with hook steering, for a quick look
    show         summarise a circuit manifest
    export       fold a circuit into the weights (safetensors, GGUF) or write it as a LoRA adapter (PEFT folder, llama.cpp GGUF)
    verify       check an exported checkpoint against hook steering of the original
    steer        discover a circuit and export it in every format, verified: one resumable job
    push         upload an export (folder or .gguf, or a steer folder) to the Hugging Face Hub
    eval         refusal, over-refusal, quality and KL drift; multiplier/size sweeps; CAA baseline
    tune         choose circuit size and multiplier on a tuning split; check on the held-out split
    diff         compare two checkpoints tensor by tensor; recover scaled neurons and directional edits
    audit        was this checkpoint steered? check a manifest, diff against a base, or scan alone

options:
  -h, --help     show this help message and exit
  --version      show program's version number and exit
  -q, --quiet    no progress bars or summaries
  -v, --verbose  debug logging
"""  # noqa: E501  (as cna-export 0.x printed it before the commands were listed in cli._registry)

DESCRIPTIONS = {  # the descriptions that moved from the command modules to cli._registry, as they were
    "steer": "discover (or --circuit) -> export each --format -> verify each (--verify) -> push (--push-to-hub) -> "
             "one summary table. Rerunning reuses every step whose inputs are unchanged.",
    "audit": "Exit codes: 0 nothing found / manifest check passed, 2 bad input, 3 manifest check failed, 4 steering "
             "edits found, 5 weights differ without steering structure.",
}


def _exit(run, argv: list[str], capsys) -> tuple[int | str | None, str, str]:
    with pytest.raises(SystemExit) as e:
        run(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def _both(argv: list[str], capsys) -> tuple[tuple, tuple]:
    """What ``main`` prints for ``argv`` (one command's parser) and what the parser of every command prints."""
    return _exit(main, argv, capsys), _exit(build_parser().parse_args, argv, capsys)


@pytest.fixture(autouse=True)
def _wide(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # help lines unwrapped, the same on every terminal


def test_top_level_help_is_unchanged(capsys):
    code, out, _ = _exit(main, ["--help"], capsys)
    assert code == 0 and out == TOP_HELP


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_is_the_full_parsers(command, capsys):
    mine, full = _both([command, "--help"], capsys)
    assert mine == full and mine[0] == 0 and mine[1].startswith(f"usage: cna-export {command} ")
    if command in DESCRIPTIONS:
        assert DESCRIPTIONS[command] in " ".join(mine[1].split())


@pytest.mark.parametrize("argv", [
    [], ["bogus"], ["-q"], ["-x"], ["--version"], ["-qv", "show"], ["--verb", "show"], ["show"], ["show", "-x"],
    ["export", "--multiplier", "abc"], ["export"], ["export", "--model", "m", "--circuit", "c", "--out", "o",
                                                     "--format", "nope"],
    ["--quiet", "export", "--help"], ["discover", "--model", "m"], ["steer", "--model", "m", "--out", "o"],
    ["steer", "--model", "m", "--out", "o", "--recipe", "r", "--circuit", "c"], ["push", "a"],
    ["tune", "--model", "m", "--out", "o", "--max-kl"], ["eval", "--help", "--bad"], ["--", "show", "x"],
    ["show", "--", "x", "--top", "3"], ["-", "show"], ["audit", "--verbose"],
])
def test_argument_errors_are_the_full_parsers(argv, capsys):
    mine, full = _both(argv, capsys)
    assert mine == full
    assert mine[0] in (0, 2)


def test_wanted_commands():
    assert wanted_commands(["-q", "export", "--model", "show"]) == ("export",)
    assert wanted_commands(["--verbose", "-q", "show", "c.json"]) == ("show",)
    assert wanted_commands([]) == () and wanted_commands(["--help"]) == ()
    assert wanted_commands(["bogus", "export"]) == () and wanted_commands(["-", "show"]) == ()
    assert wanted_commands(["--", "show"]) is None  # every command's parser: argparse decides
    assert set(BY_NAME) == set(COMMANDS) and len(COMMANDS) == len(set(COMMANDS))


def test_every_command_has_its_handler_and_arguments():
    for c in TABLE:
        module = c.load()
        assert callable(getattr(module, f"cmd_{c.name}")) and callable(getattr(module, f"add_{c.name}_arguments"))


PROBE = textwrap.dedent("""
    import sys
    from cna_export.cli import main
    try:
        main(sys.argv[1:])
    except SystemExit:
        pass
    print(" ".join(sorted(m for m in sys.modules if m.startswith("cna_export.cli.") or m.split(".")[0] in
                          ("pydantic", "numpy", "torch", "transformers", "yaml"))))
""")


def _imported(*argv: str) -> set[str]:
    r = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return {m for m in r.stdout.strip().splitlines()[-1].split() if "." not in m or m.startswith("cna_export.cli.")}


COMMAND_MODULES = {f"cna_export.cli.{c.module}" for c in TABLE}


def test_help_imports_no_command_module_and_no_pydantic():
    got = _imported("--help")
    assert not got & COMMAND_MODULES and "pydantic" not in got and "numpy" not in got, got


@pytest.mark.parametrize("argv, module", [(["export", "--help"], "export"), (["show", "--help"], "discover"),
                                          (["audit", "--help"], "audit")])
def test_a_command_imports_only_its_module(argv, module):
    got = _imported(*argv)
    assert got & COMMAND_MODULES == {f"cna_export.cli.{module}"}, got
    assert not got & {"numpy", "torch", "transformers"}, got
