"""GGUF export of the real SmolLM2-135M-Instruct Q4_1 file: a circuit discovered on it, patched,
loaded in llama.cpp, verified against hook steering in transformers (one transformers load per
session, the ``smollm2`` fixture)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from cna_export.cli import main
from cna_export.core.circuit import Circuit, Neuron
from cna_export.core.manifest import GGUF_KEY
from cna_export.core.recipe import load_recipe
from cna_export.core.settings import DiscoverOptions, GGUFVerifyOptions
from cna_export.discovery.cna import discover
from cna_export.export.card import modelfile_path
from cna_export.export.gguf import export_gguf, read_gguf_manifest
from cna_export.io import gguf as G
from cna_export.io.identity import gguf_fingerprint, gguf_identity
from cna_export.io.llama import llama_logits
from cna_export.model.prompts import load_prompts
from cna_export.verification.gguf import verify_gguf
from cna_export.verification.gguf_behaviour import token_ids

pytestmark = [pytest.mark.slow, pytest.mark.llama]
pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python")

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "refusal.yaml"
OPTS = GGUFVerifyOptions(limit=16, threads=1)  # one llama.cpp thread: robust on a busy 2-core machine


@pytest.fixture(scope="module")
def circuit(smollm2):
    """The refusal circuit of SmolLM2 from a small slice of the recipe's prompt sets (46 neurons)."""
    r = load_recipe(RECIPE)
    pos, neg = load_prompts(r["positive"], limit=8), load_prompts(r["negative"], limit=8)
    neu = load_prompts(r["neutral"], limit=10)
    return discover(smollm2, pos, neg, neu, DiscoverOptions(batch_size=8), progress=False).circuit


@pytest.fixture(scope="module")
def exported(smollm2, circuit, tmp_path_factory):
    """The circuit ablated (x0) into the SmolLM2 file, writer mode and fast copy."""
    d = tmp_path_factory.mktemp("smol")
    src = smollm2.source.path
    w = export_gguf("bundled:smollm2", circuit, d / "steered.gguf", multiplier=0.0)
    f = export_gguf("bundled:smollm2", circuit, d / "fast.gguf", multiplier=0.0, fast_copy=True, modelfile=False)
    return src, w, f


def test_fingerprint_and_identity_match_transformers(smollm2):
    reader = G.open_gguf(smollm2.source.path)
    assert gguf_fingerprint(reader) == smollm2.fingerprint()
    ident, hf = gguf_identity(reader, "bundled:smollm2"), smollm2.identity()
    assert (ident.architecture, ident.num_layers, ident.intermediate_size, ident.hidden_size, ident.fingerprint) == (
        hf.architecture, hf.num_layers, hf.intermediate_size, hf.hidden_size, hf.fingerprint
    )


def test_export_keeps_every_kv_and_untouched_tensor(exported, circuit):
    src, w, f = exported
    a = G.open_gguf(src)
    m = w.manifest
    assert len(m.multipliers) == len(circuit.neurons) == 46
    touched = {t.name for t in m.tensors}
    assert touched == {f"blk.{layer}.ffn_up.weight" for layer in circuit.layer_counts()}
    assert {t.dtype for t in m.tensors} == {"Q4_1"}
    # independent oracle: gguf-py's own reader on the written file
    ref = gguf.GGUFReader(w.out)
    fields = list(ref.fields.values())[3:]
    ours = G.kv_fields(a)
    assert [x.name for x in ours] + [GGUF_KEY] == [x.name for x in fields]
    for x, y in zip(ours, fields[: len(ours)], strict=True):  # fields ends with the manifest
        assert x.type == y.types[0] and (x.sub_type is None or x.sub_type == y.types[1])
        if x.name == "general.name":
            assert y.contents() == x.value() + " (CNA-steered)"
        else:
            assert x.value() == y.contents(), x.name
    assert len(ref.tensors) == len(a.tensors) == 272
    for x, y in zip(a.tensors, ref.tensors, strict=True):
        assert (x.name, x.tensor_type, list(x.ne)) == (y.name, y.tensor_type, y.shape.tolist())
        if x.name not in touched:
            assert np.array_equal(x.data, y.data), x.name
    # the fast copy patches the same bytes and keeps the header as it is
    assert [(t.name, t.sha256_after) for t in f.manifest.tensors] == [(t.name, t.sha256_after) for t in m.tensors]
    assert G.kv_differences(a, G.open_gguf(f.out)) == []
    assert read_gguf_manifest(f.out)[0].multiplier_map() == m.multiplier_map()
    text = modelfile_path(w.out).read_text()
    assert "FROM ./steered.gguf" in text and 'PARAMETER stop "<|im_end|>"' in text


def test_llama_cpp_logs_go_to_the_debug_log_only(capfd, caplog):
    """llama.cpp's own lines never reach stderr by themselves, even after another callback was installed
    (importing llama_cpp installs one that prints everything); with debug logging they are log records."""
    import ctypes
    import logging

    import llama_cpp
    from llama_cpp import _logger as llama_cpp_logger

    from cna_export.io.bundled import resolve
    from cna_export.io.llama import LlamaContext, LlamaModel

    src = resolve("bundled:smollm2")
    LlamaModel(src).close()
    llama_cpp.llama_log_set(llama_cpp_logger.llama_log_callback, ctypes.c_void_p(0))  # as at llama_cpp's import
    capfd.readouterr()
    lm = LlamaModel(src)
    LlamaContext(lm, 1, 64, 8, 1).close()
    lm.close()
    assert capfd.readouterr().err == ""
    with caplog.at_level(logging.DEBUG, logger="cna_export.io.llama"):
        lm = LlamaModel(src)
        LlamaContext(lm, 1, 64, 8, 1).close()
        lm.close()
    assert capfd.readouterr().err == ""
    assert any(r.getMessage().startswith("llama.cpp: llama_model_loader") for r in caplog.records)


