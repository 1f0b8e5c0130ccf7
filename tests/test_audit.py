"""diff and audit: planted edits in tiny random models (safetensors fp32/bf16, GGUF F16/Q8_0/Q4_1) are
classified and recovered exactly; manifest checks pass on true exports and fail on tampered ones;
base-free signals find zeroed neurons and abliteration directions and stay quiet on clean models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from safetensors import safe_open
from safetensors.torch import save_file

from cna_export.cli import main
from cna_export.core.circuit import Circuit, Neuron
from cna_export.core.errors import CnaError
from cna_export.core.manifest import GGUF_KEY, MANIFEST_FILE
from cna_export.export.gguf import export_gguf
from cna_export.export.safetensors import export_safetensors
from cna_export.inspect.abliteration import layer_ranges
from cna_export.inspect.audit import AuditSettings, audit
from cna_export.inspect.diff import diff_checkpoints
from cna_export.inspect.scan import scan_base_free
from cna_export.io import gguf as G
from cna_export.io.identity import checkpoint_identity, gguf_identity
from cna_export.io.weights import hf_to_gguf_module, open_weights

# exact in every format: 0, -1 and powers of two; spread over all three layers
PLANTED = {(0, 1): 0.0, (0, 17): -1.0, (0, 40): 2.0, (1, 30): 0.5, (2, 5): 0.5, (2, 63): 0.0}
NO_GEN = AuditSettings(generate=False, discover=False)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models gain nothing from threads


def circuit_for(identity, planted) -> Circuit:
    return Circuit(kind="manual", model=identity,
                   neurons=[Neuron(layer=l, index=i, multiplier=m) for (l, i), m in sorted(planted.items())])


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        return {k: f.get_tensor(k).clone() for k in f.keys()}


def edited_copy(base: Path, out: Path, edit) -> Path:
    """A copy of an HF folder whose tensors went through ``edit(dict)`` (fp32 arithmetic, original dtype kept)."""
    shutil.copytree(base, out)
    tensors = _tensors(base)
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"})
    return out


def abliterate(tensors: dict, r: torch.Tensor, layers) -> None:
    """W' = W - r r^T W for o_proj and down_proj of ``layers``; E' = E - E r r^T for the embeddings."""
    for name, t in tensors.items():
        hit = any(f"layers.{l}.self_attn.o_proj.weight" in name or f"layers.{l}.mlp.down_proj.weight" in name
                  for l in layers)
        if hit:
            w = t.double()
            tensors[name] = (w - torch.outer(r, r @ w)).to(t.dtype)
        elif name == "model.embed_tokens.weight":
            e = t.double()
            tensors[name] = (e - torch.outer(e @ r, r)).to(t.dtype)


def _permute(w: np.ndarray, n_head: int, n_kv: int) -> np.ndarray:
    """llama.cpp's converter permutation of attn_q/attn_k rows (convert_hf_to_gguf.py LlamaModel.permute)."""
    if n_kv is not None and n_head != n_kv:
        n_head = n_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf: Path, path: Path, qtype: str) -> Path:
    """A llama GGUF of an HF tiny model, written as llama.cpp's converter would (names, q/k permutation)."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    cfg = json.loads((hf / "config.json").read_text())
    n_layers, nh, nkv = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_block_count(n_layers)
    w.add_context_length(256)
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_layer_norm_rms_eps(1e-6)
    qt = GGMLQuantizationType[qtype]
    for name, t in _tensors(hf).items():
        module, suffix = name.rsplit(".", 1)
        gname = f"{hf_to_gguf_module('llama', n_layers, module)}.{suffix}"
        data = t.float().numpy()
        if ".attn_q." in gname:
            data = _permute(data, nh, nh)
        elif ".attn_k." in gname:
            data = _permute(data, nh, nkv)
        if data.ndim == 2 and qtype == "F16":
            w.add_tensor(gname, data.astype(np.float16))
        elif data.ndim == 2 and qtype != "F32":
            w.add_tensor(gname, quantize(data, qt), raw_dtype=qt)
        else:
            w.add_tensor(gname, np.ascontiguousarray(data, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_circuit(path: Path, planted) -> Circuit:
    return circuit_for(gguf_identity(G.open_gguf(path), str(path), fingerprint=False), planted)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("audit") / "base")


@pytest.fixture(scope="module")
def base_bf16(tmp_path_factory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("audit") / "base-bf16", dtype="bfloat16")


@pytest.fixture(scope="module")
def steered(base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("audit-st") / "steered"
    export_safetensors(str(base), circuit_for(checkpoint_identity(base, str(base))[0], PLANTED), out)
    return out


@pytest.fixture(scope="module")
def ggufs(base, tmp_path_factory):
    """qtype -> (base GGUF, steered GGUF exported by cna-export with fold up)."""
    root = tmp_path_factory.mktemp("audit-gguf")
    out = {}
    for q in ("F16", "Q8_0", "Q4_1"):
        src = write_gguf(base, root / f"base-{q}.gguf", q)
        dst = root / f"steered-{q}.gguf"
        export_gguf(str(src), gguf_circuit(src, PLANTED), dst, fold="up", modelfile=False)
        out[q] = (src, dst)
    return out


# -- diff: CNA scaling -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_diff_recovers_cna_scaling_safetensors(dtype, base, base_bf16, tmp_path):
    src = base if dtype == "float32" else base_bf16
    planted = dict(PLANTED)
    planted[(1, 9)] = 0.3  # not exact in any float format: recovered within the fold's rounding
    out = tmp_path / "steered"
    export_safetensors(str(src), circuit_for(checkpoint_identity(src, str(src))[0], planted), out)
    r = diff_checkpoints(str(src), str(out))
    assert r.neurons == planted
    assert [f.kind for f in r.findings()] == ["cna"]
    assert r.count("changed") == 3 and all(t.role == "ffn_down" for t in r.tensors if t.differs)
    assert r.directional() is None and not r.other_changes()


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_1"])
def test_diff_recovers_cna_scaling_gguf(qtype, ggufs):
    src, dst = ggufs[qtype]
    r = diff_checkpoints(str(src), str(dst))
    assert r.neurons == PLANTED
    assert [f.kind for f in r.findings()] == ["cna"]
    changed = [t for t in r.tensors if t.differs]
    assert {t.role for t in changed} == {"ffn_up"} and all(t.scale_axis == "row" for t in changed)
    assert {t.name for t in changed} == {f"blk.{l}.ffn_up.weight" for l in (0, 1, 2)}  # two GGUFs: llama.cpp names
    assert any(GGUF_KEY in m for m in r.metadata_differences)


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_1"])
def test_diff_mixed_formats_unpermutes_and_recovers(qtype, base, ggufs):
    """HF fp32 base against a quantised, steered GGUF: canonical names, q/k un-permuted, neurons recovered."""
    _, dst = ggufs[qtype]
    r = diff_checkpoints(str(base), str(dst))
    assert r.neurons == PLANTED
    by_name = {t.name: t for t in r.tensors}
    for l in range(3):
        for proj in ("q_proj", "k_proj"):
            t = by_name[f"model.layers.{l}.self_attn.{proj}.weight"]
            assert t.status in ("identical", "equivalent"), (t.name, t.status, t.rel_change)
    assert all(t.role == "ffn_up" for t in r.tensors if t.differs)
    assert r.count("only_a") == r.count("only_b") == 0


def test_recovered_circuit_reproduces_the_export(base, steered, tmp_path, capsys):
    """diff --out-circuit writes a 'recovered' circuit; exporting it again gives the same bytes."""
    circ, js = tmp_path / "rec.json", tmp_path / "diff.json"
    assert main(["diff", str(base), str(steered), "--out-circuit", str(circ), "--json", str(js)]) == 0
    assert "CNA neuron scaling: 6 neurons" in capsys.readouterr().out
    c = Circuit.load(circ)
    assert c.kind == "recovered" and c.multipliers() == PLANTED
    assert c.model.fingerprint == checkpoint_identity(base, str(base))[0].fingerprint
    again = tmp_path / "again"
    export_safetensors(str(base), c, again)
    assert diff_checkpoints(str(steered), str(again)).identical  # same tensors, bit for bit
    data = json.loads(js.read_text())
    assert data["counts"]["changed"] == 3 and len(data["neurons"]) == 6
    assert main(["diff", str(base), str(steered), "--json", str(js)]) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err


def test_fused_gate_up_rows_map_to_neurons(tmp_path):
    """phi3's gate_up_proj: row n_ff + j scales neuron j; a zeroed gate row j (row j) ablates neuron j."""
    base = make_tiny_model("phi3", tmp_path / "phi3")

    def edit(t):
        w = t["model.layers.1.mlp.gate_up_proj.weight"]  # [2 * 64, 32]
        w[64 + 7] *= -1.0
        w[64 + 20] *= 0.5
        w[11] = 0.0
        w[12] *= 3.0  # scaling a gate row is not a neuron multiplier (act(3 g) != 3 act(g))

    edited = edited_copy(base, tmp_path / "edited", edit)
    rep = diff_checkpoints(str(base), str(edited))
    assert rep.neurons == {(1, 7): -1.0, (1, 20): 0.5, (1, 11): 0.0}
    (t,) = [t for t in rep.tensors if t.differs]
    assert t.name == "model.layers.1.mlp.gate_up_proj.weight" and t.unexplained == 1 and t.structure == "scaling+other"
    assert {f.kind for f in rep.findings()} == {"cna", "other"}


