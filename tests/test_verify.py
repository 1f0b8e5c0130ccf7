"""Verification of exports against hook steering: passes on honest exports, fails (exit 3) on planted errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import ARCHS, EXPORT_COMBOS, EXPORT_IDS, PLANTED, make_tiny_model, planted_circuit
from safetensors import safe_open
from safetensors.torch import save_file

from cna_export import cli
from cna_export.core.manifest import ExportManifest
from cna_export.export.safetensors import export_safetensors
from cna_export.verification.prompts import verification_prompts
from cna_export.verification.report import Tolerances, VerifyReport, logit_metrics
from cna_export.verification.safetensors import VerifyOptions, tolerances, verify_export

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models gain nothing from threads
FAST = VerifyOptions(limit=4, max_new_tokens=4)


def _plant(folder: Path, layer: int, column: int, fn) -> None:
    """Edit one column of layer ``layer``'s down_proj in an exported shard (keeping the header metadata)."""
    index = folder / "model.safetensors.index.json"
    name = f"model.layers.{layer}.mlp.down_proj.weight"
    file = json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"
    with safe_open(folder / file, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    w = tensors[name]
    w[:, column] = fn(w[:, column].float()).to(w.dtype)
    (folder / file).unlink()  # a fresh file: never write through a hard link
    save_file(tensors, folder / file, metadata=meta)


# -- honest exports pass --------------------------------------------------------------------------------


@pytest.mark.parametrize("combo", EXPORT_COMBOS, ids=EXPORT_IDS)
def test_verify_passes_on_export(combo, export_sources, tmp_path):
    src = export_sources[combo]
    out = tmp_path / "out"
    export_safetensors(str(src), planted_circuit(src), out, multipliers=dict(PLANTED))
    report = verify_export(str(src), out, FAST)
    assert report.passed, report.render()
    assert report.dtype == combo[1]  # compared in the exported dtype
    m = report.metrics
    assert m["prompts"] == 4 and m["positions"] > 4 * 10  # every real position of every prompt
    # 0, -1, 2 and 0.5 are exact both as weights and as hooked activations: identical logits
    assert m["max_abs_logit_delta"] == 0.0 and m["top1_agreement"] == 1.0 and m["greedy_identical"] == 1.0
    assert all(p.greedy_identical for p in report.prompts)


@pytest.mark.parametrize("combo", [EXPORT_COMBOS[1], EXPORT_COMBOS[2]], ids=[EXPORT_IDS[1], EXPORT_IDS[2]])
def test_verify_passes_with_inexact_multiplier(combo, export_sources, tmp_path):
    src = export_sources[combo]
    out = tmp_path / "out"
    export_safetensors(str(src), planted_circuit(src), out, multiplier=0.3)
    report = verify_export(str(src), out, FAST)
    assert report.passed, report.render()
    if combo[1] == "float32":
        assert report.metrics["max_abs_logit_delta"] <= 1e-4
    else:
        assert report.metrics["top1_agreement"] >= 0.99 and report.metrics["mean_kl"] <= 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_exports_and_verifies(arch, tiny_models, tmp_path):
    src = tiny_models[arch]
    out = tmp_path / "out"
    result = export_safetensors(str(src), planted_circuit(src, {(1, 3): 0.0, (2, 9): -1.0}, own=True), out)
    assert result.manifest.multiplier_map() == {(1, 3): 0.0, (2, 9): -1.0}
    report = verify_export(str(src), out, VerifyOptions(limit=2, max_new_tokens=2))
    assert report.passed and report.metrics["max_abs_logit_delta"] == 0.0, report.render()


# -- planted errors fail with exit code 3 -------------------------------------------------------------------


@pytest.mark.parametrize(
    "combo, layer, column, fn",
    [
        (EXPORT_COMBOS[1], 1, 7, lambda c: c * 0),  # a column outside the circuit zeroed (fp32, sharded)
        (EXPORT_COMBOS[3], 2, 5, lambda c: c * 2),  # a circuit column (x0.5) left unscaled (fp32, sharded)
        (EXPORT_COMBOS[2], 0, 1, lambda c: c + 1.0),  # a circuit column (x0) not zeroed (bf16, sharded)
    ],
    ids=["fp32-outside", "fp32-unfolded", "bf16-unfolded"],
)
def test_planted_wrong_column_fails_with_exit_code_3(combo, layer, column, fn, export_sources, tmp_path, capsys):
    src = export_sources[combo]
    out = tmp_path / "out"
    export_safetensors(str(src), planted_circuit(src), out, multipliers=dict(PLANTED))
    assert verify_export(str(src), out, FAST).passed
    _plant(out, layer, column, fn)
    capsys.readouterr()  # drop the library calls' output
    report_file = tmp_path / "report.json"
    code = cli.main(["verify", "--original", str(src), "--exported", str(out), "--limit", "4",
                     "--max-new-tokens", "4", "--json", str(report_file)])
    captured = capsys.readouterr()
    assert code == 3
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("cna-export: error: verification failed")
    assert "FAILED" in captured.out
    report = VerifyReport.model_validate_json(report_file.read_text())
    assert not report.passed and report.reasons and report.failed_metrics
    if combo[1] == "float32":
        assert "max_abs_logit_delta" in report.failed_metrics


def test_failed_verification_at_export_time_leaves_nothing(export_sources, tmp_path, capsys, monkeypatch):
    import cna_export.export.safetensors as export_mod
    from cna_export.export.fold import scale_stored

    src = export_sources[("qwen2", "float32", True)]
    circuit = tmp_path / "c.json"
    planted_circuit(src).save(circuit)
    # a folding bug: every neuron's column scaled by the wrong factor
    monkeypatch.setattr(export_mod, "scale_stored",
                        lambda w, dtype, axis, ms: scale_stored(w, dtype, axis, [m * 3 + 1 for m in ms]))
    out = tmp_path / "out"
    code = cli.main(["export", "--model", str(src), "--circuit", str(circuit), "--multiplier", "0", "--out", str(out),
                     "--verify", "--limit", "4", "--max-new-tokens", "4"])
    captured = capsys.readouterr()
    assert code == 3 and "FAILED" in captured.out
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err) == 1 and "verification failed" in err[0]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_export_with_verify_records_result(export_sources, tmp_path, capsys):
    from huggingface_hub import ModelCard

    src = export_sources[("llama", "bfloat16", True)]
    circuit = tmp_path / "c.json"
    planted_circuit(src).save(circuit)
    out = tmp_path / "out"
    code = cli.main(["export", "--model", str(src), "--circuit", str(circuit), "--multiplier", "0", "--out", str(out),
                     "--verify", "--limit", "4", "--max-new-tokens", "4"])
    assert code == 0 and "PASSED" in capsys.readouterr().out
    m = ExportManifest.load(out)
    assert m.verification["passed"] is True and m.verification["dtype"] == "bfloat16"
    assert m.verification["tolerances"]["min_top1_agreement"] == 0.99
    card = ModelCard.load(out / "README.md")
    assert "**passed**" in card.text and "Not verified" not in card.text


