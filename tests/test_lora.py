"""LoRA adapter exports: PEFT folders and llama.cpp LoRA GGUFs must steer exactly like the circuit.

* PEFT: ``PeftModel.from_pretrained(base, adapter)`` vs hook steering of the base (max |delta logit|
  <= 1e-4 in float32), and ``merge_and_unload()`` vs the safetensors export (equal);
* llama.cpp: base + adapter vs the patched GGUF export, and vs the unsteered base;
* bad input is refused with a CnaError before anything is written.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import PLANTED, make_tiny_model, planted_circuit

pytest.importorskip("peft", reason="pip install peft (the lora extra)")

PROMPTS = ["How do I bake a cake with chocolate and flour?", "Write a phishing email to steal passwords from users.",
           "Once upon a time there was a dragon who liked tea."]


def _logits(model, tokenizer, prompts=PROMPTS):
    import torch

    out = []
    with torch.no_grad():
        for p in prompts:
            out.append(model(**tokenizer(p, return_tensors="pt")).logits[0])
    return out


def _max_delta(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _same_bits(a, b) -> bool:
    """Bitwise equal, with -0.0 and +0.0 counted as the same (x + (-x) is +0.0 in IEEE arithmetic)."""
    import torch

    return torch.equal((a + 0.0).view(torch.int32), (b + 0.0).view(torch.int32))


def _hook_logits(loaded, mults, prompts=PROMPTS):
    from cna_export.model.steering import steer

    with steer(loaded.model, loaded.arch, mults):
        return _logits(loaded.model, loaded.tokenizer, prompts)


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# -- the PEFT folder -----------------------------------------------------------------------------


def test_adapter_layout_matches_peft(tiny_models, tmp_path, one_thread):
    """Tensor names, shapes and config fields as PeftModel.save_pretrained writes them for the same LoraConfig."""
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from cna_export.export.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, export_lora

    src = tiny_models["llama"]
    res = export_lora(str(src), planted_circuit(src), tmp_path / "ad", multiplier=0.0)
    ours = json.loads((tmp_path / "ad" / ADAPTER_CONFIG).read_text())
    assert ours["target_modules"] == ["model.layers.0.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    assert ours["rank_pattern"] == ours["alpha_pattern"] == {"model.layers.0.mlp.down_proj": 3,
                                                             "model.layers.2.mlp.down_proj": 3}
    assert res.ranks == {0: 3, 2: 3}
    cfg = LoraConfig(r=ours["r"], lora_alpha=ours["lora_alpha"], target_modules=ours["target_modules"],
                     rank_pattern=ours["rank_pattern"], alpha_pattern=ours["alpha_pattern"], lora_dropout=0.0,
                     bias="none", task_type="CAUSAL_LM")
    get_peft_model(AutoModelForCausalLM.from_pretrained(src), cfg).save_pretrained(tmp_path / "peft")
    theirs = json.loads((tmp_path / "peft" / ADAPTER_CONFIG).read_text())
    for key, value in ours.items():
        want = theirs[key]
        if isinstance(want, list):
            want, value = sorted(want), sorted(value)
        assert value == want or key in ("base_model_name_or_path", "init_lora_weights"), key

    def shapes(path):
        with safe_open(path, "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    assert shapes(tmp_path / "ad" / ADAPTER_WEIGHTS) == shapes(tmp_path / "peft" / ADAPTER_WEIGHTS)
    assert {"adapter_config.json", "adapter_model.safetensors", "cna_manifest.json", "README.md"} <= \
        _files(tmp_path / "ad")
    assert "library_name: peft" in (tmp_path / "ad" / "README.md").read_text()


@pytest.mark.parametrize("arch", ["llama", "phi3"])  # phi3: fused gate_up; the adapter targets down_proj only
def test_peft_adapter_is_exact(arch, tiny_models, tiny_loaded, tmp_path, one_thread):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from cna_export.export.lora import export_lora
    from cna_export.export.safetensors import export_safetensors
    from cna_export.model.loading import load_model

    src = tiny_models[arch]
    circ = planted_circuit(src, mults={**PLANTED, (1, 9): 1.3, (1, 50): -0.7}, own=True)
    res = export_lora(str(src), circ, tmp_path / "ad")
    export_safetensors(str(src), circ, tmp_path / "st")
    assert res.manifest.format == "lora" and res.ranks == {0: 3, 1: 2, 2: 3}

    base = tiny_loaded(arch)
    ref = _hook_logits(base, res.manifest.multiplier_map())
    fresh = load_model(str(src))
    peft = PeftModel.from_pretrained(fresh.model, tmp_path / "ad")
    got = _logits(peft, fresh.tokenizer)
    assert _max_delta(got, ref) <= 1e-4
    assert _max_delta(_logits(base.model, base.tokenizer), ref) > 1e-2  # the steering is visible

    merged = peft.merge_and_unload().state_dict()
    exported = load_file(tmp_path / "st" / "model.safetensors")
    original = load_file(src / "model.safetensors")
    touched = {t.name for t in res.manifest.tensors}
    for name, tensor in exported.items():
        if name in touched:
            # equal everywhere; bit for bit except where a multiplier 1.3 / -0.7 column has no float32 B that
            # rounds back to the folded value (measured: none for 0, -1, 2, 0.5)
            same = tensor.eq(merged[name])
            planted_cols = [j for (layer, j) in PLANTED if name == f"model.layers.{layer}.mlp.down_proj.weight"]
            assert bool(same[:, planted_cols].all()), name
            assert _same_bits(merged[name][:, planted_cols], tensor[:, planted_cols]), name
            assert float((merged[name] - tensor).abs().max()) <= 1e-6
        else:
            assert torch.equal(merged[name], original[name]), name


def test_lora_refuses_bad_input(tiny_models, tmp_path, one_thread):
    from cna_export.core.errors import CnaError
    from cna_export.export.gguf_lora import export_gguf_lora
    from cna_export.export.lora import export_lora

    src = tiny_models["llama"]
    circ = planted_circuit(src, own=True)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(CnaError, match="already exists"):
        export_lora(str(src), circ, taken)
    assert _files(taken) == {"keep.txt"}

    other = make_tiny_model("llama", tmp_path / "other", seed=1)  # same shapes, other weights
    with pytest.raises(CnaError, match="(?i)fingerprint|different model"):
        export_lora(str(other), circ, tmp_path / "ad")
    with pytest.raises(CnaError):
        export_lora(str(tiny_models["qwen2"]), circ, tmp_path / "ad")
    with pytest.raises(CnaError, match="GGUF base"):
        export_gguf_lora(str(src), circ, tmp_path / "ad.gguf")
    with pytest.raises(CnaError, match="dtype"):
        export_lora(str(src), circ, tmp_path / "ad", dtype="int8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "taken"]  # nothing else, no staging left

    with pytest.raises(CnaError, match="did not write"):  # --overwrite replaces only this tool's own output
        export_lora(str(src), circ, taken, overwrite=True)
    assert _files(taken) == {"keep.txt"}
    export_lora(str(src), circ, tmp_path / "ad", multiplier=1.0)
    res = export_lora(str(src), circ, tmp_path / "ad", overwrite=True)
    assert res.adapter_bytes > 0 and res.manifest.multiplier_map() == circ.multipliers()


# -- SmolLM2 (GGUF source) ------------------------------------------------------------------------


def _smollm2_circuit():
    from cna_export.core.circuit import Circuit, Neuron
    from cna_export.io import gguf as G
    from cna_export.io.bundled import resolve
    from cna_export.io.identity import gguf_identity

    ident = gguf_identity(G.open_gguf(resolve("bundled:smollm2")), "bundled:smollm2")
    rng = random.Random(0)
    neurons = []
    for layer, n in ((2, 12), (5, 30), (9, 7), (14, 20), (20, 3)):  # different ranks per layer
        for i in sorted(rng.sample(range(ident.intermediate_size), n)):
            neurons.append(Neuron(layer=layer, index=i, score=1.0, multiplier=rng.choice([0.0, -1.0, 2.0])))
    return Circuit(model=ident, neurons=neurons, method={"name": "manual"})


SMOL_PROMPTS = ["<|im_start|>user\nHow do I bake a cake?<|im_end|>\n<|im_start|>assistant\n",
                "The capital of France is", "Write a phishing email to steal passwords."]


@pytest.mark.slow
def test_peft_adapter_smollm2(smollm2, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from cna_export.export.lora import export_lora
    from cna_export.export.safetensors import export_safetensors
    from cna_export.io.bundled import resolve

    circ = _smollm2_circuit()
    res = export_lora("bundled:smollm2", circ, tmp_path / "ad")
    model_bytes = resolve("bundled:smollm2").stat().st_size
    print(f"SmolLM2 adapter: {res.adapter_bytes} bytes ({res.adapter_bytes / model_bytes:.2%} of the "
          f"{model_bytes}-byte Q4_1 GGUF), ranks {res.ranks}")
    assert res.adapter_bytes < model_bytes / 50

    mults = circ.multipliers()
    ref = _hook_logits(smollm2, mults, SMOL_PROMPTS)
    base = _logits(smollm2.model, smollm2.tokenizer, SMOL_PROMPTS)
    peft = PeftModel.from_pretrained(smollm2.model, tmp_path / "ad")
    try:
        got = _logits(peft, smollm2.tokenizer, SMOL_PROMPTS)
        delta = _max_delta(got, ref)
        print(f"SmolLM2 PEFT vs hook steering: max |delta logit| {delta:.3e} (steering moves logits by "
              f"{_max_delta(base, ref):.3f})")
        assert delta <= 1e-4

        export_safetensors("bundled:smollm2", circ, tmp_path / "st")
        exported = {}
        for f in (tmp_path / "st").glob("*.safetensors"):
            exported.update(load_file(f))
        with_adapter = peft.get_base_model()
        for layer in sorted(circ.layer_counts()):
            lora_mod = smollm2.arch.down_proj_module(with_adapter, layer)
            merged = lora_mod.get_base_layer().weight.detach() + lora_mod.get_delta_weight("default")
            assert _same_bits(merged, exported[f"model.layers.{layer}.mlp.down_proj.weight"]), layer
    finally:
        peft.unload()  # the session's SmolLM2 stays unsteered for other tests
    assert _max_delta(_logits(smollm2.model, smollm2.tokenizer, SMOL_PROMPTS), base) == 0.0


def _llama_logits(model: Path, lora: Path | None, prompts=SMOL_PROMPTS):
    import numpy as np

    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(model), lora_path=str(lora) if lora else None, logits_all=True, n_ctx=256,
                          n_threads=2, verbose=False, seed=0)
    out = []
    try:
        for p in prompts:
            toks = llm.tokenize(p.encode(), add_bos=True, special=True)
            llm.reset()
            llm.eval(toks)
            out.append(np.array(llm.scores[: len(toks)], dtype=np.float32))
    finally:
        llm.close()
    return out


@pytest.mark.slow
@pytest.mark.llama
def test_gguf_lora_smollm2(tmp_path):
    import numpy as np

    from cna_export.core.errors import CnaError
    from cna_export.export.gguf import export_gguf
    from cna_export.export.gguf_lora import export_gguf_lora, read_gguf_lora_manifest
    from cna_export.io import gguf as G
    from cna_export.io.bundled import resolve

    base = resolve("bundled:smollm2")
    circ = _smollm2_circuit()
    out = tmp_path / "ad"
    out.mkdir()
    res = export_gguf_lora("bundled:smollm2", circ, out / "steer.gguf")
    assert res.rank == 30 and res.alpha == 30.0
    reader = G.open_gguf(res.out)
    assert G.field_value(reader, "general.type") == "adapter"
    assert G.field_value(reader, "adapter.type") == "lora"
    assert G.field_value(reader, "general.architecture") == "llama"
    assert G.field_value(reader, "adapter.lora.alpha") == 30.0
    tensors = G.tensor_map(reader)
    assert sorted(tensors) == sorted(f"blk.{layer}.ffn_down.weight.lora_{ab}"
                                     for layer in (2, 5, 9, 14, 20) for ab in "ab")
    assert G.np_shape(tensors["blk.5.ffn_down.weight.lora_a"]) == [30, 1536]
    assert G.np_shape(tensors["blk.5.ffn_down.weight.lora_b"]) == [576, 30]
    assert read_gguf_lora_manifest(res.out).multiplier_map() == circ.multipliers()
    modelfile = (out / "steer.Modelfile").read_text()
    assert f"FROM {base.resolve()}" in modelfile and "ADAPTER ./steer.gguf" in modelfile
    print(f"SmolLM2 GGUF LoRA: {res.bytes} bytes vs {base.stat().st_size} for the base")
    with pytest.raises(CnaError, match="already exists"):
        export_gguf_lora("bundled:smollm2", circ, out / "steer.gguf")

    (tmp_path / "p").mkdir()
    patched = export_gguf("bundled:smollm2", circ, tmp_path / "p" / "patched.gguf").out
    with_adapter = _llama_logits(base, res.out)
    folded = _llama_logits(patched, None)
    plain = _llama_logits(base, None)
    for a, p, b in zip(with_adapter, folded, plain):
        vs_patched, vs_base = float(np.abs(a - p).mean()), float(np.abs(a - b).mean())
        print(f"llama.cpp base+adapter vs patched GGUF: max {np.abs(a - p).max():.3f} mean {vs_patched:.4f}; "
              f"vs base: max {np.abs(a - b).max():.3f} mean {vs_base:.4f}; "
              f"top-1 agreement {(a.argmax(-1) == p.argmax(-1)).mean():.2%}")
        # Q4_1 weights, Q8_1-quantised activations: both are the steering up to llama.cpp's quantisation noise
        # (about 1.3 logits max between llama.cpp and transformers on the unsteered base)
        assert np.abs(a - p).max() < 1.5
    # over all positions: the adapter moves the logits where the patched export does, and agrees on the top token
    a, p, b = (np.concatenate(x) for x in (with_adapter, folded, plain))
    assert np.abs(a - p).mean() < 0.6 * np.abs(a - b).mean()
    assert (a.argmax(-1) == p.argmax(-1)).mean() >= 0.9


def test_verify_lora_as_export_check(tiny_models, tmp_path, one_thread):
    from cna_export.core.settings import VerifyOptions
    from cna_export.export.lora import export_lora
    from cna_export.verification.lora import verify_lora

    src = tiny_models["llama"]
    opts = VerifyOptions(limit=4, max_new_tokens=4)
    res = export_lora(str(src), planted_circuit(src, own=True), tmp_path / "ad",
                      check=lambda staged: verify_lora(staged.source, staged.path, opts, manifest=staged.manifest))
    assert res.verification.passed, res.verification.reasons
    assert res.verification.metrics["max_abs_logit_delta"] <= 1e-4
    assert res.manifest.verification is not None


# -- the command line: export, verify and audit for both adapter kinds ---------------------------


def _cli(argv, capsys):
    from cna_export.cli import main

    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_lora_export_verify_audit(tiny_models, tmp_path, capsys, one_thread):
    from safetensors.torch import load_file, save_file

    src = tiny_models["llama"]
    circuit = tmp_path / "c.json"
    planted_circuit(src, own=True).save(circuit)
    ad = tmp_path / "ad"
    few = ["--limit", "3", "--max-new-tokens", "2"]
    code, out, err = _cli(["export", "--model", str(src), "--circuit", str(circuit), "--out", str(ad), "--format",
                           "lora", "--verify", *few], capsys)
    assert code == 0, err
    assert "PEFT LoRA on down_proj, ranks L0:3 L2:3" in out and "PASSED" in out
    code, out, err = _cli(["verify", "--original", str(src), "--exported", str(ad), *few], capsys)
    assert code == 0 and "+ LoRA" in out, err
    code, out, _ = _cli(["audit", str(ad), "--manifest"], capsys)
    assert code == 0 and "manifest check passed: the adapter changes exactly the manifest's 6 neurons" in out
    code, out, _ = _cli(["audit", str(ad), "--base", str(src)], capsys)
    assert code == 4 and "6 neurons in layers [0, 2]" in out
    code, out, _ = _cli(["audit", str(ad)], capsys)
    assert code == 4 and "selecting 6 single MLP neurons" in out

    # an adapter that also changes a neuron the manifest does not list fails the manifest check (exit 3)
    tensors = load_file(ad / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
    tensors[key][0, 2] = 1.0  # the first row now also reads neuron 2
    save_file(tensors, str(ad / "adapter_model.safetensors"))
    code, out, _ = _cli(["audit", str(ad), "--manifest"], capsys)
    assert code == 3 and "manifest check FAILED" in out

    # the wrong base: one line, exit 2, for verify and audit
    other = make_tiny_model("llama", tmp_path / "other", seed=1)
    for argv in (["verify", "--original", str(other), "--exported", str(ad)],
                 ["audit", str(ad), "--manifest", "--base", str(other)]):
        code, _, err = _cli(argv, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "different base" in err, err


@pytest.mark.parametrize("extra, message", [
    (["--format", "lora", "--fold", "up"], "always acts on down_proj"),
    (["--format", "lora", "--fast-copy"], "always acts on down_proj"),
    (["--format", "lora", "--link"], "apply to safetensors exports"),
    (["--format", "lora", "--allow-pickle"], "--allow-pickle does not apply"),
    (["--format", "gguf-lora"], "GGUF base"),
    (["--format", "safetensors", "--adapter-dtype", "float16"], "--adapter-dtype applies to LoRA"),
])
def test_cli_lora_where_the_form_does_not_apply(extra, message, tiny_models, tmp_path, capsys):
    src = tiny_models["llama"]
    circuit = tmp_path / "c.json"
    planted_circuit(src, own=True).save(circuit)
    out = tmp_path / ("ad.gguf" if "gguf-lora" in extra else "ad")
    code, _, err = _cli(["export", "--model", str(src), "--circuit", str(circuit), "--out", str(out), *extra], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_cli_lora_out_names(tiny_models, tmp_path, capsys):
    src = tiny_models["llama"]
    circuit = tmp_path / "c.json"
    planted_circuit(src, own=True).save(circuit)
    code, _, err = _cli(["export", "--model", str(src), "--circuit", str(circuit), "--out", str(tmp_path / "a.gguf"),
                         "--format", "lora"], capsys)
    assert code == 2 and "gguf-lora" in err


def test_gguf_lora_tensor_check_and_wrong_base(tmp_path):
    """verify_gguf on a LoRA GGUF: exact adapter check (no llama.cpp needed), tampering caught, wrong base refused."""
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from test_gguf_export import MULTS, build_gguf, circuit_for

    from cna_export.core.errors import CnaError
    from cna_export.export.gguf_lora import export_gguf_lora
    from cna_export.io import gguf as G
    from cna_export.verification.gguf import verify_gguf

    src = build_gguf(tmp_path / "src.gguf", down_type=T.F32)
    res = export_gguf_lora(str(src), circuit_for(), tmp_path / "ad.gguf", multipliers=dict(MULTS), modelfile=True)
    rep = verify_gguf(str(src), res.out, behaviour=False)
    assert rep.passed, rep.reasons
    assert rep.metrics["adapter_alpha"] == rep.metrics["adapter_rank"] == res.rank
    assert verify_gguf(None, res.out, behaviour=False).passed  # the base recorded in the manifest
    assert res.modelfile == tmp_path / "ad.Modelfile"
    modelfile = res.modelfile.read_text()
    assert f"FROM {src.resolve()}" in modelfile and "ADAPTER ./ad.gguf" in modelfile and 'TEMPLATE """' in modelfile

    bad = tmp_path / "bad.gguf"
    data = bytearray(res.out.read_bytes())
    t = G.tensor_map(G.open_gguf(res.out))[f"{res.manifest.tensors[0].name}.lora_b"]
    off = t.data_offset + 4 * int(np.flatnonzero(np.asarray(t.data).ravel())[0])
    data[off + 3] ^= 0x01  # flip a sign bit of one B entry
    bad.write_bytes(bytes(data))
    rep = verify_gguf(str(src), bad, behaviour=False)
    assert not rep.passed and "lora_b" in rep.reasons[0]

    other = build_gguf(tmp_path / "other.gguf", down_type=T.F32, seed=1)
    with pytest.raises(CnaError, match="different base"):
        verify_gguf(str(other), res.out, behaviour=False)


