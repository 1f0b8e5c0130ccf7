"""`cna-export steer`: discover -> export every format -> verify -> one table; resumable; bad input refused early."""

from __future__ import annotations

import json

import pytest
from conftest import planted_circuit
from conftest import run_cli as _run


def test_steer_runs_resumes_and_redoes_what_changed(tiny_models, steer_recipe, tmp_path, capsys, one_thread):
    src = tiny_models["llama"]
    out = tmp_path / "out"
    argv = ["steer", "--model", str(src), "--recipe", str(steer_recipe), "--out", str(out), "--format",
            "safetensors,lora", "--verify", "--limit", "3", "--max-new-tokens", "2"]
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    assert "[1/3] discover: about" in err and "left" in err  # progress with time estimates
    lines = stdout.splitlines()
    assert lines[0].split() == ["step", "output", "size", "verify", "time"]
    assert any(line.startswith("safetensors") and "PASSED" in line for line in lines)
    assert any(line.startswith("lora") and "PASSED" in line for line in lines)
    assert sorted(p.name for p in out.iterdir()) == ["circuit.json", "lora", "safetensors", "steer.json"]
    circuit = json.loads((out / "circuit.json").read_text())
    assert circuit["method"]["recipe"] == "tinyrefusal"
    stamp = (out / "lora" / "adapter_model.safetensors").stat().st_mtime_ns

    code, stdout, err = _run(argv, capsys)  # nothing changed: every step reused
    assert code == 0 and stdout.count("(reused)") == 3 and "reused (inputs unchanged)" in err
    assert (out / "lora" / "adapter_model.safetensors").stat().st_mtime_ns == stamp

    code, stdout, _ = _run(argv + ["--multiplier", "0.5"], capsys)  # the circuit is reused, the exports redone
    assert code == 0 and stdout.count("(reused)") == 1
    manifest = json.loads((out / "lora" / "cna_manifest.json").read_text())
    assert {m["multiplier"] for m in manifest["multipliers"]} == {0.5}

    code, stdout, _ = _run(argv + ["--multiplier", "0.5", "--fresh"], capsys)
    assert code == 0 and "(reused)" not in stdout


