"""Abliteration as shipped (rank-1, layer-weighted, norm-preserving rank-k, biprojected; tests/abliterate.py)
on tiny random models: the low-rank directional analysis of diff/audit recognises each, in the same format
and as GGUF Q8_0 / Q4_0 against a float32 base, with its strength profile and direction; clean changes (a
fine-tune-like perturbation of every weight, a LoRA-like random low-rank change) are not flagged; the refusal
directions are cached and checked; the base-free depletion score separates ablated from clean models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_model
from safetensors.numpy import load_file, save_file
from test_audit import write_gguf

from cna_export.core.errors import CnaError
from cna_export.inspect.abliteration import refusal_cosines
from cna_export.inspect.audit import AuditSettings, audit
from cna_export.inspect.diff import diff_checkpoints
from cna_export.inspect.refusal_direction import RefusalDirections, depletion_score, refusal_directions
from cna_export.io.weights import open_weights
from cna_export.testing import abliterate as ab

pytestmark = pytest.mark.usefixtures("one_thread")
LAYERS = 4
HARMLESS = np.random.default_rng(3).standard_normal(32)  # the biprojection's harmless mean


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("abl") / "base", layers=LAYERS)


@pytest.fixture(scope="module")
def tensors(base) -> dict:
    return dict(load_file(str(base / "model.safetensors")))


@pytest.fixture(scope="module")
def direction() -> np.ndarray:
    return ab.unit(np.random.default_rng(1).standard_normal(32))


def save(base: Path, tensors: dict, out: Path) -> Path:
    shutil.copytree(base, out, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out


def cases(tensors: dict, r: np.ndarray) -> dict:
    rng = np.random.default_rng(2)
    dirs = np.stack([ab.unit(r + 0.15 * rng.standard_normal(32)) for _ in range(LAYERS)])
    harmless = HARMLESS
    return {
        "rank1": (ab.rank1(tensors, r), "rank-1 projection", {l: 1.0 for l in range(LAYERS)}),
        "weighted": (ab.weighted(tensors, dirs, 1.5, peak=2, max_weight=1.2, min_weight=0.6, distance=2),
                     "rank-1 projection", dict(enumerate(ab.kernel(LAYERS, 2, 1.2, 0.6, 2)))),
        "norm-preserving": (ab.norm_preserving(tensors, r, 1.0, layers=(1, 2, 3), rank=None),
                            "norm-preserving projection", {1: 1.0, 2: 1.0, 3: 1.0}),
        "norm-preserving rank-3": (ab.norm_preserving(tensors, r, 0.8, rank=3), None, {l: 0.8 for l in range(LAYERS)}),
        "biprojected": (ab.biprojected(tensors, r, harmless), "norm-preserving projection",
                        {l: 1.0 for l in range(LAYERS)}),
    }


@pytest.fixture(scope="module")
def suspects(base, tensors, direction, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("abl-suspects")
    out = {}
    for name, (t, kind, profile) in cases(tensors, direction).items():
        folder = save(base, t, root / name.replace(" ", "_"))
        out[name] = (folder, kind, profile)
    return out


@pytest.mark.parametrize("name", ["rank1", "weighted", "norm-preserving", "norm-preserving rank-3", "biprojected"])
@pytest.mark.parametrize("fmt", ["same", "Q8_0", "Q4_0"])
def test_recognised_with_strength_profile(base, suspects, direction, name, fmt, tmp_path):
    folder, kind, profile = suspects[name]
    suspect = folder if fmt == "same" else write_gguf(folder, tmp_path / f"s.{fmt}.gguf", fmt)
    rep = diff_checkpoints(str(base), str(suspect))
    lr = rep.lowrank
    assert lr is not None and lr.detected and lr.ablation, (lr.spike, lr.null_spike, [w.z for w in lr.writers])
    assert rep.findings()[0].kind == "directional"
    assert rep.verdict().startswith("refusals stripped by directional ablation")
    edited = sorted(l for l, w in profile.items() if w > 0)
    assert lr.layers == edited
    if name != "weighted":  # one direction; the weighted case interpolates a noisy direction per layer
        m = ab.unit(HARMLESS)
        want = ab.unit(direction - (direction @ m) * m) if name == "biprojected" else direction
        assert abs(float(np.dot(lr.direction, want))) > 0.99
    got = lr.profile()
    tol = 0.05 if fmt != "Q4_0" else 0.12
    for layer, w in profile.items():
        if w > 0:
            assert got[layer] == pytest.approx(w, abs=tol), (layer, got)
    if kind is not None and fmt != "Q4_0":
        assert lr.kind == kind


@pytest.mark.parametrize("clean", ["finetune", "lora", "requantised"])
@pytest.mark.parametrize("fmt", ["same", "Q8_0"])
def test_clean_changes_not_flagged(base, tensors, clean, fmt, tmp_path):
    if clean == "finetune":
        t = ab.finetune_noise(tensors, 0.01)
    elif clean == "lora":
        t = ab.lora_noise(tensors, rank=2, scale=0.05)
    else:
        t = tensors
    folder = base if clean == "requantised" else save(base, t, tmp_path / clean)
    suspect = folder if fmt == "same" else write_gguf(folder, tmp_path / f"c.{fmt}.gguf", fmt)
    rep = diff_checkpoints(str(base), str(suspect))
    assert rep.lowrank is None or not rep.lowrank.detected
    assert not any(f.kind == "directional" for f in rep.findings())
    res = audit(str(suspect), AuditSettings(base=str(base), generate=False, discover=False, refusal_direction=False))
    assert res.exit_code in (0, 5), res.verdict


def test_additive_edit_along_one_direction_is_other_low_rank(base, tensors, direction, tmp_path):
    """W + r b^T with a random b per writer: one shared direction, but no projection: 'other low rank'."""
    rng = np.random.default_rng(7)
    t = dict(tensors)
    for name in ab.writers(tensors):
        W = tensors[name].astype(np.float64)
        b = rng.standard_normal(W.shape[1])
        t[name] = (W + 0.3 * np.linalg.norm(W) / np.sqrt(W.shape[0]) * np.outer(direction, b) / np.linalg.norm(b)
                   ).astype(np.float32)
    rep = diff_checkpoints(str(base), str(save(base, t, tmp_path / "add")))
    lr = rep.lowrank
    assert lr.detected and not lr.ablation and lr.kind == "other low rank"
    assert rep.verdict().startswith("directional edit: layers 0-3; other low rank")
    assert abs(float(np.dot(lr.direction, direction))) > 0.99


def test_cna_export_is_not_a_directional_edit(base, tensors):
    """Scaled down_proj columns (a CNA export) are neurons, and are left out of the directional analysis."""
    from cna_export.core.circuit import Circuit, Neuron
    from cna_export.export.safetensors import export_safetensors
    from cna_export.io.identity import checkpoint_identity

    out = base.parent / "cna"
    if not out.exists():
        neurons = [Neuron(layer=l, index=i, multiplier=0.0) for l in range(LAYERS) for i in (3, 9, 20)]
        export_safetensors(str(base), Circuit(kind="manual", model=checkpoint_identity(base, str(base))[0],
                                              neurons=neurons), out)
    rep = diff_checkpoints(str(base), str(out))
    assert rep.neurons and (rep.lowrank is None or not rep.lowrank.detected)


@pytest.fixture()
def recipe(prompt_files, tmp_path) -> Path:
    """A recipe naming the small test prompt sets (for refusal directions)."""
    pos, neg, _ = prompt_files
    path = tmp_path / "r.yaml"
    path.write_text(f"positive: {pos}\nnegative: {neg}\nbatch_size: 4\n")
    return path


def test_audit_reports_refusal_cosine_plot_and_direction(base, suspects, recipe, tmp_path):
    # abliterate the base's own refusal direction at layer 2
    loaded_dirs = tmp_path / "base.npz"
    rd, _ = refusal_directions(str(base), str(recipe), str(loaded_dirs), limit=6)
    r = rd.directions()[2]
    t = ab.rank1(dict(load_file(str(base / "model.safetensors"))), r, 1.0, embeddings=False)
    suspect = save(base, t, tmp_path / "abl")
    s = AuditSettings(base=str(base), recipe=str(recipe), directions=str(loaded_dirs), direction_prompts=6,
                      generate=False, discover=False, plot=str(tmp_path / "p.png"),
                      save_direction=str(tmp_path / "d.safetensors"))
    rep = audit(str(suspect), s)
    assert rep.exit_code == 4
    lr = rep.diff.lowrank
    assert lr.refusal.best_layer == 2 and lr.refusal.best_cos > 0.99
    assert "refusals stripped by directional ablation" in rep.verdict
    assert "refusal direction 1.00 (layer 2)" in rep.verdict
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    saved = load_file(str(tmp_path / "d.safetensors"))["direction"]
    assert abs(float(saved @ r)) > 0.99
    text = rep.render()
    assert "strength" in text and "refusal dir" in text
    # outputs are never overwritten silently
    with pytest.raises(CnaError):
        audit(str(suspect), s)


def test_refusal_directions_cache_is_checked(base, tensors, recipe, tmp_path):
    cache = tmp_path / "d.npz"
    rd, src = refusal_directions(str(base), str(recipe), str(cache), limit=6)
    assert cache.is_file() and "from the recipe" in src
    again, src2 = refusal_directions(str(base), str(recipe), str(cache), limit=6)
    assert "read from" in src2 and np.array_equal(again.harmful_mean, rd.harmful_mean)
    assert np.allclose(np.linalg.norm(rd.directions(), axis=1), 1.0)
    other = save(base, ab.finetune_noise(tensors, 0.05), tmp_path / "other")
    with pytest.raises(CnaError, match="other weights"):
        refusal_directions(str(other), str(recipe), str(cache), limit=6)
    with pytest.raises(CnaError, match="other harmful prompts"):
        refusal_directions(str(base), str(recipe), str(cache), limit=5)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(CnaError, match="not a refusal-directions file"):
        RefusalDirections.load(tmp_path / "bad.npz")


def test_refusal_cosines_finds_the_layer():
    rng = np.random.default_rng(0)
    D = np.stack([ab.unit(rng.standard_normal(16)) for _ in range(5)])
    c = refusal_cosines(-D[3], D, [3], "test")
    assert c.best_layer == 3 and c.best_cos == pytest.approx(1.0)


def test_depletion_score_separates_ablated_from_clean(base, tensors):
    rng = np.random.default_rng(5)
    D = np.stack([ab.unit(rng.standard_normal(32)) for _ in range(LAYERS)])
    src = open_weights(str(base))
    try:
        clean = depletion_score(src, D)
    finally:
        src.close()
    assert not clean.ratio_flagged, clean  # (random D: the refusal-write score is tested below)
    folder = base.parent / "depleted"
    if not folder.exists():
        save(base, ab.rank1(tensors, D[1], 0.9, layers=(1, 2), embeddings=False), folder)
    src = open_weights(str(folder))
    try:
        hit = depletion_score(src, D, window=2)
    finally:
        src.close()
    assert hit.flagged and hit.window == [1, 2] and hit.direction_layer == 1, hit
    assert hit.score < 0.05 and hit.alignment > 0.99


def test_cli_audit_flags(base, suspects, tmp_path, capsys):
    from cna_export.cli import main

    folder, _, _ = suspects["rank1"]
    code = main(["-q", "audit", str(folder), "--base", str(base), "--no-generate", "--no-discover",
                 "--no-refusal-direction",
                 "--rank-k", "3", "--save-direction", str(tmp_path / "d.npy"), "--json", str(tmp_path / "r.json")])
    assert code == 4
    assert "refusals stripped by directional ablation" in capsys.readouterr().out
    v = np.load(tmp_path / "d.npy", allow_pickle=False)
    assert v.shape == (32,)
    lr = json.loads((tmp_path / "r.json").read_text())["diff"]["lowrank"]
    assert lr["schema"] == 1 and lr["detected"] and lr["rank_k"] == 3 and len(lr["profile"]) == LAYERS
    assert main(["diff", str(base), str(folder), "--rank-k", "2"]) == 0
    assert "refusals stripped by directional ablation" in capsys.readouterr().out
    code = main(["-q", "audit", str(folder), "--base", str(base), "--no-generate", "--no-discover",
                 "--no-refusal-direction",
                 "--save-direction", str(tmp_path / "d.txt")])
    assert code == 2


def _ggml_quantize(W: np.ndarray, qtype):
    """``W`` quantised by ggml's own quantiser (skipped where llama-cpp-python is missing)."""
    from cna_export.io.quants import UnsupportedTensorType, quantize_rows

    try:
        return quantize_rows(W, qtype)
    except UnsupportedTensorType as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q2_K"])