# -- diff: abliteration, fine-tune noise, no edit -------------------------------------------------


@pytest.fixture(scope="module")
def abliterated(base, tmp_path_factory):
    g = torch.Generator().manual_seed(7)
    r = torch.randn(32, generator=g, dtype=torch.float64)
    r /= r.norm()
    out = edited_copy(base, tmp_path_factory.mktemp("abl") / "abliterated", lambda t: abliterate(t, r, (1, 2)))
    return out, r.numpy()


def test_diff_detects_abliteration(base, abliterated):
    folder, r = abliterated
    rep = diff_checkpoints(str(base), str(folder))
    assert not rep.neurons
    assert [f.kind for f in rep.findings()] == ["directional"]
    d = rep.directional()
    assert d.layers == [1, 2] and d.embeddings == ["model.embed_tokens.weight"] and d.ablated
    assert len(d.tensors) == 5 and d.consistency > 0.999
    assert abs(float(np.dot(d.direction, r))) > 0.9999
    for t in rep.tensors:
        if t.differs:
            assert t.structure == "rank-1" and t.rank1.share > 0.999 and t.rank1.projection_ratio < 1e-6
    assert "directional ablation: layers 1-2" in rep.verdict()


def test_scaling_must_explain_the_change():
    """Across formats the per-element tolerance is wide; a column nudged along another direction (as
    abliteration nudges down_proj columns) fits m * a within it for m near 1 but is not a scaling."""
    from cna_export.inspect.compare import scaled_slices
    from cna_export.inspect.diff import PairTolerance

    rng = np.random.default_rng(0)
    a = rng.standard_normal(64)
    r = rng.standard_normal(64)
    r -= (r @ a) / (a @ a) * a
    r = 0.14 * a / np.linalg.norm(a) + np.sqrt(1 - 0.14**2) * r / np.linalg.norm(r)  # cos(r, a) = 0.14
    A = np.stack([a, 2 * a], axis=1)
    B = np.stack([a - (r @ a) * r, 1.0 * a], axis=1)  # column 0 abliterated, column 1 halved
    rm = np.full((64, 1), 40.0 * np.abs(a).max())  # rows whose largest weights lie elsewhere: wide tolerance
    tol = PairTolerance("Q4_1", "F32")
    m, ok = scaled_slices(A, B, "column", np.array([0, 1]), tol, rm, rm)
    assert list(ok) == [False, True] and m[1] == 0.5
    # within tolerance, yet unexplained
    assert tol.scaled(A[:, :1].T, B[:, :1].T, np.array([[1 - 0.14**2]]), rm.T, rm.T)[0]