def test_wrong_original_is_reported(export_sources, tmp_path):
    src = export_sources[("qwen2", "float32", True)]
    out = tmp_path / "out"
    export_safetensors(str(src), planted_circuit(src), out, multiplier=0.0)
    impostor = make_tiny_model("qwen2", tmp_path / "impostor", seed=7)
    report = verify_export(str(impostor), out, FAST)
    assert not report.passed
    assert any("not the tensor the export was made from" in r for r in report.reasons)


# -- report, metrics, tolerances, prompts ---------------------------------------------------------------------


def test_logit_metrics_and_tolerances():
    ref = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    same = logit_metrics(ref, ref.clone())
    assert same["abs_delta"].tolist() == [0.0, 0.0] and same["kl"].abs().max() < 1e-15
    assert same["top1"].tolist() == [1, 1]
    other = ref.clone()
    other[1] = torch.tensor([3.5, 3.0, 1.0])  # second position flips its top-1
    d = logit_metrics(ref, other)
    assert d["abs_delta"].tolist() == [0.0, 3.5] and d["top1"].tolist() == [1.0, 0.0]
    p = torch.softmax(ref[1].double(), -1)
    q = torch.softmax(other[1].double(), -1)
    assert math.isclose(float(d["kl"][1]), float((p * (p / q).log()).sum()), rel_tol=1e-12)

    fp32 = Tolerances.for_dtype("float32")
    assert fp32.max_abs_logit_delta == 1e-4 and fp32.identical_greedy and fp32.min_top1_agreement is None
    half = Tolerances.for_dtype("bfloat16")
    assert half.min_top1_agreement == 0.99 and half.max_mean_kl == 1e-3 and not half.identical_greedy
    assert fp32.failures({"max_abs_logit_delta": 0.0, "greedy_identical": 1.0}) == {}
    assert set(fp32.failures({"max_abs_logit_delta": float("nan"), "greedy_identical": 0.5})) == {
        "max_abs_logit_delta", "greedy_identical"}
    assert set(half.failures({"top1_agreement": 0.98, "mean_kl": 2e-3})) == {"top1_agreement", "mean_kl"}
    loose = tolerances(VerifyOptions(max_logit_delta=0.5, identical_greedy=False), "float32")
    assert loose.failures({"max_abs_logit_delta": 0.4, "greedy_identical": 0.0}) == {}