def test_rounding_noise_model_predicts_the_quantisers_error(name):
    """step^2/12 per weight predicts ggml's own rounding error of a float matrix, row by row."""
    from gguf import GGMLQuantizationType

    from cna_export.io.quants import dequantize_rows, rounding_noise_rows

    qtype = GGMLQuantizationType[name]
    rng = np.random.default_rng(1)
    W = (rng.standard_normal((24, 512)) * rng.uniform(0.2, 3.0, size=(24, 1))).astype(np.float32)
    raw = _ggml_quantize(W, qtype)
    actual = ((dequantize_rows(raw, qtype).astype(np.float64) - W) ** 2).sum(axis=1)
    predicted = rounding_noise_rows(raw, qtype)
    ratio = actual / predicted
    # uniform rounding within one step: 1 for plain rounding; ggml's K-quant scale search trades a slightly
    # larger error for fewer clipped values (Q2_K most), never by more than a factor of two here
    assert np.all((ratio > 0.6) & (ratio < 1.6)), (name, ratio.min(), ratio.max())
    assert rounding_noise_rows(W, GGMLQuantizationType.F32).tolist() == [0.0] * 24
    assert rounding_noise_rows(np.zeros((2, 66), np.uint8), GGMLQuantizationType.IQ2_XXS) is None


