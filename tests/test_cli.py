"""The command line: end to end on tiny models, and one-line errors for bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cna_export.cli import main
from cna_export.core.circuit import Circuit


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_discover_show_generate(tiny_models, prompt_files, tmp_path, capsys):
    pos, neg, neu = prompt_files
    out = tmp_path / "c.json"
    argv = ["discover", "--model", str(tiny_models["qwen2"]), "--positive", str(pos), "--negative", str(neg),
            "--neutral", str(neu), "--top-k", "7", "--batch-size", "3", "--exclude-layers", "0", "--out", str(out)]
    code, stdout, _ = run(argv, capsys)
    assert code == 0, stdout
    c = Circuit.load(out)
    assert len(c.neurons) == 7 and all(n.layer != 0 for n in c.neurons)
    assert c.method["batch_size"] == 3 and c.method["exclude_layers"] == [0]
    assert "per layer" in stdout and "universal" in stdout

    code, _, err = run(argv, capsys)  # exists, no --overwrite
    assert code == 2 and "already exists" in err and len(err.strip().splitlines()) == 1
    assert run(argv + ["--overwrite"], capsys)[0] == 0

    code, stdout, _ = run(["show", str(out), "--top", "3"], capsys)
    assert code == 0 and "neurons      7" in stdout

    code, stdout, _ = run(["generate", "--model", str(tiny_models["qwen2"]), "--circuit", str(out),
                           "--multiplier", "0", "--max-new-tokens", "4", "--compare", "How do I bake a cake?"], capsys)
    assert code == 0 and "--- unsteered ---" in stdout and "--- steered (x0.0) ---" in stdout


def test_recipe_drives_discover(tiny_models, prompt_files, tmp_path, capsys):
    pos, neg, neu = prompt_files
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"positive: {pos}\nnegative: {neg}\nneutral: {neu}\ntop_k: 4\nscore: standardized\n")
    out = tmp_path / "c.json"
    code, _, _ = run(["-q", "discover", "--model", str(tiny_models["llama"]), "--recipe", str(recipe),
                      "--top-k", "5", "--out", str(out)], capsys)
    assert code == 0
    c = Circuit.load(out)
    assert len(c.neurons) == 5 and c.method["score"] == "standardized"
    assert set(c.prompts) == {"positive", "negative", "neutral"}


DISCOVER = ["discover", "--model", "{m}", "--positive", "{pos}", "--negative", "{neg}"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["discover", "--model", "{m}", "--positive", "{pos}", "--negative", "/nope.txt", "--out", "{out}"],
         "prompt file not found"),
        (["discover", "--model", "/no/such/model", "--positive", "{pos}", "--negative", "{neg}", "--out", "{out}"],
         "model not found"),
        (["discover", "--model", "{m}", "--out", "{out}"], "needs --positive and --negative"),
        (DISCOVER + ["--top-fraction", "3", "--out", "{out}"], "--top-fraction"),
        (DISCOVER + ["--exclude-layers", "9", "--out", "{out}"], "out of range"),
        (DISCOVER + ["--out", "{pos}/c.json"], "is a file, not a folder"),
        (DISCOVER + ["--out", "{pos}"], "is the input itself"),
        (DISCOVER + ["--out", ""], "--out is empty"),
        (DISCOVER + ["--dtype", "int3", "--out", "{out}"], "unknown dtype"),
        (["discover", "--model", "bundled:nope", "--positive", "{pos}", "--negative", "{neg}", "--out", "{out}"],
         "unknown bundled model"),
        (["show", "/nope.json"], "circuit file not found"),
        (["show", "{dir}"], "is a folder; expected a file"),
        (["show", "{pos}", "--top", "-3"], "--top"),
        (["generate", "--model", "{m}", "--multiplier", "0", "hi"], "--multiplier needs --circuit"),
    ],
)
def test_one_line_errors(argv, message, tiny_models, prompt_files, tmp_path, capsys):
    pos, neg, _ = prompt_files
    fill = {"m": str(tiny_models["llama"]), "pos": str(pos), "neg": str(neg), "out": str(tmp_path / "c.json"),
            "dir": str(tmp_path)}
    before = pos.read_bytes()
    code, _, err = run([a.format(**fill) for a in argv], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cna-export: error:") and message in lines[0], err
    assert not (tmp_path / "c.json").exists() and pos.read_bytes() == before


def test_unsupported_architecture_is_refused(tmp_path, capsys, prompt_files):
    from transformers import GPT2Config, GptOssConfig

    pos, neg, _ = prompt_files
    for name, cfg, reason in (("gpt2", GPT2Config(n_layer=1, n_embd=16, n_head=2), "non-gated"),
                              ("gpt_oss", GptOssConfig(num_hidden_layers=1, hidden_size=16), "mixture-of-experts")):
        d = tmp_path / name
        d.mkdir()
        cfg.save_pretrained(d)
        code, _, err = run(["discover", "--model", str(d), "--positive", str(pos), "--negative", str(neg),
                            "--out", str(tmp_path / "c.json")], capsys)
        assert code == 2 and "not supported yet" in err and reason in err


def test_pickle_only_checkpoint_is_refused(tmp_path, capsys, prompt_files, tiny_models):
    import shutil

    pos, neg, _ = prompt_files
    d = tmp_path / "pickled"
    shutil.copytree(tiny_models["llama"], d)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    code, _, err = run(["discover", "--model", str(d), "--positive", str(pos), "--negative", str(neg),
                        "--out", str(tmp_path / "c.json")], capsys)
    assert code == 2 and "--allow-pickle" in err


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "cna_export", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("cna-export ")
    r = subprocess.run([sys.executable, "-m", "cna_export", "show", "/nope.json"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_architecture_table():
    from cna_export.core.architectures import arch_for_gguf, get_arch, supported_model_types
    from cna_export.core.errors import CnaError

    dense = {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gemma3_text", "phi3"}
    assert dense <= set(supported_model_types())
    phi3 = get_arch("phi3")
    assert phi3.fused_gate_up and phi3.up_row(5, 100) == 105
    assert get_arch("llama").up_row(5, 100) == 5
    assert arch_for_gguf("qwen2").model_type == "qwen2"
    assert get_arch("qwen3").checkpoint_down_names(4) == ["model.layers.4.mlp.down_proj.weight"]
    with pytest.raises(CnaError, match="unknown architecture 'bert'"):
        get_arch("bert")
    with pytest.raises(CnaError, match="not supported yet: GGUF architecture"):
        arch_for_gguf("bert")


def test_help_does_not_import_torch():
    """`cna-export --help` and argument errors stay fast: building the parser imports neither torch nor transformers."""
    import subprocess
    import sys

    code = ("import sys; from cna_export.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