def test_cross_format_abliteration_is_not_neuron_scaling(base, ggufs, tmp_path):
    """Against a Q4_1 base (wide tolerance), abliterated down_proj columns must not pass for scaled neurons."""
    src = ggufs["Q4_1"][0]
    w = open_weights(str(src))
    values = {e.name: torch.from_numpy(w.read(e).copy()) for e in w}
    g = torch.Generator().manual_seed(11)
    r = torch.randn(32, generator=g, dtype=torch.float64)
    r /= r.norm()

    def edit(t):
        t.update(values)
        abliterate(t, r, (0, 1, 2))

    folder = edited_copy(base, tmp_path / "abl-q", edit)
    rep = diff_checkpoints(str(src), str(folder))
    assert not rep.neurons
    assert [f.kind for f in rep.findings()] == ["directional"]
    assert abs(float(np.dot(rep.directional().direction, r.numpy()))) > 0.999


def test_diff_finetune_noise_is_other(base, tmp_path):
    g = torch.Generator().manual_seed(3)

    def noise(tensors):
        for k, t in tensors.items():
            if t.dim() == 2:
                tensors[k] = t + 1e-3 * t.std() * torch.randn(t.shape, generator=g)

    folder = edited_copy(base, tmp_path / "tuned", noise)
    rep = diff_checkpoints(str(base), str(folder))
    assert not rep.neurons and rep.directional() is None
    assert [f.kind for f in rep.findings()] == ["other"]
    two_d = [t for t in rep.tensors if t.shape_a and len(t.shape_a) == 2]
    assert all(t.status == "changed" and t.structure == "other" for t in two_d)
    assert all(t.rank1.share < 0.5 for t in two_d)
    assert audit(str(folder), AuditSettings(base=str(base), generate=False)).exit_code == 5