def test_depletion_score_sees_one_writer_kind(base, tensors):
    """An edit that survives in o_proj only (as after a re-quantisation restored down_proj) is still found,
    by the o_proj-only windows; the clean model stays unflagged in every writer group."""
    rng = np.random.default_rng(5)
    D = np.stack([ab.unit(rng.standard_normal(32)) for _ in range(LAYERS)])
    folder = base.parent / "depleted-oproj"
    if not folder.exists():
        edited = ab.rank1(tensors, D[1], 1.0, layers=(1, 2), embeddings=False)
        edited = {k: (v if "o_proj" in k else tensors[k]) for k, v in edited.items()}
        save(base, edited, folder)
    src = open_weights(str(folder))
    try:
        hit = depletion_score(src, D, window=2)
    finally:
        src.close()
    assert hit.flagged and hit.writers == "o_proj" and hit.window == [1, 2], hit
    assert hit.debiased
    src = open_weights(str(base))
    try:
        clean = depletion_score(src, D, window=2)
    finally:
        src.close()
    assert not clean.ratio_flagged and {w.writers for w in clean.windows} == {"o_proj + down_proj", "o_proj",
                                                                                       "down_proj"}


def test_refusal_write_deficit_flags_a_partial_per_layer_ablation(base, tensors):
    """A partial ablation (strength 0.6, a different direction per layer, as heretic's kernels) leaves no
    depleted eigen-direction, but the writers write the model's own per-layer direction at (1 - 0.6)^2 of
    its energy: the write score falls below its threshold; the clean model, which writes those directions
    strongly, stays above it."""
    grams = []
    for layer in range(LAYERS):
        W = tensors[f"model.layers.{layer}.self_attn.o_proj.weight"].astype(np.float64)
        grams.append(W @ W.T)
    D = np.stack([np.linalg.eigh(g)[1][:, -1] for g in grams])  # each layer's most strongly written direction
    src = open_weights(str(base))
    try:
        clean = depletion_score(src, D, window=2)
    finally:
        src.close()
    assert not clean.write.flagged and min(clean.write.per_layer["attn_output"]) > 3.0, clean.write
    edited = dict(tensors)
    for layer in range(LAYERS):
        edited = ab.rank1(edited, D[layer], 0.6, layers=(layer,), embeddings=False)
    folder = save(base, edited, base.parent / "partial-per-layer")
    src = open_weights(str(folder))
    try:
        hit = depletion_score(src, D, window=2)
    finally:
        src.close()
    w = hit.write
    assert w.flagged and hit.flagged and not hit.ratio_flagged, (w, hit.score)
    assert w.score < 0.5 * clean.write.score
    per = w.per_layer["attn_output"]
    assert all(v < 0.2 * clean.write.per_layer["attn_output"][i] + 1e-9 for i, v in enumerate(per)), per
