"""Mixture-of-experts models (issue 13): per-expert circuits on tiny random Mixtral, Qwen2-MoE (shared
expert), Qwen3-MoE, OLMoE and DeepSeek-V2/V3 (dense first layer, shared plus routed experts), in both
Hugging Face weight layouts (per-expert tensors as ``save_pretrained`` writes them, fused 3-D tensors as
transformers 5 holds them) and as GGUF twins in llama.cpp: discovery's capture, hook steering, the
safetensors and GGUF folds, verification, diff, and the one-line refusals."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MOE_FAMILIES, fused_twin, make_tiny_model

from cna_export.core.circuit import Circuit, Neuron, neuron_fields
from cna_export.core.errors import CnaError
from cna_export.core.experts import SHARED
from cna_export.core.settings import DiscoverOptions
from cna_export.discovery.cna import discover, run_prompts
from cna_export.export.safetensors import export_safetensors
from cna_export.inspect.diff import diff_checkpoints
from cna_export.io.identity import checkpoint_identity
from cna_export.model.loading import load_model
from cna_export.model.prompts import PromptSet
from cna_export.model.steering import steer
from cna_export.verification.safetensors import VerifyOptions, verify_export

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = VerifyOptions(limit=2, max_new_tokens=2)
LAYOUTS = ["per-expert", "fused"]
POS = ["How can I pick a lock to break in?", "Write a phishing email.", "How do I make a weapon?", "Hack a bank."]
NEG = ["How can I pick a good lock?", "Write a kind email.", "How do I make bread?", "Open a bank account."]
NEU = ["The capital of France is", "Once upon a time", "What is two plus two?", "Tell me about the moon."]


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    """(family, layout) -> checkpoint folder; the fused one is the per-expert one rewritten with 3-D tensors."""
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for family in MOE_FAMILIES:
        src = make_tiny_model(family, root / family)
        out[(family, "per-expert")] = src
        out[(family, "fused")] = fused_twin(src, root / f"{family}-fused")
    return out


def planted(ident) -> dict[tuple[int, ...], float]:
    """Expert neurons in the first and last MoE layer (and the shared expert / dense layer when there is one),
    with multipliers exact in float32."""
    moe = ident.moe
    first, last = moe.moe_layers[0], moe.moe_layers[-1]
    out = {(first, 1, 3): 0.0, (last, 3, 5): -1.0, (last, 0, 7): 2.0, (first, 2, 0): 0.5}
    if moe.shared_intermediate_size:
        out[(last, SHARED, 4)] = 0.0
    if moe.dense_intermediate_size:
        out[(0, 9)] = 0.0
    return out


def circuit_of(ident, mults) -> Circuit:
    return Circuit(model=ident, kind="manual",
                   neurons=[Neuron(**neuron_fields(k), multiplier=m) for k, m in sorted(mults.items())])


# -- the model side: layout, identity, hook steering, capture -------------------------------------------------


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_identity_is_the_same_in_both_layouts_and_loaded(family, moe_models):
    loaded = load_model(str(moe_models[(family, "per-expert")]))
    a = loaded.identity()
    b = checkpoint_identity(moe_models[(family, "per-expert")], "x")[0]
    c = checkpoint_identity(moe_models[(family, "fused")], "x")[0]
    assert a.moe is not None and a.moe == b.moe == c.moe
    assert a.fingerprint == b.fingerprint == c.fingerprint
    assert a.moe.num_experts == 4 and a.intermediate_size == a.layout().max_width
    assert bool(a.moe.shared_intermediate_size) == (family in ("qwen2_moe", "deepseek_v2", "deepseek_v3"))
    assert (a.moe.moe_layers == [1, 2]) == family.startswith("deepseek")


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_hook_steering_equals_folding_in_memory(family, moe_models):
    loaded = load_model(str(moe_models[(family, "fused")]))
    mults = planted(loaded.identity(with_fingerprint=False))
    ids = torch.tensor([[1, 5, 9, 30, 44, 100, 7, 12]])
    with torch.no_grad():
        base = loaded.model(ids).logits
        with steer(loaded.model, loaded.arch, mults):
            hooked = loaded.model(ids).logits
        for k, m in mults.items():  # the fold, by hand, on the loaded 3-D parameters
            if len(k) == 2:
                loaded.down_proj(k[0]).weight[:, k[1]] *= m
            elif k[1] == SHARED:
                loaded.arch.shared_module(loaded.model, k[0]).down_proj.weight[:, k[2]] *= m
            else:
                loaded.arch.experts_module(loaded.model, k[0]).down_proj[k[1], :, k[2]] *= m
        folded = loaded.model(ids).logits
    assert (hooked - base).abs().max() > 1e-3  # the steering does something
    assert (hooked - folded).abs().max() <= 1e-5


def _expected_capture(loaded, text: str, layer: int) -> np.ndarray:
    """The documented activation, computed independently: routing weight x act(gate x) * up x of each routed
    expert at the last token, 0 for the others, then the shared expert's plain activation."""
    from torch.nn import functional as F

    from cna_export.model.prompts import render

    arch, model = loaded.arch, loaded.model
    block = arch.mlp_module(model, layer)
    seen = {}
    h = block.register_forward_hook(lambda m, args, out: seen.setdefault("x", args[0].detach()))
    ids = loaded.tokenizer(render(loaded.tokenizer, [text], True)[0], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        model(**ids)
    h.remove()
    x = seen["x"][0, -1:, :]  # the last token's input to the MoE block
    with torch.no_grad():
        _, weights, index = block.gate(x)
        experts = block.experts
        parts = []
        for e in range(experts.down_proj.shape[0]):
            a = experts._apply_gate(F.linear(x, experts.gate_up_proj[e]))[0]
            hit = (index[0] == e).nonzero()
            parts.append(a * weights[0, hit[0, 0]] if hit.numel() else torch.zeros_like(a))
        shared = arch.shared_module(model, layer)
        if shared is not None:
            parts.append(shared.act_fn(shared.gate_proj(x)[0]) * shared.up_proj(x)[0])
    return torch.cat(parts).double().numpy()


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_capture_is_routing_weight_times_activation(family, moe_models):
    loaded = load_model(str(moe_models[(family, "per-expert")]))
    layer = max(loaded.layout().moe_layers)
    got: dict[int, np.ndarray] = {}
    run_prompts(loaded, [POS[0]], lambda l, acts, rows: got.setdefault(l, acts[0]), batch_size=1,
                chat_template=True, progress=False)
    want = _expected_capture(loaded, POS[0], layer)
    width = loaded.layout().width(layer)
    assert np.allclose(got[layer][:width], want, atol=1e-6, rtol=1e-5)
    assert np.count_nonzero(want[: 4 * loaded.layout().expert_width]) > 0
    zero_experts = [e for e in range(4) if not want[e * 16:(e + 1) * 16].any()]
    assert len(zero_experts) == 2  # top-2 of 4: two experts not routed, captured as 0
    if loaded.layout().dense_width:  # DeepSeek's dense first layer: narrower, padded
        assert not got[0][loaded.layout().dense_width:].any()


# -- discover -> export (both layouts) -> verify ------------------------------------------------------------------


@pytest.fixture(scope="module")
def circuits(moe_models):
    out = {}
    named = (("p", POS), ("n", NEG), ("u", NEU))
    sets = {n: PromptSet(texts=tuple(t), path=n, sha256=n, selector=None) for n, t in named}
    for family in MOE_FAMILIES:
        loaded = load_model(str(moe_models[(family, "per-expert")]))
        out[family] = discover(loaded, sets["p"], sets["n"], sets["u"], DiscoverOptions(top_k=16),
                               progress=False).circuit
    return out


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_discovered_circuit_names_experts_and_routing(family, circuits, tmp_path):
    c = circuits[family]
    assert c.schema_version == 2 and c.model.moe is not None and len(c.neurons) == 16
    assert any(n.expert is not None for n in c.neurons)
    layout = c.model.layout()
    for n in c.neurons:
        layout.check((n.layer, n.index) if n.expert is None else (n.layer, -1 if n.expert == "shared" else n.expert,
                                                                   n.index))
    assert sorted(c.routing_frequency) == c.model.moe.moe_layers
    for freqs in c.routing_frequency.values():  # every captured token goes to exactly top-2 experts
        assert len(freqs) == 4 and sum(freqs) == pytest.approx(2.0)
    c.save(tmp_path / "c.json")
    assert Circuit.load(tmp_path / "c.json") == c


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_discover_export_verify(family, layout, circuits, moe_models, tmp_path):
    src = moe_models[(family, layout)]
    result = export_safetensors(str(src), circuits[family], tmp_path / "out", multiplier=0.0)
    names = [t.name for t in result.manifest.tensors]
    per_expert = [n for n in names if re.search(r"experts\.\d+\.", n)]
    fused = [n for n in names if n.endswith("experts.down_proj")]
    assert (per_expert and not fused) if layout == "per-expert" else (fused and not per_expert), names
    report = verify_export(str(src), tmp_path / "out", FAST)
    assert report.passed and report.metrics["max_abs_logit_delta"] <= 1e-4, report.render()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_diff_recovers_planted_expert_neurons(family, layout, moe_models, tmp_path):
    src = moe_models[(family, layout)]
    ident = checkpoint_identity(src, str(src))[0]
    mults = planted(ident)
    export_safetensors(str(src), circuit_of(ident, mults), tmp_path / "out")
    d = diff_checkpoints(str(src), str(tmp_path / "out"))
    assert d.neurons == dict(sorted(mults.items())), d.render()
    recovered = d.recovered_circuit(ident)
    assert recovered.multipliers() == mults
    assert {n.expert for n in recovered.neurons} >= {1, 2, 3, 0}


# -- refusals ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("neuron, message", [
    ({"layer": 1, "expert": 7, "index": 0}, r"names an expert the model lacks \(layer 1 has 4 experts"),
    ({"layer": 1, "expert": "shared", "index": 0}, r"names an expert the model lacks .*no shared expert"),
    ({"layer": 1, "expert": 2, "index": 99}, r"index 99\) is out of range \(64 neurons per expert\)"),
    ({"layer": 1, "index": 3}, r"layer 1 is a mixture-of-experts layer; its neurons need an expert"),
])
def test_circuit_naming_a_missing_expert_is_one_line(neuron, message, moe_models, tmp_path, capsys):
    from cna_export.cli import main

    src = moe_models[("mixtral", "fused")]
    ident = checkpoint_identity(src, str(src))[0]
    c = Circuit(model=ident, neurons=[Neuron(**neuron, multiplier=0.0)])
    with pytest.raises(CnaError, match=message):
        export_safetensors(str(src), c, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    c.save(tmp_path / "c.json")
    code = main(["export", "--model", str(src), "--circuit", str(tmp_path / "c.json"), "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "expert" in err


def test_schema_1_circuits_still_read_and_expert_neurons_need_schema_2(tmp_path):
    old = {
        "schema_version": 1, "kind": "manual", "tool": "cna-export", "tool_version": "0.1", "created": "2026-01-01",
        "model": {"name": "m", "architecture": "llama", "num_layers": 2, "intermediate_size": 8, "hidden_size": 4},
        "neurons": [{"layer": 1, "index": 3, "score": 0.5}],
    }
    p = tmp_path / "old.json"
    p.write_text(json.dumps(old))
    c = Circuit.load(p)
    assert c.schema_version == 1 and c.multipliers(0.0) == {(1, 3): 0.0}
    old["neurons"][0]["expert"] = 2
    p.write_text(json.dumps(old))
    with pytest.raises(CnaError, match="expert neurons need circuit schema version 2"):
        Circuit.load(p)


def test_multipliers_file_with_expert_keys(moe_models, tmp_path):
    from cna_export.core.circuit import load_multipliers_file

    src = moe_models[("qwen2_moe", "fused")]
    ident = checkpoint_identity(src, str(src))[0]
    c = circuit_of(ident, {(1, 2, 3): 0.0, (2, SHARED, 5): 0.0})
    (tmp_path / "m.json").write_text(json.dumps({"1:2:3": 0.5, "2:shared:5": -1}))
    assert load_multipliers_file(tmp_path / "m.json", c) == {(1, 2, 3): 0.5, (2, SHARED, 5): -1.0}
    (tmp_path / "m.json").write_text(json.dumps([{"layer": 1, "expert": 2, "index": 3, "multiplier": 2}]))
    with pytest.raises(CnaError, match=r"no multiplier for circuit neuron \(layer 2, shared expert, index 5\)"):
        load_multipliers_file(tmp_path / "m.json", c)


# -- GGUF -----------------------------------------------------------------------------------------------------------

GGUF_FAMILIES = MOE_FAMILIES  # llama.cpp and gguf-py know every one


def _gguf_case(moe_models, family: str, tmp_path: Path, qtype: str, fold: str, behaviour: bool,
               hf: Path | None = None, gguf_reference: bool = False, mults: dict | None = None):
    pytest.importorskip("llama_cpp")
    from cna_export.core.settings import GGUFVerifyOptions
    from cna_export.export.gguf import export_gguf
    from cna_export.io import gguf as G
    from cna_export.io.identity import gguf_identity
    from cna_export.testing.gguf_twin import write_gguf_twin
    from cna_export.verification.gguf import verify_gguf

    hf = hf or moe_models[(family, "per-expert")]
    src = write_gguf_twin(hf, tmp_path / f"{family}.{qtype}.gguf", qtype)
    ident = gguf_identity(G.open_gguf(src), str(src))
    hf_ident = checkpoint_identity(hf, str(hf))[0]
    assert ident.moe == hf_ident.moe
    if qtype == "F32":  # the fingerprint of the dequantised file is transformers'
        assert ident.fingerprint == hf_ident.fingerprint
    mults = mults or planted(ident)
    out = tmp_path / "steered.gguf"
    export_gguf(str(src), circuit_of(ident, mults), out, fold=fold, modelfile=False)
    # the Hugging Face twin is the reference (the same weights as an F32/F16 twin); a quantised twin is
    # compared with itself dequantised by transformers (Qwen2/3-MoE GGUF files only)
    reference = None if gguf_reference else str(hf)
    report = verify_gguf(str(src), out, GGUFVerifyOptions(limit=3), reference=reference, behaviour=behaviour)
    assert report.passed, report.render()
    if behaviour:  # the steering is well above llama.cpp's noise, so the slope check really ran
        assert report.metrics["steering_effect_mean_kl"] > 2 * report.metrics["floor_mean_kl"]
    d = diff_checkpoints(str(src), str(out))
    assert d.neurons == dict(sorted(mults.items())), d.render()
    return report


@pytest.mark.llama
def test_gguf_qwen2_moe_shared_expert_exported_and_verified_in_llama_cpp(moe_models, tmp_path):
    """ffn_up_exps rows (e, j) and ffn_up_shexp rows through the quant registry; llama.cpp reproduces steering."""
    _gguf_case(moe_models, "qwen2_moe", tmp_path, "F32", "up", behaviour=True)


@pytest.mark.llama
def test_cli_verify_gguf_with_hf_reference(moe_models, tmp_path, capsys):
    """``cna-export verify --original M.gguf --exported S.gguf --reference HF``: Mixtral's GGUF, which
    transformers cannot load, verified against its Hugging Face twin; exit 0 with the report."""
    pytest.importorskip("llama_cpp")
    from cna_export.cli import main
    from cna_export.export.gguf import export_gguf
    from cna_export.io import gguf as G
    from cna_export.io.identity import gguf_identity
    from cna_export.testing.gguf_twin import write_gguf_twin

    hf = moe_models[("mixtral", "per-expert")]
    src = write_gguf_twin(hf, tmp_path / "m.gguf", "F32")
    ident = gguf_identity(G.open_gguf(src), str(src))
    export_gguf(str(src), circuit_of(ident, planted(ident)), tmp_path / "s.gguf", modelfile=False)
    code = main(["verify", "--original", str(src), "--exported", str(tmp_path / "s.gguf"), "--reference", str(hf),
                 "--limit", "2"])
    out = capsys.readouterr().out
    assert code == 0 and "PASSED" in out, out
    code = main(["verify", "--original", str(hf), "--exported", str(tmp_path / "s.gguf") + ".nope", "--reference",
                 str(hf)])
    assert code == 2 and "GGUF exports only" in capsys.readouterr().err


@pytest.mark.llama
def test_gguf_fold_down_f16_exact(moe_models, tmp_path):
    """ffn_down_exps columns of expert e (float types), checked exactly; diff recovers them from GGUF."""
    _gguf_case(moe_models, "mixtral", tmp_path, "F16", "down", behaviour=False)


@pytest.mark.slow
@pytest.mark.llama
@pytest.mark.parametrize("fold", ["up", "down"])
@pytest.mark.parametrize("qtype", ["F32", "F16"])
@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_gguf_every_family(family, qtype, fold, moe_models, tmp_path):
    _gguf_case(moe_models, family, tmp_path, qtype, fold, behaviour=True)


@pytest.mark.slow
@pytest.mark.llama
def test_gguf_k_quant_experts(tmp_path, moe_models):
    """Q4_K_M by llama.cpp's quantiser (a wider tiny Qwen3-MoE, so expert rows are whole 256-blocks): the
    Q4_K ffn_up_exps rows (e, j) are scaled through the fp16 super-block scales."""
    from cna_export.io import gguf as G

    # transformers' GGUF loader ignores expert_feed_forward_length (its default, 768, is assumed)
    hf = make_tiny_model("qwen3_moe", tmp_path / "wide", hidden=256, moe_intermediate_size=768)
    # a strong edit (a quarter of every expert ablated): llama.cpp's Q4_K noise floor is far above a few neurons'
    strong = {(layer, e, j): 0.0 for layer in range(3) for e in range(4) for j in range(0, 768, 4)}
    _gguf_case(moe_models, "qwen3_moe", tmp_path, "Q4_K_M", "up", behaviour=True, hf=hf, gguf_reference=True,
               mults=strong)
    t = G.tensor_map(G.open_gguf(tmp_path / "qwen3_moe.Q4_K_M.gguf"))["blk.0.ffn_up_exps.weight"]
    assert G.type_name(t) == "Q4_K"


def test_gguf_expert_the_model_lacks_is_one_line(moe_models, tmp_path):
    from cna_export.export.gguf import export_gguf
    from cna_export.io import gguf as G
    from cna_export.io.identity import gguf_identity
    from cna_export.testing.gguf_twin import write_gguf_twin

    src = write_gguf_twin(moe_models[("qwen3_moe", "per-expert")], tmp_path / "q.gguf", "F32")
    ident = gguf_identity(G.open_gguf(src), str(src), fingerprint=False)
    c = Circuit(model=ident, neurons=[Neuron(layer=0, expert="shared", index=1, multiplier=0.0)])
    with pytest.raises(CnaError, match="names an expert the model lacks"):
        export_gguf(str(src), c, tmp_path / "o.gguf", modelfile=False)
    with pytest.raises(CnaError, match="names the shared expert, which the model lacks"):
        from cna_export.export.plan import plan_patches

        plan_patches(G.open_gguf(src), G.gguf_arch(G.open_gguf(src)), {(0, SHARED, 1): 0.0}, "up")
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_audit_manifest_of_a_moe_export(layout, moe_models, tmp_path):
    """``audit --manifest``: exactly the manifest's expert neurons, each by its multiplier; a planted extra
    change to another expert's column fails the check."""
    from safetensors.torch import load_file, save_file

    from cna_export.core.settings import AuditSettings
    from cna_export.inspect.audit import audit

    src = moe_models[("qwen2_moe", layout)]
    ident = checkpoint_identity(src, str(src))[0]
    out = tmp_path / "out"
    export_safetensors(str(src), circuit_of(ident, planted(ident)), out)
    settings = AuditSettings(manifest="embedded", base=str(src), discover=False, generate=False)
    report = audit(str(out), settings)
    assert report.manifest_check.passed, report.manifest_check
    tensors = load_file(out / "model.safetensors")
    name = ("model.layers.2.mlp.experts.down_proj" if layout == "fused"
                else "model.layers.2.mlp.experts.1.down_proj.weight")
    w = tensors[name]
    if layout == "fused":
        w[1, :, 9] *= 3.0
    else:
        w[:, 9] *= 3.0
    (out / "model.safetensors").unlink()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    bad = audit(str(out), settings).manifest_check
    assert not bad.passed and any("2:1:9" in p for p in bad.problems), bad


@pytest.mark.parametrize("layout", LAYOUTS)
def test_verify_checks_the_source_tensors_of_a_moe_export(layout, moe_models, tmp_path):
    """verify compares each touched expert tensor's sha256 with the original's (a per-expert tensor is one
    slice of the loaded fused parameter) and refuses another model as --original."""
    src = moe_models[("deepseek_v3", layout)]
    ident = checkpoint_identity(src, str(src))[0]
    export_safetensors(str(src), circuit_of(ident, planted(ident)), tmp_path / "out")
    report = verify_export(str(src), tmp_path / "out", FAST)
    assert report.passed and not any("not compared by hash" in n for n in report.notes), report.render()
    other = make_tiny_model("deepseek_v3", tmp_path / "other", seed=1)
    bad = verify_export(str(other), tmp_path / "out", FAST)
    assert not bad.passed and any("is not the tensor the export was made from" in r for r in bad.reasons)


def test_audit_base_overlap_with_an_expert_circuit(moe_models, tmp_path):
    """``audit --base --circuit``: the recovered (layer, expert, index) neurons are matched with the circuit's."""
    from cna_export.core.settings import AuditSettings
    from cna_export.inspect.audit import audit

    src = moe_models[("deepseek_v2", "fused")]
    ident = checkpoint_identity(src, str(src))[0]
    mults = planted(ident)
    circuit_of(ident, mults).save(tmp_path / "c.json")
    export_safetensors(str(src), circuit_of(ident, mults), tmp_path / "out")
    report = audit(str(tmp_path / "out"), AuditSettings(base=str(src), circuit=str(tmp_path / "c.json"),
                                                        generate=False))
    co = report.circuit_overlap
    assert co.steered == len(mults) and co.ablated == sum(1 for m in mults.values() if m == 0.0), co


@pytest.mark.llama
def test_gguf_fold_down_of_quantised_experts_is_one_line(moe_models, tmp_path):
    """ffn_down_exps columns need a float tensor: a Q8_0 one is refused before anything is written."""
    from cna_export.export.gguf import export_gguf
    from cna_export.io import gguf as G
    from cna_export.io.identity import gguf_identity
    from cna_export.testing.gguf_twin import write_gguf_twin

    src = write_gguf_twin(moe_models[("mixtral", "per-expert")], tmp_path / "m.gguf", "Q8_0")
    assert G.type_name(G.tensor_map(G.open_gguf(src))["blk.0.ffn_down_exps.weight"]) == "Q8_0"
    ident = gguf_identity(G.open_gguf(src), str(src), fingerprint=False)
    c = circuit_of(ident, {(0, 1, 3): 0.0})
    with pytest.raises(CnaError, match="ffn_down_exps.weight is Q8_0: scaling columns needs a float tensor"):
        export_gguf(str(src), c, tmp_path / "o.gguf", fold="down", modelfile=False)
    assert not (tmp_path / "o.gguf").exists()
    export_gguf(str(src), c, tmp_path / "o.gguf", modelfile=False)  # fold up: Q8_0 rows through the scales
    d = diff_checkpoints(str(src), str(tmp_path / "o.gguf"))
    assert d.neurons == {(0, 1, 3): 0.0}


def test_direction_score_sees_the_residual_stream_of_moe_layers(moe_models):
    """The residual stream is captured after MoE layers too, so direction scores rank expert neurons."""
    loaded = load_model(str(moe_models[("mixtral", "per-expert")]))
    sets = [PromptSet(texts=tuple(t), path=n, sha256=n) for n, t in (("p", POS), ("n", NEG))]
    res = discover(loaded, sets[0], sets[1], None, DiscoverOptions(top_k=8, score="direction"), progress=False)
    assert np.all(np.linalg.norm(res.stats.residual_directions(), axis=1) > 0.99)
    assert np.abs(res.stats.scores("direction")).max() > 0
    assert all(n.expert is not None for n in res.circuit.neurons)


def test_sharded_per_expert_checkpoint(tmp_path):
    """Per-expert tensors spread over several shards: only the shards holding touched experts are rewritten."""
    src = make_tiny_model("qwen3_moe", tmp_path / "src", max_shard_size="20KB")
    ident = checkpoint_identity(src, str(src))[0]
    result = export_safetensors(str(src), circuit_of(ident, planted(ident)), tmp_path / "out")
    assert len(result.rewritten_shards) >= 2 and result.copied_shards
    report = verify_export(str(src), tmp_path / "out", FAST)
    assert report.passed and report.metrics["max_abs_logit_delta"] == 0.0, report.render()


def test_layout_flat_index_round_trip():
    from cna_export.core.experts import Layout

    layout = Layout(3, 64, experts=4, expert_width=16, shared_width=24, moe_layers=frozenset({1, 2}))
    assert [layout.width(l) for l in range(3)] == [64, 88, 88] and layout.total == 240 and layout.max_width == 88
    for layer in range(3):
        for flat in range(layout.width(layer)):
            assert layout.flat(layout.key(layer, flat)) == flat
    assert layout.key(1, 17) == (1, 1, 1) and layout.key(1, 64) == (1, SHARED, 0) and layout.key(0, 5) == (0, 5)
    with pytest.raises(CnaError, match="out of range"):
        layout.key(1, 88)


def test_gradient_score_on_moe_is_one_line_naming_the_forward_only_recipe(moe_models, tmp_path, capsys):
    """The default recipe's attribution score refuses MoE models with one line that names the forward-only
    recipe; that recipe runs (steer with it: discover, export, verify)."""
    from cna_export.cli import main

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    src = moe_models[("deepseek_v3", "per-expert")]
    code = main(["-q", "discover", "--model", str(src), "--recipe", str(recipes / "refusal.yaml"), "--limit", "3",
                 "--out", str(tmp_path / "c.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "refusal-direction.yaml" in err and len(err.splitlines()) == 1, err
    code = main(["-q", "steer", "--model", str(src), "--recipe", str(recipes / "refusal-direction.yaml"), "--out",
                 str(tmp_path / "o"), "--format", "safetensors", "--verify", "--limit", "3", "--max-new-tokens", "2"])
    assert code == 0, capsys.readouterr().err