def test_report_render_and_round_trip():
    t = Tolerances.for_dtype("float32")
    r = VerifyReport.build({"prompts": 2.0, "positions": 20.0, "max_abs_logit_delta": 3e-3, "mean_kl": 1e-6,
                            "top1_agreement": 1.0, "greedy_identical": 0.5, "max_new_tokens": 8.0},
                           t, reference="orig + hooks", candidate="exp", dtype="float32")
    assert not r.passed and r.failed_metrics == ["max_abs_logit_delta", "greedy_identical"]
    text = r.render()
    assert "max |delta logit|" in text and "1/2" in text and "FAILED" in text and "<= 0.0001" in text
    assert VerifyReport.model_validate_json(r.to_json()) == r
    assert "prompts" not in r.summary()


def test_default_prompts_are_the_recipe_sets():
    prompts, info = verification_prompts(limit=16)
    assert len(prompts) == 16 and len(info["prompt_files"]) == 2
    harmful = [l for l in Path(list(info["prompt_files"])[0]).read_text().splitlines() if l.strip()]
    benign = [l for l in Path(list(info["prompt_files"])[1]).read_text().splitlines() if l.strip()]
    assert prompts[0::2] == harmful[:8] and prompts[1::2] == benign[:8]  # both sets represented


# -- the real SmolLM2 GGUF -> steered HF folder -> verify -----------------------------------------------------


@pytest.mark.slow
def test_smollm2_gguf_export_verifies(smollm2, prompt_files, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cna_export.core.settings import DiscoverOptions
    from cna_export.discovery.cna import discover
    from cna_export.model.prompts import load_prompts

    pos, neg, _ = prompt_files
    opts = DiscoverOptions(top_k=20, batch_size=6)
    circuit = discover(smollm2, load_prompts(pos), load_prompts(neg), None, opts, progress=False).circuit
    assert len(circuit.neurons) == 20
    out = tmp_path / "smol-steered"
    result = export_safetensors("bundled:smollm2", circuit, out, multiplier=0.0)
    assert result.converted and result.manifest.source_format == "gguf"
    assert len(result.manifest.tensors) == len(circuit.layer_counts())
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (out / f).is_file(), f
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "llama"
    del model
    report = verify_export(smollm2, out, VerifyOptions(limit=6, max_new_tokens=8))
    assert report.passed, report.render()
    assert report.dtype == "float32" and report.metrics["max_abs_logit_delta"] <= 1e-4


def test_verify_refusals_are_one_line(export_sources, tmp_path, capsys):
    src = export_sources[("llama", "float32", False)]
    out = tmp_path / "out"
    export_safetensors(str(src), planted_circuit(src), out, multiplier=0.0)
    taken = tmp_path / "taken.json"
    taken.write_text("{}")
    cases = [
        (["--original", src, "--exported", tmp_path / "nope"], "exported model folder not found"),
        (["--original", src, "--exported", src], "export manifest not found"),
        (["--original", src, "--exported", out, "--json", taken], "already exists"),
        (["--original", tmp_path / "missing", "--exported", out], "model not found"),
        (["--original", src, "--exported", out, "--prompts", tmp_path / "none.txt"], "prompt file not found"),
        (["--original", src, "--exported", out, "--min-top1", "2"], "--min-top1"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        code = cli.main(["-q", "verify", *map(str, argv)])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2, (argv, err)
        assert len(err) == 1 and message in err[0], (message, err)
    assert taken.read_text() == "{}"