def test_llama_cpp_loads_the_export_and_logits_change(smollm2, exported):
    src, w, _ = exported
    ids = token_ids(smollm2.tokenizer, ["How do I pick a lock?", "Write a poem about the sea."], OPTS)
    before = llama_logits(src, ids, threads=1)
    after = llama_logits(w.out, ids, threads=1)
    assert all(np.isfinite(x).all() for x in after)
    assert max(float(np.abs(a - b).max()) for a, b in zip(before, after, strict=True)) > 1e-2


def test_verify_passes_against_the_noise_floor(smollm2, exported):
    src, w, f = exported
    rep = verify_gguf(smollm2, w.out, OPTS)
    assert rep.passed, rep.render()
    m = rep.metrics
    assert m["tensors_touched"] == len(w.manifest.tensors) and m["tensors_identical"] == 272 - m["tensors_touched"]
    assert m["tensor_max_abs_error"] == 0.0  # multiplier 0 is exact
    assert 0 < m["floor_mean_kl"] and m["mean_kl"] <= m["allowed_mean_kl"]
    assert m["allowed_mean_kl"] == pytest.approx(1.1 * m["floor_mean_kl"] + 0.01 * m["steering_effect_mean_kl"])
    assert abs(m["excess_share_of_effect"]) < 0.005  # measured 0.09%: llama.cpp reproduces the steering
    assert m["confident_top1_agreement"] >= m["floor_confident_top1_agreement"] - 0.01
    assert m["export_effect_mean_kl"] > m["floor_mean_kl"]  # the export really steers llama.cpp
    assert m["mean_kl"] < m["export_vs_unsteered_mean_kl"]  # closer to hook steering than to no steering
    assert len(rep.prompts) == 16 and "noise floor" in rep.render()
    labels = {"tensors and KV pairs exact", "mean KL, allowed", "steering reproduced (slope)"}
    assert {c.label for c in rep.checks} >= labels
    assert all(c.ok is not False for c in rep.checks) and "steering reproduced (slope)" in rep.render()
    assert abs(m["steering_reproduced"] - 1) < 0.03  # measured 1.000 +- 0.003
    tensors_only = verify_gguf("bundled:smollm2", f.out, OPTS, behaviour=False)
    assert tensors_only.passed, tensors_only.reasons


def test_verify_fails_when_the_export_does_not_carry_the_steering(smollm2, exported):
    """Reference steered hard (x3 on 400 neurons) but the candidate is the unsteered source."""
    from cna_export.verification.gguf_behaviour import check_behaviour

    src, _, _ = exported
    mults = {(layer, i): 3.0 for layer in range(10, 30) for i in range(0, 1536, 77)}
    prompts = ["How do I pick a lock?", "Name three rivers.", "Write a haiku about rain."]
    b = check_behaviour(smollm2, src, src, mults, prompts, OPTS)
    assert b.metrics["steering_effect_mean_kl"] > b.metrics["floor_mean_kl"]
    assert b.verdict == "fail" and any("noise floor" in r or "closer to hook steering" in r
                                       or "reproduces 0.0%" in r for r in b.reasons)  # fmt: skip


def test_cli_export_and_verify(smollm2, circuit, tmp_path, capsys, monkeypatch):
    import cna_export.model.loading

    monkeypatch.setattr(cna_export.model.loading, "load_model", lambda spec, **kw: smollm2)  # one transformers load
    circ = tmp_path / "c.json"
    circuit.save(circ)
    out = tmp_path / "cli.gguf"
    assert main(["export", "--model", "bundled:smollm2", "--circuit", str(circ), "--multiplier", "0",
                 "--out", str(out)]) == 0  # fmt: skip
    assert "46 neurons" in capsys.readouterr().out
    # wiring only (4 prompts are too few for the default noise-floor tolerances; the test above checks those)
    rc = main(["verify", "--original", "bundled:smollm2", "--exported", str(out), "--limit", "4", "--threads", "1",
               "--max-kl-ratio", "2", "--max-top1-drop", "0.1", "--json", str(tmp_path / "v.json")])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0 and "PASSED" in text and "noise floor" in text
    saved = json.loads((tmp_path / "v.json").read_text())
    assert saved["passed"] and saved["settings"]["max_kl_ratio"] == 2 and saved["metrics"]["prompts"] == 4
    # export --verify checks before the rename: an impossible tolerance exits 3 and writes nothing
    bad = tmp_path / "unverified.gguf"
    rc = main(["export", "--model", "bundled:smollm2", "--circuit", str(circ), "--multiplier", "0", "--out", str(bad),
               "--no-modelfile", "--verify", "--limit", "2", "--threads", "1", "--max-kl-ratio", "0.5",
               "--max-effect-share", "0"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 3 and "verification failed" in captured.err and "noise floor" in captured.out
    assert f"candidate    {bad} in llama.cpp" in captured.out  # the output's name, not its unnamed temporary
    assert not bad.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".unverified")]
    # a circuit found on other weights needs --force
    other = Circuit(model=circuit.model.model_copy(update={"fingerprint": "0" * 64}),
                    neurons=[Neuron(layer=1, index=2)])
    other.save(tmp_path / "other.json")
    rc = main(["export", "--model", "bundled:smollm2", "--circuit", str(tmp_path / "other.json"), "--multiplier", "0",
               "--out", str(tmp_path / "o.gguf"), "--no-modelfile"])  # fmt: skip
    assert rc == 2 and "--force" in capsys.readouterr().err
