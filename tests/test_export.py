"""Safetensors export: folding math, shard streaming, provenance, and every refusal path."""

from __future__ import annotations

import errno
import filecmp
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import EXPORT_COMBOS, EXPORT_IDS, PLANTED, planted_circuit
from safetensors import safe_open

from cna_export import cli
from cna_export.core.circuit import Circuit, Neuron
from cna_export.core.errors import CnaError
from cna_export.core.manifest import MANIFEST_FILE, SHARD_METADATA_KEY, ExportManifest
from cna_export.export.fold import changed_slices, estimate_multipliers, scale_columns, scale_rows
from cna_export.export.safetensors import export_safetensors, model_card
from cna_export.io import safetensors as st_io
from cna_export.io import shard_patch
from cna_export.io.identity import checkpoint_identity
from cna_export.io.tensor_bytes import tensor_sha256
from cna_export.model.loading import load_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models gain nothing from threads


def _all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    ckpt = st_io.Checkpoint.open(folder)
    return {name: ckpt.read(name).clone() for name in ckpt.weight_map}


def _tree_hash(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


# -- fold.py -------------------------------------------------------------------------------------


def test_scale_columns_is_exact_for_fp32_and_keeps_everything_else():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    before = w.clone()
    idx, ms = [0, 3, 7, 15], [0.0, -1.0, 2.0, 0.5]
    out = scale_columns(w, idx, ms)
    assert torch.equal(w, before)  # input untouched
    for j, m in zip(idx, ms):
        assert torch.equal(out[:, j], w[:, j] * m)
    assert changed_slices(w, out, "column") == [j for j, m in zip(idx, ms) if m != 1.0]
    est = estimate_multipliers(w, out, [3, 7, 15])
    assert [est[j]["multiplier"] for j in (3, 7, 15)] == [-1.0, 2.0, 0.5]
    rows = scale_rows(w, [2], [3.0])
    assert torch.equal(rows[2], (w[2] * 3.0)) and changed_slices(w, rows, "row") == [2]
    bias = scale_rows(torch.ones(5), [4], [0.25])
    assert bias.tolist() == [1, 1, 1, 1, 0.25]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scale_columns_rounds_once_for_half_types(dtype):
    torch.manual_seed(1)
    w = torch.randn(64, 32).to(dtype)
    m = 0.3  # not a power of two: one rounding per element
    out = scale_columns(w, [5], [m])
    exact = w[:, 5].double() * m
    assert torch.equal(out[:, 5], (w[:, 5].float() * m).to(dtype))  # fp32 product, rounded once
    eps = torch.finfo(dtype).eps  # ulp at 1.0; half an ulp relative is eps / 2
    assert ((out[:, 5].double() - exact).abs() <= exact.abs() * eps / 2 + 1e-30).all()
    assert changed_slices(w, out) == [5]


def test_scale_columns_refuses_bad_input():
    w = torch.zeros(4, 4)
    with pytest.raises(CnaError, match="out of range"):
        scale_columns(w, [4], [0.0])
    with pytest.raises(CnaError, match="listed twice"):
        scale_columns(w, [1, 1], [0.0, 0.0])
    with pytest.raises(CnaError, match="not floating point"):
        scale_columns(torch.zeros(4, 4, dtype=torch.int8), [1], [0.0])


# -- identity ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("combo", EXPORT_COMBOS, ids=EXPORT_IDS)
def test_checkpoint_fingerprint_equals_loaded_fingerprint(combo, export_sources):
    src = export_sources[combo]
    ident, arch, ckpt, names = checkpoint_identity(src, str(src))
    loaded = load_model(str(src))  # float32 on CPU: lossless for bf16 checkpoints too
    li = loaded.identity()
    assert ident.fingerprint == li.fingerprint
    assert (ident.num_layers, ident.intermediate_size, ident.hidden_size) == \
        (li.num_layers, li.intermediate_size, li.hidden_size)
    assert ident.dtype == combo[1]
    assert names == [f"model.layers.{i}.mlp.down_proj.weight" for i in range(3)]
    if combo[2]:
        assert len(ckpt.files) >= 3
    # a single changed bit changes the fingerprint
    with torch.no_grad():
        loaded.down_proj(1).weight[0, 0] += 1.0
    loaded._fingerprints.clear()  # the per-scheme cache, computed before the change
    assert loaded.fingerprint() != ident.fingerprint


# -- export ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("combo", EXPORT_COMBOS, ids=EXPORT_IDS)
def test_export_scales_only_circuit_columns(combo, export_sources, tmp_path):
    from transformers import AutoModelForCausalLM

    src = export_sources[combo]
    before_tree = _tree_hash(src)
    circuit = planted_circuit(src)
    out = tmp_path / "out"
    result = export_safetensors(str(src), circuit, out, multipliers=dict(PLANTED))
    assert _tree_hash(src) == before_tree  # the input is never modified
    assert _leftovers(tmp_path, "out") == []

    # same files, same shard layout, index and non-weight files byte-identical
    src_files = {p.name for p in src.iterdir()}
    out_files = {p.name for p in out.iterdir()}
    assert out_files == src_files | {MANIFEST_FILE, "README.md"}
    for name in src_files:
        if name.endswith(".safetensors") and name in result.rewritten_shards:
            continue
        assert filecmp.cmp(src / name, out / name, shallow=False), name
    if combo[2]:
        assert len(result.copied_shards) >= 1 and (out / "model.safetensors.index.json").is_file()

    # tensor by tensor: names, dtypes, shapes kept; only circuit columns changed, by the multiplier
    a, b = _all_tensors(src), _all_tensors(out)
    assert a.keys() == b.keys()
    dtype = getattr(torch, combo[1])
    for name in a:
        assert b[name].dtype == a[name].dtype == dtype and b[name].shape == a[name].shape
        layer = next((l for l in range(3) if name == f"model.layers.{l}.mlp.down_proj.weight"), None)
        planted = {i: m for (l, i), m in PLANTED.items() if l == layer}
        if not planted:
            assert tensor_sha256(a[name]) == tensor_sha256(b[name]), name  # bit for bit
            continue
        assert changed_slices(a[name], b[name]) == sorted(j for j, m in planted.items() if m != 1.0)
        for j, m in planted.items():
            assert torch.equal(b[name][:, j], a[name][:, j] * m)  # exact for 0, -1, 2, 0.5 in any dtype

    # provenance: manifest hashes match the tensors; shard metadata kept and extended
    manifest = ExportManifest.load(out)
    assert manifest.fold == "down" and manifest.format == "safetensors" and manifest.verification is None
    assert manifest.multiplier_map() == PLANTED
    assert {t.name for t in manifest.tensors} == {"model.layers.0.mlp.down_proj.weight",
                                                  "model.layers.2.mlp.down_proj.weight"}
    for t in manifest.tensors:
        assert t.sha256_before == tensor_sha256(a[t.name]) and t.sha256_after == tensor_sha256(b[t.name])
        assert t.dtype == combo[1] and t.axis == "column"
        assert t.indices == sorted(i for (l, i) in PLANTED if f"layers.{l}." in t.name)
        with safe_open(out / t.file, "pt") as f:
            meta = f.metadata()
        assert meta["format"] == "pt"
        summary = json.loads(meta[SHARD_METADATA_KEY])
        assert summary["fold"] == "down" and t.name in summary["tensors"] and summary["multiplier"] == "per-neuron"
    for shard in result.copied_shards:
        with safe_open(out / shard, "pt") as f:
            assert SHARD_METADATA_KEY not in (f.metadata() or {})

    # transformers loads it, in the same dtype
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.model.layers[0].mlp.down_proj.weight.dtype == dtype
    assert torch.equal(model.model.layers[2].mlp.down_proj.weight.detach(), b["model.layers.2.mlp.down_proj.weight"])


def test_bf16_export_is_within_one_rounding(export_sources, tmp_path):
    src = export_sources[("llama", "bfloat16", True)]
    m = 0.3  # not representable: each scaled weight is rounded once from the float32 product
    export_safetensors(str(src), planted_circuit(src), tmp_path / "out", multiplier=m)
    a, b = _all_tensors(src), _all_tensors(tmp_path / "out")
    eps = torch.finfo(torch.bfloat16).eps
    for layer in (0, 2):
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        cols = sorted(i for (l, i) in PLANTED if l == layer)
        exact = a[name][:, cols].double() * m
        got = b[name][:, cols].double()
        assert ((got - exact).abs() <= exact.abs() * eps / 2).all()
        assert torch.equal(b[name][:, cols], (a[name][:, cols].float() * m).to(torch.bfloat16))
        assert changed_slices(a[name], b[name]) == [c for c in cols if (a[name][:, c] != 0).any()]
        est = estimate_multipliers(a[name], b[name], cols)
        assert all(abs(est[c]["multiplier"] - m) < eps for c in cols)


def test_model_card_has_front_matter_and_steering(export_sources, tmp_path):
    from huggingface_hub import ModelCard

    src = export_sources[("llama", "float32", True)]
    out = tmp_path / "out"
    export_safetensors(str(src), planted_circuit(src), out, multiplier=0.0)
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == str(src)
    assert {"cna-export", "steering"} <= set(card.data.tags)
    assert "6 MLP neurons in 2 layers" in card.text and "L0: 3, L2: 3" in card.text
    assert "Not verified" in card.text
    m = ExportManifest.load(out)
    assert "verified at export time" in model_card(m, _fake_report()).lower()


def _fake_report():
    from cna_export.verification.report import Tolerances, VerifyReport

    return VerifyReport.build({"prompts": 2.0, "positions": 10.0, "max_abs_logit_delta": 0.0, "greedy_identical": 1.0},
                              Tolerances.for_dtype("float32"), reference="r", candidate="c", dtype="float32")


def test_per_neuron_multipliers_from_circuit_and_file(export_sources, tmp_path):
    src = export_sources[("qwen2", "float32", True)]
    own = planted_circuit(src, own=True)
    r1 = export_safetensors(str(src), own, tmp_path / "own")
    assert r1.manifest.multiplier_map() == PLANTED
    mfile = tmp_path / "m.json"
    mfile.write_text(json.dumps({f"{l}:{i}": m for (l, i), m in PLANTED.items()}))
    r2 = export_safetensors(str(src), planted_circuit(src), tmp_path / "file", multipliers=mfile)
    assert r2.manifest.multiplier_map() == PLANTED
    a, b = _all_tensors(tmp_path / "own"), _all_tensors(tmp_path / "file")
    assert {k: tensor_sha256(v) for k, v in a.items()} == {k: tensor_sha256(v) for k, v in b.items()}


def test_link_hard_links_untouched_shards(export_sources, tmp_path):
    src = export_sources[("llama", "float32", True)]
    before = _tree_hash(src)
    out = tmp_path / "linked"
    r = export_safetensors(str(src), planted_circuit(src), out, multiplier=0.0, link=True)
    assert r.linked and len(r.copied_shards) >= 3
    for shard in r.copied_shards:
        assert os.stat(out / shard).st_ino == os.stat(src / shard).st_ino
    for shard in r.rewritten_shards:
        assert os.stat(out / shard).st_ino != os.stat(src / shard).st_ino
    assert _tree_hash(src) == before


def test_overwrite_replaces_output(export_sources, tmp_path):
    src = export_sources[("llama", "float32", False)]
    out = tmp_path / "out"
    export_safetensors(str(src), planted_circuit(src), out, multiplier=0.0)
    with pytest.raises(CnaError, match="already exists"):
        export_safetensors(str(src), planted_circuit(src), out, multiplier=2.0)
    export_safetensors(str(src), planted_circuit(src), out, multiplier=2.0, overwrite=True)
    assert set(ExportManifest.load(out).multiplier_map().values()) == {2.0}
    assert _leftovers(tmp_path, "out") == []


def test_other_weight_files_are_left_out(export_sources, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(export_sources[("llama", "float32", False)], src)
    (src / "pytorch_model.bin").write_bytes(b"unsteered pickle")
    (src / "extra").mkdir()
    (src / "extra" / "notes.txt").write_text("keep me")
    r = export_safetensors(str(src), planted_circuit(src), tmp_path / "out", multiplier=0.0)
    assert r.left_out == ["pytorch_model.bin"] and not (tmp_path / "out" / "pytorch_model.bin").exists()
    assert (tmp_path / "out" / "extra" / "notes.txt").read_text() == "keep me"
    assert any("pytorch_model.bin" in n for n in r.manifest.notes)


# -- refusals (CLI: one line, exit 2, nothing left behind) ------------------------------------------------


def _run(capsys, *argv) -> tuple[int, list[str]]:
    code = cli.main(["-q", *map(str, argv)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err


@pytest.fixture()
def broken_sources(export_sources, tmp_path):
    """Copies of the sharded fp32 llama: one with a shard missing, one whose index lies."""
    good = export_sources[("llama", "float32", True)]
    missing = tmp_path / "missing"
    shutil.copytree(good, missing)
    index = json.loads((missing / "model.safetensors.index.json").read_text())
    victim = index["weight_map"]["lm_head.weight"]
    (missing / victim).unlink()
    lying = tmp_path / "lying"
    shutil.copytree(good, lying)
    index["weight_map"]["lm_head.weight"] = index["weight_map"]["model.norm.weight"]
    (lying / "model.safetensors.index.json").write_text(json.dumps(index))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for f in good.iterdir():
        if not f.name.startswith("model"):
            shutil.copy(f, pickled / f.name)
    (pickled / "pytorch_model.bin").write_bytes(b"not really")
    return {"missing": (missing, victim), "lying": lying, "pickled": pickled}


def test_cli_refusals_are_one_line(export_sources, broken_sources, tmp_path, capsys):
    src = export_sources[("llama", "float32", True)]
    circuit = tmp_path / "c.json"
    planted_circuit(src).save(circuit)
    other = tmp_path / "other.json"
    c = planted_circuit(src)
    other_ident = c.model.model_copy(update={"fingerprint": "0" * 64, "name": "elsewhere"})
    c.model_copy(update={"model": other_ident}).save(other)
    too_big = tmp_path / "big.json"
    Circuit(model=c.model, neurons=[Neuron(layer=3, index=0)]).save(too_big)
    nan_file = tmp_path / "nan.json"
    nan_file.write_text(json.dumps({f"{l}:{i}": "nan" for (l, i) in PLANTED}))
    extra_file = tmp_path / "extra.json"
    extra_file.write_text(json.dumps({**{f"{l}:{i}": 0.0 for (l, i) in PLANTED}, "0:63": 0.0}))
    out = tmp_path / "out"
    exists = tmp_path / "exists"
    exists.mkdir()
    missing, victim = broken_sources["missing"]
    cases = [
        (["--model", src, "--circuit", circuit, "--multiplier", 0, "--out", exists],
         "already exists; pass --overwrite"),
        (["--model", src, "--circuit", circuit, "--multiplier", 0, "--out", src / "sub"], "inside the input"),
        (["--model", src, "--circuit", circuit, "--multiplier", 0, "--out", src, "--overwrite"], "is the input itself"),
        (["--model", missing, "--circuit", circuit, "--multiplier", 0, "--out", out],
         f"names shard {victim}, which is missing"),
        (["--model", broken_sources["lying"], "--circuit", circuit, "--multiplier", 0, "--out", out],
         "but that shard has no such tensor"),
        (["--model", broken_sources["pickled"], "--circuit", circuit, "--multiplier", 0, "--out", out],
         "--allow-pickle"),
        (["--model", src, "--circuit", too_big, "--multiplier", 0, "--out", out], "layer 3 is out of range"),
        (["--model", src, "--circuit", other, "--multiplier", 0, "--out", out], "different weights"),
        (["--model", src, "--circuit", circuit, "--multiplier", "inf", "--out", out], "finite"),
        (["--model", src, "--circuit", circuit, "--multipliers", nan_file, "--out", out], "finite"),
        (["--model", src, "--circuit", circuit, "--out", out], "no multiplier for neuron"),
        (["--model", src, "--circuit", circuit, "--multiplier", 0, "--multipliers", nan_file, "--out", out],
         "not both"),
        (["--model", tmp_path / "nope", "--circuit", circuit, "--multiplier", 0, "--out", out], "not found"),
        (["--model", src, "--circuit", tmp_path / "nope.json", "--multiplier", 0, "--out", out],
         "circuit file not found"),
        (["--model", "nobody/nothing", "--circuit", circuit, "--multiplier", 0, "--out", out],
         "from the Hugging Face Hub"),
        (["--model", src, "--circuit", circuit, "--multipliers", extra_file, "--out", out],
         "names neuron (layer 0, index 63), which is not in the circuit"),
        (["--model", src, "--circuit", circuit, "--multiplier", 0, "--out", out, "--private"],
         "--private applies to the Hub repo that --push-to-hub creates"),
        (["--model", src, "--circuit", circuit, "--multiplier", 0, "--out", tmp_path / "out.gguf", "--format",
          "safetensors"], "--format safetensors writes a folder, not"),
    ]
    for argv, message in cases:
        code, err = _run(capsys, "export", *argv)
        assert code == 2, (argv, err)
        assert len(err) == 1 and err[0].startswith("cna-export: error: ") and message in err[0], (message, err)
        assert not out.exists() and _leftovers(tmp_path, "out") == [] and not (tmp_path / "out.gguf").exists()
        assert exists.is_dir() and not any(exists.iterdir())
    # the fingerprint refusal is lifted by --force, and the note is kept in the manifest
    code, err = _run(capsys, "export", "--model", src, "--circuit", other, "--multiplier", 0, "--out", out, "--force")
    assert code == 0 and any("applied anyway" in n for n in ExportManifest.load(out).notes)


def test_write_failure_part_way_leaves_nothing(export_sources, tmp_path, capsys, monkeypatch):
    src = export_sources[("llama", "float32", True)]
    circuit = tmp_path / "c.json"
    planted_circuit(src).save(circuit)
    real = shard_patch.patch_shard
    calls = []

    def flaky(*args, **kwargs):
        calls.append(args[1])
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(shard_patch, "patch_shard", flaky)
    out = tmp_path / "out"
    code, err = _run(capsys, "export", "--model", src, "--circuit", circuit, "--multiplier", 0, "--out", out)
    assert len(calls) == 2 and Path(calls[0]).is_relative_to(tmp_path)  # one shard was written before the failure
    assert code == 2 and len(err) == 1 and "No space left on device" in err[0]
    assert not out.exists() and _leftovers(tmp_path, "out") == []


def test_cli_export_summary(export_sources, tmp_path, capsys):
    src = export_sources[("qwen2", "float32", True)]
    circuit = tmp_path / "c.json"
    planted_circuit(src).save(circuit)
    code = cli.main(["export", "--model", str(src), "--circuit", str(circuit), "--multiplier", "0",
                     "--out", str(tmp_path / "out"), "--link"])
    text = capsys.readouterr().out
    assert code == 0
    assert "6 neurons in 2 layers; multiplier 0" in text and "hard-linked" in text and "not run" in text


def test_pickled_source_is_converted_only_with_allow_pickle(export_sources, tmp_path, capsys):
    good = export_sources[("llama", "bfloat16", True)]
    src = tmp_path / "pickled"
    src.mkdir()
    for f in good.iterdir():
        if not f.name.startswith("model"):
            shutil.copy(f, src / f.name)
    tensors = _all_tensors(good)
    torch.save(tensors, src / "pytorch_model.bin")
    circuit = tmp_path / "c.json"
    planted_circuit(good).save(circuit)
    out = tmp_path / "out"
    code, err = _run(capsys, "export", "--model", src, "--circuit", circuit, "--multiplier", 0, "--out", out)
    assert code == 2 and len(err) == 1 and "--allow-pickle" in err[0] and not out.exists()
    r = export_safetensors(str(src), circuit, out, multiplier=0.0, allow_pickle=True)
    assert r.converted and r.manifest.source_format == "hf"
    exported = _all_tensors(out)
    assert exported.keys() == tensors.keys()
    assert all(t.dtype == torch.bfloat16 for t in exported.values())  # the checkpoint's dtype is kept
    assert not (out / "pytorch_model.bin").exists() and _leftovers(tmp_path, "out") == []
    for name, t in tensors.items():
        if "down_proj" not in name:
            assert tensor_sha256(exported[name]) == tensor_sha256(t), name
    w = tensors["model.layers.2.mlp.down_proj.weight"]
    assert torch.equal(exported["model.layers.2.mlp.down_proj.weight"][:, [5, 30, 63]], w[:, [5, 30, 63]] * 0)


# -- the export seam: one request, one rule per flag -----------------------------------------------


def test_format_options_one_rule_for_export_and_steer():
    """export refuses a flag of another format (one line); steer, exporting several formats from one set of
    flags, leaves it out of the formats it does not name."""
    from cna_export.core.formats import (
        GGUFFormat,
        GGUFLoraFormat,
        LoraFormat,
        SafetensorsFormat,
        format_options,
    )
    from cna_export.core.settings import ExportOptions, GGUFExportOptions, ModelOptions

    e = ExportOptions(link=True, max_shard_size="1GB")
    g = GGUFExportOptions(fold="up", fast_copy=True, modelfile=False, adapter_dtype="bfloat16")
    m = ModelOptions(allow_pickle=True, trust_remote_code=True)
    for fmt, out, message in (("gguf", "x.gguf", "--adapter-dtype applies to LoRA"),
                              ("lora", "x", "--link, --max-shard-size and --dtype apply to safetensors"),
                              ("gguf-lora", "x.gguf", "--link, --max-shard-size and --dtype apply to safetensors")):
        with pytest.raises(CnaError, match=message):
            format_options(fmt, out, e, g, m)
    assert format_options("safetensors", "x", e, g, m, strict=False) == SafetensorsFormat(
        fold="up", link=True, max_shard_size="1GB", allow_pickle=True, trust_remote_code=True)  # --fold: both
    assert format_options("gguf", "x.gguf", e, g, m, strict=False) == GGUFFormat(fast_copy=True, modelfile=False)
    assert format_options("lora", "x", e, g, m, strict=False) == LoraFormat(dtype="bfloat16", trust_remote_code=True)
    assert format_options("gguf-lora", "x.gguf", e, g, m, strict=False) == GGUFLoraFormat(modelfile=False)
    plain = (ExportOptions(), GGUFExportOptions(adapter_dtype="float16"), ModelOptions())
    assert format_options("gguf-lora", "a.gguf", *plain) == GGUFLoraFormat(dtype="F16")
    with pytest.raises(CnaError, match="writes a .gguf adapter file"):
        format_options("gguf-lora", "a", *plain)


def test_export_request_loads_once_and_collects_every_input(export_sources, tmp_path):
    from cna_export.export.request import ExportRequest

    src = export_sources[("llama", "float32", False)]
    circuit, mfile = tmp_path / "c.json", tmp_path / "m.json"
    planted_circuit(src).save(circuit)
    mfile.write_text(json.dumps({f"{l}:{i}": m for (l, i), m in PLANTED.items()}))
    request = ExportRequest.build(str(src), circuit, tmp_path / "out", multipliers=mfile)
    assert request.multipliers == PLANTED and len(request.circuit.neurons) == len(PLANTED)
    assert request.inputs == (src.resolve(), circuit, mfile)
    for taken in (circuit, mfile):
        with pytest.raises(CnaError, match="is the input itself"):
            ExportRequest.build(str(src), circuit, taken, multipliers=mfile, overwrite=True).claim()
    with pytest.raises(CnaError, match="has no neurons"):
        ExportRequest.build(str(src), Circuit(model=planted_circuit(src).model, neurons=[]), tmp_path / "o")


def test_generate_refuses_a_circuit_for_another_model_before_loading(export_sources, tmp_path, monkeypatch):
    import cna_export.model.loading as loading
    from cna_export.pipeline import run_generate

    src = export_sources[("llama", "float32", False)]
    c = planted_circuit(src)
    wider = c.model.model_copy(update={"intermediate_size": c.model.intermediate_size * 2})
    other = tmp_path / "other.json"
    c.model_copy(update={"model": wider}).save(other)

    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded before the circuit was checked")

    monkeypatch.setattr(loading, "load_model", no_load)
    with pytest.raises(CnaError, match="does not fit the model"):
        run_generate(str(src), ["hi"], other, 0.0)


def test_push_while_offline_is_one_line(export_sources, tmp_path, monkeypatch):
    import requests
    from huggingface_hub import HfApi

    from cna_export.export.hub import push_export

    src = export_sources[("llama", "float32", False)]
    out = tmp_path / "out"
    export_safetensors(str(src), planted_circuit(src), out, multiplier=0.0)

    def offline(*args, **kwargs):
        raise requests.exceptions.ConnectionError("Failed to resolve 'huggingface.co'\nmore lines")

    monkeypatch.setattr(HfApi, "create_repo", offline)
    with pytest.raises(CnaError, match=r"^Hub upload to me/x failed: cannot reach the Hub \(Failed to resolve") as e:
        push_export(out, "me/x", token="hf_x")
    assert "\n" not in str(e.value) and (out / MANIFEST_FILE).is_file()


@pytest.mark.parametrize("combo", [("llama", "float32", True), ("qwen2", "bfloat16", False)],
                         ids=["llama-fp32-sharded", "qwen2-bf16-single"])
def test_up_fold_scales_up_rows_at_the_cost_of_a_copy(combo, export_sources, tmp_path, capsys):
    """--fold up: only each circuit layer's up_proj rows change, each times its multiplier (exact for these
    multipliers); everything else is byte for byte the source's; it behaves like the down fold (and verifies
    against hook steering), and the embedded manifest's check passes."""
    from cna_export.verification.safetensors import VerifyOptions, verify_export

    src = export_sources[combo]
    circuit = planted_circuit(src)
    up, down = tmp_path / "up", tmp_path / "down"
    result = export_safetensors(str(src), circuit, up, multipliers=dict(PLANTED), fold="up")
    export_safetensors(str(src), circuit, down, multipliers=dict(PLANTED))
    a, b = _all_tensors(src), _all_tensors(up)
    for name in a:
        layer = next((l for l in range(3) if name == f"model.layers.{l}.mlp.up_proj.weight"), None)
        planted = {i: m for (l, i), m in PLANTED.items() if l == layer}
        if not planted:
            assert tensor_sha256(a[name]) == tensor_sha256(b[name]), name
            continue
        assert changed_slices(a[name], b[name], "row") == sorted(j for j, m in planted.items() if m != 1.0)
        for j, m in planted.items():
            assert torch.equal(b[name][j], a[name][j] * m)
    manifest = ExportManifest.load(up)
    assert manifest.fold == "up" and {t.axis for t in manifest.tensors} == {"row"}
    assert {t.name for t in manifest.tensors} == {"model.layers.0.mlp.up_proj.weight",
                                                  "model.layers.2.mlp.up_proj.weight"}
    for t in manifest.tensors:
        assert t.sha256_before == tensor_sha256(a[t.name]) and t.sha256_after == tensor_sha256(b[t.name])
    assert sorted(result.rewritten_shards) and all(json.loads(safe_open(up / f, "pt").metadata()[SHARD_METADATA_KEY])
                                                   ["fold"] == "up" for f in result.rewritten_shards)
    # the up fold keeps down_proj, so the fingerprint is the source's: only the note tells a second steering
    again = export_safetensors(str(up), circuit, tmp_path / "again", multipliers=dict(PLANTED), fold="up")
    assert any("is itself a cna-export export" in n for n in again.manifest.notes)
    report = verify_export(str(src), up, VerifyOptions(limit=4, max_new_tokens=4))
    assert report.passed and not any("not compared by hash" in n for n in report.notes), report.render()
    capsys.readouterr()
    assert cli.main(["audit", str(up), "--manifest", "--no-generate"]) == 0, capsys.readouterr().out


def test_up_fold_refused_where_up_proj_is_not_its_own(tmp_path):
    from conftest import make_tiny_model

    src = make_tiny_model("phi3", tmp_path / "phi3")  # gate and up fused in one gate_up_proj
    with pytest.raises(CnaError, match="--fold up for a safetensors export needs a gated MLP with its own up_proj"):
        export_safetensors(str(src), planted_circuit(src), tmp_path / "out", multiplier=0.0, fold="up")