def test_steer_with_a_circuit(tiny_models, tmp_path, capsys, one_thread):
    src = tiny_models["qwen2"]
    circuit = tmp_path / "c.json"
    planted_circuit(src, own=True).save(circuit)
    code, stdout, err = _run(["-q", "steer", "--model", str(src), "--circuit", str(circuit), "--out",
                              str(tmp_path / "o"), "--format", "lora"], capsys)
    assert code == 0 and stdout == "", err
    assert (tmp_path / "o" / "lora" / "adapter_config.json").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--format", "gguf"], "need a GGUF model"),
    (["--format", "lora,nope"], "unknown format 'nope'"),
    (["--push-to-hub", "someone/x"], "token"),
])
def test_steer_bad_input_stops_before_work(extra, message, tiny_models, steer_recipe, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants as C

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(C, "HF_TOKEN_PATH", str(tmp_path / "none" / "token"))
    monkeypatch.setattr(C, "HF_STORED_TOKENS_PATH", str(tmp_path / "none" / "stored"))
    out = tmp_path / "out"
    code, _, err = _run(["steer", "--model", str(tiny_models["llama"]), "--recipe", str(steer_recipe), "--out",
                         str(out), *extra], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_steer_refuses_a_foreign_folder(tiny_models, steer_recipe, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    code, _, err = _run(["steer", "--model", str(tiny_models["llama"]), "--recipe", str(steer_recipe), "--out",
                         str(out)], capsys)
    assert code == 2 and "not a steer folder" in err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_steer_retry_after_a_failed_first_step(tiny_models, tmp_path, capsys, one_thread):
    """A first step that fails leaves a folder marked as a steer folder (no empty format folder): the retry
    with a correct circuit continues in it."""
    src = tiny_models["qwen2"]
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    planted_circuit(src, own=True).save(good)
    planted_circuit(tiny_models["llama"], own=True).save(bad)  # another model's circuit
    out = tmp_path / "o"
    argv = ["-q", "steer", "--model", str(src), "--out", str(out), "--format", "lora", "--circuit"]
    code, _, err = _run(argv + [str(bad)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in out.iterdir()) == ["circuit.json", "steer.json"]
    code, _, err = _run(argv + [str(good)], capsys)
    assert code == 0, err
    assert (out / "lora" / "adapter_config.json").is_file()
    assert json.loads((out / "steer.json").read_text())["steps"]["lora"]["output"] == str(out / "lora")


def test_shared_verification_is_the_same_verification(tiny_models, tmp_path, one_thread):
    """steer's VerifySession: one reference for the safetensors and LoRA checks, its hook-steered logits computed
    once; every figure equals that of a verification on its own, and a wrong export still fails."""
    from cna_export.core.settings import VerifyOptions
    from cna_export.export.lora import export_lora
    from cna_export.export.safetensors import export_safetensors
    from cna_export.verification.lora import verify_lora
    from cna_export.verification.safetensors import verify_export
    from cna_export.verification.session import VerifySession

    src = str(tiny_models["llama"])
    circuit = planted_circuit(tiny_models["llama"], own=True)
    export_safetensors(src, circuit, tmp_path / "st")
    export_lora(src, circuit, tmp_path / "lora")
    opts = VerifyOptions(limit=3, max_new_tokens=2)
    session = VerifySession(src)
    shared = [verify_export(src, tmp_path / "st", opts, session=session),
              verify_lora(src, tmp_path / "lora", opts, session=session)]
    assert len(session.models) == 1 and session.hits >= 1  # one reference; the LoRA check reused its logits
    alone = [verify_export(src, tmp_path / "st", opts), verify_lora(src, tmp_path / "lora", opts)]
    for a, b in zip(shared, alone, strict=True):
        assert a.passed and b.passed
        assert a.metrics == b.metrics
    # another export's multipliers get their own reference (compared with the cached x-multiplier logits, it
    # would fail)
    export_safetensors(src, circuit, tmp_path / "half", multiplier=0.5)
    hits = session.hits
    assert verify_export(src, tmp_path / "half", opts, session=session).passed and session.hits == hits


@pytest.mark.slow
def test_a_gguf_source_is_converted_from_the_sessions_model(smollm2, tmp_path, monkeypatch):
    """steer's safetensors export of a GGUF source saves the session's float32 model (discovery's) instead of
    loading the source again, and writes the same tensors as an export on its own."""
    from safetensors.numpy import load_file

    import cna_export.model.loading as loading
    from cna_export.core.circuit import Circuit, Neuron
    from cna_export.core.settings import ExportOptions, GGUFExportOptions
    from cna_export.pipeline import run_export
    from cna_export.verification.session import VerifySession

    circuit = tmp_path / "c.json"
    neurons = [Neuron(layer=3, index=5, score=1.0), Neuron(layer=20, index=7, score=1.0)]
    Circuit(model=smollm2.identity(), neurons=neurons, method={"name": "manual"}).save(circuit)
    opts, fmt = ExportOptions(multiplier=0.0), GGUFExportOptions(format="safetensors")
    run_export("bundled:smollm2", circuit, tmp_path / "alone", opts, fmt)
    session = VerifySession("bundled:smollm2")
    session.adopt(smollm2)

    def no_second_load(*a, **k):
        raise AssertionError("the source was loaded again")

    monkeypatch.setattr(loading, "load_model", no_second_load)
    run_export("bundled:smollm2", circuit, tmp_path / "shared", opts, fmt, session=session)
    alone, shared = (sorted((tmp_path / d).glob("*.safetensors")) for d in ("alone", "shared"))
    assert [p.name for p in alone] == [p.name for p in shared] and alone
    for a, b in zip(alone, shared, strict=True):
        ta, tb = load_file(a), load_file(b)
        assert ta.keys() == tb.keys() and all((ta[k] == tb[k]).all() for k in ta)