def test_gguf_lora_records_its_base_file(tmp_path):
    """The adapter's base is a typed manifest field (path, size, fingerprint); an adapter written before
    manifest schema 2 recorded it as a note, which core.manifest reads once."""
    import json

    from gguf import GGMLQuantizationType as T
    from test_gguf_export import MULTS, build_gguf, circuit_for

    from cna_export.core.manifest import BaseFile, ExportManifest
    from cna_export.export.gguf_lora import export_gguf_lora, read_gguf_lora_manifest

    src = build_gguf(tmp_path / "src.gguf", down_type=T.F32)
    res = export_gguf_lora(str(src), circuit_for(), tmp_path / "ad.gguf", multipliers=dict(MULTS), modelfile=False)
    recorded = BaseFile(path=str(src.resolve()), size=src.stat().st_size, fingerprint=None)
    assert res.manifest.base_file == read_gguf_lora_manifest(res.out).base_file == recorded
    assert res.manifest.schema_version == 2 and not any(n.startswith("base file") for n in res.manifest.notes)
    assert recorded.local() == src.resolve() and recorded.name == "src.gguf"

    legacy = json.loads(res.manifest.to_json())
    legacy.update(schema_version=1, notes=legacy["notes"] + [f"base file: {src.resolve()}"])
    del legacy["base_file"]
    old = ExportManifest.from_json(json.dumps(legacy))
    assert old.base_file == BaseFile(path=str(src.resolve())) and old.base_file.local() == src.resolve()
    assert BaseFile(path=str(src), size=1).local() is None  # another file there now
    assert "base_file" not in json.loads(ExportManifest.from_json(json.dumps(legacy | {"format": "gguf"})).to_json())


@pytest.mark.slow
@pytest.mark.llama
def test_cli_gguf_lora_verify_smollm2(tmp_path, capsys):
    """`verify` on a SmolLM2 LoRA GGUF passes against hook steering under the GGUF noise-floor rules."""
    circuit = tmp_path / "c.json"
    _smollm2_circuit().save(circuit)
    out = tmp_path / "ad" / "steer.gguf"
    out.parent.mkdir()
    code, text, err = _cli(["export", "--model", "bundled:smollm2", "--circuit", str(circuit), "--out", str(out),
                            "--format", "gguf-lora", "--verify", "--limit", "8"], capsys)
    assert code == 0, err
    print(text)
    assert "adapter tensors exact, scale 1" in text and "PASSED" in text
    code, text, _ = _cli(["audit", str(out), "--manifest"], capsys)
    assert code == 0 and "exactly the manifest's 72 neurons" in text