def test_no_edit_is_clean(base, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    rep = diff_checkpoints(str(base), str(copy))
    assert rep.identical and rep.verdict() == "no weight differences" and rep.count("identical") == len(rep.tensors)
    code = main(["audit", str(copy), "--base", str(base), "--no-generate"])
    assert code == 0 and "no steering edits found" in capsys.readouterr().out


# -- manifest checks ----------------------------------------------------------------------------------


def test_manifest_check_passes_on_true_exports(steered, ggufs, capsys):
    code = main(["audit", str(steered), "--manifest"])  # embedded cna_manifest.json; base from its source
    out = capsys.readouterr().out
    assert code == 0, out
    assert "manifest check passed: exactly the manifest's 6 neurons changed" in out
    for q in ("Q8_0", "Q4_1"):
        src, dst = ggufs[q]
        rep = audit(str(dst), AuditSettings(manifest="embedded", base=str(src)))
        assert rep.exit_code == 0, rep.manifest_check
        assert rep.manifest_check.passed and rep.manifest_check.expected_neurons == 6


def test_manifest_check_fails_on_tampered_exports(base, steered, ggufs, tmp_path):
    # one more column edited beside the manifest's
    def extra(t):
        t["model.layers.1.mlp.down_proj.weight"][:, 3] *= 0.0

    tampered = edited_copy(steered, tmp_path / "extra", extra)
    rep = audit(str(tampered), AuditSettings(manifest="embedded", base=str(base)))
    assert rep.exit_code == 3 and not rep.manifest_check.passed
    assert any("1:3" in p for p in rep.manifest_check.problems)

    # the manifest claims another multiplier than the weights carry
    lying = tmp_path / "lying"
    shutil.copytree(steered, lying)
    data = json.loads((lying / MANIFEST_FILE).read_text())
    for m in data["multipliers"]:
        if (m["layer"], m["index"]) == (2, 5):
            m["multiplier"] = 0.25
    (lying / MANIFEST_FILE).write_text(json.dumps(data))
    rep = audit(str(lying), AuditSettings(manifest="embedded", base=str(base)))
    assert rep.exit_code == 3
    assert any("neuron 2:5 is not scaled by x0.25 (found x0.5)" in p for p in rep.manifest_check.problems)

    # another tensor of a GGUF export patched (a gate row zeroed through its scale fields)
    src, dst = ggufs["Q8_0"]
    bad = tmp_path / "bad.gguf"
    shutil.copyfile(dst, bad)
    t = G.tensor_map(G.open_gguf(bad))["blk.0.ffn_gate.weight"]
    patch = G.TensorPatch(t.name, t.tensor_type, "row", [3], [0.0])
    G.patch_in_place(bad, G.open_gguf(bad), {t.name: patch})
    rep = audit(str(bad), AuditSettings(manifest="embedded", base=str(src)))
    assert rep.exit_code == 3
    problems = rep.manifest_check.problems
    assert any("gate_proj" in p and "does not touch it" in p for p in problems)
    assert rep.diff.neurons.get((0, 3)) == 0.0  # a zeroed gate row is an ablation of neuron 3


def test_manifest_needs_a_base(steered, tmp_path, capsys):
    moved = tmp_path / "moved"
    shutil.copytree(steered, moved)
    data = json.loads((moved / MANIFEST_FILE).read_text())
    data["source"] = str(tmp_path / "gone")
    (moved / MANIFEST_FILE).write_text(json.dumps(data))
    assert main(["audit", str(moved), "--manifest"]) == 2
    err = capsys.readouterr().err
    assert "pass --base" in err and len(err.strip().splitlines()) == 1


# -- base-free signals ---------------------------------------------------------------------------------


def test_base_free_finds_zeroed_neurons(steered, ggufs):
    zeros = {k for k, m in PLANTED.items() if m == 0.0}
    rep = audit(str(steered), NO_GEN)
    assert rep.exit_code == 4 and rep.mode == "base-free"
    found = {(z.layer, z.index) for z in rep.base_free.scan.zeroed}
    assert found == zeros
    assert "zeroed MLP neurons: 2 in layers 0, 2" in rep.verdict
    assert "all its ablations are zeroed in the weights" in rep.verdict
    for q in ("F16", "Q4_1"):
        bf = scan_base_free(open_weights(str(ggufs[q][1])))
        assert {(z.layer, z.index) for z in bf.zeroed} == zeros
        assert all(z.where == ["up_proj row"] for z in bf.zeroed)


def test_base_free_finds_abliteration_direction(abliterated):
    folder, r = abliterated
    rep = audit(str(folder), NO_GEN)
    assert rep.exit_code == 4
    d = rep.base_free.scan.direction
    assert d.flagged_layers == [1, 2] and d.consistency > 0.999
    assert abs(float(np.dot(d.direction, r))) > 0.9999
    assert d.embedding_energy_along_direction["token_embd"] < 1e-6
    assert "refusals stripped by directional ablation: the " in rep.verdict  # the eigenvalue gap (test_base_free.py)
    assert "write one residual direction at 0.00 x the next weakest" in rep.verdict


def test_base_free_is_quiet_on_clean_models(base, ggufs):
    for spec in (str(base), str(ggufs["Q4_1"][0])):
        rep = audit(spec, NO_GEN)
        assert rep.exit_code == 0 and rep.verdict.startswith("no steering edits found (weights only"), rep.verdict
        assert "--base" in rep.verdict  # the limit of a weights-only verdict is stated where the user reads it
        assert rep.base_free.scan.zeroed_total == 0 and rep.base_free.scan.direction.flagged_layers == []
        assert rep.base_free.scan.direction.layer_ratio_min > 1e-2


# -- audit against a base: refusal-circuit overlap and behaviour -----------------------------------------


def test_audit_with_base_overlap_and_behaviour(base, prompt_files, tmp_path):
    pos, neg, neu = prompt_files
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"positive: {pos}\nnegative: {neg}\nneutral: {neu}\ntop_k: 6\nbatch_size: 6\n"
                      "universal_top_k: 8\n")
    circ = tmp_path / "refusal.json"
    assert main(["-q", "discover", "--model", str(base), "--recipe", str(recipe), "--out", str(circ)]) == 0
    out = tmp_path / "ablated"
    export_safetensors(str(base), str(circ), out, multiplier=0.0)
    js = tmp_path / "audit.json"
    code = main(["-q", "audit", str(out), "--base", str(base), "--recipe", str(recipe), "--prompts", "2",
                 "--max-new-tokens", "3", "--json", str(js), "--out-circuit", str(tmp_path / "rec.json")])
    assert code == 4
    rep = json.loads(js.read_text())
    assert rep["verdict"].startswith("refusal circuit ablated: CNA, 6 neurons, multiplier 0 (6 of 6 refusal-circuit "
                                     "neurons)")
    co = rep["circuit_overlap"]
    assert co["ablated"] == co["steered"] == co["circuit_size"] == co["same_size_overlap"] == 6
    assert co["ranks"]["worst"] == 6
    b = rep["behaviour"]["models"]
    assert set(b) == {"base", "suspect"} and b["base"]["n"] == 2 and len(b["suspect"]["answers"]) == 2
    assert Circuit.load(tmp_path / "rec.json").multipliers() == Circuit.load(circ).multipliers(0.0)


def test_audit_stats_file_is_saved_reused_and_checked(base, prompt_files, tmp_path, capsys, monkeypatch):
    """--stats: the first audit computes the base's statistics and saves them; the next reads them
    (no model load) and reaches the same verdict; a file from other prompts or weights is refused."""
    import cna_export.model.loading
    from cna_export.evaluation.saved_stats import load_stats
    from cna_export.model.prompts import load_prompts

    pos, neg, neu = prompt_files
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"positive: {pos}\nnegative: {neg}\nneutral: {neu}\ntop_k: 6\nbatch_size: 6\n"
                      "universal_top_k: 8\n")
    circ = tmp_path / "refusal.json"
    assert main(["-q", "discover", "--model", str(base), "--recipe", str(recipe), "--out", str(circ)]) == 0
    out = tmp_path / "ablated"
    export_safetensors(str(base), str(circ), out, multiplier=0.0)
    stats = tmp_path / "base-stats.npz"
    args = ["-q", "audit", str(out), "--base", str(base), "--recipe", str(recipe), "--no-generate", "--stats",
            str(stats)]
    assert main(args + ["--json", str(tmp_path / "a1.json")]) == 4 and stats.is_file()
    first = json.loads((tmp_path / "a1.json").read_text())
    # second audit: statistics read from the file, no model loaded
    monkeypatch.setattr(cna_export.model.loading, "load_model",
                        lambda *a, **k: pytest.fail("the base was loaded again"))
    assert main(args + ["--json", str(tmp_path / "a2.json")]) == 4
    second = json.loads((tmp_path / "a2.json").read_text())
    assert second["verdict"] == first["verdict"] and "statistics read from" in second["circuit_overlap"]["source"]
    for k in ("ablated", "steered", "circuit_size", "same_size_overlap", "ranks"):
        assert second["circuit_overlap"][k] == first["circuit_overlap"][k]
    capsys.readouterr()
    # statistics of other prompts are refused with one line (and recomputed only with --overwrite)
    other = tmp_path / "other.yaml"
    other.write_text(f"positive: {neg}\nnegative: {pos}\nneutral: {neu}\ntop_k: 6\n")
    code = main(["audit", str(out), "--base", str(base), "--recipe", str(other), "--no-generate", "--stats",
                 str(stats)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "other positive prompts" in err[0] and "--overwrite" in err[0]
    monkeypatch.undo()  # recomputing loads the base again
    code = main(["-q", "audit", str(out), "--base", str(base), "--recipe", str(other), "--no-generate", "--stats",
                 str(stats), "--overwrite"])
    assert code == 4 and load_stats(stats).prompts["positive"].sha256 == load_prompts(neg).sha256  # recomputed
    # ... and so are statistics of other weights (same architecture and shape, another seed)
    twin = make_tiny_model("llama", tmp_path / "twin", seed=1)
    from cna_export.inspect.refusal_circuit import base_statistics

    with pytest.raises(CnaError, match="computed on other weights"):
        base_statistics(str(twin), AuditSettings(recipe=str(recipe), stats=str(stats)))


def test_no_chat_template_is_found_before_the_model_is_loaded(base, ggufs, tmp_path, monkeypatch):
    """A base model without a chat template: the refusal circuit (--base) and the refusal directions (no base)
    are skipped with a note, seen from its tokenizer (a GGUF: its KV) alone; the model is never loaded."""
    import cna_export.model.loading

    plain = tmp_path / "plain"
    shutil.copytree(base, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    steered = tmp_path / "steered"
    export_safetensors(str(plain), circuit_for(checkpoint_identity(plain, str(plain))[0], PLANTED), steered)
    monkeypatch.setattr(cna_export.model.loading, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    missing = ("this model's tokenizer has no chat template; for a base model, give a recipe with "
               "'chat_template: false' (--recipe)")
    rep = audit(str(steered), AuditSettings(base=str(plain), generate=False))
    assert rep.exit_code == 4 and rep.notes == [f"base's refusal circuit not compared ({missing})"], rep.notes
    for suspect in (steered, ggufs["Q8_0"][1]):  # the test GGUF has no tokenizer KVs at all
        rep = audit(str(suspect), AuditSettings(generate=False))
        assert rep.exit_code == 4 and rep.notes == [f"refusal directions not measured ({missing}); no depletion score"]


# -- errors ------------------------------------------------------------------------------------------------


def test_bad_inputs_are_one_line_errors(base, tmp_path, capsys):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(base / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not unpickled")
    cases = [
        ["diff", str(base), str(tmp_path / "missing")],
        ["diff", str(base), str(pickled)],
        ["audit", str(base), "--out-circuit", str(tmp_path / "c.json")],
        ["audit", str(base), "--manifest"],
        ["diff", str(base), str(base / "config.json")],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("cna-export: error:") and len(err.strip().splitlines()) == 1, err
    assert (pickled / "pytorch_model.bin").read_bytes() == b"not unpickled"


def test_layer_ranges():
    assert layer_ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8" and layer_ranges([]) == ""
